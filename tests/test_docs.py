"""The docs stay true: the README fits on a screen (<= 250 lines), every relative link in README.md and docs/*.md
resolves (and its #anchor exists), docs/architecture.md lists every registered strategy, family and cache method,
and the public names a user needs import from `opendit` itself."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!`)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_readme_fits_on_a_screen():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move reference and measurements to docs/"


def test_the_docs_pages_per_concern_exist():
    for name in ("cli", "parallelism", "models", "caching", "memory", "precision", "serving", "planner",
                 "benchmarks", "testing", "architecture"):  # fmt: skip
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


def test_slug_follows_github():
    assert slug("Tensor parallel (`--tp N`)") == "tensor-parallel---tp-n"
    assert slug("Registered strategies, families and cache methods") == (
        "registered-strategies-families-and-cache-methods"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file} missing")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_architecture_lists_every_registered_strategy_family_and_cache_method():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_architecture import BEGIN, END, registered
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert BEGIN in text and END in text, "run python scripts/gen_architecture.py"
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0]
    missing = [
        f"{kind}: {name}" for kind, names in registered().items() for name in names if f"`{name}`" not in generated
    ]
    assert not missing, f"docs/architecture.md misses {missing}: run python scripts/gen_architecture.py"


def test_public_names_import_from_opendit():
    """What the README's tour imports, from `opendit` itself (benchmarks/ checks a fresh interpreter's imports)."""
    import opendit
    from opendit import Engine, ParallelConfig, generate, parallelize

    assert (
        callable(generate) and callable(parallelize) and isinstance(Engine, type) and isinstance(ParallelConfig, type)
    )
    assert {"Engine", "ParallelConfig", "parallelize", "generate", "save_outputs"} <= set(opendit.__all__)


def _table(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose header row starts with `first_header`: (header, rows of cells)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [c.strip() for c in lines[start].strip().strip("|").split("|")], rows


def test_readme_capability_table_matches_the_generated_matrix():
    """The README's compact table is docs/capabilities.md (make test-matrix) with shorter headers and no footnotes."""
    short = {"Uly.": "Ulysses", "USP": "USP 2x2", "cfg": "cfg-parallel", "shard": "shard-weights",
             "balance": "balance-tokens"}  # fmt: skip
    head, rows = _table((ROOT / "README.md").read_text(), "family")
    full_head, full_rows = _table((ROOT / "docs" / "capabilities.md").read_text(), "family")
    full = {r[0]: dict(zip(full_head, r)) for r in full_rows}
    assert [r[0] for r in rows] == [r[0] for r in full_rows], "README's families differ from docs/capabilities.md"
    differ = []
    for row in rows:
        for name, cell in zip(head[1:], row[1:]):
            want = re.sub(r"\s*\[\d+\]", "", full[row[0]][short.get(name, name)])
            if cell != want:
                differ.append(f"{row[0]} x {name}: README {cell!r}, matrix {want!r}")
    assert not differ, "README's capability table is stale (copy from docs/capabilities.md): " + "; ".join(differ)
