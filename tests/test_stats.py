"""The tables' statistics: t-intervals, t and sign-flip p-values, Holm.

Expected values are computed here with the definitions (float64, a few
operations each): they agree with the library's to float64 rounding, so
``rel=1e-12`` holds on any CPU."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from discrim_jax import stats

REL = 1e-12


def test_paired_interval_and_p_values_follow_their_definitions():
  values, base = [0.80, 0.83, 0.79, 0.85, 0.81], [0.78, 0.80, 0.80, 0.81, 0.79]
  out = stats.paired(values, base)
  d = np.subtract(values, base)
  half = scipy_stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
  assert out["diff_to_ce_mean"] == pytest.approx(d.mean(), rel=REL)
  assert out["diff_to_ce_ci95"] == pytest.approx([d.mean() - half, d.mean() + half],
                                                 rel=REL)
  t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
  # The library's t comes from scipy's ttest_1samp, which sums in its own
  # order: the two t values differ by a few float64 ulps (~1e-15 relative),
  # and p = 2 sf(t) turns that into |t sf'(t) / sf(t)| (2.6 here)
  # times as much relative error in p: 1e-9 bounds it with a wide margin.
  assert out["p_t"] == pytest.approx(2 * scipy_stats.t.sf(abs(t), 4), rel=1e-9)
  # Sign flips of (+2, +3, -1, +4, +2) points (mean 2): |mean| >= 2 for the
  # data itself, with the -1 flipped (mean 2.4), and both negated: 4 of 32.
  assert out["p_sign_flip"] == pytest.approx(4 / 32, rel=REL)


def test_sign_flip_floor_and_one_seed():
  out = stats.paired([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
  assert out["p_sign_flip"] == pytest.approx(2 / 2**5, rel=REL)  # the floor
  one = stats.paired([0.8], [0.7])
  assert one["diff_to_ce_ci95"] is None and one["p_t"] is None
  assert one["diff_to_ce_mean"] == pytest.approx(0.1, rel=REL)


def test_holm_adjusts_a_family_and_keeps_missing_values_out():
  # Holm: sorted p (0.01, 0.03, 0.04) times (3, 2, 1), made monotone.
  assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], rel=REL)
  assert stats.holm([None, 0.02, 0.04]) == [None, pytest.approx(0.04, rel=REL),
                                            pytest.approx(0.04, rel=REL)]


def test_caveat_names_what_is_too_small():
  assert stats.caveat(5, 10_000) == ""
  text = stats.caveat(2, 100)
  assert "2 seeds (fewer than 5)" in text and "100 test images" in text
