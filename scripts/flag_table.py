"""The README's flag table, from alexnet_dist.config (tests/test_flags.py checks they agree).

    python scripts/flag_table.py            # print it
    python scripts/flag_table.py --write    # replace the table in README.md
"""

import dataclasses
import sys
from pathlib import Path

from alexnet_dist.config import Config


def flag_table() -> str:
    rows = ["| flag | default | learned | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(Config):
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) if default else "()"
        learned = "yes" if field.metadata["learned"] else ""
        rows.append(f"| `{field.name}` | `{default}` | {learned} | {field.metadata['help']} |")
    return "\n".join(rows) + "\n"


def write(readme: Path):
    text = readme.read_text()
    start = text.index("| flag | default |")
    end = text.index("\n\n", start) + 1
    readme.write_text(text[:start] + flag_table() + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(flag_table(), end="")
