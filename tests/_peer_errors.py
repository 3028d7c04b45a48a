"""Comparison against a peer framework that also records the largest error seen per peer.

The spec's peer tests print these maxima (``pytest -s``) so a closing note can quote them.
"""

from __future__ import annotations

import numpy as np
from numerics import Tolerance, close


class PeerErrors:
    """Named ``PEERS`` in a test module, its report is printed after the module (tests/conftest.py)."""

    def __init__(self) -> None:
        self.largest: dict[str, tuple[float, float]] = {}

    def agree(
        self,
        peer: str,
        got,
        want,
        tol: Tolerance | None = None,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        what: str = "",
        rel_floor: float = 1e-3,
    ):
        """numerics.close (NaN must meet NaN) that also records the largest absolute and relative error
        per peer and dtype. ``tol`` is a numerics tolerance, or ``rtol``/``atol`` derived at the call.

        Relative errors are taken only where |want| >= rel_floor, so values that merely cross zero
        do not masquerade as large relative errors.
        """
        if tol is None:
            tol = Tolerance(rtol, atol, "derived at the call")
        got = got.detach().cpu().numpy() if hasattr(got, "detach") else got
        dtype = min((np.asarray(got).dtype, np.asarray(want).dtype), key=lambda d: d.itemsize)
        label = f"{peer} [{dtype}]"
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        finite = ~np.isnan(want)
        diff = np.abs(got[finite] - want[finite])
        if diff.size:
            big = np.abs(want[finite]) >= rel_floor
            rel = float((diff[big] / np.abs(want[finite][big])).max()) if big.any() else 0.0
            old = self.largest.get(label, (0.0, 0.0))
            self.largest[label] = (max(old[0], float(diff.max())), max(old[1], rel))
        close(got, want, tol, what=what, nan_equal=True)

    def report(self) -> str:
        return "".join(
            f"\n[max error vs {peer}] abs {abs_err:.3g}  rel {rel_err:.3g}"
            for peer, (abs_err, rel_err) in sorted(self.largest.items())
        )
