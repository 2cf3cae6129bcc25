"""What the hypernetwork stage commands share: the base DiT, its vocabulary, the LoRA sets."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lofa.artifacts.base import load_base as load_base_model
from lofa.artifacts.loras import LoRASet, load_lora_set
from lofa.layers import Vocabulary

HELDOUT = ("val", "test")


def load_base(base_dir: Path) -> tuple[nn.Module, Vocabulary, str]:
    """The frozen base DiT, its adapted-matrix vocabulary and its content hash."""
    base = load_base_model(base_dir)
    return base.dit, base.vocabulary(), base.hash


def load_sets(loras: Path, data: Path, vocab: Vocabulary) -> tuple[LoRASet, LoRASet]:
    """(training LoRAs, held-out LoRAs)."""
    return load_lora_set(loras, data, vocab, ("train",)), load_lora_set(loras, data, vocab, HELDOUT)
