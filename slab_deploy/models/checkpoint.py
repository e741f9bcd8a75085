"""Checkpoint reading and strict loading.

Accepted: the SLAB authors' training files (`{'model', 'optimizer', ..., 'config'}` with a pickled
yacs config, optional `state_dict_ema`), bare state_dicts, `{'state_dict': ...}` wrappers,
`module.` prefixes, safetensors files, and folded checkpoints written by `slab-deploy fold`.
Nothing foreign is executed (see `_safe_pickle`). Loading is strict; the two RepBN layouts
(LinearNorm `X.norm2.*` vs plain `X.alpha`/`X.bn.*`) are remapped when the variant asks for
the other one; a PRepBN schedule that had not finished is refused unless overridden.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slab_deploy.errors import CheckpointError, UnfinishedPRepBNError
from slab_deploy.models.folded import FOLD_META_KEY, check_fold_meta, fold_meta_from_json
from slab_deploy.utils import sha256_file


@dataclass
class PRepBNState:
    """Progress of one PRepBN (LinearNorm) layer's LayerNorm -> RepBN schedule."""

    name: str
    warm: int
    iter: int
    total_step: int

    @property
    def finished(self) -> bool:
        return self.iter <= 0 and self.warm <= 0

    @property
    def progress(self) -> float:
        """Fraction of the schedule done (1.0 = LayerNorm fully replaced)."""
        if self.total_step <= 0:
            return 1.0
        return 1.0 - max(self.iter, 0) / self.total_step


@dataclass
class CheckpointInfo:
    """What a checkpoint file holds, as `slab-deploy inspect` reports it."""

    path: str
    format: str
    sha256: str
    entry: str  # which top-level key the weights came from ("" for a bare state_dict)
    top_level_keys: list[str]
    has_ema: bool
    layout: str
    num_tensors: int
    num_params: int
    num_classes: int | None
    prepbn: list[PRepBNState] = field(default_factory=list)
    opaque_objects: list[str] = field(default_factory=list)
    epoch: int | None = None
    max_accuracy: float | None = None
    folded: dict[str, Any] | None = None
    stripped_prefix: str = ""
    remapped: str = ""

    @property
    def prepbn_finished(self) -> bool:
        return all(s.finished for s in self.prepbn)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prepbn_finished"] = self.prepbn_finished
        return d


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass the checkpoint file inside it (*.pth, *.pt or *.safetensors)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download it again")


def _read_raw(path: Path) -> tuple[Any, str, list[str]]:
    """Returns (object, file format, opaque object class names)."""
    from slab_deploy.models import _safe_pickle as sp

    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        obj, opaque = sp.load_zip_checkpoint(path)
        return obj, "torch-zip", opaque
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n < path.stat().st_size:
            return _read_safetensors(path), "safetensors", []
    if sp.is_legacy_head(head):
        obj, opaque = sp.load_legacy_checkpoint(path)
        return obj, "torch-legacy", opaque
    if sp.is_tar_head(path):
        raise CheckpointError(
            f"{path} is a tar checkpoint of torch < 0.4; "
            "load it with that torch and re-save it with torch.save"
        )
    raise CheckpointError(
        f"{path} is not a PyTorch (.pth) or safetensors checkpoint (starts with {head[:8]!r}); "
        "pass a file saved by torch.save or safetensors"
    )


def _read_safetensors(path: Path) -> dict[str, Any]:
    from slab_deploy._deps import require

    st = require("safetensors.torch", "reading .safetensors checkpoints")
    try:
        tensors = dict(st.load_file(str(path), device="cpu"))
        safe_open = require("safetensors").safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path} is a corrupt safetensors file ({first}); download it again") from None
    if FOLD_META_KEY in meta:
        return {FOLD_META_KEY: fold_meta_from_json(meta[FOLD_META_KEY], path), "model": tensors}
    return tensors


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    stripped = ""
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p) :]: v for k, v in sd.items()}
            stripped += p
    return sd, stripped


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    keys = set(sd)
    if any(k.endswith(".norm2.alpha") and k[: -len("norm2.alpha")] + "iter" in keys for k in keys):
        return "prepbn"
    if any(k.endswith(".alpha") and k[: -len("alpha")] + "bn.running_mean" in keys for k in keys):
        return "repbn"
    if any(re.search(r"norm\d*\.weight$", k) for k in keys):
        return "layernorm"
    return "unknown"


def _counter(sd: Mapping[str, torch.Tensor], key: str) -> int:
    """A PRepBN counter (`iter`, `warm`, `total_step`): one finite whole number, or a CheckpointError."""
    t = sd[key]
    if t.numel() != 1:
        raise CheckpointError(
            f"PRepBN counter {key} has shape {list(t.shape)}; a counter is one number: "
            "the file is damaged or not a SLAB checkpoint"
        )
    v = t.reshape(()).item()
    if isinstance(v, complex) or not math.isfinite(v) or v != int(v) or abs(v) > 2**62:
        raise CheckpointError(
            f"PRepBN counter {key} is {v}, not a whole number: the file is damaged or not a SLAB checkpoint"
        )
    return int(v)


def prepbn_states(sd: Mapping[str, torch.Tensor]) -> list[PRepBNState]:
    states = []
    for k in sd:
        if k.endswith(".total_step"):
            p = k[: -len("total_step")]
            if p + "iter" in sd:
                warm = _counter(sd, p + "warm") if p + "warm" in sd else 0
                states.append(PRepBNState(p[:-1], warm=warm, iter=_counter(sd, p + "iter"),
                                          total_step=_counter(sd, k)))
    return states


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or Inf, naming the tensors (first three) and how many values are bad."""
    bad: list[str] = []
    count = 0
    for k, v in sd.items():
        if v.is_floating_point() or v.is_complex():
            n = int((~torch.isfinite(v)).sum()) if v.numel() else 0
            if n:
                count += 1
                if len(bad) < 3:
                    bad.append(f"{k} ({n} of {v.numel()} values)")
    if bad:
        more = f" and {count - len(bad)} more tensors" if count > len(bad) else ""
        raise CheckpointError(
            f"{source} has NaN or Inf weights in {', '.join(bad)}{more}; "
            "the training run diverged or the file is damaged: use an earlier checkpoint"
        )


def _num_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def read_checkpoint(path: str | Path, *, ema: bool = False) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read the weights of `path` safely. Returns (state_dict, info); loads nothing into a model."""
    path = Path(path)
    _check_path(path)
    obj, fmt, opaque = _read_raw(path)
    top_keys = sorted(str(k) for k in obj if isinstance(k, (str, int))) if isinstance(obj, Mapping) else []
    entry = ""
    folded = None
    if isinstance(obj, Mapping) and FOLD_META_KEY in obj and "model" in obj:
        folded = check_fold_meta(obj[FOLD_META_KEY], path)
        entry, sd_obj, fmt = "model", obj["model"], f"{fmt} (slab-deploy folded)"
    elif ema:
        if not isinstance(obj, Mapping) or "state_dict_ema" not in obj:
            raise CheckpointError(
                f"{path} has no EMA weights (no 'state_dict_ema' entry; it has {top_keys[:8]}); drop --ema"
            )
        entry, sd_obj = "state_dict_ema", obj["state_dict_ema"]
        fmt = f"{fmt} (training checkpoint)"
    elif _is_state_dict(obj):
        sd_obj = obj
    elif isinstance(obj, Mapping) and ("model" in obj or "state_dict" in obj):
        entry = "model" if "model" in obj else "state_dict"
        sd_obj = obj[entry]
        if entry == "model" and "optimizer" in obj or "config" in obj:
            fmt = f"{fmt} (training checkpoint)"
    else:
        what = f"a {type(obj).__name__} with keys {top_keys[:8]}" if top_keys else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path} holds {what}, not model weights; "
            "expected a state_dict or a dict with 'model' or 'state_dict'"
        )
    if isinstance(sd_obj, nn.Module):  # pragma: no cover - the restricted unpickler cannot build modules
        sd_obj = sd_obj.state_dict()
    if not _is_state_dict(sd_obj):
        raise CheckpointError(
            f"{path}: entry {entry or '(top level)'!r} is not a state_dict of tensors; "
            "it may be a checkpoint of something other than a model"
        )
    sd, stripped = _strip_prefix(dict(sd_obj))
    check_finite(sd, str(path))
    sd, renamed = rename_foreign_keys(sd)
    extra = obj if isinstance(obj, Mapping) else {}
    epoch = (extra.get("epoch")
             if isinstance(extra.get("epoch"), int) and not isinstance(extra.get("epoch"), bool) else None)
    acc = extra.get("max_accuracy")
    if isinstance(acc, torch.Tensor) and acc.numel() == 1 and not acc.is_complex():
        acc = acc.item()
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        acc = None
    info = CheckpointInfo(
        path=str(path),
        format=fmt,
        sha256=sha256_file(path),
        entry=entry,
        top_level_keys=top_keys,
        has_ema="state_dict_ema" in top_keys,
        layout=detect_layout(sd),
        num_tensors=len(sd),
        num_params=int(sum(v.numel() for k, v in sd.items()
                           if v.is_floating_point() and not _is_buffer_key(k))),
        num_classes=_num_classes(sd),
        prepbn=prepbn_states(sd),
        opaque_objects=sorted(set(opaque)),
        epoch=epoch,
        max_accuracy=None if acc is None else float(acc),
        folded=folded,
        stripped_prefix=stripped,
        remapped=renamed,
    )
    return sd, info


_BUFFER_SUFFIXES = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "relative_position_index",
    "attn_mask",
    ".iter",
    ".warm",
    ".total_step",
    ".num_step",  # the LLaMA PRepBN's 16-call tick
    "rotary_emb.inv_freq",
)


def _is_buffer_key(k: str) -> bool:
    return k.endswith(_BUFFER_SUFFIXES)


def check_prepbn_finished(info: CheckpointInfo, *, allow_unfinished: bool) -> None:
    """Refuse a checkpoint saved before every PRepBN layer finished its LayerNorm -> RepBN schedule."""
    unfinished = [s for s in info.prepbn if not s.finished]
    if not unfinished or allow_unfinished:
        return
    worst = min(unfinished, key=lambda s: s.progress)
    names = ", ".join(s.name for s in unfinished[:3]) + (
        f" and {len(unfinished) - 3} more" if len(unfinished) > 3 else "")
    warm = f", {worst.warm} LayerNorm-only warm-up steps left" if worst.warm > 0 else ""
    raise UnfinishedPRepBNError(
        f"{info.path} was saved before PRepBN finished: "
        f"{len(unfinished)}/{len(info.prepbn)} norm layers ({names}) "
        f"are at {worst.progress:.1%} of the LayerNorm->RepBN schedule "
        f"(iter {worst.iter} of {worst.total_step}{warm}); "
        "in eval mode they would use RepBN alone, which is not what was trained. "
        "Use the final checkpoint, or pass "
        "--allow-unfinished-prepbn to deploy it anyway"
    )


_DERIVED = ("relative_position_index", "attn_mask")  # buffers computed from the architecture alone


def rename_foreign_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename the keys of timm's Swin layout (its hub files `model.safetensors` / `pytorch_model.bin`)
    to the original Swin layout the zoo uses. Returns (state_dict, note); the note is empty when
    nothing changed. timm's DeiT (ViT) keys are the zoo's already.

    timm puts each patch merging at the start of the next stage (`layers.{i+1}.downsample`, none in
    stage 0) where Microsoft's code has it at the end of stage i, and names the classifier
    `head.fc`; the relative-position index and shift mask are not saved (they are filled from the
    architecture when the model is loaded, see `remap_layout`)."""
    timm_swin = (
        "layers.1.downsample.reduction.weight" in sd
        and "layers.0.downsample.reduction.weight" not in sd
        and any(k.startswith("layers.0.blocks.") for k in sd)
    )
    timm_head = "head.fc.weight" in sd and "head.weight" not in sd
    if not (timm_swin or timm_head):
        return sd, ""
    out = {}
    for k, v in sd.items():
        if timm_swin:
            k = re.sub(r"^layers\.(\d+)\.downsample\.",
                       lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        if timm_head and k.startswith("head.fc."):
            k = "head." + k[len("head.fc.") :]
        out[k] = v
    return out, "timm key names -> original layout" + (
        " (Swin patch merging moved to the stage before)" if timm_swin else "")


def _fill_derived(out: dict[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], source: str) -> int:
    filled = 0
    for k, v in model_sd.items():
        if not k.endswith(_DERIVED):
            continue
        if k not in out:
            out[k] = v.detach().clone()
            filled += 1
        elif tuple(out[k].shape) == tuple(v.shape) and not torch.equal(out[k].to(v.dtype), v):
            raise CheckpointError(
                f"{source}: buffer {k} differs from the one this architecture computes "
                "(window size, shift or input size differ); check that the checkpoint belongs to this model"
            )
    return filled


def remap_layout(
    sd: dict[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """Convert between LinearNorm (`X.norm2.*`) and plain RepBN (`X.alpha`, `X.bn.*`) key layouts to
    match `model_sd`, and fill the buffers the architecture computes (Swin's relative-position
    index and shift mask) when the file lacks them; ones it has must equal them. Returns
    (state_dict, note); the note is empty when nothing changed."""
    want = set(model_sd)
    out = dict(sd)
    filled = _fill_derived(out, model_sd, source)
    file_ln = {k[: -len("total_step")] for k in sd
               if k.endswith(".total_step") and k[: -len("total_step")] + "norm2.alpha" in sd}
    model_ln = {k[: -len("total_step")] for k in want if k.endswith(".total_step")}
    to_plain = [p for p in sorted(file_ln - model_ln) if p + "alpha" in want]
    to_linear = [p for p in sorted(model_ln - file_ln) if p + "alpha" in sd]
    for p in to_plain:
        # LinearNorm file -> plain RepBN model: keep the eval-time RepBN (norm2), drop LN and counters.
        for k in [k for k in out if k.startswith(p)]:
            rest = k[len(p) :]
            if rest.startswith("norm2."):
                out[p + rest[len("norm2.") :]] = out.pop(k)
            elif rest.startswith("norm1.") or rest in ("iter", "warm", "total_step"):
                del out[k]
    for p in to_linear:
        # plain RepBN file -> LinearNorm model: RepBN becomes norm2; LN branch from the model; schedule done.
        for k in [k for k in out if k == p + "alpha" or k.startswith(p + "bn.")]:
            out[p + "norm2." + k[len(p) :]] = out.pop(k)
        for k in want:
            if k.startswith(p + "norm1."):
                out[k] = model_sd[k].detach().clone()
        out[p + "warm"] = torch.tensor(0)
        out[p + "iter"] = torch.tensor(0)
        out[p + "total_step"] = model_sd[p + "total_step"].detach().clone()
    notes = []
    if filled:
        notes.append(f"{filled} relative-position index / shift mask buffers computed from the architecture")
    if to_plain:
        notes.append(
            f"LinearNorm -> RepBN layout for {len(to_plain)} norms (LayerNorm branch and schedule dropped)")
    if to_linear:
        notes.append(
            f"RepBN -> LinearNorm layout for {len(to_linear)} norms (schedule marked finished; the unused "
            "LayerNorm branch keeps its initial values)"
        )
    return out, "; ".join(notes)


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def strict_load(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, model_name: str,
                guess: Callable[[Mapping[str, torch.Tensor]], list[str]] | None = None) -> None:
    """Load `sd` into `model` strictly; on any mismatch raise one readable CheckpointError. `guess`
    names the variants a mismatching file looks like (default: the vision zoo's `detect_variants`)."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mis = sorted(k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or mis:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_short(unexpected)})")
        if mis:
            shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in mis]
            parts.append(f"{len(mis)} shape mismatches ({_short(shapes, 2)})")
        if guess is None:
            from slab_deploy.models.registry import get_spec

            looks = detect_variants(sd, include_test=get_spec(model_name).test)
        else:
            looks = guess(sd)
        hint = (
            f"; it looks like {' or '.join(looks)}: pass --model {looks[0]}"
            if looks and model_name not in looks
            else "; check that the checkpoint belongs to this model"
        )
        raise CheckpointError(f"{source} does not fit {model_name}: " + "; ".join(parts) + hint)
    for k, v in sd.items():
        if own[k].dtype != v.dtype and not (own[k].is_floating_point() and v.is_floating_point()):
            sd = dict(sd)
            sd[k] = v.to(own[k].dtype)
    model.load_state_dict(sd, strict=True)


_FINGERPRINTS: dict[str, dict[str, tuple[int, ...]]] = {}


def _fingerprint(name: str) -> dict[str, tuple[int, ...]]:
    if name not in _FINGERPRINTS:
        from slab_deploy.models.registry import build_model

        with torch.device("meta"):
            m = build_model(name)
        _FINGERPRINTS[name] = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    return _FINGERPRINTS[name]


def detect_variants(sd: Mapping[str, torch.Tensor], *, include_test: bool = False) -> list[str]:
    """Registered variants whose keys and shapes (head aside, either RepBN layout) equal `sd`'s."""
    from slab_deploy.models.registry import list_models

    def norm_key(k: str) -> str:
        k = re.sub(r"\.norm2\.(alpha|bn\.)", r".\1", k)
        return k

    def canon(d: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        ln_branches = {k[: -len("norm2.alpha")] for k in d if k.endswith(".norm2.alpha")}
        out = {}
        for k, v in d.items():
            if (k.startswith(("head.", "head_dist."))
                    or k.endswith((".iter", ".warm", ".total_step", *_DERIVED))):
                continue  # the class count, the schedule and computed buffers do not identify a variant
            if any(k.startswith(p + "norm1.") for p in ln_branches if k.endswith(("weight", "bias"))):
                continue  # nor does the LayerNorm branch of a LinearNorm (absent in plain-RepBN files)
            out[norm_key(k)] = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
        return out

    target = canon(sd)
    hits = []
    for name in list_models(include_test=include_test):
        try:
            fp = canon(_fingerprint(name))
        except Exception:  # a variant that cannot build on meta is simply not a candidate
            continue
        if fp == target:
            hits.append(name)
    # LayerNorm-layout files also match the LN keys of PRepBN variants only when exact; keep exact hits.
    return hits
