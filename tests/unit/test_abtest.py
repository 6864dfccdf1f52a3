"""The statistics of online A/B tests (scaleforge.serve.abtest): running sums per version, the fixed-horizon
intervals and tests against known values and scipy, the always-valid mSPRT held to its false-positive rate by
A/A experiments peeked at after every batch (where a peeked z-test fails), and verdicts that name the better
version."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import special, stats

from scaleforge.errors import UsageError
from scaleforge.serve.abtest import (
    KEEP_CONTROL,
    NOT_ENOUGH_DATA,
    PROMOTE,
    SequentialState,
    VersionOutcomes,
    ab_report,
    mixture_half_width,
    mixture_p_value,
    proportion_difference_variance,
    t_interval,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)

ALPHA = 0.05
EXPERIMENTS = 2000
BATCHES, BATCH = 50, 20  # outcomes per arm arrive 20 at a time; the report is read after each batch


def labelled(correct: int, total: int, requests: int | None = None) -> VersionOutcomes:
    """A version with `correct` right labels out of `total`."""
    sums = VersionOutcomes(requests=total if requests is None else requests)
    for index in range(total):
        sums.add_label(index < correct)
    return sums


def rewarded(rewards: np.ndarray) -> VersionOutcomes:
    """A version with these rewards, one request each."""
    sums = VersionOutcomes(requests=len(rewards))
    for reward in rewards:
        sums.add_reward(float(reward))
    return sums


def a_a_false_positives(mde: float) -> tuple[float, float]:
    """The share of A/A experiments (both arms right 80% of the time) in which some look rejects "no difference":
    by the always-valid mSPRT p-value, and by the fixed-horizon z-test read at every look. Vectorised over the
    experiments with the module's own statistics, as `ab_report` computes them one experiment at a time."""
    rng = np.random.default_rng(20261205)
    control = rng.binomial(BATCH, 0.8, size=(BATCHES, EXPERIMENTS)).cumsum(axis=0).astype(float)
    challenger = rng.binomial(BATCH, 0.8, size=(BATCHES, EXPERIMENTS)).cumsum(axis=0).astype(float)
    always_valid = np.ones(EXPERIMENTS)
    peeked = np.zeros(EXPERIMENTS, dtype=bool)
    for look in range(BATCHES):
        n = float(BATCH * (look + 1))
        difference = challenger[look] / n - control[look] / n
        variance = proportion_difference_variance(control[look], n, challenger[look], n, pooled=True)
        always_valid = np.minimum(always_valid, mixture_p_value(difference, variance, mde**2))
        pooled = (control[look] + challenger[look]) / (2 * n)
        error = np.sqrt(pooled * (1 - pooled) * 2 / n)
        z = np.divide(difference, error, out=np.zeros(EXPERIMENTS), where=error > 0)
        peeked |= 2 * special.ndtr(-np.abs(z)) < ALPHA
    return float(np.mean(always_valid < ALPHA)), float(np.mean(peeked))


@pytest.mark.parametrize("mde", [0.02, 0.05], ids=["default-mde", "mixture-tuned-to-the-horizon"])
def test_peeking_at_the_always_valid_test_keeps_false_positives_at_alpha(mde: float) -> None:
    always_valid, peeked = a_a_false_positives(mde)
    margin = 3 * math.sqrt(ALPHA * (1 - ALPHA) / EXPERIMENTS)
    assert always_valid <= ALPHA + margin, f"mSPRT: {always_valid:.2%} of A/A experiments rejected"
    assert peeked > ALPHA + 0.1, f"the peeked z-test rejected only {peeked:.2%}: the simulation cannot tell"


def test_the_report_read_at_every_batch_agrees_with_the_vectorised_a_a_test() -> None:
    rng = np.random.default_rng(7)
    tau2 = 0.05**2
    for _ in range(20):
        control, challenger = VersionOutcomes(), VersionOutcomes()
        state, best = None, 1.0
        for _ in range(BATCHES):
            for sums in (control, challenger):
                for right in rng.random(BATCH) < 0.8:
                    sums.add_request()
                    sums.add_label(bool(right))
            report = ab_report({"1": control, "2": challenger}, control="1", mde=0.05, state=state)
            state = report.state
            n = float(control.labelled)
            args = (float(control.correct), n, float(challenger.correct), n)
            variance = proportion_difference_variance(*args, pooled=True)
            best = min(best, float(mixture_p_value(args[2] / n - args[0] / n, variance, tau2)))
            row = report.rows[1]
            assert row.always_valid_p_value == pytest.approx(best, rel=1e-12)
            assert (row.verdict in (PROMOTE, KEEP_CONTROL) and "always-valid" in (row.reason or "")) == (best < ALPHA)


def run_until_decided(rates: dict[str, float], control: str, seed: int, *, step: int = 100, limit: int = 20_000):
    """Labelled traffic to two versions until the report decides: the verdict and the outcomes per arm by then."""
    rng = np.random.default_rng(seed)
    sums = {version: VersionOutcomes() for version in rates}
    state = None
    for looks in range(1, limit // step + 1):
        for version, rate in rates.items():
            for right in rng.random(step) < rate:
                sums[version].add_request()
                sums[version].add_label(bool(right))
        report = ab_report(sums, control=control, state=state)
        state = report.state
        challenger = report.rows[1]
        if challenger.verdict != NOT_ENOUGH_DATA:
            return challenger.verdict, looks * step
    return NOT_ENOUGH_DATA, limit


@pytest.mark.parametrize("seed", [1, 2])
def test_the_verdict_names_the_better_version(seed: int) -> None:
    verdict, outcomes = run_until_decided({"1": 0.80, "2": 0.85}, control="1", seed=seed)
    assert verdict == PROMOTE and outcomes <= 10_000, (verdict, outcomes)
    verdict, outcomes = run_until_decided({"1": 0.85, "2": 0.80}, control="1", seed=seed)
    assert verdict == KEEP_CONTROL and outcomes <= 10_000, (verdict, outcomes)


def test_welch_t_test_and_t_interval_agree_with_scipy() -> None:
    rng = np.random.default_rng(3)
    control, challenger = rng.normal(1.0, 1.0, 40), rng.normal(1.4, 2.5, 25)
    ours = welch_t_test(
        control.mean(), control.var(ddof=1), len(control), challenger.mean(), challenger.var(ddof=1), len(challenger)
    )
    theirs = stats.ttest_ind(challenger, control, equal_var=False)
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-10)
    assert ours.degrees_of_freedom == pytest.approx(theirs.df, rel=1e-10)
    sums = rewarded(challenger)
    low, high = t_interval(sums.reward_mean, sums.variance("reward") or 0.0, sums.rewarded)
    expected = stats.t.interval(0.95, len(challenger) - 1, loc=challenger.mean(), scale=stats.sem(challenger))
    assert (low, high) == pytest.approx(expected, rel=1e-10)


def test_rewards_are_compared_by_welch_and_decided_by_the_msprt() -> None:
    rng = np.random.default_rng(5)
    control, challenger = VersionOutcomes(), VersionOutcomes()
    state, verdict, looks = None, NOT_ENOUGH_DATA, 0
    while verdict == NOT_ENOUGH_DATA and looks < 100:
        looks += 1
        for sums, mean in ((control, 1.0), (challenger, 1.3)):
            for reward in rng.normal(mean, 1.0, 50):
                sums.add_request()
                sums.add_reward(float(reward))
        report = ab_report({"a": control, "b": challenger}, control="a", mde=0.1, state=state)
        state, row = report.state, report.rows[1]
        verdict = row.verdict
    assert report.metric == "reward" and verdict == PROMOTE and looks < 100
    assert row.p_value is not None and row.p_value < ALPHA
    assert row.interval_of_difference is not None and row.interval_of_difference[0] > 0  # type: ignore[operator]


def test_peeking_at_the_reward_msprt_keeps_false_positives_at_alpha() -> None:
    rng = np.random.default_rng(11)
    experiments, batches, batch, tau2 = 1000, 30, 20, 0.3**2
    rewards = rng.exponential(1.0, size=(2, batches * batch, experiments))  # skewed, as rewards often are
    always_valid = np.ones(experiments)
    for look in range(1, batches + 1):
        seen = rewards[:, : look * batch]
        means, variances = seen.mean(axis=1), seen.var(axis=1, ddof=1)
        variance = (variances[0] + variances[1]) / (look * batch)
        always_valid = np.minimum(always_valid, mixture_p_value(means[1] - means[0], variance, tau2))
    assert np.mean(always_valid < ALPHA) <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / experiments)


def test_wilson_interval_and_z_test_match_known_values() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    result = two_proportion_z_test(45, 100, 60, 100)  # pooled 0.525, standard error 0.0706222
    assert result.difference == pytest.approx(0.15)
    assert result.statistic == pytest.approx(2.123977, abs=1e-6)
    assert result.p_value == pytest.approx(0.033672, abs=1e-6)


def test_the_mixture_interval_rejects_exactly_where_the_p_value_does() -> None:
    variance, tau2 = 1e-4, 4e-4
    half = float(mixture_half_width(variance, tau2, ALPHA))
    assert float(mixture_p_value(half, variance, tau2)) == pytest.approx(ALPHA, rel=1e-9)
    assert float(mixture_p_value(0.0, variance, tau2)) == 1.0


def test_a_small_experiment_has_not_enough_data_and_says_how_much_more() -> None:
    report = ab_report({"1": labelled(160, 200, 300), "2": labelled(165, 200, 250)})
    control, challenger = report.rows
    assert report.control == "1" and control.version == "1" and challenger.verdict == NOT_ENOUGH_DATA
    assert challenger.still_needed is not None and challenger.still_needed > 1000
    assert control.still_needed == challenger.still_needed  # both arms hold 200 labels
    assert report.mde == 0.02 and report.tau2 == pytest.approx(0.02**2)
    table = report.table()
    assert table[0][3] == "accuracy" and table[1][0] == "1 (control)" and table[2][9] == NOT_ENOUGH_DATA
    assert all(len(line) == len(table[0]) for line in table)
    json.dumps(report.to_dict(), allow_nan=False)


def test_a_challenger_that_cannot_be_better_by_the_mde_keeps_the_control() -> None:
    report = ab_report({"1": labelled(8000, 10_000), "2": labelled(8000, 10_000)})
    assert report.rows[1].verdict == KEEP_CONTROL and "MDE" in (report.rows[1].reason or "")


def test_merged_outcomes_equal_outcomes_added_to_one() -> None:
    rng = np.random.default_rng(9)
    rewards = rng.normal(1000.0, 0.5, 300)  # a large mean and a small spread: a test of the variance's numerics
    first, second, one = rewarded(rewards[:120]), rewarded(rewards[120:]), rewarded(rewards)
    for sums, rights in ((first, [True, False]), (second, [True]), (one, [True, False, True])):
        for right in rights:
            sums.add_label(right)
    merged = first.merged(second)
    assert (merged.requests, merged.labelled, merged.correct, merged.rewarded) == (300, 3, 2, 300)
    assert merged.reward_mean == pytest.approx(one.reward_mean, rel=1e-12)
    assert merged.variance("reward") == pytest.approx(rewards.var(ddof=1), rel=1e-9)
    assert merged.variance("reward") == pytest.approx(one.variance("reward"), rel=1e-9)
    assert VersionOutcomes().merged(VersionOutcomes()) == VersionOutcomes()


def test_outcomes_and_state_round_trip_through_json() -> None:
    sums = rewarded(np.array([1.0, 2.5, -0.5]))
    sums.add_label(True)
    assert VersionOutcomes.from_dict(json.loads(json.dumps(sums.to_dict()))) == sums
    with pytest.raises(ValueError, match="unknown keys"):
        VersionOutcomes.from_dict({"requests": 1, "rewards": 2})
    report = ab_report({"1": labelled(700, 1000), "2": labelled(760, 1000)})
    state = SequentialState.from_dict(json.loads(json.dumps(report.state.to_dict(), allow_nan=False)))
    assert state == report.state
    again = ab_report({"1": labelled(700, 1000), "2": labelled(760, 1000)}, state=state)
    assert again.rows[1].always_valid_p_value == report.rows[1].always_valid_p_value


def test_mistakes_are_reported_in_one_line() -> None:
    with pytest.raises(UsageError, match="--mde"):
        ab_report({"1": rewarded(np.ones(3))})
    with pytest.raises(UsageError, match="both labels and rewards"):
        ab_report({"1": rewarded(np.ones(3)), "2": labelled(1, 2)})
    with pytest.raises(UsageError, match="control version '9'"):
        ab_report({"1": labelled(1, 2)}, control="9")
