"""pyproject.toml's dependency lists, for `.ci/min-deps` and `.ci/run`.

`python3 .ci/deps.py hash`: sha256 of `[project] dependencies` and `optional-dependencies`, the lines whose change
calls for a new minimum-versions run (`.ci/min-deps.sha256` holds the hash of the last run that passed).
`python3 .ci/deps.py constraints`: a pip constraints file that pins every `name>=floor` of `dependencies` to
`name==floor`, so `pip install -c` installs the declared minimum versions.
"""

import json
import re
import sys
from hashlib import sha256
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# `name>=floor`; any other form (no floor, `==`, `<`, a marker) is rejected: every dependency has a tested floor.
FLOOR = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)\s*>=\s*(?P<floor>[0-9][0-9A-Za-z.]*)\s*$")


def project() -> dict:
    with open(PYPROJECT, "rb") as file:
        return tomllib.load(file)["project"]


def dependency_hash() -> str:
    lists = {"dependencies": project()["dependencies"], "optional-dependencies": project()["optional-dependencies"]}
    return sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def constraints() -> str:
    lines = []
    for requirement in project()["dependencies"]:
        match = FLOOR.match(requirement)
        if match is None:
            sys.exit(f"pyproject.toml: dependency {requirement!r} is not of the form `name>=floor`")
        lines.append(f"{match['name']}=={match['floor']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    commands = {"hash": dependency_hash, "constraints": constraints}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python3 {sys.argv[0]} {{{','.join(commands)}}}")
    print(commands[sys.argv[1]](), end="\n" if sys.argv[1] == "hash" else "")
