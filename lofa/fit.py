"""Per-clip LoRA fitting: K clips per forward, each with its own LoRA; resumable shards.

Every clip gets its own random stream (seeded from the config seed and the clip
id), so a clip's LoRA does not depend on which clips share its batch or on
how the work was sharded or resumed. The K LoRAs are independent: the loss is
the sum of per-clip losses (each gradient is the clip's own), AdamW is
elementwise, and gradient clipping, if on, is per clip.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from lofa.kernels import flash
from lofa.config import to_dict
from lofa.inputkey import InputKey
from lofa.artifacts.loras import lora_path, save_fitted
from lofa.io import SCHEMA_VERSION, ArtifactError, load_tensors, read_metadata, sha256_file
from lofa.layers import ATTN_MODULES, Vocabulary
from lofa.lora import LORA_FORMAT, LoRAWeights, base_weights, response_stats
from lofa.wan import (BLOCK_IMPLS, Checkpointing, base_model_hash, dit_config, flow_loss, flow_schedule,
                      fused_rms_norm, sample_timesteps)

LATENTS_KEY = "latents"
CONTEXT_KEY = "context"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                  "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_BLOCK_IMPLS = ("auto", *BLOCK_IMPLS)


@dataclass(frozen=True)
class FitConfig:
    """How one LoRA is fitted to one clip (params section ``fit_loras``).

    Throughput (Wan2.1-1.3B, bf16 DiT, rank 32, one H200, torch 2.11,
    benchmarks/bench_fit.py), compiled block, no checkpointing: 49 clip-steps/s with
    clips_per_batch 24 at 17x256x256 (74 GiB), 8.5/s with 6-8 at 33x320x512
    (72-94 GiB), 0.58/s with 1 at 81x480x832 (66 GiB). On 80 GB cards use fewer
    clips, or checkpointing with ``checkpoint_save_attention`` and
    ``checkpoint_blocks`` below the block count. torch 2.11 already picks cuDNN's
    attention on that card.
    """

    rank: int = 32
    alpha: float = 32.0  # LoRA scale alpha / rank
    steps: int = 200
    lr: float = 1e-4
    clips_per_batch: int = 4  # K clips (each its own LoRA) per forward
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float | None = None  # per clip
    timestep_min: float = 0.0  # grid-index range of sampled timesteps, as diffsynth's boundaries
    timestep_max: float = 1.0
    seed: int = 0  # with the clip id, seeds each clip's timesteps and noise (and init unless shared)
    init: Literal["kaiming", "gaussian"] = "kaiming"  # of A (peft's); B starts at zero
    response_tau: float = 0.02  # response maps |dW/W| > tau in the fit statistics (DESIGN: 0.02 for Wan2.1)
    shared_init: bool = True  # every clip starts from one A (seeded by ``seed``): LoRAs comparable across clips
    grad_checkpointing: bool = False
    checkpoint_blocks: int | None = None  # checkpoint only the first n blocks
    checkpoint_save_attention: bool = False  # recompute skips the attention kernels
    # SDPA kernel: "auto" torch's own choice, a name restricts to that kernel
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    # fused block's attention kernel (lofa.kernels.flash): "auto" FlashAttention 4 where it runs, else SDPA
    attention: Literal["auto", "fa4", "sdpa"] = "auto"
    fused_rms_norm: bool = True  # diffsynth block: F.rms_norm in its RMSNorms (same function, faster)
    # DiT block: lofa's fused block ("fused"; "compiled" runs it through torch.compile), or
    # diffsynth's modules; "auto": compiled on CUDA, diffsynth elsewhere (lofa.wan.dit_forward)
    block_impl: Literal["auto", "diffsynth", "fused", "compiled"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (bf16 autocasts an fp32 DiT)
    modules: tuple[str, ...] = ATTN_MODULES  # adapted linears of every block
    eval_points: int = 4  # fixed (timestep, noise) pairs for base/final loss
    save_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("rank", "steps", "clips_per_batch", "eval_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.alpha <= 0:
            raise ValueError(f"FitConfig: lr and alpha must be positive, got {self.lr}, {self.alpha}")
        if not 0 <= self.timestep_min < self.timestep_max <= 1:
            raise ValueError(f"FitConfig: need 0 <= timestep_min < timestep_max <= 1, got "
                             f"{self.timestep_min}, {self.timestep_max}")
        for key, valid in (("init", ("kaiming", "gaussian")), ("dtype", tuple(_DTYPES)),
                           ("save_dtype", tuple(_DTYPES)), ("sdpa_backend", tuple(_SDPA_BACKENDS)),
                           ("block_impl", _BLOCK_IMPLS), ("attention", flash.BACKENDS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"FitConfig.{key}: {getattr(self, key)!r} is not one of {list(valid)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def result_fields(self) -> dict[str, object]:
        """The fields that decide what a fitted LoRA is (not how fast it is computed)."""
        how = {"clips_per_batch", "grad_checkpointing", "checkpoint_blocks", "checkpoint_save_attention",
               "sdpa_backend", "attention", "fused_rms_norm", "block_impl", "response_tau"}
        return {k: v for k, v in sorted(to_dict(self).items()) if k not in how}

    def result_hash(self) -> str:
        """A hash of :meth:`result_fields`: a LoRA file written under another hash is stale and is
        fitted again."""
        return hashlib.sha256(repr(self.result_fields()).encode()).hexdigest()[:16]

    @property
    def checkpointing(self) -> Checkpointing | bool:
        if not self.grad_checkpointing:
            return False
        return Checkpointing(self.checkpoint_blocks, self.checkpoint_save_attention)

    def block_impl_on(self, device: torch.device) -> str:
        """The block implementation used on ``device`` ("auto" resolved)."""
        if self.block_impl != "auto":
            return self.block_impl
        return "compiled" if device.type == "cuda" else "diffsynth"  # fused is 2.6x slower on CPU


@dataclass(frozen=True)
class FitResult:
    """K fitted LoRAs and their curves."""

    lora: LoRAWeights  # A (K, r, in), B (K, out, r), scale alpha / r
    losses: torch.Tensor  # (K, steps) training loss per step
    base_loss: torch.Tensor  # (K,) eval loss of the base model
    final_loss: torch.Tensor  # (K,) eval loss with the fitted LoRA
    seconds: float


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and runs)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_lora(vocab: Vocabulary, cfg: FitConfig, generators: Sequence[torch.Generator],
              device: torch.device | str) -> LoRAWeights:
    """K fresh fp32 LoRAs (one per generator): A kaiming-uniform (as peft) or N(0, 1/r^2), B zero."""
    A, B = [], []
    for m in vocab:
        rows = []
        for g in generators:
            if cfg.init == "kaiming":  # peft: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
                bound = 1.0 / math.sqrt(m.in_features)
                a = torch.rand((cfg.rank, m.in_features), generator=g, device=g.device) * (2 * bound) - bound
            else:  # peft "gaussian": normal_(std=1/r)
                a = torch.randn((cfg.rank, m.in_features), generator=g, device=g.device) / cfg.rank
            rows.append(a.to(device))
        A.append(torch.stack(rows).requires_grad_(True))
        B.append(torch.zeros(len(generators), m.out_features, cfg.rank, device=device, requires_grad=True))
    return LoRAWeights(vocab, tuple(A), tuple(B), cfg.scale)


def draw_step(generators: Sequence[torch.Generator], sample_shape: Sequence[int], cfg: FitConfig,
              device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's (timesteps (K,), noise (K, *sample_shape)), each clip from its own generator."""
    ts, noise = [], []
    for g in generators:
        ts.append(sample_timesteps(1, g, device, cfg.timestep_min, cfg.timestep_max))
        noise.append(torch.randn(tuple(sample_shape), generator=g, device=g.device).to(device))
    return torch.cat(ts), torch.stack(noise)


def eval_inputs(seed: int, sample_shape: Sequence[int], n: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed eval timesteps (n,) spread over the grid, and noise (n, *sample_shape) from ``seed``."""
    grid = flow_schedule().timesteps
    ids = ((torch.arange(n) + 0.5) * len(grid) / n).long()
    g = torch.Generator().manual_seed(derive_seed(seed, "eval"))
    return grid[ids].to(device), torch.randn((n, *sample_shape), generator=g).to(device)


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _clip_per_clip(params: Sequence[torch.Tensor], max_norm: float) -> None:
    sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params)  # (K,)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.view(-1, *([1] * (p.ndim - 1))).to(p.grad.dtype))


def _autocasting(dit: nn.Module, cfg: FitConfig) -> bool:
    return cfg.dtype == "bfloat16" and dit.patch_embedding.weight.dtype == torch.float32


def autocast(dit: nn.Module, cfg: FitConfig) -> torch.autocast:
    """Autocast for ``cfg.dtype``, the compute dtype: "bfloat16" autocasts an fp32 DiT (a bf16
    DiT computes in bf16 as is); "float32" needs fp32 weights. LoRA parameters stay fp32."""
    weight = dit.patch_embedding.weight
    if cfg.dtype == "float32" and weight.dtype != torch.float32:
        raise ValueError(f"FitConfig.dtype is float32 but the DiT's weights are {weight.dtype}; "
                         "use dtype bfloat16 or cast the DiT to float32")
    return torch.autocast(weight.device.type, torch.bfloat16, enabled=_autocasting(dit, cfg))


@contextmanager
def attention_backend(cfg: FitConfig) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to the kernel ``cfg.sdpa_backend`` names (forward,
    recompute, backward); the fused block's kernel is ``cfg.attention`` (:mod:`lofa.kernels.flash`)."""
    with ExitStack() as stack:
        stack.enter_context(flash.use(cfg.attention))
        if _SDPA_BACKENDS[cfg.sdpa_backend] is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[cfg.sdpa_backend])))
        yield


@torch.no_grad()
def eval_loss(dit: nn.Module, latents: torch.Tensor, context: torch.Tensor, seeds: Sequence[int],
              cfg: FitConfig, lora: LoRAWeights | None) -> torch.Tensor:
    """(K,) mean weighted flow loss over each clip's fixed eval points (see :func:`eval_inputs`)."""
    per_clip = [eval_inputs(s, latents.shape[1:], cfg.eval_points, latents.device) for s in seeds]
    total = torch.zeros(latents.shape[0], device=latents.device)
    with attention_backend(cfg), autocast(dit, cfg):
        for j in range(cfg.eval_points):
            ts = torch.stack([t[j] for t, _ in per_clip])
            noise = torch.stack([n[j] for _, n in per_clip])
            total += flow_loss(dit, latents, context, ts, noise, lora=lora,
                               block_impl=cfg.block_impl_on(latents.device))
    return total / cfg.eval_points


def fit_batch(dit: nn.Module, vocab: Vocabulary, latents: torch.Tensor, context: torch.Tensor,
              cfg: FitConfig, seeds: Sequence[int],
              on_step: Callable[[int, torch.Tensor], None] | None = None,
              init: LoRAWeights | None = None) -> FitResult:
    """Fit K LoRAs, one per clip, in one batched loop (the DiT is frozen in place).

    Args:
        latents: (K, 16, T, H, W) clean latents; context: (K, L, text_dim).
        seeds: K per-clip seeds (see :func:`derive_seed`); each drives that clip's
            timesteps and noise and, unless ``cfg.shared_init``, first its LoRA init.
        on_step: called after each optimizer step with (step, losses (K,)).
        init: start from these LoRAs (K or 1 of them, rank ``cfg.rank``, scale folded
            into B) instead of a fresh init: refinement of a predicted LoRA.
    """
    k = latents.shape[0]
    if context.shape[0] != k or len(seeds) != k:
        raise ValueError(f"fit_batch: {k} latents, {context.shape[0]} contexts, {len(seeds)} seeds")
    t0 = time.perf_counter()
    device = latents.device
    dit.requires_grad_(False)
    gens = _generators(seeds, device)
    if init is not None:
        lora = _from_init(init, k, cfg, device)
    elif cfg.shared_init:
        lora = init_lora(vocab, cfg, _generators([derive_seed(cfg.seed, "init")] * k, device), device)
    else:
        lora = init_lora(vocab, cfg, gens, device)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    curve = torch.zeros(k, cfg.steps, device=device)
    # F.rms_norm fuses only when input and weight dtypes agree (not under autocast)
    with fused_rms_norm(dit, cfg.fused_rms_norm and not _autocasting(dit, cfg)):
        _train(dit, latents, context, cfg, gens, lora, opt, curve, on_step)
        fitted = LoRAWeights(vocab, tuple(a.detach() for a in lora.A), tuple(b.detach() for b in lora.B),
                             lora.scale)
        base = eval_loss(dit, latents, context, seeds, cfg, None)
        final = eval_loss(dit, latents, context, seeds, cfg, fitted)
    return FitResult(fitted, curve.cpu(), base.cpu(), final.cpu(), time.perf_counter() - t0)


def _from_init(init: LoRAWeights, k: int, cfg: FitConfig, device: torch.device) -> LoRAWeights:
    """Trainable fp32 copies of ``init`` (broadcast from one LoRA to K) in cfg's scale."""
    if init.rank != cfg.rank or init.num_loras not in (1, k):
        raise ValueError(f"fit_batch: init has {init.num_loras} LoRAs of rank {init.rank}; need 1 or {k} "
                         f"of rank {cfg.rank}")
    scale = torch.as_tensor(init.scale, dtype=torch.float32).reshape(-1, 1, 1)
    A = tuple(a.detach().float().to(device).expand(k, -1, -1).clone().requires_grad_(True) for a in init.A)
    B = tuple((b.detach().float() * scale.to(b.device) / cfg.scale).to(device).expand(k, -1, -1).clone()
              .requires_grad_(True) for b in init.B)
    return LoRAWeights(init.vocab, A, B, cfg.scale)


def train_losses(dit: nn.Module, latents: torch.Tensor, context: torch.Tensor, ts: torch.Tensor,
                 noise: torch.Tensor, lora: LoRAWeights, cfg: FitConfig) -> torch.Tensor:
    """(K,) flow losses of one training step as ``fit_loras`` computes them: ``cfg``'s compute dtype,
    block implementation and checkpointing. Call it inside :func:`attention_backend`, which must
    also cover the backward (checkpointed blocks recompute there)."""
    with autocast(dit, cfg):
        return flow_loss(dit, latents, context, ts, noise, lora=lora, grad_checkpointing=cfg.checkpointing,
                         block_impl=cfg.block_impl_on(latents.device))


def _train(dit: nn.Module, latents: torch.Tensor, context: torch.Tensor, cfg: FitConfig,
           gens: Sequence[torch.Generator], lora: LoRAWeights, opt: torch.optim.Optimizer,
           curve: torch.Tensor, on_step: Callable[[int, torch.Tensor], None] | None) -> None:
    """The optimisation loop of :func:`fit_batch`; fills ``curve`` (K, steps)."""
    for step in range(cfg.steps):
        ts, noise = draw_step(gens, latents.shape[1:], cfg, latents.device)
        with attention_backend(cfg):
            losses = train_losses(dit, latents, context, ts, noise, lora, cfg)
            losses.sum().backward()
        if cfg.max_grad_norm is not None:
            _clip_per_clip(lora.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve[:, step] = losses.detach()
        if on_step is not None:
            on_step(step, losses.detach())


# --------------------------------------------------------------------------- shards

@dataclass(frozen=True)
class ClipRecord:
    """One clip to fit: its latents file (keys ``latents`` (16,T,H,W) and, unless
    ``context_path`` is given, ``context`` (L, D))."""

    clip_id: str
    latents_path: str
    prompt: str = ""
    context_path: str | None = None


@dataclass(frozen=True)
class ShardReport:
    shard_index: int
    num_shards: int
    fitted: tuple[str, ...]
    skipped: tuple[str, ...]
    clip_steps_per_s: float


def clip_content_hash(record: ClipRecord) -> str:
    """sha256 of the clip's tensor file (with its context file, when separate): what its LoRA is fitted on."""
    digest = sha256_file(record.latents_path)
    if record.context_path:
        digest = hashlib.sha256(f"{digest}:{sha256_file(record.context_path)}".encode()).hexdigest()
    return digest


def select_shard(records: Sequence[ClipRecord], shard_index: int, num_shards: int) -> list[ClipRecord]:
    """Records ``i`` with ``i % num_shards == shard_index``."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"select_shard: need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    return [r for i, r in enumerate(records) if i % num_shards == shard_index]


def load_clip(record: ClipRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (16, T, H, W), context (L, D)) of one record, as float32 CPU tensors."""
    lat = load_tensors(record.latents_path)
    ctx = load_tensors(record.context_path) if record.context_path else lat
    for key, src, path in ((LATENTS_KEY, lat, record.latents_path),
                           (CONTEXT_KEY, ctx, record.context_path or record.latents_path)):
        if key not in src:
            raise KeyError(f"{path}: no tensor {key!r} (clip {record.clip_id}); keys: {sorted(src)}")
    latents, context = lat[LATENTS_KEY].float(), ctx[CONTEXT_KEY].float()
    if latents.ndim != 4 or context.ndim != 2:
        raise ValueError(f"{record.latents_path}: expected latents (C,T,H,W) and context (L,D), got "
                         f"{tuple(latents.shape)} and {tuple(context.shape)}")
    return latents, context


def _batches(records: Sequence[ClipRecord], size: int):
    """Yield (records, latents (K,...), context (K,...)) batches of equal shapes, in order."""
    pending: dict[tuple, list[tuple[ClipRecord, torch.Tensor, torch.Tensor]]] = {}
    for rec in records:
        lat, ctx = load_clip(rec)
        key = (tuple(lat.shape), tuple(ctx.shape))
        pending.setdefault(key, []).append((rec, lat, ctx))
        if len(pending[key]) == size:
            group = pending.pop(key)
            yield [g[0] for g in group], torch.stack([g[1] for g in group]), torch.stack([g[2] for g in group])
    for group in pending.values():
        yield [g[0] for g in group], torch.stack([g[1] for g in group]), torch.stack([g[2] for g in group])


def _write_clip(out_dir: Path, rec: ClipRecord, k: int, res: FitResult, cfg: FitConfig, dit: nn.Module,
                base_hash: str, shard: tuple[int, int], made_from: dict[str, str]) -> None:
    """The curve JSON, then the LoRA (its existence marks the clip done); ``made_from``: the
    input metadata (clip content hash, fit params, code hashes) the LoRA's header records."""
    A, B = res.lora.factors(k)
    stats = response_stats(A, B, base_weights(dit, res.lora.vocab), res.lora.vocab, cfg.response_tau)
    curve = {"schema_version": SCHEMA_VERSION, "clip_id": rec.clip_id, "prompt": rec.prompt,
             "losses": res.losses[k].tolist(), "base_loss": float(res.base_loss[k]),
             "final_loss": float(res.final_loss[k]), "steps": cfg.steps, "rank": cfg.rank,
             "config": to_dict(cfg), "base_model_hash": base_hash, "response_map": stats,
             "shard": list(shard), "batch_seconds": res.seconds, "batch_size": res.lora.num_loras}
    save_fitted(out_dir, rec.clip_id, curve, A, B, res.lora.vocab,
                {"prompt": rec.prompt, "base_model_hash": base_hash, "clip_id": rec.clip_id,
                 "fit_steps": cfg.steps, "fit_config_hash": cfg.result_hash(),
                 "fit_final_loss": float(res.final_loss[k]), **made_from},
                dtype=_DTYPES[cfg.save_dtype])


def _made_from(rec: ClipRecord, cfg: FitConfig, input_key: InputKey | None) -> dict[str, str]:
    """What a clip's LoRA is made from, as header metadata: the clip's content hash, the fit
    params that decide the result and (given a stage key) the stage's code hashes."""
    made = {"clip_sha256": clip_content_hash(rec), "fit_params": json.dumps(cfg.result_fields(), sort_keys=True)}
    if input_key is not None:
        made["fit_code"] = json.dumps(dict(input_key.code), sort_keys=True)
    return made


def _json_field(meta: dict[str, str], key: str) -> dict:
    try:
        value = json.loads(meta.get(key) or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _finished(path: Path, base_hash: str, config_hash: str,
              made_from: Callable[[], dict[str, str]]) -> bool | tuple[str, str]:
    """True when the clip's LoRA file exists with a readable lofa header written for this base
    model, fit config, clip content and (when this run has a stage key) code (cheap: the tensors
    are not read); False when there is no file; else (kind, why) the file is fitted again (damaged:
    zero bytes, truncated, not safetensors; or stale). ``made_from``: :func:`_made_from` of this run."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except ArtifactError as e:
        return "damaged", f"{e}"
    if meta.get("format") != LORA_FORMAT:
        return "damaged", f"{path}: format {meta.get('format')!r} is not {LORA_FORMAT!r}"
    now = made_from()
    if meta.get("base_model_hash") != base_hash:
        return "base model", f"{path}: fitted on base model {meta.get('base_model_hash')!r}, not {base_hash!r}"
    if meta.get("fit_config_hash") != config_hash:
        old, new = _json_field(meta, "fit_params"), json.loads(now["fit_params"])
        diff = [f"fit_loras.{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] if old else []
        return "fit config", (f"{path}: fitted under another fit config ({meta.get('fit_config_hash')!r}, now "
                              f"{config_hash!r}{': params ' + ', '.join(diff) if diff else ''})")
    if meta.get("clip_sha256") != now["clip_sha256"]:
        was = "no clip content hash recorded" if "clip_sha256" not in meta else "the clip's file changed"
        return "clip content", f"{path}: fitted on other content of clip {meta.get('clip_id')!r} ({was})"
    if "fit_code" in now and meta.get("fit_code") != now["fit_code"]:
        old, new = _json_field(meta, "fit_code"), json.loads(now["fit_code"])
        files = [p for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
        return "code", f"{path}: fitted by other code ({', '.join(f'code {p}' for p in files) or 'none recorded'})"
    return True


def fit_shard(dit: nn.Module, records: Sequence[ClipRecord], out_dir: str | Path, cfg: FitConfig, *,
              shard_index: int = 0, num_shards: int = 1, base_hash: str | None = None,
              progress: bool = True, input_key: InputKey | None = None) -> ShardReport:
    """Fit every clip of this shard whose LoRA file is missing or stale; write LoRAs and curves.

    Writes ``<out>/loras/<safe id>.safetensors`` (export format) and
    ``<out>/curves/<safe id>.json`` per clip, each atomically; clips whose LoRA
    exists for this base model, fit config and clip content (and, given ``input_key``, the
    stage's code: ``input_key.code``) are skipped, so a killed run resumes; a damaged or
    stale one is fitted again, with a warning saying why. Runs on the DiT's device.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    mine = select_shard(records, shard_index, num_shards)
    base_hash, config_hash = base_hash or base_model_hash(dit), cfg.result_hash()
    made: dict[str, dict[str, str]] = {}

    def made_from(rec: ClipRecord) -> dict[str, str]:  # hashed once, only where needed
        if rec.clip_id not in made:
            made[rec.clip_id] = _made_from(rec, cfg, input_key)
        return made[rec.clip_id]

    state = {r.clip_id: _finished(lora_path(out_dir, r.clip_id), base_hash, config_hash,
                                  functools.partial(made_from, r)) for r in mine}
    _warn_redo([why for why in state.values() if isinstance(why, tuple)], len(mine), out_dir)
    todo = [r for r in mine if state[r.clip_id] is not True]
    skipped = tuple(r.clip_id for r in mine if state[r.clip_id] is True)
    vocab = Vocabulary.from_dit_config(dit_config(dit), cfg.modules)
    device = next(dit.parameters()).device
    bar = tqdm(total=len(todo) * cfg.steps, unit="clip-step", disable=not progress, position=shard_index,
               desc=f"fit shard {shard_index}/{num_shards}", dynamic_ncols=True)
    fitted: list[str] = []
    t0 = time.perf_counter()
    for recs, lat, ctx in _batches(todo, cfg.clips_per_batch):
        seeds = [derive_seed(cfg.seed, r.clip_id) for r in recs]
        res = fit_batch(dit, vocab, lat.to(device), ctx.to(device), cfg, seeds,
                        on_step=lambda _s, _l, n=len(recs): bar.update(n))
        for k, rec in enumerate(recs):
            _write_clip(out_dir, rec, k, res, cfg, dit, base_hash, (shard_index, num_shards), made_from(rec))
            fitted.append(rec.clip_id)
        bar.set_postfix(clips=f"{len(fitted)}/{len(todo)}", loss=f"{float(res.final_loss.mean()):.4f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    rate = len(fitted) * cfg.steps / elapsed if fitted else 0.0
    return ShardReport(shard_index, num_shards, tuple(fitted), skipped, rate)


def _warn_redo(redo: list[tuple[str, str]], total: int, out_dir: Path) -> None:
    """One warning per stale LoRA (the first 5), then one line counting them by kind."""
    for _, why in redo[:5]:
        warnings.warn(f"{why}; fitting the clip again", stacklevel=3)
    if len(redo) > 5:
        kinds = collections.Counter(kind for kind, _ in redo)
        warnings.warn(f"{out_dir}: {len(redo)} of {total} LoRA files fitted again ("
                      f"{', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))})", stacklevel=3)


def fit_shard_distributed(build_dit: Callable[[torch.device], nn.Module], records: Sequence[ClipRecord],
                          out_dir: str | Path, cfg: FitConfig, *, cpu: bool = False,
                          base_hash: str | None = None, progress: bool = True,
                          input_key: InputKey | None = None) -> ShardReport:
    """The per-process entry under ``accelerate launch`` / ``torchrun``: this process fits
    shard ``process_index`` of ``num_processes`` on its own device, then waits for the others."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    dit = build_dit(state.device)
    report = fit_shard(dit, records, out_dir, cfg, shard_index=state.process_index,
                       num_shards=state.num_processes, base_hash=base_hash, progress=progress,
                       input_key=input_key)
    state.wait_for_everyone()
    return report
