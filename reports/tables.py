"""MLflow runs → pandas, and the comparison tables a report shows.

Every number in a table is computed here from the runs' logged metrics, params and tags, so a test
can recompute it with pandas from the same records.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from bench import tracking
from bench.errors import BenchError

METRICS = ("bpd", "bpd/prior", "bpd/vb", "bpd/decoder", "bpd_unclipped", "bpd_stderr", "fid", "isc", "fid_ref_test",
           "fid_ref_noise", "train_seconds", "images_per_sec_overall")
GROUP = ("dataset", "variant", "schedule")  # what a row of the comparison table is
DESCRIBE_TAGS = ("bpd_method", "fid_extractor", "fid_samples", "fid_sampler")  # how the numbers were obtained


def load_runs(client, experiments: list[str] | None = None, filter_string: str | None = None) -> pd.DataFrame:
    """Training runs (those tagged with a variant) of the named experiments (all when none) as one
    DataFrame: columns run_id, status, seed, the GROUP tags, DESCRIBE_TAGS, diverged, and METRICS.

    RUNNING runs whose process is gone are first marked KILLED in MLflow, so none is counted as running."""
    ids = [e.experiment_id for e in tracking.experiments(client, experiments)]
    tracking.close_dead_runs(client, ids)
    filt = "tags.variant != ''" + (f" and {filter_string}" if filter_string else "")  # MLflow filters: AND only, no parentheses
    try:
        runs = []
        token = None
        while True:
            page = client.search_runs(ids, filter_string=filt, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except Exception as err:  # MLflow raises MlflowException for a malformed filter
        raise BenchError(f"MLflow could not search runs with filter {filter_string!r}: {str(err).splitlines()[0]}") from None
    rows = []
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        row = {
            "run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
            "experiment_id": r.info.experiment_id, "seed": params.get("config.seed"),
            "diverged": tags.get("diverged") == "true", "study": tags.get("optuna.study", ""),
        }
        row.update({k: tags.get(k, "") for k in GROUP + DESCRIBE_TAGS})
        row.update({m: metrics.get(m, math.nan) for m in METRICS})
        rows.append(row)
    columns = ["run_id", "run_name", "status", "experiment_id", "seed", "diverged", "study", *GROUP, *DESCRIBE_TAGS, *METRICS]
    return pd.DataFrame(rows, columns=columns)


def mean_ci(values: pd.Series) -> tuple[float, float, float, float, int]:
    """mean, sample std, and the 95% t-interval of the mean over the finite values; n."""
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
    """One row per (dataset, variant, schedule): run counts, and for each metric over the FINISHED
    runs' seeds the mean, std and 95% interval. ``best_bpd`` / ``best_fid`` mark the lowest mean
    within each dataset."""
    rows = []
    for key, g in df.groupby(list(GROUP), sort=True):
        done = g[g.status == "FINISHED"]
        row = dict(zip(GROUP, key))
        row.update({"runs": len(g), "finished": len(done), "diverged": int(g.diverged.sum())})
        for m in METRICS:
            mean, std, lo, hi, n = mean_ci(done[m])
            row.update({f"{m} mean": mean, f"{m} std": std, f"{m} ci_low": lo, f"{m} ci_high": hi, f"{m} n": n})
        for t in DESCRIBE_TAGS:
            row[t] = "; ".join(sorted({v for v in done[t] if v}))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for m in ("bpd", "fid"):
        col = table[f"{m} mean"]
        table[f"best_{m}"] = col.notna() & (col == col.groupby(table["dataset"]).transform("min"))
    return table


def paired_differences(df: pd.DataFrame, metrics=("bpd", "fid")) -> pd.DataFrame:
    """For each pair of variants on the same dataset and schedule, the per-seed differences A − B over
    the seeds both finished: mean, std, 95% interval, number of pairs."""
    rows = []
    done = df[df.status == "FINISHED"]
    for (dataset, schedule), g in done.groupby(["dataset", "schedule"], sort=True):
        by_variant = {v: gv.groupby("seed")[list(metrics)].mean() for v, gv in g.groupby("variant")}
        for a, b in itertools.combinations(sorted(by_variant), 2):
            seeds = by_variant[a].index.intersection(by_variant[b].index)
            if len(seeds) == 0:
                continue
            for m in metrics:
                diff = by_variant[a].loc[seeds, m] - by_variant[b].loc[seeds, m]
                mean, std, lo, hi, n = mean_ci(diff)
                if n:
                    rows.append({"dataset": dataset, "schedule": schedule, "metric": m, "A": a, "B": b, "pairs": n,
                                 "mean A−B": mean, "std": std, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["dataset", "schedule", "metric", "A", "B", "pairs", "mean A−B", "std", "ci_low", "ci_high"])


def format_cell(mean: float, std: float, lo: float, hi: float, spec: str = ".4f") -> str:
    """'mean ± std [lo, hi]' in format ``spec``, dropping what is undefined (one seed has no spread)."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:{spec}}"
    if not math.isnan(std):
        text += f" ± {std:{spec}} [{lo:{spec}}, {hi:{spec}}]"
    return text


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table as strings, for HTML and Markdown."""
    if table.empty:
        return table
    out = table[list(GROUP) + ["runs", "finished", "diverged"]].copy()
    for m, spec in (("bpd", ".4f"), ("bpd/prior", ".2e"), ("bpd/vb", ".4f"), ("bpd/decoder", ".4f"),
                    ("bpd_unclipped", ".4f"), ("fid", ".2f"), ("train_seconds", ".1f"), ("images_per_sec_overall", ".0f")):
        cells = [format_cell(r[f"{m} mean"], r[f"{m} std"], r[f"{m} ci_low"], r[f"{m} ci_high"], spec)
                 for _, r in table.iterrows()]
        if m == "bpd":  # an estimated bound carries its Monte Carlo error (mean over the runs' standard errors)
            cells = [c + (f" (MC se {r['bpd_stderr mean']:.4f})" if not math.isnan(r["bpd_stderr mean"]) else "")
                     for c, (_, r) in zip(cells, table.iterrows())]
        star = table.get(f"best_{m}", pd.Series(False, index=table.index))
        out[m if m != "images_per_sec_overall" else "images/s"] = [c + (" ★" if s else "") for c, s in zip(cells, star)]
    for t in DESCRIBE_TAGS:
        out[t] = table[t]
    return out.rename(columns={"train_seconds": "train s"})


def numeric_summary(table: pd.DataFrame) -> dict:
    return {} if table.empty else table.replace({np.nan: None}).to_dict(orient="records")
