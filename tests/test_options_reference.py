"""docs/options.md is the run config's own reference: every field, its default and help, never stale."""
import dataclasses
import os

from ds_aslora.train.reference import option_reference
from ds_aslora.train.run_config import FIELDS, SECTIONS, shown_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "options.md")


def test_the_committed_reference_is_the_generated_one():
    with open(DOC) as f:
        committed = f.read()
    regenerate = "python -m ds_aslora.train.reference > docs/options.md"
    assert committed == option_reference(), f"docs/options.md is stale: {regenerate}"


def test_the_reference_names_every_field_with_its_default_and_help():
    rows = {line.split("|")[1].strip(): line for line in option_reference().splitlines() if line.startswith("| `--")}
    assert set(rows) == {f"`--{name}`" for name in FIELDS}
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            row = rows[f"`--{f.name}`"]
            assert f"`{shown_default(f)}`".replace("|", "\\|") in row
            assert f.metadata["help"].replace("|", "\\|")[:40] in row
