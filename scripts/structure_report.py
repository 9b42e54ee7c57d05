"""Issue 11's size targets: files over ~450 lines and functions over ~60 lines.

    .venv/bin/python scripts/structure_report.py [ROOT] [--files 450] [--functions 60]

Reads the Python files of compressor/, workflows/ and eval_jobs/ (and numba_kernels/,
birkhoff/ for information) under ROOT (default: this checkout) with ``ast`` and
prints the files and functions over the limits, longest first, and the counts.
A function's length is from its ``def`` (decorators excluded) to its last line.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

TARGETS = ("compressor", "workflows", "eval_jobs")
ALSO = ("numba_kernels", "birkhoff")


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def report(root: Path, max_file: int, max_fn: int) -> dict:
    files, fns = [], []
    for pkg in TARGETS + ALSO:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            n = text.count("\n") + (not text.endswith("\n") and bool(text))
            if n > max_file:
                files.append((n, rel, pkg in TARGETS))
            for name, line, length in _functions(ast.parse(text)):
                if length > max_fn:
                    fns.append((length, f"{rel}:{line} {name}", pkg in TARGETS))
    return {"files": sorted(files, reverse=True), "functions": sorted(fns, reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=Path(__file__).resolve().parents[1], type=Path)
    ap.add_argument("--files", type=int, default=450)
    ap.add_argument("--functions", type=int, default=60)
    args = ap.parse_args()
    r = report(args.root, args.files, args.functions)
    print(f"files over {args.files} lines:")
    for n, rel, target in r["files"]:
        print(f"  {n:5d}  {rel}{'' if target else '  (not a target folder)'}")
    print(f"functions over {args.functions} lines:")
    for n, where, target in r["functions"]:
        print(f"  {n:5d}  {where}{'' if target else '  (not a target folder)'}")
    t_files = sum(1 for *_, t in r["files"] if t)
    t_fns = sum(1 for *_, t in r["functions"] if t)
    print(f"in compressor/, workflows/, eval_jobs/: {t_files} file(s) over {args.files} lines, "
          f"{t_fns} function(s) over {args.functions} lines")


if __name__ == "__main__":
    main()
