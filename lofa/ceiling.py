"""Fresh renders of stated attributes, and LoRAs fitted on pools of clips.

Two evaluation baselines of DESIGN section 6 are LoRAs fitted on more than one clip:

- the **caption ceiling**: per held-out clip, a LoRA fitted on ``n`` fresh renders of
  that clip's stated attributes (new nuisance: phase, position, tempo jitter), never
  on the clip itself, with the clip's caption; scored on the held-out clip, it is
  what any method that reads only the prompt could reach;
- the **generalist**: one LoRA of the same rank fitted on all training clips.

Both run :func:`fit_pooled`: ``K`` LoRAs, LoRA ``k`` drawing its clips from its own
pool, with ``lofa.fit``'s recipe (initialisation, timestep and noise draws, AdamW).
Renders go through the path real clips take in ``preprocess`` (frame sampling,
resize and crop, the profile's codec), minus the mp4 round trip.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lofa.data.motionx import resize_center_crop, sample_indices
from lofa.data.preprocess import PreprocessConfig
from lofa.data.synthetic import SynthConfig, render_like
from lofa.fit import FitConfig, attention_backend, derive_seed, draw_step, init_lora, train_losses
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights


@torch.no_grad()
def encode_videos(videos: Iterable[np.ndarray], src_fps: float, pre: PreprocessConfig, codec: Any,
                  batch: int = 64) -> torch.Tensor:
    """Latents of uint8 videos (T, H, W, 3) as ``preprocess`` makes them: (N, 16, T', H', W') float32.

    Frames are sampled at ``pre.fps`` from ``src_fps``, resized and centre-cropped to
    ``pre.height x pre.width``, and encoded with ``codec`` (``lofa.data.preprocess.codec_for``),
    ``batch`` videos at a time: pass a generator and only one batch of videos is ever in memory."""
    out: list[torch.Tensor] = []
    clips: list[torch.Tensor] = []
    for v in itertools.chain(videos, [None]):
        if v is not None:
            idx = sample_indices(len(v), src_fps, pre.num_frames, pre.fps)
            clips.append(resize_center_crop(torch.from_numpy(np.ascontiguousarray(v[idx])), pre.height, pre.width))
        if clips and (v is None or len(clips) == batch):
            out.append(codec.encode(torch.stack(clips)).float().cpu())
            clips = []
    if not out:
        raise ValueError("encode_videos: no video given")
    return torch.cat(out)


def fit_pooled(dit: nn.Module, vocab: Vocabulary, latents: torch.Tensor, context: torch.Tensor,
               pools: Sequence[Sequence[int]], cfg: FitConfig, steps: int, per_step: int = 1,
               seed: int = 0) -> LoRAWeights:
    """Fit K = len(pools) LoRAs, LoRA k on the clips ``pools[k]`` (indices into latents/context).

    Each step, LoRA k draws ``per_step`` clips of its pool (with replacement), a timestep and
    noise each from its own generator; its loss is the mean over them. The K losses are summed,
    so each LoRA gets its own gradient (AdamW is elementwise). Initialisation is ``fit_loras``'
    (the shared A of ``cfg.seed``, B = 0), so these LoRAs start where every fitted one starts.

    Args:
        latents: (N, 16, T, H, W) clean latents; context: (N, L, D), on the DiT's device.
    Returns:
        K LoRAs (detached, scale ``cfg.scale``), on the DiT's device.
    """
    k, device = len(pools), latents.device
    if k == 0 or any(len(p) == 0 for p in pools):
        raise ValueError("fit_pooled: every pool needs at least one clip")
    dit.requires_grad_(False)
    lora = init_lora(vocab, cfg, [torch.Generator(device).manual_seed(derive_seed(cfg.seed, "init"))] * k, device)
    gens = [torch.Generator(device).manual_seed(derive_seed(seed, "pooled", j)) for j in range(k)]
    pool_t = [torch.as_tensor(list(p), dtype=torch.long) for p in pools]
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    rep = torch.arange(k, device=device).repeat_interleave(per_step)  # sample -> its LoRA
    for _ in range(steps):
        pick = torch.cat([p[torch.randint(len(p), (per_step,), generator=g, device=g.device).cpu()]
                          for p, g in zip(pool_t, gens)]).to(device)
        ts, noise = draw_step([g for g in gens for _ in range(per_step)], latents.shape[1:], cfg, device)
        batch = lora if k == 1 else LoRAWeights(vocab, tuple(a[rep] for a in lora.A),
                                                tuple(b[rep] for b in lora.B), lora.scale)
        with attention_backend(cfg):  # fit_loras' precision, kernels and checkpointing
            losses = train_losses(dit, latents[pick], context[pick], ts, noise, batch, cfg)
            (losses.sum() / per_step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return LoRAWeights(vocab, tuple(a.detach() for a in lora.A), tuple(b.detach() for b in lora.B), lora.scale)


def generalist_lora(dit: nn.Module, vocab: Vocabulary, latents: torch.Tensor, context: torch.Tensor,
                    cfg: FitConfig, steps: int, batch: int) -> LoRAWeights:
    """One LoRA (K = 1) of ``cfg``'s rank fitted on every clip given, ``batch`` clips a step."""
    return fit_pooled(dit, vocab, latents, context, [range(len(latents))], cfg, steps, batch,
                      seed=derive_seed(cfg.seed, "generalist"))


def ceiling_loras(dit: nn.Module, vocab: Vocabulary, labels: Sequence[Mapping[str, str]], context: torch.Tensor,
                  synth: SynthConfig, pre: PreprocessConfig, codec: Any, cfg: FitConfig, renders: int,
                  steps: int, seed: int = 0) -> LoRAWeights:
    """Per held-out clip, a LoRA fitted on ``renders`` fresh renders of its attributes with its caption.

    Args:
        labels: one meta.csv row per held-out clip (its stated attributes).
        context: (K, L, D) the held-out clips' caption embeddings (the same caption for its renders).
    Returns:
        K LoRAs, on the DiT's device.
    """
    device = next(dit.parameters()).device
    videos = (v for i, row in enumerate(labels) for v in render_like(row, renders, derive_seed(seed, "ceiling", i),
                                                                        synth))
    lat = encode_videos(videos, synth.fps, pre, codec).to(device)  # (K * renders, ...)
    ctx = context.to(device).repeat_interleave(renders, dim=0)
    pools = [range(i * renders, (i + 1) * renders) for i in range(len(labels))]
    return fit_pooled(dit, vocab, lat, ctx, pools, cfg, steps, 1, seed=derive_seed(seed, "ceiling"))
