"""Renders the gateway's configuration at pod start (the Deployment's init container runs it).

    python render-config.py TEMPLATE TARGET

Copies TEMPLATE (the ConfigMap's gateway.toml) to TARGET with each ${NAME} replaced by the
environment variable NAME, which the pod takes from a Secret. Placeholders stand inside TOML
strings; values are escaped for them, so a secret with quotes or backslashes stays one string.
A placeholder whose variable is unset stops the pod with a message naming it.
"""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path


def toml_escaped(value: str) -> str:
    """`value` as the inside of a TOML basic string (JSON's escapes are TOML's, for these)."""
    return json.dumps(value, ensure_ascii=False)[1:-1].replace("\x7f", "\\u007f")


def render(template: str, environ: dict[str, str]) -> str:
    """`template` with every ${NAME} replaced; KeyError names a variable that is not set."""
    values = {name: toml_escaped(value) for name, value in environ.items()}
    return string.Template(template).substitute(values)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: render-config.py TEMPLATE TARGET", file=sys.stderr)
        return 2
    source, target = Path(argv[1]), Path(argv[2])
    try:
        text = render(source.read_text(), dict(os.environ))
    except KeyError as exc:
        print(f"{source}: the environment variable {exc.args[0]} is not set", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{source}: {exc}", file=sys.stderr)
        return 1
    # Owner-only: the file holds secrets.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    print(f"rendered {target} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
