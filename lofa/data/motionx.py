"""Reader for a MotionX-layout root (DESIGN section 3).

Layout: ``<root>/<video_dir>/<id>.mp4``, ``<root>/texts/semantic_labels/<id>.txt``
(one sentence) and optional ``<root>/splits/{train,val,test}.txt`` listing ids.
Every problem with a clip is a :class:`ClipError` carrying a short reason, so the
preprocess stage can skip the clip and record why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from lofa.encoders.text import is_blank

SPLITS: tuple[str, ...] = ("train", "val", "test")
CAPTION_DIR = Path("texts") / "semantic_labels"
MIN_SIDE, MAX_SIDE = 16, 8192
#: Decoded frames cost num_frames * pixels * 15 bytes (uint8 + float32); past DCI 4K a clip is refused
#: rather than risk exhausting memory (an 8192x8192 clip of 17 frames would need about 17 GB).
MAX_PIXELS = 4096 * 2160


class ClipError(ValueError):
    """A clip that cannot be used; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ClipRef:
    id: str
    split: str
    video_path: Path
    caption_path: Path


@dataclass(frozen=True)
class VideoInfo:
    src_fps: float
    src_frames: int
    src_height: int
    src_width: int


def _hash_split(clip_id: str, val_fraction: float = 0.1) -> str:
    h = int(hashlib.sha1(clip_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def _escapes(clip_id: str) -> bool:
    """An id that would reach outside the root's folders (absolute, or with a '..' part)."""
    parts = PurePosixPath(clip_id).parts
    return clip_id.startswith("/") or ".." in parts


def _read_split(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: split file is not UTF-8 text ({e})") from None


def list_clips(root: str | Path, video_dir: str = "video") -> tuple[list[ClipRef], list[tuple[str, str]]]:
    """All clip references under ``root`` and the (id, reason) of ids rejected while listing.

    With split files, their ids define the set (an id listed twice is a duplicate;
    an id that is absolute or climbs out with '..' is a bad id; an id whose video is
    missing is rejected). Without them every video is listed,
    split ``train``/``val`` by a stable hash of its id.
    """
    root = Path(root)
    vroot = root / video_dir
    if not vroot.is_dir():
        raise FileNotFoundError(f"{vroot}: video directory not found (MotionX layout expects <root>/{video_dir}/<id>.mp4)")
    rejected: list[tuple[str, str]] = []
    split_dir = root / "splits"
    listed: list[tuple[str, str]] = []
    if split_dir.is_dir() and any((split_dir / f"{s}.txt").is_file() for s in SPLITS):
        for s in SPLITS:
            f = split_dir / f"{s}.txt"
            if f.is_file():
                listed += [(line.strip(), s) for line in _read_split(f).splitlines() if line.strip()]
    else:
        ids = sorted(p.relative_to(vroot).with_suffix("").as_posix() for p in vroot.rglob("*.mp4"))
        listed = [(i, _hash_split(i)) for i in ids]
    seen: set[str] = set()
    refs: list[ClipRef] = []
    for clip_id, split in listed:
        if clip_id in seen:
            rejected.append((clip_id, "duplicate_id"))
            continue
        seen.add(clip_id)
        if _escapes(clip_id):
            rejected.append((clip_id, "bad_id"))
            continue
        video = vroot / f"{clip_id}.mp4"
        if not video.is_file():
            rejected.append((clip_id, "missing_video"))
            continue
        refs.append(ClipRef(clip_id, split, video, root / CAPTION_DIR / f"{clip_id}.txt"))
    return refs, rejected


def read_caption(path: Path) -> str:
    """The clip's one caption sentence (whitespace collapsed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ClipError("missing_caption", f"{path} not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClipError("undecodable_caption", f"{path}: not UTF-8 ({e})") from None
    text = " ".join(text.split())
    if is_blank(text):
        raise ClipError("empty_caption", f"{path} is empty or has no visible character")
    return text


def sample_indices(src_frames: int, src_fps: float, num_frames: int, fps: float) -> list[int]:
    """Source frame indices for ``num_frames`` frames at ``fps`` from the clip start."""
    step = src_fps / fps
    idx = [int(round(i * step)) for i in range(num_frames)]
    if idx[-1] >= src_frames:
        raise ClipError("too_few_frames", f"needs {idx[-1] + 1} source frames at {fps} fps, has {src_frames}")
    return idx


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (antialiased) so the clip covers ``height x width``, then centre-crop.

    Args:
        frames: (T, H, W, 3) uint8.
    Returns:
        (3, T, height, width) float32 in [-1, 1].
    """
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x.clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def read_video(path: Path, num_frames: int, fps: float, height: int, width: int) -> tuple[torch.Tensor, VideoInfo]:
    """Decode ``num_frames`` frames at ``fps`` with decord, resized and centre-cropped.

    Returns:
        video (3, num_frames, height, width) float32 in [-1, 1], and the source info.
    """
    import decord

    if path.stat().st_size == 0:
        raise ClipError("empty_video", f"{path} is a zero-byte file")
    try:
        vr = decord.VideoReader(str(path), num_threads=1)
        n = len(vr)
        src_fps = float(vr.get_avg_fps())
        if n == 0:
            raise ClipError("too_few_frames", f"{path} has no frames")
        h, w = vr[0].shape[:2]
    except ClipError:
        raise
    except Exception as e:  # decord raises its own DECORDError and RuntimeError subclasses
        raise ClipError("unreadable_video", f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise ClipError("bad_dimensions", f"{path}: {w}x{h} outside [{MIN_SIDE}, {MAX_SIDE}]")
    if h * w > MAX_PIXELS:
        raise ClipError("bad_dimensions", f"{path}: {w}x{h} has {h * w} pixels, more than {MAX_PIXELS}")
    if not np.isfinite(src_fps) or src_fps <= 0:
        raise ClipError("bad_fps", f"{path}: fps {src_fps}")
    try:
        idx = sample_indices(n, src_fps, num_frames, fps)
    except ClipError as e:
        raise ClipError(e.reason, f"{path}: {e.detail}") from None
    try:
        frames = torch.from_numpy(vr.get_batch(idx).asnumpy())
    except Exception as e:
        raise ClipError("corrupt_video", f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return resize_center_crop(frames, height, width), VideoInfo(src_fps, n, h, w)
