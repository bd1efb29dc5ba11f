"""The study-wide verdicts (docs/statistics.md): Holm across every test of the study, one family per question,
and the counts the report states. `aggregate` adds the columns; the report counts them with `test_counts`, so
both read one definition.

- The loss test: does the loss move one way where the feature fires? `p_adj_delta_ce_live` (Holm over every
  (layer, feature, value other than the identity) with a p-value), `significant` (read first), `testable`
  (False, "too rare to test", only when no outcome of the row's own sign-flip test could pass Holm).
- The random-direction comparison: does the feature's direction move the model unlike a random one?
  `p_adj_vs_random`, `more_than_random`, `less_than_random`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.stats.resampling import FWER, holm, holm_reachable

if TYPE_CHECKING:
    import pandas as pd


def add_study_tests(frame: pd.DataFrame, identity: float | None) -> pd.DataFrame:
    """`frame` (the joined per-layer tables) with the study-wide columns, each family over the rows that are a
    test: a value other than the intervention's identity, with a p-value. Significant + too rare + not shown =
    the tests."""
    import pandas as pd

    out = frame.copy()
    is_test_row = out["alpha"] != identity if identity is not None else pd.Series(True, index=out.index)
    p = out["p_delta_ce_live"].where(is_test_row)
    out["p_adj_delta_ce_live"] = holm(p.to_numpy())
    out["significant"] = out["p_adj_delta_ce_live"] <= FWER
    out["testable"] = holm_reachable(p.to_numpy(), out["min_p_delta_ce_live"].to_numpy())
    p_random = out["p_vs_random"].where(is_test_row)
    out["p_adj_vs_random"] = holm(p_random.to_numpy())
    beyond = out["p_adj_vs_random"] <= FWER
    out["more_than_random"] = beyond & (out["kl_ratio_random"] > 1)
    out["less_than_random"] = beyond & (out["kl_ratio_random"] < 1)
    return out


def test_counts(per_feature: pd.DataFrame) -> dict[str, int]:
    """The loss tests split three ways that sum to the number of tests: significant (read first), too rare to
    test (no outcome of its own test could pass Holm), not shown (the rest); and the random-direction
    comparisons: how many, more and less than random."""
    tests = per_feature[per_feature["p_adj_delta_ce_live"].notna()]
    sig = tests["significant"].astype(bool)
    rare = ~tests["testable"].astype(bool) & ~sig
    versus = per_feature[per_feature["p_adj_vs_random"].notna()]
    return {"tests": len(tests), "significant": int(sig.sum()), "too_rare": int(rare.sum()),
            "not_shown": int((~sig & ~rare).sum()), "random_tests": len(versus),
            "more_than_random": int(versus["more_than_random"].astype(bool).sum()),
            "less_than_random": int(versus["less_than_random"].astype(bool).sum())}
