"""Training checkpoints without pickles: safetensors tensors, JSON numbers for the rest.

Layout under ``ckpt/``::

    step_0000500/model.safetensors      model.state_dict()
    step_0000500/optimizer.safetensors  "<param name>.<state key>" -> tensor (exp_avg, exp_avg_sq, step)
    step_0000500/checkpoint.json        step, config, metrics, schema version, RNG state of every rank
    latest.json                         {"latest": "step_0000500", "step": 500, "history": [...],
                                         "input_key": digest of the sidecar's input key, if any}

A checkpoint directory is written under a temporary name and renamed when
complete; ``latest.json`` moves last. Readers follow ``latest.json`` and the
sidecar's ``step``; directory names are never parsed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from lofa.io import SCHEMA_VERSION, ArtifactError, read_json, save_tensors, write_json


class CheckpointDir:
    """The ``ckpt/`` directory of a run: save (main process writes), find latest, keep the last N."""

    def __init__(self, root: Path, keep_last: int, is_main: bool) -> None:
        self.root, self.keep_last, self.is_main = Path(root), keep_last, is_main

    @property
    def pointer(self) -> Path:
        return self.root / "latest.json"

    def _history(self) -> list[str]:
        return list(read_json(self.pointer)["history"]) if self.pointer.is_file() else []

    def latest(self) -> tuple[Path, int] | None:
        """(directory, step) of the newest complete checkpoint, or None."""
        if not self.pointer.is_file():
            return None
        ptr = read_json(self.pointer)
        if ptr.get("schema_version") != SCHEMA_VERSION or "latest" not in ptr:
            raise ArtifactError(f"{self.pointer}: not a schema-{SCHEMA_VERSION} checkpoint pointer")
        path = self.root / ptr["latest"]
        if not (path / "checkpoint.json").is_file():
            raise ArtifactError(f"{self.pointer}: points to {path}, which has no checkpoint.json")
        return path, int(ptr["step"])

    def clear(self) -> None:
        if self.is_main:
            shutil.rmtree(self.root, ignore_errors=True)

    def drop_partial(self) -> None:
        """Remove directories a killed run left half-written (``.tmp-*``, never pointed to)."""
        if self.is_main and self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def save(self, step: int, model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
             sidecar: dict[str, Any], rng: list[dict[str, Any]]) -> None:
        """Write one checkpoint atomically and prune old ones (no-op off the main process)."""
        if not self.is_main:
            return
        name = f"step_{step:07d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        shutil.rmtree(tmp, ignore_errors=True)
        save_tensors(tmp / "model.safetensors", model)
        save_tensors(tmp / "optimizer.safetensors", optimizer)
        write_json(tmp / "checkpoint.json", {**sidecar, "rng": rng})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        history = [h for h in self._history() if h != name] + [name]
        keep, drop = history[-self.keep_last:], history[:-self.keep_last]
        pointer = {"schema_version": SCHEMA_VERSION, "latest": name, "step": step, "history": keep}
        if isinstance(sidecar.get("input_key"), dict):  # what the run was made from (lofa.inputkey)
            pointer["input_key"] = sidecar["input_key"]["digest"]
        write_json(self.pointer, pointer)
        for old in drop:
            shutil.rmtree(self.root / old, ignore_errors=True)


def optimizer_tensors(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Flatten a per-parameter optimizer state (AdamW: exp_avg, exp_avg_sq, step) by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state '{key}' of {names[id(p)]} is not a tensor: {value!r}")
            out[f"{names[id(p)]}.{key}"] = value
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor],
                           where: Path) -> None:
    """Inverse of ``optimizer_tensors``: load the state through ``opt.load_state_dict``
    (which moves it to each parameter's device and dtype, ``step`` excepted)."""
    params = dict(model.named_parameters())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, sub = key.rsplit(".", 1)
        if name not in params:
            raise ArtifactError(f"{where}: state for unknown parameter '{name}'")
        state.setdefault(name, {})[sub] = value
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    stray = sorted(n for n in state if id(params[n]) not in index)
    if stray:
        raise ArtifactError(f"{where}: state for parameters the optimizer does not train: {stray[:8]}")
    full = opt.state_dict()
    full["state"] = {index[id(params[n])]: s for n, s in state.items()}
    opt.load_state_dict(full)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as JSON-able numbers (torch CPU, this CUDA device, python, numpy)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None,
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *map(lambda x: x.item() if hasattr(x, "item") else x,
                                                          np_state[2:])],
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def gather_rng(acc: Accelerator) -> list[dict[str, Any]]:
    """Every rank's ``rng_state``, gathered in rank order as JSON bytes (no pickles in transit)."""
    data = torch.frombuffer(bytearray(json.dumps(rng_state(acc.device)).encode()), dtype=torch.uint8)
    data = data.to(acc.device)
    sizes = acc.gather(torch.tensor([data.numel()], device=acc.device)).tolist()
    rows = acc.gather(acc.pad_across_processes(data)).view(acc.num_processes, -1).cpu()
    return [json.loads(bytes(rows[r, :n].tolist()).decode()) for r, n in enumerate(sizes)]
