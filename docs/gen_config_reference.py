"""Write docs/configuration.md: every EGRPOConfig field with its type, default and help text.

    python docs/gen_config_reference.py

The page is generated from the dataclass itself (field metadata, and the ``# --- section ---`` comments
that group the fields in config.py), so it cannot drift from the code; tests/test_docs.py fails when the
committed page differs from what this script writes.
"""

import dataclasses
import inspect
import os
import re

from trl_flow_egrpo import EGRPOConfig

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration.md")

HEADER = """\
# Configuration reference

Every field of `EGRPOConfig`, generated from its source by `docs/gen_config_reference.py`. Each field is
also an option of `trl-flow-egrpo train` and of the example scripts (`--num_generations 12`) and a key of
their YAML recipes (`num_generations: 12`); the command line overrides the recipe:

```bash
trl-flow-egrpo train --config examples/recipes/flux_dev_hps.yaml --max_steps 100 --output_dir short-run
```

`trl-flow-egrpo train --help` lists them all. Trackers are `report_to` (TRL's name) or `log_with`
(accelerate's, which the recipes use): the same option, give one of the two.

Defaults are the paper's recipe for FLUX.1-dev (see [Reproducing the paper](reproducing.md)), except that a
LoRA is trained by default (`use_peft: true`, with a LoRA learning rate); the paper fully fine-tunes.
"""


def sections() -> dict[str, list[dataclasses.Field]]:
    """The fields grouped under the ``# --- title ---`` comments of the class body, in source order."""
    fields = {field.name: field for field in dataclasses.fields(EGRPOConfig)}
    grouped: dict[str, list[dataclasses.Field]] = {}
    title = "General"
    for line in inspect.getsource(EGRPOConfig).splitlines():
        heading = re.match(r"\s*# -+ (.+?) -*$", line)
        if heading:
            # Section titles cite the project's internal spec ("(METHOD.md section 3)"): the docs have concepts.md.
            title = re.sub(r"\s*\(METHOD\.md[^)]*\)", "", heading.group(1))
            continue
        name = re.match(r"\s*(\w+)\s*:", line)
        if name and name.group(1) in fields:
            grouped.setdefault(title, []).append(fields.pop(name.group(1)))
    if fields:  # fields declared in a way the scan above does not see
        grouped.setdefault("Other", []).extend(fields.values())
    return grouped


def default_of(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return f"`{field.default!r}`"


def cell(text: str) -> str:
    """Plain text safe inside a Markdown table cell (inside `code` a pipe needs no escape, and gets none)."""
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole page."""
    parts = [HEADER]
    for title, fields in sections().items():
        parts.append(
            f"\n## {title[0].upper() + title[1:]}\n\n| field | type | default | description |\n|---|---|---|---|"
        )
        for field in fields:
            # The annotation as written: HfArgumentParser replaces `field.type` with the resolved type in place.
            annotation = EGRPOConfig.__annotations__[field.name]
            parts.append(
                f"| `{field.name}` | `{annotation}` | {default_of(field)} | {cell(field.metadata.get('help', ''))} |"
            )
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    with open(OUTPUT, "w") as handle:
        handle.write(render())
    print(f"Wrote {OUTPUT}")
