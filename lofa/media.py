"""Videos a person can watch: decode latents, write mp4/GIF atomically, tile side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lofa.io import atomic_path


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(1, 2, 3, 0).cpu().numpy()


def decode_latents(codec: Any, latents: torch.Tensor) -> list[np.ndarray]:
    """(B, 16, T', H', W') latents -> B uint8 videos (T, H, W, 3)."""
    with torch.no_grad():
        video = codec.decode(latents.float())
    return [to_uint8(v) for v in video]


def side_by_side(videos: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Tile same-length videos horizontally with a white gap."""
    t, h = videos[0].shape[:2]
    bar = np.full((t, h, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for v in videos:
        parts += [v, bar]
    return np.concatenate(parts[:-1], axis=2)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0, upscale: int = 1) -> Path:
    """Write (T, H, W, 3) uint8 as mp4 (H.264) or GIF by the suffix of ``path``, atomically."""
    import imageio.v3 as iio

    path = Path(path)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    with atomic_path(path) as tmp:
        if path.suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            # the temporary name does not end in .mp4, so ffmpeg is told the container
            iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1,
                        output_params=["-f", "mp4"])
    return path
