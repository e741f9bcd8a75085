"""The Markdown reference of the `slab-deploy` command line (docs/cli.md), generated from the CLI itself.

Usage (from the repository root):
    python tools/cli_reference.py --write    # regenerate docs/cli.md (the one way to produce it)
    python tools/cli_reference.py --check    # exit 1 when docs/cli.md differs from the command line
    python tools/cli_reference.py            # print it

It documents the slab_deploy package of this checkout, whatever else is installed. The text depends
on the code alone (see `slab_deploy.render.cli_reference`); tests/test_docs.py regenerates it and
fails when docs/cli.md has drifted.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
COMMAND = "python tools/cli_reference.py --write"


def reference() -> str:
    """docs/cli.md as the command line of this checkout describes itself."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from typer.main import get_command

    from slab_deploy.cli import app
    from slab_deploy.render import cli_reference

    return cli_reference(get_command(app))


def main(argv: list[str]) -> int:
    if argv not in ([], ["--write"], ["--check"]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    text = reference()
    if not argv:
        sys.stdout.write(text)
        return 0
    if argv == ["--check"]:
        current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
        if current != text:
            print(f"docs/cli.md differs from the command line; regenerate it: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    from slab_deploy.utils import atomic_write

    with atomic_write(DOC) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
