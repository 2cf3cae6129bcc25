"""What every stage command shares: arguments, environment, params section, input key, metrics.

Declared outputs (``dvc.yaml`` outs and metrics, which DVC hashes) hold content only, so a
rerun on identical inputs leaves them byte-identical and ``dvc status`` clean. What describes a
run rather than its result (wall seconds, peak memory, rates, how many items this run made)
goes to MLflow and to ``<metrics dir>/timings/<metrics file name>``, which nothing declares.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lofa.config import load_params, to_dict
from lofa.env import peak_rss_mib, setup_env
from lofa.inputkey import InputKey, stage_key
from lofa.io import read_json, write_json

#: The repository whose ``dvc.yaml`` declares the stages' code deps (this code's checkout).
ROOT = Path(__file__).resolve().parents[1]


def stage_args(description: str, flags: dict[str, str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None, **paths: str) -> argparse.Namespace:
    """Parse ``--params``, one ``--<name>`` option per path (defaults ``paths``), boolean ``flags``
    and whatever ``extra`` adds to the parser."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name, default in paths.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default, type=Path)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    for name, help_text in (flags or {}).items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help=help_text)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    setup_env()
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar in this process (ours and the libraries')
    return args


def section(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The raw ``name`` section of the params file (validated by the caller's config class)."""
    params = load_params(args.params)
    if name not in params:
        raise SystemExit(f"{args.params}: missing section '{name}'")
    return {} if params[name] is None else params[name]  # an empty section means defaults


def input_key(stage: str, section_name: str, cfg: Any, inputs: dict[str, Path],
              drop: tuple[str, ...] = ()) -> InputKey:
    """The input key of ``stage``: its ``inputs`` (role -> path) by content, its code deps from
    ``dvc.yaml``, its resolved params section ``cfg`` less the ``drop`` fields."""
    return stage_key(stage, section_name, to_dict(cfg), inputs, root=ROOT, drop=drop)


def timings_path(metrics: Path) -> Path:
    """Where a run's wall times and counts go: ``metrics/timings/<stage>.json`` for ``metrics/<stage>.json``."""
    return Path(metrics).parent / "timings" / Path(metrics).name


def write_metrics(path: Path, summary: dict[str, Any], run: dict[str, Any], *,
                  counters: tuple[str, ...] = (), did_work: bool = True) -> dict[str, Any]:
    """Write the declared metrics ``summary`` and the undeclared timings (``run`` plus this
    process's peak memory and the ``counters`` of ``summary``); return both merged (for MLflow).

    ``counters`` are keys of ``summary`` that count what this run made (``fitted_now``): when the
    run made nothing (``did_work`` false) and ``path`` already holds the same numbers apart from
    them, ``path`` is left as it is, so a rerun on identical inputs changes no declared output.
    """
    run = {**run, "peak_rss_mib": peak_rss_mib(), **{k: summary[k] for k in counters}}
    write_json(timings_path(path), run)
    if not did_work and Path(path).is_file():
        old = read_json(path)
        same = isinstance(old, dict) and {k: v for k, v in old.items() if k not in counters} == {
            k: v for k, v in summary.items() if k not in counters}
        if same:
            print(f"{path}: result unchanged, kept as it was (this run's counts: {timings_path(path)})")
            return {**old, **run}
    write_json(path, summary)
    return {**summary, **run}
