"""RecalibrateBN: re-estimate the RepBN (BatchNorm) running statistics of an unfolded SLAB model on
images, as the last epochs of the SLAB recipe do (weights frozen, only the statistics re-estimated),
for a new resolution or domain; then fold. `recalibrate_checkpoint` does it for a checkpoint file.

How (see docs/recalibrate.md): the model stays in eval mode (dropout and drop-path off, every PRepBN
uses its RepBN branch, as deployed, and its schedule counters do not move) except the BatchNorm
modules, which run in training mode under no_grad over the images in batches, in a seeded random
order (BatchNorm averages per-batch variances, so class-sorted batches would miss the spread
between classes). The statistics are reset and averaged over all images: BatchNorm's cumulative
average (momentum=None), weighted by images, so that a short last batch counts by its size.
Nothing but the BatchNorm buffers (`running_mean`, `running_var`, `num_batches_tracked`) changes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from slab_deploy.errors import ArtifactError, ConfigError
from slab_deploy.passes.base import PassResult, prepare

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm of `model` (in a SLAB model: the `bn` of each RepBN), by module name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor], *,
                             cumulative: bool = True) -> int:
    """Run `model` over `batches` with only its BatchNorms in training mode (the rest in eval mode,
    no grad), in place; returns the number of batches. `cumulative`: reset the statistics and average
    them over all images (momentum `images in the batch / images so far`: BatchNorm's momentum=None
    when batches are equal); else keep each BatchNorm's statistics and momentum (an exponential
    average continued from the checkpoint's, as the SLAB authors' final phase runs it)."""
    bns = [m for _, m in batchnorms(model)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        if cumulative:
            m.reset_running_stats()
        m.train()
    steps = seen = 0
    try:
        for x in batches:
            if cumulative:
                seen += int(x.shape[0])
                for m in bns:
                    m.momentum = int(x.shape[0]) / seen
            model(x)
            steps += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return steps


def _batches(images: torch.Tensor, batch_size: int, seed: int,
             device: torch.device) -> Iterable[torch.Tensor]:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(order), batch_size):
        yield images[order[i : i + batch_size]].to(device)


@torch.no_grad()
def RecalibrateBN(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64, seed: int = 0,
                  inplace: bool = False) -> PassResult:
    """Re-estimate every BatchNorm's running statistics over `images` (N, 3, H, W), already
    preprocessed, in batches of `batch_size` in the order of `seed` (see the module docstring)."""
    model = prepare(model, inplace)
    bns = batchnorms(model)
    if not bns:
        raise ConfigError(
            "the model has no BatchNorm (a LayerNorm model): there are no statistics to re-estimate")
    if batch_size < 1 or len(images) < 1:
        raise ConfigError(f"need at least one image and a batch size >= 1 (got {len(images)}, {batch_size})")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    steps = reestimate_bn_statistics(model, _batches(images, batch_size, seed, device))
    note = (f"re-estimated {len(bns)} BatchNorms over {len(images)} images in {steps} batches "
            f"of <= {batch_size}")
    return PassResult(model, True, [note])


# ------------------------------------------------------------------------------------------------ report


@dataclass
class NormChange:
    """How far one BatchNorm's statistics moved: the largest change over its channels."""

    name: str
    channels: int
    mean_shift: float  # max |new mean - old mean| / old std (std = sqrt(old var + eps))
    var_change: float  # max |new var - old var| / (old var + eps)


@dataclass
class Accuracy:
    correct: int
    total: int

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / self.total


@dataclass
class RecalibrationReport:
    """What `recalibrate_checkpoint` did (`to_dict` for `--json`)."""

    model: str
    checkpoint: str
    checkpoint_sha256: str
    output: str
    output_sha256: str
    state: str  # which weights were recalibrated: "model" (the weights) or "state_dict_ema"
    images: int
    images_source: str
    batches: int
    batch_size: int
    seed: int
    norms: list[NormChange]
    eval_source: str | None = None  # None: no labels, accuracy not measured
    eval_images: int = 0
    eval_on_calibration_images: bool = False
    before: Accuracy | None = None
    after: Accuracy | None = None
    changed_predictions: int | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def largest(self, what: str) -> NormChange:
        return max(self.norms, key=lambda n: cast(float, getattr(n, what)))

    def summary(self) -> str:
        m, v = self.largest("mean_shift"), self.largest("var_change")
        acc = (f"top-1 {self.before.top1:.2f}% -> {self.after.top1:.2f}% on {self.eval_images} images"
               if self.before is not None and self.after is not None else "no labels: accuracy not measured")
        return (f"{len(self.norms)} BatchNorms re-estimated over {self.images} images; largest moves: mean "
                f"{m.mean_shift:.3g} std ({m.name}), variance {v.var_change:.1%} ({v.name}); {acc}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("before", "after"):
            acc = getattr(self, k)
            d[k] = None if acc is None else {**asdict(acc), "top1": acc.top1}
        m, v = self.largest("mean_shift"), self.largest("var_change")
        d["statistics"] = {"count": len(self.norms), "max_mean_shift": m.mean_shift,
                           "max_mean_shift_at": m.name, "max_var_change": v.var_change,
                           "max_var_change_at": v.name}
        return d


def _changes(before: nn.Module, after: nn.Module) -> list[NormChange]:
    new = dict(batchnorms(after))
    out = []
    for name, old in batchnorms(before):
        om, ov = cast(torch.Tensor, old.running_mean).double(), cast(torch.Tensor, old.running_var).double()
        nm, nv = (cast(torch.Tensor, new[name].running_mean).double(),
                  cast(torch.Tensor, new[name].running_var).double())
        if not (torch.isfinite(nm).all() and torch.isfinite(nv).all()):
            raise ArtifactError(
                f"re-estimating gave non-finite statistics in {name} (the model overflows on these images); "
                "nothing was written: check the images and the checkpoint"
            )
        out.append(NormChange(name, old.num_features, float(((nm - om).abs() / (ov + old.eps).sqrt()).max()),
                              float(((nv - ov).abs() / (ov + old.eps)).max())))
    return out


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------ the command


def _check_output(output: Path, checkpoint: Path, force: bool) -> None:
    same = output.resolve() == checkpoint.resolve()
    if not same and output.exists() and checkpoint.exists():
        same = os.path.samefile(output, checkpoint)  # a hard link or another spelling of the input
    if same:
        raise ArtifactError(
            f"--output {output} is the input checkpoint; write the recalibrated one elsewhere")
    if output.is_dir():
        raise ArtifactError(f"--output {output} is a directory; name the checkpoint file to write")
    if output.exists() and not force:
        raise ArtifactError(f"{output} exists; pass --force to overwrite it or choose another --output")


def _file_key(model_key: str, file_keys: set[str]) -> str:
    """The key of `model_key` in the file: the same, or in the other RepBN layout (LinearNorm
    `X.norm2.bn.*` / plain `X.bn.*`), which loading remaps."""
    if model_key in file_keys:
        return model_key
    head, sep, tail = model_key.rpartition(".bn.")
    candidates = [head + ".norm2.bn." + tail] if sep else []
    if sep and head.endswith(".norm2"):
        candidates.append(head[: -len(".norm2")] + ".bn." + tail)
    found = [c for c in candidates if c in file_keys]
    if len(found) != 1:
        raise ArtifactError(f"cannot tell which tensor of the checkpoint holds {model_key}")
    return found[0]


def recalibrate_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    output: str | Path,
    *,
    images: str | Path | None = None,
    eval_images: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = 2048,
    seed: int = 0,
    img_size: int | None = None,
    device: str = "cpu",
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RecalibrationReport:
    """Load `checkpoint` (unfolded), re-estimate its BatchNorm statistics on `images` (a folder, flat
    or one sub-folder per class; None: the held-out digits shipped with the demo models), measure
    top-1 before and after on `eval_images` (else on the calibration images when they are labelled),
    and write `output`: the same checkpoint file with only the recalibrated state's BatchNorm buffers
    replaced (config, optimizer, epoch and the other of model / EMA weights untouched), atomically.
    With `ema` the EMA weights are the ones recalibrated (and later folded with `--ema`)."""
    from slab_deploy import datasets
    from slab_deploy.models import checkpoint_info, get_spec, preprocessing
    from slab_deploy.models.checkpoint import read_checkpoint
    from slab_deploy.utils import atomic_write, sha256_file
    from slab_deploy.weights import load_model
    from slab_deploy.weights.patch import replace_tensors

    say = progress or (lambda _s: None)
    t0 = time.perf_counter()
    spec = get_spec(model_name)
    checkpoint, output = Path(checkpoint), Path(output)
    if not spec.is_slab:
        raise ConfigError(f"{model_name} is a {spec.norm} model with no BatchNorm: "
                          "there are no statistics to re-estimate "
                          "(recalibrate applies to SLAB models with RepBN/PRepBN)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give a batch size of at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give at least 1 image (or no --limit)")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    _check_output(output, checkpoint, force)
    say("loading checkpoint")
    model = load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
                       img_size=img_size)
    info = checkpoint_info(model)
    assert info is not None  # a checkpoint was given
    if info.folded is not None:
        raise ConfigError(
            f"{checkpoint} is folded (no BatchNorm left); recalibrate the unfolded checkpoint, then fold")
    if not batchnorms(model):
        raise ConfigError(f"{checkpoint} loads as {model_name} without a BatchNorm: "
                          "there are no statistics to re-estimate")
    pre = preprocessing(model)
    classes = info.num_classes or spec.num_classes
    say("reading images")
    if images is None:
        calib = datasets.demo_heldout(model_name, pre).head(limit)
    else:
        calib = datasets.image_folder(images, pre, limit=limit, num_classes=classes)
    judged = calib
    if eval_images is not None:
        judged = datasets.image_folder(eval_images, pre, limit=limit, option="--eval-images",
                                       num_classes=classes)
        if judged.labels is None:
            raise ConfigError(f"--eval-images {eval_images} has no class folders: "
                              "top-1 needs one sub-folder per class "
                              "(drop --eval-images to judge on the calibration images)")
    dev = torch.device(device)
    model.to(dev)
    x = torch.from_numpy(calib.x)
    before = after = None
    changed = None
    if judged.labels is not None:
        say("top-1 before")
        pred_before = _predict(model, torch.from_numpy(judged.x), batch_size, dev)
    say(f"re-estimating statistics over {len(calib)} images")
    result = RecalibrateBN(model, x, batch_size=batch_size, seed=seed)
    new = result.model
    norms = _changes(model, new)
    if judged.labels is not None:
        say("top-1 after")
        pred_after = _predict(new, torch.from_numpy(judged.x), batch_size, dev)
        before = Accuracy(int((pred_before == judged.labels).sum()), len(judged))
        after = Accuracy(int((pred_after == judged.labels).sum()), len(judged))
        changed = int((pred_before != pred_after).sum())
    say("writing")
    sd_keys = set(read_checkpoint(checkpoint, ema=ema)[0])
    keys = {f"{name}.{b}": _file_key(f"{name}.{b}", sd_keys)
            for name, _ in batchnorms(new) for b in BN_BUFFERS}
    new_sd = {k: v.detach().cpu() for k, v in new.state_dict().items()}
    old_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(output) as tmp:
        written = replace_tensors(checkpoint, tmp, {f: new_sd[k] for k, f in keys.items()}, ema=ema,
                                  expect_sha256=info.sha256)
        again = load_model(model_name, tmp, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn,
                           img_size=img_size).state_dict()
        want = {**old_sd, **{k: written[f].to(old_sd[k].dtype) for k, f in keys.items()}}
        if set(again) != set(want) or any(not torch.equal(v, want[k]) for k, v in again.items()):
            raise ArtifactError(
                f"{output.name} does not load back as the recalibrated model; nothing was written")
    notes = list(result.notes)
    state = "state_dict_ema" if ema else "model"
    if info.has_ema:
        notes.append("recalibrated the EMA weights (state_dict_ema); the model weights are unchanged"
                     if ema else
                     "recalibrated the model weights; the EMA weights (state_dict_ema) are unchanged: "
                     "pass --ema to recalibrate those instead")
    if calib.labels is None and eval_images is None:
        notes.append("no labels: accuracy not measured (give one sub-folder per class, or --eval-images)")
    elif eval_images is None:
        notes.append("top-1 was measured on the calibration images themselves "
                     "(pass --eval-images for held-out images)")
    if limit is not None and len(calib) == limit:
        notes.append(
            f"read {limit} images, the --limit; if the folder holds more, raise --limit to use them")
    if any(not s.finished for s in info.prepbn):
        notes.append(
            "the PRepBN schedule had not finished (--allow-unfinished-prepbn); its counters are unchanged")
    return RecalibrationReport(
        model=model_name, checkpoint=str(checkpoint), checkpoint_sha256=info.sha256, output=str(output),
        output_sha256=sha256_file(output), state=state, images=len(calib), images_source=calib.source,
        batches=math.ceil(len(calib) / batch_size), batch_size=batch_size, seed=seed, norms=norms,
        eval_source=judged.source if judged.labels is not None else None,
        eval_images=len(judged) if judged.labels is not None else 0,
        eval_on_calibration_images=judged is calib and calib.labels is not None,
        before=before, after=after, changed_predictions=changed, notes=notes,
        seconds=round(time.perf_counter() - t0, 3),
    )
