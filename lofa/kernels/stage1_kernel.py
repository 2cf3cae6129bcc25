"""The stage-I loss of a group of matrices as one Triton kernel (CUDA).

``objectives._stage1_terms`` materialises, per matrix, the predicted dW = B A, the
fitted dW of the target, the target map, the logit and the BCE, and autograd keeps
several of them for the backward: at the Wan2.1-1.3B shapes (240 matrices of
1536 x 1536) its forward + backward take 8.6 ms on an H100, almost all of it memory
traffic. Here one kernel reads W and the four low-rank factors a tile at a time,
forms both products in registers (rank-32 matmuls), and writes only the gradient of
the loss with respect to dW (bf16); the backward is then two batched matmuls,
dA = B^T G and dB = G A^T (4.4 ms in all, the kernel 3.3). Logs, exponentials and
reciprocals use the GPU's special-function unit; BCE and the map counts (true /
predicted / actual positives) are summed per row block, then over blocks in a fixed
order.

The math is ``_stage1_terms``'s: target = |B_fit A_fit| > tau |W| (fp32 products),
logit = s (log(|dW| + eps ref) - log(ref) - log1p(eps)) with ref = tau |W| + tiny,
BCE with logits (``pos_weight`` on positives). dW is accumulated in fp32 from the
factors in the compute dtype (the autocast dtype, as ``torch.bmm`` would read them).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

_TINY = torch.finfo(torch.float32).tiny


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run for tensors on ``device``."""
    return triton is not None and device.type == "cuda"


if triton is not None:
    LN2: tl.constexpr = tl.constexpr(math.log(2.0))
    LOG2E: tl.constexpr = tl.constexpr(1.0 / math.log(2.0))

    @triton.jit
    def _log2(x, FAST: tl.constexpr):
        """log2 by the GPU's special-function unit (rel. error ~2^-22) or, interpreted, exactly."""
        if FAST:
            return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.log2(x)

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("ex2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _rcp(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("rcp.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _stage1_kernel(A, B, W, FA, FB, G, partial, out_f, in_f, r, rf,
                       sa_n, sa_r, sa_i, sb_n, sb_o, sb_r, sw_n, sw_o, sw_i,
                       sfa_n, sfa_r, sfa_i, sfb_n, sfb_o, sfb_r,
                       tau, scale, eps, log1p_eps, pos_weight, tiny,
                       BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, RF: tl.constexpr,
                       LOW: tl.constexpr, EVEN: tl.constexpr, FAST: tl.constexpr):
        # one program: a block of BM rows of one matrix, walking its columns BN at a time.
        # EVEN: the blocks tile the matrix and the ranks are R / RF exactly, so nothing is masked.
        pm, n = tl.program_id(0), tl.program_id(1)
        rows = pm * BM + tl.arange(0, BM)
        rmask = rows < out_f
        k, kf = tl.arange(0, R), tl.arange(0, RF)
        b_ptr = B + n * sb_n + rows[:, None] * sb_o + k[None, :] * sb_r
        fb_ptr = FB + n * sfb_n + rows[:, None] * sfb_o + kf[None, :] * sfb_r
        if EVEN:
            b = tl.load(b_ptr)
            fb = tl.load(fb_ptr).to(tl.float32)
        else:
            b = tl.load(b_ptr, mask=rmask[:, None] & (k[None, :] < r), other=0.0)
            fb = tl.load(fb_ptr, mask=rmask[:, None] & (kf[None, :] < rf), other=0.0).to(tl.float32)
        # sums kept per element and reduced once at the end; the three counts share one int32
        # (pred + 2^10 target + 2^20 both: at most in_f / BN <= 1023 columns blocks per element)
        acc_loss = tl.zeros((BM, BN), dtype=tl.float32)
        acc_cnt = tl.zeros((BM, BN), dtype=tl.int32)
        for c0 in range(0, in_f, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < in_f
            valid = rmask[:, None] & cmask[None, :]
            a_ptr = A + n * sa_n + k[:, None] * sa_r + cols[None, :] * sa_i
            fa_ptr = FA + n * sfa_n + kf[:, None] * sfa_r + cols[None, :] * sfa_i
            w_ptr = W + n * sw_n + rows[:, None] * sw_o + cols[None, :] * sw_i
            if EVEN:
                a = tl.load(a_ptr)
                fa = tl.load(fa_ptr).to(tl.float32)
                w = tl.abs(tl.load(w_ptr).to(tl.float32))
            else:
                a = tl.load(a_ptr, mask=(k[:, None] < r) & cmask[None, :], other=0.0)
                fa = tl.load(fa_ptr, mask=(kf[:, None] < rf) & cmask[None, :], other=0.0).to(tl.float32)
                w = tl.abs(tl.load(w_ptr, mask=valid, other=0.0).to(tl.float32))
            if LOW:  # bf16 / fp16 factors, fp32 accumulation
                dw = tl.dot(b, a)
            else:
                dw = tl.dot(b, a, input_precision="ieee")
            dwf = tl.dot(fb, fa, input_precision="tf32x3")  # fp32-accurate on tensor cores (ieee is ~10x slower)
            target = tl.abs(dwf) > tau * w
            ref = tau * w + tiny
            mag = tl.abs(dw) + eps * ref
            x = (scale * LN2) * _log2(mag * _rcp(ref, FAST), FAST) - scale * log1p_eps
            e = _exp2(tl.abs(x) * -LOG2E, FAST)
            inv = _rcp(1.0 + e, FAST)
            sp = LN2 * _log2(1.0 + e, FAST)  # softplus(x) = max(x, 0) + sp
            pred = x > 0
            spx = tl.where(pred, x, 0.0) + sp  # softplus(x); softplus(-x) = softplus(x) - x
            loss = tl.where(target, pos_weight * (spx - x), spx)
            sig = tl.where(pred, inv, e * inv)  # sigmoid(x) (both branches are 1/2 at x = 0)
            dx = tl.where(target, -pos_weight * (1.0 - sig), sig)
            g = dx * scale * _rcp(mag, FAST)
            g = tl.where(dw > 0, g, tl.where(dw < 0, -g, 0.0))  # d|dW| / ddW = sign(dW), 0 at 0
            g_ptr = G + n * out_f * in_f + rows[:, None] * in_f + cols[None, :]
            resp = tl.abs(dw) > tau * w  # the predicted map: lofa.lora.delta_response_map, not x > 0
            cnt = resp.to(tl.int32) + target.to(tl.int32) * 1024 + (resp & target).to(tl.int32) * 1048576
            if EVEN:
                tl.store(g_ptr, g.to(G.dtype.element_ty))
                acc_loss += loss
                acc_cnt += cnt
            else:
                tl.store(g_ptr, g.to(G.dtype.element_ty), mask=valid)
                acc_loss += tl.where(valid, loss, 0.0)
                acc_cnt += tl.where(valid, cnt, 0)
        tile = n * tl.num_programs(0) + pm
        tl.store(partial + tile * 4 + 0, tl.sum(tl.sum(acc_loss, axis=1), axis=0))
        tl.store(partial + tile * 4 + 1, tl.sum(tl.sum(acc_cnt >> 20, axis=1), axis=0).to(tl.float32))
        tl.store(partial + tile * 4 + 2, tl.sum(tl.sum(acc_cnt & 1023, axis=1), axis=0).to(tl.float32))
        tl.store(partial + tile * 4 + 3, tl.sum(tl.sum((acc_cnt >> 10) & 1023, axis=1), axis=0).to(tl.float32))


def _even(args: dict) -> bool:
    return (args["out_f"] % args["BM"] == 0 and args["in_f"] % args["BN"] == 0 and args["r"] == args["R"]
            and args["rf"] == args["RF"])


_FIXED: dict[str, int] = {}
if triton is not None:
    _stage1_kernel = triton.heuristics({"EVEN": _even})(_stage1_kernel)
if triton is not None and not os.environ.get("TRITON_INTERPRET"):  # the CPU interpreter cannot time configs
    _stage1_kernel = triton.autotune(
        configs=[triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
                 for bm, bn, w, st in ((32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3),
                                       (64, 128, 8, 3), (128, 64, 8, 2))],
        key=["out_f", "in_f", "r", "rf"], reset_to_zero=["partial"])(_stage1_kernel)
elif triton is not None:
    _FIXED = {"BM": 64, "BN": 64}


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


class _Stage1Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor, W: Tensor, FA: Tensor, FB: Tensor, tau: float, scale: float,
                eps: float, pos_weight: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        n, r, in_f = A.shape
        out_f, rf = B.shape[1], FB.shape[2]
        if triton.cdiv(in_f, 64) >= 1024:
            raise ValueError(f"the fused stage-I loss packs counts for at most 1023 column blocks; in = {in_f}")
        A_, B_ = A.to(dtype), B.to(dtype)
        # dL/ddW spans fp32's range (it is ~1 / |dW| near dW = 0): bf16 holds it, fp16 would overflow
        G = torch.empty(n, out_f, in_f, device=A.device, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        # one row of sums per row block of the smallest block size; larger blocks leave rows at zero
        partial = torch.zeros(triton.cdiv(out_f, 32) * n, 4, device=A.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(out_f, meta["BM"]), n)  # noqa: E731
        _stage1_kernel[grid](A_, B_, W, FA, FB, G, partial, out_f, in_f, r, rf,
                             *A_.stride(), *B_.stride(), *W.stride(), *FA.stride(), *FB.stride(),
                             tau, scale, eps, math.log1p(eps), pos_weight, _TINY,
                             R=_pow2(r), RF=_pow2(rf), LOW=dtype != torch.float32,
                             FAST=not os.environ.get("TRITON_INTERPRET"), **_FIXED)
        sums = partial.double().sum(0)
        ctx.save_for_backward(A_, B_, G)
        ctx.in_dtypes = (A.dtype, B.dtype)
        counts = sums[1:].float()
        ctx.mark_non_differentiable(counts)
        return sums[0].float(), counts

    @staticmethod
    def backward(ctx, grad_bce: Tensor, _grad_counts: Tensor):
        A_, B_, G = ctx.saved_tensors
        grad = grad_bce.float()  # applied to the small results, not to G
        dA = (torch.bmm(B_.to(G.dtype).transpose(1, 2), G).float() * grad).to(ctx.in_dtypes[0])
        dB = (torch.bmm(G, A_.to(G.dtype).transpose(1, 2)).float() * grad).to(ctx.in_dtypes[1])
        return dA, dB, None, None, None, None, None, None, None, None


def stage1_terms(A: Tensor, B: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, tau: float,
                 logit_scale: float, eps: float, pos_weight: float | None) -> tuple[Tensor, Tensor]:
    """BCE summed over the entries of one group, and its (3,) map counts; ``_stage1_terms``'s contract.

    Args:
        A: (n, r, in), B: (n, out, r) predicted factors; weight: (n, out, in) W;
        lora_A: (n, r_fit, in), lora_B: (n, out, r_fit) fitted factors.
    """
    if triton is None:
        raise RuntimeError("the fused stage-I loss needs triton (shipped with CUDA builds of torch)")
    dtype = (torch.get_autocast_dtype(A.device.type) if torch.is_autocast_enabled(A.device.type)
             else torch.promote_types(A.dtype, B.dtype))
    with torch.autocast(A.device.type, enabled=False):
        return _Stage1Loss.apply(A, B, weight, lora_A, lora_B, float(tau), float(logit_scale), float(eps),
                                 1.0 if pos_weight is None else float(pos_weight), dtype)
