"""Runs made on the GPU machine come back with mlflow-export-import (lofa.device_runs).

The device side is simulated on CPU with its settings (scripts/device_medium.sh): real stage
commands log to MLflow itself in a local sqlite store of a scratch dir, nested under the
execution's parent run (``LOFA_PIPELINE_ID``), with ``LOFA_REGISTER_MODEL=0``; the tool's
``export-experiment`` writes the export the archive carries; ``python -m lofa.device_runs import``
brings it into a separate project store. Every run is compared with its source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lofa.device_runs import SOURCE_ID_TAG, export_runs

ROOT = Path(__file__).resolve().parents[1]
LATER = """
from lofa.tracking import stage_run
with stage_run("refine", {"clips": 4}) as mlflow:
    mlflow.log_metrics({"steps_from_zero": 30.0})
"""
FAIL = """
from lofa.tracking import stage_run
with stage_run("train_stage1", {"train": {"lr": 0.001}}) as mlflow:
    mlflow.log_metrics({"loss": 2.0}, step=1)
    raise RuntimeError("out of memory (simulated)")
"""


def _store(path: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{path}/mlflow.db", "LOFA_MLFLOW_ARTIFACTS": (path / "artifacts").as_uri()}


def _run(cmd: list[str], env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert (proc.returncode == 0) == ok, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _smoke_params(out: Path) -> Path:
    """params-medium.yaml with scripts/medium_smoke.yaml merged over it (what LOFA_MEDIUM_SMOKE=1 runs)."""
    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    params = merge(yaml.safe_load((ROOT / "params-medium.yaml").read_text()),
                   yaml.safe_load((ROOT / "scripts" / "medium_smoke.yaml").read_text()))
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def _artifacts(client, run_id: str, path: str = "") -> dict[str, bytes]:
    """Every artifact file of a run: its path -> its bytes."""
    out = {}
    for a in client.list_artifacts(run_id, path or None):
        if a.is_dir:
            out |= _artifacts(client, run_id, a.path)
        else:
            out[a.path] = Path(client.download_artifacts(run_id, a.path)).read_bytes()
    return out


def _history(client, run) -> dict[str, list[tuple[int, float, int]]]:
    return {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, k)]
            for k in run.data.metrics}


def test_export_folder_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere/experiment\.json: missing; not a folder written by"):
        export_runs(tmp_path / "nowhere")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"exp/experiment\.json: not an export-experiment manifest"):
        export_runs(tmp_path / "exp")
    (tmp_path / "exp" / "experiment.json").write_text(json.dumps({"mlflow": {"runs": ["abc"]}}))
    with pytest.raises(FileNotFoundError, match=r"no run\.json for exported run\(s\) \['abc'\]"):
        export_runs(tmp_path / "exp")


@pytest.mark.slow
def test_device_runs_come_back_with_export_import(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    dev, here, d = tmp_path / "device", tmp_path / "here", tmp_path / "device" / "data"
    params = _smoke_params(tmp_path / "params-smoke.yaml")
    device = {**_store(dev), "LOFA_PIPELINE_ID": "medium-gpu-sim", "LOFA_REGISTER_MODEL": "0"}
    _run([sys.executable, "-m", "pipelines.synthesize", "--params", str(params), "--out", str(d / "motionx_synth"),
          "--metrics", str(d / "metrics" / "synthesize.json"), "--no-progress"], device)
    _run([sys.executable, "-m", "pipelines.preprocess", "--params", str(params), "--root", str(d / "motionx_synth"),
          "--out", str(d / "preprocessed"), "--metrics", str(d / "metrics" / "preprocess.json"), "--no-progress"],
         device)
    _run([sys.executable, "-c", FAIL], device, ok=False)
    export = tmp_path / "archive" / "tracking" / "export"  # as device_medium.sh writes it into the archive
    _run([sys.executable, "-m", "mlflow_export_import.experiment.export_experiment", "--experiment", "lofa",
          "--output-dir", str(export)], _store(dev))

    out = _run([sys.executable, "-m", "lofa.device_runs", "import", str(export)], _store(here)).stdout
    again = _run([sys.executable, "-m", "lofa.device_runs", "import", str(export)], _store(here)).stdout

    src, dst = MlflowClient(_store(dev)["MLFLOW_TRACKING_URI"]), MlflowClient(_store(here)["MLFLOW_TRACKING_URI"])
    src_runs = src.search_runs([src.get_experiment_by_name("lofa").experiment_id])
    dst_runs = dst.search_runs([dst.get_experiment_by_name("lofa").experiment_id])
    assert len(src_runs) == 4 and len(dst_runs) == 4  # parent + synthesize + preprocess + the failed one; once
    assert out.count("imported: ") == 4 and again.count("already imported: ") == 4
    by_source = {r.data.tags[SOURCE_ID_TAG]: r for r in dst_runs}
    new_id = {s: r.info.run_id for s, r in by_source.items()}
    stages = {}
    for s in src_runs:
        r = by_source[s.info.run_id]
        assert r.info.run_name == s.info.run_name and r.info.status == s.info.status
        assert r.data.params == s.data.params
        assert _history(dst, r) == _history(src, s)  # steps, values and timestamps
        tags = {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow_exim.")}
        want = dict(s.data.tags)
        if "mlflow.parentRunId" in want:  # nesting kept, pointing at the imported parent
            want["mlflow.parentRunId"] = new_id[want["mlflow.parentRunId"]]
        if "mlflow.user" not in want:  # the parent, created with the client, has none; the import names one
            tags.pop("mlflow.user")
        assert tags == want
        assert _artifacts(dst, r.info.run_id) == _artifacts(src, s.info.run_id)
        assert r.data.tags["mlflow_exim.run_info.start_time"] == str(s.info.start_time)
        stages[s.data.tags.get("lofa.stage", "parent")] = r
    assert set(stages) == {"parent", "synthesize", "preprocess", "train_stage1"}
    parent = stages["parent"]
    assert parent.data.tags["lofa.pipeline"] == "medium-gpu-sim"
    for name in ("synthesize", "preprocess", "train_stage1"):
        assert stages[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stages["train_stage1"].info.status == "FAILED" and stages["preprocess"].info.status == "FINISHED"
    assert stages["preprocess"].data.metrics["clips"] == 40
    assert _artifacts(dst, stages["synthesize"].info.run_id)  # the contact sheet & co. came along

    # a later call on the same machine: one more stage, the whole store exported again
    _run([sys.executable, "-c", LATER], device)
    export2 = tmp_path / "archive2" / "tracking" / "export"
    _run([sys.executable, "-m", "mlflow_export_import.experiment.export_experiment", "--experiment", "lofa",
          "--output-dir", str(export2)], _store(dev))
    out = _run([sys.executable, "-m", "lofa.device_runs", "import", str(export2)], _store(here)).stdout
    assert out.count("already imported: ") == 4 and out.count("\nimported: ") + out.startswith("imported: ") == 1
    runs = dst.search_runs([dst.get_experiment_by_name("lofa").experiment_id])
    later = [r for r in runs if r.data.tags.get("lofa.stage") == "refine"]
    assert len(runs) == 5 and len(later) == 1
    assert later[0].data.tags["mlflow.parentRunId"] == parent.info.run_id  # under the parent the first import made
    assert later[0].data.metrics == {"steps_from_zero": 30.0}
