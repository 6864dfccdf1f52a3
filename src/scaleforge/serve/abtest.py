"""The statistics of an online A/B test between the versions of a served model: pure functions and small state,
no HTTP (docs/ab-testing.md).

Each version keeps a `VersionOutcomes`: its requests and the outcomes that came back for them, a true label
(right or wrong: accuracy) or a numeric reward (mean reward). They are running sums, merged across worker
processes with `merged` and stored as plain JSON with `to_dict` / `from_dict`.

`ab_report` compares every challenger with the control version:

- fixed-horizon statistics: accuracy with a 95% Wilson interval, mean reward with a 95% t interval; the difference
  to the control with a pooled two-proportion z-test (accuracy) or Welch's t-test (rewards). Their p-values are
  valid only for one look at a sample size fixed in advance;
- an always-valid test, the mixture sequential probability ratio test (mSPRT) with a normal mixture of variance
  `tau2` over the difference (Johari, Pekelis and Walsh, "Always valid inference", the test of Optimizely's Stats
  Engine). Its p-value is the running minimum over looks and its interval the running intersection, kept in a
  `SequentialState` the caller passes to the next look; the report may be read as often as one likes and the
  chance that any look ever rejects a true "no difference" stays at most alpha;
- a verdict for each challenger: promote, keep the control, or not enough data yet with the outcomes still needed
  per arm for the minimum detectable effect (MDE).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy import special  # a requirement of scikit-learn, itself a core dependency

from scaleforge.errors import UsageError

Metric = Literal["accuracy", "reward"]
Verdict = Literal["promote", "keep the control", "not enough data yet"]
PROMOTE: Verdict = "promote"
KEEP_CONTROL: Verdict = "keep the control"
NOT_ENOUGH_DATA: Verdict = "not enough data yet"

DEFAULT_ACCURACY_MDE = 0.02  # two points of accuracy
# Below this many outcomes in either arm, a look does not count: the plug-in variance of fewer outcomes is too
# uncertain for the normal approximation the mSPRT rests on (with rewards it would understate the variance).
MIN_SEQUENTIAL_OUTCOMES = 20

Values = TypeVar("Values", float, NDArray[np.float64])


@dataclass
class VersionOutcomes:
    """One version's running sums: requests answered, labelled outcomes (and how many were right), rewarded
    outcomes (their count, mean and sum of squared deviations, updated as Welford's algorithm does)."""

    requests: int = 0
    labelled: int = 0
    correct: int = 0
    rewarded: int = 0
    reward_mean: float = 0.0
    reward_m2: float = 0.0

    @property
    def outcomes(self) -> int:
        """Outcomes received, labels and rewards together."""
        return self.labelled + self.rewarded

    def add_request(self) -> None:
        """Count one answered request."""
        self.requests += 1

    def add_label(self, correct: bool) -> None:
        """Count one labelled outcome, right or wrong."""
        self.labelled += 1
        self.correct += int(correct)

    def add_reward(self, reward: float) -> None:
        """Count one numeric reward."""
        if not math.isfinite(reward):
            raise ValueError(f"a reward must be a finite number, got {reward!r}")
        self.rewarded += 1
        delta = reward - self.reward_mean
        self.reward_mean += delta / self.rewarded
        self.reward_m2 += delta * (reward - self.reward_mean)

    def merged(self, other: VersionOutcomes) -> VersionOutcomes:
        """The sums of both, as if every outcome had been added to one (Chan et al.'s merge of mean and M2)."""
        rewarded = self.rewarded + other.rewarded
        delta = other.reward_mean - self.reward_mean
        share = other.rewarded / rewarded if rewarded else 0.0
        mean = self.reward_mean + delta * share
        m2 = self.reward_m2 + other.reward_m2 + delta**2 * self.rewarded * share
        return VersionOutcomes(
            requests=self.requests + other.requests,
            labelled=self.labelled + other.labelled,
            correct=self.correct + other.correct,
            rewarded=rewarded,
            reward_mean=mean,
            reward_m2=m2,
        )

    def count(self, metric: Metric) -> int:
        """The outcomes that count for `metric`."""
        return self.labelled if metric == "accuracy" else self.rewarded

    def mean(self, metric: Metric) -> float | None:
        """Accuracy or mean reward; None without outcomes."""
        if metric == "accuracy":
            return self.correct / self.labelled if self.labelled else None
        return self.reward_mean if self.rewarded else None

    def variance(self, metric: Metric) -> float | None:
        """The per-outcome variance: p(1 - p) for accuracy, the sample variance of rewards; None when unknown."""
        if metric == "accuracy":
            return None if not self.labelled else self.correct / self.labelled * (1 - self.correct / self.labelled)
        return self.reward_m2 / (self.rewarded - 1) if self.rewarded > 1 else None

    def to_dict(self) -> dict[str, Any]:
        """The sums as a JSON-ready dict."""
        return {
            "requests": self.requests,
            "labelled": self.labelled,
            "correct": self.correct,
            "rewarded": self.rewarded,
            "reward_mean": self.reward_mean,
            "reward_m2": self.reward_m2,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VersionOutcomes:
        """The sums `to_dict` wrote; a missing key counts zero, an unknown key is an error."""
        unknown = set(data) - set(cls().to_dict())
        if unknown:
            raise ValueError(f"unknown keys in a version's outcomes: {sorted(unknown)}")
        return cls(
            requests=int(data.get("requests", 0)),
            labelled=int(data.get("labelled", 0)),
            correct=int(data.get("correct", 0)),
            rewarded=int(data.get("rewarded", 0)),
            reward_mean=float(data.get("reward_mean", 0.0)),
            reward_m2=float(data.get("reward_m2", 0.0)),
        )


@dataclass(frozen=True)
class TestResult:
    """A fixed-horizon test of the difference challenger minus control: its statistic, p-value (two-sided) and,
    for Welch's t, the Welch–Satterthwaite degrees of freedom."""

    difference: float
    statistic: float
    p_value: float
    degrees_of_freedom: float | None = None


def normal_quantile(probability: float) -> float:
    """The standard normal quantile."""
    return float(special.ndtri(probability))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion; (0, 1) without trials."""
    if trials == 0:
        return (0.0, 1.0)
    z = normal_quantile(0.5 + confidence / 2)
    share = successes / trials
    scale = 1 + z**2 / trials
    centre = (share + z**2 / (2 * trials)) / scale
    half = z * math.sqrt(share * (1 - share) / trials + z**2 / (4 * trials**2)) / scale
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_interval(mean: float, variance: float, count: int, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval for a mean from `count` outcomes of sample variance `variance` (count >= 2)."""
    half = float(special.stdtrit(count - 1, 0.5 + confidence / 2)) * math.sqrt(variance / count)
    return (mean - half, mean + half)


def two_proportion_z_test(
    correct_control: int, n_control: int, correct_challenger: int, n_challenger: int
) -> TestResult:
    """The pooled two-proportion z-test of challenger minus control accuracy (both arms need outcomes)."""
    difference = correct_challenger / n_challenger - correct_control / n_control
    pooled = (correct_control + correct_challenger) / (n_control + n_challenger)
    standard_error = math.sqrt(pooled * (1 - pooled) * (1 / n_control + 1 / n_challenger))
    if standard_error == 0:  # all right or all wrong in both arms: no evidence of a difference
        return TestResult(difference, 0.0, 1.0)
    statistic = difference / standard_error
    return TestResult(difference, statistic, float(2 * special.ndtr(-abs(statistic))))


def welch_t_test(
    mean_control: float, variance_control: float, n_control: int,
    mean_challenger: float, variance_challenger: float, n_challenger: int,
) -> TestResult:  # fmt: skip
    """Welch's t-test of challenger minus control mean, with Welch–Satterthwaite degrees of freedom."""
    share_control, share_challenger = variance_control / n_control, variance_challenger / n_challenger
    difference = mean_challenger - mean_control
    if share_control + share_challenger == 0:
        return TestResult(difference, 0.0, 1.0, float(n_control + n_challenger - 2))
    statistic = difference / math.sqrt(share_control + share_challenger)
    freedom = (share_control + share_challenger) ** 2 / (
        share_control**2 / (n_control - 1) + share_challenger**2 / (n_challenger - 1)
    )
    return TestResult(difference, statistic, float(2 * special.stdtr(freedom, -abs(statistic))), freedom)


def proportion_difference_variance(
    correct_control: Values, n_control: Values, correct_challenger: Values, n_challenger: Values, *, pooled: bool
) -> Values:
    """The variance of the difference of two accuracies for the mSPRT, from proportions smoothed by one right and
    one wrong outcome (so that an arm all right or all wrong still has a variance); pooled under "no difference"
    for the p-value, per arm for the interval. Scalars or numpy arrays, element-wise."""
    if pooled:
        share = (correct_control + correct_challenger + 1) / (n_control + n_challenger + 2)
        return share * (1 - share) * (1 / n_control + 1 / n_challenger)
    share_control = (correct_control + 1) / (n_control + 2)
    share_challenger = (correct_challenger + 1) / (n_challenger + 2)
    return share_control * (1 - share_control) / n_control + share_challenger * (1 - share_challenger) / n_challenger


def mixture_p_value(difference: Values, variance: Values, tau2: float) -> Values:
    """1 / Lambda (at most 1) for the normal-mixture SPRT of "no difference", where
    Lambda = sqrt(V / (V + tau2)) * exp(d^2 tau2 / (2 V (V + tau2))) for a difference d of variance V. The
    always-valid p-value is the running minimum of this over looks. Scalars or numpy arrays, element-wise."""
    log_ratio = 0.5 * np.log(variance / (variance + tau2)) + difference**2 * tau2 / (2 * variance * (variance + tau2))
    return np.exp(-np.maximum(log_ratio, 0.0))  # type: ignore[no-any-return]


def mixture_half_width(variance: Values, tau2: float, alpha: float) -> Values:
    """Half the width of the mSPRT's confidence sequence at level 1 - alpha: the differences d' whose test of
    "the difference is d'" is not rejected, d +- sqrt(V (V + tau2) / tau2 * (2 log(1/alpha) + log((V + tau2) / V)))."""
    spread = 2 * math.log(1 / alpha) + np.log((variance + tau2) / variance)
    return np.sqrt(variance * (variance + tau2) / tau2 * spread)  # type: ignore[no-any-return]


def samples_per_arm(
    metric: Metric, control: VersionOutcomes, challenger: VersionOutcomes, mde: float, alpha: float, power: float
) -> int | None:
    """The outcomes per arm a fixed-horizon two-sided test at level alpha needs to detect a difference of `mde`
    with probability `power`, an estimate from the outcomes so far: for accuracy the two-proportion formula at
    the control's accuracy (0.5 without outcomes, the widest), for rewards (z_a + z_b)^2 (s_1^2 + s_2^2) / mde^2.
    None for rewards while either arm has fewer than two outcomes."""
    z_alpha, z_power = normal_quantile(1 - alpha / 2), normal_quantile(power)
    if metric == "accuracy":
        base = control.mean("accuracy")
        base = 0.5 if base is None else base
        other = base + mde if base + mde <= 1 else base - mde
        average = (base + other) / 2
        spread = z_alpha * math.sqrt(2 * average * (1 - average)) + z_power * math.sqrt(
            base * (1 - base) + other * (1 - other)
        )
        return math.ceil(spread**2 / mde**2)
    variance_control, variance_challenger = control.variance("reward"), challenger.variance("reward")
    if variance_control is None or variance_challenger is None:
        return None
    return math.ceil((z_alpha + z_power) ** 2 * (variance_control + variance_challenger) / mde**2)


@dataclass
class SequentialLook:
    """What the always-valid test of one challenger carries from look to look: the running minimum p-value and the
    running intersection of its intervals (None: unbounded)."""

    p_value: float = 1.0
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"p_value": self.p_value, "low": self.low, "high": self.high}


@dataclass
class SequentialState:
    """The always-valid tests' state across looks: one `SequentialLook` per challenger, valid for one control,
    metric and mixture variance (a report under others starts afresh)."""

    control: str | None = None
    metric: Metric | None = None
    tau2: float | None = None
    looks: dict[str, SequentialLook] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        looks = {version: look.to_dict() for version, look in self.looks.items()}
        return {"control": self.control, "metric": self.metric, "tau2": self.tau2, "looks": looks}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SequentialState:
        """The state `to_dict` wrote."""
        looks = {version: SequentialLook(**look) for version, look in data.get("looks", {}).items()}
        return cls(control=data.get("control"), metric=data.get("metric"), tau2=data.get("tau2"), looks=looks)


@dataclass(frozen=True)
class Comparison:
    """A challenger against the control at one look: the fixed-horizon test, the always-valid p-value and interval
    (after this look), the verdict and why, and the fixed-horizon outcomes per arm for the MDE (`needed_per_arm`,
    an estimate) less what each arm has (`still_needed_*`)."""

    fixed: TestResult | None
    look: SequentialLook
    verdict: Verdict
    reason: str
    needed_per_arm: int | None
    still_needed_control: int | None
    still_needed_challenger: int | None


def compare(
    control: VersionOutcomes,
    challenger: VersionOutcomes,
    *,
    metric: Metric,
    mde: float,
    tau2: float,
    alpha: float = 0.05,
    power: float = 0.8,
    previous: SequentialLook | None = None,
) -> Comparison:
    """One look at a challenger against the control: "promote" when the always-valid p-value is below alpha and
    the challenger is ahead, "keep the control" when it is below alpha and the challenger is behind, or when the
    always-valid interval lies below +mde (the challenger cannot be better by the MDE); otherwise "not enough
    data yet"."""
    look = previous or SequentialLook()
    fixed = fixed_test(metric, control, challenger)
    n_control, n_challenger = control.count(metric), challenger.count(metric)
    if fixed is not None and min(n_control, n_challenger) >= MIN_SEQUENTIAL_OUTCOMES:
        look = next_look(look, metric, control, challenger, tau2, alpha)
    needed = samples_per_arm(metric, control, challenger, mde, alpha, power)
    still_control = None if needed is None else max(0, needed - n_control)
    still_challenger = None if needed is None else max(0, needed - n_challenger)
    if look.p_value < alpha and fixed is not None:
        verdict, reason = (PROMOTE, "ahead") if fixed.difference > 0 else (KEEP_CONTROL, "behind")
        reason = f"{reason}, always-valid p < {alpha:g}"
    elif look.high is not None and look.high < mde:
        verdict, reason = KEEP_CONTROL, f"cannot be better by the MDE ({mde:g})"
    else:
        verdict, reason = NOT_ENOUGH_DATA, "no significant difference yet"
    if verdict != NOT_ENOUGH_DATA:
        still_control = still_challenger = 0
    return Comparison(fixed, look, verdict, reason, needed, still_control, still_challenger)


def fixed_test(metric: Metric, control: VersionOutcomes, challenger: VersionOutcomes) -> TestResult | None:
    """The fixed-horizon test of challenger minus control; None until each arm has outcomes enough (one label, or
    two rewards)."""
    if metric == "accuracy":
        if not (control.labelled and challenger.labelled):
            return None
        return two_proportion_z_test(control.correct, control.labelled, challenger.correct, challenger.labelled)
    variance_control, variance_challenger = control.variance("reward"), challenger.variance("reward")
    if variance_control is None or variance_challenger is None:
        return None
    return welch_t_test(
        control.reward_mean, variance_control, control.rewarded,
        challenger.reward_mean, variance_challenger, challenger.rewarded,
    )  # fmt: skip


def next_look(
    look: SequentialLook,
    metric: Metric,
    control: VersionOutcomes,
    challenger: VersionOutcomes,
    tau2: float,
    alpha: float,
) -> SequentialLook:
    """The always-valid state after one more look: the smaller p-value, the narrower interval."""
    if metric == "accuracy":
        counts = (control.correct, control.labelled, challenger.correct, challenger.labelled)
        difference = challenger.correct / challenger.labelled - control.correct / control.labelled
        null_variance = float(proportion_difference_variance(*counts, pooled=True))
        variance = float(proportion_difference_variance(*counts, pooled=False))
    else:
        difference = challenger.reward_mean - control.reward_mean
        variance = (control.variance("reward") or 0.0) / control.rewarded
        variance += (challenger.variance("reward") or 0.0) / challenger.rewarded
        null_variance = variance
    if variance <= 0 or null_variance <= 0:  # constant rewards: nothing to learn from this look
        return look
    p_value = min(look.p_value, float(mixture_p_value(difference, null_variance, tau2)))
    half = float(mixture_half_width(variance, tau2, alpha))
    low = difference - half if look.low is None else max(look.low, difference - half)
    high = difference + half if look.high is None else min(look.high, difference + half)
    if low > high:  # the intervals no longer meet: the difference has moved; keep this look's interval
        low, high = difference - half, difference + half
    return SequentialLook(p_value, low, high)


@dataclass(frozen=True)
class VersionRow:
    """One version's line of an A/B report. `difference`, the p-values, `interval_of_difference` (always-valid),
    `verdict` and `reason` are None for the control; `still_needed` is the outcomes this version still needs
    (for the control, the most any undecided challenger asks of it)."""

    version: str
    requests: int
    outcomes: int
    value: float | None
    interval: tuple[float, float] | None
    difference: float | None
    interval_of_difference: tuple[float | None, float | None] | None
    p_value: float | None
    always_valid_p_value: float | None
    verdict: Verdict | None
    reason: str | None
    still_needed: int | None


@dataclass(frozen=True)
class ABReport:
    """An A/B report: per version (the control first) its counts, metric with a 95% interval and, for each
    challenger, the comparison with the control; `state` is what the next look needs."""

    metric: Metric
    control: str
    alpha: float
    mde: float
    tau2: float
    rows: list[VersionRow]
    state: SequentialState

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite or unknown values as null)."""
        rows = []
        for row in self.rows:
            data = {name: getattr(row, name) for name in row.__dataclass_fields__}
            data["interval"] = list(row.interval) if row.interval else None
            data["interval_of_difference"] = list(row.interval_of_difference) if row.interval_of_difference else None
            rows.append(data)
        return {
            "metric": self.metric,
            "control": self.control,
            "alpha": self.alpha,
            "mde": self.mde,
            "tau2": self.tau2,
            "test": "mSPRT, normal mixture",
            "versions": rows,
            "state": self.state.to_dict(),
        }

    def table(self) -> list[list[str]]:
        """The report as rows of strings for a terminal table, the header first."""
        metric = "accuracy" if self.metric == "accuracy" else "mean reward"
        header = ["version", "requests", "outcomes", metric, "95% interval", "difference", "always-valid interval"]
        header += ["p (fixed)", "p (always valid)", "verdict", "still needed"]
        lines = [header]
        for row in self.rows:
            lines.append(
                [
                    row.version + (" (control)" if row.version == self.control else ""),
                    str(row.requests),
                    str(row.outcomes),
                    number(row.value),
                    bounds(row.interval, signed=False),
                    number(row.difference, signed=True),
                    bounds(row.interval_of_difference, signed=True),
                    probability(row.p_value),
                    probability(row.always_valid_p_value),
                    row.verdict or "",
                    "-" if row.still_needed is None else str(row.still_needed),
                ]
            )
        return lines


def number(value: float | None, *, signed: bool = False) -> str:
    """A metric for the table: four significant places, '-' when unknown."""
    if value is None:
        return "-"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def bounds(interval: tuple[float | None, float | None] | None, *, signed: bool) -> str:
    """An interval for the table; an unbounded side as infinity."""
    if interval is None:
        return "-"
    low = "-inf" if interval[0] is None else number(interval[0], signed=signed)
    high = "inf" if interval[1] is None else number(interval[1], signed=signed)
    return f"[{low}, {high}]"


def probability(value: float | None) -> str:
    """A p-value for the table."""
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def ab_report(
    outcomes: Mapping[str, VersionOutcomes],
    *,
    metric: Metric | None = None,
    control: str | None = None,
    mde: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
    state: SequentialState | None = None,
) -> ABReport:
    """The A/B report of a model's versions at one look. `metric` defaults to the kind of outcome the versions
    received, `control` to the version with the most requests, `mde` to two points of accuracy (rewards need it
    given, in the reward's units). The mixture variance is tau2 = mde^2. Pass the returned report's `state` to
    the next look: the always-valid p-values and intervals continue from it."""
    if not outcomes:
        raise UsageError("an A/B report needs at least one version")
    metric = metric or metric_of(outcomes)
    if mde is None:
        if metric == "reward":
            raise UsageError("an A/B test of rewards needs --mde in the reward's units: the smallest gain worth having")
        mde = DEFAULT_ACCURACY_MDE
    if mde <= 0:
        raise UsageError(f"--mde must be positive, got {mde:g}")
    control = control or max(sorted(outcomes), key=lambda version: outcomes[version].requests)
    if control not in outcomes:
        raise UsageError(f"the control version {control!r} has no outcomes; versions: {', '.join(sorted(outcomes))}")
    tau2 = mde**2
    if state is None or (state.control, state.metric, state.tau2) != (control, metric, tau2):
        state = SequentialState(control=control, metric=metric, tau2=tau2)
    comparisons = {
        version: compare(
            outcomes[control], sums, metric=metric, mde=mde, tau2=tau2, alpha=alpha, power=power,
            previous=state.looks.get(version),
        )
        for version, sums in sorted(outcomes.items())
        if version != control
    }  # fmt: skip
    rows = [version_row(control, outcomes[control], metric, None, comparisons)]
    rows += [version_row(version, outcomes[version], metric, each, {}) for version, each in comparisons.items()]
    looks = {version: comparison.look for version, comparison in comparisons.items()}
    next_state = SequentialState(control=control, metric=metric, tau2=tau2, looks=looks)
    return ABReport(metric, control, alpha, mde, tau2, rows, next_state)


def metric_of(outcomes: Mapping[str, VersionOutcomes]) -> Metric:
    """Accuracy when the versions received labels only, reward when rewards only."""
    labelled = any(sums.labelled for sums in outcomes.values())
    rewarded = any(sums.rewarded for sums in outcomes.values())
    if labelled and rewarded:
        raise UsageError("the versions received both labels and rewards: say which to report (accuracy or reward)")
    return "reward" if rewarded else "accuracy"


def version_row(
    version: str,
    sums: VersionOutcomes,
    metric: Metric,
    comparison: Comparison | None,
    challengers: Mapping[str, Comparison],
) -> VersionRow:
    """A version's row: the control's (comparison None; `challengers` for the outcomes it still needs) or a
    challenger's."""
    value = sums.mean(metric)
    if metric == "accuracy":
        interval = wilson_interval(sums.correct, sums.labelled) if sums.labelled else None
    else:
        variance = sums.variance("reward")
        interval = None if variance is None else t_interval(sums.reward_mean, variance, sums.rewarded)
    if comparison is None:
        needs = [c.still_needed_control for c in challengers.values() if c.verdict == NOT_ENOUGH_DATA]
        known = [need for need in needs if need is not None]
        still = max(known) if known else (None if needs else 0)
        return VersionRow(version, sums.requests, sums.outcomes, value, interval, *(None,) * 6, still)
    fixed, look = comparison.fixed, comparison.look
    return VersionRow(
        version,
        sums.requests,
        sums.outcomes,
        value,
        interval,
        None if fixed is None else fixed.difference,
        None if look.low is None and look.high is None else (look.low, look.high),
        None if fixed is None else fixed.p_value,
        look.p_value,
        comparison.verdict,
        comparison.reason,
        comparison.still_needed_challenger,
    )
