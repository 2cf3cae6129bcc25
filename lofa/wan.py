"""The Wan2.1 DiT: config, build, load, forward and the flow-matching objective.

This is the one module that imports diffsynth's DiT and scheduler code. The DiT is
diffsynth's own ``WanModel``; the forward is a loop over ``dit.blocks`` that
matches ``diffsynth.pipelines.wan_video.model_fn_wan_video`` (tests pin it) and
adds two things the fitting needs: a batched per-sample LoRA bound per block
(:mod:`lofa.lora`), and gradient checkpointing that re-binds that LoRA when a
block is recomputed.

Flow matching follows ``FlowMatchScheduler("Wan")`` with
``set_timesteps(1000, training=True)`` (shift 5): ``sigma = t / 1000``, noisy
latents ``(1 - sigma) x0 + sigma noise``, target ``noise - x0``, and diffsynth's
bump-shaped training weight over timesteps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lofa.io import ArtifactError, read_metadata, tensors_hash
from lofa.lora import LoRAWeights, apply_lora
from lofa.kernels import flash, wan_fast
from lofa.kernels.wan_fast import BLOCK_IMPLS, BlockImpl

NUM_TRAIN_TIMESTEPS = 1000
WAN_SHIFT = 5.0


@dataclass(frozen=True)
class WanDiTConfig:
    """Shape of a text-to-video Wan DiT (diffsynth ``WanModel`` kwargs, image input off)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "in_dim", "out_dim", "freq_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WanDiTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanDiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or (head_dim // 3) % 2:
            raise ValueError(
                f"WanDiTConfig: head_dim = dim / num_heads = {head_dim} does not fit Wan's 3D RoPE "
                f"(needs head_dim even and head_dim // 3 even, e.g. 32, 48, 80, 96, 128)")
        if len(self.patch_size) != 3:
            raise ValueError(f"WanDiTConfig.patch_size must have 3 entries, got {self.patch_size}")

    def model_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``diffsynth.models.wan_video_dit.WanModel``."""
        kw = dataclasses.asdict(self)
        kw["patch_size"] = list(self.patch_size)
        kw["has_image_input"] = False
        return kw


#: Wan2.1-T2V-1.3B (diffsynth ``configs/model_configs.py``).
WAN21_T2V_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096)
#: The synthetic profile's small DiT (384-d MiniLM text embeddings).
WAN_TINY = WanDiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=384)


def _wan_model_class() -> type[nn.Module]:
    from diffsynth.models.wan_video_dit import WanModel

    flash.guard_diffsynth()
    return WanModel


def build_dit(cfg: WanDiTConfig, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    """A randomly initialised diffsynth ``WanModel`` of shape ``cfg`` (built on ``device``)."""
    with torch.device(device or "cpu"):
        dit = _wan_model_class()(**cfg.model_kwargs())
    return dit.to(dtype=dtype) if dtype is not None else dit


def dit_config(dit: nn.Module) -> WanDiTConfig:
    """Read the :class:`WanDiTConfig` back from a built ``WanModel``."""
    block = dit.blocks[0]
    return WanDiTConfig(
        dim=dit.dim, ffn_dim=block.ffn_dim, num_heads=block.num_heads, num_layers=len(dit.blocks),
        text_dim=dit.text_embedding[0].in_features, in_dim=dit.in_dim,
        out_dim=dit.head.head.out_features // math.prod(dit.patch_size),
        freq_dim=dit.freq_dim, patch_size=tuple(dit.patch_size), eps=block.norm1.eps)


def expected_file_hash(cfg: WanDiTConfig) -> str:
    """diffsynth's model hash (md5 of key names and shapes) of a ``WanModel`` file of shape ``cfg``."""
    from diffsynth.core.loader import hash_state_dict_keys

    return hash_state_dict_keys(build_dit(cfg, device="meta").state_dict())


def register_dit_config(cfg: WanDiTConfig) -> str:
    """Make diffsynth's hash detection (``MODEL_CONFIGS``) recognise ``cfg``; returns the hash.

    Needed for custom shapes (the tiny synthetic DiT) before diffsynth's own
    loaders (``ModelPool``, ``WanVideoPipeline.from_pretrained``) can load them.
    Idempotent; a hash already bound to other kwargs raises.
    """
    from diffsynth.configs import MODEL_CONFIGS

    h = expected_file_hash(cfg)
    kwargs = cfg.model_kwargs()
    for entry in MODEL_CONFIGS:
        if entry["model_hash"] != h:
            continue
        known = {k: entry.get("extra_kwargs", {}).get(k) for k in kwargs}
        if entry["model_class"].endswith("WanModel") and _same_kwargs(known, kwargs):
            return h
        raise ValueError(f"diffsynth already binds model hash {h} to {entry['model_class']} "
                         f"{entry.get('extra_kwargs')}, not to {cfg}")
    MODEL_CONFIGS.append({"model_hash": h, "model_name": "wan_video_dit",
                          "model_class": "diffsynth.models.wan_video_dit.WanModel",
                          "extra_kwargs": kwargs})
    return h


def _same_kwargs(a: dict[str, object], b: dict[str, object]) -> bool:
    norm = lambda d: {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}  # noqa: E731
    return norm(a) == norm(b)


def load_dit(path: str | Path | Sequence[str | Path], cfg: WanDiTConfig,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a ``WanModel`` from local safetensors file(s) through diffsynth's loader.

    The file's diffsynth model hash must equal the one of ``cfg`` (registered in
    ``MODEL_CONFIGS`` here if new); otherwise, or for a non-safetensors file, or
    a non-finite weight, an :class:`ArtifactError` names the file.
    """
    from diffsynth.core.loader import hash_model_file
    from diffsynth.models.model_loader import ModelPool

    paths = [str(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    for p in paths:
        if not Path(p).is_file():
            raise ArtifactError(f"{p}: DiT weights file not found")
        if not p.endswith(".safetensors"):
            raise ArtifactError(f"{p}: DiT weights must be a .safetensors file (pickles are never loaded)")
        read_metadata(p)  # a file that is not safetensors inside (a renamed pickle) fails here, named
    found, expected = hash_model_file(paths if len(paths) > 1 else paths[0]), expected_file_hash(cfg)
    if found != expected:
        raise ArtifactError(f"{', '.join(paths)}: key names/shapes (diffsynth hash {found}) do not match "
                            f"a WanModel of {cfg} (hash {expected})")
    register_dit_config(cfg)
    pool = ModelPool()
    vram = dict(pool.default_vram_config(), onload_dtype=dtype, preparing_dtype=dtype, computation_dtype=dtype,
                onload_device=str(device), preparing_device=str(device), computation_device=str(device))
    pool.auto_load_model(paths if len(paths) > 1 else paths[0], vram_config=vram)
    dit = pool.fetch_model("wan_video_dit")
    for name, p in dit.named_parameters():
        if not torch.isfinite(p).all():
            raise ArtifactError(f"{', '.join(paths)}: weight '{name}' contains NaN or inf")
    return dit


@contextmanager
def fused_rms_norm(dit: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block, the DiT's RMSNorms use ``F.rms_norm`` (diffsynth's ``use_torch_norm``)
    instead of their float32 upcast path: the same function, fewer memory passes."""
    from diffsynth.models.wan_video_dit import RMSNorm

    norms = [m for m in dit.modules() if isinstance(m, RMSNorm)]
    previous = [m.use_torch_norm for m in norms]
    for m in norms:
        m.use_torch_norm = enabled
    try:
        yield
    finally:
        for m, prev in zip(norms, previous):
            m.use_torch_norm = prev


def base_model_hash(dit: nn.Module) -> str:
    """Content hash of the DiT's state dict (names, dtypes, shapes, bytes)."""
    return tensors_hash(dict(dit.state_dict()))


# --------------------------------------------------------------------------- forward

@dataclass(frozen=True)
class Checkpointing:
    """Which blocks recompute their activations in backward, and what they keep.

    ``blocks``: checkpoint the first ``blocks`` DiT blocks (None: all); the rest
    keep their activations. ``save_attention``: checkpointed blocks keep their
    attention kernels' outputs, so the recompute skips the attention (the
    costliest part of long clips) and redoes only the cheap linears and norms.
    """

    blocks: int | None = None
    save_attention: bool = False


_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  *flash.SAVEABLE_OPS)


def _save_attention_policy(ctx: object, op: object, *args: object, **kwargs: object) -> object:
    from torch.utils.checkpoint import CheckpointPolicy

    packet = getattr(op, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    return CheckpointPolicy.MUST_SAVE if name in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_kwargs(policy: Checkpointing) -> dict[str, object]:
    if not policy.save_attention:
        return {}
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_attention_policy)}


def _run_block(dit: nn.Module, index: int, lora: LoRAWeights | None, freqs: torch.Tensor, x: torch.Tensor,
               context: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
    """Block ``index`` with its LoRA bound; called again on checkpoint recompute."""
    if lora is None:
        return dit.blocks[index](x, context, t_mod, freqs)
    with apply_lora(dit, lora, blocks=(index,)):
        return dit.blocks[index](x, context, t_mod, freqs)


def _block_runners(dit: nn.Module, lora: LoRAWeights | None, freqs: torch.Tensor, block_impl: str,
                   n_ckpt: int) -> list[functools.partial]:
    """One callable ``(x, context, t_mod)`` per block, for ``block_impl``: diffsynth's block modules,
    or lofa's fused block (``lofa.kernels.wan_fast.block_runners``; checkpointed blocks run eager)."""
    if block_impl not in BLOCK_IMPLS:
        raise ValueError(f"dit_forward: unknown block_impl {block_impl!r}; valid: {list(BLOCK_IMPLS)}")
    if block_impl == "diffsynth":
        return [functools.partial(_run_block, dit, i, lora, freqs) for i in range(len(dit.blocks))]
    return wan_fast.block_runners(dit, lora, freqs, compiled_from=n_ckpt if block_impl == "compiled" else None)


def _rope_freqs(dit: nn.Module, f: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    fr = dit.freqs
    return torch.cat([
        fr[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        fr[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        fr[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1).to(device)


def dit_forward(dit: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                lora: LoRAWeights | None = None,
                grad_checkpointing: bool | Checkpointing = False,
                block_impl: BlockImpl = "diffsynth") -> torch.Tensor:
    """Velocity prediction of the DiT, one timestep and (optionally) one LoRA per sample.

    Args:
        latents: (B, in_dim, T, H, W) noisy latents.
        timestep: (B,) or (1,) timesteps in [0, 1000].
        context: (B, L, text_dim) text embeddings.
        lora: LoRA set with K = B (one per sample) or K = 1 (shared); None for the base model.
        grad_checkpointing: True (every block, full recompute) or a :class:`Checkpointing`;
            recomputed blocks re-bind their LoRA.
        block_impl: "diffsynth" runs diffsynth's block modules (LoRAs through
            :class:`lofa.lora.LoRALinear`); "fused" lofa's functional block
            (:mod:`lofa.kernels.wan_fast`, same function within rounding, faster); "compiled"
            that block through ``torch.compile`` where gradients flow into it.
    Returns:
        (B, out_dim, T, H, W), in the DiT's parameter dtype (or the autocast dtype).
    """
    from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d

    if latents.ndim != 5 or context.ndim != 3 or latents.shape[0] != context.shape[0]:
        raise ValueError(f"dit_forward: latents (B,C,T,H,W) and context (B,L,D) must share B; "
                         f"got {tuple(latents.shape)} and {tuple(context.shape)}")
    policy = Checkpointing() if grad_checkpointing is True else grad_checkpointing or None
    pdtype = dit.patch_embedding.weight.dtype
    timestep = timestep.reshape(-1).to(latents.device, torch.float32)
    t = dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, timestep).to(pdtype))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))  # (B|1, 6, dim)
    ctx = dit.text_embedding(context.to(pdtype))
    x = dit.patchify(latents.to(pdtype))  # (B, dim, f, h, w)
    f, h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2).contiguous()  # (B, f*h*w, dim)
    freqs = _rope_freqs(dit, f, h, w, x.device)
    n_ckpt = 0
    if policy is not None and torch.is_grad_enabled():
        n_ckpt = len(dit.blocks) if policy.blocks is None else policy.blocks
    for i, run in enumerate(_block_runners(dit, lora, freqs, block_impl, n_ckpt)):
        if i < n_ckpt:
            x = checkpoint(run, x, ctx, t_mod, use_reentrant=False, **_checkpoint_kwargs(policy))
        else:
            x = run(x, ctx, t_mod)
    x = dit.head(x, t)
    return dit.unpatchify(x, (f, h, w))


# --------------------------------------------------------------------------- flow matching

@dataclass(frozen=True)
class FlowSchedule:
    """diffsynth's Wan training schedule: ``timesteps[i] = 1000 * sigmas[i]``, ``weights[i]``."""

    sigmas: torch.Tensor  # (N,)
    timesteps: torch.Tensor  # (N,)
    weights: torch.Tensor  # (N,)
    weight_min: float
    weight_norm: float


@functools.lru_cache(maxsize=4)
def flow_schedule(shift: float = WAN_SHIFT, num_steps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """The schedule of ``FlowMatchScheduler("Wan").set_timesteps(num_steps, training=True)``."""
    if num_steps != NUM_TRAIN_TIMESTEPS:
        raise ValueError("flow_schedule: only the 1000-step training schedule is supported "
                         f"(diffsynth rescales others empirically); got {num_steps}")
    s = torch.linspace(1.0, 0.0, num_steps + 1)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    y = _weight_bump(timesteps)
    y_min = float(y.min())
    norm = NUM_TRAIN_TIMESTEPS / float((y - y_min).sum())
    weights = (y - y_min) * norm
    return FlowSchedule(sigmas, timesteps, weights, y_min, norm)


def _weight_bump(timesteps: torch.Tensor) -> torch.Tensor:
    return torch.exp(-2 * ((timesteps - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)


def sample_timesteps(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                     min_boundary: float = 0.0, max_boundary: float = 1.0,
                     shift: float = WAN_SHIFT) -> torch.Tensor:
    """(n,) float32 timesteps drawn uniformly from the training grid (as ``FlowMatchSFTLoss``).

    ``min_boundary``/``max_boundary`` restrict the grid index range as diffsynth's
    ``min/max_timestep_boundary`` do. ``generator`` must live on ``device``'s type.
    """
    sched = flow_schedule(shift)
    lo, hi = int(min_boundary * len(sched.timesteps)), int(max_boundary * len(sched.timesteps))
    if not 0 <= lo < hi <= len(sched.timesteps):
        raise ValueError(f"sample_timesteps: need 0 <= min_boundary < max_boundary <= 1, got "
                         f"{min_boundary}, {max_boundary}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    ids = torch.randint(lo, hi, (n,), generator=generator, device=gen_device)
    return _grid_on(shift, str(gen_device))[ids].to(device)


@functools.lru_cache(maxsize=16)
def _grid_on(shift: float, device: str) -> torch.Tensor:
    """The timestep grid, kept on ``device`` (no host-to-device copy per draw)."""
    return flow_schedule(shift).timesteps.to(device)


def sigma_of(timesteps: torch.Tensor) -> torch.Tensor:
    """Noise level of each timestep: ``t / 1000``."""
    return timesteps.float() / NUM_TRAIN_TIMESTEPS


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` per sample; x0, noise (B, ...), timesteps (B,) or (1,)."""
    sigma = sigma_of(timesteps).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise


def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity target ``noise - x0``."""
    return noise - x0


def training_weight(timesteps: torch.Tensor, shift: float = WAN_SHIFT) -> torch.Tensor:
    """diffsynth's per-timestep loss weight (exact on the grid, smooth between): (B,) -> (B,)."""
    sched = flow_schedule(shift)
    return (_weight_bump(timesteps.float()) - sched.weight_min) * sched.weight_norm


def flow_loss(dit: nn.Module, latents: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor,
              noise: torch.Tensor, lora: LoRAWeights | None = None,
              reduction: Literal["none", "mean", "sum"] = "none",
              grad_checkpointing: bool | Checkpointing = False,
              block_impl: BlockImpl = "diffsynth") -> torch.Tensor:
    """Weighted flow-matching MSE of each sample (as ``FlowMatchSFTLoss``, per sample).

    Args:
        latents: (B, 16, T, H, W) clean latents x0.
        context: (B, L, text_dim).
        timesteps: (B,) timesteps; noise: like ``latents``.
        lora: K = B per-sample LoRAs, K = 1 shared, or None.
        block_impl: see :func:`dit_forward`.
    Returns:
        (B,) float32 losses for ``reduction="none"``, else a scalar.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"flow_loss: unknown reduction {reduction!r}; valid: ['none', 'mean', 'sum']")
    if noise.shape != latents.shape:
        raise ValueError(f"flow_loss: noise {tuple(noise.shape)} must match latents {tuple(latents.shape)}")
    timesteps = timesteps.reshape(-1).to(latents.device).float().expand(latents.shape[0])
    noisy = add_noise(latents.float(), noise.float(), timesteps)
    pred = dit_forward(dit, noisy, timesteps, context, lora=lora, grad_checkpointing=grad_checkpointing,
                       block_impl=block_impl)
    err = (pred.float() - training_target(latents.float(), noise.float())).pow(2)
    losses = err.flatten(1).mean(1) * training_weight(timesteps)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses
