"""Fail unless a coverage run imported AND exercised every module of ``lofa/`` and ``pipelines/``.

Reads the data file of ``coverage run --source=lofa,pipelines -m pytest ...`` (scripts/test.sh
--coverage writes it). A module counts as imported when coverage saw any of its lines run, and
as exercised when a line inside one of its function bodies ran: importing a module runs only its
``def`` lines, so a test must call into it. A module without functions (a package's
``__init__.py`` of re-exports, say) needs only the import.

Usage: python scripts/module_coverage.py [DATA_FILE] (default: .coverage)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from coverage import CoverageData

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lofa", "pipelines")


def function_lines(source: str) -> set[int]:
    """Line numbers inside the bodies of every function and method (nested ones included)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(range(node.body[0].lineno, node.end_lineno + 1))
    return lines


def module_status(path: Path, executed: set[int]) -> str | None:
    """None when ``path`` was imported and exercised, else what is missing."""
    if not executed:
        return "never imported"
    body = function_lines(path.read_text())
    if body and not executed & body:
        return "imported, but none of its functions ran"
    return None


def main(data_file: str = ".coverage") -> int:
    if not Path(data_file).is_file():
        print(f"{data_file}: no coverage data file (run the fast tier with scripts/test.sh --coverage)",
              file=sys.stderr)
        return 2
    data = CoverageData(data_file)
    data.read()
    measured = {Path(f).resolve(): set(data.lines(f) or ()) for f in data.measured_files()}
    modules = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    missing = {p: why for p in modules if (why := module_status(p, measured.get(p.resolve(), set())))}
    for path, why in missing.items():
        print(f"NOT COVERED {path.relative_to(ROOT)}: {why}", file=sys.stderr)
    print(f"module coverage: {len(modules) - len(missing)} of {len(modules)} modules of "
          f"{', '.join(PACKAGES)} imported and exercised by the tests")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
