"""Every rich table and summary the command line prints, in one package (imported by the CLI only):
base.py (console, table builders), pipeline.py, measure.py, serve.py (one module per group of
commands), reference.py (docs/cli.md).

Each function takes a library result and returns renderables; nothing here decides, computes a
verdict or writes a file. Importing this module stays light (rich only, no torch).
"""

from slab_deploy.render.base import console, key_value, num, table
from slab_deploy.render.measure import bench_tables, profiles_table
from slab_deploy.render.pipeline import (
    build_summary,
    check_summary,
    check_table,
    delivered_summary,
    delivered_to_dict,
    export_summary,
    fold_summary,
    fold_table,
    inspect_table,
    models_table,
    recalibrate_summary,
)
from slab_deploy.render.reference import cli_reference
from slab_deploy.render.serve import load_table, serve_ready, serve_repo_summary

__all__ = [
    "bench_tables", "build_summary", "check_summary", "check_table", "cli_reference", "console",
    "delivered_summary", "delivered_to_dict", "export_summary", "fold_summary", "fold_table",
    "inspect_table", "key_value", "load_table", "models_table", "num", "profiles_table",
    "recalibrate_summary", "serve_ready", "serve_repo_summary", "table",
]
