"""What the two hypernetwork stage commands share: the base DiT, its vocabulary, the LoRA sets."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lofa.hypertrain import LoRASet, load_lora_set
from lofa.io import read_json
from lofa.layers import Vocabulary
from lofa.pretrain import dit_config_from_sidecar
from lofa.wan import load_dit

HELDOUT = ("val", "test")


def load_base(base_dir: Path) -> tuple[nn.Module, Vocabulary, str]:
    """The frozen base DiT, its adapted-matrix vocabulary and its content hash."""
    sidecar = read_json(base_dir / "dit.json")
    cfg = dit_config_from_sidecar(sidecar)
    dit = load_dit(base_dir / "dit.safetensors", cfg).eval().requires_grad_(False)
    return dit, Vocabulary.from_dit_config(cfg), sidecar["base_model_hash"]


def load_sets(loras: Path, data: Path, vocab: Vocabulary) -> tuple[LoRASet, LoRASet]:
    """(training LoRAs, held-out LoRAs)."""
    return load_lora_set(loras, data, vocab, ("train",)), load_lora_set(loras, data, vocab, HELDOUT)
