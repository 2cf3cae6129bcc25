"""What every stage command shares: arguments, environment, params section, MLflow run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lofa.config import load_params
from lofa.env import setup_env


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
