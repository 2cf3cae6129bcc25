"""Stage-I and stage-II loss steps of the LoFA hypernetwork (``loss_step(model, batch)``).

Stage I learns the response map R = |dW / W| > tau of each matrix's fitted LoRA
(``lofa.lora.response_map``). The predicted map's logit is a log-ratio,

    logit = s * (log(|dW_hat| + eps tau |W|) - log((1 + eps) tau |W|)),

0 exactly at |dW_hat| = tau |W| (the target's threshold), about ``s log(1/eps)``
below zero at dW_hat = 0 and unbounded above, so confident negatives and
positives are both reachable (the public release's logit never went below
-tau / T: a negative's probability never fell under 0.45).

The predicted map, its precision / recall / F1 and the dW metrics are the single
definitions in ``lofa.lora`` (``delta_response_map``, ``map_counts``, ``map_scores``,
``dw_scores``), which ``lofa.evaluate`` uses too.

Stage II regresses dW = alpha B A onto the fitted LoRA's dW, plus a weight times the
flow-matching loss of the frozen DiT running the predicted LoRA (alpha folded into B,
exactly the dW of the regression term) on each clip's latent and caption. Two
objectives (:class:`Stage2LossConfig`): ``paper`` (LoFA's: L1 over every entry + 10 x
flow) and ``balanced`` (per-matrix relative L1 + flow, weights set from the terms'
measured gradient norms; docs/objectives.md says why the paper's is lopsided here).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lofa.kernels import stage1_kernel
from lofa.hypernet import HyperNet, HyperOutput, MatrixGroup, group_by_shape
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights, delta_response_map, dw_scores, map_counts, map_scores, response_map


@dataclass(frozen=True)
class LoraGroup:
    """A MatrixGroup with the fitted LoRA of each matrix (rank of the fit, any).

    Attributes:
        matrices: the base weights and their ids (n matrices of one shape).
        lora_A: (n, r_fit, in); lora_B: (n, out, r_fit). dW = lora_B @ lora_A.
    """

    matrices: MatrixGroup
    lora_A: Tensor
    lora_B: Tensor

    def delta(self) -> Tensor:
        """(n, out, in) fitted dW in float32."""
        return torch.bmm(self.lora_B.float(), self.lora_A.float())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LoraGroup":
        return LoraGroup(self.matrices.to(device, non_blocking), self.lora_A.to(device, non_blocking=non_blocking),
                         self.lora_B.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class HyperBatch:
    """Prompts, their matrices (by shape) with fitted LoRAs, and (stage II) their clips.

    Attributes:
        text: (P, L, text_dim) prompt embeddings, also the DiT's context.
        text_mask: (P, L) bool.
        groups: LoraGroups whose prompt_ids index the P prompts.
        latents, noise: (P, C, T, H, W) clean clip latents and flow-matching noise.
        timesteps: (P,) flow-matching timesteps in [0, 1000].
    """

    text: Tensor
    text_mask: Tensor
    groups: tuple[LoraGroup, ...]
    latents: Tensor | None = None
    noise: Tensor | None = None
    timesteps: Tensor | None = None

    @property
    def matrix_groups(self) -> list[MatrixGroup]:
        return [g.matrices for g in self.groups]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "HyperBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        # the text mask stays on the host: the model reads it there (HyperNet's trim_text), no GPU sync
        return HyperBatch(mv(self.text), self.text_mask, tuple(g.to(device, non_blocking) for g in self.groups),
                          mv(self.latents), mv(self.noise), mv(self.timesteps))


def make_batch(vocab: Vocabulary, base: Sequence[Tensor], loras: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]],
               text: Tensor, text_mask: Tensor, matrix_ids: Sequence[Sequence[int]] | None = None,
               **clips: Tensor) -> HyperBatch:
    """Assemble a HyperBatch (grouped by shape, sorted by prompt).

    Args:
        base: W (out, in) of every vocabulary matrix (``lofa.lora.base_weights``).
        loras: per prompt, the fitted LoRA as (A per matrix (r, in), B per matrix (out, r)).
        text, text_mask: (P, L, D) and (P, L), one row per LoRA.
        matrix_ids: per prompt, the vocabulary indices to use (None: all of them).
        clips: ``latents``, ``noise``, ``timesteps`` for stage II.
    """
    if len(loras) != text.shape[0]:
        raise ValueError(f"make_batch: {len(loras)} LoRAs for {text.shape[0]} prompts")
    picks = [list(range(len(vocab)))] * len(loras) if matrix_ids is None else [list(m) for m in matrix_ids]
    mids = torch.tensor([j for p in picks for j in p], dtype=torch.long)
    pids = torch.tensor([i for i, p in enumerate(picks) for _ in p], dtype=torch.long)
    groups = []
    for _, pos in group_by_shape(vocab, mids, pids):
        m, p = mids[pos].tolist(), pids[pos].tolist()
        g = MatrixGroup(torch.stack([base[j] for j in m]), mids[pos], pids[pos])
        groups.append(LoraGroup(g, torch.stack([loras[i][0][j] for i, j in zip(p, m)]),
                                torch.stack([loras[i][1][j] for i, j in zip(p, m)])))
    return HyperBatch(text, text_mask.bool(), tuple(groups), **clips)


def random_matrix_ids(num_matrices: int, per_lora: int, num_loras: int,
                      generator: torch.Generator | None = None) -> list[list[int]]:
    """``per_lora`` distinct random vocabulary indices for each LoRA (stage I: 10 in the paper)."""
    if not 0 < per_lora <= num_matrices:
        raise ValueError(f"random_matrix_ids: per_lora must be in [1, {num_matrices}], got {per_lora}")
    return [sorted(torch.randperm(num_matrices, generator=generator)[:per_lora].tolist()) for _ in range(num_loras)]


# --------------------------------------------------------------------------- stage I

@dataclass(frozen=True)
class Stage1LossConfig:
    """tau: response threshold; logit_scale: s; eps: floor of the ratio (sets the lowest logit);
    l2_weight: weight of mean(A^2) + mean(B^2); pos_weight: BCE weight of positives (None = 1);
    compile: fuse the per-entry map, logit and BCE with torch.compile (GPU);
    fused: the one-kernel Triton loss (``lofa.kernels.stage1_kernel``, never materialises dW);
    None = on CUDA when triton is there."""

    tau: float = 0.02
    logit_scale: float = 4.0
    eps: float = 1e-4
    l2_weight: float = 1e-4
    pos_weight: float | None = None
    compile: bool = False
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.tau <= 0 or self.logit_scale <= 0 or not 0 < self.eps < 1 or self.l2_weight < 0:
            raise ValueError(f"Stage1LossConfig: need tau > 0, logit_scale > 0, 0 < eps < 1, l2_weight >= 0; "
                             f"got {self}")


def response_logit(delta: Tensor, weight: Tensor, tau: float = 0.02, logit_scale: float = 4.0,
                   eps: float = 1e-4) -> Tensor:
    """Logit of the predicted response map (float32), > 0 exactly where |delta| > tau |W|.

    Args:
        delta: (..., out, in) predicted dW; weight: W, same shape.
    Returns:
        s * (log(|dW| + eps tau |W|) - log((1 + eps) tau |W|)); in [s log(eps / (1 + eps)), inf).
    """
    ref = tau * weight.float().abs() + torch.finfo(torch.float32).tiny
    return logit_scale * (torch.log(delta.float().abs() + eps * ref) - torch.log(ref) - math.log1p(eps))


def _unwrap(model: nn.Module) -> HyperNet:
    """The HyperNet inside a DDP / accelerate wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, HyperNet):
        raise TypeError(f"expected a HyperNet (or a wrapper of one), got {type(inner).__name__}")
    return inner


def _stage1_terms(A: Tensor, B: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, tau: float,
                  logit_scale: float, eps: float, pos_weight: float | None) -> tuple[Tensor, Tensor]:
    """BCE summed over the entries of one group, and its (3,) map counts."""
    with torch.no_grad():
        target = response_map(lora_A, lora_B, weight, tau)
    delta = torch.bmm(B, A)
    logit = response_logit(delta, weight, tau, logit_scale, eps)
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=logit.device)
    bce = F.binary_cross_entropy_with_logits(logit, target.float(), reduction="sum", pos_weight=pw)
    # the predicted map is the one definition applied to the predicted dW (not ``logit > 0``, which
    # agrees except where W = 0 and 0 < |dW| <= float32 tiny, or at the threshold after rounding)
    return bce, map_counts(delta_response_map(delta.detach(), weight, tau), target)


@functools.cache
def _compiled_stage1_terms() -> Callable[..., tuple[Tensor, Tensor]]:
    return torch.compile(_stage1_terms, dynamic=False)


def _stage1_terms_for(cfg: Stage1LossConfig, device: torch.device) -> Callable[..., tuple[Tensor, Tensor]]:
    if cfg.fused or (cfg.fused is None and stage1_kernel.available(device)):
        if not stage1_kernel.available(device) and not os.environ.get("TRITON_INTERPRET"):
            raise ValueError(f"Stage1LossConfig.fused: the Triton loss runs on CUDA (or under TRITON_INTERPRET=1), "
                             f"not on {device}")
        return stage1_kernel.stage1_terms
    return _compiled_stage1_terms() if cfg.compile else _stage1_terms


def stage1_terms(model: nn.Module, batch: HyperBatch, cfg: Stage1LossConfig = Stage1LossConfig()
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(BCE mean over every entry, L2 mean over matrices, (3,) pooled response-map counts
    ``lofa.lora.map_counts`` of the predicted dW's map against the fitted LoRA's)."""
    if _unwrap(model).cfg.stage != 1:
        raise ValueError("stage1_loss: the model is not a stage-I HyperNet (cfg.stage != 1)")
    terms = _stage1_terms_for(cfg, batch.text.device)
    outs = model(batch.matrix_groups, batch.text, batch.text_mask)
    bce_sum = l2_sum = 0.0
    counts = torch.zeros(3, device=batch.text.device)
    entries = matrices = 0
    for g, out in zip(batch.groups, outs):
        bce_g, counts_g = terms(out.A, out.B, g.matrices.weight, g.lora_A, g.lora_B, cfg.tau, cfg.logit_scale,
                                cfg.eps, cfg.pos_weight)
        bce_sum = bce_sum + bce_g
        l2_sum = l2_sum + (out.A.float().pow(2).mean((1, 2)) + out.B.float().pow(2).mean((1, 2))).sum()
        counts += counts_g
        entries, matrices = entries + g.lora_A.shape[0] * math.prod(g.matrices.shape), matrices + g.lora_A.shape[0]
    return bce_sum / entries, l2_sum / matrices, counts


def stage1_loss(model: nn.Module, batch: HyperBatch, cfg: Stage1LossConfig = Stage1LossConfig()
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """BCE of the predicted response map against the fitted LoRA's, plus l2_weight (mean A^2 + mean B^2).

    The BCE is the mean over every entry of every matrix; the L2 the mean over
    matrices. Metrics (detached 0-d tensors): bce, l2, precision, recall, f1 of the
    predicted dW's response map (``lofa.lora.delta_response_map``, ``lofa.lora.map_scores``).
    """
    bce, l2, counts = stage1_terms(model, batch, cfg)
    metrics = {"bce": bce.detach(), "l2": l2.detach(), **map_scores(counts)}
    return bce + cfg.l2_weight * l2, metrics


# --------------------------------------------------------------------------- stage II

def predicted_lora(vocab: Vocabulary, groups: Sequence[MatrixGroup], outs: Sequence[HyperOutput],
                  num_prompts: int) -> LoRAWeights:
    """The predicted LoRA of every prompt as a K = P LoRAWeights (alpha folded into B).

    Needs every vocabulary matrix once per prompt. A group laid out as m matrices per
    prompt in the same order for every prompt is split by views; others by indexing.
    """
    A: list[Tensor | None] = [None] * len(vocab)
    B: list[Tensor | None] = [None] * len(vocab)
    for g, out in zip(groups, outs):
        mids, pids = g.matrix_ids.tolist(), g.prompt_ids.tolist()
        n = len(mids)
        m = n // num_prompts
        b_scaled = out.B_scaled
        if m * num_prompts == n and pids == [i // m for i in range(n)] and mids == mids[:m] * num_prompts:
            for j, a_j, b_j in zip(mids[:m], out.A.unflatten(0, (num_prompts, m)).unbind(1),
                                   b_scaled.unflatten(0, (num_prompts, m)).unbind(1)):
                A[j], B[j] = a_j, b_j
            continue
        where = {(p, j): i for i, (p, j) in enumerate(zip(pids, mids))}
        for j in set(mids):
            idx = torch.tensor([where[(p, j)] for p in range(num_prompts) if (p, j) in where],
                               device=out.A.device)
            if idx.numel() != num_prompts:
                raise ValueError(f"stage2_loss: matrix {vocab[j].prefix} is predicted for {idx.numel()} of "
                                 f"{num_prompts} prompts; the DiT term needs every matrix for every prompt")
            A[j], B[j] = out.A[idx], b_scaled[idx]
    missing = [vocab[j].prefix for j, a in enumerate(A) if a is None]
    if missing:
        raise ValueError(f"stage2_loss: the DiT term needs every vocabulary matrix; missing {missing[:3]} "
                         f"({len(missing)} in all)")
    return LoRAWeights(vocab, tuple(A), tuple(B))


def _flow_term(model: HyperNet, batch: HyperBatch, outs: Sequence[HyperOutput], dit: nn.Module,
               grad_checkpointing: bool) -> Tensor:
    from lofa.wan import flow_loss

    if batch.latents is None or batch.noise is None or batch.timesteps is None:
        raise ValueError("stage2_loss: the flow-matching term needs batch.latents, batch.noise and batch.timesteps")
    if any(p.requires_grad for p in dit.parameters()):
        raise ValueError("stage2_loss: the DiT must be frozen (requires_grad_(False))")
    lora = predicted_lora(model.vocab, batch.matrix_groups, outs, batch.text.shape[0])
    return flow_loss(dit, batch.latents, batch.text, batch.timesteps, batch.noise, lora=lora,
                     reduction="mean", grad_checkpointing=grad_checkpointing)


@dataclass(frozen=True)
class Stage2LossConfig:
    """The stage-II objective (``train_stage2.loss``): dw_weight * dW term + fm_weight * flow term.

    objective:
        ``paper``: LoFA's. dW term = mean |dW_hat - dW| over every entry of every matrix
        (absolute L1), default weights 1 and 10.
        ``balanced``: dW term = mean over matrices of a per-matrix relative error, 1 at
        dW_hat = 0 for every matrix whatever its LoRA's scale: ``dw_norm`` l1:
        ||dW_hat - dW||_1 / ||dW||_1, l2: ||dW_hat - dW||_F^2 / ||dW||_F^2. Default weights
        :data:`BALANCED_WEIGHTS`, set from the terms' measured gradient norms
        (benchmarks/stage2_balance.py, docs/objectives.md).
    dw_weight, fm_weight: None = the objective's default.
    """

    objective: Literal["paper", "balanced"] = "balanced"
    dw_norm: Literal["l1", "l2"] = "l2"
    dw_weight: float | None = None
    fm_weight: float | None = None

    def __post_init__(self) -> None:
        if self.dw_norm not in ("l1", "l2"):
            raise ValueError(f"Stage2LossConfig.dw_norm: {self.dw_norm!r} is not one of ['l1', 'l2']")
        if self.objective not in OBJECTIVE_WEIGHTS:
            raise ValueError(f"Stage2LossConfig.objective: {self.objective!r} is not one of {list(OBJECTIVE_WEIGHTS)}")
        for name in ("dw_weight", "fm_weight"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"Stage2LossConfig.{name}: must be a finite number >= 0, got {v}")

    @property
    def weights(self) -> tuple[float, float]:
        """(dW term weight, flow term weight) after resolving the objective's defaults."""
        dw, fm = OBJECTIVE_WEIGHTS[self.objective]
        return (dw if self.dw_weight is None else self.dw_weight, fm if self.fm_weight is None else self.fm_weight)


#: Default (dW, flow) term weights of each objective. ``balanced``: measured with
#: benchmarks/stage2_balance.py on the default preset (docs/objectives.md).
BALANCED_WEIGHTS = (1.0, 0.3)
OBJECTIVE_WEIGHTS = {"paper": (1.0, 10.0), "balanced": BALANCED_WEIGHTS}


def dw_terms(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over the n matrices of: |pred - target| over every entry, ||pred - target||_1 / ||target||_1,
    ||pred - target||_F^2 / ||target||_F^2.

    pred, target: (n, out, in). A matrix whose fitted dW is exactly 0 divides by float32 tiny."""
    diff, t, tiny = (pred - target).flatten(1), target.flatten(1), torch.finfo(torch.float32).tiny
    err = diff.abs().sum(1)
    rel_l2 = diff.pow(2).sum(1) / t.pow(2).sum(1).clamp_min(tiny)
    return err.sum(), (err / t.abs().sum(1).clamp_min(tiny)).sum(), rel_l2.sum()


def stage2_terms(model: nn.Module, stage1_model: nn.Module | None, batch: HyperBatch, dit: nn.Module | None = None,
                 *, dit_grad_checkpointing: bool = False
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor], list[HyperOutput]]:
    """The unweighted stage-II terms with their graphs, detached metrics and the model's outputs per group.

    Terms: ``l1`` (the paper's: mean |dW_hat - dW| over every entry), ``dw_rel_l1`` and ``dw_rel_l2``
    (means over matrices of ||dW_hat - dW||_1 / ||dW||_1 and ||dW_hat - dW||_F^2 / ||dW||_F^2) and, when ``dit`` is given, ``fm`` (the frozen DiT's
    flow-matching loss with the predicted LoRA). Metrics: dw_rel_err and dw_cos
    (``lofa.lora.dw_scores``, means over matrices), alpha_mean.
    """
    net = _unwrap(model)
    if net.cfg.stage != 2:
        raise ValueError("stage2_loss: the model is not a stage-II HyperNet (cfg.stage != 2)")
    stage1_tokens = None
    if net.cfg.uses_stage1:
        if stage1_model is None:
            raise ValueError("stage2_loss: this model attends to stage-I tokens; pass the stage-I model")
        with torch.no_grad():
            stage1_tokens = [o.tokens for o in stage1_model(batch.matrix_groups, batch.text, batch.text_mask)]
    outs = model(batch.matrix_groups, batch.text, batch.text_mask, stage1_tokens)
    l1_sum, rel_sum, rel2_sum, entries, matrices, scores, alphas = 0.0, 0.0, 0.0, 0, 0, [], []
    for g, out in zip(batch.groups, outs):
        pred, target = out.delta().float(), g.delta()
        l1_g, rel_g, rel2_g = dw_terms(pred, target)
        l1_sum, rel_sum, rel2_sum = l1_sum + l1_g, rel_sum + rel_g, rel2_sum + rel2_g
        entries, matrices = entries + target.numel(), matrices + target.shape[0]
        with torch.no_grad():
            scores.append(dw_scores(pred, target))
            alphas.append(out.alpha.detach())
    terms = {"l1": l1_sum / entries, "dw_rel_l1": rel_sum / matrices, "dw_rel_l2": rel2_sum / matrices}
    metrics = {"dw_rel_err": torch.cat([s["dw_rel_err"] for s in scores]).mean(),
               "dw_cos": torch.cat([s["dw_cos"] for s in scores]).mean(), "alpha_mean": torch.cat(alphas).mean()}
    if dit is not None:
        terms["fm"] = _flow_term(net, batch, outs, dit, dit_grad_checkpointing)
    return terms, metrics, list(outs)


def stage2_loss(model: nn.Module, stage1_model: nn.Module | None, batch: HyperBatch, dit: nn.Module | None = None,
                cfg: Stage2LossConfig = Stage2LossConfig(), *, dit_grad_checkpointing: bool = False
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """dw_weight * dW term(alpha B A, dW_fit) + fm_weight * flow-matching loss of the DiT with that LoRA
    (``cfg``: :class:`Stage2LossConfig`; the dW term is the paper's L1 or the per-matrix relative L1).

    ``stage1_model`` (frozen, run without gradients) supplies the stage-I tokens; it
    is not used by the ablation (``use_stage1=False``) and may be None there. The
    flow term is skipped when ``dit`` is None or its weight is 0. Metrics (detached
    0-d tensors): both dW terms (l1, dw_rel_l1), fm (when computed), this objective's
    weighted terms dw_term and fm_term, and :func:`stage2_terms`' metrics.
    """
    dw_weight, fm_weight = cfg.weights
    terms, metrics, _ = stage2_terms(model, stage1_model, batch, dit if fm_weight else None,
                                     dit_grad_checkpointing=dit_grad_checkpointing)
    dw_term = dw_weight * terms["l1" if cfg.objective == "paper" else f"dw_rel_{cfg.dw_norm}"]
    loss = dw_term
    metrics = {**{k: terms[k].detach() for k in ("l1", "dw_rel_l1", "dw_rel_l2")}, "dw_term": dw_term.detach(),
               **metrics}
    if "fm" in terms:
        loss = loss + fm_weight * terms["fm"]
        metrics["fm"] = terms["fm"].detach()
        metrics["fm_term"] = (fm_weight * terms["fm"]).detach()
    return loss, metrics
