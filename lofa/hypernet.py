"""The LoFA hypernetwork: (prompt, base weight matrix) -> LoRA factors A, B and a scale alpha.

One model serves both stages (DESIGN section 1). Per adapted matrix W the input is
W / RMS(W) cut into ``patch x patch`` tiles (zero-padded where the patch does not
divide a side), embedded by a stride-``patch`` conv (a matmul over the unfolded
tiles), normalised, plus learned row / column / depth / module-type embeddings and
a CLS token. The prompt enters through cross-attention to the projected text (its keys
and values computed once per prompt, shared by its matrices). The trunk is
``num_blocks`` x [self-attn, MLP, cross-attn to the text, MLP], pre-norm, QK-norm.
Tokens are mean-pooled into per-shape linear heads: A (r x in) and B (out x r), B
scaled by RMS(W) so dW = B A is in W's units; the B head starts at (stage I: near)
zero. Stage I's loss reads the response map of dW (lofa.objectives). Stage II adds cross-attention blocks to the frozen stage-I tokens of the same matrix
(after the trunk blocks in ``cross_stage1_after``) and a per-matrix scale alpha.

Matrices of one shape are batched; shapes are the only Python-level loop. Parameters
stay in the dtype they were created in (fp32 under autocast); activations, the
residual stream included, are in the compute dtype (bf16 under autocast), norm
statistics in fp32. Gradient checkpointing passes each block itself to ``checkpoint``
(no late binding: the public release's defect). Which kernel runs an attention or an
MLP (Triton, cuBLAS epilogues, plain PyTorch) is ``lofa.kernels.dispatch``'s choice;
its docstring holds the efficiency decisions behind this layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lofa.config import ConfigError
from lofa.hypertypes import EmbeddedGroup, HyperOutput, MatrixGroup, TextContext, trim_text
from lofa.kernels import dispatch
from lofa.layers import ALL_MODULES, Vocabulary

#: Bytes of unfolded weight tiles handled at once by the patch embedding.
_PATCH_CHUNK_BYTES = 1 << 28
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


def group_by_shape(vocab: Vocabulary, matrix_ids: Tensor, prompt_ids: Tensor
                   ) -> list[tuple[tuple[int, int], Tensor]]:
    """Positions of each shape in a flat list of (matrix, prompt) pairs: matrix_ids, prompt_ids (N,)
    -> [((out, in), positions (n,) long)], shapes in sorted order, positions sorted by prompt
    (stable), which lets the model share each prompt's text K / V."""
    ids = matrix_ids.tolist()
    order = torch.argsort(prompt_ids.cpu(), stable=True).tolist()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for pos in order:
        m = vocab[ids[pos]]
        by_shape.setdefault((m.out_features, m.in_features), []).append(pos)
    return [(s, torch.tensor(by_shape[s], dtype=torch.long)) for s in sorted(by_shape)]


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose gain is cast to the input's dtype (the fused kernel under bf16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


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
        (then pass ``k_normed=False`` to ``forward``, whose attention normalises it)."""
        k, v = self.kv(c).chunk(2, dim=-1)
        return (dispatch.heads(k, c.shape[0], self.num_heads, self.k_norm if norm_k else None),
                dispatch.heads(v, c.shape[0], self.num_heads))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, k_normed: bool = True) -> Tensor:
        """x: (n, S, d) with n = P * m: the m consecutive matrices of a prompt share its K, V
        (P, heads, L, head_dim); mask: (P, L) or None. Returns (n, S, d)."""
        y = dispatch.cross_attention(self.q(x), k, v, mask, self.num_heads, self.q_norm,
                                     None if k_normed else self.k_norm)
        return self.o(y)


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
        return self.o(dispatch.self_attention(self.qkv(x), self.num_heads, self.q_norm, self.k_norm))


class MLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear (the GELU module holds no weights; ``dispatch.mlp`` runs it)."""

    def __init__(self, d: int, ratio: float):
        hidden = int(round(d * ratio))
        super().__init__(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))

    def forward(self, x: Tensor) -> Tensor:
        return dispatch.mlp(x, self[0], self[2])


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

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, skip_self: bool = False) -> Tensor:
        """x: (n, S, d); k, v: (P, heads, L, head_dim) with n a multiple of P. ``skip_self``: x
        went through ``self_part`` already (it does not read the prompt: ``HyperNet.embed``)."""
        if not skip_self:
            x = self.self_part(x)
        x = x + self.cross(self.norm3(x), k, v, mask)
        return x + self.mlp2(self.norm4(x))

    def self_part(self, x: Tensor) -> Tensor:
        """[self-attn, MLP]: the half of the block that does not read the prompt."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp1(self.norm2(x))


class Stage1Block(nn.Module):
    """Stage II only: [cross-attn to the frozen stage-I tokens of the same matrix, MLP]."""

    def __init__(self, cfg: HyperNetConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.norm_x, self.norm_ctx, self.norm_mlp = (nn.LayerNorm(d, eps=eps) for _ in range(3))
        self.cross = CrossAttention(d, cfg.num_heads, cfg.qk_norm, eps)
        self.mlp = MLP(d, cfg.mlp_ratio)

    def forward(self, x: Tensor, stage1_tokens: Tensor) -> Tensor:
        """x: (n, S, d); stage1_tokens: (n, S1, d), one context per matrix: its K norm is left to the
        attention (inside the kernel where one runs)."""
        k, v = self.cross.context(self.norm_ctx(stage1_tokens), norm_k=False)
        x = x + self.cross(self.norm_x(x), k, v, None, k_normed=False)
        return x + self.mlp(self.norm_mlp(x))


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
        return a, b * rms[:, None, None].to(b.dtype)


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
        ctx = self.text_context(*trim_text(text, text_mask, self.cfg.text_dim))
        return [self._predict_group(g, ctx, None if stage1_tokens is None else stage1_tokens[i])
                for i, g in enumerate(groups)]

    def compile_regions(self, mode: str | None = None, edges: bool = True,
                        dynamic: bool | None = False) -> "HyperNet":
        """Regional ``torch.compile``: each trunk (and stage-I) block, one compiled code per block
        type; with ``edges`` also the matrix embedding, the text's K / V and the heads.
        ``dynamic``: torch.compile's; False (static shapes: one compile per matrix shape and text
        length) for a predictor, None (a shape that changes is recompiled once, dynamic) for
        training, whose batches vary. Returns self."""
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

    def text_context(self, text: Tensor, mask: Tensor | None) -> TextContext:
        """Project the prompts once and compute every trunk block's K / V once per prompt, for text
        (P, L, text_dim) and mask (P, L) bool or None (every token valid) trimmed by ``trim_text``."""
        c = self.text_norm(self.text_proj(text.to(self._compute_dtype(text.device))))  # (P, L, d)
        kv = [block.cross.context(c) for block in self.blocks]
        return TextContext(tuple(k for k, _ in kv), tuple(v for _, v in kv), mask)

    def _embed(self, g: MatrixGroup) -> tuple[Tensor, Tensor]:
        """Tokens (n, 1 + T, d) of W / RMS(W), and RMS(W) (n,) fp32. The 1 / RMS scale is applied
        after the matmul (it is linear); the tiles are unfolded a bounded chunk of matrices at a time."""
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

    def _text_for(self, g: MatrixGroup, ctx: TextContext) -> tuple[Tensor | None, Tensor | None]:
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

    def _predict_group(self, g: MatrixGroup | EmbeddedGroup, ctx: TextContext,
                       stage1_tokens: Tensor | None) -> HyperOutput:
        embedded = g if isinstance(g, EmbeddedGroup) else None
        if embedded is not None:
            if embedded.model_id != id(self):
                raise ValueError("HyperNet: an EmbeddedGroup made by another model")
            g = embedded.group
        if f"{g.shape[0]}x{g.shape[1]}" not in self.heads:
            raise ValueError(f"HyperNet: no head for matrices of shape {g.shape}; the vocabulary has "
                             f"{sorted(self.heads)}")
        if stage1_tokens is not None and stage1_tokens.shape[0] != g.weight.shape[0]:
            raise ValueError(f"HyperNet: stage1_tokens {tuple(stage1_tokens.shape)} for {g.weight.shape[0]} matrices")
        index, mask = self._text_for(g, ctx)  # before any heavy work: it syncs with the host
        x, rms = self._embed(g) if embedded is None else (embedded.tokens, embedded.rms)
        x = self.run_blocks(x, ctx, index=index, mask=mask, stage1_tokens=stage1_tokens,
                            first_cached=embedded is not None)
        return self.finish(x, g.shape, rms)

    def run_blocks(self, x: Tensor, ctx: TextContext, *, index: Tensor | None = None, mask: Tensor | None = None,
                   stage1_tokens: Tensor | None = None, first_cached: bool = False) -> Tensor:
        """The trunk blocks (and the stage-I blocks after those in ``cross_stage1_after``) on x (n, S, d).

        Args:
            ctx: the prompts' K / V (``text_context``); index: (n,) prompt of each matrix, or None when
                x holds m consecutive matrices per prompt; mask: the text mask matching ``index``.
            stage1_tokens: (n, S1, d) frozen stage-I tokens (stage II with stage-I features).
            first_cached: x went through block 0's self half already (``embed``)."""
        for i, block in enumerate(self.blocks):
            k, v = ctx.keys[i], ctx.values[i]
            if index is not None:
                k, v = k[index], v[index]
            x = self._run(block, x, k, v, mask, i == 0 and first_cached)
            if stage1_tokens is not None and str(i) in self.stage1_blocks:
                x = self._run(self.stage1_blocks[str(i)], x, stage1_tokens)
        return x

    def final_tokens(self, x: Tensor) -> Tensor:
        """The final norm of the stream: the tokens stage II attends to."""
        return self.norm(x)

    def finish(self, x: Tensor, shape: tuple[int, int], rms: Tensor) -> HyperOutput:
        """Final norm, mean pool and the heads of matrices of ``shape`` (out, in)."""
        tokens = self.final_tokens(x)
        h = tokens.mean(dim=1)
        a, b = self.heads[f"{shape[0]}x{shape[1]}"](h, rms)
        alpha = None if self.alpha_head is None else F.softplus(self.alpha_head(h).squeeze(-1).float())
        return HyperOutput(a, b, alpha, tokens)
