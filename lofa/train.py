"""The one training loop (base-model pretraining, hypernetwork stage I and stage II).

A stage supplies a model, a ``loss_step(model, batch) -> (loss, metrics)`` and a
deterministic ``batches(draw, rank, world) -> batch``; the loop owns the rest:
accelerate (any number of processes, DDP), gradient accumulation, clipping,
AdamW with linear warm-up then cosine/constant learning rate, bf16 autocast with
fp32 trainable weights, logging every ``log_every`` steps, a NaN/inf guard,
checkpoints (safetensors + JSON, never pickles) and exact resume.

Given an :class:`~lofa.inputkey.InputKey` (what the run is made from: its data, code and
params), the checkpoints and the export record it, and a run finding checkpoints or an
export made from other inputs deletes them and starts over, saying what changed. Sidecars
hold no wall times (``steps_per_s`` goes to the logger only): a rerun on the same inputs
writes the same bytes.

Steps are numbered 1..``max_steps``; a checkpoint at step k holds the weights
after k optimizer updates. Step k consumes the micro-batches with draw numbers
``(k - 1) * grad_accum + micro`` for ``micro`` in ``0..grad_accum-1``: data are a
function of the step, so resume needs no data-loader state.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn
from tqdm.auto import tqdm

from lofa.checkpoint import CheckpointDir, gather_rng, load_optimizer_tensors, optimizer_tensors, restore_rng
from lofa.config import to_dict
from lofa.inputkey import InputKey, StaleResultWarning, stale_message
from lofa.io import SCHEMA_VERSION, ArtifactError, load_tensors, read_json, save_tensors, tensors_hash, write_json

#: Config fields that may change between a run and its resume (they do not change the numbers).
RESUMABLE_CHANGES = frozenset({"log_every", "ckpt_every", "keep_last"})
#: Metric names the loop itself logs; a loss_step must not return these.
LOOP_METRICS = ("loss", "grad_norm", "lr", "param_norm", "steps_per_s")
#: Loop metrics that measure the host, not the model: given to the logger, never stored in sidecars.
HOST_METRICS = frozenset({"steps_per_s"})

Metrics = Mapping[str, float | torch.Tensor]


class LossStep(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Metrics]: ...


class Batches(Protocol):
    def __call__(self, draw: int, rank: int, world: int) -> Any: ...


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of one training run (one ``params.yaml`` section)."""

    max_steps: int
    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01  # on >= 2-D weights only; biases and norm gains get none
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still computed and guarded)
    grad_accum: int = 1
    log_every: int = 10
    ckpt_every: int = 500
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 0
    keep_last: int = 2

    def __post_init__(self) -> None:
        positive = ("max_steps", "grad_accum", "log_every", "ckpt_every", "keep_last")
        bad = [n for n in positive if getattr(self, n) < 1]
        bad += [n for n in ("warmup_steps", "grad_clip", "weight_decay") if getattr(self, n) < 0]
        bad += [] if self.lr > 0 else ["lr"]
        bad += [] if 0 <= self.min_lr_ratio <= 1 else ["min_lr_ratio"]
        bad += [] if all(0 <= b < 1 for b in self.betas) else ["betas"]
        if bad:
            raise ValueError(f"TrainConfig: invalid value for {bad}: {self}")


@dataclass(frozen=True)
class TrainResult:
    """What a finished ``train`` call reached."""

    step: int
    metrics: dict[str, float]
    model_path: Path
    resumed_from: int | None = None


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; training stopped before the optimizer step."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine or constant."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_items: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_items, generator=gen).tolist())


def batch_indices(draw: int, *, num_items: int, global_batch: int, rank: int, world: int,
                  seed: int = 0) -> list[int]:
    """This rank's item indices for micro-batch ``draw``: a deterministic sampler.

    The global batch of ``draw`` is items ``draw * global_batch`` onwards of an
    endless sequence of seeded permutations (one per epoch, without replacement
    inside an epoch); rank r takes every ``world``-th of them from position r. So
    the global batch does not depend on the number of processes.
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
    start = draw * global_batch
    picked = []
    for pos in range(start + rank, start + global_batch, world):
        epoch, i = divmod(pos, num_items)
        picked.append(_permutation(seed, epoch, num_items)[i])
    return picked


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(1, cfg), betas=cfg.betas)


def assert_fp32_trainable(model: nn.Module) -> None:
    """Raise unless every trainable parameter is float32 (bf16 runs only under autocast)."""
    bad = [f"{n} ({p.dtype})" for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if bad:
        raise ValueError(f"trainable parameters must stay float32 (use mixed_precision='bf16' "
                         f"for bf16 compute); found {bad[:5]}{' ...' if len(bad) > 5 else ''}")


def _check_accelerator(acc: Accelerator, cfg: TrainConfig) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise RuntimeError(f"train: launched with WORLD_SIZE={launched} but the Accelerator sees "
                           f"{acc.num_processes} process(es); without CUDA build it with Accelerator(cpu=True)")
    if acc.gradient_accumulation_steps != 1:
        raise ValueError("train: the loop accumulates gradients itself (TrainConfig.grad_accum); "
                         "build the Accelerator with gradient_accumulation_steps=1")
    if acc.mixed_precision not in ("no", cfg.mixed_precision):
        raise ValueError(f"train: the Accelerator (or `accelerate launch`) uses mixed precision "
                         f"'{acc.mixed_precision}' but TrainConfig.mixed_precision is '{cfg.mixed_precision}'")


def _check_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    now = to_dict(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        changes = {k: (saved.get(k), now.get(k)) for k in diff}
        raise ValueError(f"{where}: cannot resume, config changed {changes} (saved, now); "
                         f"use another out_dir or resume=False")


def _micro_steps(acc: Accelerator, model: nn.Module, loss_step: LossStep, batches: Batches,
                 cfg: TrainConfig, step: int, log_now: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """Forward/backward of the ``grad_accum`` micro-batches of ``step``.

    Returns the mean loss (0-d, detached), the summed metrics (at log steps only)
    and the first batch.
    """
    loss_sum = torch.zeros((), device=acc.device)
    sums: dict[str, torch.Tensor] = {}
    first = None
    for micro in range(cfg.grad_accum):
        draw = (step - 1) * cfg.grad_accum + micro
        batch = send_to_device(batches(draw, acc.process_index, acc.num_processes), acc.device)
        first = batch if first is None else first
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last else acc.no_sync(model):
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                loss, metrics = loss_step(model, batch)
            if not (torch.is_tensor(loss) and loss.ndim == 0):
                raise ValueError(f"loss_step must return a 0-d loss tensor, got {type(loss).__name__} "
                                 f"{tuple(getattr(loss, 'shape', ()))}")
            acc.backward(loss / cfg.grad_accum)
        loss_sum += loss.detach().float()
        for k, v in metrics.items() if log_now else ():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=acc.device).detach()
    return loss_sum / cfg.grad_accum, sums, first


def _reduce_mean(acc: Accelerator, values: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, float]:
    if not values:
        return {}
    names = sorted(values)
    vec = acc.reduce(torch.stack([values[k].float() for k in names]), reduction="mean")
    return {k: float(v) * scale for k, v in zip(names, vec.tolist())}


def _guard(acc: Accelerator, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
           ckpts: CheckpointDir) -> tuple[float, float]:
    """All ranks agree on (loss, grad norm); raise NonFiniteError on NaN/inf (one sync per step)."""
    both = acc.reduce(torch.stack([loss, grad_norm.to(acc.device).float()]), reduction="mean").tolist()
    for name, value in zip(("loss", "grad_norm"), both):
        if not math.isfinite(value):
            last = ckpts.latest()
            good = f"last good checkpoint: {last[0]} (step {last[1]})" if last else "no checkpoint written yet"
            raise NonFiniteError(f"step {step}: non-finite {name} ({value}); training stopped before the "
                                 f"optimizer step, weights untouched; {good}")
    return both[0], both[1]


def _diagnose(acc: Accelerator, model: nn.Module, diagnostics: Callable[[nn.Module, Any], Metrics],
              batch: Any, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Run the log-step diagnostics on this rank's first micro-batch, leaving RNG and grads as they were."""
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), \
            torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        out = diagnostics(model, batch)
    model.zero_grad(set_to_none=True)
    return {k: torch.as_tensor(v, dtype=torch.float32, device=acc.device).detach() for k, v in out.items()}


def _param_norm(model: nn.Module) -> float:
    norms = [p.detach().float().norm() for p in model.parameters() if p.requires_grad]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _drop_stale(acc: Accelerator, ckpts: CheckpointDir, out_dir: Path, key: InputKey) -> None:
    """Delete checkpoints and the export when either was made from inputs other than ``key``."""
    found = []
    latest = ckpts.latest()
    if latest is not None:
        found.append((f"{ckpts.root} (step {latest[1]})", read_json(latest[0] / "checkpoint.json").get("input_key")))
    if (out_dir / "model.json").is_file():
        found.append((str(out_dir / "model.json"), read_json(out_dir / "model.json").get("input_key")))
    stale = [(where, changes) for where, changes in ((w, key.changes(saved)) for w, saved in found) if changes]
    acc.wait_for_everyone()  # every rank has decided before the main process deletes
    if not stale:
        return
    if acc.is_main_process:
        where, changes = stale[0]
        warnings.warn(stale_message(where, changes, "deleting its checkpoints and export, training from step 0"),
                      StaleResultWarning, stacklevel=3)
        ckpts.clear()
        for name in ("model.safetensors", "model.json"):
            (out_dir / name).unlink(missing_ok=True)
    acc.wait_for_everyone()


def _resume(acc: Accelerator, model: nn.Module, cfg: TrainConfig, ckpts: CheckpointDir
            ) -> tuple[int, dict[str, Any] | None]:
    """Load the latest checkpoint's model weights; return (step, sidecar) or (0, None)."""
    latest = ckpts.latest()
    if latest is None:
        return 0, None
    path, step = latest
    sidecar = read_json(path / "checkpoint.json")
    if sidecar.get("schema_version") != SCHEMA_VERSION or sidecar.get("step") != step:
        raise ArtifactError(f"{path / 'checkpoint.json'}: schema {sidecar.get('schema_version')} / step "
                            f"{sidecar.get('step')} do not match {SCHEMA_VERSION} / pointer step {step}")
    _check_config(sidecar["config"], cfg, path / "checkpoint.json")
    load_checkpoint_weights(path / "model.safetensors", model)
    return step, sidecar


def _restore_state(acc: Accelerator, opt: torch.optim.Optimizer, model: nn.Module, sidecar: dict[str, Any],
                   path: Path, cfg: TrainConfig) -> None:
    load_optimizer_tensors(opt, model, load_tensors(path / "optimizer.safetensors"), path / "optimizer.safetensors")
    states = sidecar["rng"]
    if len(states) == acc.num_processes:
        restore_rng(states[acc.process_index], acc.device)
    else:
        warnings.warn(f"{path}: saved with {len(states)} processes, resuming with {acc.num_processes}: "
                      f"data order is kept, per-rank RNG streams are reseeded", stacklevel=3)
        set_seed(cfg.seed + sidecar["step"], device_specific=True)


def _loop_metrics(acc: Accelerator, model: nn.Module, sums: dict[str, torch.Tensor], diag: dict[str, torch.Tensor],
                  cfg: TrainConfig, loop: dict[str, float]) -> dict[str, float]:
    step_metrics = _reduce_mean(acc, sums, 1.0 / cfg.grad_accum)
    extra = {**step_metrics, **_reduce_mean(acc, diag)}
    clash = sorted(set(extra) & set(LOOP_METRICS)) or sorted(set(step_metrics) & set(diag))
    if clash:
        raise ValueError(f"metric name(s) {clash} are used twice (loop metrics are {list(LOOP_METRICS)})")
    assert_fp32_trainable(acc.unwrap_model(model))
    return {**loop, "param_norm": _param_norm(model), **extra}


def train(model: nn.Module, loss_step: LossStep, batches: Batches, cfg: TrainConfig, out_dir: str | Path, *,
          logger: Callable[[int, dict[str, float]], None] | None = None,
          diagnostics: Callable[[nn.Module, Any], Metrics] | None = None,
          resume: bool = True, meta: Mapping[str, Any] | None = None,
          accelerator: Accelerator | None = None, input_key: InputKey | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps; write checkpoints and the final weights.

    Args:
        model: float32 trainable weights (frozen parts may be any dtype). Keep big
            frozen models out of it (close over them in ``loss_step``): every
            checkpoint stores ``model.state_dict()``.
        loss_step: ``(model, batch) -> (loss, metrics)``; loss is a 0-d tensor,
            metrics floats or 0-d tensors (read only at log steps). It must call
            ``model(...)`` (other methods bypass DDP's gradient sync).
        batches: ``(draw, rank, world) -> batch``, deterministic in its arguments
            (``batch_indices`` is one such sampler); tensors are moved to the device.
        cfg: see ``TrainConfig``.
        out_dir: gets ``ckpt/step_XXXXXXX/``, ``ckpt/latest.json``, ``model.safetensors``
            and ``model.json``.
        logger: ``(step, metrics)``, called on the main process at log steps, after
            that step's checkpoint is written.
        diagnostics: ``(unwrapped model, batch) -> metrics`` run only at log steps
            (may run its own backward; grads and RNG are restored afterwards).
        resume: continue from ``ckpt/latest.json`` if present; False deletes ``ckpt/``.
        meta: JSON-able facts stored in every sidecar (model config, base-model hash).
        accelerator: default ``Accelerator(cpu=not torch.cuda.is_available())`` (``cpu=True``
            is what makes a CPU-only ``torchrun``/``accelerate launch`` run gloo DDP).
        input_key: what this run is made from; stored in every sidecar. Checkpoints or an
            export recorded under another key are deleted (a :class:`StaleResultWarning` says
            what changed) and training starts from step 0. None: no check (the config alone).
    """
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    _check_accelerator(acc, cfg)
    assert_fp32_trainable(model)
    out_dir = Path(out_dir)
    ckpts = CheckpointDir(out_dir / "ckpt", cfg.keep_last, acc.is_main_process)
    if not resume:
        ckpts.clear()
    elif input_key is not None:
        _drop_stale(acc, ckpts, out_dir, input_key)
    ckpts.drop_partial()
    acc.wait_for_everyone()
    set_seed(cfg.seed, device_specific=True)
    start, sidecar = _resume(acc, model, cfg, ckpts)
    opt = _make_optimizer(model, cfg)
    model, aopt = acc.prepare(model, opt)
    if sidecar is not None:
        _restore_state(acc, opt, acc.unwrap_model(model), sidecar, ckpts.latest()[0], cfg)
    run = _Run(acc, model, opt, aopt, cfg, ckpts, dict(meta or {}), input_key)
    run.logged = {k: v for k, v in sidecar["metrics"].items() if k not in HOST_METRICS} if sidecar else {}
    run.loop(start, loss_step, batches, logger, diagnostics)
    path = run.export(out_dir)
    return TrainResult(cfg.max_steps, run.logged, path, start if sidecar else None)


class _Run:
    """State of one ``train`` call (so each phase of a step stays a short function)."""

    def __init__(self, acc: Accelerator, model: nn.Module, opt: torch.optim.Optimizer, aopt: Any,
                 cfg: TrainConfig, ckpts: CheckpointDir, meta: dict[str, Any], input_key: InputKey | None) -> None:
        self.acc, self.model, self.opt, self.aopt, self.cfg = acc, model, opt, aopt, cfg
        self.ckpts, self.meta = ckpts, meta
        self.key = {"input_key": input_key.to_json()} if input_key is not None else {}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.logged: dict[str, float] = {}

    def loop(self, start: int, loss_step: LossStep, batches: Batches,
             logger: Callable[[int, dict[str, float]], None] | None,
             diagnostics: Callable[[nn.Module, Any], Metrics] | None) -> None:
        cfg, acc = self.cfg, self.acc
        # explicit disable=False would override TQDM_DISABLE (the stage commands' --no-progress)
        quiet = not acc.is_main_process or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=quiet, dynamic_ncols=True)
        window, t0 = [], time.perf_counter()
        try:
            for step in range(start + 1, cfg.max_steps + 1):
                log_now = step % cfg.log_every == 0 or step == cfg.max_steps
                loss, sums, first = _micro_steps(acc, self.model, loss_step, batches, cfg, step, log_now)
                grad_norm = acc.clip_grad_norm_(self.params, cfg.grad_clip or math.inf)
                loss_v, norm_v = _guard(acc, step, loss, grad_norm, self.ckpts)
                for group in self.opt.param_groups:
                    group["lr"] = lr_at(step, cfg)
                self.aopt.step()
                self.aopt.zero_grad(set_to_none=True)
                window.append(loss_v)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4g}", refresh=False)
                if log_now:
                    diag = _diagnose(acc, acc.unwrap_model(self.model), diagnostics, first, cfg) if diagnostics else {}
                    elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
                    loop = {"loss": sum(window) / len(window), "grad_norm": norm_v, "lr": lr_at(step, cfg)}
                    host = {"steps_per_s": len(window) / max(elapsed, 1e-9)}
                    self.logged, window = _loop_metrics(acc, self.model, sums, diag, cfg, loop), []
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                    self.save(step)
                if log_now and logger is not None and acc.is_main_process:
                    logger(step, {**self.logged, **host})
        finally:
            bar.close()

    def save(self, step: int) -> None:
        unwrapped = self.acc.unwrap_model(self.model)
        sidecar = {"schema_version": SCHEMA_VERSION, "kind": "lofa.train.checkpoint", "step": step,
                   "config": to_dict(self.cfg), "metrics": self.logged, "meta": self.meta,
                   "world_size": self.acc.num_processes, **self.key}
        self.ckpts.save(step, unwrapped.state_dict(), optimizer_tensors(self.opt, unwrapped), sidecar,
                        gather_rng(self.acc))
        self.acc.wait_for_everyone()

    def export(self, out_dir: Path) -> Path:
        """Write ``model.safetensors`` + ``model.json`` (main process); return the weights path."""
        path = out_dir / "model.safetensors"
        if self.acc.is_main_process:
            weights = self.acc.unwrap_model(self.model).state_dict()
            save_tensors(path, weights, {"schema_version": SCHEMA_VERSION, "step": self.cfg.max_steps})
            write_json(out_dir / "model.json", {
                "schema_version": SCHEMA_VERSION, "kind": "lofa.train.model", "step": self.cfg.max_steps,
                "config": to_dict(self.cfg), "metrics": self.logged, "meta": self.meta,
                "tensors_hash": tensors_hash(weights), "world_size": self.acc.num_processes, **self.key})
        self.acc.wait_for_everyone()
        return path


def load_checkpoint_weights(path: str | Path, model: nn.Module) -> None:
    """Strictly load weights into ``model`` from a ``.safetensors`` file or a directory holding
    ``model.safetensors`` (an ``out_dir`` or a ``ckpt/step_XXXXXXX`` directory).

    Raises ArtifactError naming the file and the missing, unexpected or mis-shaped keys.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    tensors = load_tensors(file)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ArtifactError(f"{file}: does not fit the model; missing {missing[:8]}, unexpected "
                            f"{unexpected[:8]}, shape mismatches {shapes[:8]}")
    model.load_state_dict(tensors, strict=True)
