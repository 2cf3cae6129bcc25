"""The parent MLflow run of one pipeline execution, found or created by each stage process.

Stage commands are separate processes (``dvc repro`` runs them one by one, the Prefect flow
as tasks, possibly at once), so no process holds the parent run open. Each stage computes
the execution's key (:func:`execution_key`), and the first one to arrive creates the parent
run tagged with it; later ones find it by that tag. A lock file per key on this host keeps
two stages starting at once from creating two parents. The parent's status and end time
follow its latest stage run (RUNNING while one runs, then that stage's outcome).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Tag whose value ``pipeline`` marks a parent run (stage runs carry ``lofa.stage``).
ROLE_TAG = "lofa.role"
_KEY_CHARS = re.compile(r"^[\w.:@+-]{1,200}$")


def _proc_fields(pid: int) -> tuple[list[bytes], list[str]]:
    """(argv, the fields of ``/proc/<pid>/stat`` after the command name) of a process."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    stat = Path(f"/proc/{pid}/stat").read_text()
    return argv, stat.rsplit(")", 1)[1].split()


def _is_dvc(argv: list[bytes]) -> bool:
    names = [os.path.basename(a.decode(errors="replace")) for a in argv[:2]]
    return "dvc" in names or argv[1:3] == [b"-m", b"dvc"]


def dvc_invocation() -> str | None:
    """``<pid>-<start tick>`` of the ``dvc`` process (``repro``, ``exp run``) running this stage command:
    the one thing all stage processes of one invocation share. None outside DVC or without ``/proc``."""
    if "DVC_STAGE" not in os.environ:  # DVC sets it for every stage command
        return None
    pid = os.getppid()
    try:
        for _ in range(8):  # dvc -> shell -> python, with room for wrappers
            if pid <= 1:
                return None
            argv, fields = _proc_fields(pid)
            if _is_dvc(argv):
                return f"{pid}-{fields[19]}"  # field 22 of stat: start time in clock ticks after boot
            pid = int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    return None


def execution_key() -> str | None:
    """What the stage runs of one pipeline execution share: ``LOFA_PIPELINE_ID``, else
    ``dvc-[<DVC_EXP_NAME>-]<dvc process>`` under DVC; None for a stage run by hand."""
    key = os.environ.get("LOFA_PIPELINE_ID")
    if not key:
        dvc = dvc_invocation()
        if dvc is None:
            return None
        exp = os.environ.get("DVC_EXP_NAME")
        key = f"dvc-{exp}-{dvc}" if exp else f"dvc-{dvc}"
    if not _KEY_CHARS.match(key):
        raise ValueError(f"LOFA_PIPELINE_ID={key!r}: use letters, digits and . : @ + - _ only (at most 200)")
    return key


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def git_tags(parent_tags: dict[str, str] | None = None) -> dict[str, str]:
    """Git commit, dirty flag (tracked files changed) and DVC experiment of this run.

    A stage run copies its parent's (taken when the execution began: stages rewrite tracked
    outputs such as ``dvc.lock`` as they go, which would make later stages look dirty)."""
    keys = ("lofa.git_commit", "lofa.git_dirty", "lofa.dvc_exp", "lofa.dvc_exp_baseline", "mlflow.source.git.commit")
    if parent_tags is not None:
        return {k: parent_tags[k] for k in keys if k in parent_tags}
    commit = _git("rev-parse", "HEAD")
    tags = {"lofa.git_commit": commit or "unknown",
            "lofa.git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["lofa.dvc_exp"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["lofa.dvc_exp_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def _label(tags: dict[str, str]) -> str:
    """The parent's run name: the DVC experiment, else commit (+ if dirty) and UTC start time."""
    if "lofa.dvc_exp" in tags:
        return f"exp {tags['lofa.dvc_exp']}"
    dirty = "+" if tags["lofa.git_dirty"] == "true" else ""
    return f"pipeline {tags['lofa.git_commit'][:7]}{dirty} {time.strftime('%m-%d %H:%M', time.gmtime())}"


@contextmanager
def _host_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by the processes of this host (a file under the temp dir)."""
    folder = Path(tempfile.gettempdir()) / "lofa-locks"
    folder.mkdir(exist_ok=True)
    path = folder / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parent_run(client: Any, exp_id: str, key: str) -> Any:
    """The parent run (an ``mlflow.entities.Run``) of execution ``key`` in experiment ``exp_id``,
    created with the git/DVC tags when no stage of this execution has run yet."""
    with _host_lock(f"{client.tracking_uri}|{exp_id}|{key}"):
        found = client.search_runs([exp_id], f"tags.`lofa.pipeline` = '{key}' and tags.`{ROLE_TAG}` = 'pipeline'",
                                   max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            return found[0]
        tags = {"lofa.pipeline": key, ROLE_TAG: "pipeline", **git_tags()}
        return client.create_run(exp_id, tags=tags, run_name=_label(tags))


@contextmanager
def follow_parent(client: Any, parent_id: str | None) -> Iterator[None]:
    """The parent shows RUNNING while this stage runs, then this stage's outcome and end time."""
    if parent_id is None:
        yield
        return
    client.update_run(parent_id, status="RUNNING")
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
