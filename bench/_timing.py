"""Timing shared by the benchmarks: interleaved rounds, medians with their spread, paired ratios.

Variants are timed in rounds, each variant once per round in rotating order, so load drift on a shared machine
hits all of them alike; warm-up rounds (tracing, compilation, allocation) are run and discarded first. A ratio
between two variants of one process is the median of the per-round ratios (each pair ran back to back, under
nearly the same load); across processes only the ratio of medians exists.

A verdict against a goal carries the noise: :func:`ratio_interval` is a distribution-free confidence interval for
that ratio (order statistics of the per-round ratios, assuming only that rounds are independent and identically
distributed), and :func:`verdict` says PASS only if the whole interval meets the goal, MISS only if none of it does,
and "PARITY (within noise)" otherwise, which is never counted as a PASS.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

try:
    import resource
except ImportError:  # not on Windows
    resource = None

__all__ = [
    "CONFIDENCE",
    "PARITY",
    "interleaved_rounds",
    "median_interval",
    "paired_ratio",
    "ratio_interval",
    "spread",
    "verdict",
]

CONFIDENCE = 0.95  # nominal coverage of every interval a verdict rests on
PARITY = "PARITY (within noise)"


def interleaved_rounds(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    page_faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Each callable must return only after its work is done (synchronize on an output inside it). ``page_faults``
    (a dict, filled in): the process's minor page faults during each timed call, per variant. Why: where the C
    allocator hands memory back to the OS and takes it again, first touches of the same buffers cost ~1-2 us per
    4 KiB page, which can move a variant's time by tens of percent depending on what else ran in the process.
    """
    names = list(variants)
    for _ in range(warmup if repeats > 0 else 0):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    if page_faults is not None:
        page_faults.update({name: [] for name in names})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            faults = _minor_faults()
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
            if page_faults is not None:
                page_faults[name].append(_minor_faults() - faults)
    return seconds


def _minor_faults() -> int:
    """Minor page faults of this process so far (every thread; 0 where ``resource`` is missing, as on Windows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and quartiles (``statistics.quantiles``' exclusive method; the median for fewer than 2 values)."""
    median = statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median, median, median)
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator / denominator (both timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(low, high, coverage)``: a distribution-free confidence interval for the median of ``values``.

    The k-th smallest and k-th largest value bound the median with probability 1 - 2 P(Bin(n, 1/2) < k) for any
    continuous distribution of independent values; k is the largest with that coverage >= ``confidence``. For too
    few values (n < 6 at 95%) no k reaches it: the interval is then the whole range and ``coverage`` says how much
    less it holds.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    # Exact integers: 2**n overflows a float from n = 1024 on (bench/ab_torch_ref.py runs thousands of rounds).
    # tail = sum_{i < k} C(n, i), grown one term per k; coverage(k) = 1 - 2 tail / 2**n.
    total, tail, k = 2**n, 1, 1
    while k + 1 <= (n + 1) // 2 and 1.0 - 2 * (tail + math.comb(n, k)) / total >= confidence:
        tail += math.comb(n, k)
        k += 1
    return ordered[k - 1], ordered[n - k], 1.0 - 2 * tail / total


def ratio_interval(
    numerator: Sequence[float], denominator: Sequence[float], paired: bool, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """``(low, high, coverage)`` for a time ratio: paired (same rounds) or a ratio of medians (two processes).

    Paired: :func:`median_interval` of the per-round ratios. Unpaired: each median's interval at
    ``sqrt(confidence)``, divided crosswise (low / high, high / low); both hold together with at least the product
    of their coverages, since the two samples are independent.
    """
    if paired:
        return median_interval([a / b for a, b in zip(numerator, denominator, strict=True)], confidence)
    a_low, a_high, a_coverage = median_interval(numerator, math.sqrt(confidence))
    b_low, b_high, b_coverage = median_interval(denominator, math.sqrt(confidence))
    return a_low / b_high, a_high / b_low, a_coverage * b_coverage


def verdict(low: float, high: float, goal: float | None) -> str:
    """PASS if the interval lies at or below ``goal``, MISS if above it, :data:`PARITY` if it spans it; "info"
    for a ratio without a goal."""
    if goal is None:
        return "info"
    if high <= goal:
        return "PASS"
    if low > goal:
        return "MISS"
    return PARITY
