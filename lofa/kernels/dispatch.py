"""Fused or plain: the one place that picks the hypernetwork's attention and MLP kernels.

``lofa.hypernet`` states its layers as math (``dispatch.self_attention(qkv, ...)``,
``dispatch.cross_attention(q, k, v, ...)``, ``dispatch.mlp(x, fc1, fc2)``); this module picks,
per call, by device, dtype and autograd, a kernel or the plain PyTorch ops, the way diffusers'
attention dispatch does. Every kernel computes the plain path's function (the tests compare
them); on a CPU the plain path is all that runs.

The choices, and the efficiency decisions behind the model's layout (the public release's
defects, DESIGN section 1; figures in docs/performance.md):
- without autograd on CUDA in bf16 / fp16 every attention is one of ``lofa.kernels.attention``'s
  Triton kernels with the q norm inside, and for a matrix's own 257 tokens as keys (its
  self-attention, stage II's attention to its stage-I tokens) the k norm too;
- per-head QK norms run before the head transpose (``heads``), so q / k / v reach SDPA in
  (batch, tokens, heads, head_dim) layout and its output merges heads as a view;
- the text is projected once per prompt and each trunk block's cross-attention K / V are
  computed (and normalised) once per prompt, shared by every matrix of that prompt: when a group
  holds the same number of consecutive matrices per prompt their queries are folded into one
  long query sequence against the prompt's keys (no copy of K / V);
- under autograd those long query sequences are cut into chunks with their own copy of K / V
  (``_query_chunks``): the attention backward parallelises over key blocks, and a few heads x
  key blocks of one long sequence would leave most of the GPU idle;
- text columns that no prompt uses are dropped (``hypernet.trim_text``), so a batch whose kept
  keys are all valid runs SDPA without a mask (the flash kernel), and the text mask and prompt
  ids are read on the host, so a forward never waits on the GPU;
- without autograd and autocast on CUDA the MLP's first product applies the GELU in its
  epilogue (``torch._addmm_activation``; tanh GELU there, as the model's, while on CPU that op
  uses the exact GELU, so the CPU path stays plain);
- ``HyperNet.embed`` caches everything before the first read of the prompt for a predictor
  serving many prompts of one base model (``lofa.serving.predict_graph`` replays the rest as one
  CUDA graph); ``HyperNet.compile_regions`` compiles blocks, embedding, text K / V and heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lofa.kernels import attention

#: Query rows per cross-attention chunk under autograd (see ``cross_attention``).
BWD_QUERY_CHUNK = 4096


def fused_attention(x: Tensor) -> bool:
    """Whether ``lofa.kernels.attention``'s kernel serves an attention over tensors like x:
    no autograd (it has no backward), CUDA, bf16 / fp16, Triton installed."""
    return not torch.is_grad_enabled() and attention.available(x.device, x.dtype)


def heads(x: Tensor, lead: int, num_heads: int, norm: nn.Module | None = None) -> Tensor:
    """(..., d) with n*S rows -> ``norm`` over each head -> (lead, heads, rows/lead, head_dim).

    The norm runs before the transpose, so its output (a new tensor) is laid out
    (lead, rows, heads, head_dim): the attention kernel reads that layout as is and
    writes its output the same way, so merging the heads back is a view, not a copy.
    """
    x = x.reshape(lead, -1, num_heads, x.shape[-1] // num_heads)
    return (x if norm is None else norm(x)).transpose(1, 2)


def _norm_gain(norm: nn.Module, dtype: torch.dtype) -> tuple[Tensor | None, float]:
    """A q or k norm as ``attention.attention`` takes it: the gain (the kernel rounds it to the
    input's dtype, as ``hypernet.RMSNorm`` does) or None for no norm (an ``nn.Identity``), and its
    eps (the q and k norms of one attention are made with the same)."""
    if isinstance(norm, nn.Identity):
        return None, 0.0
    return norm.weight, torch.finfo(dtype).eps if norm.eps is None else norm.eps


def self_attention(qkv: Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module) -> Tensor:
    """Per-matrix attention of its tokens: qkv (n, S, 3d), the fused q / k / v product ->
    softmax(q_norm(q) k_norm(k)^T / sqrt(hd)) v with heads merged, (n, S, d)."""
    n, s, d3 = qkv.shape
    if fused_attention(qkv):  # q and k read where the product wrote them, both normalised in the kernel
        q, k, v = (t.view(n, s, num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        q_gain, eps = _norm_gain(q_norm, q.dtype)
        return attention.attention(q, k, v, None, q_gain, eps, _norm_gain(k_norm, k.dtype)[0]).view(n, s, d3 // 3)
    q, k, v = (heads(t, n, num_heads, norm) for t, norm in zip(qkv.chunk(3, dim=-1), (q_norm, k_norm, None)))
    y = F.scaled_dot_product_attention(q, k, v)
    return y.transpose(1, 2).reshape(n, s, d3 // 3)


def _query_chunks(m: int, s: int) -> int:
    """The largest divisor c of m (matrices per prompt) with chunks of >= BWD_QUERY_CHUNK query rows."""
    best = 1
    for c in range(1, m + 1):
        if m % c == 0 and (m // c) * s >= BWD_QUERY_CHUNK:
            best = c
    return best


def cross_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, num_heads: int, q_norm: nn.Module,
                    k_norm: nn.Module | None = None) -> Tensor:
    """Attention of queries to a context whose K / V were computed apart (and are shared).

    Args:
        q: (n, S, d) the query product, n = P * m: the m consecutive matrices of a prompt share
            its K, V; k, v: (P, heads, L, head_dim); mask: (P, L) bool, True = key, or None.
        q_norm: the per-head q norm; k_norm: a per-head norm to apply to k here (inside the
            kernel where it runs), None when k is normalised already.
    Returns:
        (n, S, d), heads merged.
    """
    n, s, d = q.shape
    lead = k.shape[0]
    if fused_attention(k):  # the q norm inside the kernel, q read where the product wrote it
        q = q.view(lead, -1, num_heads, d // num_heads).transpose(1, 2)
        k_gain = None if k_norm is None else _norm_gain(k_norm, k.dtype)[0]
        return attention.attention(q, k, v, mask, *_norm_gain(q_norm, q.dtype), k_gain).view(n, s, d)
    if k_norm is not None:
        k = k_norm(k)
    chunks = _query_chunks(n // lead, s) if torch.is_grad_enabled() else 1
    q = heads(q, lead * chunks, num_heads, q_norm)  # (P*c, h, m*S/c, hd)
    if chunks > 1:
        k, v = (t.repeat_interleave(chunks, dim=0) for t in (k, v))
        mask = None if mask is None else mask.repeat_interleave(chunks, dim=0)
    attn_mask = None if mask is None else mask[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return y.transpose(1, 2).reshape(n, s, d)


def mlp(x: Tensor, fc1: nn.Module, fc2: nn.Module) -> Tensor:
    """fc2(GELU_tanh(fc1(x))). Without autograd or autocast on CUDA the GELU runs in the first
    product's epilogue (``torch._addmm_activation``), so the hidden activations get no pass of
    their own; elsewhere (and for linears of other types, e.g. the bench's FP8 ones) plain ops."""
    if (x.is_cuda and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")
            and type(fc1) is nn.Linear):
        h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
        return fc2(h.view(*x.shape[:-1], -1))
    return fc2(F.gelu(fc1(x), approximate="tanh"))
