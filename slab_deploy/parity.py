"""Compare outputs against a reference -> metrics and a verdict (numpy only).

NaN-safe by construction: NaN compares false with every threshold, so a NaN or Inf anywhere in the
candidate or the reference is counted first and fails every metric of `judge`, with a message that
says how many values and where the first one is. An empty comparison is refused, never passed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slab_deploy.tolerances import Tolerance


@dataclass
class Metrics:
    max_abs: float
    max_rel: float  # max |delta| / max |reference|
    max_rel_elem: float  # max over elements of |delta| / (|reference| + 1e-6 * max|reference|)
    mean_abs: float
    cosine: float
    sqnr_db: float
    top1: float  # fraction of samples whose argmax agrees
    top5: float  # fraction of samples whose reference top-1 is in the candidate's top-5
    max_abs_reference: float
    samples: int
    top1_flips: int = 0  # samples whose argmax differs
    ref_margin_min: float | None = None  # smallest reference top-1 minus top-2 logit over the samples
    flip_margin_max: float | None = None  # largest reference top-1 margin among the flipped samples
    nonfinite: int = 0  # NaN/Inf values in the candidate
    nonfinite_reference: int = 0  # NaN/Inf values in the reference
    first_nonfinite: list[int] | None = None  # index of the first NaN/Inf (candidate, else reference)
    # Against labels, when the inputs have them (else None): top-1 accuracy of the candidate and of
    # the reference on the same images, and the drop (reference - candidate; negative: a gain).
    accuracy: float | None = None
    reference_accuracy: float | None = None
    accuracy_drop: float | None = None

    @property
    def finite(self) -> bool:
        """True when neither side holds a NaN or Inf (only then can the metrics be judged)."""
        return self.nonfinite == 0 and self.nonfinite_reference == 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def _first_bad(a: np.ndarray) -> list[int] | None:
    bad = np.argwhere(~np.isfinite(a))
    return [int(i) for i in bad[0]] if bad.size else None


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of (N, C) logits against (N,) integer labels; NaN/Inf rows count as wrong."""
    logits = np.asarray(logits)
    ok = np.isfinite(logits).all(axis=1) & (logits.argmax(axis=1) == labels)
    return float(ok.mean())


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> Metrics:
    """Metrics of `candidate` against `reference` (same shape, first axis = samples), and against
    `labels` (N,) when given: top-1 accuracy of both and the drop.

    When either side holds a NaN or Inf, the error metrics are +Inf (cosine NaN, SQNR -Inf, top-1
    and top-5 0) and `nonfinite`/`nonfinite_reference`/`first_nonfinite` say where: `judge` fails it."""
    m = _compare(reference, candidate)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (np.asarray(reference).shape[0],):
            raise ValueError(f"labels of shape {labels.shape} for {np.asarray(reference).shape[0]} samples")
        m.accuracy = accuracy(candidate, labels)
        m.reference_accuracy = accuracy(reference, labels)
        m.accuracy_drop = m.reference_accuracy - m.accuracy
    return m


def _compare(reference: np.ndarray, candidate: np.ndarray) -> Metrics:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    if ref.ndim == 0 or ref.size == 0:
        raise ValueError(f"nothing to compare: outputs of shape {ref.shape}")
    bad_cand = int((~np.isfinite(cand)).sum())
    bad_ref = int((~np.isfinite(ref)).sum())
    if bad_cand or bad_ref:
        inf = float("inf")
        return Metrics(
            max_abs=inf, max_rel=inf, max_rel_elem=inf, mean_abs=inf, cosine=float("nan"), sqnr_db=-inf,
            top1=0.0, top5=0.0,
            max_abs_reference=(float(np.abs(ref[np.isfinite(ref)]).max()) if bad_ref < ref.size
                               else float("nan")),
            samples=int(ref.shape[0]), top1_flips=int(ref.shape[0]),
            nonfinite=bad_cand, nonfinite_reference=bad_ref,
            first_nonfinite=_first_bad(cand) if bad_cand else _first_bad(ref),
        )
    d = cand - ref
    scale = float(np.abs(ref).max())
    max_abs = float(np.abs(d).max())
    noise = float((d**2).sum())
    signal = float((ref**2).sum())
    sqnr = float("inf") if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    r = ref.reshape(ref.shape[0], -1)
    c = cand.reshape(cand.shape[0], -1)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    denom = nr * nc
    # Two zero rows agree (cosine 1); a zero row against a non-zero one does not (cosine 0).
    cos = float(np.min(np.where(denom > 0, (r * c).sum(1) / np.maximum(denom, 1e-300),
                                np.where((nr == 0) & (nc == 0), 1.0, 0.0))))
    agree = r.argmax(1) == c.argmax(1)
    top1 = float(agree.mean())
    margins = np.diff(np.sort(r, axis=1)[:, -2:], axis=1)[:, 0] if r.shape[1] > 1 else np.zeros(r.shape[0])
    flipped = margins[~agree]
    k = min(5, c.shape[1])
    top5_idx = np.argsort(-c, axis=1)[:, :k]
    top5 = float(np.mean([r_i.argmax() in t for r_i, t in zip(r, top5_idx, strict=True)]))
    return Metrics(
        max_abs=max_abs,
        max_rel=max_abs / scale if scale > 0 else max_abs,
        max_rel_elem=float((np.abs(d) / (np.abs(ref) + 1e-6 * max(scale, 1e-30))).max()),
        mean_abs=float(np.abs(d).mean()),
        cosine=cos,
        sqnr_db=sqnr,
        top1=top1,
        top5=top5,
        max_abs_reference=scale,
        samples=int(ref.shape[0]),
        top1_flips=int(flipped.size),
        ref_margin_min=float(margins.min()) if margins.size else None,
        flip_margin_max=float(flipped.max()) if flipped.size else None,
    )


def nonfinite_message(m: Metrics) -> str:
    """One line saying where NaN/Inf appeared ("" when none did)."""
    if m.finite:
        return ""
    where = f", first at index {m.first_nonfinite}" if m.first_nonfinite is not None else ""
    if m.nonfinite:
        return f"NaN/Inf in the candidate output ({m.nonfinite} values{where}): every metric fails"
    return (f"NaN/Inf in the reference output ({m.nonfinite_reference} values{where}): "
            "nothing can be judged, every metric fails")


@dataclass
class Verdict:
    passed: bool
    failures: list[str] = field(default_factory=list)
    needed: dict[str, float] = field(default_factory=dict)  # the tolerance that would have passed


def judge(m: Metrics, tol: Tolerance) -> Verdict:
    """Pass only when every enabled criterion holds. NaN-safe: each test is written `not value <= bound`
    (false for NaN), a NaN/Inf on either side fails outright, and a tolerance with no criterion
    enabled, or a NaN bound, passes nothing."""
    if not m.finite:
        return Verdict(False, [nonfinite_message(m)], {})
    bounds = (tol.max_rel, tol.min_cosine, tol.min_sqnr_db, tol.min_top1)
    if all(b is None for b in bounds):  # accuracy alone is not enough: it is judged only with labels
        return Verdict(False, ["the tolerance enables no criterion: nothing was judged"], {})
    if tol.max_accuracy_drop is not None and not math.isfinite(tol.max_accuracy_drop):
        return Verdict(False, [f"the tolerance {tol.to_dict()} has a bound that is not a finite number"], {})
    if any(b is not None and not math.isfinite(b) for b in bounds):
        return Verdict(False, [f"the tolerance {tol.to_dict()} has a bound that is not a finite number"], {})
    failures = []
    needed: dict[str, float] = {}
    if tol.max_rel is not None:
        needed["max_rel"] = m.max_rel
        if not m.max_rel <= tol.max_rel:
            failures.append(f"max_rel {m.max_rel:.2e} > {tol.max_rel:.0e}")
    if tol.min_cosine is not None:
        needed["min_cosine"] = m.cosine
        if not m.cosine >= tol.min_cosine:
            failures.append(f"cosine {m.cosine:.6f} < {tol.min_cosine}")
    if tol.min_sqnr_db is not None:
        needed["min_sqnr_db"] = m.sqnr_db
        if not m.sqnr_db >= tol.min_sqnr_db:
            failures.append(f"SQNR {m.sqnr_db:.1f} dB < {tol.min_sqnr_db} dB")
    if tol.min_top1 is not None:
        needed["min_top1"] = m.top1
        if not m.top1 >= tol.min_top1:
            msg = f"top-1 agreement {m.top1:.3f} < {tol.min_top1}"
            # Small errors that flip only samples whose reference logits were (nearly) tied: say so,
            # the rung still fails (untrained weights give such ties; trained ones rarely do).
            if (m.flip_margin_max is not None and math.isfinite(m.max_abs) and m.max_rel <= 1e-2
                    and m.flip_margin_max <= 2 * m.max_abs):
                msg += (f" ({m.top1_flips} of {m.samples} flipped, all near-ties: reference top-1 margin <= "
                        f"{m.flip_margin_max:.1e}, max |delta| {m.max_abs:.1e})")
            failures.append(msg)
    if tol.max_accuracy_drop is not None and m.accuracy_drop is not None:
        needed["max_accuracy_drop"] = m.accuracy_drop
        if not m.accuracy_drop <= tol.max_accuracy_drop:
            failures.append(f"top-1 accuracy {100 * (m.accuracy or 0):.2f}% "
                            f"is {100 * m.accuracy_drop:.2f} points below "
                            f"the reference's {100 * (m.reference_accuracy or 0):.2f}% "
                            f"(at most {100 * tol.max_accuracy_drop:g})")
    return Verdict(not failures, failures, needed)
