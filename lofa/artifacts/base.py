"""The base DiT on disk: ``<base>/dit.safetensors`` (the bare ``WanModel`` state dict, diffsynth's key
format) beside ``dit.json`` (its config, content hash, training step and metrics, input key).

``pretrain_base`` writes the pair (trained, or imported from a Wan2.1 file), so every later stage
and command reads the same two files whatever the profile.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lofa.config import from_dict, to_dict
from lofa.inputkey import InputKey
from lofa.io import SCHEMA_VERSION, ArtifactError, atomic_path, read_json, save_tensors, write_json
from lofa.layers import ATTN_MODULES, Vocabulary
from lofa.wan import WanDiTConfig, base_model_hash, load_dit

#: The base directory's files.
WEIGHTS, SIDECAR = "dit.safetensors", "dit.json"


@dataclass(frozen=True)
class BaseModel:
    """The frozen base DiT, its shape and its content hash (from ``dit.json``)."""

    dit: nn.Module
    config: WanDiTConfig
    hash: str
    path: Path

    def vocabulary(self, modules: Sequence[str] = ATTN_MODULES) -> Vocabulary:
        return Vocabulary.from_dit_config(self.config, modules)


def require(path: Path, what: str) -> Path:
    """``path``, or ArtifactError naming it and ``what`` it should have been."""
    if not path.exists():
        raise ArtifactError(f"{path}: {what} not found")
    return path


def dit_config_from_sidecar(sidecar: dict[str, Any]) -> WanDiTConfig:
    """The DiT config stored in a ``dit.json`` (strict: unknown keys are refused)."""
    return from_dict(WanDiTConfig, sidecar["config"], "dit.json:config")


def read_sidecar(base_dir: str | Path) -> dict[str, Any]:
    """The ``dit.json`` of ``base_dir``, which must hold the DiT's ``config`` and ``base_model_hash``."""
    path = Path(base_dir) / SIDECAR
    sidecar = read_json(path)
    if not isinstance(sidecar, dict) or "base_model_hash" not in sidecar or "config" not in sidecar:
        raise ArtifactError(f"{path}: lacks 'config' or 'base_model_hash'")
    return sidecar


def load_base(base_dir: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> BaseModel:
    """The base DiT of ``base_dir`` (``dit.safetensors`` + ``dit.json``), frozen, in eval mode."""
    base_dir = require(Path(base_dir), "base model directory (with dit.safetensors and dit.json)")
    require(base_dir / SIDECAR, "base model sidecar")
    sidecar = read_sidecar(base_dir)
    cfg = dit_config_from_sidecar(sidecar)
    dit = load_dit(base_dir / WEIGHTS, cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    return BaseModel(dit, cfg, str(sidecar["base_model_hash"]), base_dir / WEIGHTS)


def _write_sidecar(out_dir: Path, cfg: WanDiTConfig, dit: nn.Module, input_key: InputKey | None,
                   **fields: Any) -> None:
    key = {"input_key": input_key.to_json()} if input_key is not None else {}
    write_json(out_dir / SIDECAR, {"config": to_dict(cfg), "base_model_hash": base_model_hash(dit),
                                   "schema_version": SCHEMA_VERSION, **fields, **key})


def save_base(out_dir: str | Path, dit: nn.Module, cfg: WanDiTConfig, *, step: int, metrics: dict[str, Any],
              num_clips: int, input_key: InputKey | None = None) -> None:
    """Write a trained DiT as ``dit.safetensors`` and its sidecar ``dit.json`` (``input_key``: what it
    was made from, read back by the stale check of a rerun)."""
    out_dir = Path(out_dir)
    save_tensors(out_dir / WEIGHTS, dit.state_dict(), metadata={"format": "wan_video_dit"})
    _write_sidecar(out_dir, cfg, dit, input_key, step=step, metrics=metrics, num_clips=num_clips)


def link_base(src: str | Path, out_dir: str | Path, dit: nn.Module, cfg: WanDiTConfig,
              input_key: InputKey | None = None) -> None:
    """Make the DiT file ``src`` (loaded as ``dit``) the base of ``out_dir``: linked (or, across file
    systems, copied) to ``dit.safetensors``, beside a ``dit.json`` like :func:`save_base`'s."""
    src, out_dir = Path(src), Path(out_dir)
    dst = out_dir / WEIGHTS
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (dst.is_file() and os.path.samefile(src, dst)):
        with atomic_path(dst) as tmp:
            tmp.unlink()  # atomic_path made an empty file there
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(src, tmp)
    _write_sidecar(out_dir, cfg, dit, input_key, source=str(src), step=0, metrics={}, num_clips=0)
