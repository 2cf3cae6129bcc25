"""Prompt in, LoRA out: the :class:`~lofa.serving.predict.Predictor`, its CUDA-graph replay, and the
MLflow model registry / pyfunc wrapper. Training stages import none of this."""
