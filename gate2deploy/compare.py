"""NaN-aware comparison of a compiled model's outputs with the reference's, shared by the
output-level verification (verify.py) and the layer-level one (gated_verify.py).

Over elements finite in both, the error is max|got - reference|; a NaN or inf on one side
that the other does not match (both NaN, or the same infinity) makes the error infinite: NaN
is never "equal" to a number, and never hides inside a max.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OutputComparison:
    """One output compared elementwise (see the module docstring)."""

    max_abs_err: float       # over elements finite in both; inf if any non-finite mismatch
    scale: float             # max |reference| over its finite elements (0 if none)
    nonfinite_mismatches: int
    reference_nonfinite: int  # NaN / inf elements of the reference

    @property
    def max_rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err


def nonfinite_agree(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Elementwise: both NaN, or both the same infinity."""
    return (np.isnan(reference) & np.isnan(got)) | (np.isinf(reference) & (reference == got))


def nonfinite_mismatch(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Elementwise: a non-finite value on either side that the other side does not match."""
    either = ~np.isfinite(reference) | ~np.isfinite(got)
    return either & ~nonfinite_agree(reference, got)


def compare_outputs(reference, got) -> OutputComparison:
    """NaN-aware comparison of one output (same shape required)."""
    r, g = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    if r.shape != g.shape:
        raise ValueError(f"shapes differ: {r.shape} vs {g.shape}")
    both = np.isfinite(r) & np.isfinite(g)
    mismatches = int(nonfinite_mismatch(r, g).sum())
    diff = np.abs(r[both] - g[both])
    abs_err = float("inf") if mismatches else (float(diff.max()) if diff.size else 0.0)
    finite_ref = np.abs(r[np.isfinite(r)])
    return OutputComparison(abs_err, float(finite_ref.max()) if finite_ref.size else 0.0,
                            mismatches, int((~np.isfinite(r)).sum()))
