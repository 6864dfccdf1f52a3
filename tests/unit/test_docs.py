"""The README, docs/ and benchmarks/RESULTS.md: every relative link resolves inside the repository (headings
included), and the README stays short and self-contained."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
README_LIMIT_BYTES = 16_000

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks and inline code, where links and headings live."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file: inline, reference-style and HTML."""
    text = prose(path.read_text(encoding="utf-8"))
    return [match.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK) for match in pattern.finditer(text)]


def anchors(path: Path) -> set[str]:
    """The fragment of each heading of a Markdown file, as GitHub renders them."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a linked heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def page_id(path: Path) -> str:
    """A page's path from the repository root, as tests name it."""
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_points_to_a_file_in_the_repository(page: Path) -> None:
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        location, _, fragment = target.partition("#")
        resolved = (page.parent / unquote(location)).resolve() if location else page
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {page_id(resolved)}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def test_the_readme_links_nothing_outside_the_repository() -> None:
    outside = [target for target in links(README) if SCHEME.match(target) or target.startswith("/")]
    assert not outside, f"README.md links outside the repository: {outside}"
    assert "../" not in README.read_text(encoding="utf-8"), "README.md names a path outside the repository"


def test_the_readme_is_short() -> None:
    size = README.stat().st_size
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size:,} bytes (limit {README_LIMIT_BYTES:,}): move detail to docs/"
    )


def test_anchors_follow_github() -> None:
    page = ROOT / "benchmarks" / "RESULTS.md"
    assert "trainer-overhead-scaleforge-bench-overhead" in anchors(page)
    assert "lstm-layers-in-dynamic-int8-2026-12-01-late" in anchors(page)
