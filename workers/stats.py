"""Paired statistics of a cohort: is a model faster, cheaper, more accurate than the reference?

A cohort measures every model and the reference in the same rounds (one window each per
round, in a seeded random order), so slow drift of the machine lands on all of them alike.
The per-round ratio ``model / reference`` cancels it. Where a round's windows were
interleaved in slices (every model one slice per turn), the round's ratio is paired turn by
turn (:func:`turn_ratio`): the mean of the per-turn ratios with the highest and lowest
``TURN_TRIM`` of them set aside, so a burst of another process that lands on one slice
does not move the round. Over the rounds:

- the point estimate is the **median** ratio;
- the 95 % interval is a **t-interval on the log ratios** (``exp(mean +- t * sd / sqrt(n))``).
  At 7 rounds a plain percentile bootstrap is too narrow: over 1,000 synthetic A/A trials it
  excluded 1.0 ~12 % of the time, where the t-interval on logs excludes it ~5 % -- and with
  the practical margin below, calls identical distributions different well under 5 %
  (``tests/unit/test_stats.py`` checks both). The interval is exact, not resampled, so it
  needs no seed;
- the **verdict** is ``faster`` / ``slower`` (energy: ``cheaper`` / ``costlier``) only when
  the whole interval lies outside ``[1 - MARGIN, 1 + MARGIN]`` (a 2 % practical margin);
  anything else, including a single round, is ``same``.

Accuracy is compared on the *same test samples* with an exact McNemar test: of the samples
where exactly one of the two is right, are the model's wins and losses a fair coin? A
``better`` / ``worse`` verdict needs p < ``ALPHA``; so "within one point" is never decided by
four images of a 360-image split.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal, Sequence

CONFIDENCE = 0.95
# The share of a round's per-turn ratios set aside at each end (turn_ratio). Measured on a
# 2-vCPU VM, 5 models in 50 ms slices: the round-to-round CV of an A/A ratio was 3.8 % from
# the rounds' totals, 2.8 % from the median turn ratio and 2.6 % trimming 20 % each end.
TURN_TRIM = 0.2
MARGIN = 0.02  # a ratio within 2 % of 1 is no practical difference
ALPHA = 0.05  # McNemar's significance level

Verdict = Literal["faster", "slower", "same"]
CostVerdict = Literal["cheaper", "costlier", "same"]
AccuracyVerdict = Literal["better", "worse", "same"]


@dataclass(frozen=True)
class RatioEstimate:
    """A paired ratio over rounds: median, 95 % interval (None with fewer than 2 rounds),
    and the round-to-round coefficient of variation of the ratio."""

    ratio: float
    low: float | None
    high: float | None
    cv: float | None
    rounds: int

    def verdict(self, words: tuple[str, str] = ("faster", "slower")) -> str:
        """``words[0]`` when the interval lies wholly below ``1 - MARGIN``, ``words[1]``
        wholly above ``1 + MARGIN``, else ``same``."""
        if self.low is None or self.high is None:
            return "same"
        if self.high < 1.0 - MARGIN:
            return words[0]
        if self.low > 1.0 + MARGIN:
            return words[1]
        return "same"


def paired_ratio(model: Sequence[float], reference: Sequence[float]) -> RatioEstimate:
    """The ratio ``model[i] / reference[i]`` over rounds *i*, estimated as above.

    Both sequences hold one positive figure per round, in round order (time or energy per
    sample). Raises ValueError when they differ in length or hold a non-positive figure."""
    return ratio_estimate(_ratios(model, reference))


def _ratios(model: Sequence[float], reference: Sequence[float]) -> list[float]:
    if len(model) != len(reference) or not model:
        raise ValueError(f"paired figures need one value per round for both: got {len(model)} and {len(reference)}")
    if any(v <= 0 for v in (*model, *reference)):
        raise ValueError("paired figures must be positive (a time or an energy per sample)")
    return [m / r for m, r in zip(model, reference)]


def turn_ratio(model: Sequence[float], reference: Sequence[float], trim: float = TURN_TRIM) -> float:
    """One round's ratio from its interleaved turns: ``model[j] / reference[j]`` per turn
    *j* (each a positive figure per sample), averaged with ``floor(trim * n)`` of them set
    aside at each end (all kept under 3 turns). Raises ValueError like :func:`paired_ratio`."""
    ratios = sorted(_ratios(model, reference))
    k = int(trim * len(ratios)) if len(ratios) >= 3 else 0
    return statistics.fmean(ratios[k:len(ratios) - k])


def ratio_estimate(ratios: Sequence[float]) -> RatioEstimate:
    """The estimate above from one positive ratio per round."""
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError("a paired estimate needs one positive ratio per round")
    ratios = list(ratios)
    median = statistics.median(ratios)
    n = len(ratios)
    if n < 2:
        return RatioEstimate(median, None, None, None, n)
    logs = [math.log(x) for x in ratios]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    cv = statistics.stdev(ratios) / statistics.fmean(ratios)
    return RatioEstimate(median, math.exp(mean - half), math.exp(mean + half), cv, n)


def outlier_rounds(ratios: Sequence[float], k: float = 3.0) -> list[int]:
    """Rounds whose log ratio lies more than *k* robust standard deviations (1.4826 x the
    median absolute deviation) from the median: kept in every figure, and named so a reader
    sees them (an interval over 7 rounds already accounts for them)."""
    logs = [math.log(r) for r in ratios]
    if len(logs) < 3:
        return []
    center = statistics.median(logs)
    mad = statistics.median(abs(x - center) for x in logs) * 1.4826
    if mad == 0:
        return []
    return [i for i, x in enumerate(logs) if abs(x - center) > k * mad]


def identity_estimate(rounds: int) -> RatioEstimate:
    """The reference against itself: ratio 1, interval [1, 1], verdict ``same``."""
    return RatioEstimate(1.0, 1.0, 1.0, 0.0, rounds)


def t_quantile(p: float, df: int) -> float:
    """The *p* quantile of Student's t with *df* degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired correctness: ``b`` samples the reference got right and
    the model wrong, ``c`` the reverse; ``p`` the two-sided exact p-value."""

    b: int
    c: int
    p: float

    @property
    def verdict(self) -> AccuracyVerdict:
        if self.p >= ALPHA or self.b == self.c:
            return "same"
        return "better" if self.c > self.b else "worse"


def mcnemar(reference_correct: Sequence[bool], model_correct: Sequence[bool]) -> McNemar:
    """McNemar's exact test of two classifiers on the same samples (in the same order)."""
    if len(reference_correct) != len(model_correct):
        raise ValueError(f"McNemar needs the same samples for both: got {len(reference_correct)} "
                         f"and {len(model_correct)} predictions")
    b = sum(1 for r, m in zip(reference_correct, model_correct) if r and not m)
    c = sum(1 for r, m in zip(reference_correct, model_correct) if m and not r)
    n = b + c
    if n == 0:
        return McNemar(0, 0, 1.0)
    from scipy.stats import binom

    p = min(1.0, 2.0 * float(binom.cdf(min(b, c), n, 0.5)))
    return McNemar(b, c, p)


def pack_correct(correct: Sequence[bool]) -> dict[str, object]:
    """Which samples a model got right, as stored with its evaluation (one bit per test
    sample, in the split's order, hex): ``{"n": <samples>, "bits": "<hex>"}`` -- 2.5 KB for
    a 10,000-image test split. A later paired test (a conditional stage's gate) reads it."""
    out = bytearray((len(correct) + 7) // 8)
    for i, ok in enumerate(correct):
        if ok:
            out[i // 8] |= 0x80 >> (i % 8)
    return {"n": len(correct), "bits": out.hex()}


def unpack_correct(packed: object) -> list[bool]:
    """The inverse of :func:`pack_correct`; ValueError when *packed* is not one."""
    if not isinstance(packed, dict) or not isinstance(packed.get("n"), int) or not isinstance(packed.get("bits"), str):
        raise ValueError("no per-sample correctness stored with this evaluation")
    n, data = int(packed["n"]), bytes.fromhex(str(packed["bits"]))
    if len(data) != (n + 7) // 8:
        raise ValueError(f"per-sample correctness of {n} samples holds {len(data)} bytes")
    return [bool(data[i // 8] & (0x80 >> (i % 8))) for i in range(n)]


__all__ = ["ALPHA", "CONFIDENCE", "MARGIN", "McNemar", "RatioEstimate", "identity_estimate", "mcnemar",
           "outlier_rounds", "pack_correct", "paired_ratio", "t_quantile", "unpack_correct"]
