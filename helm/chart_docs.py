"""Regenerate the values table in helm/qlora-job/README.md from the `# --` comments in values.yaml.
Usage: python helm/chart_docs.py [--check]   (--check exits 1 when the README is stale)"""

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).parent / "qlora-job"
START, END = "<!-- values:start -->\n", "<!-- values:end -->"


def values_table() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows, path, pending = [], [], None
    for line in (CHART / "values.yaml").read_text().splitlines():
        if line.lstrip().startswith("# --"):
            pending = line.split("# --", 1)[1].strip()
            continue
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        path = path[:depth] + [match.group(2)]
        if pending:
            value = values
            for key in path:
                value = value[key]
            rows.append(f"| `{'.'.join(path)}` | `{json.dumps(value)}` | {pending} |")
            pending = None
    return "| key | default | description |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"


def main() -> int:
    readme = (CHART / "README.md").read_text()
    head, rest = readme.split(START, 1)
    updated = head + START + values_table() + END + rest.split(END, 1)[1]
    if "--check" in sys.argv:
        return 0 if updated == readme else 1
    (CHART / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
