"""The documentation's own rules.

BENCHMARKS.md holds only current results, each section with its command and date, in at most 500
lines; the dated investigations live in docs/notes/YYYY-MM-DD-topic.md, each listed in
docs/notes/README.md; and every pointer into either resolves. The pointers are written as the
file, then optionally a quoted section name or an anchor: `BENCHMARKS.md, "Registry at scale"`,
`docs/notes/<date>-<topic>.md, "Why am-lora forgot"`, `BENCHMARKS.md#registry-at-scale-postgresql`,
or a Markdown link to the file. In code they may wrap across comment or docstring lines.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
NOTES = REPO / "docs" / "notes"
SKIP_DIRS = {"node_modules", "bench-results", "__pycache__", "build", "dist", "shared"}
SOURCES = (".py", ".md", ".toml")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
NOTE_NAME = re.compile(r"20\d\d-\d\d-\d\d-[a-z0-9]+(?:-[a-z0-9]+)*\.md")
# a file, then optionally `, "Section"` (more names after `,` or `and`) or `#anchor`
QUOTED = r'(?:,\s*"[^"\n]+"(?:\s*(?:,|and)\s*"[^"\n]+")*)?'
POINTER = re.compile(
    r"(?P<file>BENCHMARKS\.md|docs/notes/(?P<note>[\w.-]+?\.md))"
    rf"(?:#(?P<anchor>[\w-]+)|(?P<quoted>{QUOTED}))"
)
SIBLING = re.compile(rf"(?<![\w/-])(?P<note>{NOTE_NAME.pattern})(?:#(?P<anchor>[\w-]+))?")


def _sources() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        found += [Path(root, f) for f in files if f.endswith(SOURCES)]
    return sorted(found)


def _headings(text: str) -> list[str]:
    """The Markdown headings of a text, outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            out.append(m.group(1).strip())
    return out


def _sections(text: str) -> dict[str, str]:
    """BENCHMARKS.md's `## ` sections, heading -> body."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {p.splitlines()[0].strip(): p for p in parts}


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _flatten(text: str) -> str:
    """Joins wrapped lines, dropping the indentation and comment marks of the next line."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#[ \t]*)?", " ", text)


def _unresolved(text: str, where: str, notes_dir: bool = False) -> list[str]:
    """Every pointer in a text that names a missing file, section or anchor."""
    bad = []
    flat = _flatten(text).replace("docs/notes/ ", "docs/notes/")  # a path wrapped after its '/'

    def check(target: Path, label: str, anchor: str | None, quoted: str) -> None:
        if not target.is_file():
            bad.append(f"{where}: {label} does not exist")
            return
        heads = _headings(target.read_text())
        if anchor and anchor not in {_anchor(h) for h in heads}:
            bad.append(f"{where}: {label}#{anchor} is no heading's anchor")
        for name in re.findall(r'"([^"]+)"', quoted or ""):
            if not any(h.lower().startswith(name.lower()) for h in heads):
                bad.append(f'{where}: {label}, "{name}" is no heading')

    for m in POINTER.finditer(flat):
        note = m.group("note")
        target = NOTES / note if note else BENCHMARKS
        check(target, m.group("file"), m.group("anchor"), m.group("quoted"))
    if notes_dir:  # the notes and their index name each other without the folder
        for m in SIBLING.finditer(flat):  # "docs/notes/NAME" is POINTER's, not matched here
            check(NOTES / m.group("note"), m.group("note"), m.group("anchor"), "")
    return bad


def test_benchmarks_is_at_most_500_lines() -> None:
    assert len(BENCHMARKS.read_text().splitlines()) <= 500


def test_every_benchmarks_section_has_a_command_and_a_date() -> None:
    sections = _sections(BENCHMARKS.read_text())
    assert len(sections) >= 8
    for title, body in sections.items():
        own = re.sub(r"\S*" + NOTE_NAME.pattern, "", body)  # a note's name is not the date
        assert DATE.search(own), f"{title}: no date (YYYY-MM-DD)"
        inline = re.search(r"`(?:\S*\.venv/bin/|python |strata |make )[^`]+`", body)
        assert "\n```" in body or inline, f"{title}: no command"


def test_notes_are_dated_and_indexed() -> None:
    index = (NOTES / "README.md").read_text()
    notes = sorted(p.name for p in NOTES.glob("*.md") if p.name != "README.md")
    assert notes
    for name in notes:
        assert NOTE_NAME.fullmatch(name), f"{name} is not YYYY-MM-DD-topic.md"
        assert f"]({name})" in index, f"{name} is not listed in docs/notes/README.md"
    for p in NOTES.iterdir():
        assert p.suffix == ".md", f"docs/notes/{p.name}: only Markdown notes belong here"


def test_every_pointer_into_the_benchmarks_and_the_notes_resolves() -> None:
    bad = []
    for path in _sources():
        if path == Path(__file__).resolve():
            continue
        where = str(path.relative_to(REPO))
        bad += _unresolved(path.read_text(errors="replace"), where, path.parent == NOTES)
    assert bad == []


def test_the_pointer_check_finds_what_does_not_resolve() -> None:
    present = "docs/notes/2026-11-23-am-lora-task-routing.md"
    assert (REPO / present).is_file()
    assert _unresolved(f'({present},\n    # "Why am-lora forgot")', "ok") == []
    assert _unresolved('BENCHMARKS.md, "Registry at scale"', "ok") == []
    assert _unresolved("BENCHMARKS.md#registry-at-scale-postgresql", "ok") == []
    assert _unresolved("the commands (docs/notes/\n    # 2026-01-01-gone.md)", "x") == [
        "x: docs/notes/2026-01-01-gone.md does not exist"
    ]
    assert _unresolved(f'{present}, "Why o-lora forgot"', "x") == [
        f'x: {present}, "Why o-lora forgot" is no heading'
    ]
    assert len(_unresolved('BENCHMARKS.md, "Registry at scale" and "Gone"', "x")) == 1
    assert len(_unresolved("BENCHMARKS.md#gone", "x")) == 1
    assert len(_unresolved("see 2026-01-01-gone.md", "x", notes_dir=True)) == 1


def test_readme_cites_the_method_comparison_that_benchmarks_holds() -> None:
    readme = (REPO / "README.md").read_text()
    which = readme.split("## Which method?", 1)[1].split("\n## ", 1)[0]
    bench = BENCHMARKS.read_text()
    cited = []
    for row in which.splitlines():
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[\d.]+", cells[2]):
            cited += [c for c in cells[2:4] if c]
    assert len(cited) >= 10
    for value in cited:
        assert re.search(rf"\|\s*\**{re.escape(value)}\**\s*\|", bench), value


def test_readme_composed_command_sets_the_composed_settings() -> None:
    """README's one command for the composed pipeline on a stream sets exactly the options in
    which `composed` (workers.bench.COMPOSED_OPTIONS) differs from am-lora's defaults."""
    from api.pairs import parse_pairs
    from continual.options import AmLoraOptions
    from workers.bench import COMPOSED_OPTIONS

    readme = (REPO / "README.md").read_text()
    after = readme.split("The composed pipeline on a stream, the one command", 1)[1]
    command = after.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    assert "--method am-lora" in command
    options = parse_pairs(re.findall(r"--option (\S+)", command), flag="--option")
    defaults = AmLoraOptions().to_dict()
    assert options == {k: v for k, v in COMPOSED_OPTIONS.items() if defaults[k] != v}
