"""MLflow tracking for stage commands: one run per stage, grouped per pipeline execution.

Runs of one pipeline execution share the tag ``lofa.pipeline`` (from
``LOFA_PIPELINE_ID``, which the Prefect flow and ``scripts/run_default.sh`` set;
otherwise a per-command id) and are named after their stage.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "lofa"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def pipeline_id() -> str:
    """The id grouping the stage runs of one pipeline execution."""
    return os.environ.get("LOFA_PIPELINE_ID") or f"adhoc-{uuid.uuid4().hex[:8]}"


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start an MLflow run for ``stage``, log flattened ``params``, yield the ``mlflow`` module."""
    import mlflow

    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=os.environ.get("LOFA_MLFLOW_ARTIFACTS"))
    mlflow.set_experiment(EXPERIMENT)
    all_tags = {"lofa.stage": stage, "lofa.pipeline": pipeline_id(), **(tags or {})}
    with mlflow.start_run(run_name=stage, tags=all_tags):
        flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
        if flat:
            mlflow.log_params(flat)
        yield mlflow


def log_artifact_if_exists(mlflow: Any, path: str | Path, artifact_path: str | None = None) -> None:
    if Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
