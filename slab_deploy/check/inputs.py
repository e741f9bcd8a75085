"""The images every rung sees: a replay's saved inputs, a folder of real images through the model's
preprocessing, or seeded random normal images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slab_deploy.errors import ConfigError


def check_int8_inputs(model_name: str, *, images: str | Path | None, replay: str | Path | None,
                      exporting: bool = False) -> None:
    """An INT8 graph is judged on in-distribution images: its scales were fitted to real ones, and on
    random normal inputs they clip (measured in docs/int8.md). The demo models bring their held-out
    digits; any other model needs --images (or --replay of such a run), and an export of its own made
    with --calibration (`exporting`: check would export it now, and has no images to calibrate on).
    Refused before any work."""
    from slab_deploy.datasets import is_demo_model

    if is_demo_model(model_name):
        return
    if exporting:
        raise ConfigError(
            "check exports INT8 itself only for the demo models (they ship calibration images); export "
            f"{model_name} with `slab-deploy export --precision int8 --calibration DIR` and pass its "
            "directory as --artifacts"
        )
    if images is None and replay is None:
        raise ConfigError(
            f"check --precision int8 of {model_name} needs in-distribution inputs: pass --images DIR "
            "(INT8 scales are calibrated on real images; random normal inputs fall outside their range)"
        )


def select_inputs(model_name: str, preprocessing: dict[str, Any], *, count: int, seed: int,
                  images: str | Path | None = None, replay: str | Path | None = None,
                  replayed: np.ndarray | None = None, int8: bool = False
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """The (N, 3, H, W) float32 inputs of a check and the report's `inputs` block. `replayed` is
    what `read_replay(replay)` returned (read before the checkpoint, so a bad file costs nothing).
    With `int8` and neither images nor a replay, a demo model's held-out digits (check_int8_inputs)."""
    if replayed is not None:
        x = replayed
        src: dict[str, Any] = {"source": f"replay of {replay}", "count": int(x.shape[0]), "seed": None}
    elif images is not None:
        x, names = load_images(images, preprocessing, limit=count)
        src = {"source": f"images from {images}", "count": len(names), "files": names, "seed": None}
    elif int8:
        from slab_deploy.datasets import demo_heldout

        check_int8_inputs(model_name, images=images, replay=replay)
        data = demo_heldout(model_name, preprocessing).head(count)
        x = data.x
        src = {"source": f"{data.source} (int8: in-distribution inputs)", "count": len(data),
               "files": data.names, "seed": None}
    else:
        x = seeded_inputs(count, preprocessing["input_size"], seed)
        src = {"source": "seeded random normal images", "count": count, "seed": seed}
    if tuple(x.shape[1:]) != tuple(preprocessing["input_size"]):
        raise ConfigError(f"inputs have shape {tuple(x.shape[1:])}, {model_name} expects {tuple(preprocessing['input_size'])}")
    return x, src


def seeded_inputs(count: int, input_size: Any, seed: int) -> np.ndarray:
    """`count` images drawn from a standard normal by torch's generator seeded with `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, *input_size, generator=g).numpy()


def load_images(folder: str | Path, preprocessing: dict[str, Any], limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images of `folder` through the model's own preprocessing: resize the shorter side, centre
    crop, scale to [0, 1], normalise with mean/std. Returns (N, 3, H, W) float32 and the file names."""
    from slab_deploy._deps import require

    Image = require("PIL.Image", "--images")
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    if not files:
        raise ConfigError(f"--images {folder} holds no .jpg/.jpeg/.png/.bmp/.webp files")
    files = files[:limit] if limit else files
    _, h, w = preprocessing["input_size"]
    short = preprocessing["resize_shorter_to"]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(preprocessing["interpolation"], Image.BICUBIC)
    mean = np.array(preprocessing["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.array(preprocessing["std"], dtype=np.float32).reshape(3, 1, 1)
    batch = []
    for p in files:
        try:
            img = Image.open(p).convert("RGB")
        except Exception as exc:
            raise ConfigError(f"cannot read image {p}: {exc}") from None
        iw, ih = img.size
        scale = short / min(iw, ih)
        img = img.resize((max(w, round(iw * scale)), max(h, round(ih * scale))), resample)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        batch.append((arr - mean) / std)
    return np.stack(batch).astype(np.float32), [p.name for p in files]
