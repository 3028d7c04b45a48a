"""bench/_timing.py's verdicts under noise, on fixed numbers (nothing here asserts a time).

Oracles: order statistics and binomial coverages derived by hand in the comments, scipy's binomial distribution,
and the coverage of the intervals over seeded samples whose true median is known.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _timing import PARITY, interleaved_rounds, median_interval, ratio_interval, verdict  # noqa: E402  (bench/_timing.py)


@pytest.mark.parametrize(
    ("n", "k", "coverage"),
    [
        # 1 - 2 P(Bin(n, 1/2) <= k - 1): n = 5 cannot reach 95% (1 - 2/32), so the whole range, and says so
        pytest.param(5, 1, 1 - 2 / 32, id="n5-whole-range-below-95"),
        pytest.param(7, 1, 1 - 2 / 128, id="n7-min-max"),  # k = 2 would give 1 - 2*8/128 = 87.5%
        pytest.param(11, 2, 1 - 2 * 12 / 2048, id="n11"),  # k = 3: 1 - 2*67/2048 = 93.5%
        pytest.param(15, 4, 1 - 2 * 576 / 32768, id="n15"),  # 1 + 15 + 105 + 455 = 576; k = 5: 88.2%
        pytest.param(21, 6, None, id="n21"),
        pytest.param(2000, 956, None, id="n2000"),  # 2**2000 overflows a float: ab_torch_ref's 2000 pairs
    ],
)
def test_median_interval_is_the_kth_order_statistics_with_binomial_coverage(n, k, coverage):
    stats = pytest.importorskip("scipy.stats")
    values = [float(v) for v in np.random.default_rng(n).permutation(np.arange(100, 100 + n))]
    low, high, covered = median_interval(values)
    assert (low, high) == (100 + k - 1, 100 + n - k)
    exact = 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)
    assert covered == pytest.approx(exact, abs=1e-12)
    if coverage is not None:
        assert covered == pytest.approx(coverage, abs=1e-12)
    if k > 1 or n >= 6:  # the widest k that still reaches 95%: one more would not
        assert covered >= 0.95 > 1 - 2 * stats.binom.cdf(k, n, 0.5)


@pytest.mark.parametrize("n", [7, 11, 21, 33])
def test_median_intervals_cover_the_true_median_at_least_as_often_as_they_claim(n):
    # Lognormal times (skewed like timings), true median exp(0) = 1. 4000 seeded samples: the observed coverage's
    # standard error is sqrt(0.95 * 0.05 / 4000) = 0.0034, so 3 of them below the claimed coverage is the bound.
    rng = np.random.default_rng(2026 + n)
    samples = rng.lognormal(0.0, 0.3, size=(4000, n))
    hits, claimed = 0, None
    for sample in samples:
        low, high, claimed = median_interval(sample.tolist())
        hits += low <= 1.0 <= high
    assert hits / len(samples) >= claimed - 3 * math.sqrt(claimed * (1 - claimed) / len(samples))


def test_paired_ratio_interval_takes_order_statistics_of_the_per_round_ratios():
    denominator = [10.0, 20.0, 10.0, 40.0, 10.0, 10.0, 20.0]
    ratios = [1.10, 0.90, 1.00, 1.05, 0.97, 1.20, 1.02]
    numerator = [r * d for r, d in zip(ratios, denominator, strict=True)]
    low, high, coverage = ratio_interval(numerator, denominator, paired=True)
    assert (low, high) == pytest.approx((0.90, 1.20), rel=1e-12)  # n = 7: min and max of the ratios
    assert coverage == 1 - 2 / 128


def test_unpaired_ratio_interval_divides_each_medians_interval_crosswise():
    # n = 7 per side at sqrt(0.95) = 0.9747 each: 1 - 2/128 = 0.984 is reached only by min..max.
    numerator = [5.0, 6.0, 7.0, 6.5, 5.5, 6.2, 5.8]
    denominator = [2.0, 2.5, 2.2, 2.4, 2.1, 2.3, 2.6]
    low, high, coverage = ratio_interval(numerator, denominator, paired=False)
    assert (low, high) == pytest.approx((5.0 / 2.6, 7.0 / 2.0), rel=1e-12)
    assert coverage == pytest.approx((1 - 2 / 128) ** 2, rel=1e-12)


@pytest.mark.parametrize(
    ("low", "high", "goal", "expected"),
    [
        pytest.param(0.90, 0.99, 1.00, "PASS", id="below-goal"),
        pytest.param(0.90, 1.00, 1.00, "PASS", id="upper-end-at-goal"),
        pytest.param(0.98, 1.03, 1.00, PARITY, id="spans-goal"),
        pytest.param(1.00, 1.10, 1.00, PARITY, id="lower-end-at-goal"),
        pytest.param(1.01, 1.20, 1.00, "MISS", id="above-goal"),
        pytest.param(1.10, 1.40, 1.25, PARITY, id="spans-1.25"),
        pytest.param(1.30, 1.40, 1.25, "MISS", id="above-1.25"),
        pytest.param(1.70, 1.80, None, "info", id="no-goal"),
    ],
)
def test_verdict_is_pass_only_when_the_whole_interval_meets_the_goal(low, high, goal, expected):
    assert verdict(low, high, goal) == expected


def test_a_median_ratio_of_1_003_with_wide_rounds_is_parity_not_a_miss():
    # The README's LeNet tf.function row before verdicts carried noise: median 1.003 was called MISS.
    ratios = [0.80, 0.95, 1.003, 1.27, 1.01, 0.99, 1.08]
    low, high, _ = ratio_interval(ratios, [1.0] * 7, paired=True)
    assert verdict(low, high, 1.00) == PARITY


def test_interleaved_rounds_counts_the_page_faults_of_each_timed_call():
    """A variant that touches fresh pages each call shows them; one that allocates nothing does not. The count is
    the kernel's own (getrusage); the oracle is the number of pages touched by hand."""
    # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB on 64-bit), so every call maps fresh pages
    pages = 16384

    def fresh_pages():
        return len(bytearray(pages * 4096))  # fresh pages from the OS, which bytearray zero-fills: all touched

    faults: dict[str, list[int]] = {}
    seconds = interleaved_rounds({"fresh": fresh_pages, "none": lambda: None}, repeats=5, warmup=1, page_faults=faults)
    assert set(faults) == set(seconds) == {"fresh", "none"}
    assert [len(counts) for counts in faults.values()] == [5, 5]
    assert statistics.median(faults["fresh"]) >= pages // 2  # transparent huge pages could lower it, not to 0
    assert statistics.median(faults["none"]) < 16
