"""dvc.yaml's code deps against each stage's import closure (lofa/stagedeps.py), statically: no torch import.

A stale dep (declared, never imported) fails as a missing one does: DVC reruns the stage on its
every change and lofa/inputkey.py discards the stage's checkpoints and LoRAs for it, which on the
real profile costs GPU hours for nothing; the message lists the lines to delete.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lofa.orchestration import PipelineError
from lofa.stagedeps import check_stages, entry_module, import_closure, report

ROOT = Path(__file__).resolve().parents[1]
STAGES = check_stages(ROOT)


@pytest.mark.parametrize("deps", STAGES, ids=[d.stage for d in STAGES])
def test_stage_declares_what_it_imports(deps):
    assert not deps.missing, report(deps)


@pytest.mark.parametrize("deps", STAGES, ids=[d.stage for d in STAGES])
def test_stage_declares_nothing_it_does_not_import(deps):
    assert not deps.stale, report(deps)


def test_closures_hold_the_files_the_issue_found_undeclared():
    """Issue 22: train_stage1 imports lofa/lora.py (its target), evaluate lofa/hypernet.py; and
    evaluate runs lofa/mlflow_model.py by path (MLflow's model from code), not by import."""
    by_stage = {d.stage: d for d in STAGES}
    assert "lofa/lora.py" in by_stage["train_stage1"].closure
    assert {"lofa/hypernet.py", "lofa/mlflow_model.py"} <= set(by_stage["evaluate"].closure)
    assert by_stage["train_stage2_naive"].entry == "pipelines.train_stage2"  # `-m` read past --ablation's place
    assert all("lofa/tracking.py" not in d.closure for d in STAGES)  # RECORDING: run records only


def _project(root: Path, files: dict[str, str], deps: list[str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    lines = "".join(f"      - {d}\n" for d in deps)
    (root / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: python -m pipelines.run --x 1\n    deps:\n{lines}"
                                   "      - data/in\n    outs:\n      - data/out\n")


FILES = {
    "lofa/__init__.py": '"""doc"""\n__version__ = "1"\n',  # declarative: walked, not required
    "lofa/sub/__init__.py": "from lofa.sub.inner import thing\n",
    "lofa/sub/inner.py": "import numpy\nthing = 1\n",
    "lofa/a.py": "from . import b\nfrom .sub import inner\n",
    "lofa/b.py": "def f():\n    from lofa.lazy import g  # runs when f does\n    return g\n",
    "lofa/lazy.py": "from pathlib import Path\nCODE = Path(__file__).with_name('run_by_path.py')\n",
    "lofa/run_by_path.py": "import lofa.c\n",
    "lofa/c.py": "X = 1\n",
    "lofa/unused.py": "import lofa.a\n",
    "pipelines/__init__.py": "",
    "pipelines/run.py": "import os\n\ndef main():\n    import lofa.a\n",
}


def test_closure_follows_lazy_relative_init_and_by_path_imports(tmp_path):
    _project(tmp_path, FILES, [])
    assert import_closure("pipelines.run", tmp_path) == {
        "pipelines/__init__.py", "pipelines/run.py", "lofa/__init__.py", "lofa/a.py", "lofa/b.py",
        "lofa/sub/__init__.py", "lofa/sub/inner.py", "lofa/lazy.py", "lofa/run_by_path.py", "lofa/c.py"}


def test_missing_and_stale_deps_are_named(tmp_path):
    """A directory dep covers the files under it; a declarative __init__.py needs no dep, one
    with code does; the message names the stage and the files."""
    files = {**FILES, "pipelines/__init__.py": "import os\nos.environ.setdefault('X', '1')\n"}
    _project(tmp_path, files, ["pipelines/run.py", "lofa/a.py", "lofa/b.py", "lofa/sub", "lofa/unused.py"])
    [deps] = check_stages(tmp_path)
    assert deps.missing == ("lofa/c.py", "lofa/lazy.py", "lofa/run_by_path.py", "pipelines/__init__.py")
    assert deps.stale == ("lofa/unused.py",)
    assert report(deps).splitlines() == [
        "dvc.yaml: stage s (pipelines.run) imports files its deps do not list: lofa/c.py, lofa/lazy.py, "
        "lofa/run_by_path.py, pipelines/__init__.py",
        "dvc.yaml: stage s (pipelines.run) lists code deps it never imports: lofa/unused.py"]


def test_a_stage_without_python_m_is_refused():
    with pytest.raises(PipelineError, match=r"stage s: cmd 'bash run.sh' runs no 'python -m <module>'"):
        entry_module("bash run.sh", "s")
