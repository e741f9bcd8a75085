"""Model registry (timm style): typed entry functions decorated with `@register_model`.

Each entry function builds one variant with its architecture arguments visible in the body;
the decorator records a frozen `ModelSpec` beside it. `create_model(name)` looks the name up
(unknown names raise with close matches), builds the module and, when asked, loads a
checkpoint strictly.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast

from slab_deploy.errors import ModelNotFoundError

if TYPE_CHECKING:
    from torch import nn

Family = Literal["deit", "pvt", "swin", "cswin"]
NormKind = Literal["layernorm", "repbn", "prepbn"]
AttnKind = Literal["softmax", "sla", "flatten", "window", "lepe"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What a variant is, beyond its constructor: how to feed it and where it comes from."""

    name: str
    family: Family
    norm: NormKind
    attention: tuple[str, ...]  # one entry per stage
    released: bool = False
    baseline_of: str | None = None  # "layernorm" or "flatten" baselines name their kind here
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    paper_params_m: float | None = None
    paper_gmacs: float | None = None
    paper_top1: float | None = None
    layout: str = ""  # checkpoint layout: "prepbn" (LinearNorm keys), "repbn", "layernorm"
    prepbn_steps: int | None = None  # T of the PRepBN schedule, when norm == "prepbn"
    source: str = ""  # upstream code whose key layout the variant follows
    test: bool = False  # tiny variant for fast tests
    compare_with: tuple[str, ...] = ()  # baselines for `bench --compare`
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_slab(self) -> bool:
        return self.norm in ("repbn", "prepbn")


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    fn: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register_model(**spec_fields: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register the decorated entry function under its own name, with a `ModelSpec`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = spec_fields.pop("name", fn.__name__)
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        fields = dict(spec_fields)
        if "attention" in fields:
            fields["attention"] = tuple(fields["attention"])
        if "compare_with" in fields:
            fields["compare_with"] = tuple(fields["compare_with"])
        if "layout" not in fields:
            fields["layout"] = fields.get("norm", "")
        _REGISTRY[name] = _Entry(ModelSpec(name=name, **fields), fn)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the family modules runs their @register_model decorators.
    from slab_deploy.models import cswin, deit, pvt, swin  # noqa: F401


def list_models(pattern: str = "*", *, include_test: bool = False) -> list[str]:
    """Registered model names matching the shell-style `pattern`, sorted."""
    _ensure_loaded()
    names = [n for n, e in _REGISTRY.items() if include_test or not e.spec.test]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of `name`; unknown names raise `ModelNotFoundError` with close matches."""
    _ensure_loaded()
    try:
        return _REGISTRY[name].spec
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(
            f"unknown model {name!r}.{hint} Run `slab-deploy models` for the list."
        ) from None


def model_spec(model: nn.Module) -> ModelSpec:
    """The `ModelSpec` that `build_model` attached to `model` as `.spec`."""
    return cast(ModelSpec, model.spec)


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """How images are fed to `model` (from its spec and its input size): the `preprocessing` block of
    an export manifest, and what `slab_deploy.datasets` reads images with. Here, beside the spec,
    so that every stage (passes as well as export and check) can compute it."""
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


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build `name` with random initial weights (no checkpoint), in eval mode."""
    spec = get_spec(name)
    model = _REGISTRY[name].fn(**kwargs)
    model.spec = (spec if not kwargs.get("num_classes")  # type: ignore[assignment]
                  else replace(spec, num_classes=kwargs["num_classes"]))
    return model.eval()
