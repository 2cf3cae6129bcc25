"""Serving apart from training (issue 22): no training stage runs a file of ``lofa/serving/``, and
the library outside ``lofa/serving/`` imports none of it (the ``lofa`` command excepted). Read from
the imports statically (pipelines/stagedeps.py: ``ast``, lazy imports included), so a serving import
added anywhere a training stage reaches, even inside a function, fails here with the chain named.

The ``evaluate`` stage is no training stage: it registers the evaluated hypernetwork in the MLflow
model registry (``lofa/serving/registry.py``) at its end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.stagedeps import import_closure, imported_names, module_file

ROOT = Path(__file__).resolve().parents[1]
SERVING = "lofa/serving/"
#: The entry modules of the training stages (dvc.yaml: ``python -m <module>``) and the modules they share.
TRAINING = ("pipelines.synthesize", "pipelines.preprocess", "pipelines.pretrain_base", "pipelines.fit_loras",
            "pipelines.train_stage1", "pipelines.train_stage2", "pipelines.train_judge", "pipelines._hyper",
            "pipelines._common")
#: Library modules outside lofa/serving/ that may import it: the command that serves predictions.
MAY_SERVE = {"lofa/cli.py"}


def _serving_imports(path: Path) -> list[str]:
    """The lofa.serving modules ``path`` imports (anywhere in it, lazily too)."""
    return sorted(n for n in imported_names(path, ROOT)
                  if n.startswith("lofa.serving.") and module_file(n, ROOT) is not None)


def _chain(entry: str) -> str:
    """Which files of ``entry``'s closure import serving code, and what they import (the message)."""
    files = sorted(import_closure(entry, ROOT))
    return "; ".join(f"{f} imports {', '.join(_serving_imports(ROOT / f))}" for f in files
                     if not f.startswith(SERVING) and _serving_imports(ROOT / f))


@pytest.mark.parametrize("entry", TRAINING)
def test_training_stage_runs_no_serving_file(entry):
    closure = import_closure(entry, ROOT)
    assert not [f for f in closure if f.startswith(SERVING)], f"{entry} reaches serving code: {_chain(entry)}"


def test_library_outside_serving_imports_none_of_it():
    library = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lofa").rglob("*.py"))
    offenders = {f: _serving_imports(ROOT / f) for f in library
                 if not f.startswith(SERVING) and f not in MAY_SERVE and _serving_imports(ROOT / f)}
    assert not offenders, offenders


def test_the_check_sees_serving_where_it_is():
    """The same walk finds the serving code that evaluate (registration) and the command do run, so an
    empty result above means none, not a walk that misses it."""
    assert {"lofa/serving/registry.py", "lofa/serving/predict.py", "lofa/serving/mlflow_model.py"} <= \
        import_closure("pipelines.evaluate", ROOT)
    assert "lofa.serving.predict" in _serving_imports(ROOT / "lofa/cli.py")
    assert "pipelines/evaluate.py imports lofa.serving.registry" in _chain("pipelines.evaluate")
