"""MLflow's UI as a person meets it: a real ``mlflow server`` on a store holding one pipeline
execution logged by ``lofa.tracking`` (a parent run, two stage runs nested under it, the manifest as
their dataset), opened in headless Chromium (screenshots + the rendered DOM).

The UI is a React app: pages are read with ``--dump-dom`` after a virtual time budget,
so the assertions see what the browser rendered, not the HTML the server sent. The nested view
needs a click (the parent row's expander), driven through Chromium's DevTools protocol. The
screenshots (``mlflow_experiment.png``, ``mlflow_run.png``, ``mlflow_nested.png``) are copied to
``out/mlflow_ui/`` or ``$LOFA_UI_SHOTS`` (``LOFA_UI_SHOTS=docs/screenshots`` renews the documented
ones), printed at the end.
"""

from __future__ import annotations

import base64
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

import pandas as pd
import pytest

from servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                 "(Debian: apt-get update && apt-get install -y chromium)")]

LOG_RUNS = """
import json, sys
from lofa.tracking import log_manifest, stage_run
out = {}
for stage, value in (("fit_loras", 0.4321), ("train_stage1", 0.8765)):
    with stage_run(stage, {"rank": 4, "train": {"lr": 0.001}}, tags={"lofa.base_model_hash": "abc123"}) as mlflow:
        log_manifest(mlflow, sys.argv[1], "training")
        mlflow.log_metric("loss_reduction_median", value)
        run = mlflow.active_run()
        out[stage], out["experiment"] = run.info.run_id, run.info.experiment_id
        out["parent"] = run.data.tags["mlflow.parentRunId"]
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


def mlflow_client(env: dict[str, str]):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def keep_screenshots(tmp: Path, names, prefix: str, capsys: pytest.CaptureFixture) -> None:
    """Check each ``<tmp>/<name>.png`` is a full 1400x900 page and copy it to ``$LOFA_UI_SHOTS``
    (default out/<prefix>_ui) as ``<prefix>_<name>.png``."""
    shots = Path(os.environ.get("LOFA_UI_SHOTS", ROOT / "out" / f"{prefix}_ui"))
    shots.mkdir(parents=True, exist_ok=True)
    for name in names:
        png = tmp / f"{name}.png"
        assert png_size(png) == (1400, 900) and png.stat().st_size > 20_000, png
        shutil.copy(png, shots / f"{prefix}_{name}.png")
    with capsys.disabled():
        print(f"\n{prefix} UI screenshots: {sorted(str(p) for p in shots.glob(f'{prefix}_*.png'))}")


class DevTools:
    """One headless Chromium page driven through the DevTools protocol (navigate, run JS, screenshot)."""

    def __init__(self, tmp: Path) -> None:
        from websockets.sync.client import connect

        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--remote-debugging-port={port}",
             f"--user-data-dir={tmp / 'profile-devtools'}", "--window-size=1400,900", "about:blank"],
            env={**os.environ, "HOME": str(tmp)}, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{port}/json/version", self.proc, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws, self.next_id = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30), 0

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the reply carries our id
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_text(self, text: str, timeout: float = 90) -> str:
        """The page's visible text once it shows ``text`` (polled: the app renders after its API calls)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            body = self.js("document.body ? document.body.innerText : ''") or ""
            if text in body:
                return body
            time.sleep(0.5)
        raise AssertionError(f"the page never showed {text!r}; it shows: {body[:2000]}")

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)  # Chromium and its helpers, started above
        self.proc.wait(timeout=30)


def nested_view(tmp: Path, url: str, parent: str, child: str, shot: Path) -> str:
    """Open the runs table, expand ``parent``'s row, and return the text once ``child`` shows under it."""
    browser = DevTools(tmp)
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=url)
        collapsed = browser.wait_text(parent)
        assert child not in collapsed, "stage runs should be folded under their parent until expanded"
        clicked = browser.js("""(() => { const b = document.querySelector(
            'button[data-component-id*="runnamecellrenderer"]'); if (b) b.click(); return !!b; })()""")
        assert clicked, "no expander on the parent run's row"
        text = browser.wait_text(child)
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
        return text
    finally:
        browser.close()


def test_mlflow_ui_shows_stage_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "LOFA_MLFLOW_ARTIFACTS": (tmp_path / "mlruns").as_uri(), "LOFA_PIPELINE_ID": "ui-check-42"}
    data = tmp_path / "preprocessed"
    data.mkdir()
    pd.DataFrame({"id": ["synth/wave/000001", "synth/bow/000002"], "split": ["train", "test"],
                  "caption": ["a small red figure waves", "a large figure bows"]}).to_parquet(data / "manifest.parquet")
    logged = subprocess.run([sys.executable, "-c", LOG_RUNS, str(data)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
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
        parent_name = mlflow_client(env).get_run(ids["parent"]).info.run_name
        nested = nested_view(tmp_path, pages["experiment"], parent_name, f"fit_loras ({parent_name})",
                             tmp_path / "nested.png")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker, started above
            server.wait(timeout=30)
        log.close()

    exp, run = texts["experiment"], texts["run"]
    # the experiment page: the parent row (its stage runs folded under it), the manifest as its dataset
    assert "lofa" in exp and parent_name in exp and "3 matching runs" in exp, exp[:2000]
    assert "preprocessed-manifest" in exp
    # expanded: both stage runs under the parent, named after it
    assert f"fit_loras ({parent_name})" in nested and f"train_stage1 ({parent_name})" in nested, nested[:2000]
    assert nested.index(parent_name) < nested.index(f"fit_loras ({parent_name})")
    assert "loss_reduction_median 0.4321" in run, run[:3000]  # the metrics table of the fit_loras run
    assert "lofa.pipeline : ui-check-42" in run and "lofa.stage : fit_loras" in run and "train.lr" in run
    assert "lofa.git_commit" in run and "lofa.git_dirty" in run and "preprocessed-manifest" in run
    assert "0.8765" not in run
    keep_screenshots(tmp_path, ["nested", *pages], "mlflow", capsys)
