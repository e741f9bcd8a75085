"""Train the demo models on scikit-learn's handwritten digits and write the shipped files.

    python tools/train_demo.py                 # both models, writes slab_deploy/data/
    python tools/train_demo.py --out demo-train --models slab_deit_demo --epochs 5

`slab_deit_demo` (SLA attention, PRepBN) and its LayerNorm twin `deit_demo` (softmax attention,
LayerNorm) are trained the same way: the same split, augmentation, optimizer, schedule and seed.
For the SLAB model the LayerNorm -> RepBN schedule of PRepBN (LinearNorm) runs to its end during
training (`warm` and `iter` reach 0), then the weights are frozen and only the RepBN BatchNorm
running statistics are re-estimated on the training images, as in the paper's final phase.

Data: the 1,797 8x8 grey digits that ship inside scikit-learn, bilinearly upsampled to 32x32,
stored as uint8 and replicated to 3 channels (so the images are ordinary 8-bit RGB images and the
registered preprocessing, /255 then mean/std, applies unchanged). A stratified 20% is held out by
seed; the held-out images themselves ship (scikit-learn is needed only to train).

Checkpoints are written as the SLAB authors' training code writes them (classification/utils.py
`save_checkpoint`): `torch.save({'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch',
'config'})` with the AdamW state and a frozen yacs `CfgNode`. Needs scikit-learn and yacs
(`pip install -e '.[train]'`). Deterministic for a given seed and thread count (default 1 thread).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slab_deploy.models import build_model, get_spec
from slab_deploy.models.layers import LinearNorm
from slab_deploy.passes.recalibrate import reestimate_bn_statistics

DATA_DIR = Path(__file__).resolve().parents[1] / "slab_deploy" / "data"
MODELS = ("slab_deit_demo", "deit_demo")
HELDOUT_FILE = "digits_heldout.npz"
SUMMARY_FILE = "demo_models.json"


# ----------------------------------------------------------------------------------------------
# Data


def digits_to_uint8(images: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, 8, 8) digits with values 0..16 -> (N, size, size, 3) uint8 RGB (bilinear, grey)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] / 16.0
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    grey = (up[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(grey[..., None], 3, axis=-1)


def load_digits_split(seed: int, heldout: float = 0.2) -> dict[str, np.ndarray]:
    """scikit-learn's digits as uint8 RGB 32x32, split into a stratified train / held-out pair by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=heldout, random_state=seed, stratify=digits.target)
    images = digits_to_uint8(digits.images)
    labels = digits.target.astype(np.int64)
    return {
        "train_images": images[train_idx], "train_labels": labels[train_idx], "train_indices": train_idx,
        "test_images": images[test_idx], "test_labels": labels[test_idx], "test_indices": test_idx,
    }


def to_input(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised: x / 255, then (x - mean) / std."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """Shift each image of (B, C, H, W) by up to `max_shift` pixels per axis, filling with `fill` (C,)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    pad = fill.view(1, c, 1, 1).expand(b, c, h + 2 * max_shift, w + 2 * max_shift).clone()
    pad[:, :, max_shift : max_shift + h, max_shift : max_shift + w] = x
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([pad[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


# ----------------------------------------------------------------------------------------------
# PRepBN schedule and the final BatchNorm re-estimation


def linear_norms(model: nn.Module) -> list[LinearNorm]:
    return [m for m in model.modules() if isinstance(m, LinearNorm)]


def set_prepbn_schedule(model: nn.Module, total_step: int, warm: int = 0) -> int:
    """Start every LinearNorm's LayerNorm -> RepBN schedule: `iter = total_step = T`, `warm` as given.
    Returns how many layers were set."""
    norms = linear_norms(model)
    for m in norms:
        m.total_step.fill_(total_step)
        m.iter.fill_(total_step)
        m.warm.fill_(warm)
    return len(norms)


def prepbn_lambda(model: nn.Module) -> float | None:
    """The LayerNorm weight `lam = iter / total_step` that the next training forward uses
    (None: no PRepBN)."""
    norms = linear_norms(model)
    if not norms:
        return None
    lams = {float(m.r0 * int(m.iter) / int(m.total_step)) for m in norms}
    assert len(lams) == 1, f"PRepBN layers are out of step: {sorted(lams)}"
    return lams.pop()


def prepbn_finished(model: nn.Module) -> bool:
    return all(int(m.iter) == 0 and int(m.warm) == 0 for m in linear_norms(model))


def recalibrate_bn(model: nn.Module, images: torch.Tensor, *, epochs: int, batch: int,
                   gen: torch.Generator) -> int:
    """The paper's final phase: weights frozen, only the BatchNorm running statistics re-estimated.

    As in the authors' `update_model`: the model in eval mode (so every LinearNorm uses its RepBN
    branch alone, the branch that deployment runs) with only the BatchNorm modules in training mode,
    their statistics continued with momentum 0.1 (`reestimate_bn_statistics(cumulative=False)`, the
    routine `slab-deploy recalibrate` runs with a cumulative average). Returns the number of batches seen."""

    def batches() -> Iterator[torch.Tensor]:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for i in range(0, len(order) - batch + 1, batch):
                yield images[order[i : i + batch]]

    return reestimate_bn_statistics(model, batches(), cumulative=False)


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    epochs: int = 60
    batch: int = 64
    base_lr: float = 1e-3
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0
    label_smoothing: float = 0.1
    shift: int = 4  # pixels of random shift (4 px at 32x32 = one pixel of the 8x8 original)
    prepbn_fraction: float = 0.5  # fraction of the training iterations the LN -> RepBN schedule takes
    prepbn_warm: int = 0
    recal_epochs: int = 10  # the authors re-estimate the RepBN statistics for 10 epochs
    seed: int = 0


@dataclass
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    iterations: int
    prepbn_steps: int | None
    lambdas: list[float] = field(default_factory=list)  # LayerNorm weight used at each iteration
    losses: list[float] = field(default_factory=list)
    recal_batches: int = 0
    before_recal: Any = None  # what `before_recal` returned on the model before the final phase
    train_seconds: float = 0.0
    recal_seconds: float = 0.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """As the authors' `set_weight_decay`: no decay on 1-D tensors, biases, pos_embed and cls_token."""
    skip = {"pos_embed", "cls_token", "dist_token"}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration LR factor: linear warm-up from warmup_lr, then cosine to min_lr (timm's shape)."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(t: int) -> float:
        if t < warm:
            lr = cfg.warmup_lr + (cfg.base_lr - cfg.warmup_lr) * t / warm
        else:
            lr = cfg.min_lr + 0.5 * (cfg.base_lr - cfg.min_lr) * (
                1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))
        return lr / cfg.base_lr

    return factor


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    fill: torch.Tensor,
    log: Callable[[str], None] = lambda s: None,
    before_recal: Callable[[nn.Module], Any] | None = None,
) -> TrainResult:
    """Train `model` on normalised `images` (N, 3, H, W); PRepBN layers run their schedule to the end."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(images) // cfg.batch  # drop the last partial batch: BatchNorm wants full ones
    iterations = cfg.epochs * steps_per_epoch
    prepbn_steps = None
    if linear_norms(model):
        prepbn_steps = max(1, round(cfg.prepbn_fraction * iterations))
        set_prepbn_schedule(model, prepbn_steps, warm=cfg.prepbn_warm)
        if prepbn_steps + cfg.prepbn_warm > iterations:
            raise ValueError(
                f"PRepBN needs {prepbn_steps + cfg.prepbn_warm} iterations but training has {iterations}")
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.base_lr, betas=cfg.betas, eps=cfg.eps,
        weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, steps_per_epoch))
    result = TrainResult(model, optimizer, scheduler, iterations, prepbn_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            sel = order[i * cfg.batch : (i + 1) * cfg.batch]
            x = random_shift(images[sel], cfg.shift, gen, fill)
            lam = prepbn_lambda(model)
            if lam is not None:
                result.lambdas.append(lam)
            loss = criterion(model(x), labels[sel])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            result.losses.append(loss.item())
            total += result.losses[-1]
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {total / steps_per_epoch:.4f} lam {prepbn_lambda(model)}")
    result.train_seconds = time.perf_counter() - t0
    if prepbn_steps is not None:
        if not prepbn_finished(model):
            raise RuntimeError("PRepBN schedule did not reach its end")
        if before_recal is not None:
            result.before_recal = before_recal(model)
        t0 = time.perf_counter()
        result.recal_batches = recalibrate_bn(model, images, epochs=cfg.recal_epochs, batch=cfg.batch,
                                              gen=gen)
        result.recal_seconds = time.perf_counter() - t0
    model.eval()
    return result


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 120) -> tuple[int, int, float]:
    """(correct, total, smallest top-1 logit margin) on normalised images, in eval mode. The margin
    says how far the closest call is from flipping (e.g. under another CPU's rounding)."""
    model.eval()
    logits = torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])
    top2 = logits.topk(2, dim=-1).values
    correct = int((logits.argmax(-1) == labels).sum())
    return correct, len(images), float((top2[:, 0] - top2[:, 1]).min())


# ----------------------------------------------------------------------------------------------
# The authors' checkpoint format


def authors_config(name: str, cfg: TrainConfig, *, prepbn_steps: int | None, threads: int,
                   heldout: float) -> Any:
    """A frozen yacs CfgNode with the sections of the authors' config.py (DATA, MODEL, TRAIN, AUG, TEST,
    and the top-level switches), filled with this run's values."""
    from yacs.config import CfgNode as CN

    spec = get_spec(name)
    c = CN()
    c.BASE = [""]
    c.DATA = CN()
    c.DATA.BATCH_SIZE = cfg.batch
    c.DATA.DATA_PATH = ""
    c.DATA.DATASET = "sklearn_digits"
    c.DATA.IMG_SIZE = spec.input_size[1]
    c.DATA.INTERPOLATION = spec.interpolation
    c.DATA.ZIP_MODE = False
    c.DATA.CACHE_MODE = "part"
    c.DATA.PIN_MEMORY = False
    c.DATA.NUM_WORKERS = 0
    c.DATA.HELDOUT_FRACTION = heldout
    c.DATA.MEAN = list(spec.mean)
    c.DATA.STD = list(spec.std)
    c.MODEL = CN()
    c.MODEL.TYPE = "deits"
    c.MODEL.NAME = name
    c.MODEL.RESUME = ""
    c.MODEL.NUM_CLASSES = spec.num_classes
    c.MODEL.DROP_RATE = 0.0
    c.MODEL.DROP_PATH_RATE = 0.0
    c.MODEL.LABEL_SMOOTHING = cfg.label_smoothing
    c.MODEL.LA = CN()
    c.MODEL.LA.KERNEL_SIZE = 5
    c.MODEL.LA.ATTN_TYPE = "".join("L" if a == "sla" else "S" for a in spec.attention)
    c.MODEL.PREPBN = CN()
    c.MODEL.PREPBN.STEP = prepbn_steps or 0
    c.MODEL.PREPBN.WARM = cfg.prepbn_warm if prepbn_steps else 0
    c.MODEL.PREPBN.RECAL_EPOCHS = cfg.recal_epochs if prepbn_steps else 0
    c.TRAIN = CN()
    c.TRAIN.START_EPOCH = 0
    c.TRAIN.EPOCHS = cfg.epochs
    c.TRAIN.WARMUP_EPOCHS = cfg.warmup_epochs
    c.TRAIN.COOLDOWN_EPOCHS = 0
    c.TRAIN.WEIGHT_DECAY = cfg.weight_decay
    c.TRAIN.BASE_LR = cfg.base_lr
    c.TRAIN.WARMUP_LR = cfg.warmup_lr
    c.TRAIN.MIN_LR = cfg.min_lr
    c.TRAIN.CLIP_GRAD = cfg.clip_grad
    c.TRAIN.AUTO_RESUME = False
    c.TRAIN.USE_CHECKPOINT = False
    c.TRAIN.LR_SCHEDULER = CN()
    c.TRAIN.LR_SCHEDULER.NAME = "cosine"
    c.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
    c.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
    c.TRAIN.OPTIMIZER = CN()
    c.TRAIN.OPTIMIZER.NAME = "adamw"
    c.TRAIN.OPTIMIZER.EPS = cfg.eps
    c.TRAIN.OPTIMIZER.BETAS = tuple(cfg.betas)
    c.TRAIN.OPTIMIZER.MOMENTUM = 0.9
    c.AUG = CN()
    c.AUG.COLOR_JITTER = 0.0
    c.AUG.AUTO_AUGMENT = "none"
    c.AUG.REPROB = 0.0
    c.AUG.MIXUP = 0.0
    c.AUG.CUTMIX = 0.0
    c.AUG.SHIFT = cfg.shift
    c.TEST = CN()
    c.TEST.CROP = False
    c.TEST.SEQUENTIAL = True
    c.TEST.SHUFFLE = False
    c.AMP = False
    c.OUTPUT = f"output/{name}/default"
    c.TAG = "default"
    c.SAVE_FREQ = 1
    c.PRINT_FREQ = 100
    c.SEED = cfg.seed
    c.EVAL_MODE = False
    c.THROUGHPUT_MODE = False
    c.LOCAL_RANK = 0
    c.NUM_THREADS = threads
    c.freeze()
    return c


def save_authors_checkpoint(path: Path, res: TrainResult, *, max_accuracy: float, epoch: int,
                            config: Any) -> None:
    """`torch.save` of the dict the authors' `save_checkpoint` writes, keys in their order."""
    torch.save(
        {
            "model": res.model.state_dict(),
            "optimizer": res.optimizer.state_dict(),
            "lr_scheduler": res.lr_scheduler.state_dict(),
            "max_accuracy": max_accuracy,
            "epoch": epoch,
            "config": config,
        },
        path,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------


def _log(name: str, line: str) -> None:
    print(f"[{name}] {line}", flush=True)


def _correct(model: nn.Module, *, images: torch.Tensor, labels: torch.Tensor) -> int:
    return evaluate(model, images, labels)[0]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR,
                    help="where the checkpoints, held-out set and summary go")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (results are bitwise reproducible per count)")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--prepbn-fraction", type=float, default=TrainConfig.prepbn_fraction)
    ap.add_argument("--recal-epochs", type=int, default=TrainConfig.recal_epochs)
    ap.add_argument("--shift", type=int, default=TrainConfig.shift)
    ap.add_argument("--heldout", type=float, default=0.2)
    ap.add_argument("--no-save", action="store_true", help="train and report only")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    data = load_digits_split(args.seed, args.heldout)
    cfg = TrainConfig(
        epochs=args.epochs, shift=args.shift, prepbn_fraction=args.prepbn_fraction,
        recal_epochs=args.recal_epochs, seed=args.seed,
    )
    train_f = data["train_images"].astype(np.float64) / 255.0
    print(f"train {len(data['train_labels'])} / held-out {len(data['test_labels'])} images; "
          f"train mean {train_f.mean():.4f} std {train_f.std():.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": args.seed, "threads": args.threads, "torch": torch.__version__,
                               "models": {}}
    if not args.no_save:
        heldout = args.out / HELDOUT_FILE
        np.savez_compressed(
            heldout, images=data["test_images"], labels=data["test_labels"].astype(np.uint8),
            sklearn_indices=data["test_indices"].astype(np.uint16),
        )
        summary["heldout"] = {"file": HELDOUT_FILE, "sha256": sha256(heldout),
                              "count": len(data["test_labels"]),
                              "split": f"sklearn train_test_split(test_size={args.heldout}, stratify=y, "
                                       f"random_state={args.seed})"}
    for name in args.models:
        spec = get_spec(name)
        torch.manual_seed(args.seed)
        model = build_model(name)
        x_train = to_input(data["train_images"], spec.mean, spec.std)
        x_test = to_input(data["test_images"], spec.mean, spec.std)
        fill = (0.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)  # black, normalised
        y_test = torch.from_numpy(data["test_labels"])
        res = train_model(model, x_train, torch.from_numpy(data["train_labels"]), cfg, fill=fill,
                          log=functools.partial(_log, name),
                          before_recal=functools.partial(_correct, images=x_test, labels=y_test))
        correct, total, margin = evaluate(model, x_test, y_test)
        acc = 100.0 * correct / total
        train_correct, train_total, _ = evaluate(model, x_train, torch.from_numpy(data["train_labels"]))
        if res.prepbn_steps is not None and res.prepbn_steps != spec.prepbn_steps:
            print(f"[{name}] note: T={res.prepbn_steps} differs from the registered "
                  f"prepbn_steps={spec.prepbn_steps}")
        before = ("" if res.before_recal is None
                  else f" ({100.0 * res.before_recal / total:.2f}% before the BN re-estimation)")
        print(f"[{name}] held-out top-1 {acc:.2f}% ({correct}/{total}){before}; "
              f"smallest margin {margin:.3f}; "
              f"train {100.0 * train_correct / train_total:.2f}%; "
              f"train {res.train_seconds:.0f} s, recalibration {res.recal_seconds:.0f} s; "
              f"PRepBN T={res.prepbn_steps} finished={prepbn_finished(model)}", flush=True)
        entry: dict[str, Any] = {
            "heldout_top1": acc, "heldout_correct": correct, "heldout_count": total,
            "heldout_min_margin": round(margin, 4),
            "heldout_correct_before_recal": res.before_recal,
            "train_top1": 100.0 * train_correct / train_total,
            "iterations": res.iterations, "prepbn_steps": res.prepbn_steps,
            "recal_batches": res.recal_batches,
            "train_seconds": round(res.train_seconds, 1), "recal_seconds": round(res.recal_seconds, 1),
            "params": sum(p.numel() for p in model.parameters()),
        }
        if not args.no_save:
            config = authors_config(name, cfg, prepbn_steps=res.prepbn_steps, threads=args.threads,
                                    heldout=args.heldout)
            path = args.out / f"{name}.pth"
            epoch = cfg.epochs + (cfg.recal_epochs - 1 if res.prepbn_steps else 0)
            save_authors_checkpoint(path, res, max_accuracy=acc, epoch=epoch, config=config)
            entry.update(file=path.name, sha256=sha256(path), bytes=path.stat().st_size)
        summary["models"][name] = entry
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if not args.no_save:
        (args.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["models"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
