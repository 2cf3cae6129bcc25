"""Tiny model, data and loss for tests/test_train.py, and the subprocess runs it launches.

``python tests/train_worker.py slow OUT``: one process, slow steps (for kill -9).
``torchrun --standalone --nproc_per_node 2 tests/train_worker.py ddp OUT``: real
2-process gloo DDP runs; each rank writes its final weights to ``rank{r}.safetensors``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lofa.io import save_tensors, write_text
from lofa.train import NonFiniteError, TrainConfig, batch_indices, train

N_ITEMS, D_IN, D_OUT, GLOBAL_BATCH = 64, 8, 4, 8


class Tiny(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear."""

    def __init__(self, dropout: float = 0.0, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(F.gelu(self.norm(self.inp(x)))))


def make_model(dropout: float = 0.0, seed: int = 1) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(dropout)


def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(N_ITEMS, D_IN, generator=gen)
    w = torch.randn(D_IN, D_OUT, generator=gen)
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(N_ITEMS, D_OUT, generator=gen)


X, Y = _dataset()


def batches(draw: int, rank: int, world: int) -> dict[str, Any]:
    idx = batch_indices(draw, num_items=N_ITEMS, global_batch=GLOBAL_BATCH, rank=rank, world=world, seed=7)
    return {"x": X[idx], "y": Y[idx], "draw": draw}


def make_loss_step(bad_draw: int | None = None, sleep: float = 0.0, inf_grad_draw: int | None = None):
    """MSE loss; NaN loss at ``bad_draw``; finite loss with an infinite gradient at ``inf_grad_draw``."""

    def loss_step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if sleep:
            time.sleep(sleep)
        pred = model(batch["x"])
        loss = F.mse_loss(pred.float(), batch["y"])
        if batch["draw"] == bad_draw:
            loss = loss * float("nan")
        if batch["draw"] == inf_grad_draw:
            w = next(model.parameters())
            loss = loss + torch.sqrt(w - w.detach()).sum()  # value 0, gradient +inf
        return loss, {"mse": loss.detach(), "pred_dtype_bf16": float(pred.dtype == torch.bfloat16)}

    return loss_step


def config(**kw: Any) -> TrainConfig:
    base = dict(max_steps=8, lr=1e-2, warmup_steps=2, grad_accum=2, log_every=2, ckpt_every=2, keep_last=2)
    return TrainConfig(**{**base, **kw})


def _ddp(out: Path) -> None:
    import torch.distributed as dist

    def run(name: str, model: nn.Module, cfg: TrainConfig, loss_step: Any) -> None:
        train(model, loss_step, batches, cfg, out / name)
        save_tensors(out / name / f"rank{dist.get_rank()}.safetensors", model.state_dict())

    run("equiv", make_model(0.0), config(max_steps=6), make_loss_step())
    run("ref", make_model(0.2), config(), make_loss_step())
    model = make_model(0.2)
    try:
        train(model, make_loss_step(bad_draw=9), batches, config(), out / "crash")
    except NonFiniteError as e:
        write_text(out / "crash" / f"error{dist.get_rank()}.txt", str(e))
    run("crash", make_model(0.2, seed=99), config(), make_loss_step())


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    if mode == "slow":
        train(make_model(0.2), make_loss_step(sleep=0.01), batches, config(max_steps=100, ckpt_every=3),
              Path(out))
    elif mode == "ddp":
        _ddp(Path(out))
    else:
        raise SystemExit(f"unknown mode {mode!r}; valid: slow, ddp")


if __name__ == "__main__":
    main(*sys.argv[1:])
