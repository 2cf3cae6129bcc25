"""Run the stages of ``dvc.yaml`` outside ``dvc repro`` with DVC as the one cache.

``dvc.yaml`` is the one pipeline graph. :func:`load_stages` reads each stage's
command, deps, outs, metrics and params keys and orders the stages so
that every stage follows those producing its deps; :func:`plan` splits one
stage into shards (its command gets ``--shard-index i --num-shards n``) followed
by the unchanged command, which finishes and summarises. Whether a stage must run
is DVC's answer (:func:`stage_up_to_date`), and a finished stage is recorded in
``dvc.lock`` (:func:`record_stage`), so an orchestrator and ``dvc repro`` never redo
each other's work. DVC refuses concurrent commands on one repository: every DVC call
here holds one file lock (:func:`dvc_lock`). Nothing here imports an orchestrator;
``pipelines/flow.py`` wraps these in Prefect tasks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lofa.env import python_first

DEFAULT_PARAMS_FILE = "params.yaml"
_UNSUPPORTED = ("foreach", "matrix", "do", "wdir", "vars")


class PipelineError(ValueError):
    """A ``dvc.yaml`` this runner cannot follow (named file and stage)."""


class StageFailed(RuntimeError):
    """A stage command exited non-zero; carries the exit code and the output's tail."""

    def __init__(self, name: str, cmd: str, returncode: int, tail: Sequence[str]) -> None:
        self.name, self.cmd, self.returncode, self.tail = name, cmd, returncode, tuple(tail)
        super().__init__(f"stage {name} failed with exit code {returncode}: {cmd}\n" + "\n".join(tail))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Dask worker processes
        return StageFailed, (self.name, self.cmd, self.returncode, self.tail)

    @property
    def transient(self) -> bool:
        """False for failures a retry cannot fix: usage errors (2), a missing or
        non-executable command (126, 127), a config rejected by ``lofa.config``."""
        last = self.tail[-1] if self.tail else ""
        return self.returncode not in (2, 126, 127) and "ConfigError" not in last


@dataclass(frozen=True)
class Stage:
    """One stage of ``dvc.yaml``; paths relative to the repo root, params as
    (params file, dotted key) pairs, ``upstream`` the stages producing its deps."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]  # metrics and plots files
    params: tuple[tuple[str, str], ...]
    upstream: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    """One unit of work: a whole stage, or shard ``index`` of ``count`` of it."""

    stage: Stage
    shard: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.stage.name if self.shard is None else f"{self.stage.name}-shard{self.shard[0]}of{self.shard[1]}"

    @property
    def cmd(self) -> str:
        if self.shard is None:
            return self.stage.cmd
        return f"{self.stage.cmd} --shard-index {self.shard[0]} --num-shards {self.shard[1]}"

    @property
    def outs(self) -> tuple[str, ...]:
        """What this step must leave behind (a shard writes no metrics file)."""
        return self.stage.outs if self.shard else self.stage.outs + self.stage.metrics


def _path_of(entry: str | Mapping[str, Any], where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and len(entry) == 1:
        return str(next(iter(entry)))
    raise PipelineError(f"{where}: expected a path or a one-key mapping, got {entry!r}")


def _param_refs(entries: Sequence[Any], where: str) -> tuple[tuple[str, str], ...]:
    refs: list[tuple[str, str]] = []
    for e in entries:
        if isinstance(e, str):
            refs.append((DEFAULT_PARAMS_FILE, e))
        elif isinstance(e, Mapping):
            for file, keys in e.items():
                refs.extend((str(file), str(k)) for k in (keys or []))
        else:
            raise PipelineError(f"{where}: params entry {e!r} is neither a key nor {{file: [keys]}}")
    return tuple(refs)


def _overlaps(a: str, b: str) -> bool:
    pa, pb = Path(os.path.normpath(a)), Path(os.path.normpath(b))
    return pa == pb or pa in pb.parents or pb in pa.parents


def _parse_stage(name: str, spec: Mapping[str, Any], where: str) -> Stage:
    where = f"{where}: stage {name}"
    bad = [k for k in _UNSUPPORTED if isinstance(spec, Mapping) and k in spec]
    if bad:
        raise PipelineError(f"{where}: {bad} not supported by pipelines.orchestration (plain stages only)")
    if not isinstance(spec, Mapping) or "cmd" not in spec:
        raise PipelineError(f"{where}: no cmd")
    cmd = spec["cmd"] if isinstance(spec["cmd"], str) else " && ".join(spec["cmd"])
    if "${" in cmd:
        raise PipelineError(f"{where}: templated cmd not supported: {cmd}")
    paths = {key: tuple(_path_of(o, where) for o in spec.get(key) or [])
             for key in ("deps", "outs", "metrics", "plots")}
    return Stage(name, cmd.strip(), paths["deps"], paths["outs"], paths["metrics"] + paths["plots"],
                 _param_refs(spec.get("params") or [], where))


def load_stages(dvc_yaml: str | Path) -> list[Stage]:
    """The stages of ``dvc_yaml`` in dependency order (file order among independent ones)."""
    dvc_yaml = Path(dvc_yaml)
    try:
        doc = yaml.safe_load(dvc_yaml.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{dvc_yaml}: cannot read: {e}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("stages"), Mapping) or not doc["stages"]:
        raise PipelineError(f"{dvc_yaml}: no 'stages' mapping")
    stages = [_parse_stage(str(n), s, str(dvc_yaml)) for n, s in doc["stages"].items()]
    producer: dict[str, str] = {}
    for s in stages:
        for out in s.outs + s.metrics:
            if out in producer:
                raise PipelineError(f"{dvc_yaml}: output {out} is declared by {producer[out]} and {s.name}")
            producer[out] = s.name
    linked = [dataclasses.replace(s, upstream=tuple(sorted(
        {p for o, p in producer.items() for d in s.deps if p != s.name and _overlaps(d, o)}))) for s in stages]
    return _topological(linked, dvc_yaml)


def _topological(stages: list[Stage], where: Path) -> list[Stage]:
    done: set[str] = set()
    order: list[Stage] = []
    pending = list(stages)
    while pending:
        ready = next((s for s in pending if set(s.upstream) <= done), None)
        if ready is None:
            raise PipelineError(f"{where}: dependency cycle among {[s.name for s in pending]}")
        order.append(ready)
        done.add(ready.name)
        pending.remove(ready)
    return order


def plan(stages: Sequence[Stage], shards: int = 1, shard_stage: str | None = None) -> list[Step]:
    """The steps to run, in order: each stage whole, except ``shard_stage`` with ``shards`` > 1,
    which becomes ``shards`` shard steps followed by the whole (summarising) stage."""
    names = [s.name for s in stages]
    if shards < 1:
        raise ValueError(f"plan: shards must be >= 1, got {shards}")
    if shards > 1 and shard_stage not in names:
        raise ValueError(f"plan: shard stage {shard_stage!r} is not a stage; stages: {names}")
    steps: list[Step] = []
    for s in stages:
        if shards > 1 and s.name == shard_stage:
            steps.extend(Step(s, (i, shards)) for i in range(shards))
        steps.append(Step(s))
    return steps


# --------------------------------------------------------------------------- execution

def run_command(step: Step, root: str | Path, env: Mapping[str, str] | None = None,
                log: Callable[[str], None] = print, tail_lines: int = 40) -> None:
    """Run ``step.cmd`` through the shell in ``root`` (as DVC does), passing each output line
    (stdout and stderr merged) to ``log``; raise :class:`StageFailed` on a non-zero exit.
    ``python`` in the command is this environment's (:func:`lofa.env.python_first`)."""
    full_env = python_first({**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(step.cmd, shell=True, cwd=root, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"[{step.name}] {line}")
    if proc.returncode != 0:
        raise StageFailed(step.name, step.cmd, proc.returncode, list(tail))


def read_metrics(step: Step, root: str | Path) -> dict[str, Any]:
    """The JSON metrics files among ``step``'s outputs, by path (none for a shard)."""
    out: dict[str, Any] = {}
    for o in step.outs:
        p = Path(root) / o
        if p.suffix == ".json" and p.is_file():
            out[o] = json.loads(p.read_text())
    return out


# --------------------------------------------------------------------------- DVC, the one cache

class DvcFailed(RuntimeError):
    """A DVC command failed; names the repository, the command and DVC's output."""


@contextlib.contextmanager
def dvc_lock(root: str | Path) -> Iterator[None]:
    """Hold ``<root>/.dvc/tmp/lofa-orchestration.lock`` (``flock``): DVC takes one lock per
    repository and refuses a second command while it is held, so concurrent tasks, threads or
    processes of one host take turns here instead of failing."""
    tmp = Path(root) / ".dvc" / "tmp"
    if not tmp.parent.is_dir():
        raise DvcFailed(f"{Path(root).resolve()}: not a DVC repository (no .dvc/); run `dvc init` there")
    tmp.mkdir(exist_ok=True)
    with open(tmp / "lofa-orchestration.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dvc(root: str | Path, *args: str) -> str:
    """Run this environment's ``dvc *args`` in ``root`` under :func:`dvc_lock`; its stdout."""
    cmd = [str(Path(sys.executable).parent / "dvc"), *args]
    with dvc_lock(root):
        proc = subprocess.run(cmd, cwd=root, env=python_first(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcFailed(f"{root}: `dvc {' '.join(args)}` failed with exit code {proc.returncode}:\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def stage_up_to_date(root: str | Path, name: str) -> bool:
    """Whether ``dvc.lock`` holds stage ``name`` with the deps, params, command and outs now on disk
    (``dvc status <name>``: that stage alone; the caller has brought its upstream up to date)."""
    return not json.loads(dvc(root, "status", name, "--json") or "{}").get(name)


def record_stage(root: str | Path, name: str) -> None:
    """Record stage ``name``'s deps, params and outs as they are now in ``dvc.lock`` and cache the
    outs (``dvc commit -f``): what ``dvc repro`` writes after running the command itself."""
    dvc(root, "commit", "--force", name)


def save_experiment(root: str | Path, name: str, stages: Sequence[Stage]) -> None:
    """Save the workspace as DVC experiment ``name`` (``dvc exp show`` lists it), including the
    stages' metrics files, which ``dvc.yaml`` keeps out of DVC's cache and git may not track yet."""
    present = [m for s in stages for m in s.metrics if (Path(root) / m).is_file()]
    dvc(root, "exp", "save", "--name", name, *(a for m in present for a in ("--include-untracked", m)))
