"""Stage ``pretrain_base`` (synthetic profile): train the tiny Wan DiT on all training clips.

The result is the "generalist" base model that per-clip LoRAs personalise. The
real profile skips this stage and loads Wan2.1 weights instead.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lofa.artifacts.base import SIDECAR, WEIGHTS, link_base, save_base
from lofa.config import to_dict
from lofa.data.dataset import ClipSet
from lofa.inputkey import InputKey, StaleResultWarning, stale_message
from lofa.io import read_json
from lofa.train import TrainConfig, TrainResult, batch_indices, train
from lofa.wan import WanDiTConfig, build_dit, flow_loss, load_dit, sample_timesteps


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain_base`` params section."""

    dit: WanDiTConfig
    train: TrainConfig
    batch_size: int = 16
    caption_dropout: float = 0.1  # zeroed text for classifier-free guidance
    seed: int = 0
    # coarse: the clips' coarse captions (colour, size, background: docs/world.md), so the base
    # lacks what the per-clip LoRAs teach; full: the captions the LoRAs are fitted with
    caption: Literal["coarse", "full"] = "coarse"
    exclude_actions: tuple[str, ...] = ()  # synthetic actions (clip ids synth/<action>/...) never pretrained on
    # real profile: a Wan2.1 DiT safetensors file (shape ``dit``) imported as the base instead of training one
    weights: str = ""


class FlowMatchingObjective(nn.Module):
    """The DiT wrapped so that the training loop calls ``model(...)`` (DDP syncs gradients)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, latents: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """(B,) weighted flow-matching losses."""
        return flow_loss(self.dit, latents, context, timesteps, noise)


def make_batches(clips: ClipSet, cfg: PretrainConfig):
    """A deterministic ``batches(draw, rank, world)`` over ``clips``: data, timesteps, noise, dropout."""

    def batches(draw: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(draw, num_items=len(clips), global_batch=cfg.batch_size, rank=rank,
                            world=world, seed=cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + draw * 104729 + rank)
        latents = clips.latents[idx]
        keep = (torch.rand(len(idx), generator=g) >= cfg.caption_dropout).float()
        return {"latents": latents, "context": clips.text[idx] * keep[:, None, None],
                "timesteps": sample_timesteps(len(idx), generator=g),
                "noise": torch.randn(latents.shape, generator=g)}

    return batches


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    losses = model(batch["latents"], batch["context"], batch["timesteps"], batch["noise"])
    return losses.mean(), {}


def pretrain(cfg: PretrainConfig, clips: ClipSet, out_dir: str | Path, *, logger=None,
             accelerator=None, input_key: InputKey | None = None) -> tuple[nn.Module, TrainResult]:
    """Train a fresh DiT of ``cfg.dit`` on ``clips``; write ``dit.safetensors`` + ``dit.json``.

    ``dit.safetensors`` holds the bare ``WanModel`` state dict (diffsynth's key
    format, loadable with :func:`lofa.wan.load_dit`). ``input_key`` (what the run is made
    from) is recorded in ``dit.json`` and the checkpoints; a DiT or checkpoints made from other
    inputs are deleted first and training starts over (see :func:`lofa.train.train`).
    """
    out_dir = Path(out_dir)
    clips = pretraining_clips(clips, cfg)
    if input_key is not None:
        _drop_stale_dit(out_dir, input_key)
    torch.manual_seed(cfg.seed)
    dit = build_dit(cfg.dit)
    model = FlowMatchingObjective(dit)
    result = train(model, loss_step, make_batches(clips, cfg), cfg.train, out_dir / "train",
                   logger=logger, accelerator=accelerator, meta={"dit": to_dict(cfg.dit)}, input_key=input_key)
    dit.eval().requires_grad_(False)
    save_base(out_dir, dit, cfg.dit, step=result.step, metrics=result.metrics, num_clips=len(clips),
              input_key=input_key)
    return dit, result


def import_base(cfg: PretrainConfig, out_dir: str | Path, input_key: InputKey | None = None) -> nn.Module:
    """Real profile: make ``cfg.weights`` (a Wan2.1 DiT file of shape ``cfg.dit``) the base model.

    The file is validated and hashed as :func:`lofa.wan.load_dit` loads it, then linked (or, across
    file systems, copied) to ``dit.safetensors`` beside a ``dit.json`` like the one
    :func:`pretrain` writes, so every later stage reads the same two files whatever the profile.
    """
    out_dir, src = Path(out_dir), Path(cfg.weights)
    if input_key is not None:
        _drop_stale_dit(out_dir, input_key)
    dit = load_dit(src, cfg.dit).eval().requires_grad_(False)
    link_base(src, out_dir, dit, cfg.dit, input_key)
    return dit


def _drop_stale_dit(out_dir: Path, key: InputKey) -> None:
    """Delete ``dit.safetensors`` + ``dit.json`` made from other inputs (main process only)."""
    from lofa.env import process_rank

    side = out_dir / SIDECAR
    if process_rank() != 0 or not side.is_file():
        return
    changes = key.changes(read_json(side).get("input_key"))
    if changes:
        warnings.warn(stale_message(side, changes, "deleting the DiT, training it again"), StaleResultWarning,
                      stacklevel=3)
        (out_dir / WEIGHTS).unlink(missing_ok=True)
        side.unlink()


def pretraining_clips(clips: ClipSet, cfg: PretrainConfig) -> ClipSet:
    """``clips`` without ``cfg.exclude_actions``, with the text of ``cfg.caption`` as ``text``."""
    keep = [i for i, cid in enumerate(clips.ids) if (cid.split("/") + ["", ""])[1] not in cfg.exclude_actions]
    if not keep:
        raise ValueError(f"pretrain_base.exclude_actions {list(cfg.exclude_actions)} leaves no clip")
    clips = clips.subset(keep)
    if cfg.caption == "full":
        return clips
    if clips.coarse_text is None:
        raise ValueError("pretrain_base.caption is 'coarse' but the preprocessed clips have no coarse caption "
                         "(coarse_context; the synthetic world writes texts/coarse_labels): rerun synthesize + "
                         "preprocess, or set pretrain_base.caption: full")
    return dataclasses.replace(clips, text=clips.coarse_text, mask=clips.coarse_mask)
