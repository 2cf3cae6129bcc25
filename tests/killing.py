"""Kill a process at a point of its progress that the test observes, never after a fixed delay.

A fixed delay assumes a host's speed: on a faster host the kill lands after the run
ended, on a slower one before anything happened. Here the test watches a progress
count (LoRAs written, checkpoint step), waits until it reaches a seeded target, and
then lets the run go on for a seeded number of further *units of its own measured
pace* (seconds per unit between the first observed unit and the target). Wherever
the kill lands, the caller asserts what must hold there; ``kill_at_progress`` says
whether it landed at all (a run may still end first, for example if it sped up).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Kill:
    killed: bool  # False: the run ended on its own first
    code: int  # the process's exit code (-SIGKILL when killed)
    at_progress: int  # progress observed when the signal was sent (or at exit)
    pace_s: float  # measured seconds per unit of progress
    waited_s: float  # seconds between reaching the target and the kill


def kill_at_progress(proc: subprocess.Popen, progress: Callable[[], int], target: int, extra_units: float, *,
                     timeout: float = 600.0, poll_s: float = 0.005) -> Kill:
    """SIGKILL ``proc``'s process group ``extra_units`` of its measured pace after ``progress() >= target``.

    ``proc`` must have been started with ``start_new_session=True``.
    """
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None
    seen = 0
    while proc.poll() is None:
        seen = progress()
        now = time.monotonic()
        if seen > 0 and first is None:
            first = (now, seen)
        if seen >= target:
            break
        if now > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"progress {seen} never reached {target} in {timeout:.0f} s")
        time.sleep(poll_s)
    else:
        return Kill(False, proc.returncode, progress(), 0.0, 0.0)
    reached = time.monotonic()
    if first is not None and seen > first[1]:
        pace = (reached - first[0]) / (seen - first[1])
    else:  # the target was the first progress seen: time the next increment (start-up is no pace)
        while proc.poll() is None and (now_seen := progress()) <= seen:
            if time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        if proc.poll() is not None:
            return Kill(False, proc.returncode, progress(), 0.0, time.monotonic() - reached)
        pace = (time.monotonic() - reached) / max(now_seen - seen, 1)
    wait_until = reached + extra_units * pace  # already past it after a long first increment: kill now
    while proc.poll() is None and time.monotonic() < wait_until:
        time.sleep(poll_s)
    at = progress()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=timeout)
    return Kill(code == -signal.SIGKILL, code, at, pace, time.monotonic() - reached)
