"""Every document a file points to lives in the repository: no reference to a path
outside the clone (a sibling checkout, a machine's home or work directory)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", ".birkhoff", "__pycache__", ".pytest_cache", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cron", ".txt", ".cfg", ".ini", ".json"}
OUTSIDE = re.compile(r"\.\./shared|/work/|(?<![\w.])shared/HYPERCOMPRESSION")
THIS = Path(__file__).resolve()


def _files():
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "Dockerfile") and p.resolve() != THIS:
            yield p


def test_no_file_refers_outside_the_clone():
    hits = []
    for p in _files():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_documents_the_readme_points_to_exist():
    readme = (ROOT / "README.md").read_text()
    docs = set(re.findall(r"`(docs/[\w./-]+\.md)`", readme))
    assert "docs/HYPERCOMPRESSION.md" in docs
    for d in docs:
        assert (ROOT / d).is_file(), d
