"""The MLflow pyfunc model of the LoFA hypernetwork (a "model from code": MLflow runs this
file to load it, so nothing is pickled). Registered by :func:`lofa.registry.register_hypernet`.

``predict`` takes prompts (a list of strings, or a DataFrame with a ``prompt`` column)
and returns, per prompt, the LoRA as a dict of export-format key -> float32 array.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class LoFAHypernet(PythonModel):
    def load_context(self, context: Any) -> None:
        from lofa.predict import PredictError, Predictor

        cfg = dict(context.model_config or {})
        self.predictor = Predictor.from_dirs(
            cfg["base_dir"], context.artifacts.get("stage1"), context.artifacts["stage2"],
            context.artifacts["params"], device=cfg.get("device", "cpu"), dtype=cfg.get("dtype", "float32"))
        want = cfg.get("base_model_hash", "")
        if want and self.predictor.base.hash != want:
            raise PredictError(f"{cfg['base_dir']} holds base model {self.predictor.base.hash}; this hypernetwork "
                               f"was registered for {want}")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        out = []
        for pred in self.predictor.predict_batch(prompts):
            lora = {}
            for m, a, b in zip(pred.vocab, pred.A, pred.B, strict=True):
                down, up = m.lora_keys("export")
                lora[down], lora[up] = a.cpu().numpy(), b.cpu().numpy()
            out.append(lora)
        return out


mlflow.models.set_model(LoFAHypernet())
