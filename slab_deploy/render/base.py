"""What every table module of render/ shares: the console, table and key-value builders, numbers."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


def console(stderr: bool = False) -> Any:
    """A rich console; off a terminal (CI logs) tables get at least 160 columns, not 80."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(stderr=stderr, highlight=False, width=width)


def table(title: str, columns: Sequence[str], right: Sequence[str] = (), **column: Any) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", **column)
    return t


def key_value(title: str, rows: Sequence[tuple[str, str]]) -> Any:
    """A two-column table without header: bold keys, plain values."""
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


def num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------------------------------------ models


