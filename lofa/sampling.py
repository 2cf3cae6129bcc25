"""Flow-matching sampling (Euler over Wan's shifted sigmas) with classifier-free guidance."""

from __future__ import annotations

import torch
from torch import nn

from lofa.lora import LoRAWeights
from lofa.wan import NUM_TRAIN_TIMESTEPS, WAN_SHIFT, dit_forward


def inference_sigmas(steps: int, shift: float = WAN_SHIFT) -> torch.Tensor:
    """(steps + 1,) decreasing noise levels from 1 to 0, shifted as Wan's scheduler does."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


def _doubled(lora: LoRAWeights | None) -> LoRAWeights | None:
    """The LoRA set for a batch stacked twice (conditional + unconditional)."""
    if lora is None or lora.num_loras == 1:
        return lora
    scale = torch.cat([lora.scale, lora.scale]) if isinstance(lora.scale, torch.Tensor) else lora.scale
    return LoRAWeights(lora.vocab, tuple(torch.cat([a, a]) for a in lora.A),
                       tuple(torch.cat([b, b]) for b in lora.B), scale)


@torch.no_grad()
def sample(dit: nn.Module, context: torch.Tensor, shape: tuple[int, ...], *, steps: int = 20,
           guidance: float = 3.0, generator: torch.Generator | None = None,
           lora: LoRAWeights | None = None, null_context: torch.Tensor | None = None) -> torch.Tensor:
    """Sample latents from noise.

    Args:
        context: (B, L, text_dim) prompt embeddings.
        shape: (C, T, H, W) of one latent.
        guidance: classifier-free guidance scale (1 = conditional only); the
            unconditional branch uses ``null_context`` (zeros by default, which is
            what pretraining's caption dropout feeds the model).
        lora: optional LoRA (K = 1 or K = B), applied to both branches.
    Runs on the model's device (context, null_context and lora are moved there); the noise
    comes from ``generator`` on its own device, so a CPU generator gives the same noise anywhere.

    Returns:
        (B, C, T, H, W) latents, on the model's device.
    """
    b = context.shape[0]
    device = next(dit.parameters()).device
    context = context.to(device)
    null_context = None if null_context is None else null_context.to(device)
    lora = None if lora is None else lora.to(device)
    x = torch.randn((b, *shape), generator=generator, device=generator.device if generator else device).to(device)
    null = torch.zeros_like(context) if null_context is None else null_context.expand_as(context)
    sig = inference_sigmas(steps).tolist()
    for s, s_next in zip(sig[:-1], sig[1:]):
        t = torch.full((b,), s * NUM_TRAIN_TIMESTEPS, device=device)
        if guidance == 1.0:
            v = dit_forward(dit, x, t, context, lora=lora).float()
        else:
            both = dit_forward(dit, torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]),
                               lora=_doubled(lora)).float()
            cond, unc = both.chunk(2)
            v = unc + guidance * (cond - unc)
        x = x + (s_next - s) * v
    return x
