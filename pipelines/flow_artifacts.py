"""What a flow run of ``lofa-pipeline`` shows in Prefect's UI besides its tasks, and the params it runs with.

* :func:`apply_overrides`: the flow parameter ``params`` (dotted keys, as ``dvc exp run -S``)
  written into ``<root>/params.yaml`` before any stage runs, so DVC, the stages and MLflow all see
  the values the run was started with.
* :func:`publish_evaluation`: after ``evaluate``, the held-out table of ``metrics/evaluate.json``
  as a table artifact (one row per method: gap closed, its 95% interval, flow-matching loss) and a
  link artifact to the MLflow run that wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from lofa.io import read_json, write_text

#: Artifact keys (Prefect keeps one history per key: the UI's Artifacts page lists each with its versions).
TABLE_KEY = "lofa-evaluation"
LINK_KEY = "lofa-evaluation-mlflow-run"
#: Where the MLflow UI answers (README "MLflow UI"); ``LOFA_MLFLOW_UI`` for another host or port.
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
TABLE_COLUMNS = ("method", "gap_closed", "lo", "hi", "fm_loss")


def _parse(value: Any) -> Any:
    """A string value parsed as YAML, as ``dvc exp run -S key=value`` does ("300" -> 300)."""
    return yaml.safe_load(value) if isinstance(value, str) else value


def parse_set(items: list[str]) -> dict[str, str]:
    """``["fit_loras.steps=300", ...]`` (the CLI's ``-S``) as overrides; values stay strings, read later."""
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise SystemExit(f"-S takes KEY=VALUE (a dotted params.yaml key), not {bad}")
    return dict(item.split("=", 1) for item in items)


def apply_overrides(root: str | Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` in ``<root>/params.yaml`` (atomically); returns them parsed.

    Only keys already in the file may be set: every stage's config rejects unknown keys, and a
    typo found here fails the run before any stage, naming the file and the keys that exist."""
    if not overrides:
        return {}
    path = Path(root) / "params.yaml"
    params = yaml.safe_load(path.read_text())
    parsed = {key: _parse(value) for key, value in overrides.items()}
    for key, value in parsed.items():
        *parents, leaf = key.split(".")
        node = params
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise KeyError(f"{path}: no section {'.'.join(parents[:i + 1])!r} for override {key!r}; "
                               f"sections there: {sorted(node)}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"{path}: no key {key!r}; keys of {'.'.join(parents) or 'the file'}: {sorted(node)}")
        node[leaf] = value
    write_text(path, yaml.safe_dump(params, sort_keys=False))
    return parsed


def evaluation_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of an ``evaluate.json``: gap closed with its 95% bootstrap interval, fm loss."""
    rows = []
    for method, m in metrics["methods"].items():
        rows.append({"method": method, "gap_closed": round(m["gap_closed"], 4),
                     "lo": round(m["gap_closed_lo"], 4), "hi": round(m["gap_closed_hi"], 4),
                     "fm_loss": round(m["fm_loss"], 4)})
    return rows


def evaluate_run(pipeline_id: str) -> Any | None:
    """The MLflow run of ``evaluate`` in this pipeline execution, else the latest finished one (the stage
    was up to date, so an earlier execution wrote the metrics); None when MLflow has none."""
    import mlflow

    from lofa.tracking import EXPERIMENT

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    client = mlflow.MlflowClient()
    for where in (f" and tags.`lofa.pipeline` = '{pipeline_id}'", " and attributes.status = 'FINISHED'"):
        runs = client.search_runs([exp.experiment_id], f"tags.`lofa.stage` = 'evaluate'{where}",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0]
    return None


def mlflow_run_url(run: Any) -> str:
    """The run's page in the MLflow UI (``LOFA_MLFLOW_UI``, default the README's ``mlflow server``)."""
    base = os.environ.get("LOFA_MLFLOW_UI", DEFAULT_MLFLOW_UI).rstrip("/")
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def publish_evaluation(root: str | Path, pipeline_id: str) -> dict[str, Any] | None:
    """Create the evaluation table and MLflow link artifacts of this flow run (ids and URL);
    None when ``<root>/metrics/evaluate.json`` does not exist (the flow ran no evaluate)."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    path = Path(root) / "metrics" / "evaluate.json"
    if not path.is_file():
        return None
    metrics = read_json(path)
    clips = metrics.get("clips", "?")
    table_id = create_table_artifact(evaluation_rows(metrics), key=TABLE_KEY, description=(
        f"Held-out evaluation ({clips} clips, {path}): share of the base -> oracle flow-matching loss gap "
        "closed by each method, its 95% bootstrap interval [lo, hi], and the mean flow-matching loss."))
    out: dict[str, Any] = {"table": table_id, "url": None}
    run = evaluate_run(pipeline_id)
    if run is not None:
        ours = run.data.tags.get("lofa.pipeline") == pipeline_id
        out["url"] = mlflow_run_url(run)
        out["link"] = create_link_artifact(out["url"], link_text=f"MLflow run {run.info.run_name}", key=LINK_KEY,
                                           description="The MLflow run of the evaluate stage" + (
                                               " of this flow run" if ours else
                                               " that wrote these metrics (up to date in this flow run)"))
    return out
