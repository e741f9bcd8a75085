"""What a run measures: targets (a model in a variant, with its weights) and cases (a target on
one backend, precision, batch and thread count)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slab_deploy.errors import ConfigError


@dataclass
class Case:
    model: str
    variant: str  # folded | unfolded | baseline
    backend: str
    precision: str
    batch: int
    threads: int | None = None

    @property
    def key(self) -> str:
        t = f"/t{self.threads}" if self.threads else ""
        return f"{self.model}[{self.variant}]/{self.backend}/{self.precision}/b{self.batch}{t}"


@dataclass
class Target:
    model: str
    variant: str  # folded | unfolded | baseline
    checkpoint: str | None = None


def compare_targets(name: str, *, unfolded: bool = False, checkpoint: str | None = None) -> list[Target]:
    from slab_deploy.models import get_spec

    spec = get_spec(name)
    if not spec.is_slab:
        raise ConfigError(f"--compare takes a SLAB model; {name} is a {spec.norm} baseline "
                          "(try one of its SLAB counterparts)")
    out = [Target(name, "folded", checkpoint)]
    if unfolded:
        out.append(Target(name, "unfolded", checkpoint))
    out += [Target(b, "baseline") for b in spec.compare_with]
    return out


def build_targets(compare: str | None = None, models: Sequence[str] | None = None, *, unfolded: bool = False,
                  checkpoint: str | None = None) -> list[Target]:
    """What `bench` and `trace` run: a SLAB model with its baselines (`compare`), or a list of
    models (SLAB ones folded, and also unfolded with `unfolded`; a checkpoint only applies to a
    single model)."""
    from slab_deploy.models import get_spec

    if compare and models:
        raise ConfigError("--compare and --models exclude each other")
    if compare:
        return compare_targets(compare, unfolded=unfolded, checkpoint=checkpoint)
    if not models:
        raise ConfigError("pass --compare SLAB_MODEL or --models a,b,c")
    targets = []
    for n in models:
        slab = get_spec(n).is_slab
        targets.append(Target(n, "folded" if slab else "baseline",
                              checkpoint if checkpoint and len(models) == 1 else None))
        if slab and unfolded:
            targets.append(Target(n, "unfolded", targets[-1].checkpoint))
    return targets


def reason(exc: BaseException) -> str:
    """`ClassName: first line of the message`, for a result's reason."""
    text = str(exc)
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:300] if text.strip() else ''}".rstrip(": ")


def target_key(t: Target) -> tuple[str, str, str | None]:
    return (t.model, t.variant, t.checkpoint)


def load_target(t: Target) -> Any:
    """The torch model of a target: loaded from its checkpoint (or the embedded default), folded
    for the folded variant."""
    from slab_deploy.passes import fold_model
    from slab_deploy.weights import load_model

    m = load_model(t.model, t.checkpoint)
    if t.variant == "folded":
        m, _ = fold_model(m)
    return m

