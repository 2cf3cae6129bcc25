"""Tracking for stage commands: one run per stage, nested under one parent run per pipeline execution.

A pipeline execution is keyed by ``LOFA_PIPELINE_ID`` (the Prefect flow and
``scripts/run_default.sh`` set it) or, under a bare ``dvc repro`` / ``dvc exp run``, by the
DVC process that runs the stage commands (plus ``DVC_EXP_NAME``): each stage command is its
own process, so the first stage creates the parent run and the others find it by that key
(``lofa.pipeline`` tag). A stage run by hand has no parent. Parent and stage runs carry the
git commit, the dirty flag and the DVC experiment name (:mod:`lofa.run_parent`).

Runs go to the store ``MLFLOW_TRACKING_URI`` names (``lofa.env.setup_env``: the repo's
``mlflow.db``). On the GPU machine that is a local sqlite store of MLflow itself, brought here
with mlflow-export-import (:mod:`lofa.device_runs`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lofa.run_parent import execution_key, follow_parent, git_tags, parent_run

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
    """The id grouping the stage runs of one pipeline execution (a per-command id for a stage run by hand)."""
    return execution_key() or f"adhoc-{uuid.uuid4().hex[:8]}"


class OtherRank:
    """What ranks other than 0 of a multi-process stage get from :func:`stage_run`: every
    logging call of the ``mlflow`` API is accepted and dropped (rank 0 logs the reduced metrics)."""

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("log_"):
            raise AttributeError(f"OtherRank: no {name!r} (only rank 0 has a tracking run)")
        return lambda *args, **kwargs: None


def experiment_id(mlflow: Any) -> str:
    """The id of the ``lofa`` experiment, created (artifacts at ``$LOFA_MLFLOW_ARTIFACTS``) when missing."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=os.environ.get("LOFA_MLFLOW_ARTIFACTS"))
    return exp.experiment_id


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start a run for ``stage``, log flattened ``params``; yield the ``mlflow`` module.

    In a multi-process launch only rank 0 records: the other ranks get an :class:`OtherRank`."""
    from lofa.env import process_rank

    if process_rank() != 0:
        yield OtherRank()
        return
    all_tags = {"lofa.stage": stage, "lofa.pipeline": pipeline_id(), **(tags or {})}
    flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
    import mlflow

    exp_id = experiment_id(mlflow)
    mlflow.set_experiment(experiment_id=exp_id)
    parent = parent_run(mlflow.MlflowClient(), exp_id, all_tags["lofa.pipeline"]) if execution_key() else None
    all_tags |= git_tags(dict(parent.data.tags) if parent else None)
    name = f"{stage} ({parent.info.run_name})" if parent else stage
    with mlflow.start_run(run_name=name, tags=all_tags, parent_run_id=parent and parent.info.run_id):
        if flat:
            mlflow.log_params(flat)
        with follow_parent(mlflow.MlflowClient(), parent and parent.info.run_id):
            yield mlflow


def log_artifact_if_exists(mlflow: Any, path: str | Path, artifact_path: str | None = None) -> None:
    if Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


#: The MLflow dataset name of the preprocessed manifest.
MANIFEST_DATASET = "preprocessed-manifest"


def log_manifest(run: Any, data_dir: str | Path, context: str) -> None:
    """Log ``<data_dir>/manifest.parquet`` as a dataset input (``context``: training, evaluation,
    output) of the active run and of its parent, so the UI shows which clips a run saw.

    The digest is the file's sha256 (DVC tracks the same bytes); the source its absolute path.
    Ranks other than 0 (an :class:`OtherRank`) skip it."""
    import hashlib
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    if getattr(run, "__name__", "") != "mlflow":  # an OtherRank
        return
    path = Path(data_dir) / "manifest.parquet"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with warnings.catch_warnings():  # its schema hint about integer columns: the manifest has no missing values
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(pd.read_parquet(path), source=str(path.resolve()), name=MANIFEST_DATASET,
                                     digest=digest)
    mlflow.log_input(ds, context=context)
    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if parent:
        tag = InputTag(key="mlflow.data.context", value=context)
        mlflow.MlflowClient().log_inputs(parent, [DatasetInput(ds._to_mlflow_entity(), [tag])])


def model_registry_off() -> str:
    """Why this process registers no model ("" when it does): ``LOFA_REGISTER_MODEL=0``, which the
    GPU machine's script sets, since mlflow-export-import brings its runs here but not a registry."""
    return "LOFA_REGISTER_MODEL=0" if os.environ.get("LOFA_REGISTER_MODEL", "1") == "0" else ""
