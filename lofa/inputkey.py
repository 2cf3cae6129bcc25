"""Input keys: what a stage's result was made from, so that a rerun resumes or skips only a
result made from the same inputs.

A key holds three parts, each kept per component so that a mismatch can say what changed:

- ``inputs``: the content hash of each input artifact, by role (``data``, ``base``, ``loras``,
  ``stage1``): a file's sha256, or for a directory the sha256 over its sorted relative paths
  and its files' sha256 (``.tmp-*`` leftovers and ``__pycache__`` skipped);
- ``code``: the sha256 of each code dependency the stage declares in ``dvc.yaml`` (its
  ``pipelines/`` and ``lofa/`` deps; a directory stands for its ``.py`` files);
- ``params``: the stage's params section, flattened to dotted names (``train_stage1.train.lr``),
  less the fields that do not change its numbers.

Checkpoint and export sidecars store :meth:`InputKey.to_json`; :meth:`InputKey.changes` lists
what differs from a stored one (``data/loras content changed``, ``params
train_stage1.train.max_steps 300 -> 301``, ``code lofa/hypertrain.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lofa.io import ArtifactError, sha256_file

#: Code deps of a stage are its ``dvc.yaml`` deps under these directories.
CODE_DIRS = ("pipelines/", "lofa/")


class StaleResultWarning(UserWarning):
    """A checkpoint or output made from other inputs was deleted; the work starts over."""


@dataclass(frozen=True)
class InputKey:
    """Content hashes of a stage's inputs and code, and its params (see the module docstring)."""

    inputs: Mapping[str, str] = field(default_factory=dict)  # role -> content hash
    code: Mapping[str, str] = field(default_factory=dict)  # repo-relative path -> sha256
    params: Mapping[str, Any] = field(default_factory=dict)  # dotted name -> value
    paths: Mapping[str, str] = field(default_factory=dict, compare=False)  # role -> path (messages only)

    @property
    def digest(self) -> str:
        """One hash of inputs, code and params (paths excluded: a moved input is the same input)."""
        doc = {"inputs": dict(self.inputs), "code": dict(self.code), "params": dict(self.params)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "inputs": dict(self.inputs), "code": dict(self.code),
                "params": dict(self.params), "paths": dict(self.paths)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> InputKey:
        return cls(dict(doc.get("inputs") or {}), dict(doc.get("code") or {}), dict(doc.get("params") or {}),
                   dict(doc.get("paths") or {}))

    def changes(self, saved: Mapping[str, Any] | None) -> list[str]:
        """What differs between ``saved`` (a stored :meth:`to_json`) and this key; [] when they match."""
        if not isinstance(saved, Mapping) or "digest" not in saved:
            return ["no input key recorded"]
        if saved["digest"] == self.digest:
            return []
        old = InputKey.from_json(saved)
        out = [f"{self.paths.get(r, old.paths.get(r, r))} content changed"
               for r in sorted(set(self.inputs) | set(old.inputs)) if self.inputs.get(r) != old.inputs.get(r)]
        out += [f"params {k} {_show(old.params, k)} -> {_show(self.params, k)}"
                for k in sorted(set(self.params) | set(old.params)) if self.params.get(k) != old.params.get(k)]
        out += [f"code {p}" for p in sorted(set(self.code) | set(old.code)) if self.code.get(p) != old.code.get(p)]
        return out or [f"input key {saved['digest']} is now {self.digest}"]


def _show(params: Mapping[str, Any], key: str) -> str:
    return json.dumps(params[key], default=str) if key in params else "(absent)"


def _files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if p.is_file() and not any(part.startswith(".tmp-") or part == "__pycache__" for part in rel):
            yield p


def hash_path(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's sorted (relative path, file sha256) pairs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: input not found")
    h = hashlib.sha256()
    for p in _files(path):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def code_deps(stage: str, root: str | Path) -> list[str]:
    """The code deps (``pipelines/``, ``lofa/``) of ``stage`` in ``<root>/dvc.yaml``, as written there."""
    dvc_yaml = Path(root) / "dvc.yaml"
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as e:
        raise ArtifactError(f"{dvc_yaml}: cannot read the stage's code deps ({e})") from None
    if stage not in stages:
        raise ArtifactError(f"{dvc_yaml}: no stage {stage!r} (its code deps make part of the input key); "
                            f"stages: {sorted(stages)}")
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stages[stage].get("deps") or []]
    return [d for d in deps if d.startswith(CODE_DIRS)]


def code_hashes(deps: Iterable[str], root: str | Path) -> dict[str, str]:
    """sha256 per code file of ``deps`` (a directory: its ``.py`` files), by repo-relative path."""
    root = Path(root)
    out: dict[str, str] = {}
    for dep in deps:
        full = root / dep
        if full.is_dir():
            files = [p for p in _files(full) if p.suffix == ".py"]
        elif full.is_file():
            files = [full]
        else:
            raise ArtifactError(f"{full}: code dep of dvc.yaml not found")
        out.update({p.relative_to(root).as_posix(): sha256_file(p) for p in files})
    return dict(sorted(out.items()))


def flat_params(section: str, values: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """``values`` (a resolved params section) as ``{"<section>.<a>.<b>": value}``, less the dotted
    names in ``drop`` (relative to the section). Lists and tuples are values, as JSON keeps them."""
    dropped = set(drop)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for k, v in node.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if name in dropped:
                continue
            if isinstance(v, Mapping):
                walk(name, v)
            else:
                out[f"{section}.{name}"] = list(v) if isinstance(v, tuple) else v

    walk("", values)
    return dict(sorted(out.items()))


def stage_key(stage: str, section: str, params: Mapping[str, Any], inputs: Mapping[str, str | Path], *,
              root: str | Path, drop: Iterable[str] = ()) -> InputKey:
    """The input key of ``stage`` as ``<root>/dvc.yaml`` declares its code: ``inputs`` (role ->
    path) hashed by content, its code deps hashed, ``params`` (the resolved ``section``) less ``drop``."""
    return InputKey(inputs={role: hash_path(p) for role, p in inputs.items()},
                    code=code_hashes(code_deps(stage, root), root),
                    params=flat_params(section, params, drop),
                    paths={role: str(p) for role, p in inputs.items()})


def stale_message(where: str | Path, changes: list[str], action: str) -> str:
    """The one line a stage prints when it drops a result made from other inputs."""
    return f"{where}: made from other inputs ({'; '.join(changes)}); {action}"
