"""MkDocs hook: generated parts of pages, so that no page holds a hand-kept copy.

``<!-- hparams-table -->`` in a page becomes ``lit_prune.config.markdown_table()``: the table of
every ``PruningHParams`` field (type, default, doc), the same generator as the README's table
(``scripts/update_readme_hparams.py``).
"""

from __future__ import annotations

from typing import Any

HPARAMS_MARKER = "<!-- hparams-table -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the generated parts of a page."""
    if HPARAMS_MARKER in markdown:
        from lit_prune.config import markdown_table

        markdown = markdown.replace(HPARAMS_MARKER, markdown_table())
    return markdown
