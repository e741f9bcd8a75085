"""Print a Markdown reference of the `slab-deploy` command line, generated from the CLI itself.

Usage: python tools/cli_reference.py > docs/cli.md
"""

from __future__ import annotations

from typer.main import get_command

from slab_deploy.cli import app
from slab_deploy.render import cli_reference

if __name__ == "__main__":
    print(cli_reference(get_command(app)))
