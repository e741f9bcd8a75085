"""Export each model with each simplifier through slab-deploy's own export and tabulate the manifests.

Usage: python tools/compare_simplifiers.py OUT_DIR slab_swin_tiny slab_deit_tiny ...
Prints a Markdown table (nodes before/after, seconds, accepted, max |delta| vs unsimplified).
"""

from __future__ import annotations

import sys
from pathlib import Path

from slab_deploy.export.api import ExportOptions, export_model


def main(out: str, models: list[str]) -> None:
    rows = []
    for name in models:
        for simp in ("onnxsim", "onnxslim"):
            for exporter in ("dynamo", "torchscript"):
                res = export_model(name, None, Path(out) / f"{name}-{simp}-{exporter}",
                                   ExportOptions(simplifier=simp, exporter=exporter), force=True)
                s = res.manifest["simplify"]
                rows.append(
                    f"| {name} | {exporter} | {simp} | {s['nodes_before']} | {s['nodes_after']} "
                    f"| {s['seconds']:.2f} | "
                    f"{'yes' if s['accepted'] else 'no: ' + s['note']} "
                    f"| {s['max_abs_delta_vs_unsimplified']:.1e} |"
                )
    print("| model | exporter | simplifier | nodes before | nodes after | seconds | accepted "
          "| max abs delta |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
