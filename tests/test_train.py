"""The one training loop: schedule, sampler, checkpoints, exact resume, NaN guard, bf16, DDP."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lofa.config import ConfigError, from_dict
from lofa.io import ArtifactError, load_tensors, read_json
from lofa.train import NonFiniteError, TrainConfig, batch_indices, load_checkpoint_weights, lr_at, train
from killing import kill_at_progress
from train_worker import Tiny, batches, config, make_loss_step, make_model

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("train_worker.py")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].cpu().float() - b[k].cpu().float()).abs().max()) for k in a)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster, and the only sane choice on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted 8-step run (dropout 0.2, grad_accum 2, checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("ref")
    train(make_model(0.2), make_loss_step(), batches, config(), out)
    return out


def test_config_rejects_unknown_and_invalid() -> None:
    with pytest.raises(ConfigError, match="valid keys are"):
        from_dict(TrainConfig, {"max_steps": 5, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="bf16"):
        from_dict(TrainConfig, {"max_steps": 5, "mixed_precision": "fp16"})
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(max_steps=5, grad_accum=0)
    assert from_dict(TrainConfig, {"max_steps": 5, "betas": [0.8, 0.9]}).betas == (0.8, 0.9)


def test_lr_schedule() -> None:
    cfg = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in (1, 2)] == [0.5, 1.0]
    assert lr_at(6, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(10, cfg) == pytest.approx(0.1)
    const = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const) for s in (1, 3, 10)] == [0.5, 1.0, 1.0]


def test_batch_indices_cover_epochs_and_split_ranks() -> None:
    epoch = [i for d in range(8) for i in batch_indices(d, num_items=64, global_batch=8, rank=0, world=1)]
    assert sorted(epoch) == list(range(64))
    split = [batch_indices(11, num_items=64, global_batch=8, rank=r, world=2) for r in (0, 1)]
    whole = batch_indices(11, num_items=64, global_batch=8, rank=0, world=1)
    assert sorted(split[0] + split[1]) == sorted(whole) and split[0] == whole[0::2]
    with pytest.raises(ValueError, match="not divisible"):
        batch_indices(0, num_items=64, global_batch=8, rank=0, world=3)


def test_train_logs_exports_prunes_and_loads(tmp_path: Path, reference: Path) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    calls: list[int] = []

    def diagnostics(model: torch.nn.Module, batch: dict) -> dict[str, float]:
        calls.append(1)  # a backward of its own: must not change training
        model(batch["x"]).square().mean().backward()
        return {"out_rms": 1.0}

    model = make_model(0.2)
    res = train(model, make_loss_step(), batches, config(max_steps=8, log_every=4), tmp_path,
                logger=lambda s, m: logged.append((s, m)), diagnostics=diagnostics)
    assert [s for s, _ in logged] == [4, 8] and len(calls) == 2
    assert {"loss", "grad_norm", "lr", "param_norm", "steps_per_s", "mse", "out_rms"} <= set(logged[-1][1])
    assert max_diff(model.state_dict(), load_tensors(reference / "model.safetensors")) == 0.0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step_0000006", "step_0000008"]
    side = read_json(tmp_path / "model.json")
    assert side["step"] == 8 and side["config"]["lr"] == 1e-2 and side["metrics"]["loss"] == res.metrics["loss"]
    fresh = make_model(0.0, seed=5)
    load_checkpoint_weights(tmp_path, fresh)
    assert max_diff(fresh.state_dict(), model.state_dict()) == 0.0
    with pytest.raises(ArtifactError, match="shape mismatches"):
        load_checkpoint_weights(tmp_path / "model.safetensors", Tiny(hidden=8))
    again = train(make_model(0.2, seed=3), make_loss_step(), batches, config(max_steps=8), tmp_path)
    assert again.resumed_from == 8  # finished run: nothing to do, same export
    with pytest.raises(ValueError, match="'lr'"):
        train(make_model(0.2), make_loss_step(), batches, config(max_steps=8, lr=2e-2), tmp_path)


def test_loss_decreases(tmp_path: Path) -> None:
    logged: list[float] = []
    train(make_model(0.0), make_loss_step(), batches, config(max_steps=60, log_every=10, ckpt_every=60), tmp_path,
          logger=lambda s, m: logged.append(m["loss"]))
    assert logged[-1] < 0.5 * logged[0]


def test_resume_after_crash_in_logger_is_exact(tmp_path: Path, reference: Path) -> None:
    def crash(step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(make_model(0.2), make_loss_step(), batches, config(log_every=1), tmp_path, logger=crash)
    assert read_json(tmp_path / "ckpt" / "latest.json")["step"] == 4
    res = train(make_model(0.2, seed=42), make_loss_step(), batches, config(), tmp_path)
    assert res.resumed_from == 4
    assert max_diff(load_tensors(tmp_path / "model.safetensors"), load_tensors(reference / "model.safetensors")) <= 1e-6
    opt, ref_opt = (load_tensors(p / "ckpt" / "step_0000008" / "optimizer.safetensors") for p in (tmp_path, reference))
    assert {k.rsplit(".", 1)[1] for k in opt} == {"exp_avg", "exp_avg_sq", "step"}
    assert max_diff(opt, ref_opt) <= 1e-6


@pytest.mark.parametrize(("metric", "kw"), [("loss", {"bad_draw": 12}), ("grad_norm", {"inf_grad_draw": 12})])
def test_non_finite_guard_keeps_last_good_checkpoint(tmp_path: Path, reference: Path, metric: str, kw: dict) -> None:
    with pytest.raises(NonFiniteError, match=f"step 7: non-finite {metric}"):
        train(make_model(0.2), make_loss_step(**kw), batches, config(), tmp_path)
    last = tmp_path / "ckpt" / "step_0000006"
    assert read_json(tmp_path / "ckpt" / "latest.json")["latest"] == last.name
    assert read_json(last / "checkpoint.json")["step"] == 6
    load_tensors(last / "model.safetensors")  # refuses NaN/inf
    res = train(make_model(0.2), make_loss_step(), batches, config(), tmp_path)
    assert res.resumed_from == 6
    assert max_diff(load_tensors(tmp_path / "model.safetensors"), load_tensors(reference / "model.safetensors")) <= 1e-6


def test_bf16_autocast_keeps_fp32_weights(tmp_path: Path) -> None:
    model = make_model(0.0)
    logged: list[dict[str, float]] = []
    train(model, make_loss_step(), batches, config(max_steps=30, mixed_precision="bf16", log_every=10), tmp_path,
          logger=lambda s, m: logged.append(m))
    assert all(m["pred_dtype_bf16"] == 1.0 for m in logged)  # the forward ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"]
    with pytest.raises(ValueError, match="must stay float32"):
        train(make_model(0.0).to(torch.bfloat16), make_loss_step(), batches, config(), tmp_path / "b")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # fault injection: SIGKILLs a training subprocess
def test_kill_9_then_resume_is_exact(tmp_path: Path, fault_seed_offset: int) -> None:
    rng = random.Random(fault_seed_offset)
    target, extra = rng.randrange(3, 61, 3), rng.uniform(0.0, 6.0)  # checkpoint step; steps of its own pace after
    proc = subprocess.Popen([sys.executable, str(WORKER), "slow", str(tmp_path)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    pointer = tmp_path / "ckpt" / "latest.json"
    kill = kill_at_progress(proc, lambda: read_json(pointer)["step"] if pointer.exists() else 0, target, extra,
                            timeout=120)
    assert kill.killed or kill.code == 0, proc.stderr.read().decode()[-2000:]
    killed_at = read_json(pointer)["step"]
    if killed_at < 100:  # no export before the last step
        assert kill.killed and not (tmp_path / "model.safetensors").exists()
    print(f"{'killed' if kill.killed else 'ended'} after checkpoint step {killed_at} (target {target}, "
          f"+{extra:.1f} steps at {kill.pace_s * 1e3:.1f} ms each); "
          f"partial dirs: {sorted(p.name for p in pointer.parent.glob('.tmp-*'))}")
    cfg = config(max_steps=100, ckpt_every=100)  # ckpt_every may change on resume
    res = train(make_model(0.2, seed=8), make_loss_step(), batches, cfg, tmp_path)
    assert 0 < killed_at == res.resumed_from <= 100
    ref = make_model(0.2)
    train(ref, make_loss_step(), batches, cfg, tmp_path / "ref")
    assert max_diff(load_tensors(tmp_path / "model.safetensors"), ref.state_dict()) <= 1e-6
    assert not list(pointer.parent.glob(".tmp-*"))


@pytest.mark.slow  # two processes under torch.distributed.run (~7 s)
def test_two_processes_ddp(tmp_path: Path, reference: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "ddp", str(tmp_path)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {n: [load_tensors(tmp_path / n / f"rank{r}.safetensors") for r in (0, 1)] for n in ("equiv", "ref", "crash")}
    for n, (r0, r1) in ranks.items():
        assert max_diff(r0, r1) == 0.0, n  # DDP keeps the ranks identical
    one = make_model(0.0)
    train(one, make_loss_step(), batches, config(max_steps=6), tmp_path / "one")
    assert max_diff(ranks["equiv"][0], one.state_dict()) <= 1e-6  # same global batch, 1 vs 2 processes
    assert "step 5: non-finite loss" in (tmp_path / "crash" / "error1.txt").read_text()
    assert max_diff(ranks["crash"][0], ranks["ref"][0]) <= 1e-6  # resume restored both ranks' RNG
    rng = read_json(tmp_path / "ref" / "ckpt" / "step_0000008" / "checkpoint.json")["rng"]
    assert len(rng) == 2 and rng[0]["torch"] != rng[1]["torch"]
    assert (rng[0]["cuda"] is not None) == torch.cuda.is_available()  # NCCL run: CUDA RNG saved too
