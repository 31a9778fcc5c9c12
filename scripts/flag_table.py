"""The flag tables, from alexnet_dist.config (tests/test_flags.py checks that the documents hold them).

    python scripts/flag_table.py            # print the full table
    python scripts/flag_table.py --write    # replace the tables in docs/flags.md (every flag) and README.md (COMMON)
"""

import dataclasses
import sys
from pathlib import Path

from alexnet_dist.config import KEPT_UNDER_WARMUP, Config

ROOT = Path(__file__).resolve().parents[1]
# the flags people change most, in the README
COMMON = ("dataset", "data_dir", "num_epochs", "batch_size", "lr", "seed", "recipe", "mixed_precision",
          "grad_accum_steps", "logger", "run_dir", "resume")


def flag_table(names=None) -> str:
    """The rows of `names` (default: every flag), in the order given."""
    fields = {field.name: field for field in dataclasses.fields(Config)}
    rows = ["| flag | default | must match on resume | meaning |", "|---|---|---|---|"]
    for name in names or fields:
        default, metadata = fields[name].default, fields[name].metadata
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) if default else "()"
        kept = "yes" if metadata["learned"] else "with a warmup_* schedule" if name in KEPT_UNDER_WARMUP else ""
        rows.append(f"| `{name}` | `{default}` | {kept} | {metadata['help']} |")
    return "\n".join(rows) + "\n"


def write(document: Path, table: str):
    """Replace the table that starts with '| flag | default |' in `document` (it runs to the next blank line)."""
    text = document.read_text()
    start = text.index("| flag | default |")
    end = text.index("\n\n", start) + 1
    document.write_text(text[:start] + table + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write(ROOT / "docs" / "flags.md", flag_table())
        write(ROOT / "README.md", flag_table(COMMON))
    else:
        print(flag_table(), end="")
