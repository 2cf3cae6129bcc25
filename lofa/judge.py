"""The synthetic profile's judge: a small classifier of action and colour on video latents.

Trained on real training clips only (never on the clips it scores). It scores
generated videos for fidelity to their prompt (does the video show the prompt's
action and colour?) and gives a Frechet distance between the judge features of
generated and real clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class JudgeConfig:
    width: int = 64
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0


class Judge(nn.Module):
    """Conv net over latents (B, 16, T, H, W) -> features (B, width) -> action and colour logits."""

    def __init__(self, channels: int, num_actions: int, num_colours: int, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv3d(width, width, 3, padding=1, stride=(1, 2, 2)), nn.GELU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.action = nn.Linear(width, num_actions)
        self.colour = nn.Linear(width, num_colours)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        return self.body(latents.float())

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(latents)
        return self.action(h), self.colour(h)


def train_judge(latents: torch.Tensor, actions: torch.Tensor, colours: torch.Tensor, num_actions: int,
                num_colours: int, cfg: JudgeConfig = JudgeConfig()) -> Judge:
    """Fit the judge on real clips. latents (N, 16, T, H, W); actions, colours (N,) long."""
    torch.manual_seed(cfg.seed)
    judge = Judge(latents.shape[1], num_actions, num_colours, cfg.width)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        x = latents[idx] + 0.05 * torch.randn(latents[idx].shape, generator=g)  # tolerate sampler noise
        la, lc = judge(x)
        loss = F.cross_entropy(la, actions[idx]) + F.cross_entropy(lc, colours[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(judge: Judge, latents: torch.Tensor, actions: torch.Tensor, colours: torch.Tensor) -> dict[str, float]:
    """Share of videos whose predicted action / colour / both match the prompt's."""
    la, lc = judge(latents)
    a, c = la.argmax(1) == actions, lc.argmax(1) == colours
    return {"action_acc": float(a.float().mean()), "colour_acc": float(c.float().mean()),
            "both_acc": float((a & c).float().mean())}


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets x (N, d) and y (M, d)."""
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # sqrt of cx @ cy through the symmetric form sqrt(cx) cy sqrt(cx): eigenvalues stay real
    wx, vx = np.linalg.eigh(cx)
    sx = (vx * np.sqrt(np.clip(wx, 0, None))) @ vx.T
    w = np.linalg.eigvalsh(sx @ cy @ sx)
    return float(((mx - my) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.sqrt(np.clip(w, 0, None)).sum())


@torch.no_grad()
def judge_features(judge: Judge, latents: torch.Tensor) -> np.ndarray:
    return judge.features(latents).double().numpy()
