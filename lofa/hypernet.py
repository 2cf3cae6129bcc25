"""The LoFA hypernetwork: (prompt, base weight matrix) -> LoRA factors A, B and a scale alpha.

One model serves both stages (DESIGN section 1). Per adapted matrix W the input is
W / RMS(W) cut into ``patch x patch`` tiles (zero-padded where the patch does not
divide a side), embedded by a stride-``patch`` conv (a matmul over the unfolded
tiles), normalised, plus learned row / column / depth / module-type embeddings and
a CLS token. The trunk is ``num_blocks`` x [self-attn, MLP, cross-attn to the text,
MLP], pre-norm, QK-norm, SDPA. Tokens are mean-pooled into per-shape linear heads:
A (r x in) and B (out x r), B scaled by RMS(W) so dW = B A is in W's units. Stage
II adds cross-attention blocks to the frozen stage-I tokens of the same matrix
(after the trunk blocks in ``cross_stage1_after``) and a per-matrix scale alpha.

Efficiency decisions (the public release's defects, DESIGN section 1):
- the text is projected once per prompt and each trunk block's cross-attention
  K / V are computed once per prompt, shared by every matrix of that prompt: when
  a group holds the same number of consecutive matrices per prompt, their queries
  are folded into one long query sequence against the prompt's keys (no copy);
- text columns that no prompt uses are dropped, so a batch whose kept keys are
  all valid runs SDPA without a mask (the flash kernel);
- under autograd those long query sequences are cut into chunks with their own copy
  of K / V, so the attention backward has enough blocks to fill the GPU;
- per-head QK norms run before the head transpose, so q / k / v reach SDPA in
  (batch, tokens, heads, head_dim) layout and its output merges heads as a view;
- the text mask and prompt ids are read on the host (``MatrixGroup.to`` and
  ``HyperBatch.to`` leave them there), so a forward never waits on the GPU;
- ``HyperNet.embed`` caches everything before the first read of the prompt (the
  matrix embedding and block 0's self-attention and MLP) for a predictor serving
  many prompts of one base model (``lofa.serving.predict_graph`` then replays the rest as
  one CUDA graph); ``compile_regions`` compiles blocks, embedding, text K / V, heads;
- each block's last residual add is deferred into the next norm (``_deferred``): a block
  boundary is a compiled-region boundary, and an add there would be a pass of its own;
- on CUDA in bf16, cuBLASLt epilogues (``lofa.kernels.cublaslt``) take the MLP's GELU under autograd
  (forward and backward) and, without autograd, the residual adds of the output linears
  (``_residual``);
- without autograd on CUDA every attention is one of ``lofa.kernels.attention``'s Triton kernels, with the q
  norm inside, and for a matrix's own 257 tokens as keys (its self-attention, stage II's attention
  to its stage-I tokens) the k norm too (``_fused_attention``);
- matrices of one shape are batched; shapes are the only Python-level loop;
- gradient checkpointing passes each block itself to ``checkpoint`` (no late
  binding); parameters stay in the dtype they were created in (fp32 under autocast);
  activations, the residual stream included, are in the compute dtype (bf16 under
  autocast), norm statistics in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lofa.kernels import attention, cublaslt
from lofa.config import ConfigError
from lofa.layers import ALL_MODULES, Vocabulary

#: Bytes of unfolded weight tiles handled at once by the patch embedding.
_PATCH_CHUNK_BYTES = 1 << 28
#: Query rows per cross-attention chunk under autograd (see CrossAttention.forward).
_BWD_QUERY_CHUNK = 4096
#: B-head init std used by stage I when ``b_init_std`` is unset (see HyperNetConfig).
STAGE1_B_INIT_STD = 1e-5


@dataclass(frozen=True)
class HyperNetConfig:
    """Hypernetwork hyper-parameters; matrix shapes and counts come from the Vocabulary.

    ``b_init_std``: std of the B head's weights at init. Unset means 0 in stage II
    (the first prediction is dW = 0 exactly) and ``STAGE1_B_INIT_STD`` in stage I:
    every stage-I loss is a function of |B A|, which is even in B, so B = 0 is a
    stationary point whose gradient is exactly zero and stage I would never train.
    """

    d_model: int = 768
    num_heads: int = 12
    num_blocks: int = 8
    mlp_ratio: float = 4.0
    patch_size: int = 96
    rank: int = 32
    text_dim: int = 4096
    qk_norm: bool = True
    stage: int = 1
    cross_stage1_after: tuple[int, ...] = (3, 7)
    use_stage1: bool = True
    grad_checkpointing: bool = False
    max_blocks: int = 64
    num_module_types: int = len(ALL_MODULES)
    b_init_std: float | None = None
    alpha_init: float = 1.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        errors = []
        if self.stage not in (1, 2):
            errors.append(f"stage must be 1 or 2, got {self.stage}")
        if self.d_model % self.num_heads:
            errors.append(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        for name in ("d_model", "num_heads", "num_blocks", "patch_size", "rank", "text_dim",
                     "max_blocks", "num_module_types"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [i for i in self.cross_stage1_after if not 0 <= i < self.num_blocks]
        if self.stage == 2 and (bad or len(set(self.cross_stage1_after)) != len(self.cross_stage1_after)):
            errors.append(f"cross_stage1_after {list(self.cross_stage1_after)} must hold distinct "
                          f"block indices in [0, {self.num_blocks})")
        if self.b_init_std is not None and self.b_init_std < 0:
            errors.append(f"b_init_std must be >= 0, got {self.b_init_std}")
        if self.alpha_init <= 0:
            errors.append(f"alpha_init must be > 0, got {self.alpha_init}")
        if errors:
            raise ConfigError("HyperNetConfig: " + "; ".join(errors))

    @property
    def b_std(self) -> float:
        """The B head's init std after resolving the stage default."""
        if self.b_init_std is not None:
            return self.b_init_std
        return STAGE1_B_INIT_STD if self.stage == 1 else 0.0

    @property
    def uses_stage1(self) -> bool:
        """Whether this model has (and needs) stage-I cross-attention blocks."""
        return self.stage == 2 and self.use_stage1


@dataclass(frozen=True)
class MatrixGroup:
    """Adapted matrices of one shape: the unit the hypernetwork batches over.

    Attributes:
        weight: (n, out, in) base weights W.
        matrix_ids: (n,) long, indices into the model's Vocabulary.
        prompt_ids: (n,) long, the prompt (row of the text batch) each matrix is for.
    """

    weight: Tensor
    matrix_ids: Tensor
    prompt_ids: Tensor

    def __post_init__(self) -> None:
        n = self.weight.shape[0]
        if self.weight.dim() != 3 or self.matrix_ids.shape != (n,) or self.prompt_ids.shape != (n,):
            raise ValueError(f"MatrixGroup: weight {tuple(self.weight.shape)} must be (n, out, in) with "
                             f"matrix_ids {tuple(self.matrix_ids.shape)} and prompt_ids "
                             f"{tuple(self.prompt_ids.shape)} both (n,)")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[1]), int(self.weight.shape[2])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MatrixGroup":
        """W and the matrix ids on ``device``; the prompt ids stay where they are: the model reads
        them on the host (which prompt's K / V), and on the host that read needs no GPU sync."""
        return MatrixGroup(self.weight.to(device, non_blocking=non_blocking),
                           self.matrix_ids.to(device, non_blocking=non_blocking), self.prompt_ids)


@dataclass(frozen=True)
class HyperOutput:
    """The prediction for one MatrixGroup of n matrices.

    Attributes:
        A: (n, r, in).
        B: (n, out, r), unscaled.
        alpha: (n,) positive scale (stage II) or None (stage I).
        tokens: (n, S, d_model) final normalised tokens (stage II attends to stage I's).
    """

    A: Tensor
    B: Tensor
    alpha: Tensor | None
    tokens: Tensor

    @property
    def B_scaled(self) -> Tensor:
        """(n, out, r): B with alpha folded in; what the DiT and an exported file use."""
        return self.B if self.alpha is None else self.B * self.alpha[:, None, None].to(self.B.dtype)

    def delta(self) -> Tensor:
        """(n, out, in) dW = alpha B A."""
        return torch.bmm(self.B_scaled, self.A)


@dataclass(frozen=True)
class EmbeddedGroup:
    """A MatrixGroup with the part of the forward that depends on W only, not on the prompt.

    Made by ``HyperNet.embed`` for inference: a predictor serving many prompts of one
    base model embeds its matrices once. Valid only for the model that made it and
    only while that model's weights do not change.

    Attributes:
        group: the matrices; tokens: (n, S, d_model) the tokens after the first trunk
            block's self-attention and MLP (nothing before them reads the prompt);
        rms: (n,) RMS(W).
    """

    group: MatrixGroup
    tokens: Tensor
    rms: Tensor
    model_id: int


@dataclass(frozen=True)
class _TextContext:
    """Per trunk block K / V of the prompts, computed once per forward.

    keys, values: one (P, heads, L, head_dim) per trunk block; mask: (P, L) bool or
    None when every kept key is valid.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor | None


def group_by_shape(vocab: Vocabulary, matrix_ids: Tensor, prompt_ids: Tensor
                   ) -> list[tuple[tuple[int, int], Tensor]]:
    """Positions of each shape in a flat list of (matrix, prompt) pairs.

    Args:
        matrix_ids: (N,) vocabulary indices; prompt_ids: (N,) prompt rows.
    Returns:
        [((out, in), positions (n,) long)], shapes in sorted order; positions sorted
        by prompt (stable), which lets the model share each prompt's text K / V.
    """
    ids = matrix_ids.tolist()
    order = torch.argsort(prompt_ids.cpu(), stable=True).tolist()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for pos in order:
        m = vocab[ids[pos]]
        by_shape.setdefault((m.out_features, m.in_features), []).append(pos)
    return [(s, torch.tensor(by_shape[s], dtype=torch.long)) for s in sorted(by_shape)]


def trim_text(text: Tensor, mask: Tensor, text_dim: int) -> tuple[Tensor, Tensor | None]:
    """Drop the text columns no prompt uses; the mask becomes None when every kept token is valid.

    Reads the mask on the host (one sync when it lives on the GPU; none for a host mask,
    which is how ``HyperBatch.to`` leaves it), so callers that replay a captured prediction
    trim before it. The returned mask is on the text's device.

    Args:
        text: (P, L, text_dim); mask: (P, L), True = token.
    Returns:
        text (P, L', text_dim) and mask (P, L') bool or None.
    """
    if text.dim() != 3 or text.shape[-1] != text_dim or mask.shape != text.shape[:2]:
        raise ValueError(f"HyperNet: text {tuple(text.shape)} must be (P, L, {text_dim}) "
                         f"with mask (P, L), got mask {tuple(mask.shape)}")
    device = mask.device
    mask = mask.bool()
    if device.type != "cpu":  # one read of the mask; a host mask (HyperBatch.to keeps it there) needs no sync
        mask = mask.cpu()
    used = mask.any(0)
    length, all_valid, empty = torch.stack([
        torch.where(used, torch.arange(1, used.numel() + 1, device=used.device), 0).max(),
        (mask | ~used).all(), (~mask.any(1)).any()]).tolist()
    if empty:
        raise ValueError("HyperNet: a prompt has no valid text token (its mask row is all False)")
    if all_valid:
        return text[:, :length], None
    mask = mask[:, :length]
    if text.device.type == "cuda":
        mask = mask.pin_memory()
    return text[:, :length], mask.to(text.device, non_blocking=True)


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose gain is cast to the input's dtype (the fused kernel under bf16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


_identity = nn.Identity()


def _query_chunks(m: int, s: int) -> int:
    """The largest divisor c of m (matrices per prompt) with chunks of >= _BWD_QUERY_CHUNK query rows."""
    best = 1
    for c in range(1, m + 1):
        if m % c == 0 and (m // c) * s >= _BWD_QUERY_CHUNK:
            best = c
    return best


def _heads(x: Tensor, lead: int, num_heads: int, norm: nn.Module) -> Tensor:
    """(..., d) with n*S rows -> ``norm`` over each head -> (lead, heads, rows/lead, head_dim).

    The norm runs before the transpose, so its output (a new tensor) is laid out
    (lead, rows, heads, head_dim): the attention kernel reads that layout as is and
    writes its output the same way, so merging the heads back is a view, not a copy.
    """
    return norm(x.reshape(lead, -1, num_heads, x.shape[-1] // num_heads)).transpose(1, 2)


def _fused_attention(x: Tensor) -> bool:
    """Whether ``lofa.kernels.attention``'s kernel (the q norm inside) serves an attention over tensors
    like x: no autograd (it has no backward), CUDA, bf16 / fp16, Triton installed."""
    return not torch.is_grad_enabled() and attention.available(x.device, x.dtype)


def _norm_gain(norm: nn.Module, dtype: torch.dtype) -> tuple[Tensor | None, float]:
    """A q or k norm as ``lofa.kernels.attention.attention`` takes it: the gain (the kernel rounds it to the
    input's dtype, as ``RMSNorm`` does) or None for no norm, and its eps (the q and k norms of one
    attention are made with the same)."""
    if isinstance(norm, nn.Identity):
        return None, 0.0
    return norm.weight, torch.finfo(dtype).eps if norm.eps is None else norm.eps


class CrossAttention(nn.Module):
    """Attention of x to a context whose K / V are computed separately (and shared)."""

    def __init__(self, d: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        hd = d // num_heads
        self.q_norm = RMSNorm(hd, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, eps=eps) if qk_norm else nn.Identity()

    def context(self, c: Tensor, norm_k: bool = True) -> tuple[Tensor, Tensor]:
        """c: (P, L, d) -> K, V each (P, heads, L, head_dim), K normalised unless ``norm_k`` is False
        (then pass ``k_normed=False`` to ``forward`` / ``inner``, which normalise it)."""
        k, v = self.kv(c).chunk(2, dim=-1)
        k_norm = self.k_norm if norm_k else _identity
        return _heads(k, c.shape[0], self.num_heads, k_norm), _heads(v, c.shape[0], self.num_heads, _identity)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, k_normed: bool = True) -> Tensor:
        """x: (n, S, d) -> (n, S, d); see ``inner``."""
        return self.o(self.inner(x, k, v, mask, k_normed))

    @property
    def out(self) -> nn.Linear:
        """The output projection (``_residual`` runs it with the residual add)."""
        return self.o

    def inner(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, k_normed: bool = True) -> Tensor:
        """The attention before the output projection, heads merged (n, S, d).

        x: (n, S, d) with n = P * m; the m consecutive matrices of a prompt share its K, V (P, ...).
        ``k_normed`` False: K comes from ``context(..., norm_k=False)`` and is normalised here (inside
        the attention kernel where ``_fused_attention``).

        Without autograd a prompt's m*S queries form one sequence. With autograd they are
        cut into chunks of about ``_BWD_QUERY_CHUNK`` rows that each get their own copy of
        the (small) K / V: the attention backward parallelises over key blocks, and a few
        heads x key blocks of one long sequence would leave most of the GPU idle.
        """
        n, s, d = x.shape
        lead = k.shape[0]
        if _fused_attention(k):  # the q norm inside the kernel, q read where the product wrote it
            q = self.q(x).view(lead, -1, self.num_heads, d // self.num_heads).transpose(1, 2)
            k_gain = None if k_normed else _norm_gain(self.k_norm, k.dtype)[0]
            return attention.attention(q, k, v, mask, *_norm_gain(self.q_norm, q.dtype), k_gain).view(n, s, d)
        if not k_normed:
            k = self.k_norm(k)
        chunks = _query_chunks(n // lead, s) if torch.is_grad_enabled() else 1
        q = _heads(self.q(x), lead * chunks, self.num_heads, self.q_norm)  # (P*c, h, m*S/c, hd)
        if chunks > 1:
            k, v = (t.repeat_interleave(chunks, dim=0) for t in (k, v))
            mask = None if mask is None else mask.repeat_interleave(chunks, dim=0)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return y.transpose(1, 2).reshape(n, s, d)


class SelfAttention(nn.Module):
    """Per-matrix self-attention over its tokens."""

    def __init__(self, d: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        hd = d // num_heads
        self.q_norm = RMSNorm(hd, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (n, S, d) -> (n, S, d)."""
        return self.o(self.inner(x))

    @property
    def out(self) -> nn.Linear:
        """The output projection (``_residual`` runs it with the residual add)."""
        return self.o

    def inner(self, x: Tensor) -> Tensor:
        """The attention before the output projection, heads merged: (n, S, d) -> (n, S, d).
        Without autograd on CUDA the q norm and the attention are one kernel (``_fused_attention``)."""
        n, s, d = x.shape
        qkv = self.qkv(x)
        if _fused_attention(qkv):  # q and k read where the product wrote them, both normalised in the kernel
            q, k, v = (t.view(n, s, self.num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
            q_gain, eps = _norm_gain(self.q_norm, q.dtype)
            return attention.attention(q, k, v, None, q_gain, eps, _norm_gain(self.k_norm, k.dtype)[0]).view(n, s, d)
        q, k, v = (_heads(t, n, self.num_heads, norm) for t, norm in
                   zip(qkv.chunk(3, dim=-1), (self.q_norm, self.k_norm, _identity)))
        y = F.scaled_dot_product_attention(q, k, v)
        return y.transpose(1, 2).reshape(n, s, d)


class MLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear. On CUDA the GELU runs in cuBLASLt epilogues (tanh GELU,
    as here), so the hidden activations get no passes of their own:
    - under autograd in bf16 / fp16 (autocast included), ``lofa.kernels.cublaslt.gelu_mlp``: the first
      product writes GELU and its input at once, and the backward's product applies the GELU
      gradient (``lofa.kernels.cublaslt.ENABLED`` = False turns this off);
    - without autograd or autocast, ``torch._addmm_activation``.
    (On CPU that op uses the exact GELU, so the CPU path stays unfused.)"""

    def __init__(self, d: int, ratio: float):
        hidden = int(round(d * ratio))
        super().__init__(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))

    @property
    def out(self) -> nn.Linear:
        """The second linear (``_residual`` runs it with the residual add)."""
        return self[2]

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self[0], self[2]
        if x.is_cuda and torch.is_grad_enabled() and type(fc1) is nn.Linear and type(fc2) is nn.Linear:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            if cublaslt.available(x.device, dtype):
                return cublaslt.gelu_mlp(x, fc1, fc2)
        return fc2(self.inner(x))

    def inner(self, x: Tensor) -> Tensor:
        """GELU(first linear): the hidden activations (..., hidden)."""
        fc1 = self[0]
        if (not x.is_cuda or torch.is_grad_enabled() or torch.is_autocast_enabled("cuda")
                or type(fc1) is not nn.Linear):
            return self[1](fc1(x))
        h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
        return h.view(*x.shape[:-1], -1)


def _fuses_residuals(x: Tensor) -> bool:
    """Whether ``_residual`` adds x in the output linear's epilogue: no autograd, CUDA, bf16 / fp16."""
    return not torch.is_grad_enabled() and cublaslt.available(x.device, x.dtype)


def _residual(x: Tensor, sublayer: nn.Module, *args: Tensor | None) -> Tensor:
    """x + sublayer(*args). Where ``_fuses_residuals``, the sublayer's output linear adds x in its
    cuBLASLt epilogue (``lofa.kernels.cublaslt.linear_residual``): the branch's output is never written
    and read back, and the next norm reads one tensor, not two."""
    if not _fuses_residuals(x) or type(sublayer.out) is not nn.Linear:  # e.g. the bench's FP8 linears
        return x + sublayer(*args)
    return cublaslt.linear_residual(sublayer.inner(*args), sublayer.out, x)


def _last_residual(x: Tensor, sublayer: nn.Module, *args: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A block's last residual sublayer as the stream (x, pending): the add runs in the output
    linear's epilogue where ``_fuses_residuals`` (nothing pending), else it is left to the
    consumer (``_deferred``)."""
    if _fuses_residuals(x):
        return _residual(x, sublayer, *args), None
    return x, sublayer(*args)


def _deferred(x: Tensor, pending: Tensor | None) -> Tensor:
    """The residual stream ``x + pending`` (a block's last add, deferred to its consumer)."""
    return x if pending is None else x + pending


class TrunkBlock(nn.Module):
    """[self-attn, MLP, cross-attn to the text, MLP], each pre-norm with a residual."""

    def __init__(self, cfg: HyperNetConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(d, eps=eps) for _ in range(4))
        self.attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, eps)
        self.mlp1 = MLP(d, cfg.mlp_ratio)
        self.cross = CrossAttention(d, cfg.num_heads, cfg.qk_norm, eps)
        self.mlp2 = MLP(d, cfg.mlp_ratio)

    def forward(self, x: Tensor, pending: Tensor | None, k: Tensor, v: Tensor, mask: Tensor | None,
                skip_self: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (n, S, d), the stream being ``x + pending``; k, v: (P, heads, L, head_dim) with n a
        multiple of P. Returns the new stream the same way: (x, the last MLP's output).

        The last residual add is left to the consumer (see ``_deferred``), where it fuses with
        the next norm: a block boundary is also a compiled-region boundary, and an add there
        would be a pass of its own over the stream. Where the adds run in the output linears'
        epilogues (``_fuses_residuals``) there is nothing to defer: pending is None.

        ``skip_self``: x already went through ``self_part`` (the first block's self half
        does not depend on the prompt and is cached by ``HyperNet.embed``).
        """
        x = _deferred(x, pending)
        if not skip_self:
            x = self.self_part(x)
        x = _residual(x, self.cross, self.norm3(x), k, v, mask)
        return _last_residual(x, self.mlp2, self.norm4(x))

    def self_part(self, x: Tensor) -> Tensor:
        """[self-attn, MLP]: the half of the block that does not read the prompt."""
        x = _residual(x, self.attn, self.norm1(x))
        return _residual(x, self.mlp1, self.norm2(x))


class Stage1Block(nn.Module):
    """Stage II only: [cross-attn to the frozen stage-I tokens of the same matrix, MLP]."""

    def __init__(self, cfg: HyperNetConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.norm_x, self.norm_ctx, self.norm_mlp = (nn.LayerNorm(d, eps=eps) for _ in range(3))
        self.cross = CrossAttention(d, cfg.num_heads, cfg.qk_norm, eps)
        self.mlp = MLP(d, cfg.mlp_ratio)

    def forward(self, x: Tensor, pending: Tensor | None, stage1_tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """x: (n, S, d), the stream being ``x + pending``; stage1_tokens: (n, S1, d). Returns the
        stream as (x, the MLP's output), like ``TrunkBlock``."""
        x = _deferred(x, pending)
        fused = _fused_attention(x)  # the attention kernel normalises K itself: no pass over it here
        k, v = self.cross.context(self.norm_ctx(stage1_tokens), norm_k=not fused)
        x = _residual(x, self.cross, self.norm_x(x), k, v, None, not fused)
        return _last_residual(x, self.mlp, self.norm_mlp(x))


class LoraHead(nn.Module):
    """Linear heads from the pooled feature to A (r x in) and B (out x r) of one shape."""

    def __init__(self, d: int, out_features: int, in_features: int, rank: int, b_std: float):
        super().__init__()
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        self.A = nn.Linear(d, rank * in_features)
        self.B = nn.Linear(d, out_features * rank)
        self.b_std = b_std

    def forward(self, h: Tensor, rms: Tensor) -> tuple[Tensor, Tensor]:
        """h: (n, d), rms: (n,) -> A (n, r, in), B (n, out, r) with B in units of RMS(W)."""
        n = h.shape[0]
        a = self.A(h).view(n, self.rank, self.in_features)
        b = self.B(h).view(n, self.out_features, self.rank)
        b = b * rms[:, None, None].to(b.dtype)
        return a, b


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)


class HyperNet(nn.Module):
    """The LoFA hypernetwork for the matrices of ``vocab`` (stage I or stage II by ``cfg.stage``)."""

    def __init__(self, cfg: HyperNetConfig, vocab: Vocabulary):
        super().__init__()
        if vocab.num_blocks > cfg.max_blocks:
            raise ConfigError(f"HyperNetConfig.max_blocks {cfg.max_blocks} < {vocab.num_blocks} DiT blocks")
        if max(m.type_index for m in vocab) >= cfg.num_module_types:
            raise ConfigError(f"HyperNetConfig.num_module_types {cfg.num_module_types} is too small for "
                              f"modules {list(vocab.modules)}")
        self.cfg, self.vocab = cfg, vocab
        d, p = cfg.d_model, cfg.patch_size
        shapes = sorted({(m.out_features, m.in_features) for m in vocab})
        self.register_buffer("depth_ids", torch.tensor([m.block for m in vocab]), persistent=False)
        self.register_buffer("type_ids", torch.tensor([m.type_index for m in vocab]), persistent=False)
        # 1. matrix embedding: a stride-p conv over W / RMS(W), as a matmul over unfolded tiles
        self.patch_embed = nn.Linear(p * p, d)
        self.patch_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.row_embed = nn.Parameter(torch.zeros(max(-(-o // p) for o, _ in shapes), d))
        self.col_embed = nn.Parameter(torch.zeros(max(-(-i // p) for _, i in shapes), d))
        self.depth_embed = nn.Embedding(cfg.max_blocks, d)
        self.type_embed = nn.Embedding(cfg.num_module_types, d)
        self.cls_token = nn.Parameter(torch.zeros(d))
        # 2. prompt: projected once per prompt
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.text_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        # 3. trunk (+ stage-I cross blocks in stage II)
        self.blocks = nn.ModuleList(TrunkBlock(cfg) for _ in range(cfg.num_blocks))
        self.stage1_blocks = nn.ModuleDict(
            {str(i): Stage1Block(cfg) for i in cfg.cross_stage1_after} if cfg.uses_stage1 else {})
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        # 4. heads
        self.heads = nn.ModuleDict({f"{o}x{i}": LoraHead(d, o, i, cfg.rank, cfg.b_std) for o, i in shapes})
        self.alpha_head = nn.Linear(d, 1) if cfg.stage == 2 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(_init_weights)
        for t in (self.row_embed, self.col_embed, self.cls_token):
            nn.init.trunc_normal_(t, std=0.02)
        for head in self.heads.values():
            if head.b_std > 0:
                nn.init.normal_(head.B.weight, std=head.b_std)
            else:
                nn.init.zeros_(head.B.weight)
        if self.alpha_head is not None:
            nn.init.zeros_(self.alpha_head.weight)
            nn.init.constant_(self.alpha_head.bias, math.log(math.expm1(self.cfg.alpha_init)))

    def forward(self, groups: Sequence[MatrixGroup | EmbeddedGroup], text: Tensor, text_mask: Tensor,
                stage1_tokens: Sequence[Tensor] | None = None) -> list[HyperOutput]:
        """Predict the LoRA factors of every matrix in ``groups``.

        Args:
            groups: matrices batched by shape (see ``group_by_shape``), or their
                ``embed`` (inference only: the embedding then gets no gradient).
            text: (P, L, text_dim) prompt embeddings; text_mask: (P, L) bool, True = token.
            stage1_tokens: stage II with stage-I features only: per group, the frozen
                stage-I ``HyperOutput.tokens`` (n, S, d) of the same matrices.
        Returns:
            one HyperOutput per group.
        """
        if self.cfg.uses_stage1 != (stage1_tokens is not None):
            raise ValueError("HyperNet: stage1_tokens are required by a stage-II model with use_stage1 "
                             "and accepted by no other model")
        if stage1_tokens is not None and len(stage1_tokens) != len(groups):
            raise ValueError(f"HyperNet: {len(stage1_tokens)} stage1_tokens for {len(groups)} groups")
        ctx = self._encode_text(text, text_mask)
        return [self._predict_group(g, ctx, None if stage1_tokens is None else stage1_tokens[i])
                for i, g in enumerate(groups)]

    def compile_regions(self, mode: str | None = None, edges: bool = True, trunk: bool = False,
                        dynamic: bool | None = False) -> "HyperNet":
        """Regional ``torch.compile``: each trunk (and stage-I) block, one compiled code per block
        type, or with ``trunk`` the whole run of blocks as one graph (fuses across block
        boundaries; longer to compile); with ``edges`` also the matrix embedding, the text's
        K / V and the heads. ``dynamic``: torch.compile's; False (static shapes: one compile per
        matrix shape and text length) for a predictor, None (a shape that changes is recompiled
        once, dynamic) for training, whose batches vary. Returns self."""
        if torch.cuda.is_available():  # load cuBLASLt outside the traces (MLP asks whether it is there)
            cublaslt.available(torch.device("cuda"), torch.bfloat16)
        if trunk:
            self.run_blocks = torch.compile(self.run_blocks, dynamic=dynamic, mode=mode)
        else:
            for block in [*self.blocks, *self.stage1_blocks.values()]:
                block.compile(dynamic=dynamic, mode=mode)
        if edges:
            for name in ("_embed", "text_context", "final_tokens", "finish"):
                setattr(self, name, torch.compile(getattr(self, name), dynamic=dynamic, mode=mode))
        return self

    @torch.no_grad()
    def embed(self, group: MatrixGroup) -> EmbeddedGroup:
        """The prompt-independent part of the forward for ``group``, to reuse across prompts:
        the matrix embedding and the first trunk block's self-attention and MLP."""
        tokens, rms = self._embed(group)
        return EmbeddedGroup(group, self.blocks[0].self_part(tokens), rms, model_id=id(self))

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.patch_embed.weight.dtype

    def _encode_text(self, text: Tensor, mask: Tensor) -> _TextContext:
        """Project the prompts once and compute every trunk block's K / V once per prompt."""
        text, mask = trim_text(text, mask, self.cfg.text_dim)
        return self.text_context(text, mask)

    def text_context(self, text: Tensor, mask: Tensor | None) -> _TextContext:
        """Every trunk block's K / V of already trimmed prompts (``trim_text``); no host sync.

        Args:
            text: (P, L, text_dim); mask: (P, L) bool, or None when every token is valid.
        """
        c = self.text_norm(self.text_proj(text.to(self._compute_dtype(text.device))))  # (P, L, d)
        kv = [block.cross.context(c) for block in self.blocks]
        return _TextContext(tuple(k for k, _ in kv), tuple(v for _, v in kv), mask)

    def _embed(self, g: MatrixGroup) -> tuple[Tensor, Tensor]:
        """Tokens (n, 1 + T, d) of W / RMS(W), and RMS(W) (n,) fp32.

        The 1 / RMS scale is applied after the matmul (it is linear), and the tiles
        are unfolded a bounded chunk of matrices at a time.
        """
        p, (out_f, in_f) = self.cfg.patch_size, g.shape
        gh, gw = -(-out_f // p), -(-in_f // p)
        dtype = self._compute_dtype(g.weight.device)
        weight = self.patch_embed.weight.to(dtype)
        chunk = max(1, _PATCH_CHUNK_BYTES // (out_f * in_f * g.weight.element_size()))
        parts, rms = [], []
        for w in g.weight.split(chunk):
            r = torch.linalg.vector_norm(w, dim=(1, 2), dtype=torch.float32) / math.sqrt(out_f * in_f)
            r = r.clamp_min(torch.finfo(torch.float32).tiny)
            if (gh * p, gw * p) != (out_f, in_f):
                w = F.pad(w, (0, gw * p - in_f, 0, gh * p - out_f))
            tiles = w.reshape(-1, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(-1, gh * gw, p * p)
            parts.append(F.linear(tiles.to(dtype), weight) * (1.0 / r).to(dtype)[:, None, None])
            rms.append(r)
        x = self.patch_norm(torch.cat(parts) + self.patch_embed.bias.to(dtype))  # (n, T, d)
        pos = (self.row_embed[:gh, None] + self.col_embed[None, :gw]).reshape(gh * gw, -1)
        meta = self.depth_embed(self.depth_ids[g.matrix_ids]) + self.type_embed(self.type_ids[g.matrix_ids])
        x = x + pos.to(x.dtype) + meta[:, None].to(x.dtype)
        cls = (self.cls_token + meta)[:, None].to(x.dtype)
        # the residual stream in the compute dtype: under bf16 autocast the norms' outputs
        # are fp32, and an fp32 stream would double the traffic of every norm and residual add
        return torch.cat([cls, x], dim=1).to(dtype), torch.cat(rms)

    def _text_for(self, g: MatrixGroup, ctx: _TextContext) -> tuple[Tensor | None, Tensor | None]:
        """Index (n,) into the prompts, or None when the group is m consecutive matrices per prompt."""
        num_prompts, n = ctx.keys[0].shape[0], g.weight.shape[0]
        if n % num_prompts == 0:
            blocked = torch.arange(num_prompts, device=g.prompt_ids.device).repeat_interleave(n // num_prompts)
            if torch.equal(g.prompt_ids, blocked):  # host ids (MatrixGroup.to keeps them there): no sync
                return None, ctx.mask
        index = g.prompt_ids.to(ctx.keys[0].device, non_blocking=True)
        return index, None if ctx.mask is None else ctx.mask[index]

    def _run(self, module: nn.Module, *args: Tensor | bool | None) -> Tensor:
        if self.cfg.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _predict_group(self, g: MatrixGroup | EmbeddedGroup, ctx: _TextContext,
                       stage1_tokens: Tensor | None) -> HyperOutput:
        embedded = g if isinstance(g, EmbeddedGroup) else None
        if embedded is not None:
            if embedded.model_id != id(self):
                raise ValueError("HyperNet: an EmbeddedGroup made by another model")
            g = embedded.group
        key = f"{g.shape[0]}x{g.shape[1]}"
        if key not in self.heads:
            raise ValueError(f"HyperNet: no head for matrices of shape {g.shape}; the vocabulary has "
                             f"{sorted(self.heads)}")
        if stage1_tokens is not None and stage1_tokens.shape[0] != g.weight.shape[0]:
            raise ValueError(f"HyperNet: stage1_tokens {tuple(stage1_tokens.shape)} for {g.weight.shape[0]} matrices")
        index, mask = self._text_for(g, ctx)  # before any heavy work: it syncs with the host
        x, rms = self._embed(g) if embedded is None else (embedded.tokens, embedded.rms)
        x, pending = self.run_blocks(x, ctx, 0, self.cfg.num_blocks, index=index, mask=mask,
                                     stage1_tokens=stage1_tokens, first_cached=embedded is not None)
        return self.finish(x, g.shape, rms, pending)

    def run_blocks(self, x: Tensor, ctx: _TextContext, start: int, stop: int, *, pending: Tensor | None = None,
                   index: Tensor | None = None, mask: Tensor | None = None, stage1_tokens: Tensor | None = None,
                   first_cached: bool = False) -> tuple[Tensor, Tensor | None]:
        """Trunk blocks ``start`` to ``stop - 1`` (and the stage-I blocks after them) on the stream
        ``x + pending``; returns the new stream the same way, (x, pending): the last residual add
        is left to the consumer (``finish``, ``final_tokens`` or the next ``run_blocks``), where it
        fuses with the next norm.

        Args:
            x, pending: (n, S, d) tokens (pending None: nothing to add); ctx: the prompts' K / V
                (``text_context``).
            index: (n,) prompt of each matrix, or None when x holds m consecutive matrices per prompt.
            mask: the text mask matching ``index`` (None: every key valid).
            stage1_tokens: (n, S1, d) frozen stage-I tokens (stage II with stage-I features).
            first_cached: x went through block 0's self half already (``embed``).
        """
        for i in range(start, stop):
            k, v = ctx.keys[i], ctx.values[i]
            if index is not None:
                k, v = k[index], v[index]
            x, pending = self._run(self.blocks[i], x, pending, k, v, mask, i == 0 and first_cached)
            if stage1_tokens is not None and str(i) in self.stage1_blocks:
                x, pending = self._run(self.stage1_blocks[str(i)], x, pending, stage1_tokens)
        return x, pending

    def final_tokens(self, x: Tensor, pending: Tensor | None = None) -> Tensor:
        """The final norm of the stream ``x + pending``: the tokens stage II attends to."""
        return self.norm(_deferred(x, pending))

    def finish(self, x: Tensor, shape: tuple[int, int], rms: Tensor, pending: Tensor | None = None) -> HyperOutput:
        """Final norm of the stream ``x + pending``, mean pool and the heads of matrices of ``shape`` (out, in)."""
        tokens = self.final_tokens(x, pending)
        h = tokens.mean(dim=1)
        a, b = self.heads[f"{shape[0]}x{shape[1]}"](h, rms)
        alpha = None if self.alpha_head is None else F.softplus(self.alpha_head(h).squeeze(-1).float())
        return HyperOutput(a, b, alpha, tokens)
