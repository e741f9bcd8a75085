"""`export --format`: what one export command delivers.

  onnx    DIR/model.onnx + manifest.json (export/), the default
  engine  the same, then DIR/model.plan + engine.json built from it (runtime/engine.py); TensorRT is
          required before anything is exported, so a host without it costs nothing
  triton  a Triton model repository: the export is made in a temporary directory beside REPO and
          written as REPO/<model>/ (config.pbtxt, 1/model.onnx, the manifest) by serve/repository.py

Above export/, runtime/ and serve/ in the import order: it only chains their public calls.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slab_deploy.choices import EXPORT_FORMATS
from slab_deploy.errors import ConfigError


@dataclass
class Delivered:
    """What `export_format` wrote: the export (None for triton, whose export was temporary), the
    engine build (engine), the repository model (triton)."""

    format: str
    export: Any = None  # export.api.ExportResult
    engine: Any = None  # runtime.engine.EngineResult
    repository: Any = None  # serve.repository.RepoResult


def export_format(model_name: str, checkpoint: str | Path | None, output: str | Path | None, opts: Any, *,
                  fmt: str = "onnx", force: bool = False, progress: Callable[[str], None] | None = None,
                  **export_kw: Any) -> Delivered:
    """Export `model_name` and deliver it as `fmt` (see the module docstring). `opts` are the
    export's ExportOptions; `export_kw` go to `export_model` (ema, allow_unfinished_prepbn)."""
    from slab_deploy.export.api import export_model

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "triton" and output is None:
        raise ConfigError("--format triton needs --output REPO: the Triton model repository to write into")
    if fmt == "engine":
        from slab_deploy.runtime.tensorrt import require_tensorrt

        if opts.precision == "int8" and opts.activations != "int8":
            raise ConfigError(f"--format engine needs --activation-type int8 (TensorRT builds signed int8 "
                              f"Q/DQ only), not {opts.activations}: drop --activation-type or pass int8")

        require_tensorrt("export --format engine")  # no TensorRT: refused before anything is written
    if fmt != "triton":
        result = export_model(model_name, checkpoint, output, opts, force=force, progress=progress,
                              **export_kw)
        if fmt == "onnx":
            return Delivered(fmt, export=result)
        from slab_deploy.runtime.engine import EngineOptions, build_engine

        say = progress or (lambda _s: None)
        say("building the TensorRT engine")
        engine = build_engine(result.onnx_path.parent, EngineOptions(force=True), progress=progress)
        return Delivered(fmt, export=result, engine=engine)
    from slab_deploy.serve.options import RepoOptions
    from slab_deploy.serve.repository import check_replaceable, repository_target, write_triton_repository

    repo = Path(str(output))
    # the repository's own refusals, before the export: a file for REPO, a model there without --force
    check_replaceable(repository_target(repo, model_name), force)
    parent = repo.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{repo.name}.export-", dir=parent) as tmp:
        export_model(model_name, checkpoint, Path(tmp) / "export", opts, force=True, progress=progress,
                     **export_kw)
        written = write_triton_repository(Path(tmp) / "export", repo, RepoOptions(), force=force)
    return Delivered(fmt, repository=written)
