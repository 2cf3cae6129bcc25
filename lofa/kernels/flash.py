"""Attention kernels of the DiT block: FlashAttention 4 (CuTe DSL) where it serves, SDPA otherwise.

One switch picks the kernel of lofa's fused Wan block (:func:`lofa.kernels.wan_fast.attention`): the
``attention`` field of ``fit_loras`` (:class:`lofa.fit.FitConfig`), or :func:`use` around any
call, or ``LOFA_ATTENTION`` for a whole process. Values:

- ``auto`` (default): FlashAttention 4 when the ``flash-attn-4`` wheel imports, the tensors are
  bf16/fp16 on a Hopper or Blackwell GPU and the head size is one it supports; SDPA otherwise
  (CPU, float32, no wheel);
- ``fa4``: FlashAttention 4, or an error saying why it cannot run;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (its own kernel choice, which
  :func:`lofa.fit.attention_backend` narrows).

Why: at 81x480x832 self-attention over 32,760 tokens is about three quarters of a fitting step,
and FA4's Hopper kernels (warp-specialised, TMA) run it faster than SDPA's FlashAttention-2
(figures: docs/performance.md, ``benchmarks/bench_fit.py``). ``flash-attn-4`` ships CuTe DSL
kernels compiled at first use, so it installs from wheels with no compiler; ``flash-attn`` 2.x
ships only as source.

The kernel is wrapped as the custom operators ``lofa::fa4_fwd`` / ``lofa::fa4_bwd`` so that
``torch.compile`` traces through it and the selective checkpoint policy of
:class:`lofa.wan.Checkpointing` can keep its output (:data:`SAVEABLE_OPS`).

Installing ``flash-attn-4`` also makes ``import flash_attn`` succeed (a namespace package with
only ``flash_attn.cute``), which diffsynth takes for FlashAttention 2 and then calls a function
that does not exist. :func:`guard_diffsynth` keeps diffsynth's blocks on the attention they had.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

#: Values of the switch.
BACKENDS = ("auto", "fa4", "sdpa")
#: Operator names (``overloadpacket.__name__``) whose outputs selective checkpointing may keep.
SAVEABLE_OPS = ("fa4_fwd",)
_HEAD_DIMS = range(8, 257, 8)  # FA4's Hopper range, multiples of 8
_backend = os.environ.get("LOFA_ATTENTION", "auto")


class FlashUnavailable(RuntimeError):
    """``attention: fa4`` was asked for where FlashAttention 4 cannot run (the reason is named)."""


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {list(BACKENDS)} (LOFA_ATTENTION / "
                         f"fit_loras.attention)")
    return name


_check(_backend)


@contextmanager
def use(name: str) -> Iterator[None]:
    """Run the block's attention with ``name`` (one of :data:`BACKENDS`) inside the block."""
    global _backend
    old, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = old


def backend() -> str:
    """The switch's current value."""
    return _backend


@functools.cache
def _load() -> tuple | str:
    """FA4's (forward, backward) kernels, or why ``flash_attn.cute`` does not import."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception as e:  # not installed, or its CUDA libraries do not load here
        return f"flash-attn-4 does not import ({type(e).__name__}: {e}; pip install flash-attn-4)"
    return _flash_attn_fwd, _flash_attn_bwd


def _kernels() -> tuple | None:
    kernels = _load()
    return None if isinstance(kernels, str) else kernels


def unavailable_reason(q: Tensor, head_dim: int) -> str | None:
    """Why FA4 cannot run on ``q`` (``None``: it can)."""
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}, FA4 needs a CUDA GPU"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}, FA4 needs bfloat16 or float16"
    major = torch.cuda.get_device_capability(q.device)[0]
    if major not in (9, 10):
        return f"GPU compute capability {major}.x, FA4's kernels serve 9.x (Hopper) and 10.x (Blackwell)"
    if head_dim not in _HEAD_DIMS:
        return f"head size {head_dim} outside FA4's range (multiples of 8 up to 256)"
    if _kernels() is None:
        return _load()
    return None


def wants_fa4(q: Tensor, head_dim: int) -> bool:
    """Whether the block's attention on ``q`` runs through FA4 under the current switch."""
    if _backend == "sdpa":
        return False
    reason = unavailable_reason(q, head_dim)
    if reason is not None and _backend == "fa4":
        raise FlashUnavailable(f"attention backend 'fa4': {reason}")
    return reason is None


@torch.library.custom_op("lofa::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """FA4 forward: q (N, S, H, D), k and v (N, L, H, D) -> out (N, S, H, D), lse (N, H, S) float32."""
    if _kernels() is None:
        raise FlashUnavailable(f"FA4 called directly: {_load()}")
    out, lse, *_ = _kernels()[0](q, k, v, return_lse=True)
    return out, lse


@fa4_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    n, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((n, h, s), dtype=torch.float32)


@torch.library.custom_op("lofa::fa4_bwd", mutates_args=())
def fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FA4 backward: gradients of q, k, v."""
    dq, dk, dv = _kernels()[1](q, k, v, out, dout.contiguous(), lse)[:3]
    return dq, dk, dv


@fa4_bwd.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_bwd(dout, q, k, v, out, lse)


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """FA4 on the block's layout: (N, S, dim), (N, L, dim) x2 -> (N, S, dim). No transposes:
    FA4 reads (N, S, heads, head_dim) as the projections write it."""
    n, s, d = q.shape
    heads = [t.contiguous().unflatten(-1, (num_heads, -1)) for t in (q, k, v)]
    out, _ = fa4_fwd(*heads)
    return out.reshape(n, s, d)


def guard_diffsynth() -> None:
    """Keep diffsynth's ``flash_attention`` off a ``flash_attn`` that is only FA4's namespace.

    diffsynth sets ``FLASH_ATTN_2_AVAILABLE`` when ``import flash_attn`` succeeds and then calls
    ``flash_attn.flash_attn_func``, which FA4's package lacks: its blocks would fail. A real
    FlashAttention 2 (which has the function) is left in use.
    """
    import diffsynth.models.wan_video_dit as dit_module

    if dit_module.FLASH_ATTN_2_AVAILABLE and not hasattr(dit_module.flash_attn, "flash_attn_func"):
        dit_module.FLASH_ATTN_2_AVAILABLE = False
