"""One schema: PruningHParams's fields, annotations, defaults and docs drive coercion, Hydra and the README.

Run: pytest tests/test_config_schema.py
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_type_hints

import pytest

import lit_prune.config.hparams as hparams_module
from lit_prune import PruningHParams
from lit_prune.config import field_specs, markdown_table, structured_schema

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- hparams-table:start -->", "<!-- hparams-table:end -->"


def _readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, "the README must hold one hparams-table marker pair"
    return text.split(START)[1].split(END)[0].lstrip("\n")


def _cells(row: str) -> list[str]:
    assert row.startswith("|") and row.endswith("|"), row
    return re.split(r"(?<!\\)\|", row[1:-1])


def test_the_kinds_come_from_the_annotations_and_no_hand_kept_list_is_left():
    assert not hasattr(hparams_module, "_FIELD_KINDS")
    hints = get_type_hints(PruningHParams, include_extras=True)
    specs = field_specs()
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(PruningHParams)]
    assert all(s.annotation == hints[s.name] for s in specs)
    kinds = {s.name: s.kind for s in specs}
    assert kinds["nbins"] == "int" and kinds["target_sparsity"] == "float" and kinds["use_tpu"] == "bool"
    assert kinds["name"] == "str" and kinds["prune_patterns"] == "list" and kinds["weight_sparsity_map"] == "map"
    assert {s.name: s.choices for s in specs if s.choices} == {
        "block_pooling_function": ("AVG", "MAX"),
        "prune_option": ("weight", "first_order_gradient", "second_order_gradient"),
        "threshold_method": ("histogram", "exact"),
        "allocation": ("uniform", "global", "erk", "sensitivity"),
    }
    assert all(s.default == getattr(PruningHParams(), s.name) for s in specs)


def test_every_field_has_one_doc_and_the_docstring_is_written_from_it():
    docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(PruningHParams)}
    for spec in field_specs():
        assert spec.doc and spec.doc == docs[spec.name]
        assert re.search(rf"^        {spec.name}: ", PruningHParams.__doc__, re.MULTILINE), spec.name
    assert PruningHParams.__doc__.index("    Args:") < PruningHParams.__doc__.index("    Example::")


def test_hydra_schema_is_derived_from_the_dataclass():
    from lit_prune.cli.app import PruningSchema

    assert PruningSchema is structured_schema()
    fields = {f.name: f for f in dataclasses.fields(PruningSchema)}
    assert list(fields) == list(PruningHParams.field_names())
    for spec in field_specs():
        f = fields[spec.name]
        if spec.kind in ("map", "list"):
            assert (f.type, f.default) == (Any, None), spec.name
        else:
            assert f.type is {"int": int, "float": float, "str": str, "bool": bool}[spec.kind], spec.name
            assert f.default == spec.default, spec.name


def test_readme_hparams_table_is_the_generated_one():
    assert _readme_table() == markdown_table(), "run: python scripts/update_readme_hparams.py"


@pytest.mark.parametrize("table", ["readme", "generated"])
def test_every_table_row_has_the_header_number_of_cells(table):
    rows = (_readme_table() if table == "readme" else markdown_table()).strip().splitlines()
    header = _cells(rows[0])
    assert len(rows) == 2 + len(field_specs())
    for row in rows[1:]:
        assert len(_cells(row)) == len(header), row


def _script():
    spec = importlib.util.spec_from_file_location(
        "update_readme_hparams", ROOT / "scripts" / "update_readme_hparams.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_rewrites_a_stale_table_and_checks_it(tmp_path, capsys):
    script = _script()
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\n| field | default |\n| --- | --- |\n| `x` | 1 |\n{END}\n\nafter\n")
    assert script.main(["--check", "--readme", str(readme)]) == 1
    assert script.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == f"# title\n\n{START}\n{markdown_table()}{END}\n\nafter\n"
    assert script.main(["--check", "--readme", str(readme)]) == 0
    assert script.main(["--check"]) == 0  # the repository's README
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="hparams-table"):
        script.main(["--readme", str(readme)])


def test_config_imports_neither_hydra_nor_omegaconf():
    code = (
        "import sys; import lit_prune.config.hparams, lit_prune.config.grammar, lit_prune.config.schema; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'lightning')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
