"""Rich renderings of reports (imported by the CLI only)."""

from __future__ import annotations

from typing import Any

from slab_deploy.passes.fold import FoldReport


def fold_table(report: FoldReport) -> Any:
    from rich.table import Table

    t = Table(title=f"fold report: {report.model}")
    for col in ("norm", "kind", "C", "action", "into", "through", "max |delta|"):
        t.add_column(col, justify="right" if col in ("C", "max |delta|") else "left", overflow="fold")
    for n in report.norms:
        action = {"folded": f"[green]folded ({n.side})[/green]", "kept-affine": "[yellow]kept affine[/yellow]", "kept-layernorm": "[dim]LayerNorm[/dim]"}[n.action]
        into = ", ".join(n.into) if n.into else n.reason
        t.add_row(
            n.name, n.kind, str(n.channels), action, into, ",".join(n.through) or "-",
            "-" if n.max_abs_delta is None else f"{n.max_abs_delta:.1e}",
        )
    return t
