"""The registered hypernetwork as a user serves it: ``mlflow models serve -m
models:/lofa-hypernet@champion --env-manager local`` answers a real HTTP request with a prompt by
returning the LoRA as a file path or as safetensors bytes, equal to ``Predictor.predict``; and the
model's requirements cover every package its code imports (what a fresh environment installs)."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import packages_distributions
from pathlib import Path

import mlflow
import pytest
import torch
from packaging.requirements import Requirement

from lofa.lora import load_lora
from lofa.serving.predict import Predictor
from lofa.serving.registry import CHAMPION, RegisterConfig, promote, register_hypernet
from lofa.tracking import stage_run
from servers import free_port, wait_http
from tiny_artifacts import write_artifacts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red figure waves quickly"
MODEL = f"models:/lofa-hypernet@{CHAMPION}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store of its own holding ``lofa-hypernet`` with the ``champion`` alias; the artifacts."""
    tmp = tmp_path_factory.mktemp("serve")
    art = write_artifacts(tmp / "art")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "LOFA_MLFLOW_ARTIFACTS": (tmp / "mlruns").as_uri()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        with stage_run("evaluate", {}) as ml:
            version = register_hypernet(ml, art["stage2"], art["stage1"], art["params"], art["base"])
            assert promote(ml.MlflowClient(), version, {"predicted": {"gap_closed_lo": 0.1}}, RegisterConfig())
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
    return tmp, art, env


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _assert_same_lora(path: Path, want, vocab) -> None:
    got = load_lora(path, vocab)
    assert got.metadata["prompt"] == want.prompt
    # the file holds float32 and both sides predict one prompt alone on the CPU: the same arithmetic,
    # up to the thread count's summation order (1e-6 is 1e-4 of the factors' scale, ~1e-2)
    for a, b in zip(want.A + want.B, got.A + got.B):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_served_champion_answers_with_the_lora(store, tmp_path):
    tmp, art, env = store
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", MODEL,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                              start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", server, timeout=300)
        as_path = _post(f"{url}/invocations", {"dataframe_records": [{"prompt": PROMPT}],
                                               "params": {"out_dir": str(tmp_path / "loras")}})
        as_bytes = _post(f"{url}/invocations", {"dataframe_records": [{"prompt": PROMPT}],
                                                "params": {"output": "bytes"}})
        bad = _post(f"{url}/invocations", {"dataframe_records": [{"prompt": PROMPT}], "params": {"output": "json"}})
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, started above
            server.wait(timeout=60)
        log.close()
    log_text = (tmp_path / "serve.log").read_text()[-3000:]
    assert as_path[0] == 200, (as_path, log_text)
    assert as_bytes[0] == 200, (as_bytes[0], log_text)
    direct = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])
    want = direct.predict(PROMPT)
    (row,) = as_path[1]["predictions"]
    assert row["prompt"] == PROMPT and Path(row["lora_path"]).parent == tmp_path / "loras"
    _assert_same_lora(Path(row["lora_path"]), want, direct.vocab)
    (row,) = as_bytes[1]["predictions"]
    raw = base64.b64decode(row["lora_safetensors"])
    (tmp_path / "reply.safetensors").write_bytes(raw)
    _assert_same_lora(tmp_path / "reply.safetensors", want, direct.vocab)
    assert len(raw) < 4 * 2 * sum(a.numel() for a in want.A) + 100_000  # float32 bytes and a header, not JSON floats
    assert bad[0] >= 400 and "use one of ['path', 'bytes']" in json.dumps(bad[1]), bad


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


LOADED = """
import json, sys
import mlflow
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(pd.DataFrame({"prompt": ["a small red figure waves"]}), params={"out_dir": sys.argv[2]})
print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "lofa")))
"""


def _module_imports(path: Path) -> set[str]:
    """Top-level names a module imports when it loads (module-level statements; not those inside
    functions, which run only on paths that need them)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lofa", "__future__"}


def test_requirements_cover_what_the_model_code_imports(store, tmp_path):
    """Each package a module of lofa loaded by the served model imports at module level is one of its
    requirements (pip installs their own dependencies from their metadata); lofa travels as the model's
    code. Imports inside functions (the text encoders' ``transformers``) are listed by hand."""
    _, _, env = store
    root = Path(subprocess.run([sys.executable, "-c", "import mlflow, sys; print(mlflow.artifacts.download_artifacts("
                                f"'{MODEL}', dst_path=sys.argv[1]))", str(tmp_path / "model")],
                               env={**os.environ, **env}, capture_output=True, text=True, check=True,
                               timeout=300).stdout.strip().splitlines()[-1])
    reqs = (root / "requirements.txt").read_text().split()
    proc = subprocess.run([sys.executable, "-c", LOADED, str(root), str(tmp_path / "loras")], cwd=tmp_path,
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [Path(f) for f in json.loads(proc.stdout.strip().splitlines()[-1])]
    assert files and all(root / "code" in f.parents for f in files), files  # the shipped copy ran, not the checkout
    dists = packages_distributions()
    needed = {_norm(d): f.name for f in files for top in _module_imports(f) for d in dists.get(top, [top])}
    missing = {d: f for d, f in needed.items() if d not in {_norm(Requirement(r).name) for r in reqs}}
    assert not missing, f"imported by lofa (module-level) but not a requirement: {missing}; {reqs}"
