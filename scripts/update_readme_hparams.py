"""Rewrite the README's hparams table from ``PruningHParams`` (``lit_prune.config.markdown_table``).

Run: ``python scripts/update_readme_hparams.py`` (rewrites ``README.md`` in place), or with
``--check`` to exit 1 when the table is out of date.  The table sits between
``<!-- hparams-table:start -->`` and ``<!-- hparams-table:end -->``; nothing else is touched.

Example::

    $ python scripts/update_readme_hparams.py --check
    README.md: the hparams table is up to date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_prune.config import markdown_table

START = "<!-- hparams-table:start -->"
END = "<!-- hparams-table:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def with_table(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``; a ValueError without one pair of markers."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} ... {END} pair")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or ``--check``) the table of ``--readme``; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is out of date, write nothing")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = with_table(text, markdown_table())
    if new == text:
        print(f"{args.readme.name}: the hparams table is up to date")
        return 0
    if args.check:
        print(f"{args.readme.name}: the hparams table is out of date; run python scripts/update_readme_hparams.py")
        return 1
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme.name}: rewrote the hparams table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
