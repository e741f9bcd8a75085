"""Export options: their values checked up front (`ExportOptions.validate`), and the memory an
export will need, estimated on the meta device before anything is read or written (`estimate_footprint`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slab_deploy.choices import (
    ACTIVATION_TYPES,
    CALIBRATION_METHODS,
    DEFAULT_SLA_POLICY,
    EXPORT_PRECISIONS,
    EXPORTERS,
    SIMPLIFIERS,
    SLA_POLICIES,
)
from slab_deploy.errors import UnsupportedInputError
from slab_deploy.export.onnx_export import DEFAULT_OPSET, exporter_plan
from slab_deploy.utils import available_memory

PRECISIONS = EXPORT_PRECISIONS
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
    sla_policy: str = DEFAULT_SLA_POLICY  # fp16 only: SLA's half-precision policy (mixed or fp32; SLACore)
    # int8 only (None: not given; see export/calibration.py and export/quantize.py)
    calibration: str | Path | None = None  # image folder (the demo models default to their held-out set)
    calibration_samples: int | None = None
    calibration_method: str | None = None  # minmax (default), entropy or percentile
    per_channel: bool | None = None  # per-output-channel weight scales (default) or one per tensor
    activation_type: str | None = None  # int8 (default: signed symmetric, TensorRT) or uint8 (CPU only)
    random_calibration: bool = False  # seeded random images: for latency only (bench), and labelled so

    @property
    def method(self) -> str:
        return self.calibration_method or "minmax"

    @property
    def channelwise(self) -> bool:
        return True if self.per_channel is None else self.per_channel

    @property
    def activations(self) -> str:
        return self.activation_type or "int8"

    def int8_key(self) -> dict[str, Any] | None:
        """What an INT8 artefact depends on beyond the model (None for other precisions): bench keys
        its cache by it."""
        if self.precision != "int8":
            return None
        source = "random" if self.random_calibration else str(self.calibration or "demo-heldout")
        return {"method": self.method, "per_channel": self.channelwise, "activation_type": self.activations,
                "calibration": source,
                "calibration_samples": self.calibration_samples, "seed": self.seed}

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
        self._validate_int8(model_name)
        if self.simplifier in ("onnxsim", "onnxslim"):
            from slab_deploy._deps import available, require

            if not available(self.simplifier):
                require(self.simplifier, f"--simplifier {self.simplifier}")  # raises with the install line
        return estimate_footprint(model_name, self) if model_name is not None else None

    def _validate_int8(self, model_name: str | None) -> None:
        """INT8 options only with --precision int8; their values; a calibration source that exists."""
        flags = (("--calibration", self.calibration), ("--calibration-samples", self.calibration_samples),
                 ("--calibration-method", self.calibration_method),
                 ("--per-channel/--per-tensor", self.per_channel),
                 ("--activation-type", self.activation_type))
        given = [flag for flag, v in flags if v is not None]
        if self.precision != "int8":
            if given or self.random_calibration:
                what = given[0] if given else "random calibration"
                raise UnsupportedInputError(
                    f"{what} applies to --precision int8 only; drop it or pass --precision int8")
            return
        from slab_deploy._deps import require
        from slab_deploy.export.calibration import check_source, requested_samples

        if self.calibration_method is not None:
            _choice("--calibration-method", self.calibration_method, CALIBRATION_METHODS)
        if self.activation_type is not None:
            _choice("--activation-type", self.activation_type, ACTIVATION_TYPES)
        if self.per_channel is not None and not isinstance(self.per_channel, bool):
            raise UnsupportedInputError(f"per_channel must be true or false, not {self.per_channel!r}")
        if not self.fold:
            raise UnsupportedInputError(
                "--precision int8 quantises the folded graph; it cannot be combined with an unfolded export")
        requested_samples(self)
        require("onnxruntime", "--precision int8")
        if model_name is not None:
            check_source(model_name, self)

    @classmethod
    def from_text(cls, *, batch: str | None = None, dynamic_batch: bool = False,
                  opset: str = str(DEFAULT_OPSET), img_size: str | None = None,
                  calibration_samples: str | None = None, **rest: Any) -> ExportOptions:
        """Options as typed on a command line: whole numbers arrive as text, so garbage is one
        line naming the option (exit 1) like every bad value; `dynamic_batch` (the default
        anyway) excludes a static `batch`. The rest pass through; `validate` judges them all."""
        if batch is not None and dynamic_batch:
            raise UnsupportedInputError("--batch and --dynamic-batch exclude each other; pass one")
        opset_n = _parse_whole("--opset", opset)
        assert opset_n is not None
        return cls(batch=_parse_whole("--batch", batch), opset=opset_n,
                   img_size=_parse_whole("--img-size", img_size),
                   calibration_samples=_parse_whole("--calibration-samples", calibration_samples), **rest)


def _parse_whole(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.lstrip("+-").isdigit():
        raise UnsupportedInputError(f"{flag} must be a whole number, not {value!r}")
    return int(text)


def _whole(flag: str, value: Any, *, allow_none: bool = False, maximum: int | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedInputError(f"{flag} must be a whole number >= 1, not {value!r}")
    if maximum is not None and value > maximum:
        raise UnsupportedInputError(f"{flag} must be at most {maximum}, not {value}")


def _choice(flag: str, value: Any, choices: tuple[str, ...], what: str = "") -> None:
    if value not in choices:
        raise UnsupportedInputError(f"{what or 'unsupported ' + flag} {value!r}; "
                                    f"use one of {', '.join(choices)}")


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


def _calibration_bytes(opts: ExportOptions, size: tuple[int, int], largest: int) -> int:
    """INT8: the calibration and parity images held at once, and the tensors of one calibration feed."""
    from slab_deploy.export.calibration import DEFAULT_CALIBRATION_SAMPLES, PARITY_IMAGES
    from slab_deploy.export.quantize import CALIBRATION_TENSOR_FACTOR, feed_size

    n = (opts.calibration_samples or DEFAULT_CALIBRATION_SAMPLES) + PARITY_IMAGES
    feed = feed_size(largest, opts.batch) * CALIBRATION_TENSOR_FACTOR * largest
    return n * 3 * size[0] * size[1] * 4 + feed


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
    if opts.precision == "int8":
        from slab_deploy.export.calibration import INT8_PARITY_FEED

        images = max(images, INT8_PARITY_FEED)  # the INT8 parity rung runs its images in feeds of 8
    # the input images themselves count even where the model's largest activation is smaller
    per_image = MEMORY_ACTIVATION_FACTOR * max(largest.bytes, 3 * size[0] * size[1] * 4)
    needed = MEMORY_BASE_BYTES + MEMORY_WEIGHT_COPIES * weights + images * per_image
    if opts.precision == "int8":
        needed += _calibration_bytes(opts, size, largest.bytes)
    fp = Footprint(model_name, size, images, weights, largest.bytes, needed, available_memory())
    if fp.available_bytes is not None and needed > fp.available_bytes:
        culprit = ("--batch" if opts.batch is not None and opts.batch > max(opts.parity_batch, 2)
                   else "--img-size")
        hint = f"use a smaller {culprit}" + (" or --dynamic-batch (the graph then takes any batch)"
                                             if culprit == "--batch" else "")
        what = f"batch {images}" + (f" at {size[0]}x{size[1]} px" if opts.img_size is not None else "")
        raise UnsupportedInputError(
            f"exporting {model_name} at {what} needs about {_gb(needed)} of memory "
            f"(about {_gb(per_image)} per image), and {_gb(fp.available_bytes)} is available: {hint}"
        )
    return fp

