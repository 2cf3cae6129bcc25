"""Process environment for every lofa command, applied explicitly (never at import)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: Settings every command needs: offline hubs, no telemetry.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFSYNTH_SKIP_DOWNLOAD": "True",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # a flow run with no server starts a temporary one; Prefect gives it 20 s to answer, which a
    # busy 2-core host missed (tests under load: "Timed out while attempting to connect")
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def repo_root(start: Path | None = None) -> Path:
    """The directory holding ``params.yaml`` (searched upwards from ``start`` or cwd)."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "params.yaml").is_file() and (d / "lofa").is_dir():
            return d
    return here


def setup_env(root: Path | None = None) -> Path:
    """Apply offline/telemetry settings and keep tracking stores inside the repo.

    MLflow: a sqlite backend ``mlflow.db`` at the repo root with artifacts under
    ``mlruns/`` (MLflow 3 refuses the old file store). Prefect: ``PREFECT_HOME``
    is ``.prefect/`` in the repo. Existing user settings win.
    """
    root = repo_root(root)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("LOFA_MLFLOW_ARTIFACTS", (root / "mlruns").as_uri())
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    return root


def python_first(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this environment's ``bin/`` first on ``PATH``.

    Stage commands call a bare ``python`` (``dvc.yaml``), so that ``dvc exp run --temp`` and
    ``--queue``, whose temporary workspaces hold no ``.venv``, find one; on these machines a bare
    ``python`` is the system's, without the stack. Every launcher (scripts, tests, the flow) puts
    the running interpreter's directory (``.venv/bin`` under ``.venv/bin/python``) first.
    """
    env = dict(os.environ if env is None else env)
    bin_dir = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *rest])
    return env


def process_rank() -> int:
    """This process's rank under ``accelerate launch`` / ``torchrun`` (``RANK``); 0 when launched alone."""
    return int(os.environ.get("RANK", "0"))


def compute_device() -> "torch.device":
    """Where a stage command runs its models: this process's GPU (``LOCAL_RANK`` under
    ``accelerate launch`` / ``torchrun``, else 0) if there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
