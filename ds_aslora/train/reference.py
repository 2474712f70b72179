"""The option reference, ``docs/options.md``, generated from the run config so it cannot drift.

    python -m ds_aslora.train.reference > docs/options.md

``tests/test_options_reference.py`` fails when the committed file differs from this output.
"""
from __future__ import annotations

import dataclasses

from .run_config import SECTIONS, aliases_of, shown_default

INTRO = """# Options of the training job

Generated from `ds_aslora/train/run_config.py` and `ds_aslora/adapters/config.py` by
`python -m ds_aslora.train.reference > docs/options.md`; a test fails when this file is stale.

Every option is a flag (`--name VALUE`) and a key of the flat `--config` YAML file (`name: value`);
flags override the file. Booleans: `--flag` or `--flag false`. Lists: `--target_modules q_proj,v_proj`.
"Unset" settings that a DeepSpeed JSON may also hold take the JSON's value, else the default the help
names; set in both and different is an error. Besides these: `--config FILE`, `--deepspeed FILE`
(required) and DeepSpeed's `--local_rank`. `--help` prints the same list.

The names other trainers use (Hugging Face Trainer/TRL, peft, LLaMA-Factory, axolotl) are read as
ours, in flags and YAML alike: the "also" column, with how a value that means something else there is
read. One option under two names in one source (the YAML file, or the command line) is an error; a
flag overrides the file under either name. The saved `run_config.yaml` uses the names of the first
column."""


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def option_reference() -> str:
    """Markdown: one table per run-config section, every field with its aliases, default and help."""
    parts = [INTRO]
    for section, cls in SECTIONS.items():
        parts += ["", f"## {section}", "", "| option | also | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            also = ", ".join(f"`--{a}`" + (f" ({_cell(note)})" if note else "") for a, note in aliases_of(f.name))
            default, meaning = _cell(shown_default(f)), _cell(f.metadata.get("help", ""))
            parts.append(f"| `--{f.name}` | {also} | `{default}` | {meaning} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(option_reference(), end="")
