"""The report's pictures, each drawn from what the runs logged in MLflow."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.plots import per_t_figure, plt


def _colors(variants) -> dict:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(sorted(variants))}


def metric_history(client, df: pd.DataFrame, key: str, ylabel: str, title: str, log_y: bool = False,
                   err_key: str | None = None):
    """One line per run of metric ``key`` against step, coloured by variant; None when nothing was logged.
    ``err_key``: a metric holding each point's standard error, drawn as a ±2σ band."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colors, seen, drew = _colors(df.variant.unique()), set(), False
    for _, r in df.iterrows():
        hist = sorted(client.get_metric_history(r.run_id, key), key=lambda m: m.step)
        if not hist:
            continue
        label = None if r.variant in seen else r.variant
        seen.add(r.variant)
        ax.plot([m.step for m in hist], [m.value for m in hist], color=colors[r.variant], alpha=0.8, lw=1, label=label,
                marker="o" if len(hist) < 4 else None, ms=3)
        if err_key:
            err = {m.step: m.value for m in client.get_metric_history(r.run_id, err_key)}
            pts = [(m.step, m.value, err[m.step]) for m in hist if m.step in err]
            if pts:
                steps, values, errs = (np.array(c) for c in zip(*pts))
                ax.fill_between(steps, values - 2 * errs, values + 2 * errs, color=colors[r.variant], alpha=0.15, lw=0)
        drew = True
    if not drew:
        plt.close(fig)
        return None
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def per_t_curves(client, df: pd.DataFrame):
    """The per-timestep terms L_t of each variant (mean over its finished runs), overlaid."""
    curves: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _, r in df[df.status == "FINISHED"].iterrows():
            try:
                path = client.download_artifacts(r.run_id, "per_t_bound.json", tmp)
            except Exception:  # a run without the artifact (an estimate-only final evaluation)
                continue
            values = np.asarray(json.loads(Path(path).read_text())["L_t_bits_per_dim"], dtype=float)
            curves.setdefault(f"{r.variant} · {r.schedule}", []).append(values)
    if not curves:
        return None
    means = {}
    for label, cs in curves.items():
        length = min(len(c) for c in cs)
        means[f"{label} (n={len(cs)})"] = torch.tensor(np.mean([c[:length] for c in cs], axis=0))
    return per_t_figure(means, "mean over runs")


FID_REFERENCES = {  # metric: (label, colour, line style) of the FID reference points bench.fid logs
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


def bpd_vs_fid(df: pd.DataFrame, pareto: list[tuple[float, float]] | None = None):
    """Each finished run's final bits/dim against its FID, with a study's Pareto front if given and the
    runs' FID reference points (test split vs train, Gaussian noise vs train) as horizontal lines."""
    done = df[(df.status == "FINISHED") & df.bpd.notna() & df.fid.notna()]
    if done.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = _colors(done.variant.unique())
    for v, g in done.groupby("variant"):
        ax.scatter(g.bpd, g.fid, color=colors[v], label=v, s=25)
    if pareto:
        pts = sorted(pareto)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1, marker="x", label="study Pareto front")
    values = [*done.fid, *_fid_reference_lines(ax, done)]
    if min(values) > 0 and max(values) / min(values) > 30:  # the noise line would squash the runs together
        ax.set_yscale("log")
    ax.set_xlabel("bits/dim (test split, lower is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("Likelihood against sample quality", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _latest_samples(client, run_id: str, tmp: str):
    try:
        files = [f.path for f in client.list_artifacts(run_id, "images")]
    except Exception:
        return None
    pngs = [p for p in files if p.endswith(".png") and Path(p).name.startswith("samples+step+")]
    if not pngs:
        return None
    best = max(pngs, key=lambda p: int(Path(p).name.split("+")[2]))
    return plt.imread(client.download_artifacts(run_id, best, tmp))


def sample_grids(client, df: pd.DataFrame):
    """The last sample grid of one finished run per (variant, schedule), side by side."""
    done = df[df.status == "FINISHED"].sort_values("seed")
    picks = done.groupby(["variant", "schedule"], sort=True).head(1)
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, r in picks.iterrows():
            img = _latest_samples(client, r.run_id, tmp)
            if img is not None:
                images.append((f"{r.variant}\n{r.schedule}", img))
    if not images:
        return None
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, img) in zip(axes.flat, images):
        ax.imshow(img)
        ax.set_title(label, fontsize=8)
    fig.suptitle("Samples (EMA weights, last logged grid)", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig
