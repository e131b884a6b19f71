"""The documentation stays true: its Python blocks run, and its tables render.

* Every fenced ``python`` block of ``docs/`` runs, page by page in a temporary folder with one
  namespace per page: a block of ``>>>`` lines as a doctest, any other block as a script.  A block
  that cannot run here (several processes, a GPU, a model the reader brings) is preceded by
  ``<!-- docs-test: skip (reason) -->``.
* Every Markdown table of ``README.md`` and ``docs/`` has, in every row, the header's number of
  cells (GitHub splits cells on every unescaped ``|``, inside backticks too, and drops a table
  whose delimiter row has another count).
* The generated hparams table of the docs is the dataclass's.
"""

from __future__ import annotations

import doctest
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
SKIP = "<!-- docs-test: skip"
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
CELL_SPLIT = re.compile(r"(?<!\\)\|")
DELIMITER = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


@dataclass
class Block:
    """A fenced code block: its language, first line number, code (dedented) and skip marker."""

    lang: str
    line: int
    code: str
    skipped: bool


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3)
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        found.append(Block(lang, i + 1, "\n".join(body) + "\n", previous.startswith(SKIP)))
        i = j + 1
    return found


def outside_fences(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def cells(row: str) -> int:
    """The number of cells GitHub reads in a table row."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return len(CELL_SPLIT.split(row))


def table_errors(text: str) -> list[str]:
    """One message per table row whose cell count differs from its header's."""
    lines = outside_fences(text)
    errors = []
    for k in range(len(lines) - 1):
        (n_head, head), (_, delim) = lines[k], lines[k + 1]
        if "|" not in head or not DELIMITER.match(delim.strip()):
            continue
        want = cells(head)
        rows = [(n_head + 1, delim)]
        for number, line in lines[k + 2 :]:
            if not line.strip().startswith("|"):
                break
            rows.append((number, line))
        errors += [f"line {n}: {cells(r)} cells, header has {want}" for n, r in rows if cells(r) != want]
    return errors


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_have_the_header_cell_count(path: Path) -> None:
    assert table_errors(path.read_text(encoding="utf-8")) == [], path


def test_table_checker_catches_a_bad_delimiter_row() -> None:
    good = "| a | b |\n| --- | --- |\n| `x \\| y` | 2 |\n"
    bad = "| a | b |\n| --- | --- | --- |\n| 1 | 2 |\n"
    piped = "| a | b |\n| --- | --- |\n| `|w|` | 2 |\n"
    assert table_errors(good) == []
    assert table_errors(bad) == ["line 2: 3 cells, header has 2"]
    assert table_errors(piped) == ["line 3: 4 cells, header has 2"]
    assert table_errors("```\n| a | b |\n| --- |\n```\n") == []


RUNNABLE = [p for p in PAGES if any(b.lang == "python" and not b.skipped for b in blocks(p.read_text()))]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for block in blocks(path.read_text(encoding="utf-8")):
        if block.lang != "python" or block.skipped:
            continue
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.code.lstrip().startswith(">>>"):
            test = parser.get_doctest(block.code, namespace, where, str(path), block.line)
            result = runner.run(test, clear_globs=False)
            assert result.failed == 0, f"doctest failed at {where}"
        else:
            exec(compile(block.code, where, "exec"), namespace)


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [str(p.relative_to(DOCS)) for p in PAGES if str(p.relative_to(DOCS)) not in nav]
    assert missing == []


def test_hparams_page_is_generated_from_the_dataclass() -> None:
    import importlib.util

    from lit_prune.config import markdown_table

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (DOCS / "guide" / "hparams.md").read_text(encoding="utf-8")
    assert hooks.HPARAMS_MARKER in page and "| `target_sparsity` |" not in page  # no hand-kept copy
    assert markdown_table() in hooks.on_page_markdown(page, None, None, None)


def test_skipped_blocks_say_why() -> None:
    for path in PAGES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if SKIP in line:
                assert re.search(r"docs-test: skip \(.+\) -->", line), f"{path}: {line.strip()}"
