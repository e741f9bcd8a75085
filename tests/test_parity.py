"""parity.compare / judge: NaN-safe and never passing what cannot be judged."""

from __future__ import annotations

import numpy as np
import pytest

from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import TOLERANCES, Tolerance, tolerance_for

ALL = [(rung, prec) for rung, table in TOLERANCES.items() for prec in table]


def _logits(seed: int = 0, n: int = 4, c: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["candidate", "reference"])
@pytest.mark.parametrize("rung, prec", ALL)
def test_nonfinite_fails_every_tolerance(bad: float, side: str, rung: str, prec: str) -> None:
    ref = _logits()
    cand = ref.copy()
    (cand if side == "candidate" else ref)[2, 7] = bad
    m = compare(ref, cand)
    assert not m.finite and m.first_nonfinite == [2, 7]
    v = judge(m, tolerance_for(rung, prec))
    assert not v.passed and v.needed == {}
    assert f"NaN/Inf in the {side} output (1 values, first at index [2, 7])" in v.failures[0]
    # the metrics say "not a number" in reports rather than a value that looks fine
    d = m.to_dict()
    assert (d["max_abs"] is None and d["cosine"] is None and d["top1"] == 0.0
            and d["nonfinite" if side == "candidate" else "nonfinite_reference"] == 1)


def test_a_single_nan_among_good_values_is_not_averaged_away() -> None:
    ref = _logits(1, n=64, c=1000)
    cand = ref + 1e-7
    assert judge(compare(ref, cand), tolerance_for("ort_cpu", "fp32")).passed
    cand[63, 999] = np.nan
    assert not judge(compare(ref, cand), tolerance_for("ort_cpu", "fp32")).passed


def test_all_zero_candidate_is_not_cosine_one() -> None:
    ref = _logits(2)
    m = compare(ref, np.zeros_like(ref))
    assert m.cosine == 0.0
    assert compare(np.zeros_like(ref), np.zeros_like(ref)).cosine == 1.0
    assert not judge(m, Tolerance(min_cosine=0.5)).passed


def test_empty_comparisons_are_refused() -> None:
    with pytest.raises(ValueError, match="nothing to compare"):
        compare(np.zeros((0, 10)), np.zeros((0, 10)))
    with pytest.raises(ValueError, match="shape mismatch"):
        compare(np.zeros((2, 10)), np.zeros((2, 9)))


def test_tolerances_must_be_finite_and_enable_something() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="not a finite number"):
            Tolerance(max_rel=bad)
        with pytest.raises(ValueError, match="not a finite number"):
            tolerance_for("fold", "fp32", {"fold": {"max_rel": bad}})
    ref = _logits(3)
    v = judge(compare(ref, ref), Tolerance())
    assert not v.passed and "no criterion" in v.failures[0]


def test_good_outputs_still_pass() -> None:
    ref = _logits(4, n=8, c=1000)
    for rung, prec in ALL:
        assert judge(compare(ref, ref), tolerance_for(rung, prec)).passed, (rung, prec)
