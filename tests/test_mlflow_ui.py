"""MLflow's UI as a person meets it: a real ``mlflow server`` on a store holding two stage runs
logged by ``lofa.tracking``, opened in headless Chromium (screenshots + the rendered DOM).

The UI is a React app: pages are read with ``--dump-dom`` after a virtual time budget,
so the assertions see what the browser rendered, not the HTML the server sent. The
screenshots are copied to ``out/mlflow_ui/`` (or ``$LOFA_UI_SHOTS``), printed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                 "(Debian: apt-get update && apt-get install -y chromium)")]

LOG_RUNS = """
import json
from lofa.tracking import stage_run
out = {}
for stage, value in (("fit_loras", 0.4321), ("train_stage1", 0.8765)):
    with stage_run(stage, {"rank": 4, "train": {"lr": 0.001}}, tags={"lofa.base_model_hash": "abc123"}) as mlflow:
        mlflow.log_metric("loss_reduction_median", value)
        run = mlflow.active_run().info
        out[stage], out["experiment"] = run.run_id, run.experiment_id
print(json.dumps(out))
"""


def chromium(tmp: Path, url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` with a fresh profile; its stdout."""
    profile = tmp / f"profile-{time.monotonic_ns()}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=15000", *args, url]
    proc = subprocess.run(cmd, env={**os.environ, "HOME": str(tmp)}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed on {url}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM (scripts and styles dropped, whitespace collapsed)."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_mlflow_ui_shows_stage_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "LOFA_MLFLOW_ARTIFACTS": (tmp_path / "mlruns").as_uri(), "LOFA_PIPELINE_ID": "ui-check-42"}
    logged = subprocess.run([sys.executable, "-c", LOG_RUNS], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    ids = json.loads(logged.stdout.strip().splitlines()[-1])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               env["MLFLOW_TRACKING_URI"], "--default-artifact-root", env["LOFA_MLFLOW_ARTIFACTS"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, start_new_session=True, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_http(f"{base}/health", server, timeout=180)
        pages = {"experiment": f"{base}/#/experiments/{ids['experiment']}/runs",
                 "run": f"{base}/#/experiments/{ids['experiment']}/runs/{ids['fit_loras']}"}
        texts = {name: page_text(chromium(tmp_path, url, "--dump-dom")) for name, url in pages.items()}
        for name, url in pages.items():
            chromium(tmp_path, url, f"--screenshot={tmp_path / f'{name}.png'}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker, started above
            server.wait(timeout=30)
        log.close()

    exp, run = texts["experiment"], texts["run"]
    assert "lofa" in exp and "fit_loras" in exp and "train_stage1" in exp and "2 matching runs" in exp, exp[:2000]
    assert "loss_reduction_median 0.4321" in run, run[:3000]  # the metrics table of the fit_loras run
    assert "lofa.pipeline : ui-check-42" in run and "lofa.stage : fit_loras" in run and "train.lr" in run
    assert "0.8765" not in run
    shots = Path(os.environ.get("LOFA_UI_SHOTS", ROOT / "out" / "mlflow_ui"))
    shots.mkdir(parents=True, exist_ok=True)
    for name in pages:
        png = tmp_path / f"{name}.png"
        assert png_size(png) == (1400, 900) and png.stat().st_size > 20_000, png
        shutil.copy(png, shots / f"{name}.png")
    with capsys.disabled():
        print(f"\nMLflow UI screenshots: {shots / 'experiment.png'} {shots / 'run.png'}")
