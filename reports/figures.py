"""The report's pictures, each drawn from what the runs logged in MLflow, and their captions.

A caption says what was measured, composed from the same runs' tags and params as the picture (the
bound's method and images, the convention, the FID extractor, sample count and sampler), never assumed.
Runs are coloured by group, their variant and training budget, so runs of different budgets never
share a colour; a run with one evaluation is drawn as a point, never as a line. Where the runs carry their
comparison-table row (column ROW, as the report passes them), a group's colour is its row's, the same in every
figure, and legends list the groups in the table's order.
"""

from __future__ import annotations

import json
import math
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.tracking.plots import per_t_figure, pyplot
from reports.reference import KIND, REFERENCE
from reports.tables import EXTRACTOR, ROW, SETTINGS

if TYPE_CHECKING:
    import pandas as pd

CONVENTIONS = {"x0-clipped": "x̂_0 clipped to [-1, 1] in the reverse step (DDPM/iDDPM)",
               "x0-unclipped": "x̂_0 not clipped",
               "continuous-time": "a continuous-time model's bound (VDM: decoder + prior + diffusion, nothing clipped)"}


def _colors(df: pd.DataFrame, groups) -> dict:
    """Group label → colour, in legend order: by the table row of the group's runs (ROW) where known, so the
    same row has the same colour in every figure whichever rows a figure leaves out; else by label."""
    import pandas as pd  # heavy: only reports need it

    cmap = pyplot().get_cmap("tab10")
    groups = pd.Series(list(groups), index=df.index)
    if ROW in df:
        first = df[ROW].groupby(groups.to_numpy()).min()
        return {g: cmap(int(first[g]) % 10) for g in sorted(first.index, key=lambda g: (first[g], g))}
    return {v: cmap(i % 10) for i, v in enumerate(sorted(groups.unique()))}


def _mixed(df: pd.DataFrame, column: str) -> bool:
    return column in df and df[column].nunique(dropna=False) > 1


def _axes():
    return pyplot().subplots(figsize=(7.5, 4.2), layout="constrained")


def _legend_below(fig, handles, labels) -> None:
    """The legend under the axes, in as many columns as the longest label allows; the figure grows to hold it."""
    ncols = max(1, min(3, 120 // (max(len(label) for label in labels) + 8)))
    rows = math.ceil(len(labels) / ncols)
    fig.set_size_inches(7.5, 4.2 + 0.2 * rows)
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=7, frameon=False)


def run_groups(df: pd.DataFrame) -> pd.Series:
    """Each run's legend label: its variant and training budget ("elbo[small] · 300 steps"), with the dataset,
    schedule, the other settings of a table row's key and the FID's feature extractor where the selection mixes
    them, so runs that differ there are not one group (as they are not one row). A published model's label (its
    variant column, :mod:`reports.reference`) says what it is; it has no training budget here."""
    import pandas as pd  # heavy: only reports need it

    budgets = "steps" in df and df["steps"].astype(bool).any()
    mixed = [name for name in [*SETTINGS.values(), EXTRACTOR]
             if name != "steps" and not name.startswith("config.") and _mixed(df, name)]  # config.*: GROUP shows them

    def label(r) -> str:
        parts = [r["dataset"]] if _mixed(df, "dataset") else []
        parts.append(r["variant"])
        if _mixed(df, "schedule"):
            parts.append(r["schedule"])
        if budgets and r.get(KIND) != REFERENCE:
            parts.append(f"{r['steps']} steps" if r["steps"] else "steps not recorded")
        parts += [f"{name}={r[name]}" for name in mixed]
        return " · ".join(parts)

    return df.apply(label, axis=1) if len(df) else pd.Series([], dtype=str)


def _counted(values, missing: str = "not recorded") -> str:
    """Distinct descriptions, each with its number of runs when they differ: 'a' or 'a [2 runs]; b [1 run]';
    ``missing`` stands for a run that recorded none."""
    import pandas as pd  # heavy: only reports need it

    counts = pd.Series([str(v) if v else missing for v in values], dtype=object).value_counts(sort=False)
    if len(counts) == 1:
        return counts.index[0]
    return "; ".join(f"{v} [{n} run{'s' * (n > 1)}]" for v, n in sorted(counts.items()))


def _method(tag: str) -> str:
    """The method part of a bpd_method / bpd_estimate_method tag ('exact (all 1000 t, 297 test images)'): up to its
    first ';' outside parentheses."""
    depth = 0
    for i, ch in enumerate(str(tag or "")):
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            return str(tag)[:i].strip()
    return str(tag or "").strip()


def _convention(r) -> str:
    return CONVENTIONS.get(r.get("bpd convention", ""), "convention not recorded")


# ------------------------------------------------------------------------------------------- bpd against step
@dataclass
class RunSeries:
    """One run's bits/dim points, (step, value, standard error or nan) sorted by step."""

    row: pd.Series
    group: str
    estimates: list[tuple[int, float, float]] = field(default_factory=list)  # bpd_estimate during training
    final: list[tuple[int, float, float]] = field(default_factory=list)  # bpd, the final bound

    @property
    def final_kind(self) -> str:
        method = _method(self.row.get("bpd_method", ""))
        return method.split(" ")[0] if method.split(" ")[0] in ("exact", "estimate") else "unknown"


def _points(client, run_id: str, key: str, err_key: str | None = None) -> list[tuple[int, float, float]]:
    """(step, value, standard error) of metric ``key``: the latest value logged at each step."""
    def latest(k: str) -> dict[int, float]:
        return {m.step: m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.timestamp)}

    values = latest(key)
    errs = latest(err_key) if err_key and values else {}
    return [(s, values[s], errs.get(s, math.nan)) for s in sorted(values)]


def bpd_series(client, df: pd.DataFrame) -> list[RunSeries]:
    """The bits/dim each run logged: its training-time estimates and its final bound; by group, then seed."""
    import pandas as pd  # heavy: only reports need it

    df = (df.assign(_group=run_groups(df), _seed=pd.to_numeric(df.seed, errors="coerce"))
          .sort_values(["_group", "_seed"]))
    out = []
    for (_, r), group in zip(df.iterrows(), df["_group"]):
        s = RunSeries(r, group, _points(client, r.run_id, "bpd_estimate", "bpd_estimate_stderr"),
                      _points(client, r.run_id, "bpd", "bpd_stderr"))
        if s.estimates or s.final:
            out.append(s)
    return out


def _steps(series: list[RunSeries]) -> set[int]:
    return {p[0] for s in series for p in s.estimates + s.final}


FINAL_MARKERS = {"exact": ("*", True), "estimate": ("D", False), "unknown": ("s", False)}  # marker, filled


def bpd_history(series: list[RunSeries]):
    """Bits/dim against training step: each run's training-time estimates (a line where it has several,
    a point where it has one; ± 2 standard errors) and its final bound (a star when exact, a hollow diamond
    when estimated). When every point sits at one step, the groups are spread along x instead."""
    import pandas as pd  # heavy: only reports need it
    from matplotlib.lines import Line2D  # heavy: only figures need it

    if not series:
        return None
    colors = _colors(pd.DataFrame([s.row for s in series]), [s.group for s in series])
    steps = _steps(series)
    one_step = len(steps) == 1
    slots = {g: i for i, g in enumerate(colors)}  # the table's order
    apart = 0.2 if any(s.estimates for s in series) and any(s.final for s in series) else 0.0
    fig, ax = _axes()
    for i, s in enumerate(series):
        color = colors[s.group]
        if one_step:  # one column per group, runs side by side in it, estimate left of the final bound
            width = sum(t.group == s.group for t in series)
            rank = sum(t.group == s.group for t in series[:i])
            center = slots[s.group] + (rank - (width - 1) / 2) * 0.08
            est_x, final_x = center - apart, center + apart
        else:
            est_x = final_x = None
        if s.estimates:
            x, y, e = (np.array(c, dtype=float) for c in zip(*s.estimates))
            x = np.full_like(y, est_x) if one_step else x
            if len(y) > 1:
                ax.plot(x, y, color=color, lw=1, marker="o", ms=3, alpha=0.85)
                ok = np.isfinite(e)
                ax.fill_between(x[ok], (y - 2 * e)[ok], (y + 2 * e)[ok], color=color, alpha=0.15, lw=0)
            else:
                ax.errorbar(x, y, yerr=2 * e if np.isfinite(e).all() else None, fmt="o", ms=5, color=color,
                            capsize=3, lw=1)
        for step, value, err in s.final:
            marker, filled = FINAL_MARKERS[s.final_kind]
            ax.errorbar([final_x if one_step else step], [value], yerr=[2 * err] if math.isfinite(err) else None,
                        fmt=marker, ms=11 if marker == "*" else 7, color=color, mfc=color if filled else "white",
                        mec=color, mew=1.5, capsize=3, lw=1)
    handles = [Line2D([], [], color=colors[g], lw=6, label=g) for g in colors]
    if any(s.estimates for s in series):
        handles.append(Line2D([], [], color="0.4", marker="o", ms=4, lw=1, label="estimate during training"))
    for kind in sorted({s.final_kind for s in series if s.final}):
        marker, filled = FINAL_MARKERS[kind]
        handles.append(Line2D([], [], color="0.4", marker=marker, ms=9 if marker == "*" else 6, ls="none",
                              mfc="0.4" if filled else "white", mew=1.5,
                              label={"exact": "final bound, exact", "estimate": "final bound, estimated",
                                     "unknown": "final bpd, method not recorded"}[kind]))
    if one_step:
        step = steps.pop()
        ax.set_xticks(range(len(slots)), [g.replace(" · ", "\n") for g in slots], fontsize=8)
        ax.set_xlim(-0.6, len(slots) - 0.4)
        ax.set_xlabel(f"every point at training step {step}")
        ax.set_title(f"Bits/dim at training step {step}", fontsize=10)
    else:
        ax.set_xlim(0, max(steps) * 1.04)
        ax.set_xlabel("training step")
        ax.set_title("Bits/dim against training step", fontsize=10)
    ax.set_ylabel("bits/dim (test split)")
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, [h.get_label() for h in handles])
    pyplot().close(fig)
    return fig


def bpd_history_caption(series: list[RunSeries]) -> str:
    """What the bits/dim picture shows, from the runs drawn in it."""
    steps = _steps(series)
    where = "against training step" if len(steps) > 1 else f"at training step {min(steps)}, where every point was taken"
    lines = [f"Bits/dim on the test split {where} ({len(series)} runs; colour: variant · training budget)."]
    est = [s for s in series if s.estimates]
    if est:
        clipped = all("bpd_estimate: x̂_0 clipped" in s.row.get("bpd_estimate_method", "") for s in est)
        lines.append("Circles, joined where a run has several: the unbiased Monte Carlo estimate of the bound taken "
                     "during training (metric bpd_estimate), "
                     + _counted((_method(s.row.get("bpd_estimate_method", "")) for s in est), "method not recorded")
                     + "; "
                     + ("x̂_0 clipped to [-1, 1]" if clipped else "convention not recorded")
                     + "; bars and bands: ± 2 Monte Carlo standard errors.")
    for kind, shape, what in (("exact", "Stars", "the final bound computed exactly (metric bpd)"),
                              ("estimate", "Hollow diamonds", "the final bound estimated without bias (metric bpd)"),
                              ("unknown", "Hollow squares", "the final bpd (metric bpd), method not recorded")):
        runs = [s for s in series if s.final and s.final_kind == kind]
        if runs:
            lines.append(f"{shape}: {what}, " + _counted(_method(s.row.get("bpd_method", "")) for s in runs) + "; "
                         + _counted(_convention(s.row) for s in runs)
                         + ("; bars: ± 2 Monte Carlo standard errors" if kind == "estimate" else "") + ".")
    return " ".join(lines)


# ---------------------------------------------------------------------------------------------- training loss
def loss_history(client, df: pd.DataFrame):
    """The training loss of each run against step, coloured by group, log-scaled; a run with one point is a point."""
    plt = pyplot()

    groups = run_groups(df)
    colors = _colors(df, groups)
    fig, ax = _axes()
    seen, drew = set(), 0
    for (_, r), group in zip(df.iterrows(), groups):
        pts = _points(client, r.run_id, "loss")
        if not pts:
            continue
        label = None if group in seen else group
        seen.add(group)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[group], lw=1, alpha=0.85, label=label,
                marker="o" if len(pts) < 4 else None, ms=3 if len(pts) > 1 else 5, ls="-" if len(pts) > 1 else "none")
        drew += 1
    if not drew:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlim(0, None)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (the variant's own objective)")
    ax.set_title("Training loss", fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: list(colors).index(labels[i]))
    _legend_below(fig, [handles[i] for i in order], [labels[i] for i in order])
    plt.close(fig)
    return fig


LOSS_CAPTION = ("Training loss (metric loss) against step, log scale, one line per run (colour: variant · training "
                "budget): each variant's own objective, averaged over the steps between two logs, so levels compare "
                "runs of one variant, not variants with each other.")


# ------------------------------------------------------------------------------------------------- per-t terms
def per_t_curves(client, df: pd.DataFrame) -> tuple[object, str] | None:
    """The per-timestep terms L_t of the exact final bound (per_t_bound.json), mean over each group's finished
    runs, overlaid; with its caption. None when no run logged them (an estimated final bound logs none)."""
    import pandas as pd  # heavy: only reports need it

    done = df[df.status == "FINISHED"]
    if done.empty:
        return None
    groups = run_groups(done)
    mixed_conventions = _mixed(done, "bpd convention")
    curves: dict[str, list[np.ndarray]] = {}
    of_group: dict[str, str] = {}  # curve label → its group
    used = []
    with tempfile.TemporaryDirectory() as tmp:
        for (_, r), group in zip(done.iterrows(), groups):
            try:
                path = client.download_artifacts(r.run_id, "per_t_bound.json", tmp)
            except Exception:  # noqa: BLE001 - a run without the artifact (an estimate-only final evaluation)
                continue
            logged = json.loads(Path(path).read_text())
            if "L_t_bits_per_dim" not in logged:  # a continuous-time model's curve (its integrand over t) of a run
                continue  # logged before those had a file of their own: not DDPM's L_t over steps
            values = np.asarray(logged["L_t_bits_per_dim"], dtype=float)
            label = group + (f" · {r['bpd convention']}" if mixed_conventions else "")
            curves.setdefault(label, []).append(values)
            of_group[label] = group
            used.append(r)
    if not curves:
        return None
    colors = _colors(done, groups)
    means, line_colors = {}, {}
    for label in sorted(curves, key=lambda label: (list(colors).index(of_group[label]), label)):  # the table's order
        cs = curves[label]
        length = min(len(c) for c in cs)
        means[f"{label} (n={len(cs)})"] = torch.tensor(np.mean([c[:length] for c in cs], axis=0))
        line_colors[f"{label} (n={len(cs)})"] = colors[of_group[label]]
    used = pd.DataFrame(used)
    caption = ("Per-timestep terms L_t of the final bound (per_t_bound.json, logged by an exact final evaluation), "
               "bits/dim, mean over each group's finished runs (n in the legend): "
               + _counted((_method(m) for m in used.get("bpd_method", pd.Series([""] * len(used)))),
                          "method not recorded") + "; "
               + _counted(_convention(r) for _, r in used.iterrows()) + "; schedule "
               + _counted(used["schedule"]) + ".")
    return per_t_figure(means, "mean over runs", line_colors), caption


# ---------------------------------------------------------------------------------------------- bpd against FID
FID_REFERENCES = {  # metric: (label, colour, line style) of the FID reference points bench.metrics.fid logs
    "fid_ref_test": ("test split vs train", "tab:green", ":"),
    "fid_ref_noise": ("Gaussian noise vs train", "tab:red", "--"),
}
FID_REFERENCE_COUNTS = {"fid_ref_test": "fid_ref_test_samples", "fid_ref_noise": "fid_samples"}  # their n (tags)


def _fid_reference_lines(ax, done: pd.DataFrame) -> list[float]:
    """Horizontal lines at the runs' FID reference points, one per distinct (dataset, value); their values."""
    drawn = []
    several = done.dataset.nunique() > 1
    for key, (text, color, style) in FID_REFERENCES.items():
        if key not in done:
            continue
        rows = done[done[key].notna()]
        for (dataset, value), g in rows.groupby([rows.dataset, rows[key].round(6)], sort=True):
            counts = sorted({str(c) for c in g.get(FID_REFERENCE_COUNTS[key], []) if str(c)})
            label = (f"{dataset}: " if several else "") + text + (f" (n={', '.join(counts)})" if counts else "")
            ax.axhline(value, color=color, ls=style, lw=1, label=label)
            drawn.append(float(value))
    return drawn


def fid_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs a bits/dim-against-FID picture shows: finished, with both numbers, their FID from one feature
    extractor (the one most of them used): FIDs of different extractors are not comparable, so never share an axis."""
    done = df[(df.status == "FINISHED") & df.bpd.notna() & df.fid.notna()]
    return done[done.fid_extractor == _main_extractor(done)] if "fid_extractor" in done else done


def _main_extractor(done: pd.DataFrame) -> str:
    counts = done["fid_extractor"].value_counts()
    return min(counts.index, key=lambda e: (-counts[e], e)) if len(counts) else ""


def bpd_vs_fid(df: pd.DataFrame, pareto: list[tuple[float, float]] | None = None):
    """Each finished run's final bits/dim against its FID, coloured by group, with a study's Pareto front if given
    and the runs' FID reference points (test split vs train, Gaussian noise vs train) as horizontal lines."""
    done = fid_runs(df)
    if done.empty:
        return None
    fig, ax = _axes()
    groups = run_groups(done)
    colors = _colors(done, groups)
    for group in colors:
        g = done[groups.to_numpy() == group]
        ax.scatter(g.bpd, g.fid, color=colors[group], label=group, s=25)
    if pareto:
        pts = sorted(pareto)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1, marker="x", label="study Pareto front")
    values = [*done.fid, *_fid_reference_lines(ax, done)]
    if min(values) > 0 and max(values) / min(values) > 30:  # the noise line would squash the runs together
        ax.set_yscale("log")
    ax.set_xlabel("bits/dim (final bound, test split; lower is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("Likelihood against sample quality", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, *ax.get_legend_handles_labels())
    pyplot().close(fig)
    return fig


def bpd_vs_fid_caption(df: pd.DataFrame, pareto: list[tuple[float, float]] | None = None) -> str:
    """What the bits/dim-against-FID picture shows: how each axis was measured, from the runs drawn."""
    import pandas as pd  # heavy: only reports need it

    done = fid_runs(df)

    def tag(name: str, missing: str, fmt=str) -> str:
        return _counted((fmt(v) if v else "" for v in done.get(name, pd.Series([""] * len(done)))), missing)

    caption = (f"Final bits/dim (metric bpd: {tag('bpd_method', 'method not recorded', _method)}; "
               f"{_counted(_convention(r) for _, r in done.iterrows())}) against FID (metric fid: "
               f"{tag('fid_samples', 'sample count not recorded', lambda n: f'{n} samples')} drawn by "
               f"{tag('fid_sampler', 'a sampler not recorded')}, features {tag('fid_extractor', 'not recorded')}, "
               f"reference {tag('fid_reference', 'not recorded')}) of each of the {len(done)} finished runs with "
               "both; colour: variant · training budget.")
    scored = df[(df.status == "FINISHED") & df.bpd.notna() & df.fid.notna()]
    if len(scored) > len(done):
        caption += (f" Left out: {len(scored) - len(done)} run(s) whose FID another feature extractor computed "
                    f"({'; '.join(sorted(set(scored.fid_extractor) - {_main_extractor(scored)}))}); FIDs of "
                    "different extractors are not comparable.")
    if done.get("fid_ref_test", pd.Series(dtype=float)).notna().any():
        caption += " Dotted: the FID of test-split images against the train split (the floor a perfect model reaches)."
    if done.get("fid_ref_noise", pd.Series(dtype=float)).notna().any():
        caption += " Dashed: the FID of Gaussian noise (a model that learned nothing)."
    if pareto:
        caption += " Black dashed with crosses: the Pareto front of a study's trials (study_best.json)."
    return caption


# ------------------------------------------------------------------------------------------------ sample grids
def _latest_samples(client, run_id: str, tmp: str):
    """(step, image) of the run's last logged sample grid, or None."""
    try:
        files = [f.path for f in client.list_artifacts(run_id, "images")]
    except Exception:  # noqa: BLE001 - a run without sample images: no figure
        return None
    pngs = [p for p in files if p.endswith(".png") and Path(p).name.startswith("samples+step+")]
    if not pngs:
        return None
    best = max(pngs, key=lambda p: int(Path(p).name.split("+")[2]))
    return int(Path(best).name.split("+")[2]), pyplot().imread(client.download_artifacts(run_id, best, tmp))


def _sampler(r) -> str:
    """The ancestral sampler a run's grids were drawn with: its `fid_sampler` tag (the final grid and FID come
    from the same samples), else from its params (as bench.diffusion.sample.describe_sampler, which also knows that a
    learned per-step Σ is sampled with all T steps whatever was asked)."""
    tagged = r.get("fid_sampler")
    if isinstance(tagged, str) and tagged:
        return tagged
    try:
        T, steps = int(r["T"]), int(r["sampler steps"] or 0)
    except (KeyError, ValueError):
        return "sampler not recorded"
    n = steps or T
    return f"ancestral, {n} of {T} steps" + (" (strided)" if n != T else "")


def sample_grids(client, df: pd.DataFrame) -> tuple[object, str] | None:
    """The last sample grid of one finished run (the lowest seed) per group, side by side, labelled above
    each image in wrapped lines the layout makes room for; with its caption."""
    import pandas as pd  # heavy: only reports need it
    plt = pyplot()

    done = df[df.status == "FINISHED"]
    done = done.assign(_group=run_groups(done), _seed=pd.to_numeric(done.seed, errors="coerce")).sort_values("_seed")
    order = list(_colors(done, done["_group"]))  # the table's order
    picks = done.groupby("_group", sort=True).head(1)
    picks = picks.iloc[sorted(range(len(picks)), key=lambda i: order.index(picks["_group"].iloc[i]))]
    shown = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, r in picks.iterrows():
            got = _latest_samples(client, r.run_id, tmp)
            if got is not None:
                shown.append((r, *got))
    if not shown:
        return None
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    labels = ["\n".join(textwrap.fill(part, 34) for part in r["_group"].split(" · ")) + f"\nstep {step}, seed {r.seed}"
              for r, step, _ in shown]
    title_lines = max(label.count("\n") + 1 for label in labels)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, (3.0 + 0.17 * title_lines) * rows + 0.4),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, label, (_, _, img) in zip(axes.flat, labels, shown):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label, fontsize=8, pad=4)
    fig.suptitle("Samples (EMA weights, last logged grid)", fontsize=10)
    plt.close(fig)
    chosen = pd.DataFrame([r for r, _, _ in shown])
    caption = (f"The last logged sample grid (EMA weights) of one finished run per variant · training budget, the "
               f"lowest seed ({len(shown)} grids); sampler {_counted(_sampler(r) for _, r in chosen.iterrows())}.")
    return fig, caption
