"""Video codecs with Wan's latent contract.

Both codecs map a video (B, 3, T, H, W) in [-1, 1], T = 4k+1, H and W multiples
of 8, to a latent (B, 16, 1 + (T-1)/4, H/8, W/8) and back. Latent frame 0 codes
video frame 0 alone; latent frame j >= 1 codes video frames 4j-3 .. 4j.

- :class:`SynthCodec` (synthetic profile): a fixed, parameter-free orthonormal
  projection per (frame group, 8x8 block) that decodes to a watchable low-pass video.
- :class:`WanVAECodec` (real profile): diffsynth's ``WanVideoVAE`` loaded from a
  local safetensors file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lofa.io import ArtifactError, load_tensors

Z_DIM = 16
TIME_FACTOR = 4
SPACE_FACTOR = 8


class VideoCodec(Protocol):
    """What the pipeline needs from a codec."""

    z_dim: int

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latent: Tensor) -> Tensor: ...


def check_video(video: Tensor) -> None:
    """Raise ValueError unless ``video`` is (B, 3, T, H, W), T = 4k+1, H, W multiples of 8."""
    if video.ndim != 5:
        raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
    _, c, t, h, w = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 colour channels, got {c} (shape {tuple(video.shape)})")
    if t % TIME_FACTOR != 1:
        raise ValueError(f"video frame count must be 4k+1 (1, 5, 9, ...), got {t}")
    if h % SPACE_FACTOR or w % SPACE_FACTOR or h == 0 or w == 0:
        raise ValueError(f"video height and width must be positive multiples of 8, got {h}x{w}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got dtype {video.dtype}")


def check_latent(latent: Tensor, z_dim: int = Z_DIM) -> None:
    """Raise ValueError unless ``latent`` is (B, z_dim, T', H', W')."""
    if latent.ndim != 5 or latent.shape[1] != z_dim:
        raise ValueError(f"latent must be (B, {z_dim}, T', H', W'), got shape {tuple(latent.shape)}")


def latent_shape(frames: int, height: int, width: int, z_dim: int = Z_DIM) -> tuple[int, int, int, int]:
    """(z_dim, T', H', W') of the latent of a (3, frames, height, width) video."""
    return (z_dim, 1 + (frames - 1) // TIME_FACTOR, height // SPACE_FACTOR, width // SPACE_FACTOR)


# ---------------------------------------------------------------------------
# SynthCodec


def _dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix (n, n) in float64: row k is frequency k."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


#: Orthonormal colour basis: luma, red-green, (red+green)-blue (rows).
_COLOUR = torch.tensor([
    [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
    [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
    [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
], dtype=torch.float64)

#: Luma spatial frequencies (u, v) with u + v <= 3, in zig-zag order (10).
_LUMA_UV = tuple((u, s - u) for s in range(4) for u in range(s + 1))
#: Basis functions as (colour, temporal frequency, u, v). Channels 0-11 mean the
#: same in both tables (luma low frequencies, chroma DC; temporal mean for groups).
_FIRST_FRAME_BASIS = (
    tuple((0, 0, u, v) for u, v in _LUMA_UV)
    + ((1, 0, 0, 0), (2, 0, 0, 0))
    + ((1, 0, 0, 1), (1, 0, 1, 0), (2, 0, 0, 1), (2, 0, 1, 0))
)
_GROUP_BASIS = (
    tuple((0, 0, u, v) for u, v in _LUMA_UV)
    + ((1, 0, 0, 0), (2, 0, 0, 0))
    + ((0, 1, 0, 0), (0, 1, 0, 1), (0, 1, 1, 0), (0, 2, 0, 0))
)


def _projection(basis: tuple[tuple[int, int, int, int], ...], frames: int) -> Tensor:
    """Orthonormal rows (len(basis), 3 * frames * 8 * 8) over pixels ordered (c, t, y, x)."""
    dct_t, dct_s = _dct_matrix(frames), _dct_matrix(SPACE_FACTOR)
    rows = [torch.einsum("c,t,y,x->ctyx", _COLOUR[c], dct_t[f], dct_s[u], dct_s[v]).flatten()
            for c, f, u, v in basis]
    return torch.stack(rows)


class SynthCodec:
    """Deterministic, parameter-free codec with Wan's shape contract.

    Each 8x8 block of the first frame, and each 8x8x4 block of a later frame
    group, is projected onto 16 fixed orthonormal basis functions: an
    orthonormal colour transform (luma, two chroma axes), a 2D DCT of the
    block and, for groups, a length-4 temporal DCT. Kept: the 10 lowest luma
    frequencies (u + v <= 3) and the 2 chroma DCs (channels 0-11, the temporal
    mean for groups), then 4 detail channels (first frame: chroma first
    harmonics; groups: temporal-change luma coefficients).

    Group coefficients are divided by sqrt(4) = 2, so a static video gives the
    same channels 0-11 in every latent frame. All coefficients are divided by
    :attr:`SCALE`; decoding is the transpose of the projection times the scale,
    so ``encode(decode(z)) == z`` and ``decode(encode(x))`` is the orthogonal
    projection of ``x`` onto the kept basis (a low-pass video), clamped to [-1, 1].
    """

    z_dim = Z_DIM
    #: Divisor that brings the latent RMS near 1 on smooth natural-ish video
    #: (measured: blurred-noise video with moving blobs, values in [-1, 1]).
    SCALE = 4.0

    def __init__(self) -> None:
        self._first = _projection(_FIRST_FRAME_BASIS, 1).float()  # (16, 192)
        self._group = _projection(_GROUP_BASIS, TIME_FACTOR).float()  # (16, 768)
        self._group_gain = math.sqrt(TIME_FACTOR)

    def encode(self, video: Tensor) -> Tensor:
        """Encode a video.

        Args:
            video: (B, 3, T, H, W) float in [-1, 1], T = 4k+1, H, W multiples of 8.

        Returns:
            (B, 16, 1 + (T-1)/4, H/8, W/8) float32 latent.
        """
        check_video(video)
        b, _, t, h, w = video.shape
        x = video.float()
        groups = (t - 1) // TIME_FACTOR
        hb, wb = h // SPACE_FACTOR, w // SPACE_FACTOR
        first = x[:, :, :1].reshape(b, 3, 1, 1, hb, 8, wb, 8)
        rest = x[:, :, 1:].reshape(b, 3, groups, TIME_FACTOR, hb, 8, wb, 8)
        z = [self._project(first, self._first), self._project(rest, self._group) / self._group_gain]
        return torch.cat(z, dim=2) / self.SCALE

    def decode(self, latent: Tensor) -> Tensor:
        """Decode a latent.

        Args:
            latent: (B, 16, T', H', W').

        Returns:
            (B, 3, 4(T'-1)+1, 8H', 8W') float32 video clamped to [-1, 1].
        """
        check_latent(latent)
        z = latent.float() * self.SCALE
        b, _, tl, hb, wb = z.shape
        first = self._unproject(z[:, :, :1], self._first, 1)  # (B, 3, 1, H, W)
        rest = self._unproject(z[:, :, 1:] * self._group_gain, self._group, TIME_FACTOR)  # (B, 3, 4(T'-1), H, W)
        return torch.cat([first, rest], dim=2).clamp(-1.0, 1.0)

    @staticmethod
    def _project(blocks: Tensor, proj: Tensor) -> Tensor:
        """(B, 3, G, t, Hb, 8, Wb, 8) pixels -> (B, 16, G, Hb, Wb) coefficients."""
        b, _, g, t, hb, _, wb, _ = blocks.shape
        flat = blocks.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, g, hb, wb, 3 * t * 64)
        coef = flat @ proj.to(flat.device).T  # (B, G, Hb, Wb, 16)
        return coef.permute(0, 4, 1, 2, 3)

    @staticmethod
    def _unproject(coef: Tensor, proj: Tensor, t: int) -> Tensor:
        """(B, 16, G, Hb, Wb) coefficients -> (B, 3, G*t, 8Hb, 8Wb) pixels."""
        b, _, g, hb, wb = coef.shape
        flat = coef.permute(0, 2, 3, 4, 1) @ proj.to(coef.device)  # (B, G, Hb, Wb, 3*t*64)
        blocks = flat.reshape(b, g, hb, wb, 3, t, 8, 8).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return blocks.reshape(b, 3, g * t, hb * 8, wb * 8)
