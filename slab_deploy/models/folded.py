"""The folded-checkpoint format, whole: what a fold did (`FoldReport`), how `slab-deploy fold` stores
it (`save_folded`: `torch.save` of `{FOLD_META_KEY: metadata, "model": state_dict}`, or the same
metadata as JSON in a safetensors header), how a reader checks that metadata (`check_fold_meta`),
and how a freshly built model is turned into the folded architecture so the folded weights load
into it strictly (`restore_folded_structure`).

It sits beside the model definitions and below `models.api` and `passes/`: `create_model` reads
folded checkpoints through it, and `passes.fold` reports and saves through it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from slab_deploy.errors import CheckpointError
from slab_deploy.models.layers import ChannelAffine, LinearNorm, RepBN

FOLD_META_KEY = "slab_deploy"
FOLD_FORMAT = 2  # 2: with `biases_removed` (passes.move_biases); 1 is still read
READ_FORMATS = (1, 2)


@dataclass
class NormFold:
    """What happened to one norm layer."""

    name: str
    kind: str  # "prepbn" | "repbn" | "affine" | "layernorm"
    channels: int
    action: str  # "folded" | "kept-affine" | "kept-layernorm"
    side: str = ""  # "input" (into the consumer) | "output" (into the producer)
    into: list[str] = field(default_factory=list)
    through: list[str] = field(default_factory=list)  # commuting ops between norm and target
    reason: str = ""
    max_abs_delta: float | None = None  # change of the probe logits this fold introduced


@dataclass
class FoldReport:
    model: str
    norms: list[NormFold]
    params_before: int
    params_after: int
    probe_shape: list[int]
    max_abs_logit: float
    max_abs_delta: float  # folded vs unfolded logits on the probe batch
    tolerance_max_rel: float
    seconds: float
    biases_added: list[str] = field(default_factory=list)
    biases_removed: list[str] = field(default_factory=list)  # moved elsewhere by passes.move_biases

    @property
    def folded(self) -> int:
        return sum(n.action == "folded" for n in self.norms)

    @property
    def kept(self) -> int:
        return sum(n.action != "folded" for n in self.norms)

    @property
    def max_rel_delta(self) -> float:
        return self.max_abs_delta / max(self.max_abs_logit, 1e-12)

    @property
    def verified(self) -> bool:
        """True when the folded logits are finite and within the fold tolerance of the unfolded ones."""
        return math.isfinite(self.max_abs_delta) and self.max_rel_delta <= self.tolerance_max_rel

    @property
    def changed(self) -> bool:
        return self.folded > 0 or any(n.kind in ("prepbn", "repbn") for n in self.norms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(folded=self.folded, kept=self.kept, max_rel_delta=self.max_rel_delta, verified=self.verified)
        return d

    def summary(self) -> str:
        ln = sum(n.action == "kept-layernorm" for n in self.norms)
        aff = sum(n.action == "kept-affine" for n in self.norms)
        parts = [f"{self.folded}/{len(self.norms)} norms folded"]
        if aff:
            parts.append(f"{aff} kept as explicit affine")
        if ln:
            parts.append(f"{ln} LayerNorm not foldable (input-dependent statistics)")
        if self.biases_removed:
            parts.append(f"{len(self.biases_removed)} bias adds moved into other layers")
        if math.isfinite(self.max_abs_delta):
            parts.append(
                f"max |delta logit| {self.max_abs_delta:.2e} ({self.max_rel_delta:.1e} of max |logit|)")
        else:
            parts.append(f"max |delta logit| {self.max_abs_delta} (NaN/Inf in the folded logits)")
        if not self.verified:
            parts.append(f"NOT VERIFIED: beyond the fold tolerance {self.tolerance_max_rel:g} of max |logit|")
        return ", ".join(parts)


def fold_metadata(report: FoldReport, *, source_sha256: str | None = None) -> dict[str, Any]:
    return {
        "format": FOLD_FORMAT,
        "model": report.model,
        "folded": [n.name for n in report.norms if n.action == "folded"],
        "kept_affine": [n.name for n in report.norms if n.action == "kept-affine"],
        "biases_added": list(report.biases_added),
        "biases_removed": list(report.biases_removed),
        "source_sha256": source_sha256,
        "report": report.to_dict(),
    }


def save_folded(model: nn.Module, path: str | Path, *, source_sha256: str | None = None) -> Path:
    """Write a folded checkpoint that `create_model(name, checkpoint=path)` loads back folded.

    Written to a temporary file and renamed, so an interrupted write never leaves a partial file.
    """
    from slab_deploy.utils import atomic_write

    report: FoldReport | None = getattr(model, "fold_report", None)
    if report is None:
        raise ValueError("save_folded needs a model returned by fold_model")
    payload = {FOLD_META_KEY: fold_metadata(report, source_sha256=source_sha256), "model": model.state_dict()}
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def fold_meta_from_json(text: str, path: Path) -> Any:
    """The fold metadata a safetensors header carries as JSON under FOLD_META_KEY (checked later by
    `check_fold_meta`)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(
            f"{path}: its '{FOLD_META_KEY}' metadata is not JSON; it was not written by slab-deploy fold, "
            "or was damaged: fold the original checkpoint again"
        ) from None


_META_LISTS = ("folded", "kept_affine", "biases_added", "biases_removed")


def check_fold_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The fold metadata of a folded checkpoint, checked to be what `slab-deploy fold` writes."""
    bad = None
    if not isinstance(meta, Mapping):
        bad = f"is a {type(meta).__name__}, not a dict"
    elif isinstance(meta.get("format"), bool) or not isinstance(meta.get("format"), int):
        bad = "has no integer 'format'"
    elif not isinstance(meta.get("model"), str):
        bad = "names no model"
    elif any(not isinstance(meta.get(k, []), list) or not all(isinstance(n, str) for n in meta.get(k, []))
             for k in _META_LISTS):
        bad = f"has a non-list or non-name entry in {', '.join(_META_LISTS)}"
    elif meta.get("report") is not None and not _plain_json(meta["report"]):
        bad = "has a 'report' that is not plain data"
    if bad:
        raise CheckpointError(
            f"{path}: its '{FOLD_META_KEY}' metadata {bad}; "
            "it was not written by slab-deploy fold, or was damaged: fold the original checkpoint again"
        )
    return {str(k): v for k, v in meta.items() if isinstance(k, str) and (k in _META_LISTS or _plain_json(v))}


def _plain_json(v: Any, depth: int = 0) -> bool:
    """JSON-like data (dicts with str keys, lists, str, numbers, bool, None), at most 8 levels deep."""
    if depth > 8:
        return False
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain_json(x, depth + 1) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _plain_json(x, depth + 1) for k, x in v.items())
    return False



@torch.no_grad()
def restore_folded_structure(model: nn.Module, meta: dict[str, Any]) -> None:
    """Turn a freshly built (unfolded) model into the folded architecture described by `meta`,
    so a folded state_dict loads into it strictly: every PRepBN/RepBN becomes a `ChannelAffine`
    (its values come from the state_dict), the folded ones `Identity`, the biases the fold
    added are created and those it moved away (`passes.move_biases`) removed."""
    if int(meta.get("format", 0)) not in READ_FORMATS:
        raise CheckpointError(
            f"folded checkpoint format {meta.get('format')} is not supported by this slab-deploy "
            f"(reads {', '.join(map(str, READ_FORMATS))}); fold the original checkpoint again"
        )
    for n in [n for n, m in model.named_modules() if isinstance(m, LinearNorm)]:
        # eval-mode PRepBN is its RepBN
        model.set_submodule(n, cast(LinearNorm, model.get_submodule(n)).norm2)
    for n in [n for n, m in model.named_modules() if isinstance(m, RepBN)]:
        running_var = cast(torch.Tensor, cast(RepBN, model.get_submodule(n)).bn.running_var)
        model.set_submodule(
            n, ChannelAffine(running_var.numel()).to(device=running_var.device, dtype=running_var.dtype))
    for n in meta.get("folded", []):
        model.set_submodule(n, nn.Identity())
    for n in meta.get("biases_added", []):
        m = model.get_submodule(n)
        if m.bias is None:
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            m.bias = nn.Parameter(torch.zeros(out, dtype=m.weight.dtype, device=m.weight.device))
    for n in meta.get("biases_removed", []):
        m = model.get_submodule(n)
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{n} is a {type(m).__name__}, which has no bias to remove")
        m.bias = None
    rep = meta.get("report")
    if rep:
        model.fold_report = FoldReport(  # type: ignore[assignment]
            **{k: v for k, v in rep.items() if k in FoldReport.__dataclass_fields__ and k != "norms"},
            norms=[NormFold(**n) for n in rep.get("norms", [])],
        )
