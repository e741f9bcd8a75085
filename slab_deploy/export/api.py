"""`export`: checkpoint -> folded model -> ONNX (fp32 or fp16) -> simplified -> parity-checked, with a manifest.

An export is a transaction on its output directory DIR: the options are checked first (values,
the image size against the model, a memory estimate), then DIR is locked, the whole artefact set
is built in a hidden sibling and swapped in only when every gate passed. A failed set goes to
DIR.failed (DIR untouched); an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from slab_deploy import __version__
from slab_deploy.choices import EXPORT_PRECISIONS, EXPORTERS, SIMPLIFIERS, SLA_POLICIES
from slab_deploy.errors import (
    ArtifactError,
    ExportError,
    ExportLintError,
    ExportParityError,
    UnsupportedInputError,
)
from slab_deploy.export.onnx_export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    ImageModel,
    exporter_plan,
    file_opset,
    onnx_from_torch,
)
from slab_deploy.export.onnx_passes import get_metadata, lint, op_counts, set_metadata, simplify
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import tolerance_for
from slab_deploy.utils import available_memory, make_staging, recover_swap, sha256_file, swap_in

PRECISIONS = EXPORT_PRECISIONS
ONNX_NAME = "model.onnx"
MANIFEST_NAME = "manifest.json"
UNSIMPLIFIED_NAME = "model.unsimplified.onnx"  # kept beside model.onnx so `check` can tell exporter from simplifier faults
FAILED_ONNX_NAME = "model.parity-failed.onnx"  # the deployed graph of a failed set (in DIR.failed)
# What an export directory may hold: anything else is the user's, and such a directory is never
# replaced (earlier releases also left `.NAME.*.partial` files of interrupted writes).
ARTIFACT_NAMES = frozenset({ONNX_NAME, MANIFEST_NAME, UNSIMPLIFIED_NAME, FAILED_ONNX_NAME})
LOCK_TIMEOUT_S = 0.5
MAX_IMG_SIZE = 16384
# Memory of an export, from measured peak resident memory of `slab-deploy export --batch 1` and
# `--batch 32` (2-core CPU, torch 2.13, onnxruntime 1.32): slab_swin_tiny 1.66 / 4.00 GB, slab_deit_tiny
# 0.79 / 1.08 GB, slab_pvt_tiny 1.09 / 3.05 GB, i.e. 75, 9 and 63 MB per image, against 4.8, 0.6 and
# 6.4 MB for the largest activation of one image (counted on the meta device): per image about 16x
# the largest activation, plus about 0.6 GB and 8 copies of the fp32 weights (the reference, folded
# and deployed models, the ONNX protos and their serialisations).
MEMORY_BASE_BYTES = 600 * 2**20
MEMORY_WEIGHT_COPIES = 8
MEMORY_ACTIVATION_FACTOR = 16


@dataclass
class ExportOptions:
    batch: int | None = None  # None: dynamic batch
    opset: int = DEFAULT_OPSET
    precision: str = "fp32"
    simplifier: str = "auto"
    exporter: str = "auto"
    parity_batch: int = 3
    seed: int = 0
    img_size: int | None = None
    fold: bool = True  # False exports the checkpoint model as is (for unfolded benchmarks)
    sla_policy: str = "fp32"  # fp16 only: SLA's half-precision policy (fp32 island or mixed; see SLACore)

    def validate(self, model_name: str | None = None) -> Footprint | None:
        """Refuse bad values before any work: every option's type and range, the opset against
        the exporter, the simplifier's availability; with `model_name`, also whether the image
        size fits the model and whether the export fits in memory (see `estimate_footprint`)."""
        _whole("--batch", self.batch, allow_none=True)
        _whole("--img-size", self.img_size, allow_none=True, maximum=MAX_IMG_SIZE)
        _whole("--opset", self.opset)
        _whole("parity_batch", self.parity_batch)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UnsupportedInputError(f"--seed must be a whole number, not {self.seed!r}")
        _choice("--precision", self.precision, PRECISIONS, "unsupported precision")
        _choice("--sla-policy", self.sla_policy, SLA_POLICIES)
        _choice("--simplifier", self.simplifier, SIMPLIFIERS)
        _choice("--exporter", self.exporter, EXPORTERS)
        exporter_plan(self.exporter, self.opset)
        if self.simplifier in ("onnxsim", "onnxslim"):
            from slab_deploy._deps import available, require

            if not available(self.simplifier):
                require(self.simplifier, f"--simplifier {self.simplifier}")  # raises with the install line
        return estimate_footprint(model_name, self) if model_name is not None else None


def _whole(flag: str, value: Any, *, allow_none: bool = False, maximum: int | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedInputError(f"{flag} must be a whole number >= 1, not {value!r}")
    if maximum is not None and value > maximum:
        raise UnsupportedInputError(f"{flag} must be at most {maximum}, not {value}")


def _choice(flag: str, value: Any, choices: tuple[str, ...], what: str = "") -> None:
    if value not in choices:
        raise UnsupportedInputError(f"{what or 'unsupported ' + flag} {value!r}; use one of {', '.join(choices)}")


@dataclass
class Footprint:
    """What an export is expected to need, from the model built on the meta device (no memory)."""

    model: str
    img_size: tuple[int, int]
    images: int  # the most images one step holds (parity batch, or the static batch)
    weight_bytes: int
    activation_bytes: int  # largest single activation of one image
    needed_bytes: int
    available_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class _LargestTensor:
    """Torch-function mode that records the largest tensor any torch call returns."""

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        largest = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        largest.bytes = max(largest.bytes, t.numel() * t.element_size())
                return out

        self.bytes = 0
        self.mode = Mode()


def _gb(n: float) -> str:
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KB"


def estimate_footprint(model_name: str, opts: ExportOptions) -> Footprint:
    """Build `model_name` at the requested image size on the meta device (no memory, no weights),
    run one image through it to find the largest activation, and refuse an export that cannot fit
    in the memory available (see MEMORY_* above for the measured model). An image size the model
    cannot be built at is refused here, naming the image size."""
    from slab_deploy.models import get_spec
    from slab_deploy.models.registry import build_model

    spec = get_spec(model_name)
    kwargs = {} if opts.img_size is None else {"img_size": opts.img_size}
    size: tuple[int, int] = (spec.input_size[1], spec.input_size[2])
    if opts.img_size is not None:
        size = (opts.img_size, opts.img_size)
    largest = _LargestTensor()
    try:
        with torch.device("meta"):
            model = build_model(model_name, **kwargs)
            got = getattr(model, "img_size", size)
            size = (int(got[0]), int(got[1])) if isinstance(got, (tuple, list)) else (int(got), int(got))
            with torch.no_grad(), largest.mode:
                model(torch.empty(1, 3, *size))
    except UnsupportedInputError as exc:
        if opts.img_size is None:
            raise
        raise UnsupportedInputError(f"--img-size {opts.img_size} does not fit {model_name} ({exc})") from None
    weights = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    images = opts.batch or max(opts.parity_batch, 2)
    # the input images themselves count even where the model's largest activation is smaller
    per_image = MEMORY_ACTIVATION_FACTOR * max(largest.bytes, 3 * size[0] * size[1] * 4)
    needed = MEMORY_BASE_BYTES + MEMORY_WEIGHT_COPIES * weights + images * per_image
    fp = Footprint(model_name, size, images, weights, largest.bytes, needed, available_memory())
    if fp.available_bytes is not None and needed > fp.available_bytes:
        culprit = "--batch" if opts.batch is not None and opts.batch > max(opts.parity_batch, 2) else "--img-size"
        hint = f"use a smaller {culprit}" + (" or --dynamic-batch (the graph then takes any batch)" if culprit == "--batch" else "")
        what = f"batch {images}" + (f" at {size[0]}x{size[1]} px" if opts.img_size is not None else "")
        raise UnsupportedInputError(
            f"exporting {model_name} at {what} needs about {_gb(needed)} of memory "
            f"(about {_gb(per_image)} per image), and {_gb(fp.available_bytes)} is available: {hint}"
        )
    return fp


@dataclass
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    passed: bool
    steps: dict[str, float] = field(default_factory=dict)


def tool_versions() -> dict[str, str | None]:
    from slab_deploy._deps import module_version, version_of

    return {
        "slab-deploy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": module_version("onnxruntime"),
        "onnxscript": version_of("onnxscript"),
        "onnxsim": version_of("onnxsim"),
        "onnxslim": version_of("onnxslim"),
    }


def prepare_precision(model: nn.Module, precision: str, sla_policy: str = "fp32") -> nn.Module:
    """Wrap for deployment. fp16: half weights and activations, fp32 images in and logits out, and
    SLA's normaliser (and, with policy fp32, its k^T v product) in fp32: see `SLACore`."""
    from slab_deploy.models.layers import set_sla_policy

    if precision == "fp32":
        return ImageModel(model, torch.float32)
    if precision == "fp16":
        model = model.half()
        set_sla_policy(model, sla_policy)
        return ImageModel(model, torch.float16)
    raise UnsupportedInputError(f"unsupported precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def preprocessing(model: nn.Module) -> dict[str, Any]:
    from slab_deploy.models import model_spec

    spec = model_spec(model)
    size = getattr(model, "img_size", spec.input_size[1])
    size = list(size) if isinstance(size, (tuple, list)) else [size, size]
    return {
        "input_size": [3, *size],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct,
        "resize_shorter_to": int(round(size[0] / spec.crop_pct)),
        "layout": "NCHW, RGB, float32 in [0,1] then (x - mean) / std",
    }


class ExportTarget:
    """The output directory of one export, as a transaction.

    Entering takes the lock `.NAME.lock` beside DIR (a lock inside DIR would be swapped away),
    repairs what an interrupted earlier export left, checks that DIR may be written and makes an
    empty hidden staging directory beside it. `commit()` swaps the staging directory in as DIR
    whole; `divert()` moves it to the side folder DIR.failed instead; leaving without either
    removes it. DIR itself is only ever replaced whole, and only when it is absent, empty, or an
    earlier export (only `ARTIFACT_NAMES`) and `force` is given: a directory with anything else in
    it is the user's and is refused, `--force` or not.
    """

    def __init__(self, out_dir: str | Path, *, force: bool = False, lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        self.out_dir = Path(out_dir)
        path = Path(os.path.abspath(self.out_dir))
        self.target = path.resolve() if path.is_symlink() else path
        if not self.target.name:
            raise ArtifactError(f"--output {out_dir} is a filesystem root; pass a directory below it")
        self.force = force
        self.lock_path = self.target.parent / f".{self.target.name}.lock"
        self.lock_timeout = lock_timeout
        self.staging: Path | None = None
        self.existed = False  # whether DIR was there when the export began (after any repair)
        self.recovered = ""
        self._lock: Any = None

    def __enter__(self) -> ExportTarget:
        from filelock import FileLock, Timeout

        if os.path.lexists(self.target) and not self.target.is_dir():
            raise ArtifactError(f"--output {self.out_dir} is a file; pass a directory")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.lock_path), timeout=self.lock_timeout)
            self._lock.acquire()
        except Timeout:
            raise ArtifactError(
                f"{self.out_dir} is being written by another export (lock {self.lock_path}); "
                "wait for it to finish or choose another --output"
            ) from None
        except OSError as exc:
            raise ArtifactError(f"cannot write beside {self.out_dir}: {exc.strerror or exc}") from None
        try:
            self.recovered = recover_swap(self.target)
            self.existed = self.target.is_dir()
            self._check_replaceable()
            self.staging = make_staging(self.target)
        except OSError as exc:
            self._lock.release()
            raise ArtifactError(f"cannot prepare --output {self.out_dir}: {exc.strerror or exc}") from None
        except BaseException:
            self._lock.release()
            raise
        return self

    def _check_replaceable(self) -> None:
        if not self.target.is_dir():
            return
        entries = sorted(p.name for p in self.target.iterdir())
        foreign = [n for n in entries if n not in ARTIFACT_NAMES and not (n.startswith(".") and n.endswith(".partial"))]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ArtifactError(
                f"--output {self.out_dir} holds files that are not export artefacts ({shown}); an export "
                "replaces its directory whole, so it will not write there: choose another --output"
            )
        if entries and not self.force:
            raise ArtifactError(f"{self.out_dir} holds an earlier export; pass --force to replace it or choose another --output")

    def commit(self) -> None:
        """Swap the staging directory in as DIR (the previous DIR, if any, is removed)."""
        assert self.staging is not None
        try:
            swap_in(self.staging, self.target)
        finally:
            if not self.staging.exists():
                self.staging = None

    def divert(self) -> Path:
        """Move the staging directory to the side folder DIR.failed (replacing an earlier failed
        set there; a DIR.failed holding anything else is left alone and a dated name is used)."""
        assert self.staging is not None
        failed = self.target.with_name(self.target.name + ".failed")
        if failed.is_dir() and {p.name for p in failed.iterdir()} <= ARTIFACT_NAMES:
            shutil.rmtree(failed)
        elif os.path.lexists(failed):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            failed = self.target.with_name(f"{self.target.name}.failed-{stamp}")
            n = 1
            while os.path.lexists(failed):
                n += 1
                failed = self.target.with_name(f"{self.target.name}.failed-{stamp}-{n}")
        os.rename(self.staging, failed)
        self.staging = None
        return self.failed_display(failed)

    def failed_display(self, failed: Path) -> Path:
        """`failed` spelt like the user's --output (relative stays relative)."""
        if self.out_dir.is_absolute() or self.target != Path(os.path.abspath(self.out_dir)):
            return failed
        return Path(os.path.relpath(failed))

    def __exit__(self, *exc: object) -> None:
        try:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
        finally:
            self._lock.release()


def export_model(
    model_name: str,
    checkpoint: str | Path | None,
    output_dir: str | Path | None,
    options: ExportOptions | None = None,
    *,
    force: bool = False,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    keep_unsimplified: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Fold, export, simplify and parity-check `model_name`; writes DIR/model.onnx and DIR/manifest.json.

    Options are validated and the export's memory estimated before anything is read or written.
    The artefacts are built beside DIR and replace it whole only when every gate passed
    (`ExportTarget`); `force` allows replacing an earlier export. Raises ExportParityError (a
    ParityError, exit 3) when the deployed graph does not match the checkpoint model and
    ExportLintError when norm nodes are left: DIR is then untouched and the failed set is in
    `err.failed_dir` (DIR.failed).
    """
    opts = options or ExportOptions()
    say = progress or (lambda _s: None)
    out_dir = Path(output_dir) if output_dir is not None else Path(model_name)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--output {out_dir} is a file; pass a directory")
    opts.validate(model_name)
    with ExportTarget(out_dir, force=force) as target:
        return _export_into(target, model_name, checkpoint, opts, say, ema=ema,
                            allow_unfinished_prepbn=allow_unfinished_prepbn, keep_unsimplified=keep_unsimplified)


def _export_into(
    target: ExportTarget, model_name: str, checkpoint: str | Path | None, opts: ExportOptions,
    say: Callable[[str], None], *, ema: bool, allow_unfinished_prepbn: bool, keep_unsimplified: bool,
) -> ExportResult:
    """The export proper, writing into `target.staging`; commits or diverts `target` at the end."""
    from slab_deploy.models import checkpoint_info, model_spec
    from slab_deploy.passes import fold_model
    from slab_deploy.weights import load_model

    assert target.staging is not None
    stage = target.staging
    steps: dict[str, float] = {}
    t = time.perf_counter()

    say("loading checkpoint")
    ref = load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn, img_size=opts.img_size)
    info = checkpoint_info(ref)
    steps["load"] = time.perf_counter() - t

    t = time.perf_counter()
    say("folding norms")
    folded, report = fold_model(ref, verify=opts.fold) if opts.fold else _unfolded(ref)
    steps["fold"] = time.perf_counter() - t

    pre = preprocessing(ref)
    g = torch.Generator().manual_seed(opts.seed)
    pbatch = opts.batch or opts.parity_batch
    inputs = torch.randn(pbatch, *pre["input_size"], generator=g)
    with torch.no_grad():
        reference = ref(inputs).float().numpy()

    t = time.perf_counter()
    say(f"exporting ONNX ({opts.precision})")
    deploy = prepare_precision(folded, opts.precision, opts.sla_policy)
    example = torch.randn(opts.batch or 2, *pre["input_size"], generator=g)
    with torch.no_grad():
        deploy(example)  # one eager call settles shape-derived choices (e.g. SLA's product order) before tracing
    scratch = stage / ".exporter-output.onnx"
    exp = onnx_from_torch(deploy, scratch, example, opset=opts.opset, dynamic_batch=opts.batch is None, exporter=opts.exporter)
    raw = exp.model if exp.model is not None else onnx.load(str(scratch))
    scratch.unlink()
    steps["export"] = time.perf_counter() - t
    try:
        onnx.checker.check_model(raw)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {str(exc).splitlines()[0]}") from None

    x_np = inputs.numpy()
    fp16 = opts.precision == "fp16"
    tol_onnx = tolerance_for("onnx", opts.precision)
    t = time.perf_counter()
    say("checking ONNX Runtime parity (unsimplified)")
    parity: dict[str, Any] = {}
    rung_raw = _ort_parity(raw, x_np, reference, tol_onnx)
    parity["onnx"] = rung_raw

    say("simplifying")
    simp_tol = tolerance_for("simplified", opts.precision)
    if fp16 and rung_raw.get("skipped"):
        sres = simplify(raw, "none", x_np, tolerance=simp_tol)  # cannot re-check fp16 on this host's ORT
        sres.note = "skipped: ONNX Runtime on this host cannot run the fp16 graph to re-check a simplifier"
    else:
        sres = simplify(raw, opts.simplifier, x_np, tolerance=simp_tol)
    final = sres.model
    steps["simplify"] = sres.seconds
    say("checking ONNX Runtime parity (deployed graph)")
    parity["ort_cpu"] = _ort_parity(final, x_np, reference, tolerance_for("ort_cpu", opts.precision))
    steps["parity"] = time.perf_counter() - t - sres.seconds

    if file_opset(final) != exp.opset:
        raise ExportError(
            f"the {sres.simplifier} simplifier changed the graph's opset from {exp.opset} to {file_opset(final)}; "
            "pass --simplifier none or another simplifier"
        )
    lint_res = lint(final)
    meta = {
        "slab_deploy.version": __version__,
        "slab_deploy.model": model_name,
        "slab_deploy.precision": opts.precision,
        "slab_deploy.preprocessing": json.dumps(pre),
        "slab_deploy.checkpoint_sha256": info.sha256 if info else "",
        "slab_deploy.untrained": str(bool(getattr(ref, "untrained", False))).lower(),
    }
    set_metadata(final, meta)
    final.doc_string = f"{model_name} exported by slab-deploy {__version__} ({opts.precision}, folded)"

    passed = all(r.get("passed", True) for r in parity.values())
    spec = model_spec(ref)
    norm_ok = lint_res.norm_free or not spec.is_slab or report.kept > 0 or not opts.fold
    status = "ok" if passed else "parity-failed"
    manifest = {
        "status": status,
        "model": model_name,
        "family": spec.family,
        "norm": spec.norm,
        "attention": list(spec.attention),
        "untrained": bool(getattr(ref, "untrained", False)),
        "opset": file_opset(final),  # as read from the deployed graph (default domain)
        "checkpoint": {
            "path": info.path if info else None,
            "sha256": info.sha256 if info else None,
            "format": info.format if info else None,
            "entry": info.entry if info else None,
            "ema": ema,
            "layout": info.layout if info else None,
            "remapped": info.remapped if info else "",
        },
        "fold": report.to_dict(),
        "export": {
            "exporter": exp.exporter,
            "fallback_reason": exp.fallback_reason,
            "opset": exp.opset,
            "dynamic_batch": exp.dynamic_batch,
            "batch": opts.batch,
            "seconds": round(exp.seconds, 3),
        },
        "simplify": {
            "requested": opts.simplifier,
            "used": sres.simplifier,
            "accepted": sres.accepted,
            "note": sres.note,
            "seconds": round(sres.seconds, 3),
            "nodes_before": sres.nodes_before,
            "nodes_after": sres.nodes_after,
            "max_abs_delta_vs_unsimplified": sres.max_abs_delta,
            "ops_before": sres.ops_before,
            "ops_after": op_counts(final),
        },
        "lint": lint_res.to_dict(),
        "precision": {
            "mode": opts.precision,
            "io": "float32 images in, float32 logits out",
            "sla_policy": opts.sla_policy if fp16 else "native",
            "fp32_islands": (
                "SLA normaliser, reciprocal and k^T v product (policy fp32); FLatten focused kernel" if opts.sla_policy == "fp32"
                else "SLA token mean of k, normaliser and reciprocal, final scaling (policy mixed; matmuls fp16 with fp32 accumulation); FLatten focused kernel"
            ) if fp16 else "",
        },
        "io": {
            "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch" if opts.batch is None else opts.batch, *pre["input_size"]]}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch" if opts.batch is None else opts.batch, spec.num_classes if info is None or info.num_classes is None else info.num_classes]}],
        },
        "preprocessing": pre,
        "parity": {"seed": opts.seed, "batch": pbatch, "reference": "checkpoint model (unfolded), torch fp32 eval", **parity},
        "norm_free": lint_res.norm_free,
        "steps_seconds": {k: round(v, 3) for k, v in steps.items()},
        "versions": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not norm_ok:
        manifest["status"] = status = "lint-failed"
    files: dict[str, dict[str, Any]] = {}
    if keep_unsimplified:
        set_metadata(raw, {**meta, "slab_deploy.stage": "unsimplified"})
        onnx.save(raw, str(stage / UNSIMPLIFIED_NAME))
        manifest["unsimplified_onnx"] = UNSIMPLIFIED_NAME
        files[UNSIMPLIFIED_NAME] = _file_entry(stage / UNSIMPLIFIED_NAME)
    onnx_name = ONNX_NAME if status == "ok" else FAILED_ONNX_NAME
    onnx.save(final, str(stage / onnx_name))
    files[onnx_name] = _file_entry(stage / onnx_name)
    manifest["onnx"] = onnx_name
    manifest["files"] = files
    (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    if status == "ok":
        assert get_metadata(final)["slab_deploy.model"] == model_name
        target.commit()
        return ExportResult(target.out_dir / ONNX_NAME, target.out_dir / MANIFEST_NAME, manifest, True, steps)
    failed = target.divert()
    kept = f"{target.out_dir} {'is unchanged' if target.existed else 'was not created'}; the failed artefacts are in {failed}"
    if status == "lint-failed":
        raise ExportLintError(
            f"the folded {model_name} graph still has norm nodes {lint_res.norm_nodes} or statistic reductions; {kept}",
            failed,
        )
    first = next(k for k, r in parity.items() if not r.get("passed", True))
    raise ExportParityError(
        f"exported graph does not match the checkpoint model at rung '{first}' "
        f"({'; '.join(parity[first]['failures'])}); {kept}",
        failed,
    )


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _unfolded(model: nn.Module) -> tuple[nn.Module, Any]:
    """The checkpoint model as is, with an empty fold report (norms listed as not folded)."""
    import copy

    from slab_deploy.passes.fold import FoldReport, NormFold, norm_kinds

    kinds = norm_kinds(model)
    n = sum(p.numel() for p in model.parameters())
    rep = FoldReport(
        getattr(model.spec, "name", "?"),
        [NormFold(k, kind, c, "kept-layernorm" if kind == "layernorm" else "kept-affine", reason="fold disabled (--no-fold)") for k, (kind, c) in kinds.items()],
        n, n, [], 0.0, 0.0, 0.0, 0.0,
    )
    return copy.deepcopy(model), rep


def _ort_parity(model: onnx.ModelProto, x: np.ndarray, reference: np.ndarray, tol: Any) -> dict[str, Any]:
    from slab_deploy.runtime.ort import run_onnx

    try:
        got = run_onnx(model, x)
    except Exception as exc:
        text = str(exc)
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            return {"skipped": True, "passed": True, "reason": f"ONNX Runtime CPU cannot run this graph: {text.splitlines()[0][:200]}"}
        raise ExportError(f"ONNX Runtime could not run the exported graph: {text.splitlines()[0][:300]}") from None
    m = compare(reference, got)
    v = judge(m, tol)
    out = {"passed": v.passed, "failures": v.failures, "tolerance": tol.to_dict(), **m.to_dict()}
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        out["note"] = (
            "ONNX Runtime's CPU provider runs most fp16 nodes through fp32 kernels (it inserts casts), so this "
            "rung checks the fp16 weights, not fp16 arithmetic: verify on a GPU with "
            "`slab-deploy check --backends ort-cuda`"
        )
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
