"""Per-clip LoRA fitting throughput (clip-steps/s): conventional vs lofa's batched fitting.

Conventional (as DiffSynth's trainer): peft LoRA (r=32, bf16 parameters) on the
q, k, v, o linears of self/cross attention, one clip per step through
``model_fn_wan_video`` with gradient checkpointing, AdamW. Batched: K clips per
step through :func:`lofa.fit.fit_batch` (one LoRA per clip, fp32 LoRA parameters,
bf16 DiT), over a short list of candidates per resolution (K, checkpointing,
block implementation: lofa's fused block eager or compiled, or diffsynth's
modules; attention kernel), measured in rounds until a time budget ends.

Before timing, on the device: the batched loss equals each clip alone; the fused
and compiled blocks equal diffsynth's (loss and LoRA gradients, bf16 tolerance);
and an attention probe times SDPA forward+backward per kernel (flash, cuDNN) at
each resolution's shape, checks that they agree, and picks the faster one for
the batched candidates ("best"). Compile time is reported apart from step time
(``first_step_s`` holds it; steps are timed after warm-up).

GPU: the Wan2.1-T2V-1.3B config with random weights built on the device, text
context 512 x 4096. ``--tiny``: a tiny DiT on CPU (smoke test).

Prints a table last and writes JSON to ``$OUT/bench_fit.json`` when OUT is set
(rewritten after every measurement, so a cut-off run still leaves its numbers).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lofa.fit import FitConfig, attention_backend, fit_batch
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights
from lofa.wan import (WAN21_T2V_1_3B, WAN_TINY, add_noise, build_dit, flow_loss, sample_timesteps,
                      training_target, training_weight)

RESOLUTIONS = {"33x320x512": (33, 320, 512), "81x480x832": (81, 480, 832), "17x256x256": (17, 256, 256)}
CHECK_RESOLUTION = "17x256x256"  # the device checks run at this (smallest) shape
TARGETS = {"17x256x256": 8.0, "33x320x512": 3.0, "81x480x832": 1.5}
SDPA_PROBE = ("flash", "cudnn")


@dataclass(frozen=True)
class Candidate:
    """One batched configuration: K clips per step, checkpointing, block implementation and
    attention kernel ("best": the faster of the probe)."""

    k: int
    impl: str = "fused"
    ckpt: bool = False
    blocks: int | None = None  # checkpoint only the first ``blocks`` blocks
    save_attention: bool = False
    sdpa: str = "best"
    attention: str = "sdpa"  # the fused block's kernel (lofa.kernels.flash): "sdpa" or "fa4"

    @property
    def label(self) -> str:
        label = "none" if not self.ckpt else ("save_attn" if self.save_attention else "full")
        label += f"[:{self.blocks}]" if self.ckpt and self.blocks is not None else ""
        return f"{self.impl} ckpt={label}" + (" fa4" if self.attention == "fa4" else "")


C = Candidate
# Measured in rounds (every resolution's first candidate, then every second, ...) until the time
# budget ends: fused eager, then compiled (one compile serves every K > 1 and resolution, one more
# for K = 1), then larger K and diffsynth's block as before this change (attribution).
# FlashAttention 4 (attention="fa4") beside each SDPA candidate, in the first rounds.
FA4 = "fa4"
CANDIDATES = {  # an 80 GB card
    "33x320x512": [C(4, "compiled"), C(4, "compiled", attention=FA4), C(4), C(4, attention=FA4),
                   C(6, "compiled", attention=FA4), C(4, "diffsynth", sdpa="auto")],
    "81x480x832": [C(1, "compiled"), C(1, "compiled", attention=FA4), C(1), C(1, attention=FA4),
                   C(1, "compiled", True, 10, True, attention=FA4), C(1, "diffsynth", sdpa="auto")],
    "17x256x256": [C(16, "compiled"), C(16, "compiled", attention=FA4), C(16), C(16, attention=FA4)],
}
CANDIDATES_BIG = {  # a card of more than 100 GiB (H200)
    "33x320x512": [C(6, "compiled"), C(6, "compiled", attention=FA4), C(6), C(6, attention=FA4),
                   C(8, "compiled", attention=FA4), C(6, "diffsynth", sdpa="auto")],
    "81x480x832": [C(1, "compiled"), C(1, "compiled", attention=FA4), C(1), C(1, attention=FA4),
                   C(1, "diffsynth", sdpa="auto")],
    "17x256x256": [C(24, "compiled"), C(24, "compiled", attention=FA4), C(24), C(24, attention=FA4)],
}


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Wan VAE latents: 16 channels, 4x temporal and 8x spatial compression."""
    return 16, 1 + (frames - 1) // 4, height // 8, width // 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _summary(times: list[float], k: int, warmup: int, device: torch.device, **info: object) -> dict:
    """``times``: a clock reading before the first step and after each step (synchronized)."""
    steps = [b - a for a, b in zip(times[:-1], times[1:])]
    s = statistics.median(steps[warmup:])
    return {"status": "ok", "clips_per_step": k, "s_per_step": s, "clip_steps_per_s": k / s,
            "first_step_s": steps[0], "peak_gib": _peak_gib(device), "timed_steps": len(steps) - warmup, **info}


def conventional(model: torch.nn.Module, lat_shape: tuple[int, ...], ctx_shape: tuple[int, int], lora_params: list,
                 ckpt: bool, warmup: int, timed: int, device: torch.device) -> dict:
    """One clip per step: peft LoRA, diffsynth's model_fn, AdamW (DiffSynth's trainer)."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    dtype = model.patch_embedding.weight.dtype
    g = torch.Generator(device=device).manual_seed(0)
    lat = torch.randn((1, *lat_shape), generator=g, device=device).to(dtype)
    ctx = torch.randn((1, *ctx_shape), generator=g, device=device).to(dtype)
    opt = torch.optim.AdamW(lora_params, lr=1e-4)
    _reset(device)
    _sync(device)
    times = [time.perf_counter()]
    for _ in range(warmup + timed):
        t = sample_timesteps(1, g, device)
        noise = torch.randn(lat.shape, generator=g, device=device).to(dtype)
        noisy = add_noise(lat, noise, t).to(dtype)
        pred = model_fn_wan_video(dit=model, latents=noisy, timestep=t.to(dtype), context=ctx,
                                  use_gradient_checkpointing=ckpt)
        loss = torch.nn.functional.mse_loss(pred.float(), training_target(lat, noise).float()) * training_weight(t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter())
    return _summary(times, 1, warmup, device, checkpointing="full" if ckpt else "none")


def batched(dit: torch.nn.Module, vocab: Vocabulary, lat_shape: tuple[int, ...], ctx_shape: tuple[int, int],
            cand: Candidate, sdpa: str, rank: int, warmup: int, timed: int, device: torch.device) -> dict:
    """K clips per step through lofa.fit.fit_batch; timed per optimizer step."""
    dtype = "bfloat16" if dit.patch_embedding.weight.dtype == torch.bfloat16 else "float32"
    cfg = FitConfig(rank=rank, alpha=float(rank), steps=warmup + timed, lr=1e-4, clips_per_batch=cand.k,
                    grad_checkpointing=cand.ckpt, checkpoint_blocks=cand.blocks,
                    checkpoint_save_attention=cand.save_attention, dtype=dtype, eval_points=1,
                    sdpa_backend=sdpa, block_impl=cand.impl, attention=cand.attention)
    g = torch.Generator(device=device).manual_seed(1)
    lat = torch.randn((cand.k, *lat_shape), generator=g, device=device)
    ctx = torch.randn((cand.k, *ctx_shape), generator=g, device=device)
    _reset(device)
    _sync(device)
    times = [time.perf_counter()]
    fit_batch(dit, vocab, lat, ctx, cfg, seeds=list(range(cand.k)),
              on_step=lambda *_: (_sync(device), times.append(time.perf_counter())))
    return _summary(times, cand.k, warmup, device, checkpointing=cand.label, sdpa_backend=sdpa,
                    block_impl=cand.impl, attention=cand.attention, compiled_graphs=_graphs())


def _attempt(fn, *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except Exception as e:  # e.g. an attention kernel or the compiler failing on these shapes
        return {"status": f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}


def _random_lora(vocab: Vocabulary, k: int, rank: int, g: torch.Generator, device: torch.device,
                 grad: bool = False) -> LoRAWeights:
    A = tuple((torch.randn(k, rank, m.in_features, generator=g, device=device) * 0.02).requires_grad_(grad)
              for m in vocab)
    B = tuple((torch.randn(k, m.out_features, rank, generator=g, device=device) * 0.02).requires_grad_(grad)
              for m in vocab)
    return LoRAWeights(vocab, A, B)


def check_batched_equals_single(dit, vocab, lat_shape, ctx_shape, rank, device, impl: str = "fused") -> float:
    """Max relative difference between a batched K=3 LoRA loss and each clip alone."""
    g = torch.Generator(device=device).manual_seed(2)
    k = 3
    lora = _random_lora(vocab, k, rank, g, device)
    lat = torch.randn((k, *lat_shape), generator=g, device=device)
    ctx = torch.randn((k, *ctx_shape), generator=g, device=device)
    t = torch.tensor([200.0, 500.0, 800.0], device=device)
    noise = torch.randn(lat.shape, generator=g, device=device)
    with torch.no_grad():
        both = flow_loss(dit, lat, ctx, t, noise, lora=lora, block_impl=impl)
        single = torch.cat([flow_loss(dit, lat[i:i + 1], ctx[i:i + 1], t[i:i + 1], noise[i:i + 1],
                                      lora=LoRAWeights(vocab, tuple(a[i:i + 1] for a in lora.A),
                                                       tuple(b[i:i + 1] for b in lora.B)), block_impl=impl)
                            for i in range(k)])
    return float(((both - single).abs() / single.abs()).max())


def check_impls(dit, vocab, lat_shape, ctx_shape, rank, device, sdpa: str, impls: tuple[str, ...],
                attention: str = "sdpa") -> dict:
    """Loss and LoRA-gradient relative differences of ``impls`` (with the fused block's kernel
    ``attention``) against diffsynth's block (K=2, with gradients; diffsynth's block runs SDPA);
    the first call of each impl is timed (a compile, for "compiled")."""
    g = torch.Generator(device=device).manual_seed(3)
    k = 2
    lora = _random_lora(vocab, k, rank, g, device, grad=True)
    lat = torch.randn((k, *lat_shape), generator=g, device=device)
    ctx = torch.randn((k, *ctx_shape), generator=g, device=device)
    t = torch.tensor([300.0, 700.0], device=device)
    noise = torch.randn(lat.shape, generator=g, device=device)
    cfg = FitConfig(sdpa_backend=sdpa, attention=attention)
    out = {}
    for impl in ("diffsynth", *impls):
        for p in lora.parameters():
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        with attention_backend(cfg):
            loss = flow_loss(dit, lat, ctx, t, noise, lora=lora, block_impl=impl)
            loss.sum().backward()
        _sync(device)
        out[impl] = (loss.detach().float(), [p.grad.float() for p in lora.parameters()], time.perf_counter() - t0)
    ref_loss, ref_grads, _ = out["diffsynth"]
    res = {}
    for impl in impls:
        loss, grads, first = out[impl]
        res[impl] = {"loss_rel": float(((loss - ref_loss).abs() / ref_loss.abs()).max()),
                     "grad_rel": max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                     for a, b in zip(grads, ref_grads)),
                     "first_call_s": first, "graphs": _graphs()}
    return res


def _timed_fwd_bwd(fwd, inputs: tuple[torch.Tensor, ...], gout: torch.Tensor, reps: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of ``fwd()`` + its backward over ``reps`` calls after one warm-up (the
    inputs' gradients cleared before each), and the last output."""
    ms = []
    for _ in range(reps + 1):
        for t in inputs:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        o = fwd()
        o.backward(gout)
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    return statistics.median(ms[1:]), o.detach()


def _probe_row(ms: float, got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
               flops: float) -> dict:
    return {"ms": ms, "tflops": flops / ms / 1e9, "out_rel": float((got[0] - ref[0]).norm() / ref[0].norm()),
            "dq_rel": float((got[1] - ref[1]).norm() / ref[1].norm())}


def attention_probe(shapes: dict[str, tuple[int, int]], heads: int, head_dim: int, device: torch.device,
                    reps: int = 5) -> dict:
    """SDPA forward+backward per kernel at (K clips, S tokens) shapes, in the fused block's layout,
    and FlashAttention 4; milliseconds, TFLOP/s, and the output/gradient difference against the first kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    out: dict[str, dict] = {}
    for res, (k, s) in shapes.items():
        g = torch.Generator(device=device).manual_seed(4)
        q, kk, v = (torch.randn(k, s, heads, head_dim, generator=g, device=device, dtype=torch.bfloat16)
                    .transpose(1, 2).requires_grad_(True) for _ in range(3))
        gout = torch.randn(k, s, heads, head_dim, generator=g, device=device, dtype=torch.bfloat16).transpose(1, 2)
        flops = 4 * k * heads * s * s * head_dim * 3.5  # forward 2 matmuls, backward 5
        row, ref = {}, None
        for name in SDPA_PROBE:
            try:
                with sdpa_kernel(names[name]):
                    ms, o = _timed_fwd_bwd(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, v),
                                           (q, kk, v), gout, reps)
                got = (o.float(), q.grad.float())
                ref = ref or got
                row[name] = _probe_row(ms, got, ref, flops)
            except Exception as e:  # a kernel that cannot serve this shape
                row[name] = {"status": f"error: {type(e).__name__}: {str(e).strip()[:200]}"}
        row["fa4"] = _attempt(_probe_fa4, q, kk, v, gout, ref, flops, reps)
        out[res] = row
        del q, kk, v, gout
    return out


def _probe_fa4(q, kk, v, gout, ref, flops: float, reps: int) -> dict:
    """FlashAttention 4 (lofa.kernels.flash's custom operator) on the probe's tensors, (N, S, H, D) layout."""
    from lofa.kernels import flash

    q4, k4, v4 = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, kk, v))
    ms, o = _timed_fwd_bwd(lambda: flash.fa4_fwd(q4, k4, v4)[0], (q4, k4, v4), gout.transpose(1, 2).contiguous(),
                           reps)
    return _probe_row(ms, (o.float().transpose(1, 2), q4.grad.float().transpose(1, 2)), ref, flops)


def _best_sdpa(probe: dict, resolution: str) -> str:
    """The probe's faster kernel at ``resolution`` as a FitConfig.sdpa_backend value."""
    row = {n: r for n, r in probe.get(resolution, {}).items() if "ms" in r and n in SDPA_PROBE}
    if not row:
        return "auto"
    best = min(row, key=lambda n: row[n]["ms"])
    return "cudnn" if best == "cudnn" else "flash"


def _write(result: dict) -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_fit.json").write_text(json.dumps(result, indent=2) + "\n")


def _table(result: dict) -> str:
    lines = [f"card: {result['card']}   torch {result['torch']}   rank {result['rank']}   "
             f"sdpa best: {result.get('sdpa_best')}",
             f"{'resolution':<12} {'conventional':>18} {'batched (best)':>62} {'speedup':>8} {'target':>7}"]
    for row in result["rows"]:
        c, b = row["conventional"], row.get("batched") or {}
        conv = (f"{c.get('clip_steps_per_s', 0):6.2f}/s {c.get('peak_gib') or 0:5.1f}GiB"
                if c.get("status") == "ok" else c.get("status"))
        best = (f"{b['clip_steps_per_s']:6.2f}/s K={b['clips_per_step']:<2} {b['checkpointing'][:28]:<28} "
                f"{b['sdpa_backend'][:6]:<6} {b.get('attention', 'sdpa'):<4} {b.get('peak_gib') or 0:5.1f}GiB"
                if b else "none")
        lines.append(f"{row['resolution']:<12} {conv:>18} {best:>62} {row.get('speedup', 0):7.2f}x "
                     f"{row.get('target', 0):6.1f}x")
    for row in result["rows"]:
        for key in [k for k in row if k.startswith("conventional_")]:
            lines.append(f"  {row['resolution']} {key}: {row[key].get('clip_steps_per_s', row[key].get('status'))}")
        for c in row.get("candidates", []):
            rate = f"{c['clip_steps_per_s']:6.2f}/s first step {c['first_step_s']:6.1f}s" if "s_per_step" in c else ""
            lines.append(f"  {row['resolution']} K={c.get('clips_per_step', '?')} {c.get('checkpointing', '')} "
                         f"{c.get('sdpa_backend', '')} {c.get('block_impl', '')}: {rate or c.get('status')}")
    return "\n".join(lines)


def _setup(tiny: bool, device: torch.device):
    cfg, rank = (WAN_TINY, 4) if tiny else (WAN21_T2V_1_3B, 32)
    torch.manual_seed(0)
    dit = build_dit(cfg, device=device, dtype=torch.float32 if tiny else torch.bfloat16).requires_grad_(False)
    vocab = Vocabulary.from_dit_config(cfg)
    if tiny:
        return cfg, rank, dit, vocab, {"tiny": ((16, 2, 8, 8), (16, cfg.text_dim))}, {
            "tiny": [C(4, "diffsynth", sdpa="auto"), C(4, sdpa="auto")]}
    resolutions = {r: (latent_shape(*v), (512, cfg.text_dim)) for r, v in RESOLUTIONS.items()}
    big = torch.cuda.get_device_properties(device).total_memory > 100 * 2**30
    return cfg, rank, dit, vocab, resolutions, (CANDIDATES_BIG if big else CANDIDATES)


def _peft_model(dit: torch.nn.Module, vocab: Vocabulary, rank: int) -> tuple[torch.nn.Module, list]:
    """The conventional path's model: peft LoRA on a copy (it never touches the batched path's DiT)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=[m.prefix for m in vocab]),
                                    copy.deepcopy(dit))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:  # DiffSynth's trainer: LoRA parameters in the pipeline dtype
        p.data = p.data.to(model.patch_embedding.weight.dtype)
        p.requires_grad_(True)
    return model, params


def _conventional_rows(model, params, resolutions, result, warmup, timed, device) -> None:
    for name, (lat, ctx) in resolutions.items():
        w = 1 if name == "81x480x832" else warmup
        row = {"resolution": name, "latents": list(lat), "tokens": lat[1] * lat[2] * lat[3] // 4,
               "target": TARGETS.get(name, 0.0), "candidates": []}
        row["conventional"] = _attempt(conventional, model, lat, ctx, params, True, w, timed, device)
        if name != "81x480x832":
            row["conventional_no_ckpt"] = _attempt(conventional, model, lat, ctx, params, False, w, timed, device)
        result["rows"].append(row)
        _write(result)


def _conventional_with(sdpa: str, model, params, resolutions, result, warmup, timed, device) -> None:
    """The baseline again with the batched path's attention kernel (not part of the speedup: the
    conventional trainer runs torch's default), where the budget leaves time."""
    with attention_backend(FitConfig(sdpa_backend=sdpa)):
        for row in result["rows"]:
            lat, ctx = resolutions[row["resolution"]]
            w = 1 if row["resolution"] == "81x480x832" else warmup
            row[f"conventional_{sdpa}"] = _attempt(conventional, model, lat, ctx, params, True, w, timed, device)
            _write(result)


def run(tiny: bool, budget_s: float, warmup: int, timed: int, only: tuple[str, ...] = ()) -> dict:
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("bench_fit: the full benchmark needs a CUDA GPU; use --tiny on CPU")
    device = torch.device("cpu" if tiny else "cuda")
    t_start = time.perf_counter()
    cfg, rank, dit, vocab, resolutions, candidates = _setup(tiny, device)
    check_shapes = resolutions.get(CHECK_RESOLUTION) or next(iter(resolutions.values()))
    if only:  # a subset of the resolutions (the checks still run at CHECK_RESOLUTION's shapes)
        resolutions = {r: v for r, v in resolutions.items() if r in only}
    result = {"device": device.type, "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rank": rank, "checks": {}, "rows": []}
    checks = result["checks"]
    checks["batched_vs_single_rel"] = check_batched_equals_single(dit, vocab, *check_shapes, rank, device)
    sdpa = "auto"
    if not tiny:
        shapes = {r: (candidates[r][0].k, lat[1] * lat[2] * lat[3] // 4) for r, (lat, _) in resolutions.items()}
        result["attention_probe"] = attention_probe(shapes, cfg.num_heads, cfg.dim // cfg.num_heads, device)
        sdpa = _best_sdpa(result["attention_probe"], "33x320x512" if "33x320x512" in shapes else next(iter(shapes)))
    result["sdpa_best"] = sdpa
    checks["fused_vs_diffsynth"] = check_impls(dit, vocab, *check_shapes, rank, device, sdpa, ("fused",))
    if not tiny:
        checks["fused_fa4_vs_diffsynth"] = _attempt(check_impls, dit, vocab, *check_shapes, rank, device, sdpa,
                                                    ("fused",), attention=FA4)
    _write(result)
    model, params = _peft_model(dit, vocab, rank)
    _conventional_rows(model, params, resolutions, result, warmup, timed, device)
    for i in range(max(len(c) for c in candidates.values())):
        for row in result["rows"]:
            name = row["resolution"]
            if i >= len(candidates[name]):
                continue
            cand = candidates[name][i]
            if cand.impl == "compiled" and "compiled_vs_diffsynth" not in checks:
                checks["compiled_vs_diffsynth"] = _attempt(check_impls, dit, vocab, *check_shapes, rank, device,
                                                           sdpa, ("compiled",))
                _write(result)
            skip = time.perf_counter() - t_start > budget_s and "skipped (budget)"
            if cand.impl == "compiled" and checks["compiled_vs_diffsynth"].get("status", "ok") != "ok":
                skip = "skipped (compiled check failed)"
            if cand.attention == FA4 and checks.get("fused_fa4_vs_diffsynth", {}).get("status", "ok") != "ok":
                skip = "skipped (fa4 check failed)"
            if skip:
                row["candidates"].append({"status": skip, "checkpointing": cand.label})
                continue
            w = 1 if name == "81x480x832" else warmup
            cand_sdpa = sdpa if cand.sdpa == "best" else cand.sdpa
            row["candidates"].append(_attempt(batched, dit, vocab, *resolutions[name], cand, cand_sdpa, rank, w,
                                              timed, device))
            _pick_best(row)
            _write(result)
    if sdpa != "auto" and time.perf_counter() - t_start < budget_s:
        _conventional_with(sdpa, model, params, resolutions, result, warmup, timed, device)
    result["seconds"] = time.perf_counter() - t_start
    _write(result)
    return result


def _pick_best(row: dict) -> None:
    ok = [c for c in row["candidates"] if c.get("status") == "ok"]
    row["batched"] = max(ok, key=lambda c: c["clip_steps_per_s"]) if ok else None
    conv = row["conventional"].get("clip_steps_per_s")
    row["speedup"] = row["batched"]["clip_steps_per_s"] / conv if ok and conv else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny DiT on CPU (smoke test)")
    p.add_argument("--budget-s", type=float, default=230.0,
                   help="seconds after the start past which no new candidate starts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--resolutions", default="", help="comma-separated subset of " + ",".join(RESOLUTIONS))
    args = p.parse_args(argv)
    only = tuple(r for r in args.resolutions.split(",") if r)
    result = run(args.tiny, args.budget_s, args.warmup if not args.tiny else 1, args.timed if not args.tiny else 2,
                 only)
    print(json.dumps(result, indent=1))
    print(_table(result))
    return result


if __name__ == "__main__":
    main()
