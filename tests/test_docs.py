"""The documentation's own rules: BENCHMARKS.md holds current results only (each with its
command and date, at most 500 lines), dated investigations live in docs/notes/ under their
date, and every pointer into either resolves."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
NOTES = REPO / "docs" / "notes"
SKIP = {".venv", ".git", "node_modules", "bench-results", ".strata"}


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {p.splitlines()[0].strip(): p for p in parts}


def _sources() -> list[Path]:
    return [p for p in REPO.rglob("*") if p.suffix in (".py", ".md") and p.is_file()
            and not SKIP & set(p.relative_to(REPO).parts)
            and p != Path(__file__).resolve()]  # fmt: skip


def test_benchmarks_holds_current_results_with_command_and_date() -> None:
    text = BENCHMARKS.read_text()
    assert len(text.splitlines()) <= 500
    sections = _sections(text)
    assert len(sections) >= 8
    for title, body in sections.items():
        assert re.search(r"20\d\d-\d\d-\d\d", title + body), f"{title}: no date"
        if not title.startswith("The performance goals"):  # the overview of the goals
            assert "```" in body, f"{title}: no command"


def test_notes_are_dated_and_indexed() -> None:
    index = (NOTES / "README.md").read_text()
    notes = sorted(p.name for p in NOTES.glob("*.md") if p.name != "README.md")
    assert notes
    for name in notes:
        assert re.fullmatch(r"20\d\d-\d\d-\d\d-[a-z0-9-]+\.md", name), name
        assert f"({name})" in index, f"{name} is not in docs/notes/README.md"


def test_every_pointer_into_the_benchmarks_and_notes_resolves() -> None:
    headings = {t.lower() for t in _sections(BENCHMARKS.read_text())}
    bad = []
    for path in _sources():
        text = path.read_text(errors="replace")
        flat = re.sub(r"\s*\n\s*(#\s*)?", " ", text)  # pointers wrap across comment lines
        for name in re.findall(r"docs/notes/\s*([\w.-]+\.md)", flat):
            if not (NOTES / name).is_file():
                bad.append(f"{path.name}: docs/notes/{name}")
        for section in re.findall(r'BENCHMARKS\.md, "([^"]+)"', flat):
            if not any(h.startswith(section.lower()) for h in headings):
                bad.append(f'{path.name}: BENCHMARKS.md, "{section}"')
    assert bad == []
