"""What a finished study leaves: the exact bound of its best trials and the parent run's record."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import pandas as pd


def _complete(study):
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def best_trials(study) -> list:
    """The best trial (one objective) or the Pareto front (two)."""
    if not _complete(study):
        return []
    return [study.best_trial] if len(study.directions) == 1 else list(study.best_trials)


def exact_reevaluation(study, sc, progress: bool = True) -> None:
    """Re-evaluate the ``sc.exact_top`` best trials' checkpoints with the exact bound on the test split
    (logged into each trial's run; kept in the study's ``bpd_exact`` attribute, trial number → value,
    since Optuna freezes a finished trial's attributes)."""
    from bench.train import evaluate_checkpoint

    complete = _complete(study)
    if len(study.directions) == 1:
        ranked = sorted(complete, key=lambda t: t.value)[: sc.exact_top]
    else:
        ranked = best_trials(study)[: sc.exact_top]
    done = {int(k): v for k, v in study.user_attrs.get("bpd_exact", {}).items()}
    for t in ranked:
        if t.number in done or "checkpoint" not in t.user_attrs or not Path(t.user_attrs["checkpoint"]).exists():
            continue
        metrics, _, _ = evaluate_checkpoint(t.user_attrs["checkpoint"], final_eval="exact", fid_samples=0,
                                            log_to_run=True, progress=progress)
        done[t.number] = metrics["bpd"]
    study.set_user_attr("bpd_exact", {str(k): v for k, v in done.items()})


def _row(t, exact: dict) -> dict:
    return {"trial": t.number, "params": dict(t.params), "values": list(t.values or []),
            "bpd_estimate": t.user_attrs.get("bpd_estimate"), "bpd_exact": exact.get(str(t.number)),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "default_schedule": bool(t.user_attrs.get("default_schedule"))}


def log_study(study, sc, name: str, variant: str, log):
    """Best parameters and values, the Pareto front, history and importance plots and the trials
    table, into the parent run ``log``. Returns a StudyResult."""
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    from studies.study import OBJECTIVES, StudyResult

    study = optuna.load_study(study_name=name, storage=study._storage)  # fresh attributes after re-evaluation
    keys = OBJECTIVES[sc.objective]
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
    counts["diverged"] = sum(t.state == TrialState.FAIL and "failure_reason" in t.user_attrs for t in study.trials)
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    exact = study.user_attrs.get("bpd_exact", {})
    best = [_row(t, exact) for t in best_trials(study)]
    default = next((_row(t, exact) for t in study.trials if t.user_attrs.get("default_schedule") and t.state == TrialState.COMPLETE), None)
    if len(best) == 1:
        b = best[0]
        log.tags({f"best.{k}": v for k, v in b["params"].items()} | {"best.trial": b["trial"]})  # tags: a resume may change them
        metrics |= {f"best_{k}": v for k, v in zip(keys, b["values"])}
        if b["bpd_exact"] is not None:
            metrics["best_bpd_exact"] = b["bpd_exact"]
    if default:
        metrics |= {f"default_{k}": v for k, v in zip(keys, default["values"])}
    log.metrics({k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}, 0)
    log.dict({"best": best, "default": default, "counts": counts}, "study_best.json")
    df = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
    if len(df):
        if "duration" in df and pd.api.types.is_timedelta64_dtype(df["duration"]):
            df["duration"] = df["duration"].dt.total_seconds()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trials.csv"
            df.to_csv(path, index=False)
            log.artifact(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
        _plot(log, "optimization_history.png", lambda: ovm.plot_optimization_history(
            study, target=(lambda t: t.values[0]) if len(keys) > 1 else None, target_name=keys[0]))
        _plot(log, "param_importances.png", lambda: ovm.plot_param_importances(
            study, target=(lambda t: t.values[0]) if len(keys) > 1 else None, target_name=keys[0]))
        if len(keys) == 2:
            _plot(log, "pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=list(keys)))
    return StudyResult(name, variant, log.run_id, best, default, counts)


def _plot(log, path: str, make) -> None:
    """Log one optuna plot; plots that need more finished trials than the study has are skipped."""
    import matplotlib.pyplot as plt

    try:
        ax = make()
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        log.tags({f"plot_skipped.{path}": str(err)[:250]})
        return
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    log.figure(fig, path)
    plt.close(fig)


def describe_result(r, sc) -> str:
    """The lines ``bench study`` prints for one finished study."""
    lines = [f"study {r.name} ({r.variant}): parent run {r.parent_run_id}; trials {r.counts}"]
    for b in r.best:
        exact = f", exact bpd {b['bpd_exact']:.4f}" if b["bpd_exact"] is not None else ""
        lines.append(f"  best trial {b['trial']}: {b['values']} {b['params']}{exact}")
    if r.default:
        lines.append(f"  default schedule (trial {r.default['trial']}): {r.default['values']} {r.default['params']}")
    return "\n".join(lines)
