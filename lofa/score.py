"""Scoring LoRAs on clips: the one code path of ``evaluate`` and ``lofa score``.

- :func:`flow_losses`: each clip's flow-matching loss at fixed timesteps (spread over the
  training grid) and fixed noise. The noise of a clip is drawn from its id and the seed
  alone, so a clip scores the same alone, in any batch and in any subset.
- :func:`bootstrap_gap`: the share of the base -> oracle loss gap a method closes, with a
  bootstrap 95% interval over clips.
- :func:`generate`: latents sampled from each clip's caption (noise from the clip id),
  which the judge (:mod:`lofa.judge`) scores per attribute.
- :func:`score_files`: all of it on LoRA files and preprocessed clip files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lofa.artifacts.base import load_base
from lofa.artifacts.loras import load_user_lora
from lofa.fit import derive_seed
from lofa.io import ArtifactError
from lofa.lora import LoRAWeights
from lofa.sampling import sample
from lofa.wan import flow_loss, flow_schedule


@dataclass(frozen=True)
class ScoreConfig:
    """How clips are scored (fields of the ``evaluate`` params section)."""

    eval_points: int = 8  # fixed timesteps per clip, spread over the training grid
    seed: int = 0
    batch: int = 16
    sample_steps: int = 20
    guidance: float = 3.0
    lora_uncond: bool = False  # the LoRA also runs in guidance's unconditional branch (lofa.evaluate.EvalConfig)
    bootstrap: int = 2000  # resamples of the clips for the gap-closed intervals


def eval_timesteps(n: int) -> torch.Tensor:
    """(n,) timesteps at the midpoints of n equal slices of the training grid."""
    grid = flow_schedule().timesteps
    return grid[((torch.arange(n) + 0.5) * len(grid) / n).long()]


def clip_noise(clip_id: str, shape: Sequence[int], cfg: ScoreConfig) -> torch.Tensor:
    """(eval_points, *shape) fixed noise of one clip (CPU; a function of the id and the seed)."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "score", clip_id))
    return torch.randn((cfg.eval_points, *shape), generator=g)


def select(lora: LoRAWeights | None, idx: Sequence[int]) -> LoRAWeights | None:
    """LoRAs ``idx`` of a per-clip set (K = N); a shared LoRA (K = 1) or None as is."""
    if lora is None or lora.num_loras == 1:
        return lora
    scale = lora.scale[list(idx)] if isinstance(lora.scale, torch.Tensor) else lora.scale
    return LoRAWeights(lora.vocab, tuple(a[list(idx)] for a in lora.A), tuple(b[list(idx)] for b in lora.B), scale)


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


@torch.no_grad()
def flow_losses(dit: nn.Module, latents: torch.Tensor, context: torch.Tensor, ids: Sequence[str],
                lora: LoRAWeights | None, cfg: ScoreConfig) -> torch.Tensor:
    """(N,) flow-matching loss of each clip, mean over the fixed (timestep, noise) pairs.

    Args:
        latents: (N, 16, T, H, W) clean latents; context: (N, L, D) caption embeddings (CPU).
        ids: N clip ids (they seed the noise).
        lora: K = N per-clip LoRAs, K = 1 for every clip, or None (the base model).
    The DiT runs on its own device; returns a CPU tensor.
    """
    if not len(ids) == len(latents) == len(context):
        raise ValueError(f"flow_losses: {len(ids)} ids, {len(latents)} latents, {len(context)} contexts")
    if lora is not None and lora.num_loras not in (1, len(ids)):
        raise ValueError(f"flow_losses: {lora.num_loras} LoRAs for {len(ids)} clips (need 1 or {len(ids)})")
    dev = next(dit.parameters()).device
    ts = eval_timesteps(cfg.eval_points)
    out = torch.zeros(len(ids))
    for idx in _chunks(len(ids), cfg.batch):
        noise = torch.stack([clip_noise(ids[i], latents.shape[1:], cfg) for i in idx], 1)  # (P, B, ...)
        sub = None if lora is None else select(lora, idx).to(dev)
        x, c = latents[idx].to(dev), context[idx].to(dev)
        for j, t in enumerate(ts):
            out[idx] += flow_loss(dit, x, c, t.expand(len(idx)).to(dev), noise[j].to(dev), lora=sub).cpu()
    return out / cfg.eval_points


def bootstrap_gap(base: torch.Tensor | np.ndarray, method: torch.Tensor | np.ndarray,
                  oracle: torch.Tensor | np.ndarray, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """Share of the base -> oracle gap a method closes, and its bootstrap 95% interval.

    gap = (mean base - mean method) / (mean base - mean oracle) over the N clips; the
    interval is the 2.5 and 97.5 percentiles of the same ratio recomputed on ``resamples``
    resamples of the clips with replacement (each resample takes the same clips for the
    three losses). Resamples whose base and oracle means tie are dropped.
    Args: per-clip losses, (N,) each.
    """
    b, m, o = (np.asarray(x, dtype=np.float64) for x in (base, method, oracle))
    if not len(b) == len(m) == len(o) or len(b) == 0:
        raise ValueError(f"bootstrap_gap: need equal non-empty lengths, got {len(b)}, {len(m)}, {len(o)}")
    gap = float((b.mean() - m.mean()) / (b.mean() - o.mean()))
    idx = np.random.default_rng([seed, 2000]).integers(0, len(b), size=(resamples, len(b)))
    bm, mm, om = b[idx].mean(1), m[idx].mean(1), o[idx].mean(1)
    keep = bm != om
    ratios = (bm[keep] - mm[keep]) / (bm[keep] - om[keep])
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if len(ratios) else (float("nan"), float("nan"))
    return gap, float(lo), float(hi)


@torch.no_grad()
def generate(dit: nn.Module, context: torch.Tensor, ids: Sequence[str], shape: Sequence[int],
             lora: LoRAWeights | None, cfg: ScoreConfig) -> torch.Tensor:
    """(N, *shape) latents sampled from each caption (initial noise from the clip id), on the CPU."""
    out = []
    for idx in _chunks(len(ids), cfg.batch):
        noise = torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, "sample", ids[i]))) for i in idx])
        out.append(sample(dit, context[idx], tuple(shape), steps=cfg.sample_steps, guidance=cfg.guidance,
                          noise=noise, lora=select(lora, idx), lora_uncond=cfg.lora_uncond).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- files

def load_clip_files(paths: Sequence[str | Path]) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """(ids, captions, latents (N, 16, T, H, W), context (N, L, D)) of preprocessed clip files."""
    from lofa.refine import load_clip_file

    ids, caps, lat, ctx = [], [], [], []
    for p in paths:
        clip_id, caption, latents, context = load_clip_file(p)
        if lat and (latents.shape != lat[0].shape or context.shape != ctx[0].shape):
            raise ValueError(f"{p}: latents {tuple(latents.shape)} / context {tuple(context.shape)} differ from "
                             f"{paths[0]}'s {tuple(lat[0].shape)} / {tuple(ctx[0].shape)}")
        ids.append(clip_id)
        caps.append(caption)
        lat.append(latents)
        ctx.append(context)
    return ids, caps, torch.stack(lat), torch.stack(ctx)


def clip_paths(pre_dir: str | Path, ids: Sequence[str]) -> list[Path]:
    """The files of clips ``ids`` in a preprocess output directory (all clips when ``ids`` is empty)."""
    from lofa.data.preprocess import load_manifest

    man = load_manifest(pre_dir)
    where = dict(zip(man["id"], man["path"]))
    missing = [i for i in ids if i not in where]
    if missing:
        raise FileNotFoundError(f"{Path(pre_dir) / 'manifest.parquet'}: no clip {missing[0]!r} "
                                f"({len(missing)} of {len(ids)} ids not found)")
    return [Path(pre_dir) / where[i] for i in (ids or list(man["id"]))]


def judge_report(judge: Any, latents: torch.Tensor, ids: Sequence[str],
                 labels: Mapping[str, Mapping[str, str]] | None) -> dict[str, Any]:
    """The judge's attribute values of each clip's latents, and per-attribute accuracy where
    ``labels`` (clip id -> meta.csv row) gives the truth."""
    from lofa.judge import accuracy, label_indices, predict

    pred = predict(judge, latents)
    out: dict[str, Any] = {"per_clip": {i: {a: judge.attributes[a][int(pred[a][k])] for a in pred}
                                        for k, i in enumerate(ids)}}
    if labels is not None:
        out["accuracy"] = accuracy(judge, latents, label_indices([labels[i] for i in ids], judge.attributes))
    return out


def score_files(base_dir: str | Path, lora_paths: Sequence[str | Path], clip_files: Sequence[str | Path],
                cfg: ScoreConfig, *, judge_dir: str | Path | None = None,
                labels: Mapping[str, Mapping[str, str]] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Score the base model and each LoRA file on each clip file (flow loss; with ``judge_dir``, the
    judge's attributes of a sample generated from each clip's caption with each LoRA).

    A LoRA file that does not fit the base model raises :class:`lofa.lora.LoRAFormatError` naming the
    file and the key. Returns a JSON-ready dict: per entry (``base``, then each path as given), the mean
    and per-clip flow loss and, when generating, the judge's report.
    """
    base = load_base(base_dir, device)
    loras: dict[str, LoRAWeights | None] = {"base": None}
    for p in lora_paths:
        loras[str(p)] = load_user_lora(p, base).to_weights(device)
    ids, captions, latents, context = load_clip_files(clip_files)
    if context.shape[-1] != base.config.text_dim or latents.shape[1] != base.config.in_dim:
        raise ArtifactError(f"{clip_files[0]}: latents {tuple(latents.shape[1:])} and context "
                            f"{tuple(context.shape[1:])} do not fit the base model {base.path}")
    judge = None
    if judge_dir is not None:
        from lofa.artifacts.judge import load_judge

        judge = load_judge(judge_dir)
    result: dict[str, Any] = {"clips": ids, "captions": captions, "config": dataclasses.asdict(cfg), "loras": {}}
    for name, lora in loras.items():
        losses = flow_losses(base.dit, latents, context, ids, lora, cfg)
        entry: dict[str, Any] = {"fm_loss": float(losses.mean()),
                                 "per_clip": {i: float(v) for i, v in zip(ids, losses)}}
        if judge is not None:
            gen = generate(base.dit, context, ids, latents.shape[1:], lora, cfg)
            entry["judge"] = judge_report(judge, gen, ids, labels)
        result["loras"][name] = entry
    if judge is not None:
        result["real"] = judge_report(judge, latents, ids, labels)
    json.dumps(result)  # fail here, not half-way through writing, if anything is not JSON
    return result
