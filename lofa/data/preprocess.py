"""Stage ``preprocess``: a MotionX-layout root -> per-clip latents + text embeddings.

Outputs under ``out_dir``:
- ``clips/<id>.safetensors``: ``latents`` (16, T', H', W') float32, ``context`` (L, D)
  float32 (rows past the prompt zeroed) and ``mask`` (L,) bool; where the root has a
  coarse caption (``texts/coarse_labels/<id>.txt``, the synthetic world writes one: colour,
  size, background only, what the base model is pretrained on) also ``coarse_context`` and
  ``coarse_mask`` of the same shapes. The header holds the clip's id, split, captions and
  source info, so a resumed run rebuilds the manifest without re-encoding.
- ``manifest.parquet``: one row per usable clip.
- ``rejected.csv``: one row per skipped clip with its reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from lofa.data.motionx import ClipError, ClipRef, list_clips, read_caption, read_video
from lofa.io import ArtifactError, atomic_path, load_tensors, read_metadata, save_tensors, sha256_file

MANIFEST_COLUMNS = (
    "id", "split", "caption", "coarse_caption", "num_frames", "src_fps", "src_frames", "src_height", "src_width",
    "latent_shape", "text_shape", "path", "sha256",
)
#: Optional second caption per clip, beside MotionX's ``texts/semantic_labels`` ("" in the manifest when absent).
COARSE_CAPTION_DIR = Path("texts") / "coarse_labels"


@dataclass(frozen=True)
class PreprocessConfig:
    """The ``preprocess`` params section."""

    profile: Literal["synthetic", "wan"] = "synthetic"
    num_frames: int = 17
    fps: float = 8.0
    height: int = 64
    width: int = 64
    text_max_length: int = 32
    video_dir: str = "video"
    encode_batch: int = 8
    device: str = "cpu"
    # real profile only: local files the user downloaded
    text_encoder_path: str = ""
    tokenizer_path: str = ""
    vae_path: str = ""
    # umT5 sizes other than umT5-XXL's (lofa.encoders.T5Dims fields): a tiny encoder of the same
    # architecture runs the real profile on a CPU (scripts/real_profile.py --tiny)
    text_encoder_dims: dict[str, int] | None = None
    text_encoder_dtype: Literal["float32", "bfloat16"] = "float32"  # umT5-XXL in bf16: 11 GiB instead of 23

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"preprocess.num_frames must be 4k+1 (Wan's contract), got {self.num_frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"preprocess.height/width must be multiples of 16, got {self.height}x{self.width}")


def clip_path(out_dir: Path, clip_id: str) -> Path:
    return out_dir / "clips" / f"{clip_id}.safetensors"


def text_encoder_for(cfg: PreprocessConfig, device: str | torch.device | None = None) -> Any:
    """The profile's text encoder, as preprocess uses it (same profile, same length)."""
    from lofa.encoders.text import build_text_encoder

    device = device or cfg.device
    if cfg.profile == "synthetic":
        return build_text_encoder("synthetic", max_length=cfg.text_max_length, device=device)
    return build_text_encoder("wan", weights_path=cfg.text_encoder_path, tokenizer_path=cfg.tokenizer_path,
                              max_length=cfg.text_max_length, device=device,
                              dtype=getattr(torch, cfg.text_encoder_dtype), **(cfg.text_encoder_dims or {}))


def codec_for(cfg: PreprocessConfig, device: str | torch.device | None = None) -> Any:
    """The profile's video codec: SynthCodec, or the Wan VAE from ``vae_path``."""
    from lofa.encoders.video import build_codec

    if cfg.profile == "synthetic":
        return build_codec("synthetic")
    return build_codec("wan", weights_path=cfg.vae_path, device=device or cfg.device)


def _row_from_file(path: Path, out_dir: Path) -> dict[str, Any]:
    meta = read_metadata(path)
    t = load_tensors(path)
    row = json.loads(meta["lofa_clip"])
    row.setdefault("coarse_caption", "")
    row.update(latent_shape=list(t["latents"].shape), text_shape=list(t["context"].shape),
               path=path.relative_to(out_dir).as_posix(), sha256=sha256_file(path))
    return row


Item = tuple[ClipRef, str, str, torch.Tensor, Any]  # ref, caption, coarse caption ("" = none), video, info


def _encode_group(group: list[Item], text_enc: Any, codec: Any, cfg: PreprocessConfig,
                  out_dir: Path) -> list[dict[str, Any]]:
    emb = text_enc.encode([c for _, c, _, _, _ in group])
    has_coarse = [i for i, item in enumerate(group) if item[2]]
    coarse = text_enc.encode([group[i][2] for i in has_coarse]) if has_coarse else None
    video = torch.stack([item[3] for item in group]).to(cfg.device)  # (B, 3, T, H, W)
    with torch.no_grad():
        latents = codec.encode(video).float().cpu()
    rows = []
    for i, (ref, caption, coarse_caption, _, info) in enumerate(group):
        head = {"id": ref.id, "split": ref.split, "caption": caption, "num_frames": cfg.num_frames,
                "src_fps": info.src_fps, "src_frames": info.src_frames,
                "src_height": info.src_height, "src_width": info.src_width, "coarse_caption": coarse_caption}
        tensors = {"latents": latents[i], "context": emb.tokens[i].float(), "mask": emb.mask[i].bool()}
        if coarse_caption:
            j = has_coarse.index(i)
            tensors.update(coarse_context=coarse.tokens[j].float(), coarse_mask=coarse.mask[j].bool())
        path = clip_path(out_dir, ref.id)
        save_tensors(path, tensors, metadata={"lofa_clip": json.dumps(head), "format": "lofa.clip.v1"})
        rows.append(_row_from_file(path, out_dir))
    return rows


def _coarse_caption(root: Path, clip_id: str) -> str:
    """The clip's coarse caption, "" when the root has none for it (MotionX); a bad file is a reject."""
    path = root / COARSE_CAPTION_DIR / f"{clip_id}.txt"
    if not path.exists():
        return ""
    try:
        return read_caption(path)
    except ClipError as e:
        raise ClipError(f"coarse_{e.reason}", e.detail) from None


def preprocess(cfg: PreprocessConfig, root: str | Path, out_dir: str | Path,
               progress: bool = True) -> dict[str, Any]:
    """Encode every usable clip of ``root`` into ``out_dir``; resumable.

    Returns a summary: counts per split, rejects per reason, wall time.
    Raises RuntimeError when no usable clip remains.
    """
    t0 = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    refs, rejected = list_clips(root, cfg.video_dir)
    rows: list[dict[str, Any]] = []
    todo: list[ClipRef] = []
    for ref in refs:
        p = clip_path(out_dir, ref.id)
        try:
            rows.append(_row_from_file(p, out_dir)) if p.is_file() else todo.append(ref)
        except (ArtifactError, KeyError, json.JSONDecodeError):
            todo.append(ref)  # a damaged earlier output: redo it
    encoders: tuple[Any, Any] | None = None
    group: list[Item] = []
    encoded = 0

    def flush() -> None:
        nonlocal encoders, group, encoded
        if group:
            encoders = encoders or (text_encoder_for(cfg), codec_for(cfg))
            rows.extend(_encode_group(group, *encoders, cfg, out_dir))
            encoded += len(group)
            group = []

    bar = tqdm(todo, desc="preprocess", unit="clip", disable=not progress)
    for ref in bar:
        try:
            caption = read_caption(ref.caption_path)
            coarse = _coarse_caption(root, ref.id)
            video, info = read_video(ref.video_path, cfg.num_frames, cfg.fps, cfg.height, cfg.width)
        except ClipError as e:
            rejected.append((ref.id, e.reason))
            bar.set_postfix(rejected=len(rejected))
            continue
        group.append((ref, caption, coarse, video, info))
        if len(group) == cfg.encode_batch:
            flush()
    flush()
    rej = pd.DataFrame(rejected, columns=["id", "reason"])
    with atomic_path(out_dir / "rejected.csv") as tmp:
        rej.to_csv(tmp, index=False)
    if not rows:
        raise RuntimeError(f"preprocess: no usable clip under {root} ({len(rej)} rejected; see {out_dir / 'rejected.csv'})")
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).sort_values("id").reset_index(drop=True)
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    return {
        "clips": len(manifest),
        "per_split": {s: int((manifest["split"] == s).sum()) for s in sorted(manifest["split"].unique())},
        "rejected": len(rej),
        "rejected_by_reason": rej["reason"].value_counts().to_dict(),
        "encoded_now": encoded,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def load_manifest(out_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """The preprocess manifest, optionally one split (clear error when absent)."""
    p = Path(out_dir) / "manifest.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no manifest; run the preprocess stage first")
    df = pd.read_parquet(p)
    return df if split is None else df[df["split"] == split].reset_index(drop=True)
