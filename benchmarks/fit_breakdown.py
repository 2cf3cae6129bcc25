"""Where one fitting step's device time goes, against the bound the hardware sets (issue 21, part 2).

Question it decides: can batched fitting at 81x480x832 reach 2x the conventional fit once attention
runs on FlashAttention 4? A step has two parts whose work is fixed by the model: the attention
cores (self-attention over 32,760 tokens, cross-attention over 512 text tokens) and the linears
around them (q, k, v, o, the cross-attention's q, o and the FFN; forward and the input gradient,
the DiT being frozen). The bound is attention's FLOPs at the attention kernel's own measured rate
plus the linears' FLOPs at the card's measured bf16 matmul ceiling (8192^3); the step cannot go
below it without changing the work or the arithmetic. The profile says how far the step is above
it, by kernel kind (attention, gemm, triton (inductor's fused elementwise), other).

    python benchmarks/fit_breakdown.py --attention fa4,sdpa   # on a GPU with flash-attn-4 importable

Prints JSON (and writes ``$OUT/fit_breakdown.json`` when OUT is set). ``--tiny`` runs a tiny DiT on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hypernet import kernel_times, matmul_ceiling  # noqa: E402

from lofa.fit import FitConfig, fit_batch  # noqa: E402
from lofa.layers import Vocabulary  # noqa: E402
from lofa.wan import WAN21_T2V_1_3B, WAN_TINY, build_dit  # noqa: E402

TEXT_TOKENS = 512


def step_flops(cfg, tokens: int) -> dict[str, float]:
    """FLOPs of one step for one clip: forward + input gradient of the frozen linears, and the
    attention cores (forward 2 matmuls, backward 5, as the attention probe of bench_fit)."""
    d, f, heads = cfg.dim, cfg.ffn_dim, cfg.num_heads
    head_dim = d // heads
    linear_fwd = 2 * tokens * d * d * 4 + 2 * tokens * d * d * 2 + 2 * tokens * d * f * 2  # self qkvo, cross q o, FFN
    linear_fwd += 2 * TEXT_TOKENS * d * d * 2  # the cross-attention's k, v on the text
    self_attn = 4 * heads * tokens * tokens * head_dim * 3.5
    cross_attn = 4 * heads * tokens * TEXT_TOKENS * head_dim * 3.5
    layers = cfg.num_layers
    return {"linear": 2 * linear_fwd * layers, "self_attention": self_attn * layers,
            "cross_attention": cross_attn * layers}


def attention_rate(tokens: int, heads: int, head_dim: int, attention: str, device: torch.device) -> float:
    """Measured TFLOP/s of the fused block's attention kernel (forward + backward) at this shape."""
    from bench_fit import SDPA_PROBE, attention_probe

    row = attention_probe({"x": (1, tokens)}, heads, head_dim, device)["x"]
    names = ["fa4"] if attention == "fa4" else list(SDPA_PROBE)
    rates = [row[n]["tflops"] for n in names if "tflops" in row.get(n, {})]
    return max(rates) if rates else float("nan")


def measure(dit, vocab: Vocabulary, lat_shape: tuple[int, ...], text_dim: int, attention: str, steps: int,
            device: torch.device) -> dict:
    """Steps of fit_batch (K=1, compiled block, no checkpointing, bf16): the median step time after
    the first (which compiles), and a kernel profile of the last step."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cfg = FitConfig(rank=32, alpha=32.0, steps=steps, clips_per_batch=1, dtype="bfloat16", eval_points=1,
                    block_impl="compiled" if device.type == "cuda" else "fused", attention=attention)
    g = torch.Generator(device=device).manual_seed(1)
    lat = torch.randn((1, *lat_shape), generator=g, device=device)
    ctx = torch.randn((1, TEXT_TOKENS, text_dim), generator=g, device=device)
    times = [time.perf_counter()]
    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts, schedule=schedule(wait=steps - 2, warmup=1, active=1)) as prof:
        def on_step(*_):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            prof.step()
        fit_batch(dit, vocab, lat, ctx, cfg, seeds=[0], on_step=on_step)
    step_s = [b - a for a, b in zip(times[:-1], times[1:])]
    return {"attention": attention, "first_step_s": step_s[0], "s_per_step": statistics.median(step_s[1:-1]),
            "steps": step_s, "profile": _profile_summary(prof, device)}


def _profile_summary(prof, device: torch.device) -> dict:
    """The profiled step's kernels (operators on CPU), summed by kind."""
    rows, by_kind = kernel_times(prof, "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total")
    return {"device_ms": round(sum(r[2] for r in rows), 2), "by_kind_ms": {k: round(v, 2) for k, v in by_kind.items()},
            "top": [{"kernel": n[:90], "calls": c, "ms": round(ms, 2)} for n, c, ms in rows[:20]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", default="fa4,sdpa", help="comma list of the fused block's kernels")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--conventional-s", type=float, default=2.71,
                   help="the conventional fit's s/step at this shape (bench_fit, same card type)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = WAN_TINY if args.tiny else WAN21_T2V_1_3B
    lat_shape = (16, 2, 8, 8) if args.tiny else (16, 21, 60, 104)
    tokens = lat_shape[1] * lat_shape[2] * lat_shape[3] // 4
    torch.manual_seed(0)
    dit = build_dit(cfg, device=device, dtype=torch.float32 if args.tiny else torch.bfloat16).requires_grad_(False)
    vocab = Vocabulary.from_dit_config(cfg)
    flops = step_flops(cfg, tokens)
    result: dict = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "tokens": tokens, "tflop": {k: v / 1e12 for k, v in flops.items()},
                    "conventional_s_per_step": args.conventional_s, "runs": []}
    if device.type == "cuda":
        result["matmul_tflops"] = matmul_ceiling(device, 8192)["tflops"]
    for attention in args.attention.split(","):
        run = {"attention": attention}
        try:
            run = measure(dit, vocab, lat_shape, cfg.text_dim, attention, args.steps, device)
            if device.type == "cuda":
                rate = attention_rate(tokens, cfg.num_heads, cfg.dim // cfg.num_heads, attention, device)
                bound = (flops["self_attention"] / rate + (flops["linear"] + flops["cross_attention"])
                         / result["matmul_tflops"]) / 1e12
                run.update({"attention_tflops": rate, "bound_s": bound,
                            "bound_speedup": args.conventional_s / bound,
                            "speedup": args.conventional_s / run["s_per_step"],
                            "step_over_bound": run["s_per_step"] / bound})
        except Exception as e:  # a kernel that is not installed here
            run["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        result["runs"].append(run)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "fit_breakdown.json").write_text(json.dumps(result, indent=2) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
