"""Least-squares fits of measured costs: pure numpy, shared by the profiler and the calibration."""

from __future__ import annotations

import numpy as np


def fit_nonnegative_line(xs: list[float], ys: list[float], scales: list[float]) -> tuple[float, float]:
    """(a, b), both >= 0, minimising the sum of ((a + b * x - y) / scale)^2: least squares in
    relative terms, so that small points count as much as large ones. The constrained optimum is
    the unconstrained one, or else lies on an edge where a or b is 0."""
    scale = np.asarray(scales, dtype=float)
    design = np.stack([np.ones_like(scale), np.asarray(xs, dtype=float)], axis=1) / scale[:, None]
    target = np.asarray(ys, dtype=float) / scale
    both = np.linalg.lstsq(design, target, rcond=None)[0]
    only_a = np.array([max(0.0, np.linalg.lstsq(design[:, :1], target, rcond=None)[0][0]), 0.0])
    only_b = np.array([0.0, max(0.0, np.linalg.lstsq(design[:, 1:], target, rcond=None)[0][0])])
    feasible = [coefficients for coefficients in (both, only_a, only_b) if (coefficients >= 0).all()]
    best = min(feasible, key=lambda coefficients: float(np.sum((design @ coefficients - target) ** 2)))
    return float(best[0]), float(best[1])
