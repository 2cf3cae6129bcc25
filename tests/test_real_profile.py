"""The real profile's code path end to end on a CPU: scripts/real_profile.py --tiny runs every stage
command of dvc.yaml with params-real.yaml (umT5 and the DiT shrunk to tiny sizes of the same
architectures, the full-size Wan VAE, H.264 mp4 clips in the MotionX layout), then predict and
generate. The same script at full size is what docs/real_profile.md measured on an H100."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_profile.py"


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOFA_REGISTER_MODEL": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "LOFA_MLFLOW_ARTIFACTS": (cwd / "mlruns").as_uri()}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_tiny_real_profile_end_to_end(tmp_path: Path) -> None:
    root, work = tmp_path / "motionx", tmp_path / "work"
    _script("clips", "--root", str(root), "--size", "33x96x128", cwd=tmp_path)
    assert len(list((root / "video").rglob("*.mp4"))) == 6
    _script("run", "--tiny", "--root", str(root), "--work", str(work), "--out", str(tmp_path / "out"), cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "real_profile.json").read_text())
    assert [r["stage"] for r in report["rows"]] == ["preprocess", "pretrain_base", "fit_loras", "train_stage1",
                                                    "train_stage2", "train_stage2_naive", "evaluate", "predict",
                                                    "generate"]
    assert all(r["returncode"] == 0 for r in report["rows"])
    # the base is the imported Wan-architecture DiT, linked (not trained)
    base = json.loads((work / "data" / "base" / "dit.json").read_text())
    assert base["source"].endswith("diffusion_pytorch_model.safetensors") and base["step"] == 0
    pre = json.loads((work / "metrics" / "preprocess.json").read_text())
    assert pre["clips"] == 6 and pre["per_split"] == {"train": 4, "val": 2}
    ev = json.loads((work / "metrics" / "evaluate.json").read_text())
    assert {"base", "oracle", "predicted", "mean"} <= set(ev["methods"]) and ev["clips"] == 2
    with safe_open(work / "predicted.safetensors", "pt") as f:
        meta = f.metadata()
        assert meta["prompt"] == "a person waves both hands above the head" and "modelspec.date" in meta
        assert len(list(f.keys())) == 2 * 2 * 2 * 4  # A and B x 2 blocks x self/cross x q, k, v, o
    assert (work / "generated.gif").stat().st_size > 0
    est = report["estimates"]["by_size"]["17x64x64"]
    assert est["fit_clip_steps_per_s"] > 0 and est["gpu_hours_10000_clips"] > est["gpu_hours_1000_clips"] > 0


def test_skip_leaves_out_only_what_predict_and_generate_do_not_read(tmp_path: Path) -> None:
    """--skip evaluate,train_stage2_naive keeps every stage predict and generate need, in order;
    a stage they need cannot be skipped, on the command line or in the function."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_profile", SCRIPT)
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    params = tmp_path / "params.yaml"
    names = [n for n, _ in rp.stage_commands(tmp_path, params, frozenset({"evaluate", "train_stage2_naive"}))]
    assert names == ["preprocess", "pretrain_base", "fit_loras", "train_stage1", "train_stage2"]
    commands = dict(rp.stage_commands(tmp_path, params))
    assert list(commands) == list(rp.STAGES)
    assert commands["preprocess"][-2:] == ["--params", str(params)] and str(tmp_path) in commands["preprocess"]
    with pytest.raises(ValueError, match="not fit_loras"):
        rp.stage_commands(tmp_path, params, frozenset({"fit_loras"}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--root", "r", "--work", "w", "--skip", "fit_loras"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "only train_stage2_naive, evaluate can be left out, not fit_loras" in proc.stderr
