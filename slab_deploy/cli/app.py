"""The typer app of `slab-deploy`, the options several commands share, the printing helpers, and
`main`, the console-script entry. typer is imported only in this package (slab_deploy/cli/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slab_deploy import __version__
from slab_deploy.errors import SlabDeployError

app = typer.Typer(
    name="slab-deploy",
    help=(
        "Take SLAB vision transformers from checkpoint to production: "
        "inspect, fold, export, build, check, bench."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Registered model name (see `slab-deploy models`)."),
]
CkptOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "-c", help="Checkpoint file (authors' .pth, state_dict, safetensors or folded)."
    ),
]
EmaOpt = Annotated[
    bool,
    typer.Option("--ema", help="Use the EMA weights (state_dict_ema) of a training checkpoint."),
]
UnfinishedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unfinished-prepbn",
        help=(
            "Deploy a checkpoint saved before PRepBN finished "
            "(its eval output differs from what was trained)."
        ),
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def console(stderr: bool = False) -> Any:
    from slab_deploy.render import console

    return console(stderr)


def print_all(*renderables: Any, stderr: bool = False) -> None:
    con = console(stderr)
    for r in renderables:
        con.print(r)


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slab-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """slab-deploy: SLAB checkpoints to production."""


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main() -> None:
    """Console-script entry: user errors print one line and exit with their code (1, or 3 for
    parity failures, 4 for benchmark regressions); usage errors are typer's (exit 2); SIGINT and
    SIGTERM clean up, print one line and exit 130 and 143 (128 + the signal number)."""
    import signal

    from rich.markup import escape

    from slab_deploy.utils import Interrupted, raise_if_interrupted, signals_interrupt

    with signals_interrupt():  # handlers stay until the exit below: a repeat signal is ignored
        try:
            try:
                app()  # standalone mode: typer prints usage errors and help, and exits
            finally:
                raise_if_interrupted()  # a signal whose exception a finaliser swallowed still ends as one
        except SlabDeployError as exc:
            console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except Interrupted as exc:
            name = signal.Signals(exc.signum).name
            console(stderr=True).print(f"[bold red]interrupted[/bold red] by {name}: stopped and cleaned up",
                                       soft_wrap=True)
            sys.exit(128 + exc.signum)

