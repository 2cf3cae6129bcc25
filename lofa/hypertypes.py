"""The hypernetwork's inputs and outputs (``lofa.hypernet``): matrices batched by shape, the
prompt-independent part cached for serving, the prompts' keys and values, the predicted factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MatrixGroup:
    """Adapted matrices of one shape: the unit the hypernetwork batches over.

    Attributes:
        weight: (n, out, in) base weights W.
        matrix_ids: (n,) long, indices into the model's Vocabulary.
        prompt_ids: (n,) long, the prompt (row of the text batch) each matrix is for.
    """

    weight: Tensor
    matrix_ids: Tensor
    prompt_ids: Tensor

    def __post_init__(self) -> None:
        n = self.weight.shape[0]
        if self.weight.dim() != 3 or self.matrix_ids.shape != (n,) or self.prompt_ids.shape != (n,):
            raise ValueError(f"MatrixGroup: weight {tuple(self.weight.shape)} must be (n, out, in) with "
                             f"matrix_ids {tuple(self.matrix_ids.shape)} and prompt_ids "
                             f"{tuple(self.prompt_ids.shape)} both (n,)")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[1]), int(self.weight.shape[2])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MatrixGroup":
        """W and the matrix ids on ``device``; the prompt ids stay where they are: the model reads
        them on the host (which prompt's K / V), and on the host that read needs no GPU sync."""
        return MatrixGroup(self.weight.to(device, non_blocking=non_blocking),
                           self.matrix_ids.to(device, non_blocking=non_blocking), self.prompt_ids)


@dataclass(frozen=True)
class HyperOutput:
    """The prediction for one MatrixGroup of n matrices.

    Attributes:
        A: (n, r, in).
        B: (n, out, r), unscaled.
        alpha: (n,) positive scale (stage II) or None (stage I).
        tokens: (n, S, d_model) final normalised tokens (stage II attends to stage I's).
    """

    A: Tensor
    B: Tensor
    alpha: Tensor | None
    tokens: Tensor

    @property
    def B_scaled(self) -> Tensor:
        """(n, out, r): B with alpha folded in; what the DiT and an exported file use."""
        return self.B if self.alpha is None else self.B * self.alpha[:, None, None].to(self.B.dtype)

    def delta(self) -> Tensor:
        """(n, out, in) dW = alpha B A."""
        return torch.bmm(self.B_scaled, self.A)


@dataclass(frozen=True)
class EmbeddedGroup:
    """A MatrixGroup with the part of the forward that depends on W only, not on the prompt.

    Made by ``HyperNet.embed`` for inference: a predictor serving many prompts of one
    base model embeds its matrices once. Valid only for the model that made it and
    only while that model's weights do not change.

    Attributes:
        group: the matrices; tokens: (n, S, d_model) the tokens after the first trunk
            block's self-attention and MLP (nothing before them reads the prompt);
        rms: (n,) RMS(W).
    """

    group: MatrixGroup
    tokens: Tensor
    rms: Tensor
    model_id: int


@dataclass(frozen=True)
class TextContext:
    """Per trunk block K / V of the prompts, computed once per forward.

    keys, values: one (P, heads, L, head_dim) per trunk block; mask: (P, L) bool or
    None when every kept key is valid.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor | None


def trim_text(text: Tensor, mask: Tensor, text_dim: int) -> tuple[Tensor, Tensor | None]:
    """Drop the text columns no prompt uses; the mask becomes None when every kept token is valid.

    Reads the mask on the host (one sync when it lives on the GPU; none for a host mask,
    which is how ``HyperBatch.to`` leaves it), so callers that replay a captured prediction
    trim before it. The returned mask is on the text's device.

    Args:
        text: (P, L, text_dim); mask: (P, L), True = token.
    Returns:
        text (P, L', text_dim) and mask (P, L') bool or None.
    """
    if text.dim() != 3 or text.shape[-1] != text_dim or mask.shape != text.shape[:2]:
        raise ValueError(f"HyperNet: text {tuple(text.shape)} must be (P, L, {text_dim}) "
                         f"with mask (P, L), got mask {tuple(mask.shape)}")
    device = mask.device
    mask = mask.bool()
    if device.type != "cpu":  # one read of the mask; a host mask (HyperBatch.to keeps it there) needs no sync
        mask = mask.cpu()
    used = mask.any(0)
    length, all_valid, empty = torch.stack([
        torch.where(used, torch.arange(1, used.numel() + 1, device=used.device), 0).max(),
        (mask | ~used).all(), (~mask.any(1)).any()]).tolist()
    if empty:
        raise ValueError("HyperNet: a prompt has no valid text token (its mask row is all False)")
    if all_valid:
        return text[:, :length], None
    mask = mask[:, :length]
    if text.device.type == "cuda":
        mask = mask.pin_memory()
    return text[:, :length], mask.to(text.device, non_blocking=True)
