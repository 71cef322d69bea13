"""``bench report``: MLflow runs → a comparison table, pictures, report.html (self-contained) and report.md.

The report is written to a temporary folder and moved into place at the end, so a failed report
leaves nothing half-written; when asked (``--log-to-mlflow``) it is then logged to MLflow as the
artifacts of a report run. Without that, a report adds no run to the store.

report.html carries everything it shows: its pictures as data: URIs, its style inline, no script and
no reference to another file. MLflow's artifact viewer loads an HTML artifact from a blob: URL into an
iframe sandboxed to an opaque origin, where a relative ``<img src="x.png">`` or a stylesheet beside
it cannot load; a self-contained page shows the same there as opened from disk. Its background and
text colours are set, so a viewer in a dark theme does not show dark text on its own dark background.

``--out`` may name a new folder, an empty one, or a previous report: a folder holding the marker file
``.elbo-bench-report`` that lists the files the report wrote and nothing else. Anything else is refused
before any work starts, because replacing a folder deletes it and we never delete what we did not write.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import BenchError
from bench.runtime.urls import masked
from bench.tracking import store as tracking
from reports import figures
from reports.reference import INTRO as REFERENCE_INTRO
from reports.reference import KIND, REFERENCE
from reports.tables import (
    MONOTONE,
    ROW,
    comparison_table,
    deduplicate,
    display_table,
    extractor_conflicts,
    load_runs,
    numeric_summary,
    paired_differences,
    row_numbers,
    split_display,
    varying_settings,
)

if TYPE_CHECKING:
    import pandas as pd

REPORT_EXPERIMENT = "elbo-bench-reports"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a report downloads many small files
SOURCE_PACKAGES = ("bench", "variants", "studies", "reports")
MARKER = ".elbo-bench-report"  # JSON: {"tool": "elbo-bench report", "files": [...]}
MARKER_TOOL = "elbo-bench report"


@dataclass
class Report:
    out_dir: Path
    html: Path
    markdown: Path
    run_id: str | None  # the MLflow run holding the report, when it was logged
    table: pd.DataFrame
    runs: int


@dataclass
class Picture:
    title: str  # a few words, the image's alt text
    caption: str  # what was measured, from the runs drawn
    path: Path


def default_out_dir(experiments: list[str] | None) -> Path:
    name = "-".join(experiments) if experiments else "all-experiments"
    return Path.cwd() / f"report-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def check_out_dir(out: str | Path) -> Path:
    """The resolved report folder, or a BenchError before any work if writing there could delete what isn't ours.

    Public so that a command doing long work before its report (``bench grid``) can refuse up front.
    """
    out = Path(out).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    for pkg in SOURCE_PACKAGES:
        if out == repo / pkg or (repo / pkg) in out.parents:
            raise BenchError(f"--out {out} is inside the source package {pkg}/; choose a folder outside it")
    for name, place in (("the working directory", Path.cwd().resolve()), ("BENCH_HOME", tracking.bench_home()),
                        ("the source tree", repo)):
        if out == place or out in place.parents:
            raise BenchError(f"--out {out} is {name} or holds it; choose a new folder for the report")
    _report_files(out)
    return out


def _refuse(out: Path, why: str = "") -> BenchError:
    """The one-line refusal: says what to do, since we will not decide for the user what may be deleted."""
    return BenchError(f"--out {out} exists and is not an elbo-bench report folder{why}; "
                      "choose a new folder or remove it yourself")


def _report_files(out: Path) -> list[str]:
    """The names a replacement may delete: none for a new or empty folder, else what the marker lists.

    Refuses a file, a folder without our marker, and a marked folder holding anything the marker does not list
    or that is not a plain file (a file someone added to an old report is theirs, not ours to delete).
    """
    if not out.exists():
        return []
    if not out.is_dir():
        raise _refuse(out, " (it is not a folder)")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return []
    listed = _marker_files(out)
    if listed is None:
        raise _refuse(out)
    foreign = [name for name in present if name != MARKER
               and (name not in listed or (out / name).is_symlink() or not (out / name).is_file())]
    if foreign:
        more = " …" if len(foreign) > 3 else ""
        raise _refuse(out, f" (it holds {', '.join(foreign[:3])}{more}, which the report did not write)")
    return [name for name in present if name != MARKER]


def _marker_files(folder: Path) -> set[str] | None:
    """The file names our marker in ``folder`` lists, or None when there is no valid marker of ours."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != MARKER_TOOL or not isinstance(marker.get("files"), list):
        return None
    files = marker["files"]
    return {f for f in files if isinstance(f, str) and f not in ("", ".", "..") and "/" not in f}


def _write_marker(folder: Path, meta: dict) -> None:
    """Sign the finished folder as ours, listing every file in it, so a later report may replace exactly those."""
    files = sorted(p.name for p in folder.iterdir())
    (folder / MARKER).write_text(json.dumps({"tool": MARKER_TOOL, "files": files, "generated": meta["generated"],
                                             "experiments": meta["experiments"]}, indent=1))


def _install(staging: Path, out: Path) -> None:
    """Put the finished staging folder at ``out``; a previous report there is set aside, then its listed files deleted.

    The folder is checked again here: a long report (or grid) may have given someone time to put files in it.
    """
    old_files = _report_files(out)
    if not out.exists():
        staging.rename(out)
        return
    aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(aside)
    try:
        staging.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    try:
        for name in [*old_files, MARKER]:
            (aside / name).unlink(missing_ok=True)
        aside.rmdir()
    except OSError:  # something appeared in the old folder meanwhile: leave it rather than delete it
        pass


def _umask() -> int:
    """This process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _study_parents(client, experiment_ids: list[str]) -> list:
    runs = client.search_runs(experiment_ids, filter_string="tags.`optuna.study` != ''", max_results=1000)
    return [r for r in runs if "variant" not in r.data.tags]


def _study_material(client, parents, tmp: Path):
    """(label, png path) pictures of each study, and the Pareto front points (bpd, fid) if any."""
    pictures, pareto = [], []
    for r in parents:
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        for png in ("optimization_history.png", "param_importances.png", "pareto_front.png"):
            if png in names:
                pictures.append((f"study {r.info.run_name}: {png[:-4].replace('_', ' ')}",
                                 Path(client.download_artifacts(r.info.run_id, png, str(tmp)))))
        if "study_best.json" in names:
            best = json.loads(Path(client.download_artifacts(r.info.run_id, "study_best.json", str(tmp))).read_text())
            pareto += [tuple(b["values"]) for b in best.get("best", []) if len(b.get("values", [])) == 2]
    return pictures, pareto


def build_report(experiments: list[str] | None = None, filter_string: str | None = None, out: str | Path | None = None,
                 tracking_uri: str | None = None, log_to_mlflow: bool = False) -> Report:
    """Read the runs, write the report folder, and with ``log_to_mlflow`` log it as a run of experiment
    REPORT_EXPERIMENT; returns where it went (``run_id`` None when not logged)."""
    out_dir = check_out_dir(out if out else default_out_dir(experiments))
    client = tracking.client(tracking_uri)
    df, duplicates = deduplicate(load_runs(client, experiments, filter_string))
    if df.empty:
        raise BenchError("no training runs match (runs are those tagged with a variant, and imported models those "
                         "tagged imported=true); check --experiment and --filter")
    table, pairs = comparison_table(df), paired_differences(df)
    df = df.assign(**{ROW: row_numbers(df)})  # the figures colour and order their groups by the table's rows
    shown, protocol = display_table(table)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: the report is for others to read too
        parents = _study_parents(client, sorted(df.experiment_id.unique()))
        study_pictures, pareto = _study_material(client, parents, Path(tempfile.mkdtemp(dir=staging)))
        pictures = _figures(client, df, staging, pareto)
        for label, src in study_pictures:
            dst = (staging / re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")).with_suffix(".png")
            shutil.copyfile(src, dst)
            pictures.append(Picture(label, f"{label} (Optuna's picture, logged by the study's run).", dst))
        table.to_csv(staging / "table.csv", index=False)
        pairs.to_csv(staging / "paired_differences.csv", index=False)
        df.to_csv(staging / "runs.csv", index=False)
        (staging / "table.json").write_text(json.dumps(numeric_summary(table), indent=1, default=str))
        meta = {"experiments": experiments or ["(all)"], "filter": filter_string or "", "runs": len(df),
                "tracking_uri": masked(client.tracking_uri), "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
                "duplicates": duplicates, "mixed": varying_settings(df), "protocol": protocol,
                "unpaired": extractor_conflicts(df), "extractors": sorted({e for e in df["fid_extractor"] if e}),
                "ode": bool(df["nll_ode"].notna().any()), "weighted": bool((df[MONOTONE] != "").any()),
                "reference": bool((df[KIND] == REFERENCE).any()), "trained": bool((df[KIND] != REFERENCE).any())}
        _write_html(staging / "report.html", meta, shown, pairs, pictures)
        _write_markdown(staging / "report.md", meta, shown, pairs, pictures)
        for d in staging.iterdir():
            if d.is_dir():
                shutil.rmtree(d)  # downloads of ours inside our own staging folder
        _write_marker(staging, meta)
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    run_id = None
    if log_to_mlflow:
        exp = tracking.experiment_id(client, REPORT_EXPERIMENT)
        run_id = client.create_run(exp, run_name=out_dir.name, tags={
            "report.experiments": ",".join(experiments or ["(all)"]), "report.filter": filter_string or ""}).info.run_id
        client.log_artifacts(run_id, str(out_dir))
        client.set_terminated(run_id, "FINISHED")
    return Report(out_dir, out_dir / "report.html", out_dir / "report.md", run_id, table, len(df))


def _figures(client, df: pd.DataFrame, where: Path, pareto: list[tuple[float, float]]) -> list[Picture]:
    """The report's pictures written into ``where``, each with the caption its data gives. Those over training steps
    draw trained runs only (a published model has no training steps here)."""
    own = df[df[KIND] != REFERENCE]
    series = figures.bpd_series(client, own)
    made = [("bits/dim against training step", "bpd_vs_step.png",
             (figures.bpd_history(series), figures.bpd_history_caption(series)) if series else None),
            ("training loss", "loss.png", _with(figures.loss_history(client, own), figures.LOSS_CAPTION)),
            ("per-timestep terms of the bound", "per_t.png", figures.per_t_curves(client, df)),
            ("bits/dim against FID", "bpd_vs_fid.png",
             _with(figures.bpd_vs_fid(df, pareto), figures.bpd_vs_fid_caption(df, pareto))),
            ("samples", "samples.png", figures.sample_grids(client, df))]
    out = []
    for title, name, drawn in made:
        if drawn is None:
            continue
        fig, caption = drawn
        fig.savefig(where / name, dpi=110)
        out.append(Picture(title, caption, where / name))
    return out


def _with(fig, caption: str):
    return None if fig is None else (fig, caption)


def _intro(meta: dict) -> list[str]:
    lines = [
        f"Runs: {meta['runs']} from experiment(s) {', '.join(meta['experiments'])}"
        + (f", filter \"{meta['filter']}\"" if meta["filter"] else "")
        + f"; store {meta['tracking_uri']}; {meta['generated']}.",
        "A row pools only runs that agree on everything that can change a result but the seed: every setting of the "
        "run's config but where it is stored, how it is logged and which device ran it (the precision it implied "
        "counts), the bound's convention, and the FID's feature extractor. Cells: "
        "mean ± std [95% t-interval of the mean] over seeds of FINISHED runs (mean ± std (n) under 3 seeds; "
        "a value every seed gave alike is shown once, '(n=3, identical)'); "
        "★ marks the lowest mean per dataset. bpd is the variational bound on the test split with x̂_0 clipped to "
        "[-1, 1] (DDPM/iDDPM), bpd_unclipped the unclipped bound from the same calls; for a continuous-time variant "
        "(bpd convention continuous-time: vdm…) bpd is its continuous-time bound (L_∞, or L_T for vdm-finite: "
        "bpd/decoder + bpd/prior + bpd/diffusion). Each is an upper bound on −log P of the same 8-bit test images, "
        "so rows of both kinds compare. An estimated bpd shows its Monte Carlo standard error (MC se). Diverged runs "
        "are counted, not averaged.",
    ]
    if meta.get("ode"):
        lines.append("nll_ode is another estimand: the negative log-likelihood under the probability-flow ODE of the "
                     "same network, on the same test images as the bound (dequantised, Hutchinson trace; MC se over "
                     "images, probes and dequantisation; nll_ode_nfe network evaluations per solve). It is an estimate "
                     "of −log p, not a bound; bpd − nll_ode, per run, is how loose the bound is.")
    if meta.get("weighted"):
        lines.append(WEIGHTED_INTRO)
    if meta.get("reference"):
        lines.append(REFERENCE_INTRO)
    if meta["mixed"]:
        lines.append(f"The selection mixes settings ({', '.join(meta['mixed'])}): "
                     "those runs are kept in separate rows, "
                     "labelled by their settings; compare only rows with the same settings.")
    if len(meta.get("extractors", [])) > 1:
        lines.append(f"FIDs come from {len(meta['extractors'])} feature extractors ({', '.join(meta['extractors'])}): "
                     "FIDs of different extractors are not comparable, so their runs are kept in separate rows, "
                     "starred and paired only against FIDs of the same extractor.")
    if meta["duplicates"]:
        lines.append(f"{meta['duplicates']} duplicate run(s) of the same config and seed are left out (the latest "
                     "FINISHED one counts).")
    return lines


WEIGHTED_INTRO = (
    "Rows weighted[w] are the weighted-ELBO family (Kingma & Gao 2023): continuous-time models trained on "
    "L_w = ½ ∫ w(λ) E‖ε − ε̂‖² dλ over λ = log SNR, for the weighting w the label names (with its hyper-parameters "
    "where they are not the defaults; +adaptive: λ drawn by the adaptive noise schedule, the same objective at a "
    "lower variance). Whatever it was trained on, each is measured by the same ruler as the VDM rows: bpd is its "
    "continuous-time bound L_∞ (w ≡ 1), FID scores samples of the same ancestral sampler and nll_ode is the "
    "probability-flow ODE's NLL. monotone: whether w(λ) is non-increasing in λ on the run's own schedule (read from "
    "its config), which makes L_w an ELBO of Gaussian-noise-augmented data: yes or no (?: the weighting could not "
    "be rebuilt here, e.g. a table file this machine cannot read).")
COMMON = "Common settings (the same in every row):"  # then the protocol lines, a list above the comparison
COMMON_TRAINED = "Common settings (the same in every trained row):"  # … where reference rows are shown too


def _common(meta: dict) -> str:
    return COMMON_TRAINED if meta.get("reference") and meta.get("trained") else COMMON


def _pairs_shown(pairs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The paired differences as shown: a dataset, schedule or settings column holding one value in every line is
    said once above the table instead ('dataset: digits')."""
    same = [c for c in ("dataset", "schedule", "settings") if c in pairs and len(pairs) and pairs[c].nunique() == 1]
    return pairs.drop(columns=same), [f"{c}: {pairs[c].iloc[0]}" for c in same if pairs[c].iloc[0]]


PAIRS_CAPTION = ("Each line compares variants A and B on the runs they share: the same dataset, schedule and settings, "
                 "and the same seeds (pairs: how many). mean A−B is the mean of the per-seed differences A − B; std "
                 "is the sample standard deviation of those differences (across seeds, not a standard error); "
                 "ci_low..ci_high is the 95% t-interval of their mean (empty under 2 pairs). bpd and FID are "
                 "lower-is-better, so a negative A − B favours A and a positive one favours B; an interval that "
                 "excludes 0 is a difference these seeds resolve.")
DETAILS_CAPTION = ("The same rows: the bound's terms (bpd/prior, bpd/vb or a continuous-time bound's bpd/diffusion, "
                   "bpd/decoder; bits/dim), the unclipped bound, "
                   "the FID's reference points and the Inception score, the cost (train s, images/s), and how each "
                   "number was obtained (measured: the method tags that differ between rows); "
                   "cells as in the comparison.")


def _write_html(path: Path, meta: dict, table: pd.DataFrame, pairs: pd.DataFrame, pictures) -> None:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><meta name='color-scheme' content='light'>"
             "<title>elbo-bench report</title><style>",
             "html,body{background:#fff;color:#111}"
             "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:4px 6px;text-align:left}th{background:#f2f2f2}"
             "figure{display:inline-block;vertical-align:top;margin:1em;max-width:720px}img{max-width:100%}"
             "figcaption{font-size:13px;line-height:1.4}ul.common{font-size:13px;margin-top:0;columns:3}"
             "</style></head><body>",
             "<h1>elbo-bench comparison</h1>"]
    parts += [f"<p>{html.escape(p)}</p>" for p in _intro(meta)]
    main, details = split_display(table)
    parts.append("<h2>Comparison by variant</h2>")
    if meta["protocol"]:
        parts.append(f"<p>{_common(meta)}</p><ul class='common'>"
                     + "".join(f"<li>{html.escape(p)}</li>" for p in meta["protocol"])
                     + "</ul>")
    parts.append(main.to_html(index=False, escape=True, border=0, table_id="comparison"))
    if not details.empty:
        parts += ["<h2>Details by row</h2>", f"<p>{html.escape(DETAILS_CAPTION)}</p>",
                  details.to_html(index=False, escape=True, border=0, table_id="details")]
    parts.append("<h2>Paired differences (same seeds)</h2>")
    shown_pairs, same = _pairs_shown(pairs)
    parts.append(f"<p>{html.escape(PAIRS_CAPTION)}" + "".join(f" Every line: {html.escape(c)}." for c in same) + "</p>"
                 + shown_pairs.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0, table_id="paired",
                                       na_rep="")
                 if not pairs.empty else "<p>No variants share seeds on the same dataset and schedule.</p>")
    parts += [f"<p>{html.escape(line)}.</p>" for line in meta["unpaired"]]
    parts.append("<h2>Figures</h2>")
    for pic in pictures:  # inlined: the page needs no other file (see the module docstring)
        data = base64.b64encode(pic.path.read_bytes()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(pic.title)}'>"
                     f"<figcaption>{html.escape(pic.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def _write_markdown(path: Path, meta: dict, table: pd.DataFrame, pairs: pd.DataFrame, pictures) -> None:
    """report.md. Markdown renders raw HTML, so every text from the runs and the command line (experiment,
    run and tag values, the filter) goes in with HTML escaped, as in report.html."""
    main, details = split_display(table)
    lines = ["# elbo-bench comparison", "", *map(_md_text, _intro(meta)), "", "## Comparison by variant", "",
             *([_common(meta), "", *(f"- {_md_text(p)}" for p in meta["protocol"]), ""] if meta["protocol"] else []),
             _markdown_table(main), ""]
    if not details.empty:
        lines += ["## Details by row", "", _md_text(DETAILS_CAPTION), "", _markdown_table(details), ""]
    lines += ["## Paired differences (same seeds)", ""]
    if pairs.empty:
        lines.append("No variants share seeds on the same dataset and schedule.")
    else:
        shown_pairs, same = _pairs_shown(pairs)
        lines += [_md_text(PAIRS_CAPTION + "".join(f" Every line: {c}." for c in same)), "",
                  _markdown_table(shown_pairs)]
    lines += [line for u in meta["unpaired"] for line in ("", _md_text(u) + ".")]
    lines += ["", "## Figures", ""]
    for pic in pictures:
        alt = _md_text(pic.title).replace("[", "\\[").replace("]", "\\]")
        lines += [f"![{alt}]({pic.path.name})", "", _md_text(pic.caption), ""]
    path.write_text("\n".join(lines) + "\n")


def _md_text(text: str) -> str:
    """``text`` for report.md: its HTML escaped (``<img onerror=…>`` in a run name shows as text, runs nothing)."""
    return html.escape(text, quote=False)


def _markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        text = ("" if math.isnan(v) else f"{v:.4f}") if isinstance(v, float) else str(v)
        return _md_text(text).replace("|", "\\|").replace("\n", " ")

    rows = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)
