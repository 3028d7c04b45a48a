"""How close is close enough: the tests' tolerances, one table keyed to spec/SPEC.md §8.4, and one assert.

Every tolerance a test uses is looked up here by *comparison kind*, dtype and quantity, so a reader
finds the figure and its reason in one place. The kinds:

- ``rerounded``: the same formula evaluated in a narrower dtype than the reference (a float32 layer
  against the float64 spec). The only error is rounding, a few ulp of the data's magnitude.
- ``peer-vs-spec``: a peer framework's own layer or kernel against the float64 spec or the golden
  vectors: SPEC.md §8.4's figures as written there.
- ``summation-order``: two implementations of the same formula that sum in different orders or
  accumulate in different dtypes (torch_ref vs ATen, which accumulates float32 moments in double;
  synchronized replicas vs one device). A float32 pairwise sum over m <= 1e3 values errs by about
  log2(m) * 6e-8 ~ 1e-6 of the sum of |terms|.
- ``cross-framework``: our layer against a peer framework's own layer (Keras, torch.nn, ONNX),
  each with its own op order and accumulation dtype; measured <= 1e-6 for O(1..10) data.
- ``compiled``: the same computation traced by tf.function or XLA against eager execution, which may
  fuse or reorder reductions: a few ulp per step over 4-8 optimizer steps of O(1) values.
- ``autodiff``: a peer's automatic differentiation of its forward (torch autograd, tf.GradientTape)
  against the closed-form backward of spec/SPEC.md §4.

Quantities: ``y`` (outputs and dx, O(1..5)), ``grad`` (dx, dgamma, dbeta together), ``param-grad``
(dgamma, dbeta: sums of m = 32..600 products of O(1..3) terms, so their rounding grows with m: an
absolute bound of 1e-4) and ``stats`` (running statistics: float32 variables re-rounded at every
update, about 10 updates per test).

A wrong formula is far outside every bound here: a missing Bessel factor, an unsynchronized replica
or a swapped convention moves results by O(1/m) >= 1e-3 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """|actual - expected| <= atol + rtol * |expected| elementwise (or rtol * scale, see ``close``)."""

    rtol: float
    atol: float
    why: str


_F32_Y = Tolerance(
    1e-5,
    1e-5,
    "SPEC §8.4 float32 y: a few float32 ulp (1.2e-7) of O(1..5) values through a handful of roundings; "
    "measured <= 1e-6",
)
_F32_PARAM_GRAD = Tolerance(
    1e-5, 1e-4, "dgamma/dbeta sum m = 32..240 float32 products of O(10): rounding grows ~m ulp of the sum"
)

TOLERANCES: dict[tuple[str, str, str], Tolerance] = {
    # --- our float32 layer against the float64 spec ------------------------------------------------
    ("rerounded", "float32", "y"): _F32_Y,
    ("rerounded", "float32", "stats"): Tolerance(
        2e-6, 1e-7, "10-12 float32 updates of O(1..10) values, each re-rounded (~6e-8): ~15 ulp; 1e-7 for means near 0"
    ),
    # --- a peer's layer (Keras BatchNormalization, torch.nn.BatchNormNd) against the spec: SPEC §8.4 -
    ("peer-vs-spec", "float32", "y"): _F32_Y,
    ("peer-vs-spec", "float32", "stats"): Tolerance(
        2e-6, 1e-6, "SPEC §8.4 float32 running statistics: float32 buffers re-rounded at each of up to 12 steps"
    ),
    ("peer-vs-spec", "float64", "y"): Tolerance(
        1e-12, 1e-12, "double on both sides, reordered sums only (tighter than SPEC §8.4's 1e-10: measured)"
    ),
    ("peer-vs-spec", "float64", "stats"): Tolerance(1e-12, 1e-12, "double on both sides, reordered sums only"),
    ("peer-vs-spec", "float16", "y"): Tolerance(
        0.0, 4e-3, "SPEC §8.4 float16 y: one float16 ulp at |y| in [2, 4) is 2^-9 ~ 2e-3; both sides round once"
    ),
    # --- our layer against a peer's layer, step by step ---------------------------------------------
    ("cross-framework", "float32", "y"): _F32_Y,
    ("cross-framework", "float32", "param-grad"): _F32_PARAM_GRAD,
    ("cross-framework", "float32", "stats"): Tolerance(
        2e-6, 1e-7, "both sides re-round float32 variables at each of 10 steps (as rerounded stats)"
    ),
    # --- the same formula summed in another order (with close's scale) ----------------------------
    ("summation-order", "float32", "y"): Tolerance(
        1e-5,
        0.0,
        "float32 pairwise sums over m <= 1e3 values: log2(m) * 6e-8 ~ 1e-6 of the magnitude; 1e-5 (~80 ulp) "
        "bounds outputs, gradients and statistics with room",
    ),
    ("summation-order", "float64", "y"): Tolerance(
        1e-12, 0.0, "float64: both sides exact formulas in double, differing only in summation order"
    ),
    ("summation-order", "bfloat16", "y"): Tolerance(
        2.0**-7, 0.0, "both round a float32 result to bfloat16 (8 mantissa bits): at most 1 ulp = 2^-7 apart"
    ),
    # --- tf.function / XLA vs eager -----------------------------------------------------------------
    ("compiled", "float32", "y"): _F32_Y,
    ("compiled", "float32", "param-grad"): _F32_PARAM_GRAD,
    # --- a peer's autodiff (torch autograd, tf.GradientTape) against SPEC §4's closed form ----------
    ("autodiff", "float32", "grad"): Tolerance(
        1e-5,
        1e-4,
        "SPEC §8.4 float32 dx: three O(m) terms cancel to O(1), ~m ulp of the largest (m <= 192); "
        "dgamma/dbeta sum m O(1) products",
    ),
    ("autodiff", "float64", "grad"): Tolerance(1e-10, 1e-10, "SPEC §8.4 float64: 1e-10 relative"),
}


EXACT = Tolerance(0.0, 0.0, "the same code path on the same inputs: bit-identical")


def tolerance(kind: str, dtype: str | np.dtype | object, quantity: str = "y") -> Tolerance:
    """The tolerance for comparing ``quantity`` of ``dtype`` data in a comparison of ``kind``.

    ``dtype`` may be a NumPy dtype, its name, or a torch dtype (``torch.float32`` -> ``"float32"``).
    """
    name = str(dtype).removeprefix("torch.")
    name = np.dtype(name).name if name not in ("bfloat16",) else name
    try:
        return TOLERANCES[(kind, name, quantity)]
    except KeyError:
        known = ", ".join("/".join(key) for key in TOLERANCES)
        raise KeyError(f"no tolerance for {kind}/{name}/{quantity}; known: {known}") from None


def _as_float64(value) -> np.ndarray:
    """A NumPy float64 copy of a NumPy array, a torch tensor, a TF tensor or a Keras variable."""
    if hasattr(value, "detach"):  # torch: leave the graph and the device first
        value = value.detach().cpu().double().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # TF tensor, Keras variable
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def close(
    actual,
    expected,
    tol: Tolerance,
    *,
    what: str = "",
    scale: float | str | None = None,
    nan_equal: bool = False,
    same_dtype: bool = False,
    broadcast: bool = False,
) -> None:
    """Assert ``actual`` is within ``tol`` of ``expected``, naming the worst element if not.

    Elementwise ``|actual - expected| <= tol.atol + tol.rtol * |expected|``; with ``scale`` the relative
    part is ``tol.rtol * scale`` for every element (a bound relative to the quantity's magnitude, for
    values that cross zero); ``scale="magnitude"`` takes ``max(1, max |expected|)``. Shapes must match
    (a scalar ``expected`` is broadcast). NaN fails unless ``nan_equal``, where NaN must meet NaN; equal
    infinities agree. ``same_dtype`` also requires equal dtypes; ``broadcast`` lets ``expected`` broadcast
    to ``actual``'s shape (one global value that every replica must hold). The message gives the max absolute and
    relative error, where, and both values there.
    """
    label = f"{what}: " if what else ""
    if same_dtype:
        assert actual.dtype == expected.dtype, f"{label}dtype {actual.dtype} vs expected {expected.dtype}"
    got, want = _as_float64(actual), _as_float64(expected)
    if want.ndim == 0 or broadcast:
        want = np.broadcast_to(want, got.shape)
    assert got.shape == want.shape, f"{label}shape {got.shape} vs expected {want.shape}"
    if got.size == 0:
        return
    if scale == "magnitude":
        scale = max(1.0, float(np.nanmax(np.abs(want)))) if not np.isnan(want).all() else 1.0
    with np.errstate(invalid="ignore"):  # inf - inf is NaN: judged below
        err = np.abs(got - want)
    bound = tol.atol + tol.rtol * (np.abs(want) if scale is None else scale)
    ok = (err <= bound) | (got == want)
    if nan_equal:
        ok |= np.isnan(got) & np.isnan(want)
    if ok.all():
        return
    finite = np.where(ok, 0.0, np.where(np.isnan(err), np.inf, err))  # only the failing elements
    worst = np.unravel_index(int(np.argmax(finite)), err.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(want != 0, finite / np.abs(want), np.where(finite == 0, 0.0, np.inf))
    worst_rel = np.unravel_index(int(np.argmax(rel)), err.shape)
    relative_to = "|expected|" if scale is None else f"{scale:.3g}"
    raise AssertionError(
        f"{label}{int((~ok).sum())} of {got.size} values beyond {tol.atol:g} + {tol.rtol:g} * {relative_to}; "
        f"max abs error {err[worst]:.3g} at {tuple(map(int, worst))} "
        f"(actual {got[worst]:.9g}, expected {want[worst]:.9g}); "
        f"max rel error {rel[worst_rel]:.3g} at {tuple(map(int, worst_rel))}"
    )
