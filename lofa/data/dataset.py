"""Preprocessed clips in memory: what pretraining, fitting and evaluation read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lofa.data.preprocess import load_manifest
from lofa.io import ArtifactError, load_tensors


@dataclass(frozen=True)
class ClipSet:
    """Stacked clips of one or more splits.

    Attributes:
        ids, captions, splits: one entry per clip.
        latents: (N, 16, T', H', W') float32.
        text: (N, L, D) float32, rows past each prompt zeroed.
        mask: (N, L) bool.
        coarse_text, coarse_mask: like ``text`` and ``mask``, of the coarse captions (colour, size,
            background only; what the synthetic base is pretrained on); None unless every clip has one.
    """

    ids: list[str]
    captions: list[str]
    splits: list[str]
    latents: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor
    coarse_text: torch.Tensor | None = None
    coarse_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int] | torch.Tensor) -> "ClipSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        coarse = (None, None) if self.coarse_text is None else (self.coarse_text[idx], self.coarse_mask[idx])
        return ClipSet([self.ids[i] for i in pick], [self.captions[i] for i in pick],
                       [self.splits[i] for i in pick], self.latents[idx], self.text[idx], self.mask[idx], *coarse)


def _clip_tensors(path: Path, first: tuple[torch.Tensor, ...] | None) -> dict[str, torch.Tensor]:
    """One clip file's tensors; a missing tensor or a shape unlike the first clip's names the file."""
    t = load_tensors(path)
    names = ("latents", "context", "mask")
    missing = [k for k in names if k not in t]
    if missing:
        raise ArtifactError(f"{path}: no tensor(s) {missing} (keys: {sorted(t)})")
    if first is not None and any(t[k].shape != f.shape for k, f in zip(names, first)):
        got = {k: tuple(t[k].shape) for k in names}
        raise ArtifactError(f"{path}: shapes {got} differ from the first clip's "
                            f"{dict(zip(names, (tuple(f.shape) for f in first)))}")
    return t


def load_clips(pre_dir: str | Path, splits: tuple[str, ...] = ("train",)) -> ClipSet:
    """Load every clip of ``splits`` from a preprocess output directory."""
    pre_dir = Path(pre_dir)
    df = load_manifest(pre_dir)
    df = df[df["split"].isin(splits)].reset_index(drop=True)
    if df.empty:
        raise ArtifactError(f"{pre_dir / 'manifest.parquet'}: no clips in splits {list(splits)}")
    lat, txt, msk, c_txt, c_msk = [], [], [], [], []
    for rel in df["path"]:
        t = _clip_tensors(pre_dir / rel, (lat[0], txt[0], msk[0]) if lat else None)
        lat.append(t["latents"])
        txt.append(t["context"])
        msk.append(t["mask"])
        if "coarse_context" in t and "coarse_mask" in t:
            c_txt.append(t["coarse_context"])
            c_msk.append(t["coarse_mask"])
    coarse = (torch.stack(c_txt), torch.stack(c_msk)) if len(c_txt) == len(lat) else (None, None)
    return ClipSet(df["id"].tolist(), df["caption"].tolist(), df["split"].tolist(),
                   torch.stack(lat), torch.stack(txt), torch.stack(msk), *coarse)
