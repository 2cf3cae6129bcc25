"""The synthetic profile's judge: a classifier of every stated attribute, on video latents.

Trained on thousands of procedurally rendered clips (``lofa.data.figure``, random
attributes and nuisance), encoded as ``preprocess`` encodes real clips, i.e. in the
latent space the DiT generates; never on preprocessed clips, so it scores the
evaluation's clips and the DiT's samples as unseen data. It predicts every attribute
of ``ClipSpec`` (action, colour, direction, ...; names and values read from
``lofa.data.figure``), and its penultimate features give a Frechet distance between
generated and real clips. Saved and loaded by :mod:`lofa.artifacts.judge` (stage
``train_judge`` writes it; ``evaluate`` and ``lofa score`` read it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class JudgeConfig:
    """The ``judge`` params section."""

    clips: int = 4000  # rendered training clips
    val_clips: int = 500  # fresh renders (other seeds) for the accuracy the stage reports
    width: int = 32
    steps: int = 1200
    lr: float = 3e-3
    batch_size: int = 64
    noise: float = 0.15  # std of Gaussian noise added to normalised training latents (sampler residue)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("clips", "val_clips", "width", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"JudgeConfig.{name} must be >= 1, got {getattr(self, name)}")


def attribute_values() -> dict[str, tuple[str, ...]]:
    """Every stated attribute of a clip (``lofa.data.synthetic.STATED``, meta.csv columns) and its
    values, from the table ``lofa.data.figure`` names after it (action -> ACTIONS, colour -> COLOURS, ...)."""
    from lofa.data import figure
    from lofa.data.synthetic import STATED

    out = {}
    for name in STATED:
        values = getattr(figure, f"{name.upper()}S", None)
        if values is None:
            raise ValueError(f"lofa.data.figure: no value table {name.upper()}S for the stated attribute {name!r}")
        out[name] = tuple(values)
    return out


class Judge(nn.Module):
    """Conv net over latents (B, C, T, H, W) -> features (B, 2 width) -> one logit head per attribute.

    Three 3D convolutions, then a mean over space only: the features keep the order of the T
    latent frames, which speed and direction need (measured on 500 fresh renders, 4000 training
    clips: pooled over time as well, width 32 reached 0.93 speed accuracy after 1500 steps; this
    one 0.98 after 600, every other attribute 0.99 or more).
    Latents are normalised per channel by the training set's statistics (buffers)."""

    def __init__(self, channels: int, frames: int, attributes: Mapping[str, Sequence[str]], width: int = 32) -> None:
        super().__init__()
        self.frames = frames
        self.attributes = {k: tuple(v) for k, v in attributes.items()}
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.body = nn.Sequential(
            nn.Conv3d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv3d(width, 2 * width, 3, padding=1, stride=(1, 2, 2)), nn.GELU(),
            nn.Conv3d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool3d((None, 1, 1)), nn.Flatten(),  # (B, 2 width * T)
            nn.Linear(2 * width * frames, 2 * width), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(2 * width, len(v)) for k, v in self.attributes.items()})

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (latents.float() - self.mean.view(shape)) / self.std.view(shape)

    def features(self, latents: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        """(B, 2 width) penultimate features (the Frechet distance's)."""
        return self.body(latents if normalised else self.normalise(latents))

    def forward(self, latents: torch.Tensor, normalised: bool = False) -> dict[str, torch.Tensor]:
        h = self.features(latents, normalised)
        return {k: head(h) for k, head in self.heads.items()}


# --------------------------------------------------------------------------- data

def random_specs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` attribute rows drawn uniformly and independently per attribute."""
    rng = np.random.default_rng([seed, 17])
    values = attribute_values()
    return [{k: v[int(rng.integers(len(v)))] for k, v in values.items()} for _ in range(n)]


def rendered_set(n: int, seed: int, synth: Any, pre: Any, codec: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` random clips rendered and encoded: latents (n, C, T', H', W') and label indices per attribute."""
    from lofa.ceiling import encode_videos
    from lofa.data.synthetic import render_like
    from lofa.fit import derive_seed

    rows = random_specs(n, seed)
    videos = (render_like(r, 1, derive_seed(seed, "judge", i), synth)[0] for i, r in enumerate(rows))
    return encode_videos(videos, synth.fps, pre, codec), label_indices(rows, attribute_values())


def label_indices(rows: Sequence[Mapping[str, str]], attributes: Mapping[str, Sequence[str]]
                  ) -> dict[str, torch.Tensor]:
    """(N,) long label index per attribute of ``attributes`` found in the rows (meta.csv rows)."""
    present = [a for a in attributes if rows and a in rows[0]]
    out = {}
    for a in present:
        vals = list(attributes[a])
        bad = sorted({str(r[a]) for r in rows} - set(vals))
        if bad:
            raise ValueError(f"attribute {a!r}: values {bad} are not among the judge's {vals}")
        out[a] = torch.tensor([vals.index(str(r[a])) for r in rows])
    return out


# --------------------------------------------------------------------------- training

def train_judge(latents: torch.Tensor, labels: Mapping[str, torch.Tensor], cfg: JudgeConfig,
                device: torch.device | str = "cpu") -> Judge:
    """Fit the judge on rendered clips: latents (N, C, T, H, W), labels attribute -> (N,) long.

    Trains on ``device``; the batches and the noise are drawn on the CPU (the same on any device).
    Returns the judge on the CPU."""
    torch.manual_seed(cfg.seed)
    values = attribute_values()
    judge = Judge(latents.shape[1], latents.shape[2], {a: values[a] for a in labels}, cfg.width)
    judge.mean.copy_(latents.float().mean((0, 2, 3, 4)))
    judge.std.copy_(latents.float().std((0, 2, 3, 4)).clamp_min(1e-6))
    x_all = judge.normalise(latents)
    judge.to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        x = x_all[idx] + cfg.noise * torch.randn(x_all[idx].shape, generator=g)
        out = judge(x.to(device), normalised=True)
        loss = sum(F.cross_entropy(out[a], labels[a][idx].to(device)) for a in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return judge.cpu().eval().requires_grad_(False)


@torch.no_grad()
def predict(judge: Judge, latents: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """(N,) predicted value index per attribute."""
    outs = [judge(latents[i:i + batch]) for i in range(0, len(latents), batch)]
    return {a: torch.cat([o[a] for o in outs]).argmax(1) for a in judge.attributes}


def accuracy(judge: Judge, latents: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Share of clips whose predicted value matches, per attribute of ``labels`` (``<attr>_acc``), and
    ``all_acc``: every attribute right."""
    pred = predict(judge, latents)
    hits = {a: pred[a] == labels[a] for a in labels if a in pred}
    out = {f"{a}_acc": float(h.float().mean()) for a, h in hits.items()}
    out["all_acc"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return out


@torch.no_grad()
def judge_features(judge: Judge, latents: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([judge.features(latents[i:i + batch]) for i in range(0, len(latents), batch)]).double().numpy()


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets x (N, d) and y (M, d)."""
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # sqrt of cx @ cy through the symmetric form sqrt(cx) cy sqrt(cx): eigenvalues stay real
    wx, vx = np.linalg.eigh(cx)
    sx = (vx * np.sqrt(np.clip(wx, 0, None))) @ vx.T
    w = np.linalg.eigvalsh(sx @ cy @ sx)
    return float(((mx - my) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.sqrt(np.clip(w, 0, None)).sum())


# --------------------------------------------------------------------------- artifact

def build_judge(cfg: JudgeConfig, synth: Any, pre: Any, codec: Any,
                device: torch.device | str = "cpu") -> tuple[Judge, dict[str, Any]]:
    """Render, encode, train (on ``device``) and check a judge; returns it (on the CPU) and its report
    (accuracy on fresh renders, seconds)."""
    t0 = time.perf_counter()
    lat, lab = rendered_set(cfg.clips, cfg.seed, synth, pre, codec)
    t_render = time.perf_counter() - t0
    judge = train_judge(lat, lab, cfg, device)
    t_train = time.perf_counter() - t0 - t_render
    val_lat, val_lab = rendered_set(cfg.val_clips, cfg.seed + 1_000_003, synth, pre, codec)
    report = {"render_val": accuracy(judge, val_lat, val_lab), "render_s": round(t_render, 1),
              "train_s": round(t_train, 1), "latent_shape": list(lat.shape[1:])}
    return judge, report
