"""Benchmark of the LoFA hypernetwork at the Wan2.1-1.3B shapes (GPU), or tiny shapes on CPU (--tiny).

Sections (each independent; a failure is recorded and the rest still run; the JSON
is rewritten after every section so a timeout keeps what finished):
  ceiling          a large bf16 matmul: the achievable TFLOP/s on this card
  predict          stage I + stage II over all matrices of one prompt, bf16 weights,
                   eager: median ms, peak memory, error against the fp32 model
  train1           one stage-I training step over all matrices (AdamW, bf16 autocast,
                   fp32 weights), without and with gradient checkpointing
  compiled_*       the same with the trunk blocks compiled (regional torch.compile; also the
                   embedding, text K / V and heads) and the fused stage-I loss, with a
                   kernel-time profile; ``_cached``: the prompt-independent matrix tokens
                   embedded once (HyperNet.embed)
  graph_predict*   the cached prediction replayed from one CUDA graph (PredictionGraph,
                   the Predictor's GPU path), compiled or eager (_eager) blocks,
                   (graph_predict) also one call at a time after idle, and the card's clock and
                   power while it runs back to back; with QK norms + SDPA instead of
                   lofa.kernels.attention's kernel (_sdpa)
  predictor        the user's API, Predictor(dtype="bfloat16", compile=True).predict(prompt), with
                   a base DiT of these shapes (random weights): back to back and after idle; also
                   prompts of other lengths (padded to their bucket, one graph per bucket)
  loss_check       the fused Triton stage-I loss against the compiled torch loss and an
                   fp32 evaluation: time of forward + backward, loss, counts, gradients
  train1_*         compiled stage-I step variants: torch loss, CUDA-graph trees, blocks only
  fp8              prediction with the trunk's linears in FP8 (row-wise scales,
                   torch._scaled_mm), compiled; dW error against the bf16 result
  dit              (--dit) one stage-II training step with the flow-matching loss
                   through the 1.3B DiT at 17x256x256 (needs diffsynth)
  autotune_*       (--autotune) cached prediction and the stage-I step compiled with
                   max-autotune (Triton GEMM templates with fused epilogues; minutes of compile)

Prints JSON, then a short table; writes $OUT/bench_hypernet.json when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofa.hypernet import EmbeddedGroup, HyperNet, HyperNetConfig, HyperOutput, MatrixGroup  # noqa: E402
from lofa.layers import Vocabulary  # noqa: E402
from lofa.objectives import HyperBatch, LoraGroup, Stage1LossConfig, stage1_loss, stage2_loss  # noqa: E402
from lofa.serving.predict_graph import PredictionGraph  # noqa: E402

FULL = dict(dims=(1536, 8960, 30), text_len=512,
            cfg=dict(d_model=768, num_heads=12, num_blocks=8, patch_size=96, rank=32, text_dim=4096))
TINY = dict(dims=(64, 128, 2), text_len=16,
            cfg=dict(d_model=64, num_heads=4, num_blocks=2, patch_size=16, rank=4, text_dim=32,
                     cross_stage1_after=(0, 1)))


def forward_flops(cfg: HyperNetConfig, vocab: Vocabulary, num_prompts: int, text_len: int) -> float:
    """FLOPs of one forward over every vocabulary matrix for each of ``num_prompts`` prompts."""
    d, h, p = cfg.d_model, round(cfg.d_model * cfg.mlp_ratio), cfg.patch_size
    total = 2.0 * num_prompts * text_len * (cfg.text_dim * d + cfg.num_blocks * 2 * d * d)
    for m in vocab:
        t = -(-m.out_features // p) * -(-m.in_features // p)
        s = num_prompts * (1 + t)  # token rows of this matrix over all prompts
        total += 2.0 * num_prompts * t * p * p * d
        block = 2 * s * (3 * d * d + d * d + 2 * d * h + 2 * d * d + 2 * d * h)
        block += 4 * s * (1 + t) * d + 4 * s * text_len * d
        total += cfg.num_blocks * block
        if cfg.uses_stage1:
            total += len(cfg.cross_stage1_after) * (2 * s * (4 * d * d + 2 * d * h) + 4 * s * (1 + t) * d)
        total += 2 * num_prompts * d * cfg.rank * (m.in_features + m.out_features)
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on GPU)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn`` after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return summary([call_ms(fn, device) for _ in range(repeats)])


def latency_after_idle(fn: Callable[[], object], repeats: int, idle_s: float = 0.5) -> dict[str, float]:
    """Milliseconds of single calls of ``fn``, each after ``idle_s`` with the GPU idle (CUDA events).

    A prediction served on demand starts on an idle card at its full clock. Calls back to back
    (``timeit``) are a different regime: a card that runs matrix products for seconds reaches
    its power limit (700 W on an H100 SXM) and lowers its clock (``gpu_state``).
    """
    device = torch.device("cuda")
    times = []
    for _ in range(repeats):
        sync(device)
        time.sleep(idle_s)
        times.append(call_ms(fn, device))
    return {**summary(times), "idle_s": idle_s}


def gpu_state(fn: Callable[[], object], seconds: float = 4.0) -> dict[str, object]:
    """SM clock (MHz), power (W) and the clock-event reasons nvidia-smi reports while ``fn`` runs
    back to back for ``seconds`` (after a first second to settle); {} without nvidia-smi."""
    import shutil
    import subprocess
    import threading

    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", f"--id={torch.cuda.current_device()}", "--format=csv,noheader,nounits",
             "--query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_event_reasons.active"]
    samples: list[list[str]] = []
    done = threading.Event()

    def sample() -> None:
        time.sleep(1.0)
        while not done.is_set():
            out = subprocess.run(query, capture_output=True, text=True).stdout.strip()
            if out:
                samples.append([f.strip() for f in out.split(",")])
            time.sleep(0.1)
    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        torch.cuda.synchronize()
    done.set()
    thread.join()
    try:
        clocks = [int(s[0]) for s in samples]
        power = [float(s[2]) for s in samples]
    except (ValueError, IndexError):
        return {"raw": samples[:3]}
    if not clocks:
        return {}
    return {"sm_clock_mhz_median": statistics.median(clocks), "sm_clock_mhz_min": min(clocks),
            "sm_clock_mhz_max_rated": samples[0][1], "power_w_median": statistics.median(power),
            "power_limit_w": samples[0][3], "clock_event_reasons": sorted({s[4] for s in samples}),
            "samples": len(samples)}


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def matmul_ceiling(device: torch.device, n: int) -> dict[str, float]:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    t = timeit(lambda: a @ b, device, 3, 10 if device.type == "cuda" else 2)
    return {"n": n, **t, "tflops": 2 * n ** 3 / t["median_ms"] / 1e9}


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W in float8_e4m3fn, row-wise scales (x's per token, per call)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0  # (out, 1)
        self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("w_scale", scale.t().contiguous())  # (1, out)
        self.register_buffer("bias", lin.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0  # (M, 1)
        x8 = (x2 / scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=scale, scale_b=self.w_scale, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        return (y + self.bias).reshape(*x.shape[:-1], y.shape[-1])


def to_fp8(model: HyperNet) -> HyperNet:
    """A copy whose trunk and stage-I block linears run in FP8."""
    model = copy.deepcopy(model)
    for root in (model.blocks, model.stage1_blocks):
        for name, mod in list(root.named_modules()):
            if isinstance(mod, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, child, Fp8Linear(mod))
    return model


def compile_blocks(model: HyperNet, mode: str | None = None, edges: bool = True) -> HyperNet:
    """``HyperNet.compile_regions``: the blocks (and with ``edges`` the embedding, text K / V, heads)."""
    return model.compile_regions(mode, edges)


def attention_off(fn: Callable[[], object]) -> object:
    """``fn()`` with ``lofa.kernels.attention.ENABLED`` off: QK norms and SDPA as torch operations
    instead of the prediction attention kernel."""
    from lofa.kernels import attention

    attention.ENABLED = False
    try:
        return fn()
    finally:
        attention.ENABLED = True


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind from its name: attention, gemm, triton (inductor's fused ops) or other."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "cudnn", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "scaled_mm")):
        return "gemm"
    return "triton" if low.startswith("triton") else "other"


def kernel_times(prof, field: str = "self_device_time_total") -> tuple[list[tuple[str, int, float]], dict[str, float]]:
    """A finished profile's kernels as (name, calls, ms) rows, longest first, and their ms summed by
    :func:`kernel_kind`; ``field``: the profiler's time to read (``self_cpu_time_total`` on a CPU)."""
    rows = [(e.key, e.count, getattr(e, field, 0.0) / 1e3) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])
    by_kind: dict[str, float] = {}
    for name, _, ms in rows:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    return rows, by_kind


def kernel_profile(fn: Callable[[], object], top: int = 25) -> dict[str, object]:
    """Device time of one call of ``fn`` by kernel, and summed by kind (gemm, attention, triton, other)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # the kernels' timeline: from the first start to the last end, and the time no kernel ran in it
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    idle, reach = 0.0, spans[0][1] if spans else 0.0
    for start, end in spans[1:]:
        idle += max(0.0, start - reach)
        reach = max(reach, end)
    timeline = {"span_ms": round((reach - spans[0][0]) / 1e3, 3) if spans else 0.0, "idle_ms": round(idle / 1e3, 3),
                "kernels": len(spans)}
    rows, by_kind = kernel_times(prof)
    return {"total_ms": sum(r[2] for r in rows), "by_kind_ms": by_kind, **timeline,
            "top": [{"kernel": n[:100], "calls": c, "ms": round(ms, 3)} for n, c, ms in rows[:top]]}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        spec = TINY if args.tiny else FULL
        self.vocab = Vocabulary.from_dims(*spec["dims"])
        self.text_len = spec["text_len"]
        # B heads non-zero so that dW (and its error) is not trivially zero
        self.cfg1 = HyperNetConfig(**spec["cfg"], stage=1, b_init_std=1e-3)
        self.cfg2 = HyperNetConfig(**spec["cfg"], stage=2, b_init_std=1e-3)
        self.warmup, self.repeats = (1, 2) if args.tiny else (3, args.repeats)
        self.train_repeats = 1 if args.tiny else max(3, args.repeats // 2)
        self.report: dict[str, object] = {"results": {}, "errors": {}}

    def setup(self) -> None:
        dev, n, (o, i) = self.device, len(self.vocab), (self.vocab[0].out_features, self.vocab[0].in_features)
        torch.manual_seed(0)
        self.s1, self.s2 = HyperNet(self.cfg1, self.vocab).to(dev), HyperNet(self.cfg2, self.vocab).to(dev)
        self.W = torch.randn(n, o, i, device=dev, dtype=torch.bfloat16) * 0.02
        # prompt ids and the text mask on the host, where HyperBatch.to leaves them (no GPU sync to read them)
        self.group = MatrixGroup(self.W, torch.arange(n, device=dev), torch.zeros(n, dtype=torch.long))
        self.text = torch.randn(1, self.text_len, self.cfg1.text_dim, device=dev, dtype=torch.bfloat16)
        self.mask = torch.ones(1, self.text_len, dtype=torch.bool)
        r = self.cfg1.rank
        self.lora = (torch.randn(n, r, i, device=dev, dtype=torch.bfloat16) / i ** 0.5,
                     torch.randn(n, o, r, device=dev, dtype=torch.bfloat16) * 2e-3)
        self.report["config"] = {"stage1": vars(self.cfg1) | {}, "num_matrices": n, "matrix_shape": [o, i],
                                 "text_len": self.text_len,
                                 "params_stage1_M": sum(p.numel() for p in self.s1.parameters()) / 1e6,
                                 "params_stage2_M": sum(p.numel() for p in self.s2.parameters()) / 1e6}
        f1 = forward_flops(self.cfg1, self.vocab, 1, self.text_len)
        f2 = forward_flops(self.cfg2, self.vocab, 1, self.text_len)
        patch = 2.0 * sum(-(-m.out_features // self.cfg1.patch_size) * -(-m.in_features // self.cfg1.patch_size)
                          for m in self.vocab) * self.cfg1.patch_size ** 2 * self.cfg1.d_model
        d, s = self.cfg1.d_model, sum(1 + -(-m.out_features // self.cfg1.patch_size)
                                      * -(-m.in_features // self.cfg1.patch_size) for m in self.vocab)
        self.tokens = s  # tokens of all matrices (CLS included): the rows of every trunk product
        hidden = round(d * self.cfg1.mlp_ratio)
        first_half = 2.0 * s * (4 * d * d + 2 * d * hidden)  # block 0's self-attn projections and MLP
        first_half += 4.0 * s * (s // len(self.vocab)) * d  # ... and its attention
        self.flops = {"stage1_fwd": f1, "stage2_fwd": f2, "predict": f1 + f2, "patch_embed": 2 * patch,
                      "cacheable": 2 * (patch + first_half)}
        self.report["flops_T"] = {k: v / 1e12 for k, v in self.flops.items()}

    @staticmethod
    def predict(s1: HyperNet, s2: HyperNet, g1, g2, text: torch.Tensor, mask: torch.Tensor):
        """Stage I then stage II on one group (``g1``/``g2``: a MatrixGroup or each model's EmbeddedGroup)."""
        with torch.inference_mode():
            tokens = [o.tokens for o in s1([g1], text, mask)]
            return s2([g2], text, mask, tokens)[0]

    def tflops(self, flops: float, ms: float) -> float:
        return flops / ms / 1e9

    def run_predict(self) -> dict[str, object]:
        dev = self.device
        b1, b2 = copy.deepcopy(self.s1).bfloat16().eval(), copy.deepcopy(self.s2).bfloat16().eval()
        self.s1.cpu(), self.s2.cpu()  # the fp32 models stay off the card while measuring memory
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            static = torch.cuda.memory_allocated(dev)
        run = lambda: self.predict(b1, b2, self.group, self.group, self.text, self.mask)  # noqa: E731
        out = run()
        res: dict[str, object] = {}
        if dev.type == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
            res["static_gib"] = static / 2 ** 30
        res.update(timeit(run, dev, self.warmup, self.repeats))
        res["tflops"] = self.tflops(self.flops["predict"], res["median_ms"])
        self.bf16_models = (b1, b2)
        self.bf16_out = HyperOutput(*(t if t is None else t.cpu() for t in (out.A, out.B, out.alpha, out.tokens)))
        self.s1.to(dev), self.s2.to(dev)
        res["vs_fp32"] = self.fp32_errors(out)
        return res

    def bf16_delta(self) -> torch.Tensor:
        """dW of the eager bf16 prediction (the reference of the compiled variants), on the card."""
        o = self.bf16_out
        return torch.bmm(o.B_scaled.to(self.device), o.A.to(self.device))

    def fp32_errors(self, out) -> dict[str, float]:
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            g = MatrixGroup(self.W.float(), self.group.matrix_ids, self.group.prompt_ids)
            ref = self.predict(self.s1.eval(), self.s2.eval(), g, g, self.text.float(), self.mask)
            errs = {"dW": rel_err(out.delta(), ref.delta()), "A": rel_err(out.A, ref.A),
                    "B_scaled": rel_err(out.B_scaled, ref.B_scaled), "alpha": rel_err(out.alpha, ref.alpha)}
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del g, ref
        return errs

    def train_step_fn(self, model: HyperNet, loss_cfg: Stage1LossConfig, graphs: bool = False
                      ) -> Callable[[], None]:
        batch = HyperBatch(self.text, self.mask, (LoraGroup(self.group, *self.lora),))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=self.device.type == "cuda")

        def step() -> None:
            if graphs:  # CUDA graph trees: a new step, the previous outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss, _ = stage1_loss(model, batch, loss_cfg)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> dict[str, float]:
        return {"peak_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30} if self.device.type == "cuda" else {}

    def run_train(self, compiled: bool, ckpts: tuple[bool, ...] = (False, True), profile: bool = False,
                  mode: str | None = None, fused: bool = True, edges: bool = True) -> dict[str, object]:
        """One stage-I step; eager uses the torch loss, compiled the fused Triton loss unless not ``fused``."""
        res: dict[str, object] = {}
        for ckpt in ckpts:
            model = HyperNet(HyperNetConfig(**{**vars(self.cfg1), "grad_checkpointing": ckpt}), self.vocab)
            model.load_state_dict(self.s1.state_dict())
            model.to(self.device).train()
            if compiled:
                torch._dynamo.reset()
                compile_blocks(model, mode, edges)
            step = self.train_step_fn(model, Stage1LossConfig(compile=compiled, fused=fused if compiled else False),
                                      graphs=mode == "reduce-overhead")
            key = "ckpt" if ckpt else "no_ckpt"
            self.reset_peak()
            first = first_call_s(step, self.device)
            t = timeit(step, self.device, self.warmup, self.train_repeats)
            passes = 4 if ckpt else 3  # forward, 2x backward (+ recompute)
            res[key] = {**t, "first_call_s": first, **self.peak(),
                        "tflops": self.tflops(passes * self.flops["stage1_fwd"], t["median_ms"])}
            if profile:
                res[key]["profile"] = kernel_profile(step)
            del model, step
        return res

    def embedded(self, b1: HyperNet, b2: HyperNet) -> tuple[EmbeddedGroup, EmbeddedGroup]:
        """Each model's prompt-independent part (``HyperNet.embed``), without W (as the Predictor keeps it)."""
        out = []
        for m in (b1, b2):
            with torch.inference_mode():
                e = m.embed(self.group)
            meta = MatrixGroup(torch.empty(self.W.shape, device="meta"), self.group.matrix_ids, self.group.prompt_ids)
            out.append(EmbeddedGroup(meta, e.tokens, e.rms, e.model_id))
        return out[0], out[1]

    def offloaded(self, keep_w: bool) -> "contextlib.AbstractContextManager[None]":
        """The fp32 models (and W unless ``keep_w``) off the card: the peak is the predictor's own."""
        bench = self

        @contextlib.contextmanager
        def ctx():
            if bench.device.type != "cuda":
                yield
                return
            bench.s1.cpu(), bench.s2.cpu()
            for m in bench.bf16_models:  # the eager reference copies (the measured models are others)
                m.cpu()
            w = bench.W
            if not keep_w:
                bench.W = w.cpu()
                bench.group = MatrixGroup(bench.W, bench.group.matrix_ids, bench.group.prompt_ids)
                del w
            torch.cuda.empty_cache()
            try:
                yield
            finally:
                bench.s1.to(bench.device), bench.s2.to(bench.device)
                for m in bench.bf16_models:
                    m.to(bench.device)
                bench.W = bench.W.to(bench.device)
                bench.group = MatrixGroup(bench.W, bench.group.matrix_ids, bench.group.prompt_ids)
        return ctx()

    def measure_predict(self, b1: HyperNet, b2: HyperNet, cached: bool, profile: bool = False,
                        ref: torch.Tensor | None = None, graphs: bool = False) -> dict[str, object]:
        """Time and peak memory of stage I + stage II; with ``cached`` W is embedded first and
        then leaves the card (the Predictor's serving path: only the tokens stay)."""
        g1, g2 = self.embedded(b1, b2) if cached else (self.group, self.group)

        def run():
            if graphs:  # CUDA graph trees: a new step, the previous outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return self.predict(b1, b2, g1, g2, self.text, self.mask)
        return self.time_prediction(lambda: run, cached, profile, ref)

    def time_prediction(self, make_run: Callable[[], Callable[[], HyperOutput]], cached: bool,
                        profile: bool = False, ref: torch.Tensor | None = None,
                        latency: bool = False) -> dict[str, object]:
        """Run ``make_run()`` (a compile, a capture: in ``first_call_s``) and time what it returns, with
        W off the card when ``cached``; peak memory, dW error against ``ref`` (default eager bf16).
        With ``latency`` also single calls after idle and the card's clock and power back to back."""
        with self.offloaded(keep_w=not cached):
            self.reset_peak()
            static = torch.cuda.memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else 0.0
            t0 = time.perf_counter()
            run = make_run()
            first = first_call_s(run, self.device) + time.perf_counter() - t0
            t = timeit(run, self.device, self.warmup, self.repeats)
            res = {**t, "first_call_s": first, **self.peak(), "static_gib": static}
            if latency and self.device.type == "cuda":
                res["after_idle"] = latency_after_idle(run, self.repeats)
                res["gpu_back_to_back"] = gpu_state(run)
                res["gpu_back_to_back"]["median_ms"] = timeit(run, self.device, 0, self.repeats)["median_ms"]
            out = run()  # errors after the peak: dW of 240 matrices is 1 GiB per copy
            res["dW_err_vs_eager_bf16"] = rel_err(out.delta(), self.bf16_delta() if ref is None else ref)
            del out
            if profile:
                res["profile"] = kernel_profile(run)
        flops = self.flops["predict"] - (self.flops["cacheable"] if cached else 0.0)
        res["tflops"] = self.tflops(flops, t["median_ms"])
        return res

    def run_compiled_predict(self, mode: str | None = None, cached: bool = False,
                             profile: bool = False) -> dict[str, object]:
        """Compiled trunk blocks; ``cached``: the prompt-independent part computed once (``HyperNet.embed``)."""
        torch._dynamo.reset()
        b1, b2 = (compile_blocks(copy.deepcopy(m), mode) for m in self.bf16_models)
        return self.measure_predict(b1, b2, cached, profile, graphs=mode == "reduce-overhead")

    def run_graph_predict(self, compiled: bool = True, profile: bool = False,
                          latency: bool = False) -> dict[str, object]:
        """The Predictor's GPU path: W embedded once, then stage I + II replayed from one CUDA graph
        (``PredictionGraph``)."""
        torch._dynamo.reset()
        b1, b2 = (copy.deepcopy(m) for m in self.bf16_models)
        if compiled:
            b1, b2 = compile_blocks(b1), compile_blocks(b2)
        e1, e2 = self.embedded(b1, b2)

        def make_run() -> Callable[[], HyperOutput]:
            graph = PredictionGraph(b1, b2, [e1], [e2], self.text_len)
            return lambda: graph(self.text)[0]
        return self.time_prediction(make_run, cached=True, profile=profile, latency=latency)

    def run_predictor(self) -> dict[str, object]:
        """The user's API: ``Predictor(dtype="bfloat16", compile=True).predict(prompt)`` (on CPU not
        compiled, no graph) with a base DiT of the vocabulary's shape (diffsynth's WanModel, random
        weights) and a text encoder that gives the bench's text for any prompt (umT5-XXL has no weights
        here; the bench times the hypernetworks). One call: the prompt's encoding, stage I + II
        replayed from the Predictor's CUDA graph, the factors as fp32 on the card. The peak leaves out
        the DiT's weights, which the Predictor keeps only to generate videos."""
        from lofa.encoders.text import TextEmbedding
        from lofa.artifacts.base import BaseModel
        from lofa.serving.predict import Predictor
        from lofa.wan import WAN21_T2V_1_3B, WanDiTConfig, build_dit

        dev, (dim, ffn, layers) = self.device, TINY["dims"]
        cfg = WanDiTConfig(dim=dim, ffn_dim=ffn, num_heads=2, num_layers=layers,
                           text_dim=self.cfg1.text_dim) if self.args.tiny else WAN21_T2V_1_3B

        class BenchText:  # lofa.encoders.text.TextEncoder
            """The bench's text for any prompt; a prompt "<n> tokens" keeps only its first n valid."""
            dim = self.cfg1.text_dim

            def __init__(self, tokens: torch.Tensor):
                self.tokens = tokens.float()

            def encode(self, captions) -> TextEmbedding:
                n, length = len(captions), self.tokens.shape[1]
                first = [c.split()[0] for c in captions]
                valid = torch.tensor([int(f) if f.isdigit() else length for f in first], device=self.tokens.device)
                mask = torch.arange(length, device=self.tokens.device)[None] < valid[:, None]
                return TextEmbedding(self.tokens.expand(n, -1, -1) * mask[..., None], mask)

        with self.offloaded(keep_w=False):
            dit = build_dit(cfg, device=dev, dtype=torch.bfloat16).eval().requires_grad_(False)
            dit_gib = sum(p.numel() * p.element_size() for p in dit.parameters()) / 2 ** 30
            t0 = time.perf_counter()
            predictor = Predictor(BaseModel(dit, cfg, "bench", Path(".")), copy.deepcopy(self.s2),
                                  copy.deepcopy(self.s1), BenchText(self.text), dtype="bfloat16",
                                  compile=dev.type == "cuda")
            build = time.perf_counter() - t0
            self.reset_peak()
            run = lambda: predictor.predict("a small red figure waves")  # noqa: E731
            first = first_call_s(run, dev)
            res = {**timeit(run, dev, self.warmup, self.repeats), "construct_s": build, "first_call_s": first,
                   "dit_gib": dit_gib}
            if dev.type == "cuda":
                res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30 - dit_gib
                res["after_idle"] = latency_after_idle(run, self.repeats)
                res["profile"] = kernel_profile(run)
            pred = run()
            res["factors"] = {"dtype": str(pred.A[0].dtype), "matrices": len(pred.A), "device": str(pred.A[0].device)}
            # prompts of other lengths: padded to their bucket (lofa.serving.predict.text_bucket), one graph per bucket
            length = self.text.shape[1]
            for name, sizes in (("short_prompts", (max(1, length // 25), length // 14 + 1, length // 10 + 2)),
                                ("long_prompts", (length * 3 // 5, length * 4 // 5, length - 12))):
                prompts = [f"{k} tokens" for k in sizes]
                first_call_s(lambda: [predictor.predict(q) for q in prompts], dev)
                cycle = iter(prompts * (self.warmup + self.repeats))
                res[name] = {**timeit(lambda: predictor.predict(next(cycle)), dev, self.warmup, self.repeats),
                             "text_tokens": list(sizes)}
            res["graphs"] = [list(k) for k in predictor._graphs]
            del predictor, dit, pred
        res["tflops"] = self.tflops(self.flops["predict"] - self.flops["cacheable"], res["median_ms"])
        return res

    def loss_check(self) -> dict[str, object]:
        """The fused stage-I loss (Triton) against the compiled torch loss at full shapes, bf16 autocast:
        time of forward + backward, and the differences in loss, counts and gradients."""
        from lofa.objectives import _compiled_stage1_terms, _stage1_terms
        from lofa.kernels.stage1_kernel import stage1_terms

        n, (o, i), r = len(self.vocab), self.W.shape[1:], self.cfg1.rank
        g = torch.Generator(self.device).manual_seed(1)
        A = (torch.randn(n, r, i, device=self.device, generator=g) / i ** 0.5).requires_grad_()
        B = (torch.randn(n, o, r, device=self.device, generator=g) * 2e-3).requires_grad_()
        res: dict[str, object] = {}
        outs = {}
        for name, fn in (("torch_compiled", _compiled_stage1_terms()), ("fused", stage1_terms)):
            def step(fn=fn):
                A.grad = B.grad = None
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    bce, counts = fn(A, B, self.W, *self.lora, 0.02, 4.0, 1e-4, None)
                (bce / (n * o * i)).backward()
                return bce, counts
            res[f"{name}_ms"] = timeit(step, self.device, self.warmup, self.repeats)["median_ms"]
            bce, counts = step()
            outs[name] = (bce.item(), counts.tolist(), A.grad.clone(), B.grad.clone())
        A.grad = B.grad = None
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:  # the fp32 reference: the same factors, every product and the loss in fp32
            bce, counts = _stage1_terms(A, B, self.W, *self.lora, 0.02, 4.0, 1e-4, None)
            (bce / (n * o * i)).backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        ref = (bce.item(), counts.tolist(), A.grad.clone(), B.grad.clone())
        for name, (loss, counts, ga, gb) in outs.items():
            res[name] = {"bce_rel_diff_vs_fp32": abs(loss - ref[0]) / abs(ref[0]), "counts": counts,
                         "dA_rel_err_vs_fp32": rel_err(ga, ref[2]), "dB_rel_err_vs_fp32": rel_err(gb, ref[3])}
        res["fp32_counts"] = ref[1]
        return res

    def run_fp8(self) -> dict[str, object]:
        torch._dynamo.reset()
        b1, b2 = (compile_blocks(to_fp8(m)) for m in self.bf16_models)
        res = self.measure_predict(b1, b2, cached=True, profile=True)
        res["dW_err_vs_bf16"] = res.pop("dW_err_vs_eager_bf16")
        res["tflops_equiv"] = res.pop("tflops")
        return res

    def run_dit(self) -> dict[str, object]:
        from lofa.wan import WAN21_T2V_1_3B, build_dit

        dev = self.device
        dit = build_dit(WAN21_T2V_1_3B, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        s1 = self.bf16_models[0]
        model = HyperNet(self.cfg2, self.vocab)
        model.load_state_dict(self.s2.state_dict())
        model.to(dev).train()
        g = torch.Generator(dev).manual_seed(0)
        latents = torch.randn(1, 16, 5, 32, 32, device=dev, generator=g)
        batch = HyperBatch(self.text, self.mask, (LoraGroup(self.group, *self.lora),), latents,
                           torch.randn(latents.shape, device=dev, generator=g), torch.tensor([500.0], device=dev))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = stage2_loss(model, s1, batch, dit)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        first = first_call_s(step, dev)
        t = timeit(step, dev, 1, 5)
        return {**t, "first_call_s": first, "peak_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30,
                "clip": "17x256x256 (latent 16x5x32x32)"}

    def section(self, name: str, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        try:
            self.report["results"][name] = fn()
        except Exception as e:  # noqa: BLE001 - a failed section is reported, the others still run
            self.report["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.report.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 2)
        # what a section compiled or left in reference cycles must not count in the next one's memory
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.report.setdefault("allocated_after_gib", {})[name] = round(
                torch.cuda.memory_allocated(self.device) / 2 ** 30, 3)
        self.save()

    def save(self) -> None:
        out = os.environ.get("OUT") or self.args.out
        if out:
            path = Path(out) / "bench_hypernet.json" if os.environ.get("OUT") else Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.report, indent=2, default=str))


def table(report: dict[str, object]) -> str:
    r, lines = report["results"], [f"device: {report.get('device')}  torch {report.get('torch')}"]
    if "ceiling" in r:
        lines.append(f"bf16 matmul ceiling: {r['ceiling']['tflops']:.0f} TFLOP/s")
    tr = lambda k, c: (r.get(k) or {}).get(c)  # noqa: E731
    rows = [("predict eager bf16", r.get("predict")), ("predict compiled", r.get("compiled_predict")),
            ("predict compiled cached", r.get("compiled_predict_cached")),
            ("predict cached cudagraphs", r.get("graphs_predict_cached")),
            ("predict one graph", r.get("graph_predict")),
            ("Predictor.predict", r.get("predictor")),
            ("... attention not fused", r.get("graph_predict_sdpa")),
            ("... blocks not compiled", r.get("graph_predict_eager")),
            ("predict cached max-autotune", r.get("autotune_predict")),
            ("train1 max-autotune", tr("autotune_train1", "no_ckpt")), ("predict fp8 compiled", r.get("fp8")),
            ("train1 eager", tr("train1", "no_ckpt")), ("train1 eager ckpt", tr("train1", "ckpt")),
            ("train1 compiled", tr("train1_compiled", "no_ckpt")), ("train1 compiled ckpt", tr("train1_compiled", "ckpt")),
            ("train1 compiled torch loss", tr("train1_compiled_torch_loss", "no_ckpt")),
            ("train1 cudagraphs", tr("train1_graphs", "no_ckpt")),
            ("train1 compiled blocks only", tr("train1_compiled_blocks_only", "no_ckpt")),
            ("train2 + DiT", r.get("dit"))]
    lines.append(f"{'what':24s} {'ms':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'compile s':>9s}")
    for name, v in rows:
        if v:
            tf = v.get("tflops", v.get("tflops_equiv", float("nan")))
            lines.append(f"{name:24s} {v['median_ms']:9.2f} {tf:8.0f} {v.get('peak_gib', float('nan')):9.2f} "
                         f"{v.get('first_call_s', float('nan')):9.1f}")
            if "after_idle" in v:
                gs = v.get("gpu_back_to_back")
                state = (f"   (back to back: SM clock {gs.get('sm_clock_mhz_median')} MHz, "
                         f"{gs.get('power_w_median')} W of {gs.get('power_limit_w')})") if gs else ""
                lines.append(f"{'  ... one call after idle':24s} {v['after_idle']['median_ms']:9.2f}{state}")
    if "predict" in r:
        lines.append(f"bf16 vs fp32 rel. error: {r['predict']['vs_fp32']}")
    for k, v in r.items():
        if isinstance(v, dict) and any("err" in a for a in v):
            lines.append(f"{k}: {({a: b for a, b in v.items() if 'err' in a})}")
        for sub in (v.values() if isinstance(v, dict) else ()):
            prof = sub.get("profile") if isinstance(sub, dict) else None
            if prof:
                lines.append(f"{k} kernels: total {prof['total_ms']:.1f} ms {({a: round(b, 1) for a, b in prof['by_kind_ms'].items()})}")
        if isinstance(v, dict) and "profile" in v:
            p = v["profile"]
            lines.append(f"{k} kernels: total {p['total_ms']:.1f} ms {({a: round(b, 1) for a, b in p['by_kind_ms'].items()})}"
                         f"; timeline {p.get('span_ms')} ms, idle {p.get('idle_ms')} ms, {p.get('kernels')} kernels")
    if report["errors"]:
        lines.append(f"errors: {report['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (a smoke run)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--only", default="", help="comma-separated sections to run (the rest skipped)")
    ap.add_argument("--dit", action="store_true", help="also the stage-II step with the 1.3B DiT")
    ap.add_argument("--autotune", action="store_true", help="also predict with max-autotune (minutes of compile)")
    ap.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the compiled stage-I step with gradient checkpointing")
    ap.add_argument("--out", default="", help="JSON path when OUT is not set")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (int / float / bool values), e.g. coordinate_descent_tuning=1")
    args = ap.parse_args(argv)
    for item in args.inductor:
        key, _, value = item.partition("=")
        import torch._inductor.config as inductor_config
        old = getattr(inductor_config, key)  # an unknown key raises here
        setattr(inductor_config, key, type(old)(float(value)) if not isinstance(old, bool) else value.lower() in ("1", "true"))
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_hypernet: no CUDA device; use --tiny for the CPU smoke run")
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    b = Bench(args)
    b.report.update(device=torch.cuda.get_device_name() if not args.tiny else "cpu", torch=torch.__version__,
                    inductor=args.inductor)
    skip, only = (set(filter(None, a.split(","))) for a in (args.skip, args.only))
    gpu = not args.tiny
    b.setup()
    plan = [("ceiling", lambda: matmul_ceiling(b.device, 8192 if gpu else 256), True),
            ("predict", b.run_predict, True),
            ("train1", lambda: b.run_train(False), True),
            ("compiled_predict", lambda: b.run_compiled_predict(profile=True), gpu),
            ("compiled_predict_cached", lambda: b.run_compiled_predict(cached=True, profile=True), gpu),
            ("graphs_predict_cached", lambda: b.run_compiled_predict("reduce-overhead", cached=True), gpu),
            ("graph_predict", lambda: b.run_graph_predict(profile=True, latency=True), gpu),
            ("predictor", b.run_predictor, True),
            ("graph_predict_sdpa", lambda: attention_off(lambda: b.run_graph_predict(profile=True)), gpu),
            ("graph_predict_eager", lambda: b.run_graph_predict(compiled=False), gpu),
            ("loss_check", b.loss_check, gpu),
            ("train1_compiled", lambda: b.run_train(True, (False, True) if args.ckpt else (False,), profile=True), gpu),
            ("train1_compiled_torch_loss", lambda: b.run_train(True, (False,), fused=False), gpu),
            ("train1_graphs", lambda: b.run_train(True, (False,), profile=True, mode="reduce-overhead"), gpu),
            ("train1_compiled_blocks_only", lambda: b.run_train(True, (False,), edges=False), gpu),
            ("dit", b.run_dit, gpu and args.dit), ("fp8", b.run_fp8, gpu),
            ("autotune_predict", lambda: b.run_compiled_predict("max-autotune-no-cudagraphs", cached=True,
                                                                profile=True), gpu and args.autotune),
            ("autotune_train1", lambda: b.run_train(True, (False,), profile=True, mode="max-autotune-no-cudagraphs"),
             gpu and args.autotune)]
    # these sections compare against the eager bf16 prediction ("predict" keeps its models and output)
    if only & {"compiled_predict", "compiled_predict_cached", "graphs_predict_cached", "graph_predict",
               "graph_predict_sdpa", "graph_predict_eager", "fp8", "dit", "autotune_predict"}:
        only.add("predict")
    for name, fn, enabled in plan:
        if enabled and name not in skip and (not only or name in only):
            b.section(name, fn)
    print(json.dumps(b.report, indent=1, default=str))
    print(table(b.report))
    return b.report


if __name__ == "__main__":
    main()
