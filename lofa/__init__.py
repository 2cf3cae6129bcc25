"""lofa: prompt-to-LoRA hypernetworks for Wan2.1 (LoFA, arXiv 2512.08785)."""

__version__ = "0.1.0"
