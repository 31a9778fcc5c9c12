"""Print the README's flag table from alexnet_dist.config (tests/test_flags.py checks they agree).

    python scripts/flag_table.py
"""

import dataclasses

from alexnet_dist.config import Config


def flag_table() -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(Config):
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) if default else "()"
        rows.append(f"| `{field.name}` | `{default}` | {field.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(flag_table(), end="")
