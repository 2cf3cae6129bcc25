"""lofa.kernels.attention's kernel against cuDNN's SDPA at the Wan2.1-1.3B prediction shapes (CUDA, bf16).

Self-attention: 240 matrices x 12 heads x 257 tokens x 64, q / k / v strided in one qkv product's
output. Cross-attention: one prompt, the 240 x 257 queries as one sequence against 512 text keys.
The q norm runs in the kernel; the torch norms (``F.rms_norm`` compiled: one pass each, as
inductor writes them in the hypernetwork) are timed apart, and each path's total is reported
(before: q and k norms + SDPA; the general kernel: the k norm + the kernel; now, for the
self-attention: the short-sequence kernel with both norms inside). The general kernel's other
variants: without the tails (257 tokens as 5 x 5 tiles, not 5 x 4 plus a key on vectors) and at
256 tokens. Prints JSON.

    python benchmarks/bench_attention.py
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lofa.kernels import attention


def timed(fn: Callable[[], object], repeats: int = 50) -> float:
    """Mean ms of ``fn`` over ``repeats`` calls after warm-up (CUDA events)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    stop.synchronize()
    return round(start.elapsed_time(stop) / repeats, 4)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((x.double() - ref.double()).norm() / ref.double().norm()).item(), 5)


def main() -> dict[str, object]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention: needs CUDA")
    torch.manual_seed(0)
    dev, bf = torch.device("cuda"), torch.bfloat16
    n, s, h, hd, text = 240, 257, 12, 64, 512
    d = h * hd
    qg, kg = (torch.rand(hd, device=dev) + 0.5).to(bf), (torch.rand(hd, device=dev) + 0.5).to(bf)
    norm = torch.compile(lambda t, g: F.rms_norm(t, (hd,), g, 1e-6), dynamic=False)
    res: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    # self-attention
    qkv = torch.randn(n, s, 3 * d, device=dev, dtype=bf)
    q, k, v = (t.view(n, s, h, hd) for t in qkv.chunk(3, dim=-1))
    kn = norm(k, kg)  # (n, s, h, hd), as SelfAttention normalises k before the kernel
    qn = norm(q, qg)
    qt, knt, vt, qnt = (t.transpose(1, 2) for t in (q, kn, v, qn))
    ref = attention.reference(qt.double(), knt.double(), vt.double(), None, qg.double(), 1e-6).transpose(1, 2)
    out = torch.empty(n, s, h, hd, device=dev, dtype=bf)
    sdpa = F.scaled_dot_product_attention(qnt, knt, vt).transpose(1, 2)
    self_res = {
        "q_norm_compiled": timed(lambda: norm(q, qg)),
        "k_norm_compiled": timed(lambda: norm(k, kg)),
        "sdpa": timed(lambda: F.scaled_dot_product_attention(qnt, knt, vt)),
        "sdpa_256_tokens": timed(lambda: F.scaled_dot_product_attention(qnt[:, :, 1:], knt[:, :, 1:], vt[:, :, 1:])),
        "kernel": timed(lambda: attention.launch(qt, knt, vt, None, qg, 1e-6, out.transpose(1, 2))),
        "kernel_no_tails": timed(lambda: attention.launch(qt, knt, vt, None, qg, 1e-6, out.transpose(1, 2),
                                                          tails=False)),
        "kernel_256_tokens": timed(lambda: attention.launch(qt[:, :, 1:], knt[:, :, 1:], vt[:, :, 1:], None, qg,
                                                            1e-6, out[:, 1:].transpose(1, 2))),
        "short_kernel": timed(lambda: attention.launch_short(qt, k.transpose(1, 2), vt, qg, kg, 1e-6,
                                                            out.transpose(1, 2))),
        "short_kernel_256_tokens": timed(lambda: attention.launch_short(
            qt[:, :, 1:], k.transpose(1, 2)[:, :, 1:], vt[:, :, 1:], qg, kg, 1e-6, out[:, 1:].transpose(1, 2))),
        "sdpa_err": rel(sdpa, ref),
    }
    attention.launch(qt, knt, vt, None, qg, 1e-6, out.transpose(1, 2))
    self_res["kernel_err"] = rel(out, ref)
    attention.launch_short(qt, k.transpose(1, 2), vt, qg, kg, 1e-6, out.transpose(1, 2))
    self_res["short_kernel_err"] = rel(out, ref)
    self_res["path_before_ms"] = round(self_res["q_norm_compiled"] + self_res["k_norm_compiled"] + self_res["sdpa"], 4)
    self_res["path_general_kernel_ms"] = round(self_res["k_norm_compiled"] + self_res["kernel"], 4)
    self_res["path_now_ms"] = self_res["short_kernel"]
    res["self_attention"] = self_res

    # cross-attention: one prompt's keys shared by all 240 x 257 queries
    qc = torch.randn(1, n * s, h, hd, device=dev, dtype=bf)
    kv = torch.randn(1, text, 2 * d, device=dev, dtype=bf)
    kc, vc = (t.view(1, text, h, hd) for t in kv.chunk(2, dim=-1))
    kc = norm(kc, kg)
    qct, kct, vct = (t.transpose(1, 2) for t in (qc, kc, vc))
    qcn = norm(qc, qg).transpose(1, 2)
    ref = attention.reference(qct.double(), kct.double(), vct.double(), None, qg.double(), 1e-6).transpose(1, 2)
    outc = torch.empty(1, n * s, h, hd, device=dev, dtype=bf)
    attention.launch(qct, kct, vct, None, qg, 1e-6, outc.transpose(1, 2))
    cross = {
        "q_norm_compiled": timed(lambda: norm(qc, qg)),
        "sdpa": timed(lambda: F.scaled_dot_product_attention(qcn, kct, vct)),
        "kernel": timed(lambda: attention.launch(qct, kct, vct, None, qg, 1e-6, outc.transpose(1, 2))),
        "kernel_err": rel(outc, ref),
        "sdpa_err": rel(F.scaled_dot_product_attention(qcn, kct, vct).transpose(1, 2), ref),
    }
    cross["path_before_ms"] = round(cross["q_norm_compiled"] + cross["sdpa"], 4)
    cross["path_now_ms"] = cross["kernel"]
    res["cross_attention"] = cross
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
