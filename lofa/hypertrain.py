"""Stages ``train_stage1`` and ``train_stage2``: data, batches, training and held-out checks.

Both stages run the one training loop (:func:`lofa.train.train`) with a stage-specific
``loss_step`` from :mod:`lofa.objectives`. Data are the fitted LoRAs of the
``fit_loras`` stage joined with their clips' captions (and, for stage II, latents), read and
written through :mod:`lofa.artifacts`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lofa.artifacts.hypernets import hypernet_meta
from lofa.artifacts.loras import LoRASet
from lofa.config import ConfigError
from lofa.hypernet import HyperNet, HyperNetConfig, MatrixGroup, group_by_shape
from lofa.inputkey import InputKey
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights, base_weights, map_scores
from lofa.objectives import (HyperBatch, Stage1LossConfig, Stage2LossConfig, make_batch, predicted_lora,
                             random_matrix_ids, stage1_loss, stage1_terms, stage2_loss)
from lofa.train import TrainConfig, TrainResult, batch_indices, train
from lofa.wan import sample_timesteps


@dataclass(frozen=True)
class Stage1Config:
    """The ``train_stage1`` params section."""

    model: HyperNetConfig
    train: TrainConfig
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    prompts_per_batch: int = 8
    matrices_per_lora: int = 10  # the paper: 10 random matrices per LoRA
    seed: int = 0
    #: torch.compile the hypernetwork's regions (``HyperNet.compile_regions``, shapes dynamic
    #: after their first change): on a GPU about half the step time at the Wan2.1 shapes
    #: (benchmarks/bench_hypernet.py, train1 against train1_compiled), for a compile in the first steps.
    compile: bool = False


@dataclass(frozen=True)
class Stage2Config:
    """The ``train_stage2`` params section (all matrices of each LoRA per step)."""

    model: HyperNetConfig
    train: TrainConfig
    #: the objective: ``balanced`` (per-matrix relative L1 + flow, weights from measured gradient
    #: norms) or ``paper`` (L1 + 10 x flow); docs/objectives.md
    loss: Stage2LossConfig = field(default_factory=Stage2LossConfig)
    prompts_per_batch: int = 4
    dit_grad_checkpointing: bool = False
    seed: int = 0
    #: torch.compile the hypernetwork's regions, as ``Stage1Config.compile``.
    compile: bool = False


def check_shared(section: str, model: HyperNetConfig, data: LoRASet, *, params: str | Path, loras: str | Path,
                 pre: str | Path, stage1: HyperNet | None = None, stage1_file: str | Path | None = None) -> None:
    """Values that ``section``'s model shares with what it consumes, checked before any training step.

    The params keys are copies of values other stages fixed: ``<section>.model.rank`` must be the rank
    the LoRAs in ``loras`` were fitted with (``fit_loras.rank``), ``text_dim`` the width of the
    preprocessed text in ``pre``; stage II attends to stage-I tokens, so its ``d_model`` and
    ``text_dim`` must be those of the stage-I model's sidecar ``stage1_file``. A mismatch otherwise
    surfaces as a shape error inside the first step, or, for the rank, never (a stage-II model of
    another rank than its oracles)."""
    fit_rank, width = data.A[0].shape[1], data.clips.text.shape[-1]
    errors = []
    if model.rank != fit_rank:
        errors.append(f"{section}.model.rank is {model.rank} but the LoRAs in {loras} have rank {fit_rank} "
                      "(fit_loras.rank): set them equal")
    if model.text_dim != width:
        errors.append(f"{section}.model.text_dim is {model.text_dim} but the text in {pre} is {width}-d "
                      "(the preprocess section's text encoder)")
    if stage1 is not None:
        sidecar = Path(stage1_file).with_suffix(".json") if stage1_file else "the stage-I model"
        if stage1.cfg.stage != 1:
            errors.append(f"{sidecar} is no stage-I model (meta.hypernet.stage {stage1.cfg.stage})")
        errors += [f"{section}.model.{name} is {getattr(model, name)} but {sidecar} has meta.hypernet.{name} "
                   f"{getattr(stage1.cfg, name)} (stage II attends to the stage-I tokens)"
                   for name in ("d_model", "text_dim") if getattr(model, name) != getattr(stage1.cfg, name)]
    if errors:
        raise ConfigError(f"{params}: " + "; ".join(errors))


def _generator(seed: int, draw: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + draw * 7919 + rank)


def stage1_batches(data: LoRASet, base: list[torch.Tensor], vocab: Vocabulary, cfg: Stage1Config):
    """``batches(draw, rank, world)``: prompts_per_batch LoRAs, matrices_per_lora random matrices each."""

    def batches(draw: int, rank: int, world: int) -> HyperBatch:
        idx = batch_indices(draw, num_items=len(data), global_batch=cfg.prompts_per_batch, rank=rank,
                            world=world, seed=cfg.seed)
        mids = random_matrix_ids(len(vocab), cfg.matrices_per_lora, len(idx), _generator(cfg.seed, draw, rank))
        return make_batch(vocab, base, [data.lora(i) for i in idx], data.clips.text[idx], data.clips.mask[idx], mids)

    return batches


def stage2_batches(data: LoRASet, base: list[torch.Tensor], vocab: Vocabulary, cfg: Stage2Config):
    """``batches(draw, rank, world)``: whole LoRAs with their clips' latents, noise and timesteps."""

    def batches(draw: int, rank: int, world: int) -> HyperBatch:
        idx = batch_indices(draw, num_items=len(data), global_batch=cfg.prompts_per_batch, rank=rank,
                            world=world, seed=cfg.seed)
        g = _generator(cfg.seed, draw, rank)
        latents = data.clips.latents[idx]
        return make_batch(vocab, base, [data.lora(i) for i in idx], data.clips.text[idx], data.clips.mask[idx],
                          latents=latents, noise=torch.randn(latents.shape, generator=g),
                          timesteps=sample_timesteps(len(idx), generator=g))

    return batches


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


@torch.no_grad()
def evaluate_stage1(model: HyperNet, data: LoRASet, base: list[torch.Tensor], vocab: Vocabulary,
                    loss_cfg: Stage1LossConfig, batch: int = 8) -> dict[str, float]:
    """Response-map BCE (mean over entries) and precision, recall and F1 of the entries of every
    matrix of every LoRA in ``data``, pooled (``lofa.lora.map_scores``), as ``lofa.evaluate`` pools."""
    model.eval()
    dev = next(model.parameters()).device
    bce, counts = 0.0, torch.zeros(3, dtype=torch.float64)
    for idx in _chunks(len(data), batch):
        b = make_batch(vocab, base, [data.lora(i) for i in idx], data.clips.text[idx], data.clips.mask[idx]).to(dev)
        bce_b, _, counts_b = stage1_terms(model, b, loss_cfg)
        bce, counts = bce + float(bce_b) * len(idx), counts + counts_b.double().cpu()
    return {"bce": bce / len(data), **{k: float(v) for k, v in map_scores(counts).items()}}


@torch.no_grad()
def evaluate_stage2(model: HyperNet, stage1: HyperNet | None, data: LoRASet, base: list[torch.Tensor],
                    vocab: Vocabulary, dit: nn.Module, cfg: Stage2Config, batch: int = 8) -> dict[str, float]:
    """Stage-II L1, dW relative error and cosine, and flow-matching loss (fixed noise) on ``data``.

    Runs on ``model``'s device; ``dit`` and ``stage1`` must be there too."""
    model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(12345)
    noise = torch.randn(data.clips.latents.shape, generator=g)
    timesteps = sample_timesteps(len(data), generator=g)
    totals: dict[str, float] = {}
    for idx in _chunks(len(data), batch):
        b = make_batch(vocab, base, [data.lora(i) for i in idx], data.clips.text[idx], data.clips.mask[idx],
                       latents=data.clips.latents[idx], noise=noise[idx], timesteps=timesteps[idx]).to(dev)
        _, m = stage2_loss(model, stage1, b, dit, cfg.loss)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(idx)
    return {k: v / len(data) for k, v in totals.items()}


def build_hypernet(cfg: HyperNetConfig, vocab: Vocabulary, seed: int, compile: bool = False) -> HyperNet:
    """A new hypernetwork (weights from ``seed``), with ``compile`` its regions compiled (dynamic shapes:
    the text length and the matrices per shape change from batch to batch)."""
    torch.manual_seed(seed)
    model = HyperNet(cfg, vocab)
    return model.compile_regions(dynamic=None) if compile else model


def train_stage1(cfg: Stage1Config, dit: nn.Module, vocab: Vocabulary, train_set: LoRASet, out_dir: str | Path,
                 *, base_hash: str, logger=None, input_key: InputKey | None = None) -> tuple[HyperNet, TrainResult]:
    """Train the stage-I hypernetwork on ``train_set``; final weights at ``out_dir/model.safetensors``.
    ``input_key``: what the run is made from (resume only from checkpoints made from it)."""
    if cfg.model.stage != 1:
        raise ValueError(f"train_stage1: model.stage must be 1, got {cfg.model.stage}")
    base = [w.detach().float() for w in base_weights(dit, vocab)]
    model = build_hypernet(cfg.model, vocab, cfg.seed, cfg.compile)
    step = functools.partial(_stage1_step, loss_cfg=cfg.loss)
    result = train(model, step, stage1_batches(train_set, base, vocab, cfg), cfg.train, out_dir, logger=logger,
                   meta=hypernet_meta(cfg.model, vocab, base_hash), input_key=input_key)
    return model, result


def _stage1_step(model: nn.Module, batch: HyperBatch, loss_cfg: Stage1LossConfig):
    return stage1_loss(model, batch, loss_cfg)


def _stage2_step(model: nn.Module, batch: HyperBatch, stage1: HyperNet | None, dit: nn.Module, cfg: Stage2Config):
    return stage2_loss(model, stage1, batch, dit, cfg.loss, dit_grad_checkpointing=cfg.dit_grad_checkpointing)


def train_stage2(cfg: Stage2Config, dit: nn.Module, vocab: Vocabulary, stage1: HyperNet | None, train_set: LoRASet,
                 out_dir: str | Path, *, base_hash: str, logger=None,
                 input_key: InputKey | None = None) -> tuple[HyperNet, TrainResult]:
    """Train stage II (frozen stage I and DiT closed over, so checkpoints hold stage II only).
    ``input_key``: what the run is made from (resume only from checkpoints made from it)."""
    if cfg.model.stage != 2:
        raise ValueError(f"train_stage2: model.stage must be 2, got {cfg.model.stage}")
    if cfg.model.use_stage1 and stage1 is None:
        raise ValueError("train_stage2: model.use_stage1 is true but no stage-I model was given")
    dit.requires_grad_(False).eval()
    if stage1 is not None:
        stage1.requires_grad_(False).eval()
    base = [w.detach().float() for w in base_weights(dit, vocab)]
    model = build_hypernet(cfg.model, vocab, cfg.seed, cfg.compile)
    step = functools.partial(_stage2_step, stage1=stage1 if cfg.model.use_stage1 else None, dit=dit, cfg=cfg)
    result = train(model, step, stage2_batches(train_set, base, vocab, cfg), cfg.train, out_dir, logger=logger,
                   meta=hypernet_meta(cfg.model, vocab, base_hash), input_key=input_key)
    return model, result


def summary(result: TrainResult, heldout: dict[str, float]) -> dict:
    """The stage's metrics: steps, the last logged training metrics, the held-out ones (no wall
    times: those go to the run's timings, see pipelines/_common.py)."""
    return {"steps": result.step, **{f"train_{k}": float(v) for k, v in result.metrics.items()},
            **{f"heldout_{k}": float(v) for k, v in heldout.items()}}


def all_matrices(vocab: Vocabulary, base: list[torch.Tensor], num_prompts: int) -> list[MatrixGroup]:
    """Every vocabulary matrix once per prompt, grouped by shape (prompt-major inside a group)."""
    mids = torch.arange(len(vocab)).repeat(num_prompts)
    pids = torch.arange(num_prompts).repeat_interleave(len(vocab))
    return [MatrixGroup(torch.stack([base[j] for j in mids[pos].tolist()]), mids[pos], pids[pos])
            for _, pos in group_by_shape(vocab, mids, pids)]


@torch.no_grad()
def predict_loras(stage2: HyperNet, stage1: HyperNet | None, vocab: Vocabulary, base: list[torch.Tensor],
                  text: torch.Tensor, mask: torch.Tensor, batch: int = 16) -> LoRAWeights:
    """The predicted LoRA of every prompt (K = P, alpha folded into B), on the CPU (computed on
    the models' device).

    Args:
        base: W (out, in) of every vocabulary matrix; text (P, L, D); mask (P, L).
    """
    stage2.eval()
    dev = next(stage2.parameters()).device
    A: list[list[torch.Tensor]] = [[] for _ in vocab]
    B: list[list[torch.Tensor]] = [[] for _ in vocab]
    for idx in _chunks(text.shape[0], batch):
        groups = [g.to(dev) for g in all_matrices(vocab, base, len(idx))]
        t, m = text[idx].to(dev), mask[idx].to(dev)
        tokens = None
        if stage2.cfg.uses_stage1:
            tokens = [o.tokens for o in stage1(groups, t, m)]
        lora = predicted_lora(vocab, groups, stage2(groups, t, m, tokens), len(idx))
        for j in range(len(vocab)):
            A[j].append(lora.A[j].float().cpu())
            B[j].append(lora.B[j].float().cpu())
    return LoRAWeights(vocab, tuple(torch.cat(a) for a in A), tuple(torch.cat(b) for b in B))
