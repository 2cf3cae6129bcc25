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


def _doubled(lora: LoRAWeights | None, batch: int, uncond: bool = True) -> LoRAWeights | None:
    """The LoRA set for ``batch`` samples stacked twice (conditional, then unconditional): the
    same LoRAs twice, or with ``uncond`` False no LoRA (zero B) in the unconditional half."""
    if lora is None or (uncond and lora.num_loras == 1):
        return lora
    per = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731  (K = 1 -> one per sample)
    second = per if uncond else (lambda t: torch.zeros_like(per(t)))  # noqa: E731
    scale = lora.scale
    if isinstance(scale, torch.Tensor):
        scale = torch.cat([per(scale), per(scale)])
    return LoRAWeights(lora.vocab, tuple(torch.cat([per(a), per(a)]) for a in lora.A),
                       tuple(torch.cat([per(b), second(b)]) for b in lora.B), scale)


@torch.no_grad()
def sample(dit: nn.Module, context: torch.Tensor, shape: tuple[int, ...], *, steps: int = 20,
           guidance: float = 3.0, generator: torch.Generator | None = None,
           lora: LoRAWeights | None = None, null_context: torch.Tensor | None = None,
           noise: torch.Tensor | None = None, lora_uncond: bool = False) -> torch.Tensor:
    """Sample latents from noise.

    Args:
        context: (B, L, text_dim) prompt embeddings.
        shape: (C, T, H, W) of one latent.
        guidance: classifier-free guidance scale (1 = conditional only); the
            unconditional branch uses ``null_context`` (zeros by default, which is
            what pretraining's caption dropout feeds the model).
        lora: optional LoRA (K = 1 or K = B).
        noise: (B, *shape) initial noise; default: drawn from ``generator`` on its own device,
            so a CPU generator gives the same noise anywhere.
        lora_uncond: the LoRA also runs in the unconditional branch (True), or that branch is
            the base model's (False, the default: guidance then amplifies the LoRA's change;
            judge accuracy measured in ``lofa.evaluate.EvalConfig``).
    Runs on the model's device (context, null_context, noise and lora are moved there).

    Returns:
        (B, C, T, H, W) latents, on the model's device.
    """
    b = context.shape[0]
    device = next(dit.parameters()).device
    context = context.to(device)
    null_context = None if null_context is None else null_context.to(device)
    lora = None if lora is None else lora.to(device)
    if noise is None:
        noise = torch.randn((b, *shape), generator=generator, device=generator.device if generator else device)
    elif tuple(noise.shape) != (b, *shape):
        raise ValueError(f"sample: noise {tuple(noise.shape)} must be {(b, *shape)}")
    x = noise.to(device)
    null = torch.zeros_like(context) if null_context is None else null_context.expand_as(context)
    sig = inference_sigmas(steps).tolist()
    for s, s_next in zip(sig[:-1], sig[1:]):
        t = torch.full((b,), s * NUM_TRAIN_TIMESTEPS, device=device)
        if guidance == 1.0:
            v = dit_forward(dit, x, t, context, lora=lora).float()
        else:
            both = dit_forward(dit, torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]),
                               lora=_doubled(lora, b, lora_uncond)).float()
            cond, unc = both.chunk(2)
            v = unc + guidance * (cond - unc)
        x = x + (s_next - s) * v
    return x
