"""Tracking for stage commands: one run per stage, nested under one parent run per pipeline execution.

A pipeline execution is keyed by ``LOFA_PIPELINE_ID`` (the Prefect flow and
``scripts/run_default.sh`` set it) or, under a bare ``dvc repro`` / ``dvc exp run``, by the
DVC process that runs the stage commands (plus ``DVC_EXP_NAME``): each stage command is its
own process, so the first stage creates the parent run and the others find it by that key
(``lofa.pipeline`` tag). A stage run by hand has no parent. Parent and stage runs carry the
git commit, the dirty flag and the DVC experiment name (:mod:`lofa.run_parent`).

``LOFA_TRACKING`` picks the backend: ``mlflow`` (the default) or ``off``. Off, or
when mlflow cannot be imported (a warning says so), :func:`stage_run` yields a
:class:`LocalRun` that records the same calls as JSON lines under
``$LOFA_TRACKING_DIR`` (default ``tracking/`` at the repo root); replay such
records into MLflow with ``python -m lofa.tracking import DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lofa.env import repo_root, setup_env
from lofa.run_parent import execution_key, follow_parent, git_tags, parent_run

EXPERIMENT = "lofa"
#: Values of ``LOFA_TRACKING``.
MODES = ("mlflow", "off")
#: The tag that ties an imported MLflow run to its local record (a second import skips it).
LOCAL_RUN_TAG = "lofa.local_run_id"
RECORDS = "records.jsonl"


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


def tracking_dir() -> Path:
    """Where local runs are recorded: ``$LOFA_TRACKING_DIR``, else ``tracking/`` at the repo root."""
    return Path(os.environ.get("LOFA_TRACKING_DIR") or repo_root() / "tracking")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalRun:
    """The part of the ``mlflow`` module API the stage commands call, recorded in one run directory.

    ``<run_dir>/records.jsonl`` gets one JSON object a line, appended as the calls happen
    (``kind``: ``start``, ``params``, ``metrics``, ``artifact``, ``table``, ``end``);
    artifacts are copied under ``<run_dir>/artifacts/`` at their MLflow artifact path.
    ``reason`` says why this run is not in MLflow.
    """

    def __init__(self, run_dir: Path, reason: str) -> None:
        self.run_dir, self.reason = Path(run_dir), reason
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / RECORDS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _artifact_dest(self, artifact_file: str) -> Path:
        dest = self.run_dir / "artifacts" / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._append({"kind": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_param(self, key: str, value: Any) -> None:
        self.log_params({key: value})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._append({"kind": "metrics", "step": int(step or 0), "time_ms": _now_ms(),
                      "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"log_artifact: {src} is not a file")
        rel = f"{artifact_path}/{src.name}" if artifact_path else src.name
        shutil.copy2(src, self._artifact_dest(rel))
        self._append({"kind": "artifact", "path": f"artifacts/{rel}", "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._artifact_dest(artifact_file).write_text(text)
        self._append({"kind": "artifact", "path": f"artifacts/{artifact_file}",
                      "artifact_path": os.path.dirname(artifact_file) or None})

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            self.log_text(yaml.safe_dump(dict(dictionary), sort_keys=False), artifact_file)
        else:
            self.log_text(json.dumps(dictionary, indent=2), artifact_file)

    def log_table(self, data: Any, artifact_file: str) -> None:
        """``data``: a DataFrame or a dict of columns, written as MLflow writes tables (JSON, ``split``)."""
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        frame.to_json(self._artifact_dest(artifact_file), orient="split", index=False, date_format="iso")
        self._append({"kind": "table", "path": f"artifacts/{artifact_file}", "artifact_file": artifact_file})


class OtherRank:
    """What ranks other than 0 of a multi-process stage get from :func:`stage_run`: every
    logging call of the ``mlflow`` API is accepted and dropped (rank 0 logs the reduced metrics)."""

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("log_"):
            raise AttributeError(f"OtherRank: no {name!r} (only rank 0 has a tracking run)")
        return lambda *args, **kwargs: None


@contextmanager
def local_run(stage: str, tags: Mapping[str, str], reason: str) -> Iterator[LocalRun]:
    """A :class:`LocalRun` under ``tracking_dir()/<pipeline>/<stage>-<id>``; ``end`` records its status."""
    run_id = uuid.uuid4().hex
    run = LocalRun(tracking_dir() / tags["lofa.pipeline"] / f"{stage}-{run_id[:8]}", reason)
    run._append({"kind": "start", "run_id": run_id, "run_name": stage, "tags": dict(tags), "time_ms": _now_ms()})
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run._append({"kind": "end", "status": status, "time_ms": _now_ms()})


def _mlflow_or_reason() -> tuple[Any, str]:
    """(the mlflow module, "") or (None, why tracking stays local)."""
    mode = (os.environ.get("LOFA_TRACKING") or "mlflow").strip().lower()
    if mode not in MODES:
        raise ValueError(f"LOFA_TRACKING={mode!r} is not one of {list(MODES)}")
    if mode == "off":
        return None, "LOFA_TRACKING=off"
    try:
        import mlflow
    except ImportError as e:
        print(f"[lofa.tracking] WARNING: mlflow cannot be imported ({e}); recording runs under {tracking_dir()} "
              "instead (replay: python -m lofa.tracking import DIR)", file=sys.stderr)
        return None, f"mlflow cannot be imported ({e})"
    return mlflow, ""


def experiment_id(mlflow: Any) -> str:
    """The id of the ``lofa`` experiment, created (artifacts at ``$LOFA_MLFLOW_ARTIFACTS``) when missing."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=os.environ.get("LOFA_MLFLOW_ARTIFACTS"))
    return exp.experiment_id


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start a run for ``stage``, log flattened ``params``; yield the ``mlflow`` module or a :class:`LocalRun`.

    In a multi-process launch only rank 0 records: the other ranks get an :class:`OtherRank`."""
    from lofa.env import process_rank

    if process_rank() != 0:
        yield OtherRank()
        return
    all_tags = {"lofa.stage": stage, "lofa.pipeline": pipeline_id(), **(tags or {})}
    flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
    mlflow, reason = _mlflow_or_reason()
    if mlflow is None:
        with local_run(stage, all_tags, reason) as run:
            if flat:
                run.log_params(flat)
            yield run
        return
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
    Backends without dataset inputs (other ranks, local records) skip it."""
    import hashlib
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    if getattr(run, "__name__", "") != "mlflow":  # an OtherRank or a LocalRun
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


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of one local run (``records.jsonl``); a last line cut off by a killed process is dropped."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
    if not records or records[0].get("kind") != "start":
        raise ValueError(f"{path}: does not begin with a 'start' record; not a lofa local run")
    return records


def _replay(client: Any, exp_id: str, run_dir: Path, records: list[dict[str, Any]]) -> str:
    """Create one MLflow run from a local run's records (times, steps and artifacts kept); its id."""
    import pandas as pd
    from mlflow.entities import Metric, Param

    start = records[0]
    tags = {**start["tags"], LOCAL_RUN_TAG: start["run_id"], "lofa.imported_from": str(run_dir.resolve())}
    run_id = client.create_run(exp_id, start_time=start["time_ms"], tags=tags, run_name=start["run_name"]).info.run_id
    params: list[Param] = []
    metrics: list[Metric] = []
    end = {"status": "KILLED", "time_ms": records[-1].get("time_ms", start["time_ms"])}  # no end: killed
    for r in records[1:]:
        if r["kind"] == "params":
            params += [Param(k, v) for k, v in r["params"].items()]
        elif r["kind"] == "metrics":
            metrics += [Metric(k, v, r["time_ms"], r["step"]) for k, v in r["metrics"].items()]
        elif r["kind"] == "artifact":
            client.log_artifact(run_id, str(run_dir / r["path"]), r["artifact_path"])
        elif r["kind"] == "table":
            client.log_table(run_id, pd.read_json(run_dir / r["path"], orient="split"), r["artifact_file"])
        elif r["kind"] == "end":
            end = r
    for i in range(0, len(params), 100):  # MLflow's log_batch limits
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_terminated(run_id, end["status"], end["time_ms"])
    return run_id


def import_runs(root: str | Path) -> list[tuple[dict[str, Any], str, bool]]:
    """Replay every local run under ``root`` into the ``lofa`` MLflow experiment.

    Returns (start record, MLflow run id, imported now) per run; a run imported before
    (same ``lofa.local_run_id`` tag) is not imported twice.
    """
    import mlflow
    from mlflow import MlflowClient

    files = sorted(Path(root).rglob(RECORDS))
    if not files:
        raise FileNotFoundError(f"{root}: no {RECORDS} below it (local runs are written under LOFA_TRACKING_DIR)")
    client, exp_id = MlflowClient(), experiment_id(mlflow)
    out = []
    for f in files:
        records = read_records(f)
        start = records[0]
        found = client.search_runs([exp_id], filter_string=f"tags.`{LOCAL_RUN_TAG}` = '{start['run_id']}'")
        if found:
            out.append((start, found[0].info.run_id, False))
        else:
            out.append((start, _replay(client, exp_id, f.parent, records), True))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lofa.tracking", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="replay local runs (LOFA_TRACKING=off) into MLflow")
    imp.add_argument("dir", type=Path, help="a LOFA_TRACKING_DIR, or any folder above records.jsonl files")
    args = p.parse_args(argv)
    setup_env()
    import mlflow

    try:
        imported = import_runs(args.dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"lofa.tracking import: {e}") from None
    for start, run_id, new in imported:
        print(f"{'imported' if new else 'already imported'}: {start['run_name']} "
              f"(lofa.pipeline={start['tags'].get('lofa.pipeline')}) -> run {run_id}")
    print(f"experiment '{EXPERIMENT}' at {mlflow.get_tracking_uri()}")


if __name__ == "__main__":
    main()
