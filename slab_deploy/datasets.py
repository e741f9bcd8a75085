"""Labelled images: a folder of the user's images, or the held-out digits that ship with the demo
models. Every command that judges accuracy or re-estimates statistics reads images through here.

A folder holds either images directly (no labels) or one sub-folder per class (labels). Classes are
numbered as ImageNet-style tools number them: by the sorted folder names, unless every name is a
non-negative integer, which is then the label itself (`0/ 1/ ... 9/`, or `207/ 208/`). Images go
through the model's own preprocessing (the `preprocessing` block of an export manifest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_IMAGES = 50_000  # per folder read; more than any check or calibration needs
MAX_PIXELS = 64_000_000  # per image (PIL's own bomb limit is 89M, with a warning only)
DATA = Path(__file__).parent / "data"
DEMO_SUMMARY = DATA / "demo_models.json"


@dataclass(frozen=True)
class LabelledImages:
    """(N, 3, H, W) float32 preprocessed images; `labels` (N,) int64 or None; where they came from."""

    x: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    source: str
    classes: list[str] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def head(self, n: int | None) -> LabelledImages:
        """The first `n` images (all when `n` is None)."""
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return LabelledImages(self.x[:n], labels, self.names[:n], self.source, self.classes)


def normalise_uint8(images: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32: /255, then (x - mean) / std per channel."""
    mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return ((x - mean) / std).astype(np.float32)


def demo_models() -> dict[str, Any]:
    """The shipped demo models' record (`demo_models.json`: accuracy, files, sha256s)."""
    return dict(json.loads(DEMO_SUMMARY.read_text())["models"])


def is_demo_model(model_name: str) -> bool:
    return model_name in demo_models()


def demo_heldout(model_name: str, preprocessing: dict[str, Any]) -> LabelledImages:
    """The held-out digits the demo models were never trained on, through `preprocessing`."""
    summary = json.loads(DEMO_SUMMARY.read_text())
    if model_name not in summary["models"]:
        raise ConfigError(
            f"{model_name} has no shipped labelled set (only {', '.join(summary['models'])} do); "
            "pass --images DIR with one folder per class"
        )
    with np.load(DATA / summary["heldout"]["file"], allow_pickle=False) as f:
        images, labels = f["images"], f["labels"].astype(np.int64)
    x = normalise_uint8(images, preprocessing)
    if tuple(x.shape[1:]) != tuple(preprocessing["input_size"]):
        raise ConfigError(
            f"the demo held-out set is {tuple(x.shape[1:])}, the model expects "
            f"{tuple(preprocessing['input_size'])}; pass --images DIR at that size"
        )
    names = [f"digits-heldout-{i:03d}" for i in range(len(labels))]
    return LabelledImages(x, labels, names, "held-out digits shipped with the demo models",
                          [str(c) for c in range(10)])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_labels(names: list[str]) -> list[int]:
    if all(n.isdigit() for n in names):
        return [int(n) for n in names]
    return list(range(len(names)))


def image_folder(folder: str | Path, preprocessing: dict[str, Any], *, limit: int | None = None,
                 option: str = "--images", num_classes: int | None = None) -> LabelledImages:
    """Images of `folder` (flat: no labels; one sub-folder per class: labelled), through the model's
    preprocessing: resize the shorter side, centre crop, scale to [0, 1], normalise. `limit` keeps
    the first images in sorted order (per class folder in turn)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{option} {folder} is not a directory of images (or of one folder per class)")
    flat = _image_files(folder)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if flat and class_dirs:
        raise ConfigError(
            f"{option} {folder} holds both images and sub-folders; put every image in its class folder, "
            "or use a flat folder of images"
        )
    files: list[Path] = []
    labels: list[int] | None = None
    classes: list[str] | None = None
    if flat:
        files = flat
    elif class_dirs:
        classes = [d.name for d in class_dirs]
        labels = []
        for d, label in zip(class_dirs, _class_labels(classes), strict=True):
            got = _image_files(d)
            files += got
            labels += [label] * len(got)
        if num_classes is not None and labels and max(labels) >= num_classes:
            raise ConfigError(
                f"{option} {folder}: class folder(s) give label {max(labels)}, the model has {num_classes} "
                "classes; name class folders 0..N-1 (or in the order of the model's classes)"
            )
    if not files:
        raise ConfigError(
            f"{option} {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files (nor class folders of them)")
    if len(files) > MAX_IMAGES and limit is None:
        raise ConfigError(
            f"{option} {folder} holds {len(files)} images; at most {MAX_IMAGES} are read at once")
    if limit is not None and limit < len(files):
        # spread the limit over the classes, so a limited labelled read still sees every class
        keep = np.linspace(0, len(files) - 1, num=limit).round().astype(int) if labels else np.arange(limit)
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    x = np.stack([_preprocess_file(p, preprocessing, option) for p in files])
    names = [str(p.relative_to(folder)) for p in files]
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    kind = f"labelled by {len(classes)} class folders" if classes else "unlabelled"
    return LabelledImages(x, y, names, f"images from {folder} ({kind})", classes)


def _preprocess_file(path: Path, preprocessing: dict[str, Any], option: str) -> np.ndarray:
    from slab_deploy._deps import require

    Image = require("PIL.Image", option)
    _, h, w = preprocessing["input_size"]
    short = preprocessing["resize_shorter_to"]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(
        preprocessing["interpolation"], Image.BICUBIC)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ConfigError(
                    f"image {path} is {im.width}x{im.height}; at most {MAX_PIXELS} pixels are read")
            img = im.convert("RGB")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
    iw, ih = img.size
    scale = short / min(iw, ih)
    img = img.resize((max(w, round(iw * scale)), max(h, round(ih * scale))), resample)
    iw, ih = img.size
    left, top = (iw - w) // 2, (ih - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return normalise_uint8(np.asarray(img, dtype=np.uint8)[None], preprocessing)[0]
