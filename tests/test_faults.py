"""Fault injection: ``kill -9`` the long stage commands at seeded random moments, rerun, lose nothing.

A small synthetic world is prepared once (in this process, through the same library
calls the stage commands make), with uninterrupted reference runs of ``fit_loras``,
``train_stage1`` and ``train_stage2``. Each fault test starts the real stage command
(``python -m pipelines.<stage>``) in its own process group and SIGKILLs it, either a
seeded number of units of its own measured pace after a seeded point of its progress
(tests/killing.py: never a fixed delay, which assumes a host's speed), or from inside its n-th
tensor write (n seeded; the file half on disk under its temporary name). It checks what
the killed run left on disk, reruns the command to completion and compares with the
reference. Then two ``dvc repro`` race in one repository.

What is checked (docs/FAULTS.md has the table):
- no partial file is ever visible under a final name: every final name loads; a
  ``.tmp-`` leftover is tolerated only because no final-name glob can match it;
- fit: every expected LoRA exists once, loads, matches the reference, and the
  rerun fits only the missing clips without touching the finished ones;
- training: the rerun resumes from the killed run's last checkpoint (its sidecar
  step; the MLflow loss history of the rerun starts after it) and ends with the
  reference's weights; the export's ``tensors_hash`` matches its tensors.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lofa.config import from_dict
from lofa.io import ArtifactError, load_tensors, read_json, read_metadata, sha256_file, tensors_hash
from lofa.lora import LORA_FORMAT, load_lora
from killing import Kill, kill_at_progress

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SMALL = {
    "synthetic": {"preset": "default", "seed": 1, "num_clips": 24, "frames": 9, "height": 32, "width": 32,
                  "num_heldout_combos": 1, "num_heldout_templates": 1},
    "preprocess": {"num_frames": 9, "fps": 8.0, "height": 32, "width": 32, "text_max_length": 32},
    "pretrain_base": {"dit": {"dim": 96, "ffn_dim": 192, "num_heads": 2, "num_layers": 2, "text_dim": 384},
                      "batch_size": 8, "train": {"max_steps": 20, "lr": 1e-3, "log_every": 10, "ckpt_every": 10}},
    "fit_loras": {"rank": 4, "alpha": 4.0, "steps": 30, "lr": 5e-3, "clips_per_batch": 4},
    "train_stage1": {"model": {"d_model": 64, "num_heads": 2, "num_blocks": 2, "patch_size": 32, "rank": 4,
                               "text_dim": 384, "stage": 1},
                     "loss": {"tau": 0.2}, "prompts_per_batch": 4, "matrices_per_lora": 6,
                     "train": {"max_steps": 60, "lr": 1e-3, "log_every": 10, "ckpt_every": 5}},
    "train_stage2": {"model": {"d_model": 64, "num_heads": 2, "num_blocks": 2, "patch_size": 32, "rank": 4,
                               "text_dim": 384, "stage": 2, "cross_stage1_after": [1]},
                     "prompts_per_batch": 2,
                     "train": {"max_steps": 40, "lr": 1e-3, "log_every": 5, "ckpt_every": 5}},
}
FINAL_SUFFIXES = (".safetensors", ".json", ".parquet", ".csv", ".png")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small world and uninterrupted references, built single-threaded like the subprocesses."""
    from lofa.data.dataset import load_clips
    from lofa.data.preprocess import PreprocessConfig, load_manifest, preprocess
    from lofa.data.synthetic import SynthConfig, generate
    from lofa.fit import ClipRecord, FitConfig, fit_shard
    from lofa.artifacts.hypernets import load_hypernet
    from lofa.hypertrain import Stage1Config, Stage2Config, train_stage1, train_stage2
    from lofa.pretrain import PretrainConfig, pretrain
    from pipelines._hyper import load_base, load_sets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "params.yaml").write_text(yaml.safe_dump(SMALL))
    d = {k: tmp / k for k in ("synth", "pre", "base", "loras", "stage1", "stage2")}
    generate(SynthConfig.from_params(SMALL["synthetic"]), d["synth"], progress=False)
    preprocess(from_dict(PreprocessConfig, SMALL["preprocess"]), d["synth"], d["pre"], progress=False)
    pretrain(from_dict(PretrainConfig, SMALL["pretrain_base"]), load_clips(d["pre"], ("train",)), d["base"])
    dit, vocab, base_hash = load_base(d["base"])
    records = [ClipRecord(r.id, str(d["pre"] / r.path), r.caption) for r in load_manifest(d["pre"]).itertuples()]
    fit_shard(dit, records, d["loras"], from_dict(FitConfig, SMALL["fit_loras"]), base_hash=base_hash,
              progress=False)
    train_set, _ = load_sets(d["loras"], d["pre"], vocab)
    train_stage1(from_dict(Stage1Config, SMALL["train_stage1"]), dit, vocab, train_set, d["stage1"],
                 base_hash=base_hash)
    train_stage2(from_dict(Stage2Config, SMALL["train_stage2"]), dit, vocab,
                 load_hypernet(d["stage1"] / "model.safetensors"), train_set, d["stage2"], base_hash=base_hash)
    torch.set_num_threads(threads)
    return {"tmp": tmp, "dirs": d, "vocab": vocab, "records": records}


# --------------------------------------------------------------------------- helpers

def stage_cmd(world: dict, stage: str, out: Path, **inputs: str) -> list[str]:
    d = world["dirs"]
    cmd = [sys.executable, "-m", f"pipelines.{stage}", "--params", str(world["tmp"] / "params.yaml"),
           "--no-progress", "--out", str(out), "--metrics", str(out.parent / f"{out.name}.metrics.json")]
    for flag, key in inputs.items():
        cmd += [f"--{flag}", str(d[key])]
    return cmd


def stage_env(run_id: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "LOFA_PIPELINE_ID": run_id}


#: Runs a stage command whose n-th tensor write (``lofa.io.save_file``, the bytes behind every
#: safetensors file) dies half-way: the file is cut to half its size under its temporary name,
#: then the process SIGKILLs itself. The worst moment for atomicity, hit exactly.
WRITE_KILLER = r"""
import os, runpy, signal, sys
import lofa.io
real, count, at = lofa.io.save_file, [0], int(os.environ["LOFA_TEST_KILL_AT_WRITE"])
def save_file(tensors, filename, metadata=None):
    count[0] += 1
    real(tensors, filename, metadata=metadata)
    if count[0] == at:
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
lofa.io.save_file = save_file
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def start_run(cmd: list[str], run_id: str, log: Path, at_write: int | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new process group (``at_write``: it SIGKILLs itself inside that tensor write)."""
    env = stage_env(run_id)
    if at_write is not None:
        env["LOFA_TEST_KILL_AT_WRITE"] = str(at_write)
        cmd = [cmd[0], "-c", WRITE_KILLER, *cmd[2:]]  # python -m pipelines.x ... -> python -c KILLER pipelines.x ...
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_run(cmd: list[str], run_id: str, log: Path, *, progress: Callable[[], int] | None = None,
             target: int = 0, extra_units: float = 0.0, at_write: int | None = None,
             timeout: float = 300.0) -> Kill:
    """Run ``cmd`` and SIGKILL it: ``extra_units`` of its measured pace after ``progress() >= target``
    (see tests/killing.py), or (``at_write``) from inside its ``at_write``-th tensor write. A run that
    ends on its own first is returned as such (``killed`` False) unless it was meant to die in a write."""
    proc = start_run(cmd, run_id, log, at_write)
    if at_write is not None:
        code = proc.wait(timeout=timeout)
        assert code == -signal.SIGKILL, f"the run ended (code {code}) before write {at_write}:\n{log.read_text()[-3000:]}"
        return Kill(True, code, at_write, 0.0, 0.0)
    assert progress is not None
    kill = kill_at_progress(proc, progress, target, extra_units, timeout=timeout)
    assert kill.killed or kill.code == 0, f"the run failed (code {kill.code}):\n{log.read_text()[-3000:]}"
    return kill


def run_to_completion(cmd: list[str], run_id: str) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=stage_env(run_id), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"rerun failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def temp_leftovers(root: Path) -> list[Path]:
    """``.tmp-`` files or directories a killed writer left; none may carry a final name's suffix."""
    left = sorted(root.rglob(".tmp-*"))
    assert not [p for p in left if p.name.endswith(FINAL_SUFFIXES)], left
    return left


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def lora_count(loras: Path) -> int:
    d = loras / "loras"
    return len(list(d.glob("*.safetensors"))) if d.is_dir() else 0


def ckpt_step(out: Path) -> int:
    try:
        return int(read_json(out / "ckpt" / "latest.json")["step"])
    except ArtifactError:  # not written yet
        return 0


def mlflow_run(run_id: str):
    import mlflow

    runs = mlflow.search_runs(experiment_names=["lofa"], filter_string=f"tags.`lofa.pipeline` = '{run_id}'",
                              output_format="list")
    runs = [r for r in runs if "lofa.stage" in r.data.tags]  # not the execution's parent run
    assert len(runs) == 1, (run_id, len(runs))
    return runs[0]


def loss_steps(run) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "loss"))


# --------------------------------------------------------------------------- fit_loras

#: A clip's LoRA does not depend on its batch mathematically (own seed, own init, independent
#: losses), but a resumed run refits the missing clips in other batches, and a batched product
#: may sum in another order for another batch size. benchmarks/batch_invariance.py measured,
#: single-threaded on this project's CPU machine type (30 Adam steps, 12 clips, batches of 1, 3
#: and shifted 4s against 4s): dW = B A relative Frobenius error <= 1.0e-4 and final-loss
#: relative error <= 1.6e-7 (single entries differ by up to 5e-4 of the entries' scale: Adam
#: moves entries whose gradient is near zero by ~lr whatever its rounding). The bounds below are
#: 10x (dW) and ~60x (loss) those figures; a real fault (another clip's seed, data or init) gives
#: errors of order 1.
DW_REL_TOL, LOSS_REL_TOL = 1e-3, 1e-5


def lora_dw_rel_error(lora, want) -> float:
    """Largest relative Frobenius error of dW = B A over the adapted matrices."""
    worst = 0.0
    for a, b, a0, b0 in zip(lora.A, lora.B, want.A, want.B):
        dw, dw0 = b.float() @ a.float(), b0.float() @ a0.float()
        worst = max(worst, float((dw - dw0).norm() / dw0.norm().clamp_min(1e-30)))
    return worst


@pytest.mark.parametrize(("seed", "mode"), [(0, "pace"), (1, "pace"), (2, "write")])
def test_kill_fit_loras_then_rerun(world: dict, seed: int, mode: str, tmp_path: Path,
                                   fault_seed_offset: int) -> None:
    rng = random.Random(seed + fault_seed_offset)
    n_clips, per_batch = len(world["records"]), SMALL["fit_loras"]["clips_per_batch"]
    # the kill lands up to one batch (in units of its own pace) after `target` LoRAs were written;
    # LoRAs appear a batch at a time, so a target past the first batch times the pace over a whole one
    target, extra = rng.randint(per_batch + 1, n_clips - 2 * per_batch), rng.uniform(0.0, per_batch)
    if mode == "write":  # any LoRA's write
        target = rng.randint(1, n_clips - 2 * per_batch)
    out = tmp_path / "loras"
    cmd = stage_cmd(world, "fit_loras", out, data="pre", base="base")
    killed_id, rerun_id = f"kill-fit-{seed}-{uuid.uuid4().hex[:6]}", f"rerun-fit-{seed}-{uuid.uuid4().hex[:6]}"
    if mode == "pace":
        kill = kill_run(cmd, killed_id, tmp_path / "killed.log", progress=lambda: lora_count(out), target=target,
                        extra_units=extra)
    else:  # each LoRA is one tensor write: die inside the write of LoRA number `target`
        kill = kill_run(cmd, killed_id, tmp_path / "killed.log", at_write=target)

    vocab, ref = world["vocab"], world["dirs"]["loras"]
    survivors = {p: p.stat().st_mtime_ns for p in (out / "loras").glob("*.safetensors")}
    if mode == "write":
        assert len(survivors) == target - 1
    elif kill.killed:
        assert target <= len(survivors) < n_clips
    else:  # the run ended before the kill (it sped up): everything is there and the rerun fits nothing
        assert len(survivors) == n_clips
    for p in survivors:  # every final name holds a complete, valid LoRA, and its curve came first
        load_lora(p, vocab)
        assert read_json(out / "curves" / f"{p.stem}.json")["clip_id"] == read_metadata(p)["clip_id"]
    left_by_kill = temp_leftovers(out)
    assert mode == "pace" or [p.parent.name for p in left_by_kill] == ["loras"]  # the half-written one

    run_to_completion(cmd, rerun_id)
    metrics = read_json(out.parent / "loras.metrics.json")
    this_run = read_json(out.parent / "timings" / "loras.metrics.json")  # the rerun's own counts
    assert this_run["fitted_now"] == n_clips - len(survivors) and metrics["clips"] == n_clips
    assert all(p.stat().st_mtime_ns == t for p, t in survivors.items())  # finished clips untouched
    names = sorted(p.name for p in (out / "loras").glob("*.safetensors"))
    assert names == sorted(p.name for p in (ref / "loras").glob("*.safetensors")) and len(names) == n_clips
    assert sorted(p.name for p in (out / "curves").glob("*.json")) == sorted(
        p.name for p in (ref / "curves").glob("*.json"))
    worst_dw = worst_loss = 0.0
    for name in names:
        lora, want = load_lora(out / "loras" / name, vocab), load_lora(ref / "loras" / name, vocab)
        assert lora.metadata["format"] == LORA_FORMAT and lora.metadata["clip_id"] == want.metadata["clip_id"]
        curve = read_json(out / "curves" / name.replace(".safetensors", ".json"))
        assert curve["final_loss"] == pytest.approx(float(lora.metadata["fit_final_loss"]), rel=1e-6)
        worst_dw = max(worst_dw, lora_dw_rel_error(lora, want))
        loss, loss0 = float(lora.metadata["fit_final_loss"]), float(want.metadata["fit_final_loss"])
        worst_loss = max(worst_loss, abs(loss - loss0) / abs(loss0))
    assert worst_dw <= DW_REL_TOL and worst_loss <= LOSS_REL_TOL, (worst_dw, worst_loss)
    left = temp_leftovers(out)
    when = (f"+{kill.waited_s:.2f} s ({extra:.2f} LoRAs at {kill.pace_s:.3f} s each)" if mode == "pace"
            else "inside its write")
    print(f"fit_loras seed {seed + fault_seed_offset} ({mode}): {'killed' if kill.killed else 'ended before the kill'}"
          f" at >= {target} LoRAs ({when}), {len(survivors)} survived, temp leftovers "
          f"{[p.name for p in left_by_kill]} (after rerun {len(left)}), dW rel err {worst_dw:.1e}, "
          f"loss rel err {worst_loss:.1e}")


# --------------------------------------------------------------------------- training

def _check_killed_training(out: Path, last: int) -> int:
    """What a killed training run leaves: a pointer to a complete checkpoint, and no export unless
    training had reached its last step (the kill may land in the held-out evaluation); its step."""
    pointer = read_json(out / "ckpt" / "latest.json")
    for name in pointer["history"]:
        ckpt = out / "ckpt" / name
        load_tensors(ckpt / "model.safetensors")
        load_tensors(ckpt / "optimizer.safetensors")
        assert read_json(ckpt / "checkpoint.json")["step"] == int(name.removeprefix("step_"))
    latest = out / "ckpt" / pointer["latest"]
    step = read_json(latest / "checkpoint.json")["step"]
    assert step == pointer["step"] > 0
    if step < last:
        assert not (out / "model.safetensors").exists() and not (out / "model.json").exists()
    elif (out / "model.json").exists():  # the export finished: its sidecar names its tensors
        assert read_json(out / "model.json")["tensors_hash"] == tensors_hash(load_tensors(out / "model.safetensors"))
    return step


def _kill_train(world: dict, stage: str, seed: int, mode: str, tmp_path: Path, **inputs: str) -> None:
    train = SMALL[stage]["train"]
    rng = random.Random(1000 + seed)
    every, last = train["ckpt_every"], train["max_steps"]
    target = rng.randrange(every, last - 4 * every + 1, every)
    # up to two checkpoint intervals (in units of its own pace) after checkpoint `target`: the kill
    # may land inside a checkpoint write
    extra = rng.uniform(0.0, 2.0 * every)
    out = tmp_path / stage
    cmd = stage_cmd(world, stage, out, **inputs)
    killed_id, rerun_id = f"kill-{stage}-{seed}-{uuid.uuid4().hex[:6]}", f"rerun-{stage}-{seed}-{uuid.uuid4().hex[:6]}"
    if mode == "pace":
        kill = kill_run(cmd, killed_id, tmp_path / "killed.log", progress=lambda: ckpt_step(out), target=target,
                        extra_units=extra)
    else:  # a checkpoint is two tensor writes (model, optimizer): die inside the model write after `target`
        kill = kill_run(cmd, killed_id, tmp_path / "killed.log", at_write=2 * (target // every) + 1)
    resumed_from = _check_killed_training(out, last)
    left_by_kill = temp_leftovers(out)
    if mode == "write":
        top = [p.name for p in left_by_kill if p.parent.name == "ckpt"]
        assert resumed_from == target and top == [f".tmp-step_{target + every:07d}"], left_by_kill
    if not kill.killed:  # the run ended before the kill (it sped up): the rerun trains no step
        assert resumed_from == last

    run_to_completion(cmd, rerun_id)
    killed, rerun = mlflow_run(killed_id), mlflow_run(rerun_id)
    # SIGKILL cannot end a run
    assert killed.info.status == ("RUNNING" if kill.killed else "FINISHED") and rerun.info.status == "FINISHED"
    assert all(s <= resumed_from for s in loss_steps(killed))
    expected = [s for s in range(resumed_from + 1, last + 1) if s % train["log_every"] == 0 or s == last]
    assert loss_steps(rerun) == expected  # the rerun started after the sidecar's step
    store = "/" + os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///").lstrip("/")
    with sqlite3.connect(store) as db:  # the killed writer left the sqlite store consistent
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    weights, side = load_tensors(out / "model.safetensors"), read_json(out / "model.json")
    assert side["step"] == last and side["tensors_hash"] == tensors_hash(weights)
    ref = world["dirs"][stage.replace("train_", "")]
    # Resume is exact, not approximately right: the same batches (a function of the step), the same
    # kernels on the same shapes and thread count, optimizer state and RNG restored from the checkpoint.
    # The bound leaves room only for that; a lost or repeated step moves weights by ~lr = 1e-3.
    diff = max_diff(weights, load_tensors(ref / "model.safetensors"))
    assert diff <= 1e-5, diff
    assert read_json(out / "ckpt" / "latest.json")["step"] == last
    assert not list((out / "ckpt").glob(".tmp-*"))  # the resume dropped half-written checkpoints
    temp_leftovers(out)
    when = (f"+{kill.waited_s:.2f} s ({extra:.1f} steps at {kill.pace_s:.3f} s each)" if mode == "pace"
            else "in the next write")
    print(f"{stage} seed {seed} ({mode}): {'killed' if kill.killed else 'ended before the kill'} at ckpt >= "
          f"{target} ({when}), resumed from {resumed_from}, temp leftovers {[p.name for p in left_by_kill]}, "
          f"max |diff| {diff:.1e}")


@pytest.mark.parametrize(("seed", "mode"), [(0, "pace"), (1, "write")])
def test_kill_train_stage1_then_rerun(world: dict, seed: int, mode: str, tmp_path: Path,
                                      fault_seed_offset: int) -> None:
    _kill_train(world, "train_stage1", seed + fault_seed_offset, mode, tmp_path, data="pre", base="base",
                loras="loras")


@pytest.mark.parametrize(("seed", "mode"), [(0, "pace"), (1, "pace")])
def test_kill_train_stage2_then_rerun(world: dict, seed: int, mode: str, tmp_path: Path,
                                      fault_seed_offset: int) -> None:
    _kill_train(world, "train_stage2", seed + fault_seed_offset, mode, tmp_path, data="pre", base="base",
                loras="loras", stage1="stage1")


# --------------------------------------------------------------------------- two dvc repro at once

DVC_CLIPS = 24
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")


def _dvc_repo(root: Path) -> None:
    """A git + DVC repository holding the code and the synthesize and preprocess stages of dvc.yaml."""
    for name in ("lofa", "pipelines"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("synthesize", "preprocess")}},
                                                  sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"synthetic": {**SMALL["synthetic"], "num_clips": DVC_CLIPS},
                                                      "preprocess": SMALL["preprocess"]}))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([_dvc(), "init", "-q"], cwd=root, check=True)


def _dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def _files_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_dvc_repro_at_once(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _dvc_repo(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LOFA_MLFLOW_ARTIFACTS")}
    env.update(PREFECT_HOME=str(repo / ".prefect"), OMP_NUM_THREADS="1")
    prefect = Path(sys.executable).parent / "prefect"
    subprocess.run([str(prefect), "config", "set", "PREFECT_LOGGING_LEVEL=WARNING"], cwd=repo, env=env,
                   check=True, capture_output=True)
    prefect_before = _files_hash(repo / ".prefect")
    assert "profiles.toml" in prefect_before

    logs = {n: tmp_path / f"{n}.log" for n in ("first", "second", "waiting")}
    cmds = {"first": [_dvc(), "repro"], "second": [_dvc(), "repro"], "waiting": [_dvc(), "--wait-for-lock", "repro"]}
    procs = {"first": subprocess.Popen(cmds["first"], cwd=repo, env=env, stdout=open(logs["first"], "wb"),
                                       stderr=subprocess.STDOUT)}
    deadline = time.monotonic() + 120
    while "Running stage" not in logs["first"].read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in ("second", "waiting"):  # both start while the first one runs a stage
        procs[name] = subprocess.Popen(cmds[name], cwd=repo, env=env, stdout=open(logs[name], "wb"),
                                       stderr=subprocess.STDOUT)
    codes = {n: p.wait(timeout=600) for n, p in procs.items()}
    out = {n: logs[n].read_text() for n in logs}
    assert codes["first"] == 0 and out["first"].count("Running stage") == 2, out["first"]
    for name in ("second", "waiting"):  # each refuses on a DVC lock, or finds nothing to do
        assert "Running stage" not in out[name], out[name]
        if codes[name] == 0:
            assert out[name].count("didn't change, skipping") == 2, out[name]
        else:
            assert any(m in out[name] for m in LOCK_MESSAGES), out[name]
    print({n: (codes[n], out[n].strip().splitlines()[0][:100]) for n in ("second", "waiting")})

    status = subprocess.run([_dvc(), "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    pre = repo / "data" / "preprocessed"
    manifest = pd.read_parquet(pre / "manifest.parquet")
    assert len(manifest) == DVC_CLIPS
    assert all(sha256_file(pre / r.path) == r.sha256 for r in manifest.itertuples())
    assert not list((repo / "data").rglob(".tmp-*"))

    with sqlite3.connect(repo / "mlflow.db") as db:  # the store reads, and holds each stage once
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        names = sorted(r[0] for r in db.execute("SELECT value FROM tags WHERE key = 'lofa.stage'"))  # per-stage runs
    assert names == ["preprocess", "synthesize"], names
    assert _files_hash(repo / ".prefect") == prefect_before
    profiles = tomllib.loads((repo / ".prefect" / "profiles.toml").read_text())
    assert "WARNING" in str(profiles)


# --------------------------------------------------------------------------- compiled training

def test_compiled_stage1_training_matches_eager(world: dict, tmp_path: Path):
    """``train_stage1.compile``: the regions compiled with dynamic shapes give the eager loss and
    gradients on batches whose text lengths differ, and the stage trains with them."""
    from torch._dynamo.utils import counters

    from lofa.hypertrain import Stage1Config, build_hypernet, stage1_batches, train_stage1
    from lofa.lora import base_weights
    from lofa.objectives import stage1_loss
    from pipelines._hyper import load_base, load_sets

    d = world["dirs"]
    dit, vocab, base_hash = load_base(d["base"])
    train_set, _ = load_sets(d["loras"], d["pre"], vocab)
    params = {**SMALL["train_stage1"], "train": {**SMALL["train_stage1"]["train"], "max_steps": 4}}
    cfg = from_dict(Stage1Config, {**params, "compile": True})
    batches = stage1_batches(train_set, [w.detach().float() for w in base_weights(dit, vocab)], vocab, cfg)
    draws = [batches(i, 0, 1) for i in range(4)]
    lengths = {int(b.text_mask.any(0).nonzero().max()) + 1 for b in draws}
    assert len(lengths) > 1, lengths  # the batches' trimmed text lengths differ
    torch._dynamo.reset()
    counters.clear()
    eager = build_hypernet(cfg.model, vocab, cfg.seed)
    compiled = build_hypernet(cfg.model, vocab, cfg.seed, compile=True)
    for batch in draws:
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss, _ = stage1_loss(model, batch, cfg.loss)
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (le, ge), (lc, gc) = results
        assert torch.allclose(le, lc, rtol=1e-5), (le, lc)
        assert set(ge) == set(gc)
        for n in ge:
            assert (gc[n] - ge[n]).norm() <= 1e-3 * ge[n].norm() + 1e-12, n
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks and the edges ran compiled
    model, result = train_stage1(cfg, dit, vocab, train_set, tmp_path / "compiled", base_hash=base_hash)
    assert result.step == 4 and all(torch.isfinite(p).all() for p in model.parameters())
