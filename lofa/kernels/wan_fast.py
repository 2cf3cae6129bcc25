"""A fused Wan DiT block: diffsynth's ``DiTBlock`` math with the batched per-sample LoRA.

:func:`lofa.wan.dit_forward` runs either diffsynth's own block modules (with
:class:`lofa.lora.LoRALinear` wrappers) or this functional version of the same
block, which reads the block's parameters and takes the LoRA tensors as
arguments. Same function (tests pin it to ``model_fn_wan_video`` within
rounding), fewer memory passes:

- RoPE rotates in float32 (diffsynth upcasts to complex128);
- q, k, v are one matmul (weights side by side), their LoRA down-projections one
  matmul, the LoRA up-projection one block-diagonal matmul accumulated in place
  into the base output (no separate delta tensor, no extra add);
- modulation and gated residuals are single ``addcmul`` kernels.

``compiled`` runs the same function through ``torch.compile`` (one graph per
block, shared by all blocks; sequence length and batch are dynamic, so one
graph serves every K > 1 and resolution and one more K = 1), which fuses the
norms, RoPE, LoRA adds and residuals into few kernels. It is used where
gradients flow into the block input (every block but the first during
training); elsewhere the eager version runs. The attention kernel is fixed
when a graph is traced (under the sdpa_kernel settings of that moment).

Measured (H200, torch 2.11, Wan2.1-1.3B, rank 32, benchmarks/bench_fit.py): the
eager fused block runs at the speed of diffsynth's modules (self-attention and
the matmuls dominate); compiled, a fitting step is 11% faster at 33x320x512
(K=6), 5% at 81x480x832 (K=1), 15% at 17x256x256 (K=24); compiling took 24 s
(K > 1) and about 14 s (K = 1), once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lofa.kernels import flash
from lofa.lora import LoRAWeights

BlockImpl = Literal["diffsynth", "fused", "compiled"]
BLOCK_IMPLS: tuple[str, ...] = ("diffsynth", "fused", "compiled")
#: The block's linears, in diffsynth's module names (the vocabulary's).
_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
            "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
_NORMS = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k")
LoRAPair = tuple[torch.Tensor, torch.Tensor]  # A (K, r, in), B (K, out, r)


def block_params(block: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of one diffsynth ``DiTBlock`` the fused block reads (no copies)."""
    if getattr(block.cross_attn, "has_image_input", False):
        raise ValueError("fused Wan block: image-input (I2V) blocks are not supported; use block_impl='diffsynth'")
    p: dict[str, torch.Tensor] = {"modulation": block.modulation,
                                  "norm3.weight": block.norm3.weight, "norm3.bias": block.norm3.bias}
    for name in _LINEARS:
        mod = block.get_submodule(name)
        if getattr(mod, "adapter", None) is not None:
            raise ValueError(f"fused Wan block: {name} has a LoRA bound by apply_lora, which the fused block "
                             "does not read; pass the LoRA to dit_forward(lora=...) instead")
        p[f"{name}.weight"], p[f"{name}.bias"] = mod.weight, mod.bias
    for name in _NORMS:
        p[f"{name}.weight"] = block.get_submodule(name).weight
    return p


def block_loras(lora: LoRAWeights, num_blocks: int) -> list[dict[str, LoRAPair]]:
    """Per block ``{module: (A (K, r, in), B (K, out, r))}`` of a LoRA set."""
    per: list[dict[str, LoRAPair]] = [{} for _ in range(num_blocks)]
    for m, a, b in zip(lora.vocab, lora.A, lora.B):
        if m.module not in _LINEARS or m.block >= num_blocks:
            raise ValueError(f"fused Wan block: cannot adapt {m.prefix}; valid modules: {list(_LINEARS)}, "
                             f"blocks 0..{num_blocks - 1}")
        per[m.block][m.module] = (a, b)
    return per


def _lora_down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(N, S, in) x (K, r, in) -> (N, S, r); K == N or K == 1."""
    if A.shape[0] == 1:
        return x @ A[0].T
    if A.shape[0] != x.shape[0]:
        raise ValueError(f"fused Wan block: {A.shape[0]} LoRAs for a batch of {x.shape[0]} "
                         "(need K == batch or K == 1)")
    return torch.bmm(x, A.transpose(1, 2))


def _up_matrix(names: Sequence[str], lora: Mapping[str, LoRAPair], p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The LoRA up-projections of the side-by-side linears ``names`` as one block-diagonal
    (K, sum out_i, n_adapted r) matrix (zero rows for non-adapted linears)."""
    adapted = [n for n in names if n in lora]
    ref = lora[adapted[0]][1]
    k, r = ref.shape[0], ref.shape[2]
    rows = []
    for n in names:
        out = p[f"{n}.weight"].shape[0]
        cols = [lora[n][1] if m == n else ref.new_zeros(k, out, r) for m in adapted]
        rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def project(x: torch.Tensor, p: Mapping[str, torch.Tensor], names: Sequence[str], lora: Mapping[str, LoRAPair],
            scale: float | torch.Tensor) -> torch.Tensor:
    """The linears ``names`` side by side on ``x`` (N, S, in) -> (N, S, sum out), each plus its LoRA
    ``scale_k (x A_k^T) B_k^T``. Eager: the LoRA up-projection accumulates in place into the base
    output; compiled: out of place, so the compiler can fuse the add into the next kernel."""
    w = p[f"{names[0]}.weight"] if len(names) == 1 else torch.cat([p[f"{n}.weight"] for n in names])
    b = p[f"{names[0]}.bias"] if len(names) == 1 else torch.cat([p[f"{n}.bias"] for n in names])
    y = F.linear(x, w, b)
    adapted = [n for n in names if n in lora]
    if not adapted:
        return y
    dtype = y.dtype
    A = torch.cat([lora[n][0] for n in adapted], dim=1).to(dtype)  # (K, n_adapted r, in)
    Bt = _up_matrix(names, lora, p).to(dtype).transpose(1, 2)  # (K, n_adapted r, out)
    h = _lora_down(x.to(dtype), A)
    if isinstance(scale, torch.Tensor):
        h = h * scale.to(dtype).view(-1, *([1] * (h.ndim - 1)))
        alpha = 1.0
    else:
        alpha = float(scale)
    if torch.compiler.is_compiling():
        up = h @ Bt[0] if Bt.shape[0] == 1 else torch.bmm(h, Bt)
        return y + up * alpha if alpha != 1.0 else y + up
    if Bt.shape[0] == 1:
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), Bt[0], alpha=alpha)
    else:
        y.baddbmm_(h, Bt, alpha=alpha)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffsynth's ``RMSNorm`` (``F.rms_norm`` where the dtypes agree, else its float32 upcast)."""
    if x.dtype == weight.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """diffsynth's ``rope_apply`` in float32: x (N, S, dim); cos, sin (S, 1, head_dim / 2)."""
    n, s, _ = x.shape
    xf = x.float().reshape(n, s, num_heads, -1, 2)
    if torch.compiler.is_compiling():  # real arithmetic: one fused kernel
        x0, x1 = xf.unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    else:  # complex64: one multiply kernel
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin))
    return out.flatten(2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """diffsynth's ``flash_attention``: (N, S, dim) x3 -> (N, S, dim), through FlashAttention 4 or
    SDPA as :mod:`lofa.kernels.flash`'s switch says."""
    n, s, d = q.shape
    if flash.wants_fa4(q, d // num_heads):
        return flash.attention(q, k, v, num_heads)  # v comes as a column slice of the fused projection: made dense for the kernels
    heads = [t.contiguous().unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(n, s, d)


def block_forward(p: Mapping[str, torch.Tensor], x: torch.Tensor, context: torch.Tensor, t_mod: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, lora: Mapping[str, LoRAPair],
                  scale: float | torch.Tensor, num_heads: int, eps: float) -> torch.Tensor:
    """One DiT block (diffsynth ``DiTBlock.forward``, text-to-video) with per-sample LoRAs.

    Args:
        p: :func:`block_params`; x: (N, S, dim); context: (N, L, dim) embedded text;
        t_mod: (N | 1, 6, dim); cos, sin: (S, 1, head_dim / 2) float32 RoPE tables;
        lora: :func:`block_loras` (K == N or K == 1); scale: float or (K,).
    Returns:
        (N, S, dim).
    """
    dim = x.shape[-1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        p["modulation"].to(t_mod.dtype) + t_mod).chunk(6, dim=1)
    h = torch.addcmul(shift_msa, F.layer_norm(x, (dim,), eps=eps), 1 + scale_msa)
    q, k, v = project(h, p, ("self_attn.q", "self_attn.k", "self_attn.v"), lora, scale).split(dim, dim=-1)
    q = rope(rms_norm(q, p["self_attn.norm_q.weight"], eps), cos, sin, num_heads)
    k = rope(rms_norm(k, p["self_attn.norm_k.weight"], eps), cos, sin, num_heads)
    y = project(attention(q, k, v, num_heads), p, ("self_attn.o",), lora, scale)
    x = torch.addcmul(x, gate_msa, y)

    h = F.layer_norm(x, (dim,), p["norm3.weight"], p["norm3.bias"], eps)
    q = rms_norm(project(h, p, ("cross_attn.q",), lora, scale), p["cross_attn.norm_q.weight"], eps)
    k, v = project(context, p, ("cross_attn.k", "cross_attn.v"), lora, scale).split(dim, dim=-1)
    k = rms_norm(k, p["cross_attn.norm_k.weight"], eps)
    x = x + project(attention(q, k, v, num_heads), p, ("cross_attn.o",), lora, scale)

    h = torch.addcmul(shift_mlp, F.layer_norm(x, (dim,), eps=eps), 1 + scale_mlp)
    h = F.gelu(project(h, p, ("ffn.0",), lora, scale), approximate="tanh")
    return torch.addcmul(x, gate_mlp, project(h, p, ("ffn.2",), lora, scale))


@functools.cache
def compiled_block_forward():
    """:func:`block_forward` through ``torch.compile`` (built on first use)."""
    return torch.compile(block_forward, fullgraph=True)


def mark_dynamic(*tensors: torch.Tensor, dims: Sequence[int] = (0,)) -> None:
    """Hint the compiler that ``dims`` of ``tensors`` vary between calls (batch, sequence), so one
    graph serves every clip count and resolution; sizes 0 and 1 stay specialised."""
    for t in tensors:
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)


def _run_block(dit: nn.Module, index: int, lora: dict, scale: float | torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], compiled: bool, x: torch.Tensor,
               context: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
    """Block ``index`` through the fused block (compiled where gradients reach its input)."""
    block = dit.blocks[index]
    fn = block_forward
    if compiled and torch.is_grad_enabled() and x.requires_grad:
        fn = compiled_block_forward()
        mark_dynamic(x, dims=(0, 1))
        mark_dynamic(context, t_mod, *rope, *(t for pair in lora.values() for t in pair))
    return fn(block_params(block), x, context, t_mod, *rope, lora, scale, block.num_heads, block.norm1.eps)


def block_runners(dit: nn.Module, lora: LoRAWeights | None, freqs: torch.Tensor,
                  compiled_from: int | None = None) -> list[functools.partial]:
    """One callable ``(x, context, t_mod)`` per block of ``dit`` through the fused block, with
    ``lora`` (or none) and the RoPE ``freqs`` (complex, (f*h*w, 1, head_dim / 2)); blocks from
    index ``compiled_from`` on run compiled where gradients reach them (None: all eager)."""
    n = len(dit.blocks)
    rope = (freqs.real.float().contiguous(), freqs.imag.float().contiguous())
    loras = block_loras(lora, n) if lora is not None else [{} for _ in range(n)]
    scale = lora.scale if lora is not None else 1.0
    return [functools.partial(_run_block, dit, i, loras[i], scale, rope,
                              compiled_from is not None and i >= compiled_from) for i in range(n)]
