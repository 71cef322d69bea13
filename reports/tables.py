"""MLflow runs → pandas, and the comparison tables a report shows.

Every number in a table is computed here from the runs' logged metrics, params and tags, so a test
can recompute it with pandas from the same records.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

from bench.errors import BenchError, first_line
from bench.tracking import liveness
from bench.tracking import store as tracking
from bench.training.config import WEIGHTED_FIELDS, RunConfig, flatten
from reports import reference, weighted
from reports.reference import KIND, PAPER, REFERENCE, SOURCE

if TYPE_CHECKING:
    import pandas as pd

METRICS = ("bpd", "bpd/prior", "bpd/vb", "bpd/diffusion", "bpd/decoder", "bpd_unclipped", "bpd_stderr", "nll_ode",
           "nll_ode_stderr", "nll_ode_nfe", "fid", "isc", "fid_ref_test", "fid_ref_noise", "train_seconds",
           "images_per_sec_overall")
GAP = "bpd − nll_ode"  # per run: how far the bound lies above the probability-flow likelihood on the same images
GROUP = ("dataset", "variant", "schedule")  # what a row of the comparison table is, with SETTINGS
DESCRIBE_TAGS = ("bpd_method", "nll_ode_method", "fid_extractor", "fid_samples", "fid_sampler",
                 "fid_ref_test_samples")  # how obtained
# More of how a number was obtained, read for the figures' captions only (not table columns).
CAPTION_TAGS = ("bpd_estimate_method", "bpd_split", "bpd_images", "fid_reference")
# The RunConfig fields that cannot change a run's numbers, each with the reason. Every other field is part of
# a row's key (SETTINGS), so a field added to RunConfig splits rows until it is listed here with a reason.
RESULT_FREE = {
    "seed": "what a row pools: its runs are the seeds of one configuration",
    "run_name": "a label in MLflow", "experiment": "where the run is recorded",
    "tracking_uri": "where the run is recorded",
    "data_dir": "where the dataset's files are read from; which dataset is in the key",
    "download": "whether a missing dataset may be fetched",
    "log_every": "how often the training loss is logged, as means over the same steps",
    "eval_every": "when training-time estimates are logged; they draw from their own keyed noise streams, so "
                  "training and the final evaluation do not depend on it",
    "checkpoint_every": "when checkpoints are written; a resume continues bit-exactly",
    "system_metrics": "whether CPU/GPU utilisation is logged",
    "sample_grid": "how many images a logged grid shows; sample j depends on (seed, j) only, not on how many are drawn",
    "eval_batch_size": "how (image, t) pairs are batched; the bound does not depend on it (a tested invariance)",
    "device": "which card or the CPU: the same arithmetic up to float rounding; the precision it implies under "
              "precision=auto (bf16 on CUDA) is resolved into the key's precision",
    "compile": "torch.compile runs the same arithmetic, up to float rounding",
    "channels_last": "a memory layout: the same arithmetic, up to float rounding",
    "log_model": "whether the EMA network is also logged as an MLflow model",
    "fid_weights": "the file the Inception weights are read from; the extractor and its weights' hash are in the key "
                   "from the run's tags (fid_extractor, fid_weights)",
}
KEY_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in RESULT_FREE)
# fields the GROUP tags show (a variant tag is 'name[variance]'; a weighted run's label shows its weighting, its
# hyper-parameters and the adaptive schedule: reports.weighted)
IN_GROUP = {"dataset", "variant", "variance", "schedule", *WEIGHTED_FIELDS}
# shorter names in labels; others by field name
LABELS = {"batch_size": "batch", "final_eval": "bound", "final_eval_images": "bound images",
          "eval_calls": "estimate calls", "fid_samples": "FID samples", "sample_steps": "sampler steps"}
HEADLINE = ("network", "steps", "batch_size", "lr", "T", "final_eval", "final_eval_images", "eval_calls", "fid_samples",
            "sample_steps")  # the settings said once above the table when every row shares them
# A row's key beyond GROUP (a run's logged param → its column and name in labels): every field of KEY_FIELDS, and
# the bound's convention. Runs that differ in any of these get separate rows.
SETTINGS = {f"config.{f}": f"config.{f}" if f in IN_GROUP else LABELS.get(f, f) for f in KEY_FIELDS}
SETTINGS["protocol.bpd"] = "bpd convention"
# part of a row's key too: FIDs of different feature extractors are never pooled or compared
EXTRACTOR = "fid_extractor"
FEATURE_METRICS = ("fid", "isc", "fid_ref_test", "fid_ref_noise")  # numbers the feature extractor computes
# RunConfig fields added after runs were recorded that could not have changed those runs (they were all DDPM
# variants, which the continuous-time settings do not touch, or, for the prediction and the weighted family's
# fields, DDPM and VDM variants: ε-prediction, no weighting): a run without the param had its default.
PREDATING_DEFAULTS = {"config.gamma_schedule": "auto", "config.gamma_min": "-13.3", "config.gamma_max": "5.0",
                      "config.fourier_features": "False",
                      **{k: v for k, v in flatten(RunConfig()).items()
                         if k.removeprefix("config.") in ("prediction", *WEIGHTED_FIELDS)}}
MONOTONE = "monotone"  # a weighted run's flag: is w(λ) non-increasing on its schedule (yes, no, ?); '' for others
LEGACY_CONVENTION = "x0-unclipped"  # runs logged before `protocol.bpd` existed computed the bound unclipped
# The settings that say how a row was evaluated (not trained): a reference row's settings cell names those where its
# evaluation differs from the trained rows' (its training settings are its paper's, reports.reference)
EVALUATION = ("T", "bound", "bound images", "estimate calls", "final_eval_ode", "ode_images", "ode_method", "ode_rtol",
              "ode_atol", "ode_probes", "ode_probe_type", "FID samples", "sampler steps", "precision", "bpd convention")


def load_runs(client, experiments: list[str] | None = None, filter_string: str | None = None) -> pd.DataFrame:
    """Training runs (those tagged with a variant) and imported published models (tag ``imported`` = "true") of the
    named experiments (all when none) as one DataFrame: columns run_id, status, seed, the GROUP tags, SETTINGS,
    MONOTONE, KIND, SOURCE, the paper's values (PAPER), DESCRIBE_TAGS, CAPTION_TAGS, diverged, and METRICS.
    ``fid_extractor`` names the extractor with its weights' hash (see :func:`_extractor_of_rows`). A weighted run's
    ``variant`` is its label from its config (:mod:`reports.weighted`:
    ``weighted[min-snr γ=3+adaptive]``), so each weighting is a row of its own; an imported model's is its reference
    label (:mod:`reports.reference`: ``hybrid · published: iDDPM L_hybrid CIFAR-10 (improved-diffusion, EMA)``).

    RUNNING runs whose process is gone are first marked KILLED in MLflow, so none is counted as running."""
    import pandas as pd  # heavy: only reports need it

    ids = [e.experiment_id for e in tracking.experiments(client, experiments)]
    liveness.close_dead_runs(client, ids)
    # MLflow filters: AND only, no parentheses: imported models (which may lack a variant tag) are a second search
    extra = f" and {filter_string}" if filter_string else ""
    runs = {r.info.run_id: r for filt in ("tags.variant != ''", "tags.imported = 'true'")
            for r in _search(client, ids, filt + extra, filter_string)}
    rows = []
    for r in runs.values():
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        if reference.is_reference(tags):  # the tags a trained run carries, from its params where an import lacks them
            tags = {"variant": params.get("variant.variant", params.get("config.variant", "")),
                    "dataset": params.get("config.dataset", ""), "schedule": params.get("schedule", ""), **tags}
        row = {
            "run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
            "experiment_id": r.info.experiment_id, "seed": params.get("config.seed"), "start_time": r.info.start_time,
            "diverged": tags.get("diverged") == "true", "study": tags.get("optuna.study", ""),
        }
        # '' where a run predates a field (but those that could not have changed it: PREDATING_DEFAULTS)
        row.update({name: params.get(key, PREDATING_DEFAULTS.get(key, "")) for key, name in SETTINGS.items()})
        row["precision"] = _precision(params)
        row["bpd convention"] = params.get("protocol.bpd", LEGACY_CONVENTION)
        row.update({k: tags.get(k, "") for k in GROUP + DESCRIBE_TAGS + CAPTION_TAGS})
        row.update(weighted.row_values(params, tags))  # a weighted run's label, monotone flag and weighting key
        row.update(reference.row_values(row["variant"], tags))  # an imported model's label, source and paper values
        row[EXTRACTOR] = _extractor(tags)
        row.update({m: metrics.get(m, math.nan) for m in METRICS})
        rows.append(row)
    columns = ["run_id", "run_name", "status", "experiment_id", "seed", "start_time", "diverged", "study",
               *GROUP, *SETTINGS.values(), MONOTONE, KIND, SOURCE, *PAPER.values(), *DESCRIBE_TAGS, *CAPTION_TAGS,
               *METRICS]
    return _extractor_of_rows(pd.DataFrame(rows, columns=columns))


def _search(client, ids: list[str], filt: str, filter_string: str | None) -> list:
    """Every run of experiments ``ids`` that MLflow filter ``filt`` matches, page by page; ``filter_string``, the
    user's part of it, is named in the error where MLflow refuses the filter."""
    try:
        runs, token = [], None
        while True:
            page = client.search_runs(ids, filter_string=filt, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    except Exception as err:  # noqa: BLE001 - MLflow raises MlflowException for a malformed filter
        raise BenchError(f"MLflow could not search runs with filter {filter_string!r}: {first_line(err)}") from None


def _extractor_of_rows(df: pd.DataFrame) -> pd.DataFrame:
    """A run without a FID (diverged, or not finished) joins the row of its settings where exactly one feature
    extractor scored the others: it takes that extractor in its EXTRACTOR column, which is part of a row's key."""
    if df.empty:
        return df
    rest = [k for k in row_key() if k != EXTRACTOR]
    scored = df[EXTRACTOR].where(df[EXTRACTOR] != "")
    only = scored.groupby([df[k] for k in rest], dropna=False).transform(
        lambda e: e.dropna().iloc[0] if e.nunique() == 1 else "")
    return df.assign(**{EXTRACTOR: df[EXTRACTOR].mask(df[EXTRACTOR] == "", only.fillna(""))})


def _precision(params: dict) -> str:
    """The precision a run ran in: ``precision=auto`` resolved as bench.runtime.devices does (bf16 autocast on CUDA,
    fp32 elsewhere) from the device the run logged; 'auto' where that is not recorded."""
    asked = params.get("config.precision", "")
    if asked != "auto" or "device" not in params:
        return asked
    return "bf16" if params["device"].startswith("cuda") else "fp32"


def _extractor(tags: dict) -> str:
    """Which feature extractor scored the run's FID: its name, with its weights' hash where the name lacks it."""
    name, weights = tags.get("fid_extractor", ""), tags.get("fid_weights", "")
    return f"{name} (weights {weights})" if name and weights and weights not in name else name


def deduplicate(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One run per row key and seed: the latest FINISHED one, else the latest. Returns (runs, how many dropped)."""
    if df.empty:
        return df, 0
    order = df.assign(_finished=df.status == "FINISHED").sort_values(["_finished", "start_time"])
    kept = order.drop_duplicates([*row_key(), "seed"], keep="last").drop(columns="_finished")
    return kept.sort_index(), len(df) - len(kept)


def row_key() -> list[str]:
    """The columns whose values a row's runs share: everything that can change a result but the seed, and whether
    they are trained runs or which imported file (KIND, SOURCE: a published model is never pooled with them)."""
    return [*GROUP, *SETTINGS.values(), EXTRACTOR, KIND, SOURCE]


ROW = "table row"  # a run's row in the comparison table (0-based, in its order): the figures colour and order by it


def row_numbers(df: pd.DataFrame) -> pd.Series:
    """Each run's row in :func:`comparison_table` (which groups by the same key, sorted the same way)."""
    import pandas as pd  # heavy: only reports need it

    return df.groupby(row_key(), sort=True, dropna=False).ngroup() if len(df) else pd.Series([], dtype=int)


def trained(df: pd.DataFrame) -> pd.DataFrame:
    """The trained runs (or rows) of ``df``: those not of KIND reference; all of ``df`` when it holds no trained one."""
    mine = df[df[KIND] != REFERENCE]
    return df if mine.empty else mine


def varying_settings(df: pd.DataFrame) -> list[str]:
    """The SETTINGS that take more than one value among the trained runs of the selection (so rows are split by them),
    but those the GROUP columns show already. A reference row is labelled by what it differs in
    (:func:`reference_settings`), so adding one changes no trained row's label."""
    base = trained(df)
    return [name for key, name in SETTINGS.items()
            if key.removeprefix("config.") not in IN_GROUP and base[name].nunique(dropna=False) > 1]


def reference_settings(df: pd.DataFrame, row: dict) -> list[str]:
    """For a reference row (a dict of its key), the EVALUATION settings the trained runs of ``df`` share and it does
    not, and its dataset and schedule where they differ from the trained runs' single one."""
    base = df[df[KIND] != REFERENCE]
    if row[KIND] != REFERENCE or base.empty:
        return []
    return [name for name in ("dataset", "schedule", *EVALUATION)
            if base[name].nunique(dropna=False) == 1 and str(row[name]) != str(base[name].iloc[0])]


def mean_ci(values: pd.Series) -> tuple[float, float, float, float, int]:
    """mean, sample std, and the 95% t-interval of the mean over the finite values; n."""
    from scipy import stats  # heavy: only the intervals need it

    v = values.dropna().to_numpy(dtype=float)
    n = len(v)
    if n == 0:
        return (math.nan,) * 4 + (0,)
    mean = float(v.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan, 1
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return mean, std, mean - half, mean + half, n


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, variant, schedule) and SETTINGS: runs that agree on everything but the
    seed (call :func:`deduplicate` first). Run counts, and for each metric over the FINISHED runs'
    seeds the mean, std and 95% interval; ``settings`` names the row's values of the settings that
    vary in the selection (a reference row's: also those it differs in, :func:`reference_settings`). ``best_bpd`` /
    ``best_fid`` mark the lowest mean of a trained row within each dataset (a published model is a reference, not a
    contender)."""
    import pandas as pd  # heavy: only reports need it

    rows = []
    keys, varying = row_key(), varying_settings(df)
    df = df.assign(**{GAP: df["bpd"] - df["nll_ode"]})
    for key, g in df.groupby(keys, sort=True, dropna=False):
        done = g[g.status == "FINISHED"]
        row = dict(zip(keys, key))
        names = [*varying, *(n for n in reference_settings(df, row) if n not in varying)]
        row["settings"] = ", ".join(f"{name}={shown_setting(name, row[name])}" for name in names)
        row.update({column: g[column].iloc[0] for column in PAPER.values()})  # the paper's values, as its tags say
        row[MONOTONE] = g[MONOTONE].iloc[0]  # the row's config gives it
        row.update({"runs": len(g), "finished": len(done), "diverged": int(g.diverged.sum())})
        for m in (*METRICS, GAP):
            mean, std, lo, hi, n = mean_ci(done[m])
            row.update({f"{m} mean": mean, f"{m} std": std, f"{m} ci_low": lo, f"{m} ci_high": hi, f"{m} n": n})
        for t in DESCRIBE_TAGS:
            row[t] = "; ".join(sorted({v for v in done[t] if v}))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for m in ("bpd", "fid"):  # FIDs are compared only with those of the same feature extractor
        col = table[f"{m} mean"].where(table[KIND] != REFERENCE)
        among = [table["dataset"]] + [table[EXTRACTOR]] * (m in FEATURE_METRICS)
        table[f"best_{m}"] = col.notna() & (col == col.groupby(among).transform("min"))
    return table


def _pairing(metric: str) -> list[str]:
    """What two variants' runs must share for their per-seed differences in ``metric``: the row key but the variant,
    and the feature extractor only for the numbers it computes (a bound does not depend on it). Two weightings of
    the weighted family are two variants here (their labels say which)."""
    variant = {"variant", *(SETTINGS[f"config.{f}"] for f in ("variant", "variance", *WEIGHTED_FIELDS))}
    return [k for k in row_key() if k not in variant and (k != EXTRACTOR or metric in FEATURE_METRICS)]


def paired_differences(df: pd.DataFrame, metrics=("bpd", "fid")) -> pd.DataFrame:
    """For each pair of variants on the same dataset, schedule and SETTINGS (FIDs: and feature extractor), the
    per-seed differences A − B over the seeds both finished: mean, std, 95% interval, number of pairs. Trained runs
    only: a published model (a reference row) has no seeds of these runs to pair with."""
    import pandas as pd  # heavy: only reports need it

    rows = []
    done = df[(df.status == "FINISHED") & (df[KIND] != REFERENCE)]
    varying = varying_settings(df)
    for m in metrics:
        like = _pairing(m)
        for key, g in done.groupby(like, sort=True, dropna=False):
            where = dict(zip(like, key))
            settings = ", ".join(f"{name}={where[name]}" for name in varying if name in where)
            by_variant = {v: gv.groupby("seed")[m].mean() for v, gv in g.groupby("variant")}
            for a, b in itertools.combinations(sorted(by_variant), 2):
                seeds = by_variant[a].index.intersection(by_variant[b].index)
                mean, std, lo, hi, n = mean_ci(by_variant[a].loc[seeds] - by_variant[b].loc[seeds])
                if n:
                    rows.append({"dataset": where["dataset"], "schedule": where["schedule"], "settings": settings,
                                 "metric": m, "A": a, "B": b, "pairs": n, "mean A−B": mean, "std": std, "ci_low": lo,
                                 "ci_high": hi})
    columns = ["dataset", "schedule", "settings", "metric", "A", "B", "pairs", "mean A−B", "std", "ci_low", "ci_high"]
    out = pd.DataFrame(rows, columns=columns).sort_values(["dataset", "schedule", "settings", "A", "B"], kind="stable")
    out = out.reset_index(drop=True)
    return out if varying else out.drop(columns="settings")


def extractor_conflicts(df: pd.DataFrame) -> list[str]:
    """One line for each pair of variants whose FIDs are not compared because different feature extractors scored
    them (runs that would otherwise be paired: the same dataset, settings and seeds)."""
    done = df[(df.status == "FINISHED") & df["fid"].notna() & (df[KIND] != REFERENCE)]
    like, lines = _pairing("bpd"), []
    for key, g in done.groupby(like, sort=True, dropna=False):
        by_variant = dict(list(g.groupby("variant")))
        for a, b in itertools.combinations(sorted(by_variant), 2):
            ra, rb = by_variant[a], by_variant[b]
            for seed in sorted(set(ra.seed) & set(rb.seed)):
                ea, eb = set(ra[ra.seed == seed][EXTRACTOR]), set(rb[rb.seed == seed][EXTRACTOR])
                if not ea & eb:
                    lines.append(f"FIDs of {a} ({'; '.join(sorted(ea)) or 'extractor not recorded'}) and {b} "
                                 f"({'; '.join(sorted(eb)) or 'extractor not recorded'}) on {key[0]} are not compared: "
                                 "different feature extractors")
                    break
    return lines


def format_cell(mean: float, std: float, lo: float, hi: float, n: int, spec: str = ".4f") -> str:
    """'mean ± std [lo, hi]' in format ``spec`` from 3 seeds on; 'mean ± std (n=2)' below, where a t-interval
    says little; 'mean (n=1)' for one seed; 'mean (n=3, identical)' when every seed gave the same value (at
    ``spec``'s precision), instead of a zero spread. Every metric here is positive, so an interval stops at 0."""
    if math.isnan(mean):
        return "–"
    if n < 2 or math.isnan(std):
        return f"{mean:{spec}} (n={n})"
    if float(f"{std:{spec}}") == 0.0:
        return f"{mean:{spec}} (n={n}, identical)"
    if n < 3:
        return f"{mean:{spec}} ± {std:{spec}} (n={n})"
    return f"{mean:{spec}} ± {std:{spec}} [{max(lo, 0.0):{spec}}, {hi:{spec}}]"


DISPLAY = (("bpd", ".4f"), ("nll_ode", ".4f"), (GAP, ".4f"), ("nll_ode_nfe", ".0f"), ("bpd/prior", ".2e"),
           ("bpd/vb", ".4f"), ("bpd/diffusion", ".4f"), ("bpd/decoder", ".4f"), ("bpd_unclipped", ".4f"),
           ("fid", ".2f"), ("isc", ".2f"), ("fid_ref_test", ".2f"), ("fid_ref_noise", ".2f"), ("train_seconds", ".1f"),
           ("images_per_sec_overall", ".0f"))
RENAME = {"train_seconds": "train s", "images_per_sec_overall": "images/s"}


def shown_setting(name: str, value) -> str:
    """A setting's value as a reader takes it: ``bound images`` 0 (the config's "the whole test split") as 'all'."""
    return "all" if name == LABELS["final_eval_images"] and str(value) == "0" else str(value)


def _runs_cell(r) -> str:
    """'3', or '4 (3 finished, 1 diverged)' where not every run finished."""
    if r["finished"] == r["runs"] and not r["diverged"]:
        return str(r["runs"])
    return f"{r['runs']} ({r['finished']} finished" + (f", {r['diverged']} diverged" if r["diverged"] else "") + ")"


def display_table(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The comparison table as strings, for HTML and Markdown, and the protocol lines: what every row
    shares (constant settings, tags and columns) is said once above the table instead of in each cell.
    Of the row's key, the variant has a column; a dataset or schedule that differs between rows, and the
    settings that do (``settings``), share one compact column, ``settings``. With reference rows (published models),
    a column ``kind`` says which rows they are, the paper's values stand beside the measured ones (``paper bpd``,
    ``paper FID``), and the protocol lines are what every trained row shares."""
    import pandas as pd  # heavy: only reports need it

    if table.empty:
        return table, []
    several, base = len(table) > 1, trained(table)
    out = table[["variant"]].copy()
    if (table[KIND] == REFERENCE).any():
        out[KIND] = table[KIND]
    varying = [c for c in ("dataset", "schedule") if several and base[c].nunique(dropna=False) > 1]
    keys = [[f"{c}={r[c]}" for c in varying] + ([r["settings"]] if r["settings"] else []) for _, r in table.iterrows()]
    if any(keys):
        out["settings"] = [", ".join(k) for k in keys]
    if not several:  # one row: nothing to fold into the header; its dataset and schedule are its columns
        out.insert(0, "dataset", table["dataset"])
        out["schedule"] = table["schedule"]
    if (table[MONOTONE] != "").any():  # weighted rows: is their w(λ) non-increasing (L_w an ELBO)?
        out[MONOTONE] = table[MONOTONE]
    out["runs"] = [_runs_cell(r) for _, r in table.iterrows()]
    for m, spec in DISPLAY:
        if f"{m} mean" not in table or table[f"{m} n"].sum() == 0:
            continue
        cells = [format_cell(r[f"{m} mean"], r[f"{m} std"], r[f"{m} ci_low"], r[f"{m} ci_high"], r[f"{m} n"], spec)
                 for _, r in table.iterrows()]
        if m in ("bpd", "nll_ode"):  # an estimate carries its Monte Carlo error (mean over the runs' standard errors)
            cells = [c + (f" (MC se {r[f'{m}_stderr mean']:.4f})" if not math.isnan(r[f"{m}_stderr mean"]) else "")
                     for c, (_, r) in zip(cells, table.iterrows())]
        star = table.get(f"best_{m}", pd.Series(False, index=table.index))
        out[RENAME.get(m, m)] = [c + (" ★" if s else "") for c, s in zip(cells, star)]
        paper = PAPER.get(f"paper_{m}")
        if paper and (table[paper] != "").any():  # the paper's value beside the measured one
            out[paper] = table[paper]
    for t in DESCRIBE_TAGS:
        out[t] = table[t]
    said = ["dataset", "schedule"] * several + [LABELS.get(f, f) for f in HEADLINE] + ["bpd convention"]
    if (table[KIND] == REFERENCE).all():  # published models only: their training settings are their papers', not
        said = [name for name in said if name in ("dataset", "schedule", *EVALUATION)]  # the config they were read with
    protocol = [f"{name}: {shown_setting(name, base[name].iloc[0])}" for name in said
                if base[name].nunique(dropna=False) == 1 and base[name].iloc[0]]
    if len(out) > 1:  # what is the same in every row is said once, not repeated in a column
        for m, spec in DISPLAY:
            col = RENAME.get(m, m)
            if col in out and _constant(table, m, spec):
                protocol.append(f"{col}: {table[f'{m} mean'].iloc[0]:{spec}} in every run")
                out = out.drop(columns=col)
        for t in DESCRIBE_TAGS:
            if out[t].nunique() == 1:
                if out[t].iloc[0]:
                    protocol.append(f"{t}: {out[t].iloc[0]}")
                out = out.drop(columns=t)
    return out, protocol


# the comparison itself (with a published model's paper values beside bpd and fid); the rest (terms, references,
# cost, how each number was obtained) go in a second table, so neither is wider than a page
HEADLINE_METRICS = ("bpd", PAPER["paper_bpd"], "nll_ode", GAP, "fid", PAPER["paper_fid"])


def split_display(shown: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The displayed table as (comparison, details): both keep the columns that name a row; the comparison has the
    run counts and HEADLINE_METRICS, the details the other metrics and one column, ``measured``, saying how the
    numbers were obtained (the DESCRIBE_TAGS that differ between rows, 'tag: value' each); details are empty when
    there is nothing to put in them. Weighted rows' monotone flag is in the comparison, before the run counts."""
    names = [c for c in ("dataset", "variant", KIND, "schedule", "settings") if c in shown]
    main = [c for c in (MONOTONE, "runs", *HEADLINE_METRICS) if c in shown]
    tags = [t for t in DESCRIBE_TAGS if t in shown]
    rest = [c for c in shown if c not in names and c not in main and c not in tags]
    details = shown[names + rest].copy()
    if tags:
        details["measured"] = ["; ".join(f"{t}: {r[t]}" for t in tags if r[t]) for _, r in shown.iterrows()]
    return shown[names + main], (details if rest or tags else shown.iloc[:, :0])


def _constant(table: pd.DataFrame, m: str, spec: str) -> bool:
    """Whether metric ``m`` shows one value, with no spread, in every row that has it (at ``spec`` precision)."""
    has = table[table[f"{m} n"] > 0]
    means = {f"{v:{spec}}" for v in has[f"{m} mean"]}
    spread = (has[f"{m} std"].fillna(0.0) > 1e-9 * has[f"{m} mean"].abs()).any()  # beyond float rounding
    return len(has) == len(table) and len(means) == 1 and not spread


def numeric_summary(table: pd.DataFrame) -> dict:
    return {} if table.empty else table.replace({np.nan: None}).to_dict(orient="records")
