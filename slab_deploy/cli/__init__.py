"""The `slab-deploy` command line: `app.py` (the typer app, shared options, `main`), one module per
group of commands (`pipeline.py`: models, inspect, fold, recalibrate, export, build, check;
`measure.py`: bench, trace, profiles; `serve.py`: serve-repo, serve, serve-bench; `llm.py`: the
`llm` group for language models). Each command
parses its options, makes one library call and hands the result to `slab_deploy.render`. Importing
a command module registers its commands on `app`."""

from slab_deploy.cli.app import app, main

# --help lists the commands in the order they are registered: the pipeline first.
# isort: off
from slab_deploy.cli import pipeline  # noqa: E402, F401
from slab_deploy.cli import measure  # noqa: E402, F401
from slab_deploy.cli import serve  # noqa: E402, F401
from slab_deploy.cli import llm  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]
