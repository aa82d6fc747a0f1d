"""NaN-aware comparison for the tests (NaN is never "equal" to a number).

Written independently of gate2deploy.verify (the code under test there): the tests must not
certify through the same blind spot they are meant to catch. Two arrays agree at an element
when both are finite and close, or both are NaN, or both are the same infinity; anything else
involving a non-finite value is a mismatch, whatever the tolerance.
"""
from __future__ import annotations

import numpy as np


def nonfinite_mismatch_mask(got, ref) -> np.ndarray:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    same = np.where(np.isnan(ref), np.isnan(got), np.where(np.isinf(ref), got == ref, False))
    return (~np.isfinite(got) | ~np.isfinite(ref)) & ~same


def normwise_error(got, ref) -> float:
    """max|got - ref| / max|ref| over the elements finite in both (max|ref| over ref's finite
    elements, floored at 1e-12); inf if any non-finite value is unmatched."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if nonfinite_mismatch_mask(got, ref).any():
        return float("inf")
    both = np.isfinite(got) & np.isfinite(ref)
    if not both.any():
        return 0.0
    finite_ref = np.abs(ref[np.isfinite(ref)])
    return float(np.abs(got[both] - ref[both]).max() / max(finite_ref.max(), 1e-12))


def assert_nonfinite_match(got, ref) -> None:
    bad = nonfinite_mismatch_mask(got, ref)
    assert not bad.any(), (
        f"{int(bad.sum())} NaN/inf elements differ, e.g. got {np.asarray(got)[bad][:4]} "
        f"where the reference has {np.asarray(ref)[bad][:4]}")
