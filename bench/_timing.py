"""Timing shared by the benchmarks: interleaved rounds, medians with their spread, paired ratios.

Variants are timed in rounds, each variant once per round in rotating order, so load drift on a shared machine
hits all of them alike; warm-up rounds (tracing, compilation, allocation) are run and discarded first. A ratio
between two variants of one process is the median of the per-round ratios (each pair ran back to back, under
nearly the same load); across processes only the ratio of medians exists.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["interleaved_rounds", "paired_ratio", "spread"]


def interleaved_rounds(
    variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Each callable must return only after its work is done (synchronize on an output inside it).
    """
    names = list(variants)
    for _ in range(warmup if repeats > 0 else 0):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and quartiles (``statistics.quantiles``' exclusive method; the median for fewer than 2 values)."""
    median = statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median, median, median)
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator / denominator (both timed in the same rounds)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
