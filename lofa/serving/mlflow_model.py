"""The MLflow pyfunc model of the LoFA hypernetwork (a "model from code": MLflow runs this
file to load it, so nothing is pickled). Registered by :func:`lofa.serving.registry.register_hypernet`,
with the ``lofa`` package shipped beside it (``code_paths``), so ``mlflow models serve`` runs it
from an environment that has only the model's requirements.

``predict`` takes a DataFrame with a ``prompt`` column (or a list of prompts) and returns one
row per prompt: the LoRA as a safetensors file, never its floats as JSON (a Wan-scale LoRA is
~23.6M numbers). Param ``output``: ``path`` (default) writes each LoRA under ``out_dir`` (param,
else the model config's, else ``<tmp>/lofa-loras``), named by the model and prompt, and returns
the path (``lora_path``); ``bytes`` returns the file's bytes (``lora_safetensors``; base64 in
the scoring server's JSON).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

#: Values of the ``output`` param.
OUTPUTS = ("path", "bytes")


class LoFAHypernet(PythonModel):
    def load_context(self, context: Any) -> None:
        from lofa.serving.predict import PredictError, Predictor

        cfg = dict(context.model_config or {})
        self.predictor = Predictor.from_dirs(
            cfg["base_dir"], context.artifacts.get("stage1"), context.artifacts["stage2"],
            context.artifacts["params"], device=cfg.get("device", "cpu"), dtype=cfg.get("dtype", "float32"))
        want = cfg.get("base_model_hash", "")
        if want and self.predictor.base.hash != want:
            raise PredictError(f"{cfg['base_dir']} holds base model {self.predictor.base.hash}; this hypernetwork "
                               f"was registered for {want}")
        self.out_dir = cfg.get("out_dir") or str(Path(tempfile.gettempdir()) / "lofa-loras")

    def lora_path(self, prompt: str, out_dir: str) -> Path:
        """Where the LoRA of ``prompt`` goes: one file per (hypernetwork, prompt), so a repeat overwrites it."""
        name = hashlib.sha256(f"{self.predictor.hypernet_hash}\0{prompt}".encode()).hexdigest()[:24]
        return Path(out_dir) / f"lora-{name}.safetensors"

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        import pandas as pd

        from lofa.serving.predict import PredictError

        params = params or {}
        output, out_dir = params.get("output") or "path", params.get("out_dir") or self.out_dir
        if output not in OUTPUTS:
            raise PredictError(f"param output={output!r}: use one of {list(OUTPUTS)}")
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        rows = []
        with tempfile.TemporaryDirectory(prefix="lofa-serve-") as tmp:
            for pred in self.predictor.predict_batch(prompts):
                path = self.lora_path(pred.prompt, out_dir if output == "path" else tmp)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.predictor.save(pred, path)  # atomic
                value = str(path) if output == "path" else path.read_bytes()
                rows.append({"prompt": pred.prompt, f"lora_{'path' if output == 'path' else 'safetensors'}": value})
        return pd.DataFrame(rows)


mlflow.models.set_model(LoFAHypernet())
