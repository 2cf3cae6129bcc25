"""Refine a LoRA on one clip: a few fitting steps that start from it (e.g. a predicted LoRA).

The fitting is :func:`lofa.fit.fit_batch` with the clip's own seed (the one
``fit_loras`` uses), started from the given LoRA (``init``). Progress is measured
by the fixed-point eval loss (:func:`lofa.fit.eval_loss`: fixed timesteps and
noise, the measure ``fit_loras`` reports), at a grid of step counts. ``fit_batch``
with a constant learning rate is prefix-consistent (step i depends only on the
steps before it), so the n-step fit is exactly the first n steps of the full fit,
and the eval loss "after n steps" is that of a separate n-step run. The default
grid doubles (0, 1, 2, 4, ..., N): about 2N extra steps, and a step count to reach
the oracle's loss at that grid's resolution (a finer grid costs more runs).

With an oracle (the clip's fitted LoRA), a fresh fit from zero (``init=None``: B = 0
and A initialised as ``fit_loras`` does, so the same recipe gives the same LoRA) runs
on the same grid, and
the report gives the steps each start needs to reach the oracle's eval loss
(DESIGN section 6, "Refine").
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lofa.artifacts.base import load_base
from lofa.artifacts.loras import load_user_lora
from lofa.config import load_section
from lofa.fit import ClipRecord, FitConfig, derive_seed, eval_loss, fit_batch, load_clip
from lofa.io import ArtifactError, read_metadata, write_json
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights, save_lora
from lofa.wan import dit_config


@dataclass(frozen=True)
class Curve:
    """One start's fit: training loss per step and eval loss at ``RefineReport.eval_steps``."""

    losses: list[float]
    eval_losses: list[float]

    def steps_to(self, target: float, eval_steps: Sequence[int]) -> int | None:
        """The first eval step whose loss is at or below ``target`` (None: not within the run)."""
        return next((n for n, v in zip(eval_steps, self.eval_losses) if v <= target), None)


@dataclass(frozen=True)
class RefineReport:
    """What a refinement reached. Losses are flow-matching losses on the clip (diffsynth weighting)."""

    clip_id: str
    steps: int
    lr: float
    eval_steps: list[int]
    base_loss: float
    refined: Curve
    fresh: Curve | None = None
    oracle_loss: float | None = None
    seconds: float = 0.0

    @property
    def steps_to_oracle(self) -> int | None:
        """Steps from the given LoRA to the oracle's eval loss (0: it starts there)."""
        return None if self.oracle_loss is None else self.refined.steps_to(self.oracle_loss, self.eval_steps)

    @property
    def fresh_steps_to_oracle(self) -> int | None:
        """Steps of a fresh fit from zero to the oracle's eval loss."""
        if self.oracle_loss is None or self.fresh is None:
            return None
        return self.fresh.steps_to(self.oracle_loss, self.eval_steps)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps_to_oracle": self.steps_to_oracle,
                "fresh_steps_to_oracle": self.fresh_steps_to_oracle}

    def summary(self) -> str:
        """A few lines for a terminal: eval losses on the grid, steps to the oracle, the training curve."""
        fmt = lambda xs: " ".join(f"{x:7.4f}" for x in xs)  # noqa: E731
        lines = [f"refine {self.clip_id}: {self.steps} steps, lr {self.lr:g}, {self.seconds:.1f} s",
                 f"  eval loss: base model {self.base_loss:.4f}"
                 + ("" if self.oracle_loss is None else f", oracle {self.oracle_loss:.4f}"),
                 f"  after step   {' '.join(f'{n:7d}' for n in self.eval_steps)}",
                 f"  from LoRA    {fmt(self.refined.eval_losses)}"]
        if self.fresh is not None:
            lines.append(f"  from zero    {fmt(self.fresh.eval_losses)}")
        if self.oracle_loss is not None:
            reach = lambda n: f"not within {self.steps}" if n is None else str(n)  # noqa: E731
            lines.append(f"  steps to the oracle's loss: from the LoRA {reach(self.steps_to_oracle)}"
                         + ("" if self.fresh is None else f", from zero {reach(self.fresh_steps_to_oracle)}"))
        every = max(1, self.steps // 10)
        picks = list(range(0, self.steps, every))
        lines.append("  training loss (random timestep and noise per step): "
                     + ", ".join(f"{i + 1}: {self.refined.losses[i]:.4f}" for i in picks))
        return "\n".join(lines)


def doubling_grid(steps: int) -> list[int]:
    """0, 1, 2, 4, ... below ``steps``, then ``steps``."""
    grid, n = [0], 1
    while n < steps:
        grid.append(n)
        n *= 2
    return grid + [steps]


def _curve(dit: nn.Module, vocab: Vocabulary, latents: torch.Tensor, context: torch.Tensor, cfg: FitConfig,
           seed: int, grid: Sequence[int], init: LoRAWeights | None) -> tuple[Curve, LoRAWeights]:
    """Eval loss after each grid step count (one prefix run each) and the full run's LoRA.

    ``init`` None is a fresh fit: B = 0, so its loss at step 0 is the base model's.
    """
    evals: list[float] = []
    res = None
    for n in grid:
        if n == 0:
            evals.append(float(eval_loss(dit, latents, context, [seed], cfg, init)[0]))
            continue
        res = fit_batch(dit, vocab, latents, context, dataclasses.replace(cfg, steps=n), [seed], init=init)
        evals.append(float(res.final_loss[0]))
    if res is None:
        raise ValueError("refine: the step grid holds no positive step count")
    return Curve(res.losses[0].tolist(), evals), res.lora


def refine(dit: nn.Module, init: LoRAWeights, latents: torch.Tensor, context: torch.Tensor, cfg: FitConfig,
           seed: int, *, clip_id: str = "", oracle: LoRAWeights | None = None,
           eval_steps: Sequence[int] | None = None) -> tuple[LoRAWeights, RefineReport]:
    """Fit ``cfg.steps`` steps on one clip from ``init``; with ``oracle``, also from zero.

    Args:
        init: the LoRA to start from (K = 1; its rank and modules are kept).
        latents: (1, 16, T, H, W) clean latents; context: (1, L, text_dim).
        cfg: the fitting recipe (``fit_loras``); the fresh fit uses it as is.
        seed: the clip's seed (``derive_seed(cfg.seed, clip_id)`` as ``fit_loras``).
        eval_steps: step counts at which to measure the eval loss (default: doubling grid).
    Returns:
        the refined LoRA (K = 1, scale alpha / rank) and the report.
    """
    t0 = time.perf_counter()
    grid = sorted({0, cfg.steps, *(eval_steps or doubling_grid(cfg.steps))})
    if grid[0] < 0 or grid[-1] != cfg.steps:
        raise ValueError(f"refine: eval steps must lie in [0, {cfg.steps}], got {list(eval_steps or [])}")
    own = dataclasses.replace(cfg, rank=init.rank, modules=init.vocab.modules)
    refined, lora = _curve(dit, init.vocab, latents, context, own, seed, grid, init)
    base = float(eval_loss(dit, latents, context, [seed], cfg, None)[0])
    fresh = oracle_loss = None
    if oracle is not None:
        oracle_loss = float(eval_loss(dit, latents, context, [seed], cfg, oracle)[0])
        vocab = Vocabulary.from_dit_config(dit_config(dit), cfg.modules)
        fresh, _ = _curve(dit, vocab, latents, context, cfg, seed, grid, None)
    report = RefineReport(clip_id, cfg.steps, cfg.lr, grid, base, refined, fresh, oracle_loss,
                          time.perf_counter() - t0)
    return lora, report


def load_clip_file(path: str | Path) -> tuple[str, str, torch.Tensor, torch.Tensor]:
    """(clip id, caption, latents (16, T, H, W), context (L, D)) of a preprocessed clip file."""
    path = Path(path)
    head = json.loads(read_metadata(path).get("lofa_clip", "{}"))
    clip_id = str(head.get("id", path.stem))
    latents, context = load_clip(ClipRecord(clip_id, str(path)))
    return clip_id, str(head.get("caption", "")), latents, context


def refine_files(lora_path: str | Path, clip_path: str | Path, *, steps: int, base_dir: str | Path = "data/base",
                 params_path: str | Path = "params.yaml", oracle_path: str | Path | None = None,
                 output: str | Path | None = None, lr: float | None = None, device: str = "cpu",
                 report_path: str | Path | None = None,
                 eval_steps: Sequence[int] | None = None) -> RefineReport:
    """:func:`refine` on files: the ``fit_loras`` recipe of ``params_path`` with ``steps`` (and ``lr``).

    Writes the refined LoRA to ``output`` (export format; the header keeps the prompt
    and names the start file and the clip) and the report to ``report_path`` as JSON.
    """
    base = load_base(base_dir, device)
    cfg = load_section(FitConfig, "fit_loras", params_path)
    cfg = dataclasses.replace(cfg, steps=steps, **({} if lr is None else {"lr": lr}))
    clip_id, caption, latents, context = load_clip_file(clip_path)
    if context.shape[-1] != base.config.text_dim or latents.shape[0] != base.config.in_dim:
        raise ArtifactError(f"{clip_path}: latents {tuple(latents.shape)} and context {tuple(context.shape)} do not "
                            f"fit the base model {base.path} (in_dim {base.config.in_dim}, text_dim "
                            f"{base.config.text_dim})")
    start = load_user_lora(lora_path, base)
    oracle = None if oracle_path is None else load_user_lora(oracle_path, base).to_weights(device)
    lora, report = refine(base.dit, start.to_weights(device), latents[None].to(device), context[None].to(device),
                          cfg, derive_seed(cfg.seed, clip_id), clip_id=clip_id, oracle=oracle,
                          eval_steps=eval_steps)
    if output is not None:
        A, B = lora.factors(0)
        meta = {"prompt": start.metadata.get("prompt", caption), "base_model_hash": base.hash,
                "refined_from": str(lora_path), "refine_clip": clip_id, "refine_steps": steps,
                "refine_final_loss": f"{report.refined.eval_losses[-1]:.6f}"}
        save_lora(output, A, B, lora.vocab, meta, card=f"refined from `{lora_path}` by {steps} flow-matching steps "
                  f"on clip `{clip_id}` (final loss {report.refined.eval_losses[-1]:.6f})")
    if report_path is not None:
        write_json(report_path, {**report.to_json(), "lora": str(lora_path), "clip": str(clip_path),
                                 "oracle": None if oracle_path is None else str(oracle_path),
                                 "output": None if output is None else str(output)})
    return report
