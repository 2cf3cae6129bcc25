"""Batched per-clip LoRA fitting against peft one clip at a time; resumable, sharded runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lofa.config import ConfigError, from_dict, to_dict
from lofa.lora import LoRAWeights
from lofa.artifacts.loras import curve_path, lora_path, safe_clip_id
from lofa.fit import ClipRecord, FitConfig, derive_seed, draw_step, fit_batch, fit_shard, init_lora, select_shard
from lofa.io import load_tensors, read_metadata, save_tensors
from lofa.layers import Vocabulary
from lofa.lora import load_lora
from lofa.wan import WanDiTConfig, add_noise, base_model_hash, build_dit, training_target, training_weight

ROOT = Path(__file__).resolve().parents[1]
CFG = WanDiTConfig(dim=96, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
VOCAB = Vocabulary.from_dit_config(CFG)



@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(3)
    return build_dit(CFG)


def test_config_from_dict_and_validation():
    cfg = from_dict(FitConfig, {"rank": 4, "steps": 3, "betas": [0.9, 0.95], "max_grad_norm": 1.0})
    assert cfg.betas == (0.9, 0.95) and cfg.scale == 32.0 / 4
    assert from_dict(FitConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ranks'\]; valid keys are"):
        from_dict(FitConfig, {"ranks": 4})
    with pytest.raises(ConfigError, match="'adam' is not one of"):
        from_dict(FitConfig, {"init": "adam"})
    with pytest.raises(ValueError, match="timestep_min"):
        FitConfig(timestep_min=0.8, timestep_max=0.2)
    with pytest.raises(ConfigError, match="'fast' is not one of"):
        from_dict(FitConfig, {"block_impl": "fast"})
    with pytest.raises(ConfigError, match="'cudnn_first' is not one of"):  # removed: no gain over "auto"
        from_dict(FitConfig, {"sdpa_backend": "cudnn_first"})
    auto = FitConfig()
    assert auto.block_impl_on(torch.device("cpu")) == "diffsynth"
    assert auto.block_impl_on(torch.device("cuda")) == "compiled"
    assert FitConfig(block_impl="diffsynth").block_impl_on(torch.device("cuda")) == "diffsynth"


def _peft_fit_one(dit, lat, ctx, cfg: FitConfig, seed: int):
    """The conventional path: peft LoRA on a copy of the DiT, diffsynth's model_fn, one clip."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                               target_modules=[m.prefix for m in VOCAB]), copy.deepcopy(dit))
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    init = init_lora(VOCAB, cfg, [g], "cpu")
    A, B = [], []
    with torch.no_grad():
        for i, m in enumerate(VOCAB):
            mod = model.get_submodule(m.prefix)
            A.append(mod.lora_A["default"].weight.copy_(init.A[i][0]).requires_grad_(True))
            B.append(mod.lora_B["default"].weight.zero_().requires_grad_(True))
    opt = torch.optim.AdamW(A + B, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    losses = []
    for _ in range(cfg.steps):
        ts, noise = draw_step([g], lat.shape, cfg, "cpu")
        pred = model_fn_wan_video(dit=model, latents=add_noise(lat[None], noise, ts), timestep=ts, context=ctx[None])
        loss = torch.nn.functional.mse_loss(pred, training_target(lat[None], noise)) * training_weight(ts)[0]
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(A + B, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return A, B, losses


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_fit_batch_equals_peft_per_clip(dit, max_grad_norm):
    cfg = FitConfig(rank=4, alpha=8.0, shared_init=False, steps=3, lr=1e-2, weight_decay=0.01,
                    max_grad_norm=max_grad_norm, eval_points=2)
    g = torch.Generator().manual_seed(0)
    lat, ctx = torch.randn(3, 16, 2, 8, 8, generator=g), torch.randn(3, 6, 32, generator=g)
    seeds = [11, 22, 33]
    res = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, cfg, seeds)
    assert res.losses.shape == (3, 3) and res.base_loss.shape == res.final_loss.shape == (3,)
    assert res.lora.scale == 2.0
    for k in range(3):
        A, B, losses = _peft_fit_one(dit, lat[k], ctx[k], cfg, seeds[k])
        torch.testing.assert_close(res.losses[k], torch.tensor(losses), rtol=1e-4, atol=1e-6)
        # Adam moves every entry by about lr = 1e-2 per step, whatever its gradient's size:
        # a gradient path error shows as ~1e-2, float32 rounding through Adam as ~1e-6.
        for i in range(len(VOCAB)):
            torch.testing.assert_close(res.lora.A[i][k], A[i].detach(), rtol=1e-3, atol=2e-5)
            torch.testing.assert_close(res.lora.B[i][k], B[i].detach(), rtol=1e-3, atol=2e-5)
        assert float(res.lora.B[0][k].abs().max()) > 0  # it moved


def test_compute_options_keep_the_result(dit):
    """Checkpointing variants, a pinned attention backend and the block implementation change
    speed, not the fit."""
    g = torch.Generator().manual_seed(4)
    lat, ctx = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    base = FitConfig(rank=4, steps=2, lr=1e-3, eval_points=1, block_impl="diffsynth")
    ref = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, base, [5, 6])
    for opts in ({"grad_checkpointing": True, "checkpoint_save_attention": True},
                 {"grad_checkpointing": True, "checkpoint_blocks": 1, "sdpa_backend": "math"},
                 {"fused_rms_norm": False}, {"block_impl": "fused"}, {"block_impl": "auto"},
                 {"block_impl": "fused", "grad_checkpointing": True, "checkpoint_blocks": 1,
                  "sdpa_backend": "flash"}):
        got = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, FitConfig(**{**base.__dict__, **opts}), [5, 6])
        torch.testing.assert_close(got.losses, ref.losses, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.lora.B[3], ref.lora.B[3], rtol=1e-3, atol=2e-5)
    with pytest.raises(ValueError, match="dtype is float32 but the DiT's weights are torch.bfloat16"):
        fit_batch(copy.deepcopy(dit).to(torch.bfloat16), VOCAB, lat, ctx, base, [5, 6])
    bf = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, FitConfig(**{**base.__dict__, "dtype": "bfloat16"}), [5, 6])
    assert bf.lora.A[0].dtype == torch.float32
    torch.testing.assert_close(bf.losses, ref.losses, rtol=5e-2, atol=1e-3)


def test_fit_reduces_eval_loss(dit):
    cfg = FitConfig(rank=4, alpha=4.0, steps=30, lr=5e-3, clips_per_batch=2, eval_points=3,
                    timestep_min=0.3, timestep_max=0.7)
    g = torch.Generator().manual_seed(1)
    lat, ctx = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    res = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, cfg, [1, 2])
    assert (res.final_loss < 0.9 * res.base_loss).all(), (res.base_loss, res.final_loss)


def test_safe_ids_and_shards():
    assert safe_clip_id("idea400/subset_0027/Walking_The_Dog") == "idea400__subset_0027__Walking_The_Dog"
    odd = safe_clip_id("a b/c")
    assert odd.startswith("a_b__c-") and odd != safe_clip_id("a_b/c")
    assert safe_clip_id("x__y") != safe_clip_id("x/y")
    recs = [ClipRecord(f"c{i}", "p") for i in range(7)]
    parts = [select_shard(recs, i, 3) for i in range(3)]
    assert sorted(r.clip_id for p in parts for r in p) == sorted(r.clip_id for r in recs)
    assert [r.clip_id for r in parts[1]] == ["c1", "c4"]
    assert derive_seed(0, "c1") != derive_seed(0, "c2") and derive_seed(0, "c1") == derive_seed(0, "c1")


def _records(tmp_path: Path, n: int = 5) -> list[ClipRecord]:
    g = torch.Generator().manual_seed(7)
    recs = []
    for i in range(n):
        frames = 2 if i % 3 else 3  # two latent shapes -> two batch groups
        path = tmp_path / "latents" / f"clip{i}.safetensors"
        save_tensors(path, {"latents": torch.randn(16, frames, 8, 8, generator=g),
                            "context": torch.randn(6, 32, generator=g)})
        recs.append(ClipRecord(f"set/clip{i}", str(path), prompt=f"person {i} waves"))
    return recs


def test_fit_shard_writes_and_resumes(tmp_path, dit):
    recs = _records(tmp_path)
    cfg = FitConfig(rank=4, steps=2, lr=1e-3, clips_per_batch=2, eval_points=1)
    out = tmp_path / "out"
    report = fit_shard(copy.deepcopy(dit), recs, out, cfg, progress=False)
    assert sorted(report.fitted) == sorted(r.clip_id for r in recs) and report.skipped == ()
    curve = json.loads(curve_path(out, "set/clip1").read_text())
    assert len(curve["losses"]) == 2 and curve["final_loss"] > 0 and curve["base_loss"] > 0
    assert curve["base_model_hash"] == base_model_hash(dit) and 0 <= curve["response_map"]["fraction"] <= 1
    lora = load_lora(lora_path(out, "set/clip1"), VOCAB)
    meta = read_metadata(lora_path(out, "set/clip1"))
    assert lora.rank == 4 and meta["prompt"] == "person 1 waves" and meta["clip_id"] == "set/clip1"

    before = {r.clip_id: (lora_path(out, r.clip_id).stat().st_mtime_ns, load_tensors(lora_path(out, r.clip_id)))
              for r in recs}
    lora_path(out, "set/clip3").unlink()
    again = fit_shard(copy.deepcopy(dit), recs, out, cfg, progress=False)
    assert again.fitted == ("set/clip3",) and len(again.skipped) == 4
    for r in recs:
        now = load_tensors(lora_path(out, r.clip_id))
        for key, t in before[r.clip_id][1].items():  # refit alone == fitted in a batch of two
            torch.testing.assert_close(now[key], t, rtol=1e-2, atol=1e-3)  # batch composition differs; Adam amplifies float noise
        if r.clip_id != "set/clip3":
            assert lora_path(out, r.clip_id).stat().st_mtime_ns == before[r.clip_id][0]
    assert not list((out / "loras").glob(".tmp-*"))


@pytest.mark.slow  # two processes under torch.distributed.run (~10 s)
def test_two_processes_split_the_shard(tmp_path):
    recs = _records(tmp_path, n=4)
    spec = {"dit": to_dict(CFG), "fit": to_dict(FitConfig(rank=2, steps=1, clips_per_batch=2, eval_points=1)),
            "records": [r.__dict__ for r in recs]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(ROOT / "tests" / "fit_worker.py"),
                           str(tmp_path / "spec.json"), str(out)],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = {}
    for r in recs:
        assert lora_path(out, r.clip_id).is_file()
        shards[r.clip_id] = tuple(json.loads(curve_path(out, r.clip_id).read_text())["shard"])
    assert shards == {"set/clip0": (0, 2), "set/clip1": (1, 2), "set/clip2": (0, 2), "set/clip3": (1, 2)}


def test_bench_tiny_smoke(tmp_path, monkeypatch):
    import runpy

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_fit.py", "--tiny"])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_fit.py"), run_name="__main__")
    result = json.loads((tmp_path / "bench_fit.json").read_text())
    assert result["device"] == "cpu" and result["rows"]
    for row in result["rows"]:
        assert row["conventional"]["clip_steps_per_s"] > 0 and row["batched"]["clip_steps_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["batched"]["clip_steps_per_s"]
                                               / row["conventional"]["clip_steps_per_s"], rel=1e-6)


def test_shared_init_and_refinement_start(dit):
    """shared_init: every clip starts from one A; init: fitting starts from the given LoRA."""
    g = torch.Generator().manual_seed(1)
    lat, ctx = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    frozen = dict(rank=4, alpha=8.0, steps=1, lr=1e-30, weight_decay=0.0, eval_points=1)
    shared = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, FitConfig(**frozen), [1, 2])
    own = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, FitConfig(**frozen, shared_init=False), [1, 2])
    assert torch.equal(shared.lora.A[0][0], shared.lora.A[0][1])
    assert not torch.equal(own.lora.A[0][0], own.lora.A[0][1])
    start = LoRAWeights(VOCAB, tuple(torch.randn(1, *a.shape[1:], generator=g) for a in shared.lora.A),
                        tuple(torch.randn(1, *b.shape[1:], generator=g) for b in shared.lora.B), 0.5)
    refined = fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, FitConfig(**frozen), [1, 2], init=start)
    for k in range(2):
        A, B = refined.lora.factors(k)  # scale folded into B
        torch.testing.assert_close(A[3], start.A[3][0])
        torch.testing.assert_close(B[3], 0.5 * start.B[3][0])
    assert (refined.final_loss != shared.final_loss).all()  # a non-zero LoRA changes the loss
    with pytest.raises(ValueError, match="rank"):
        fit_batch(copy.deepcopy(dit), VOCAB, lat, ctx, FitConfig(**{**frozen, "rank": 2}), [1, 2], init=start)


def test_stale_loras_are_fitted_again(tmp_path, dit):
    """A LoRA written under another fit config (or another base model) is not reused on resume."""
    recs = _records(tmp_path)[:2]
    cfg = FitConfig(rank=4, steps=2, lr=1e-3, clips_per_batch=2, eval_points=1)
    out = tmp_path / "out"
    fit_shard(copy.deepcopy(dit), recs, out, cfg, progress=False)
    faster = dataclasses.replace(cfg, clips_per_batch=1)  # how, not what: the LoRAs stay valid
    assert faster.result_hash() == cfg.result_hash()
    assert fit_shard(copy.deepcopy(dit), recs, out, faster, progress=False).fitted == ()
    longer = dataclasses.replace(cfg, steps=3)
    with pytest.warns(UserWarning, match="another fit config"):
        report = fit_shard(copy.deepcopy(dit), recs, out, longer, progress=False)
    assert sorted(report.fitted) == sorted(r.clip_id for r in recs)
    assert len(json.loads(curve_path(out, recs[0].clip_id).read_text())["losses"]) == 3
    with pytest.warns(UserWarning, match="fitted on base model"):
        again = fit_shard(copy.deepcopy(dit), recs, out, longer, base_hash="another-base", progress=False)
    assert len(again.fitted) == 2


def test_fit_breakdown_tiny(tmp_path, monkeypatch):
    """benchmarks/fit_breakdown.py on a tiny DiT: the step's FLOPs by part, timed steps, a profile."""
    import runpy

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["fit_breakdown.py", "--tiny", "--attention", "sdpa", "--steps", "4"])
    runpy.run_path(str(ROOT / "benchmarks" / "fit_breakdown.py"), run_name="__main__")
    result = json.loads((tmp_path / "fit_breakdown.json").read_text())
    tokens = result["tokens"]
    assert tokens == 2 * 8 * 8 // 4
    from lofa.wan import WAN_TINY as cfg
    # self-attention: 4 * heads * S^2 * head_dim * 3.5 per layer
    assert result["tflop"]["self_attention"] * 1e12 == pytest.approx(
        4 * cfg.num_heads * tokens ** 2 * (cfg.dim // cfg.num_heads) * 3.5 * cfg.num_layers)
    assert all(v > 0 for v in result["tflop"].values())
    (run,) = result["runs"]
    assert "status" not in run and len(run["steps"]) == 4 and run["s_per_step"] > 0
    assert run["profile"]["device_ms"] > 0 and run["profile"]["top"]
