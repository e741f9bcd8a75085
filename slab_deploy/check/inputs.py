"""The images every rung sees, and their labels when there are any: a replay's saved inputs, a
folder of real images through the model's preprocessing (labelled when laid out one folder per
class), the held-out digits of a demo model, or seeded random normal images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from slab_deploy.datasets import demo_heldout, image_folder, is_demo_model
from slab_deploy.errors import ConfigError

SEEDED_INPUTS = 8  # images of a check on seeded random inputs unless --inputs says otherwise
FOLDER_INPUTS = 1000  # at most this many images of an --images folder unless --inputs says otherwise


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


class Inputs(NamedTuple):
    """(N, 3, H, W) float32 inputs, (N,) int64 labels or None, and the report's `inputs` block."""

    x: np.ndarray
    labels: np.ndarray | None
    source: dict[str, Any]


def select_inputs(model_name: str, preprocessing: dict[str, Any], *, count: int | None, seed: int,
                  images: str | Path | None = None, replay: str | Path | None = None,
                  replayed: np.ndarray | None = None, replay_labels: np.ndarray | None = None,
                  num_classes: int | None = None) -> Inputs:
    """The inputs of a check. `replayed` is what `read_replay(replay)` returned (read before the
    checkpoint, so a bad file costs nothing). Without `images` or a replay, a demo model is checked
    on its shipped held-out digits (labelled), any other model on `count` seeded random images.
    `count` None: the whole demo set, up to FOLDER_INPUTS images of a folder (spread over its
    classes), or SEEDED_INPUTS seeded images."""
    labels: np.ndarray | None
    if replayed is not None:
        x, labels = replayed, replay_labels
        src: dict[str, Any] = {"source": f"replay of {replay}", "count": int(x.shape[0]), "seed": None}
    elif images is not None or is_demo_model(model_name):
        data = (image_folder(images, preprocessing, limit=count or FOLDER_INPUTS, num_classes=num_classes)
                if images is not None else demo_heldout(model_name, preprocessing).head(count))
        x, labels = data.x, data.labels
        src = {"source": data.source, "count": len(data), "files": data.names, "seed": None}
    else:
        n = count or SEEDED_INPUTS
        x, labels = seeded_inputs(n, preprocessing["input_size"], seed), None
        src = {"source": "seeded random normal images", "count": n, "seed": seed}
    src["labelled"] = labels is not None
    if tuple(x.shape[1:]) != tuple(preprocessing["input_size"]):
        raise ConfigError(f"inputs have shape {tuple(x.shape[1:])}, "
                          f"{model_name} expects {tuple(preprocessing['input_size'])}")
    if labels is not None and num_classes is not None and int(labels.max()) >= num_classes:
        raise ConfigError(f"the labels go up to {int(labels.max())}, {model_name} has {num_classes} classes")
    return Inputs(x, labels, src)


def seeded_inputs(count: int, input_size: Any, seed: int) -> np.ndarray:
    """`count` images drawn from a standard normal by torch's generator seeded with `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, *input_size, generator=g).numpy()

