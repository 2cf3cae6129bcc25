"""Test session setup: offline settings, tracking stores in a temp dir, this environment's
``python`` and ``dvc`` first on PATH (stage commands call a bare ``python``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from lofa.env import OFFLINE_ENV, python_first

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)
_STORE = tempfile.mkdtemp(prefix="lofa-test-store-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STORE}/mlflow.db"
os.environ["LOFA_MLFLOW_ARTIFACTS"] = f"file://{_STORE}/mlruns"
os.environ.setdefault("PREFECT_HOME", f"{_STORE}/prefect")
os.environ["PATH"] = python_first()["PATH"]  # every subprocess of the tests inherits it


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded; stage subprocesses keep torch's default."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-seed-offset", type=int, default=int(os.environ.get("LOFA_FAULT_SEED_OFFSET", "0")),
                     help="added to every seed of the fault-injection tests (where and when they kill), "
                          "to try other kill points: e.g. --fault-seed-offset 100 (env LOFA_FAULT_SEED_OFFSET)")


@pytest.fixture
def fault_seed_offset(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--fault-seed-offset"))
