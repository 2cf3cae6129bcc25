"""DVC as its users meet it, on the repo's own first two stages in a scratch git + DVC repo:
`dvc repro` runs them, a second one does nothing, `dvc exp run -S` reruns only the stage
whose param changed, and `dvc exp show` / `dvc metrics show` report params and metrics.
Queued (`dvc exp run --queue` + `dvc queue start`) and `--temp` experiments run in temporary
workspaces without `.venv`: the stage commands' bare `python` is found on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
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


def _queue_workers(repo: Path) -> list[psutil.Process]:
    """This repository's DVC queue worker processes (``dvc exp queue-worker`` started in it)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = p.info["cmdline"] or []
        if "queue-worker" in cmd and p.info["cwd"] and Path(p.info["cwd"]) == repo:
            found.append(p)
    return found


def _exp_data(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    shown = json.loads(_dvc(repo, env, "exp", "show", "--json"))
    return {e["name"]: e["revs"][0]["data"] for rev in shown for e in rev.get("experiments") or []}


def test_queued_and_temp_experiments_run_without_venv(repo) -> None:
    root, env = repo
    _git(root, env, "add", "-A")  # experiments start from the last commit
    _git(root, env, "commit", "-q", "-m", "text_max_length 12")
    lengths = {"queued-16": 16, "queued-20": 20}
    for name, n in lengths.items():
        _dvc(root, env, "exp", "run", "--queue", "-n", name, "-S", f"preprocess.text_max_length={n}")
    _dvc(root, env, "queue", "start")
    try:
        for _ in range(300):  # bounded; each poll costs a DVC start-up (~1 s) plus the sleep
            rows = [ln.split() for ln in _dvc(root, env, "queue", "status").splitlines()]
            states = {r[1]: r[-1] for r in rows if len(r) > 2 and r[1] in lengths}
            if len(states) == 2 and not {"Queued", "Running"} & set(states.values()):
                break
            time.sleep(2)
    finally:
        _dvc(root, env, "queue", "stop")
        for _ in range(100):  # the workers finish their (empty) queue and exit
            if not _queue_workers(root):
                break
            time.sleep(0.5)
    assert not _queue_workers(root), "a DVC queue worker outlived `dvc queue stop`"
    assert states == {"queued-16": "Success", "queued-20": "Success"}, states

    out = _dvc(root, env, "exp", "run", "--temp", "-n", "temp-24", "-S", "preprocess.text_max_length=24")
    assert "Running stage 'preprocess'" in out and "Running stage 'synthesize'" not in out, out
    exps = _exp_data(root, env)
    for name, n in {**lengths, "temp-24": 24}.items():
        data = exps[name]
        assert data["params"]["params.yaml"]["data"]["preprocess"]["text_max_length"] == n
        assert data["metrics"]["metrics/preprocess.json"]["data"]["clips"] == CLIPS
    # the workspace is untouched by experiments run elsewhere
    assert yaml.safe_load((root / "params.yaml").read_text())["preprocess"]["text_max_length"] == 12
