"""What a study shows and leaves: a line per finished trial and the bar's best so far while it runs; then
the exact bound of its best trials, the parent run's record and the text ``bench study`` prints."""

from __future__ import annotations

import math
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from bench.runtime.progress import format_duration, on_terminal
from bench.runtime.urls import masked
from bench.tracking.plots import FIGURES, pyplot
from bench.training.evaluation import evaluate_checkpoint, other_method_name
from bench.training.record import NoLog
from studies.config import OBJECTIVES, StudyResult
from studies.space import GAMMA_ENDS, TUNABLE, describe_schedule, describe_weighting, gamma_note
from studies.workers import lost_worker, workers_alive


def _complete(study):
    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def best_trials(study) -> list:
    """The best trial (one objective) or the Pareto front (two)."""
    if not _complete(study):
        return []
    return [study.best_trial] if len(study.directions) == 1 else list(study.best_trials)


def exact_reevaluation(study, sc, progress: bool = True) -> None:
    """Re-evaluate the ``sc.exact_top`` best trials' checkpoints with the exact bound on the test split
    (logged into each trial's run; kept in the study's ``bpd_exact`` attribute, trial number → value,
    since Optuna freezes a finished trial's attributes). ``progress``: a line before and after each, the
    evaluation's bars between them on a terminal."""
    complete = _complete(study)
    if len(study.directions) == 1:
        ranked = sorted(complete, key=lambda t: t.value)[: sc.exact_top]
    else:  # the front's trials with the lowest estimated bpd (the first objective)
        ranked = sorted(best_trials(study), key=lambda t: t.values[0])[: sc.exact_top]
    done = {int(k): v for k, v in study.user_attrs.get("bpd_exact", {}).items()}
    todo = [t for t in ranked if t.number not in done]
    for i, t in enumerate(todo, 1):
        checkpoint = t.user_attrs.get("checkpoint")
        if checkpoint is None or not Path(checkpoint).exists():
            host = str(t.user_attrs.get("worker", "")).rsplit(":", 1)[0]
            if host and host != socket.gethostname():
                _say(progress, f"exact bound, trial {t.number}: skipped, its checkpoint is on {host}; there, run "
                               f"`bench eval {checkpoint} --final-eval exact --fid-samples 0 --log-to-run`")
            else:
                _say(progress, f"exact bound, trial {t.number}: skipped, its checkpoint {checkpoint} is gone")
            continue
        images = t.user_attrs.get("bpd_images")
        _say(progress, f"exact bound, trial {t.number} ({i}/{len(todo)}): "
                       "its checkpoint on the test split, all T steps, "
                       + (f"{images} test images (as its estimate)" if images else "the test images of its estimate"))
        start = time.monotonic()
        metrics, _, _ = evaluate_checkpoint(checkpoint, final_eval="exact", fid_samples=0, log_to_run=True,
                                            progress=progress and on_terminal(), desc=f"exact bound, trial {t.number}",
                                            alone=True, tracking_uri=sc.tracking_uri)
        # logged as bpd_eval_exact into a trial run whose bpd is its estimate (an exact bound never replaces it)
        done[t.number] = exact = metrics.get("bpd", metrics.get(other_method_name("exact")))
        study.set_user_attr("bpd_exact", {str(k): v for k, v in done.items()})  # each kept as soon as known
        estimate = t.user_attrs.get("bpd_estimate")
        _say(progress, f"exact bound, trial {t.number}: bpd {exact:.4f} {BPD_EXACT}"
                       + (f"; estimate {_estimate(estimate, t.user_attrs.get('bpd_stderr'))}"
                          if estimate is not None else "")
                       + f"  ({format_duration(time.monotonic() - start)})")


def _say(progress: bool, line: str) -> None:
    if progress:
        tqdm.write(line, file=sys.stdout)


def _row(t, exact: dict) -> dict:
    return {"trial": t.number, "params": dict(t.params), "values": list(t.values or []),
            "bpd_estimate": t.user_attrs.get("bpd_estimate"), "bpd_stderr": t.user_attrs.get("bpd_stderr"),
            "bpd_exact": exact.get(str(t.number)),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "default_schedule": bool(t.user_attrs.get("default_schedule")),
            "fid_samples": t.user_attrs.get("fid_samples"), "fid_extractor": t.user_attrs.get("fid_extractor")}


def log_study(study, sc, name: str, variant: str, log):
    """Best parameters and values, the Pareto front, history and importance plots and the trials
    table, into the parent run ``log``. Returns a StudyResult."""
    study = optuna.load_study(study_name=name, storage=study._storage)  # fresh attributes after re-evaluation
    keys = OBJECTIVES[sc.objective]
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
    counts["diverged"] = sum(t.state == TrialState.FAIL and "failure_reason" in t.user_attrs for t in study.trials)
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    exact = study.user_attrs.get("bpd_exact", {})
    best = [_row(t, exact) for t in best_trials(study)]
    default = next((_row(t, exact) for t in study.trials
                    if t.user_attrs.get("default_schedule") and t.state == TrialState.COMPLETE), None)
    result = StudyResult(name, variant, log.run_id, best, default, counts, {int(k): v for k, v in exact.items()})
    if isinstance(log, NoLog):  # recorded by the process that finished the study: only the summary is wanted
        return result
    if len(best) == 1:
        b = best[0]
        # tags: a resume may change them
        log.tags({f"best.{k}": v for k, v in b["params"].items()} | {"best.trial": b["trial"]})
        metrics |= {f"best_{k}": v for k, v in zip(keys, b["values"])}
        if b["bpd_exact"] is not None:
            metrics["best_bpd_exact"] = b["bpd_exact"]
    if default:
        metrics |= {f"default_{k}": v for k, v in zip(keys, default["values"])}
    log.metrics({k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}, 0)
    log.dict({"best": best, "default": default, "counts": counts}, "study_best.json")
    import pandas as pd  # heavy: only the trials table needs it

    df = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
    if len(df):
        if "duration" in df and pd.api.types.is_timedelta64_dtype(df["duration"]):
            df["duration"] = df["duration"].dt.total_seconds()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trials.csv"
            df.to_csv(path, index=False)
            log.artifact(path)
    pyplot()  # the Agg backend chosen before optuna's plots import pyplot
    import optuna.visualization.matplotlib as ovm  # heavy: only the study's plots need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
        _plot(log, "optimization_history.png", lambda: ovm.plot_optimization_history(
            study, target=(lambda t: t.values[0]) if len(keys) > 1 else None, target_name=keys[0]))
        _plot(log, "param_importances.png", lambda: ovm.plot_param_importances(
            study, target=(lambda t: t.values[0]) if len(keys) > 1 else None, target_name=keys[0]))
        if len(keys) == 2:
            _plot(log, "pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=list(keys)))
    return result


def _plot(log, path: str, make) -> None:
    """Log one optuna plot; plots that need more finished trials than the study has are skipped."""
    with FIGURES:  # matplotlib is not thread-safe
        try:
            ax = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.tags({f"plot_skipped.{path}": str(err)[:250]})
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4)
        fig.tight_layout()
        log.figure(fig, path)
        pyplot().close(fig)


# ------------------------------------------------------------------------- what bench study prints
BPD_ESTIMATE = "bits/dim (estimate, test split)"
BPD_EXACT = "bits/dim (exact bound, test split)"
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


def format_params(params: dict) -> str:
    """``name=value`` pairs in the search space's order, floats to 4 significant digits."""
    return " ".join(f"{k}={_number(params[k])}" for k in _param_order(params))


def _param_order(names) -> list[str]:
    order = list(TUNABLE)
    return sorted(names, key=lambda k: (order.index(k) if k in order else len(order), k))


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _estimate(value: float, stderr) -> str:
    """An estimated bpd with its Monte Carlo standard error where the trial recorded one: '3.1234 ± 0.0123 (se)'."""
    return f"{value:.4f}" + (f" ± {stderr:.4f} (se)" if stderr is not None else "")


def _fid(value: float, n) -> str:
    return f"fid {value:.2f} (n={n if n is not None else '?'}, vs train split)"


def retried_as(trials) -> dict[int, int]:
    """Failed trial number → the number of the trial that retries it (Optuna's heartbeat retry)."""
    return {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}


def _why_failed(t, retry: int | None) -> str:
    attrs = t.user_attrs
    if "failure_reason" in attrs:
        return ("diverged: " if attrs.get("diverged") else "") + attrs["failure_reason"]
    if "error" in attrs:
        return attrs["error"]
    why = "its worker stopped sending heartbeats (killed or stalled)"
    if retry is not None:
        return f"{why}; retried as trial {retry}"
    return f"{why}; not retried" + (f" (retried {n} times already)"
                                    if (n := len(t.system_attrs.get("retry_history", []))) else "")


def describe_trial(t, keys: tuple[str, ...], retry: int | None = None) -> str:
    """One line for a finished trial: number, state (and why, unless complete), objective values with
    their units, parameters, duration. ``retry``: the trial that retries this one, if any."""
    notes = [n for n, on in (("default schedule", t.user_attrs.get("default_schedule")),
                             (f"retry of trial {t.system_attrs.get('failed_trial')}", "failed_trial" in t.system_attrs))
             if on]
    head = f"trial {t.number}" + (f" [{', '.join(notes)}]" if notes else "") + f" {STATES[t.state.name]}"
    if t.state.name == "COMPLETE":
        n = t.user_attrs.get("fid_samples")
        se = t.user_attrs.get("bpd_stderr")
        head += "  " + "  ".join(f"bpd {_estimate(v, se)} {BPD_ESTIMATE}" if k == "bpd" else _fid(v, n)
                                 for k, v in zip(keys, t.values))
    elif t.state.name == "PRUNED":
        head += f" {t.user_attrs['pruned']}" if "pruned" in t.user_attrs else ""
    else:
        head += f" ({_why_failed(t, retry)})"
    parts = [head, format_params(t.params)]
    if t.datetime_start is not None and t.datetime_complete is not None:
        parts.append(f"({format_duration((t.datetime_complete - t.datetime_start).total_seconds())})")
    return "  ".join(p for p in parts if p)


def _pareto(trials: list) -> list:
    """The complete trials no other complete trial dominates (every objective minimised)."""
    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a.values, b.values)) and a.values != b.values

    return [t for t in trials if not any(dominates(o, t) for o in trials)]


def best_so_far(trials, keys: tuple[str, ...]) -> str:
    """The progress bar's postfix: the best trial (one objective) or the Pareto front's size and ends."""
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    running = sum(t.state.name == "RUNNING" for t in trials)
    tail = f", {running} running" if running > 1 else ""
    if not complete:
        return "no trial complete yet" + tail
    if len(keys) == 1:
        best = min(complete, key=lambda t: t.value)
        value = f"{best.value:.4f} bits/dim" if keys[0] == "bpd" else f"{best.value:.2f}"
        return f"best {keys[0]} {value} (trial {best.number})" + tail
    front = _pareto(complete)
    ends = ", ".join(f"{k} {min(t.values[i] for t in front):.4g}" for i, k in enumerate(keys))
    return f"Pareto front {len(front)} trial{'s' * (len(front) != 1)} (best {ends})" + tail


def describe_status(study, storage: str, now: float | None = None) -> str:
    """``bench study --status``: the study as its storage holds it now: trials by state, the best so far,
    the workers alive, the parent run and who finished it."""
    now = now or time.time()
    attrs = study.user_attrs
    keys = OBJECTIVES.get(attrs.get("objective"), tuple(study.metric_names or ("value",)))
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in TrialState)
    alive = workers_alive(study, now)
    done = attrs.get("finished")
    lines = [f"study {study.study_name} in {masked(storage)}",
             f"  trials: {len(trials)} ({counts})",
             f"  {best_so_far(trials, keys)}",
             f"  workers alive: {len(alive)}" + (f" ({', '.join(alive)})" if alive else ""),
             f"  MLflow parent run: {attrs.get('mlflow_parent_run_id', 'none yet')}"]
    if isinstance(done, dict):
        lines.append(f"  finished: by {done['by']} "
                     f"at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(done['at']))}, "
                     f"{done['trials']} trials" + ("" if done["trials"] == len(trials) else "; resumed since"))
    else:
        lines.append("  finished: not yet")
    return "\n".join(lines)


def describe_start(sc, name: str, variant: str, parent_run_id: str) -> str:
    """The line ``bench study`` prints as a study starts."""
    workers = f"{sc.workers} worker{'s' * (sc.workers != 1)}"
    return (f"study {name}: variant {variant} on {sc.dataset}, {sc.trials} trials of {sc.steps} steps, objective "
            f"{' and '.join(OBJECTIVES[sc.objective])} (lower is better), sampler {sc.sampler}, {workers}\n"
            f"  MLflow parent run {parent_run_id} (experiment {sc.experiment})")


def _legend(sc, keys: tuple[str, ...], rows: list[dict]) -> list[str]:
    which = "on the Pareto front, lowest bpd first" if len(keys) > 1 else f"by {keys[0]}"
    lines = ["bpd: bits/dim on the test split, lower is better; 'estimate': the unbiased estimate every trial gets "
             "(± its Monte Carlo standard error, se), "
             f"'exact bound': the bound over all T steps, for the {sc.exact_top} best {which}"]
    if "fid" in keys:
        n = sorted({r["fid_samples"] for r in rows if r["fid_samples"] is not None}) or [sc.fid_samples]
        extractor = sorted({r["fid_extractor"] for r in rows if r["fid_extractor"]}) or ["the dataset's extractor"]
        lines.append(f"fid: FID of n={'/'.join(map(str, n))} samples against the {sc.dataset} train split, "
                     f"{'/'.join(extractor)} features, lower is better")
    return lines


def _values(row: dict, keys: tuple[str, ...]) -> str:
    """The objectives in order, and the bpd (estimate, exact bound where computed) even when not one of them."""
    bpd = (f"bpd {_estimate(row['bpd_estimate'], row.get('bpd_stderr'))} bits/dim (estimate)"
           + (f", {row['bpd_exact']:.4f} bits/dim (exact bound)" if row["bpd_exact"] is not None else ""))
    parts = [bpd if k == "bpd" else _fid(v, row["fid_samples"]) for k, v in zip(keys, row["values"])]
    if "bpd" not in keys and row["bpd_estimate"] is not None:
        parts.append(bpd)
    return "; ".join(parts)


def pareto_table(rows: list[dict], keys: tuple[str, ...]) -> str:
    """The Pareto front as an aligned table: trial, the objectives, the exact bpd, the parameters."""
    import pandas as pd  # heavy: only the table's layout needs it

    params = _param_order({k for r in rows for k in r["params"]})
    table = []
    for r in sorted(rows, key=lambda r: r["values"]):
        cells = {"trial": f"{r['trial']}{'*' if r['default_schedule'] else ''}"}
        cells |= {k: f"{v:.4f}" if k == "bpd" else f"{v:.2f}" for k, v in zip(keys, r["values"])}
        cells["exact bpd"] = f"{r['bpd_exact']:.4f}" if r["bpd_exact"] is not None else "-"
        cells |= {p: _number(r["params"][p]) if p in r["params"] else "-" for p in params}
        table.append(cells)
    return pd.DataFrame(table).to_string(index=False)


def describe_result(r, sc) -> str:
    """The block ``bench study`` prints for one finished study."""
    keys = OBJECTIVES[sc.objective]
    counts = ", ".join(f"{r.counts[k]} {STATES.get(k.upper(), k)}"
                       for k in ("complete", "pruned", "fail", "running", "waiting") if r.counts.get(k))
    diverged = f" ({r.counts['diverged']} diverged)" if r.counts.get("diverged") else ""
    lines = [f"study {r.name}: variant {r.variant} on {sc.dataset}, objective {' and '.join(keys)}",
             f"  MLflow parent run {r.parent_run_id} (experiment {sc.experiment})",
             f"  trials: {counts or 'none'}{diverged}"]
    lines += [f"  {line}" for line in _legend(sc, keys, r.best + ([r.default] if r.default else []))]
    if not r.best:
        lines.append("  no trial completed, so there is no best")
    elif len(keys) == 1:
        b = r.best[0]
        lines += [f"  best trial {b['trial']}: {_values(b, keys)}", f"    {format_params(b['params'])}"]
        if len(r.exact) > 1:
            ranked = ", ".join(f"trial {n} {v:.4f}" for n, v in sorted(r.exact.items(), key=lambda nv: nv[1]))
            lines.append(f"  exact bound of the re-evaluated trials (bits/dim): {ranked}")
    else:
        lines.append(f"  Pareto front, {len(r.best)} trial{'s' * (len(r.best) != 1)} (* the default schedule):")
        lines += [f"    {row}" for row in pareto_table(r.best, keys).splitlines()]
    if r.default:
        d = r.default
        lines += [f"  default schedule, trial {d['trial']}: {_values(d, keys)}", f"    {format_params(d['params'])}"]
    else:
        lines.append("  default schedule: no complete trial (outside the search space, or it failed)")
    if any(k in row["params"] for row in r.best + ([r.default] if r.default else []) for k in GAMMA_ENDS):
        lines.append(f"  {gamma_note(sc.base_config(r.variant))}")  # tuned end points, or a learned schedule's start
    note = _weighting_note(r.best + ([r.default] if r.default else []), sc.base_config(r.variant))
    if note:
        lines.append(f"  {note}")
    return "\n".join(lines)


def _weighting_note(rows: list[dict], base) -> str | None:
    """A weighted study whose space left the weighting alone: the weighting every trial trained with (a tuned one
    is among each trial's parameters, in its line and the Pareto table). None for other studies."""
    tuned = frozenset(k for row in rows for k in row["params"])
    text = None if "weighting" in tuned else describe_weighting({}, base, tuned)
    return f"weighting (not tuned): {text}" if text else None


def compare_results(results: list, sc) -> str:
    """The block ``bench study`` prints after several variants' studies (e.g. ``--variant vdm-fixed --variant vdm``:
    tuned vs learned schedule): each study's best trial (of a Pareto front, its lowest bpd) in one table, with
    the schedule it ran (studies.space.describe_schedule) and, for ``weighted``, its weighting."""
    keys = OBJECTIVES[sc.objective]
    table = []
    for r in results:
        if not r.best:
            table.append({"variant": r.variant, "trial": "-", "schedule": "no trial completed"})
            continue
        b = min(r.best, key=lambda row: row["values"])
        cells = {"variant": r.variant, "trial": str(b["trial"])}
        cells |= {k: f"{v:.4f}" if k == "bpd" else f"{v:.2f}" for k, v in zip(keys, b["values"])}
        cells["exact bpd"] = f"{b['bpd_exact']:.4f}" if b["bpd_exact"] is not None else "-"
        cells["schedule"] = describe_schedule(b["params"], sc.base_config(r.variant))
        weighting = describe_weighting(b["params"], sc.base_config(r.variant))
        if weighting:  # a weighted study's: w(λ) with its hyper-parameters
            cells["weighting"] = weighting
        table.append(cells)
    legend = ("bpd: estimated bits/dim on the test split, exact bpd: the exact bound where re-evaluated (lower is "
              "better); a learned schedule (vdm) is shown by where it started")
    import pandas as pd  # heavy: only the table's layout needs it

    body = pd.DataFrame(table).fillna("-").to_string(index=False)
    return "\n".join(["studies compared, the best trial of each:", *(f"  {line}" for line in body.splitlines()),
                      f"  {legend}"])


# ------------------------------------------------------------------------- what a running study shows
class Progress:
    """What ``bench study`` shows while trials run, read from the storage so that every worker's trials
    count (``--workers`` processes, or other ``bench study`` commands on the same study): one line per
    trial that finishes, and under them, on a terminal, a bar over the study's trials with the best so
    far and elapsed/ETA. Only this (parent) process writes, from one thread, so lines never interleave;
    the trials' own training bars are off (``train(progress=False)``)."""

    POLL_SECONDS = 1.0

    def __init__(self, study, sc, variant: str, show: bool):
        self.study, self.sc, self.show = study, sc, show
        self.keys = OBJECTIVES[sc.objective]
        trials = study.get_trials(deepcopy=False)
        self.printed = {t.number for t in trials if t.state.is_finished()}  # earlier sessions' trials: no line
        self.held: set[int] = set()  # failed trials whose retry was not in the storage yet at the last look
        self.bar = tqdm(total=max(sc.trials, len(trials)), initial=len(self.printed), desc=f"study {variant}",
                        unit="trial", dynamic_ncols=True, disable=None if show else True)  # None: off unless a terminal
        self._stop, self._warnings = threading.Event(), warnings.catch_warnings()
        self._thread = threading.Thread(target=self._run, name=f"study-progress-{variant}", daemon=True)

    def __enter__(self) -> Progress:
        if self.show:
            self._warnings.__enter__()
            warnings.showwarning = self._warn  # this process's warnings (a trial's, with one worker) above the bar
            self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if self.show:
                self.poll(final=True)
        except Exception:
            if exc_type is None:
                raise  # else the error that ended the study is the one to see
        finally:
            self.bar.close()
            if self.show:
                self._warnings.__exit__(None, None, None)

    def _warn(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        self.bar.write(text.rstrip("\n"), file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            try:
                self.poll()
            except Exception:  # noqa: BLE001, S110 - a busy storage skips one look; the trials go on regardless
                pass

    def poll(self, final: bool = False) -> None:
        """Print the trials that finished since the last look and bring the bar up to date."""
        trials = self.study.get_trials(deepcopy=False)
        retries = retried_as(trials)
        finished = sorted((t for t in trials if t.state.is_finished() and t.number not in self.printed),
                          key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))

        total = max(self.sc.trials + sum(lost_worker(t) for t in trials), len(trials))  # a lost trial's retry adds one
        for t in finished:
            stale = lost_worker(t)
            if stale and t.number not in retries and t.number not in self.held and not final:
                self.held.add(t.number)  # the retry is queued right after the failure: look once more
                continue
            self.printed.add(t.number)
            self.bar.write(f"[{len(self.printed)}/{total}] {describe_trial(t, self.keys, retries.get(t.number))}",
                           file=sys.stdout)
        self.bar.total = total
        self.bar.n = len(self.printed)
        self.bar.set_postfix_str(best_so_far(trials, self.keys), refresh=False)
        self.bar.refresh()
