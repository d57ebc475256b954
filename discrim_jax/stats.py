"""Paired statistics for the comparison and study tables, from libraries:
SciPy's t quantiles, t-test and exact sign-flip permutation test, and
statsmodels' Holm correction.

Every objective is compared with CE over the same seeds (same initialisation
and data order), so the unit is the per-seed difference ``d_s = x_s - ce_s``.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

# pylint: disable=g-import-not-at-top,wrong-import-position
import math
from typing import Any

import numpy as np

# Below these a table says, beside its intervals, that they cannot carry a
# claim: too few seeds to estimate the spread, or a test set so small that
# one image moves the accuracy by more than the effects studied.
MIN_SEEDS = 5
MIN_TEST_EXAMPLES = 1000


def paired(values, base) -> dict[str, Any]:
  """The paired comparison of ``values`` with ``base`` (same seeds):
  ``diff_to_ce_mean``, ``diff_to_ce_ci95`` (95% t-interval; None from one
  seed), ``p_t`` (two-sided one-sample t-test) and ``p_sign_flip`` (exact
  two-sided sign-flip permutation test of the mean; with n seeds it cannot
  go below 2 / 2**n)."""
  from scipy import stats
  diff = np.asarray(values, float) - np.asarray(base, float)
  out: dict[str, Any] = {"diff_to_ce_mean": float(diff.mean()),
                         "diff_to_ce_ci95": None, "p_t": None,
                         "p_sign_flip": None}
  if len(diff) < 2:
    return out
  sd = diff.std(ddof=1)
  out["diff_to_ce_ci95"] = t_interval(diff, 0.95)
  if sd > 0:
    out["p_t"] = float(stats.ttest_1samp(diff, 0.0).pvalue)
  elif diff.mean() != 0:
    out["p_t"] = 0.0
  else:
    out["p_t"] = 1.0
  out["p_sign_flip"] = float(stats.permutation_test(
      (diff,), np.mean, permutation_type="samples", n_resamples=np.inf,
      alternative="two-sided").pvalue)
  return out


def t_interval(diff, level: float) -> list[float]:
  """The two-sided t-interval of the mean of ``diff`` at ``level`` (e.g.
  1 - 0.05 / m: Bonferroni's simultaneous interval over m comparisons)."""
  from scipy import stats
  diff = np.asarray(diff, float)
  half = float(stats.t.ppf(0.5 + level / 2, len(diff) - 1)) * (
      diff.std(ddof=1) / math.sqrt(len(diff)))
  return [float(diff.mean() - half), float(diff.mean() + half)]


def holm(pvalues: list[float | None]) -> list[float | None]:
  """Holm-adjusted p-values of a family (None stays None, and is not
  counted in the family)."""
  from statsmodels.stats.multitest import multipletests
  known = [i for i, p in enumerate(pvalues) if p is not None]
  out: list[float | None] = [None] * len(pvalues)
  if known:
    adjusted = multipletests([pvalues[i] for i in known], method="holm")[1]
    for i, p in zip(known, adjusted):
      out[i] = float(p)
  return out


def caveat(seeds: int, test_examples: int | None) -> str:
  """The warning a table prints beside its intervals, or ''."""
  reasons = []
  if seeds < MIN_SEEDS:
    reasons.append(f"{seeds} seed{'s' * (seeds != 1)} (fewer than {MIN_SEEDS})")
  if test_examples is not None and test_examples < MIN_TEST_EXAMPLES:
    reasons.append(f"{test_examples} test images (fewer than "
                   f"{MIN_TEST_EXAMPLES:,})")
  if not reasons:
    return ""
  return ("Too little to carry a claim: " + " and ".join(reasons)
          + "; read the intervals as descriptive only.")
