"""The project files a stage runs, read from its imports, against the code deps ``dvc.yaml`` declares.

DVC reruns a stage when a declared dep changes, and :mod:`lofa.inputkey` keys resumable results
to the same deps: a file the stage imports but does not declare changes its results without a
rerun; a file declared but never imported reruns it (and discards its checkpoints) for nothing.
:func:`check_stage` compares the two.

The import closure is static (``ast``, nothing is imported): from the stage's entry module
(``python -m <module>`` in its cmd), every ``import`` / ``from ... import`` anywhere in a module,
function bodies included (a lazy import runs when its function does), followed through the
project's modules (``lofa/``, ``pipelines/``); third-party imports end the walk.

A module that names a sibling ``.py`` file in a call (``Path(__file__).with_name("mlflow_model.py")``:
MLflow's model from code) runs that file too: it joins the closure.
:data:`RECORDING` modules (MLflow run records, which no declared output holds) are left out, with
what only they import: a change to how runs are logged must not rerun the pipeline.

Package ``__init__.py`` files: importing ``lofa.x.y`` runs ``lofa/__init__.py`` and
``lofa/x/__init__.py``, so they are walked and what they import is in the closure. An
``__init__.py`` that holds only a docstring, imports and constant assignments (``__version__``,
``__all__``) is not itself required as a dep: it computes nothing, and declaring
``lofa/__init__.py`` in every stage would rerun the whole pipeline on a version bump. One that
holds code (a function, a call, a class) is required like any module.
"""

from __future__ import annotations

import ast
import functools
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lofa.inputkey import CODE_DIRS
from pipelines.orchestration import PipelineError, load_stages

#: Top-level packages whose modules are project files (the rest is third party).
PACKAGES = tuple(d.rstrip("/") for d in CODE_DIRS)
#: Modules that record runs in MLflow and write nothing DVC tracks: not code deps of any stage.
RECORDING = ("lofa/tracking.py", "lofa/run_parent.py")


@dataclass(frozen=True)
class StageDeps:
    """One stage's code deps against its import closure (repo-relative paths, sorted).

    ``missing``: imported project files that no declared dep covers; ``stale``: declared code
    deps (a file, or a directory standing for its ``.py`` files) that cover no imported file."""

    stage: str
    entry: str
    closure: tuple[str, ...]
    declared: tuple[str, ...]
    missing: tuple[str, ...]
    stale: tuple[str, ...]


def module_file(name: str, root: Path) -> Path | None:
    """The file of project module ``name`` (``a/b.py`` or ``a/b/__init__.py``), None if not one."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _tree(path: Path) -> ast.Module:
    """The parsed module (three walks read each file: parsed once per version of it)."""
    try:
        return _parse(path, path.stat().st_mtime_ns)
    except (OSError, SyntaxError) as e:
        raise PipelineError(f"{path}: cannot parse its imports ({e})") from None


@functools.lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _package_of(path: Path, root: Path) -> list[str]:
    """The package a module file belongs to, as name parts (for relative imports)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # a/b/c.py is in package a.b; a/b/__init__.py is package a.b itself


def imported_names(path: Path, root: Path) -> set[str]:
    """Every module name ``path`` may import (anywhere in it), absolute, with each package
    above it (importing ``a.b.c`` runs ``a`` and ``a.b``) and ``from m import x`` as ``m.x``
    too (``x`` may be a submodule; names that are no module are dropped by the caller)."""
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            pkg = _package_of(path, root)
            prefix = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(prefix + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return {".".join(n.split(".")[:i]) for n in names if n for i in range(1, n.count(".") + 2)}


def import_closure(entry: str, root: str | Path) -> set[str]:
    """Repo-relative paths of the project files that running module ``entry`` imports."""
    root = Path(root)
    start = module_file(entry, root)
    if start is None:
        raise PipelineError(f"{root}: entry module {entry!r} is no file under {', '.join(CODE_DIRS)}")
    recording = {root / r for r in RECORDING}
    seen: set[Path] = set()
    todo = [start] + [p for p in (module_file(n, root) for n in _parents(entry)) if p]
    while todo:
        path = todo.pop()
        if path in seen or path in recording:
            continue
        seen.add(path)
        todo += [p for p in (module_file(n, root) for n in imported_names(path, root)) if p and p not in seen]
        todo += sibling_files(path)
    return {p.relative_to(root).as_posix() for p in seen}


def sibling_files(path: Path) -> list[Path]:
    """Sibling ``.py`` files that ``path`` names as a call's argument (read or run by path)."""
    names = {a.value for node in ast.walk(_tree(path)) if isinstance(node, ast.Call) for a in node.args
             if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.endswith(".py")}
    return [path.parent / n for n in sorted(names) if "/" not in n and (path.parent / n).is_file()]


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def is_declarative(path: Path) -> bool:
    """True for a module of only a docstring, imports and constant assignments (see the module docstring)."""
    for node in _tree(path).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and _constant(node.value):
            continue
        return False
    return True


def _constant(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Constant):
        return True
    return isinstance(node, (ast.List, ast.Tuple)) and all(_constant(e) for e in node.elts)


def entry_module(cmd: str, stage: str) -> str:
    """The module a stage's ``python -m <module> ...`` command runs."""
    words = shlex.split(cmd)
    if "-m" not in words[:-1]:
        raise PipelineError(f"dvc.yaml: stage {stage}: cmd {cmd!r} runs no 'python -m <module>'")
    return words[words.index("-m") + 1]


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def compare(stage: str, entry: str, closure: Iterable[str], declared: Iterable[str], root: Path) -> StageDeps:
    """:class:`StageDeps` of ``closure`` (files imported) against ``declared`` (code deps)."""
    closure, declared = sorted(closure), sorted(declared)
    required = [p for p in closure if not (Path(p).name == "__init__.py" and is_declarative(root / p))]
    missing = tuple(p for p in required if not any(_covers(d, p) for d in declared))
    stale = tuple(d for d in declared if not any(_covers(d, p) for p in required))
    return StageDeps(stage, entry, tuple(closure), tuple(declared), missing, stale)


def check_stages(root: str | Path) -> list[StageDeps]:
    """:class:`StageDeps` of every stage of ``<root>/dvc.yaml``, in pipeline order."""
    root = Path(root)
    out = []
    for s in load_stages(root / "dvc.yaml"):
        entry = entry_module(s.cmd, s.name)
        declared = [d for d in s.deps if d.startswith(CODE_DIRS)]
        out.append(compare(s.name, entry, import_closure(entry, root), declared, root))
    return out


def report(deps: StageDeps) -> str:
    """One line per problem of ``deps`` ("" when none), naming the stage and the files."""
    lines = []
    if deps.missing:
        lines.append(f"dvc.yaml: stage {deps.stage} ({deps.entry}) imports files its deps do not list: "
                     + ", ".join(deps.missing))
    if deps.stale:
        lines.append(f"dvc.yaml: stage {deps.stage} ({deps.entry}) lists code deps it never imports: "
                     + ", ".join(deps.stale))
    return "\n".join(lines)
