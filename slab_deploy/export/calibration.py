"""The images INT8 calibration sees, and the images the INT8 parity rung is judged on.

`--calibration DIR` reads a folder through `slab_deploy.datasets.image_folder` (the model's own
preprocessing); the demo models default to the held-out digits that ship with them
(`datasets.demo_heldout`). Any other model without a folder is refused: scales calibrated on random
normal images say nothing about real inputs. Only `bench` asks for seeded random images
(`ExportOptions.random_calibration`), for latency alone, and every record of such an artefact says so.

The images read are split by a seeded permutation: the first `calibration_samples` calibrate, up to
`PARITY_IMAGES` of the others judge the quantised graph, so the export's INT8 parity is measured on
in-distribution images the scales were not fitted to (on the calibration images themselves only when
the folder holds no others, and then the manifest says so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.errors import ConfigError

DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_RANDOM_CALIBRATION_SAMPLES = 8  # latency-only artefacts: the count changes no timing
MAX_CALIBRATION_SAMPLES = 1024  # 1024 images of 3x224x224 float32 are 0.6 GB, read at once
PARITY_IMAGES = 64
INT8_PARITY_FEED = 8  # images per run of the INT8 parity rung (and of its torch reference): bounded memory
RANDOM_LABEL = "seeded random normal images: INT8 scales for LATENCY ONLY, meaningless for accuracy"


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images, the images the INT8 parity rung runs on, and where both came from."""

    images: np.ndarray  # (N, 3, H, W) float32, preprocessed
    parity: np.ndarray  # (P, 3, H, W) float32
    kind: str  # "demo-heldout" | "folder" | "random"
    source: str
    names: list[str] = field(default_factory=list)
    parity_source: str = ""

    @property
    def latency_only(self) -> bool:
        return self.kind == "random"

    @property
    def sha256(self) -> str:
        """sha256 of the preprocessed calibration images (float32, NCHW, in the order they were fed)."""
        return hashlib.sha256(np.ascontiguousarray(self.images, dtype=np.float32).tobytes()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "count": int(self.images.shape[0]),
            "sha256": self.sha256,
            "latency_only": self.latency_only,
            "first_images": self.names[:8],
            "parity_images": int(self.parity.shape[0]),
            "parity_source": self.parity_source,
        }


def requested_samples(opts: Any) -> int | None:
    """`--calibration-samples`, checked: a whole number in 1..MAX_CALIBRATION_SAMPLES, or None."""
    n = opts.calibration_samples
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CALIBRATION_SAMPLES:
        raise ConfigError(f"--calibration-samples must be between 1 and {MAX_CALIBRATION_SAMPLES}, not {n!r}")
    return n


def check_source(model_name: str, opts: Any) -> None:
    """Refuse, before any work, an INT8 export that has no images to calibrate on, or fewer than
    --calibration-samples asks for (files are counted, not read)."""
    from slab_deploy.datasets import IMAGE_SUFFIXES, demo_models, is_demo_model

    if opts.random_calibration:
        if opts.calibration is not None:
            raise ConfigError("random calibration (latency only) and --calibration exclude each other")
        return
    wanted = requested_samples(opts)
    if opts.calibration is not None:
        folder = Path(opts.calibration)
        if not folder.is_dir():
            raise ConfigError(
                f"--calibration {folder} is not a directory of images (or of one folder per class)"
            )
        if wanted is not None:
            subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
            held = sum(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       for d in [folder, *subdirs] for p in d.iterdir())
            if held < wanted:
                raise ConfigError(
                    f"--calibration-samples {wanted}, but {folder} holds {held} images; pass at most {held}"
                )
        return
    if not is_demo_model(model_name):
        raise ConfigError(
            f"--precision int8 needs calibration images for {model_name}: pass --calibration DIR "
            "(a folder of real input images; random images give meaningless INT8 scales)"
        )
    held = int(demo_models()[model_name]["heldout_count"])
    if wanted is not None and wanted > held:
        raise ConfigError(
            f"--calibration-samples {wanted}, but the held-out digits shipped with {model_name} are {held} "
            f"images; pass at most {held} (or --calibration DIR)"
        )


def calibration_set(
    model_name: str, opts: Any, preprocessing: dict[str, Any], *, num_classes: int | None = None
) -> CalibrationSet:
    """The calibration and INT8-parity images of an export (see the module docstring)."""
    from slab_deploy.datasets import demo_heldout, image_folder

    wanted = requested_samples(opts)
    size = preprocessing["input_size"]
    if opts.random_calibration:
        n = wanted or DEFAULT_RANDOM_CALIBRATION_SAMPLES
        rng = np.random.default_rng(opts.seed)
        x = rng.standard_normal((n + PARITY_IMAGES, *size), dtype=np.float32)
        return CalibrationSet(
            x[:n],
            x[n:],
            "random",
            RANDOM_LABEL,
            [f"random-{i}" for i in range(n)],
            "seeded random normal images (not the calibration images)",
        )
    if opts.calibration is not None:
        limit = (
            wanted or DEFAULT_CALIBRATION_SAMPLES
        ) + PARITY_IMAGES  # never the whole folder: memory stays bounded
        data = image_folder(
            opts.calibration, preprocessing, limit=limit, option="--calibration", num_classes=num_classes
        )
        kind = "folder"
    else:
        data = demo_heldout(model_name, preprocessing)
        kind = "demo-heldout"
    total = len(data)
    if wanted is not None and wanted > total:
        raise ConfigError(
            f"--calibration-samples {wanted}, but {data.source} holds {total} images; pass at most {total}"
        )
    n = min(wanted or DEFAULT_CALIBRATION_SAMPLES, total)
    order = np.random.default_rng(opts.seed).permutation(total)
    calib, rest = order[:n], order[n : n + PARITY_IMAGES]
    if rest.size:
        parity, parity_source = data.x[rest], f"{rest.size} images of {data.source} not used for calibration"
    else:
        parity, parity_source = (
            data.x[calib[:PARITY_IMAGES]],
            f"the calibration images ({data.source} holds no others)",
        )
    return CalibrationSet(
        np.ascontiguousarray(data.x[calib]),
        np.ascontiguousarray(parity),
        kind,
        data.source,
        [data.names[i] for i in calib],
        parity_source,
    )


def chunks(images: np.ndarray, size: int, static_batch: int | None) -> list[np.ndarray]:
    """The calibration images in feeds of `size` (the static batch where the graph has one: the
    last feed then wraps around to the first images, which leaves min/max ranges unchanged)."""
    if static_batch is not None:
        total = -(-images.shape[0] // static_batch) * static_batch
        padded = images[np.arange(total) % images.shape[0]]
        return [padded[i : i + static_batch] for i in range(0, total, static_batch)]
    return [images[i : i + size] for i in range(0, images.shape[0], size)]
