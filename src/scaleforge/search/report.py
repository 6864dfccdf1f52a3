"""What a study found: its trials, the best trial or the Pareto front, parameter importances, a plot, and the
chosen trial's config as a YAML file ready for `scaleforge train`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from scaleforge.console import print_table
from scaleforge.errors import UsageError
from scaleforge.search.objectives import Objective
from scaleforge.search.study import requeued_numbers, study_record

BEST_FILE = "best.yaml"
MAX_ROWS = 40  # trials listed in full; a larger study lists its best ones


def show(study: optuna.Study, folder: Path, *, trial: int | None = None, out: Path | None = None) -> None:
    """Print the study's trials, its best trial(s) and parameter importances; draw the plot and write the config
    of `trial` (default: the best, or the front's best on the first objective) into `out` (default
    FOLDER/best.yaml)."""
    objectives = study_record(study).objectives
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    requeued = requeued_numbers(trials)
    states = [_state(t, requeued) for t in trials]
    summary = ", ".join(f"{states.count(state)} {state}" for state in dict.fromkeys(sorted(states)))
    _print_trials(
        f"study {study.study_name}: {summary or 'no trials'}",
        _listed(trials, complete, objectives),
        objectives,
        requeued,
    )
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in requeued:
            print(f"trial {t.number} failed: {t.user_attrs.get('error', 'no error recorded')}")
    if not complete:
        print("no trial has finished yet: nothing to choose from")
        return
    best = _best(study, objectives)
    title = "best trial" if len(objectives) == 1 else "Pareto front: no trial is better on every objective"
    _print_trials(title, best, objectives)
    importances = _importances(study, objectives, complete)
    if importances:
        names = sorted({name for values in importances.values() for name in values})
        rows = [[name, *(f"{importances[o.name].get(name, 0.0):.2f}" for o in objectives)] for name in names]
        print_table(
            "parameter importances (fANOVA: each key's share of the objective's variance)",
            ["param", *(o.name for o in objectives)],
            rows,
        )
    plot = _plot(study, objectives, complete, best, folder)
    if plot is not None:
        print(f"wrote {plot}")
    chosen = _chosen(trials, best, trial)
    out = out or folder / BEST_FILE
    figures = ", ".join(f"{o.name} {number_text(v)}" for o, v in zip(objectives, chosen.values, strict=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# trial {chosen.number} of search {study.study_name}: {figures}\n"
    if "threads" in chosen.user_attrs:  # another count sums in another order: the same figures, not the same bits
        header += (
            f"# it trained with hardware.threads={chosen.user_attrs['threads']}: give it to reproduce the run exactly\n"
        )
    out.write_text(header + chosen.user_attrs["config"])
    print(f"wrote {out} (trial {chosen.number}: {figures}); train it with: scaleforge train {out}")


def _listed(
    trials: list[FrozenTrial], complete: list[FrozenTrial], objectives: tuple[Objective, ...]
) -> list[FrozenTrial]:
    if len(trials) <= MAX_ROWS:
        return trials
    first = objectives[0]
    ranked = sorted(complete, key=lambda t: t.values[0], reverse=first.direction == "maximize")
    return sorted(ranked[:MAX_ROWS], key=lambda t: t.number)


def _state(trial: FrozenTrial, requeued: set[int]) -> str:
    """complete, pruned, failed, running, waiting, or requeued (interrupted, and run again as another trial)."""
    if trial.number in requeued:
        return "requeued"
    return "failed" if trial.state == TrialState.FAIL else trial.state.name.lower()


def _print_trials(
    title: str, trials: list[FrozenTrial], objectives: tuple[Objective, ...], requeued: set[int] = frozenset()
) -> None:
    keys = list(dict.fromkeys(key for t in trials for key in t.params))
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    columns = [
        "trial",
        "state",
        *(leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, keys, strict=True)),
    ]
    columns += [o.name for o in objectives] + ["time"]
    rows = []
    for t in trials:
        values = list(t.values) if t.values else [None] * len(objectives)
        if t.state == TrialState.PRUNED and t.intermediate_values:
            values[0] = t.intermediate_values[max(t.intermediate_values)]
        took = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(
            [
                str(t.number),
                _state(t, requeued),
                *(param_text(t.params[key]) if key in t.params else "-" for key in keys),
                *(number_text(v) if v is not None else "-" for v in values),
                f"{took:.1f}s" if took is not None else "-",
            ]
        )
    print_table(title, columns, rows)


def _best(study: optuna.Study, objectives: tuple[Objective, ...]) -> list[FrozenTrial]:
    if len(objectives) == 1:
        return [study.best_trial]
    first = objectives[0]
    return sorted(study.best_trials, key=lambda t: t.values[0], reverse=first.direction == "maximize")


def _chosen(trials: list[FrozenTrial], best: list[FrozenTrial], number: int | None) -> FrozenTrial:
    if number is None:
        return best[0]
    found = [t for t in trials if t.number == number]
    if not found:
        raise UsageError(f"--trial {number}: the study has trials 0 to {len(trials) - 1}")
    if found[0].state != TrialState.COMPLETE:
        raise UsageError(f"--trial {number}: that trial did not finish ({found[0].state.name.lower()})")
    return found[0]


def _importances(
    study: optuna.Study, objectives: tuple[Objective, ...], complete: list[FrozenTrial]
) -> dict[str, dict[str, float]]:
    """Each objective's parameter importances by fANOVA (over the keys every finished trial has: an
    architecture's own keys are left out); {} with too few trials."""
    result: dict[str, dict[str, float]] = {}
    if len(complete) < 3:
        return result  # too few to tell anything
    for index, objective in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(
                    study,
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                    target=lambda t, index=index: t.values[index],
                )
            result[objective.name] = {name: float(value) for name, value in importances.items()}
        except (RuntimeError, ValueError, ZeroDivisionError):
            return {}
    return result if any(result.values()) else {}


def _plot(
    study: optuna.Study,
    objectives: tuple[Objective, ...],
    complete: list[FrozenTrial],
    best: list[FrozenTrial],
    folder: Path,
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    if len(objectives) == 1:
        return _plot_history(plt, study, objectives[0], complete, folder / "history.png")
    pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
    figure, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), squeeze=False)
    front = {t.number for t in best}
    for axis, (i, j) in zip(axes[0], pairs, strict=True):
        others = [t for t in complete if t.number not in front]
        axis.scatter([t.values[j] for t in others], [t.values[i] for t in others], c="0.65", s=24, label="trials")
        on_front = sorted(best, key=lambda t: t.values[j])
        xs, ys = [t.values[j] for t in on_front], [t.values[i] for t in on_front]
        axis.plot(
            xs,
            ys,
            "-o",
            color="tab:red",
            markersize=6,
            label="Pareto front",
            drawstyle="steps-post" if len(pairs) == 1 else "default",
        )
        labels: dict[tuple[float, float], list[str]] = {}  # trials with equal values share one label
        for t in on_front:
            labels.setdefault((t.values[j], t.values[i]), []).append(str(t.number))
        for point, numbers in labels.items():
            axis.annotate(", ".join(numbers), point, textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(_axis_label(objectives[j]))
        axis.set_ylabel(_axis_label(objectives[i]))
        spread = [v for v in (t.values[j] for t in complete) if v > 0]
        if spread and max(spread) / min(spread) > 20:
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"search {study.study_name}: {len(complete)} finished trials, {len(best)} on the front")
    figure.tight_layout()
    path = folder / "pareto.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_history(plt: Any, study: optuna.Study, objective: Objective, complete: list[FrozenTrial], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    numbers = [t.number for t in complete]
    values = [t.values[0] for t in complete]
    axis.scatter(numbers, values, s=24, label="finished", color="tab:blue")
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        axis.scatter([t.number for t in pruned], last, marker="x", color="tab:orange", label="pruned (last value)")
    better = max if objective.direction == "maximize" else min
    running = [better(values[: k + 1]) for k in range(len(values))]
    axis.step(numbers, running, where="post", color="tab:red", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(_axis_label(objective))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"search {study.study_name}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _axis_label(objective: Objective) -> str:
    return f"{objective.name} ({'higher' if objective.direction == 'maximize' else 'lower'} is better)"


def param_text(value: Any) -> str:
    """A parameter's value as the tables and the search's lines show it."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return value if isinstance(value, str) else json.dumps(value)


def number_text(value: float) -> str:
    """An objective's value as shown: whole numbers and large ones with thousands separators, others to 4 digits."""
    if math.isfinite(value) and (abs(value) >= 1000 or (float(value).is_integer() and abs(value) >= 1)):
        return f"{value:,.0f}"
    return f"{value:.4g}"
