"""LoRAs on disk: the fitted LoRA of every clip, the sets the hypernetwork stages train on, user files.

``fit_loras`` writes, per clip, ``<out>/curves/<safe id>.json`` (its loss curve and fit record) and then
``<out>/loras/<safe id>.safetensors`` (the LoRA in the export format, :func:`lofa.lora.save_lora`),
each atomically: the LoRA's existence marks the clip done. The file format, its key styles and
header are :mod:`lofa.lora` and :mod:`lofa.lora_formats`; this module knows where the files are.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lofa.artifacts.base import BaseModel, require
from lofa.data.dataset import ClipSet, load_clips
from lofa.io import write_json
from lofa.layers import ATTN_MODULES, Vocabulary
from lofa.lora import LoRAFile, LoRAFormatError, load_lora, save_lora
from lofa.lora_formats import modules_in

#: The fit output's folders: LoRA files and curve records, one of each per clip.
LORAS, CURVES = "loras", "curves"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_clip_id(clip_id: str) -> str:
    """A file name for ``clip_id``: '/' -> '__', other unsafe characters -> '_', plus a short
    hash whenever that mapping could be ambiguous."""
    safe = _UNSAFE.sub("_", clip_id.replace("/", "__"))
    if safe.replace("__", "/") != clip_id or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(clip_id.encode()).hexdigest()[:8]}"
    return safe


def lora_path(out_dir: str | Path, clip_id: str) -> Path:
    return Path(out_dir) / LORAS / f"{safe_clip_id(clip_id)}.safetensors"


def curve_path(out_dir: str | Path, clip_id: str) -> Path:
    return Path(out_dir) / CURVES / f"{safe_clip_id(clip_id)}.json"


def save_fitted(out_dir: str | Path, clip_id: str, curve: Mapping[str, Any], A: Sequence[torch.Tensor],
                B: Sequence[torch.Tensor], vocab: Vocabulary, metadata: Mapping[str, Any],
                dtype: torch.dtype = torch.float32) -> Path:
    """Write one clip's curve record, then its LoRA (whose existence marks the clip done); returns
    the LoRA's path.

    Args:
        A, B: per vocabulary matrix (rank, in) and (out, rank), the scale folded into B.
        metadata: the LoRA header (prompt, base-model hash, what it was fitted from).
    """
    write_json(curve_path(out_dir, clip_id), dict(curve))
    path = lora_path(out_dir, clip_id)
    save_lora(path, A, B, vocab, dict(metadata), dtype=dtype)
    return path


def drop_orphans(out_dir: str | Path, clip_ids: Iterable[str]) -> list[Path]:
    """Delete LoRAs and curves of clips not in ``clip_ids`` (a clip the data no longer has); return
    the deleted paths."""
    keep = {safe_clip_id(c) for c in clip_ids}
    gone = [p for sub, ext in ((LORAS, ".safetensors"), (CURVES, ".json"))
            for p in sorted((Path(out_dir) / sub).glob(f"*{ext}")) if p.name[:-len(ext)] not in keep]
    for p in gone:
        p.unlink()
    return gone


@dataclass(frozen=True)
class LoRASet:
    """Fitted LoRAs of some clips: per matrix, A (N, r, in) and B (N, out, r), plus the clips."""

    clips: ClipSet
    A: tuple[torch.Tensor, ...]
    B: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return len(self.clips)

    def lora(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [a[i] for a in self.A], [b[i] for b in self.B]


def load_lora_set(lora_dir: str | Path, pre_dir: str | Path, vocab: Vocabulary,
                  splits: tuple[str, ...]) -> LoRASet:
    """The fitted LoRA of every clip of ``splits`` (clips without one raise, naming the file)."""
    clips = load_clips(pre_dir, splits)
    files = [load_lora(lora_path(lora_dir, cid), vocab) for cid in clips.ids]
    A = tuple(torch.stack([f.A[j] for f in files]).float() for j in range(len(vocab)))
    B = tuple(torch.stack([f.B[j] for f in files]).float() for j in range(len(vocab)))
    return LoRASet(clips, A, B)


def load_user_lora(path: str | Path, base: BaseModel) -> LoRAFile:
    """A LoRA file validated against ``base`` (keys and shapes; first mismatch named).

    The adapted modules are read from the file's keys (any of ``ALL_MODULES``, in any key
    style of :mod:`lofa.lora_formats`), so attention-only and attention + FFN LoRAs both load.
    A file made for another base model (header ``base_model_hash``) with matching shapes
    loads with a warning.
    """
    path = require(Path(path), "LoRA file")
    modules = modules_in(_lora_keys(path)) or list(ATTN_MODULES)  # the file's modules, in any key style
    lora = load_lora(path, base.vocabulary(modules))
    made_for = lora.metadata.get("base_model_hash")
    if made_for and made_for != base.hash:
        warnings.warn(f"{path}: made for base model {made_for}, applied to {base.hash} ({base.path})",
                      stacklevel=2)
    return lora


def _lora_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises several unrelated types for a bad header
        raise LoRAFormatError(f"{path}: not a valid safetensors file ({e})") from None
