"""Build a diffsynth module without initialising it, then load a safetensors state dict strictly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from diffsynth.core.vram.initialization import skip_model_initialization
from torch import nn

from lofa.io import ArtifactError, load_tensors

M = TypeVar("M", bound=nn.Module)


def _examples(keys: set[str], n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n]) + (", ..." if len(keys) > n else "")


def check_state_dict(module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise ArtifactError naming ``path`` unless ``tensors`` has exactly the module's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    shapes = {k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k]}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_examples(unexpected)})")
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"{len(shapes)} shape mismatch(es) (e.g. {k}: file {tuple(tensors[k].shape)} "
                        f"vs model {expected[k]})")
    if problems:
        raise ArtifactError(f"{path}: does not match {type(module).__name__}: " + "; ".join(problems))


def load_module(factory: Callable[[], M], path: str | Path, *,
                convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> M:
    """Build ``factory()`` with parameters on the meta device and load ``path`` into it.

    Args:
        factory: builds the (uninitialised) module.
        path: safetensors file with the module's state dict (after ``convert``).
        convert: optional key mapping applied to the loaded tensors.
        device, dtype: where the loaded module lives; ``dtype=None`` keeps the file's dtype.

    Returns:
        The module in eval mode with ``requires_grad`` off.
    """
    path = Path(path)
    tensors = load_tensors(path)
    if convert is not None:
        tensors = convert(tensors)
    with skip_model_initialization():
        module = factory()
    check_state_dict(module, tensors, path)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
