"""One MLflow parent run per pipeline execution when nothing sets ``LOFA_PIPELINE_ID``: the stage
commands of one bare ``dvc repro`` (separate processes) find one parent through the ``dvc`` process
that runs them; a second ``dvc repro`` gets another; ``dvc exp run -n NAME`` gets a parent named
after the experiment. A toy two-stage ``dvc.yaml`` whose commands call ``lofa.tracking.stage_run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from lofa.env import python_first

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STAGE = """
import sys
from pathlib import Path
from lofa.tracking import stage_run
with stage_run(sys.argv[1], {"n": Path("params.yaml").read_text().strip()}):
    Path(sys.argv[1] + ".txt").write_text(Path("params.yaml").read_text())
"""


def _run(repo: Path, env: dict[str, str], *cmd: str) -> None:
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("parent") / "repo"
    repo.mkdir()
    store = repo.parent / "store"
    env = {k: v for k, v in python_first().items() if k != "LOFA_PIPELINE_ID"}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "LOFA_MLFLOW_ARTIFACTS": (store / "mlruns").as_uri(),
            "PYTHONPATH": str(ROOT), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}
    store.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "params.yaml").write_text("toy:\n  n: 1\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "first": {"cmd": "python stage.py first", "deps": ["stage.py"], "params": ["toy.n"], "outs": ["first.txt"]},
        "second": {"cmd": "python stage.py second", "deps": ["first.txt"], "outs": ["second.txt"]}}}))
    (repo / ".gitignore").write_text("/first.txt\n/second.txt\n")
    for cmd in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "toy"]):
        _run(repo, env, *cmd)
    return repo, env


def _runs(env: dict[str, str]):
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lofa")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_each_dvc_repro_is_one_parent_and_an_experiment_is_named(repo):
    repo, env = repo
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(repo, env, dvc, "repro")
    _run(repo, env, dvc, "repro", "--force")
    _run(repo, env, dvc, "exp", "run", "-n", "bigger-n", "-S", "toy.n=2")
    _run(repo, env, dvc, "exp", "run", "--temp", "-n", "in-temp", "-S", "toy.n=3")  # in a temporary clone
    runs = _runs(env)
    parents = [r for r in runs if r.data.tags.get("lofa.role") == "pipeline"]
    assert len(parents) == 4, [r.info.run_name for r in runs]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["lofa.stage"] for r in children) == ["first", "second"]
        assert {r.info.run_name for r in children} == {f"first ({parent.info.run_name})",
                                                       f"second ({parent.info.run_name})"}
        key = parent.data.tags["lofa.pipeline"]
        assert key.startswith("dvc-") and all(r.data.tags["lofa.pipeline"] == key for r in children)
        assert parent.info.status == "FINISHED"
    first, second, exp, temp = parents
    assert first.data.tags["lofa.git_commit"] == second.data.tags["lofa.git_commit"] == head
    assert first.data.tags["lofa.pipeline"] != second.data.tags["lofa.pipeline"]
    assert first.data.tags["lofa.git_dirty"] == "false" and first.info.run_name.startswith(f"pipeline {head[:7]} ")
    assert exp.info.run_name == "exp bigger-n" and exp.data.tags["lofa.dvc_exp"] == "bigger-n"
    assert exp.data.tags["lofa.dvc_exp_baseline"] == head and "bigger-n" in exp.data.tags["lofa.pipeline"]
    assert exp.data.tags["lofa.git_dirty"] == "true"  # -S wrote params.yaml before the stages ran
    # --temp: the stages run in DVC's clone, on a commit of its own; the baseline names ours
    assert temp.info.run_name == "exp in-temp" and temp.data.tags["lofa.dvc_exp_baseline"] == head


def test_a_stage_run_by_hand_has_no_parent(repo):
    repo, env = repo
    before = len(_runs(env))
    _run(repo, env, sys.executable, "stage.py", "first")
    runs = _runs(env)
    (new,) = runs[before:]
    assert "mlflow.parentRunId" not in new.data.tags and new.info.run_name == "first"
    assert new.data.tags["lofa.pipeline"].startswith("adhoc-") and "lofa.role" not in new.data.tags
