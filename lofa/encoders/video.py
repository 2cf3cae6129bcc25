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

from lofa.encoders.text import check_profile

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
_LUMA_UV = tuple((u, d - u) for d in range(4) for u in range(d + 1))
#: Basis functions as (colour, temporal frequency, u, v). Channels 0-11 mean the
#: same in both tables (for groups: of the temporal mean): luma u + v <= 2 (0-5),
#: chroma DC (6-7), chroma first harmonics (8-11). Channels 12-15 hold detail:
#: luma u + v = 3 for the first frame, temporal change (luma at temporal
#: frequencies 1 and 2, chroma at 1) for groups. Chosen by reconstruction PSNR
#: on smooth coloured test videos; chroma harmonics mattered more than motion detail.
_SHARED_BASIS = (
    tuple((0, 0, u, v) for u, v in _LUMA_UV[:6])
    + ((1, 0, 0, 0), (2, 0, 0, 0))
    + ((1, 0, 0, 1), (1, 0, 1, 0), (2, 0, 0, 1), (2, 0, 1, 0))
)
_FIRST_FRAME_BASIS = _SHARED_BASIS + tuple((0, 0, u, v) for u, v in _LUMA_UV[6:])
_GROUP_BASIS = _SHARED_BASIS + ((0, 1, 0, 0), (0, 2, 0, 0), (1, 1, 0, 0), (2, 1, 0, 0))


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
    block and, for groups, a length-4 temporal DCT. Kept: 6 low luma
    frequencies, chroma DC and first harmonics (channels 0-11, of the temporal
    mean for groups), then 4 detail channels (first frame: the next luma
    frequencies; groups: temporal change of luma and chroma).

    Group coefficients are divided by sqrt(4) = 2, so a static video gives the
    same channels 0-11 in every latent frame. Each channel is then normalised
    with fixed constants (:attr:`MEAN`, :attr:`STD`), as Wan's VAE normalises its
    latents; decoding undoes that and applies the transpose of the projection,
    so ``encode(decode(z)) == z`` and ``decode(encode(x))`` is the orthogonal
    projection of ``x`` onto the kept basis (a low-pass video), clamped to [-1, 1].
    """

    z_dim = Z_DIM
    #: Per-channel mean and standard deviation of the coefficients, measured once on
    #: the synthetic default dataset (world v2, docs/world.md: 240 clips) and fixed here:
    #: every channel of a typical latent then has zero mean and unit variance, which flow
    #: matching needs (unnormalised, channel 0 carried 30x the spread of channel 9).
    MEAN = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.29, -0.91, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    STD = (8.69, 1.15, 0.65, 0.55, 0.39, 0.28, 1.07, 1.69, 0.54, 0.27, 0.78, 0.38, 0.53, 0.33, 0.24, 0.34)

    def __init__(self) -> None:
        self._first = _projection(_FIRST_FRAME_BASIS, 1).float()  # (16, 192)
        self._group = _projection(_GROUP_BASIS, TIME_FACTOR).float()  # (16, 768)
        self._group_gain = math.sqrt(TIME_FACTOR)
        self._mean = torch.tensor(self.MEAN).view(1, Z_DIM, 1, 1, 1)
        self._std = torch.tensor(self.STD).view(1, Z_DIM, 1, 1, 1)

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
        first = x[:, :, :1].reshape(b, 3, 1, 1, hb, 8, wb, 8)  # (B, 3, G=1, t=1, Hb, 8, Wb, 8)
        rest = x[:, :, 1:].reshape(b, 3, groups, TIME_FACTOR, hb, 8, wb, 8)  # (B, 3, G, t=4, ...)
        z = [self._project(first, self._first), self._project(rest, self._group) / self._group_gain]
        return (torch.cat(z, dim=2) - self._mean.to(x.device)) / self._std.to(x.device)

    def decode(self, latent: Tensor) -> Tensor:
        """Decode a latent.

        Args:
            latent: (B, 16, T', H', W').

        Returns:
            (B, 3, 4(T'-1)+1, 8H', 8W') float32 video clamped to [-1, 1].
        """
        check_latent(latent)
        z = latent.float() * self._std.to(latent.device) + self._mean.to(latent.device)
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


# ---------------------------------------------------------------------------
# WanVAECodec


def _to_diffsynth_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Wan's native VAE keys (``encoder.conv1.weight``, as in Wan2.1_VAE) -> ``WanVideoVAE`` keys
    (``model.encoder.conv1.weight``); files already in diffsynth's format pass unchanged."""
    if any(k.startswith("model.") for k in tensors):
        return tensors
    from diffsynth.utils.state_dict_converters.wan_video_vae import WanVideoVAEStateDictConverter

    return WanVideoVAEStateDictConverter(tensors)


class WanVAECodec:
    """Wan2.1's causal 3D VAE (diffsynth ``WanVideoVAE``) loaded from a local safetensors file.

    Args:
        weights_path: safetensors state dict, in Wan's native keys or diffsynth's ``model.``-prefixed ones.
        device, dtype: where the VAE runs; ``dtype=None`` keeps the file's dtype.
        dim: base channel width of ``VideoVAE_`` (Wan2.1: 96; tests build tiny ones).
        tiled: encode/decode in overlapping spatial tiles (diffsynth's tiling; saves memory).
    """

    z_dim = Z_DIM

    def __init__(self, weights_path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, dim: int = 96, tiled: bool = False) -> None:
        from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

        from lofa.encoders._weights import load_module

        def factory() -> WanVideoVAE:
            vae = WanVideoVAE(z_dim=Z_DIM)
            vae.model = VideoVAE_(dim=dim, z_dim=Z_DIM)
            return vae

        self.device = torch.device(device)
        self.tiled = tiled
        self.vae = load_module(factory, weights_path, convert=_to_diffsynth_keys, device=self.device, dtype=dtype)
        self.dtype = next(self.vae.parameters()).dtype

    def encode(self, video: Tensor) -> Tensor:
        """Encode a video.

        Args:
            video: (B, 3, T, H, W) float in [-1, 1], T = 4k+1, H, W multiples of 8.

        Returns:
            (B, 16, 1 + (T-1)/4, H/8, W/8) float32 latent (Wan-normalised).
        """
        check_video(video)
        with torch.no_grad():
            z = self.vae.encode(list(video.to(self.dtype)), self.device, tiled=self.tiled)
        return z.float()

    def decode(self, latent: Tensor) -> Tensor:
        """Decode a latent (B, 16, T', H', W') to a (B, 3, 4(T'-1)+1, 8H', 8W') float32 video in [-1, 1]."""
        check_latent(latent)
        with torch.no_grad():
            video = self.vae.decode(list(latent.to(self.dtype)), self.device, tiled=self.tiled)
        return video.float()


def build_codec(profile: str, **kw: Any) -> VideoCodec:
    """``synthetic`` -> :class:`SynthCodec`, ``wan`` -> :class:`WanVAECodec`; ``kw`` go to the constructor."""
    check_profile(profile)
    return SynthCodec(**kw) if profile == "synthetic" else WanVAECodec(**kw)
