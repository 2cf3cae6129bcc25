"""DVC as its users meet it, on the repo's own first two stages in a scratch git + DVC repo:
`dvc repro` runs them, a second one does nothing, `dvc exp run -S` reruns only the stage
whose param changed, and `dvc exp show` / `dvc metrics show` report params and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_faults import DVC_CLIPS as CLIPS
from test_faults import _dvc_repo

pytestmark = pytest.mark.slow


def _dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _git(repo: Path, env: dict[str, str], *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    _dvc_repo(repo)  # code, the synthesize + preprocess stages, small params, git init, dvc init
    (repo / ".gitignore").write_text(".venv\nmlflow.db\nmlruns/\n.prefect/\n__pycache__/\n")
    (repo / "metrics").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LOFA_MLFLOW_ARTIFACTS")}
    env.update(PREFECT_HOME=str(repo / ".prefect"), OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    _dvc(repo, env, "config", "core.analytics", "false")
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "two stages")
    return repo, env


def test_repro_then_noop(repo) -> None:
    root, env = repo
    out = _dvc(root, env, "repro")
    assert out.count("Running stage") == 2, out
    again = _dvc(root, env, "repro")
    assert "Running stage" not in again and again.count("didn't change, skipping") == 2, again
    _git(root, env, "add", "-A")
    _git(root, env, "commit", "-q", "-m", "repro")
    metrics = json.loads(_dvc(root, env, "metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]
    assert files["metrics/preprocess.json"]["data"]["clips"] == CLIPS


def test_exp_run_set_param_reruns_only_that_stage_and_exp_show_reports_it(repo) -> None:
    root, env = repo
    out = _dvc(root, env, "exp", "run", "-n", "short-text", "-S", "preprocess.text_max_length=12")
    assert "Running stage 'preprocess'" in out and "Running stage 'synthesize'" not in out, out
    shown = json.loads(_dvc(root, env, "exp", "show", "--json"))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    short = [e for e in exps if e.get("name") == "short-text"]
    assert short, json.dumps(shown)[:2000]
    data = short[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["preprocess"]["text_max_length"] == 12
    assert data["metrics"]["metrics/preprocess.json"]["data"]["clips"] == CLIPS
    table = _dvc(root, env, "exp", "show", "--no-pager", "--md")
    assert "short-text" in table and "preprocess.text_max_length" in table
    # a workspace experiment leaves its params and outputs in the workspace, consistent with dvc.lock
    assert yaml.safe_load((root / "params.yaml").read_text())["preprocess"]["text_max_length"] == 12
    assert "Data and pipelines are up to date" in _dvc(root, env, "status")
