"""What a Triton repository is written from: an export directory, read and validated (`read_artifact`).

The manifest gives the I/O names, dtypes and shapes and the precision; the deployed graph must be
the one it records (sha256); a TensorRT engine `model.plan` is taken with its `engine.json` when
the directory holds one. Everything is refused with one ArtifactError line naming the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slab_deploy.errors import ArtifactError
from slab_deploy.utils import sha256_file

MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
PLAN_NAME = "model.plan"
ENGINE_INFO_NAME = "engine.json"
MAX_JSON_BYTES = 4 << 20
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype and its shape without the batch dimension."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ServedArtifact:
    """An export directory as the repository writer needs it."""

    folder: Path
    manifest_path: Path
    model: str
    precision: str  # fp32 | fp16
    static_batch: int | None  # None: the graph takes any batch
    input: TensorSpec
    output: TensorSpec
    onnx: Path
    onnx_sha256: str
    plan: Path | None = None
    engine_info: dict[str, Any] | None = None
    engine_max_batch: int | None = None  # the engine's largest profile batch, when engine.json says it


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ArtifactError(
            f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB: not the {what} slab-deploy writes"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(
            f"{path} is not valid JSON ({type(exc).__name__}); write the {what} again"
        ) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not the {what} object")
    return data


def _tensor(m: dict[str, Any], mp: Path, side: str, rank: int) -> tuple[TensorSpec, int | str]:
    block = m.get("io")
    items = block.get(side) if isinstance(block, dict) else None
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
        raise ArtifactError(
            f"{mp}: io.{side} must list one tensor (a slab-deploy graph has one input and one "
            "output); export again with this slab-deploy"
        )
    t = items[0]
    name, dtype, shape = t.get("name"), t.get("dtype"), t.get("shape")
    if not isinstance(name, str) or not name or not name.isprintable() or '"' in name or "\\" in name:
        raise ArtifactError(f"{mp}: io.{side} name {name!r} is not a plain tensor name; export again")
    if dtype not in DTYPES:
        raise ArtifactError(
            f"{mp}: io.{side} {name} has dtype {dtype!r}, not float32 or float16; export again"
        )

    def positive(d: Any) -> bool:
        return isinstance(d, int) and not isinstance(d, bool) and d > 0

    if not (
        isinstance(shape, list)
        and len(shape) == rank
        and all(positive(d) for d in shape[1:])
        and (shape[0] == "batch" or positive(shape[0]))
    ):
        raise ArtifactError(
            f"{mp}: io.{side} {name} has shape {shape!r}, not [batch or N, ...] of rank {rank}; export again"
        )
    return TensorSpec(name, dtype, tuple(shape[1:])), shape[0]


def read_artifact(folder: str | Path, *, want_plan: bool = False) -> ServedArtifact:
    """Read and check the export directory `folder`; with `want_plan`, also its TensorRT engine."""
    d = Path(folder)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not a directory; pass the output directory of `slab-deploy export`")
    mp = d / MANIFEST_NAME
    if not mp.is_file():
        raise ArtifactError(f"{d} has no manifest.json; pass the output directory of `slab-deploy export`")
    m = _read_json(mp, "manifest")
    if m.get("status") != "ok":
        raise ArtifactError(
            f"{mp} records status {m.get('status')!r}: a failed export is not served; "
            "export again until it passes"
        )
    model = m.get("model")
    if not isinstance(model, str) or not model:
        raise ArtifactError(f"{mp} names no model; export again")
    if m.get("onnx") != ONNX_NAME:
        raise ArtifactError(f"{mp} names the graph {m.get('onnx')!r}, not {ONNX_NAME}; export again")
    prec = m.get("precision")
    precision = prec.get("mode") if isinstance(prec, dict) else None
    if precision not in ("fp32", "fp16", "int8"):  # an int8 Q/DQ graph takes and gives float32, as fp32
        raise ArtifactError(f"{mp}: precision mode {precision!r} is not fp32, fp16 or int8; export again")
    if want_plan:  # a TensorRT engine: a uint8-activation INT8 export never has one (build refuses it)
        from slab_deploy.export.quantize import require_tensorrt_form

        require_tensorrt_form(m, "--flavour tensorrt")
    inp, in_batch = _tensor(m, mp, "inputs", 4)
    out, out_batch = _tensor(m, mp, "outputs", 2)
    if in_batch != out_batch:
        raise ArtifactError(
            f"{mp}: the input's batch {in_batch!r} and the output's {out_batch!r} differ; export again"
        )
    static_batch = None if in_batch == "batch" else int(in_batch)
    onnx = d / ONNX_NAME
    if not onnx.is_file() or onnx.stat().st_size == 0:
        raise ArtifactError(f"{onnx} is missing or empty; export again")
    files = m.get("files")
    entry = files.get(ONNX_NAME) if isinstance(files, dict) else None
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(recorded, str):
        raise ArtifactError(
            f"{mp} records no sha256 of {ONNX_NAME}, so the graph cannot be told from another; export again"
        )
    digest = sha256_file(onnx)
    if digest != recorded:
        raise ArtifactError(
            f"{onnx} is not the graph the manifest records (sha256 {digest[:12]}..., manifest "
            f"{recorded[:12]}...): the folder was changed after export; export again"
        )
    art = ServedArtifact(d, mp, model, precision, static_batch, inp, out, onnx, digest)
    return _with_plan(art) if want_plan else art


def _with_plan(art: ServedArtifact) -> ServedArtifact:
    """The engine `model.plan` and its `engine.json` (both required), checked against the graph."""
    plan, info_path = art.folder / PLAN_NAME, art.folder / ENGINE_INFO_NAME
    if not plan.is_file() or plan.stat().st_size == 0:
        raise ArtifactError(
            f"{art.folder} holds no TensorRT engine {PLAN_NAME}: build one from {ONNX_NAME} "
            "first, or write the repository with --flavour onnxruntime"
        )
    if not info_path.is_file():
        raise ArtifactError(
            f"{plan} has no {ENGINE_INFO_NAME} beside it, so what it was built from is unknown; "
            "build the engine again with slab-deploy"
        )
    info = _read_json(info_path, "engine record")
    # the record `slab-deploy build` writes (runtime/engine_record.py): onnx.sha256, plan.sha256
    onnx_entry, plan_entry = info.get("onnx"), info.get("plan")
    built_from = onnx_entry.get("sha256") if isinstance(onnx_entry, dict) else None
    recorded = plan_entry.get("sha256") if isinstance(plan_entry, dict) else None
    if not isinstance(built_from, str) or not isinstance(recorded, str):
        raise ArtifactError(
            f"{info_path} records no onnx.sha256 and plan.sha256, so the engine cannot be vouched "
            "for; build the engine again with `slab-deploy build`"
        )
    if built_from != art.onnx_sha256:
        raise ArtifactError(
            f"{plan} was built from another graph ({ENGINE_INFO_NAME} onnx.sha256 "
            f"{built_from[:12]}..., {ONNX_NAME} {art.onnx_sha256[:12]}...); build it again"
        )
    if recorded != sha256_file(plan):
        raise ArtifactError(
            f"{plan} is not the engine {ENGINE_INFO_NAME} records (sha256 differs); build it again"
        )
    return ServedArtifact(
        art.folder,
        art.manifest_path,
        art.model,
        art.precision,
        art.static_batch,
        art.input,
        art.output,
        art.onnx,
        art.onnx_sha256,
        plan,
        info,
        engine_max_batch(info, info_path),
    )


def engine_max_batch(info: dict[str, Any], path: Path) -> int | None:
    """The largest batch of the engine's optimisation profile, from `max_batch` or `profile.max[0]`
    of engine.json; None when it says neither."""
    value: Any = info.get("max_batch")
    if value is None and isinstance(info.get("profile"), dict):
        top = info["profile"].get("max")
        value = top[0] if isinstance(top, list) and top else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArtifactError(
            f"{path}: the engine's largest batch {value!r} is not a positive whole number; "
            "build the engine again"
        )
    return value
