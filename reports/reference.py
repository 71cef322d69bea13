"""A published model imported and evaluated by ``bench eval --from …`` (tag ``imported`` = "true") in a report: a
reference row of its own beside the trained rows, never pooled with them, never in their paired differences and
never starred, labelled with its variant and what it is, with the paper's reported values beside the measured ones.

What it is comes from the run's tags: ``published_as`` (a known published model, e.g. "iDDPM L_hybrid CIFAR-10", or
""), ``source_format`` (improved-diffusion, diffusers, pytorch-diffusion), ``source_file``, ``source_sha256``,
``ema`` (yes, no, unknown) and, where the paper's value is known, ``paper_bpd`` and ``paper_fid`` (text, as the paper
states it, e.g. "≤ 3.75").
"""

from __future__ import annotations

KIND = "kind"  # a row's column: TRAINED or REFERENCE
TRAINED, REFERENCE = "trained", "reference"
SOURCE = "source_sha256"  # part of a row's key: two files (EMA and raw weights) are two rows
PAPER = {"paper_bpd": "paper bpd", "paper_fid": "paper FID"}  # tag → column, shown beside bpd and fid
EMA_WORDS = {"yes": "EMA", "no": "raw weights", "unknown": "EMA unknown"}
INTRO = ("Reference rows (kind: reference) are published models, imported and evaluated here by the same ruler as "
         "the trained rows: the label names the variant they are, the published model (or the imported file), the "
         "format it was read from and whether its weights are the EMA ones. They are never pooled with trained "
         "runs, never paired with them and never starred; the common settings are those of the trained rows, and a "
         "reference row's settings name its evaluation's settings that differ from them (its training settings are "
         "its paper's). paper bpd and paper FID are the values the paper reports for that model, beside the measured "
         "ones.")


def is_reference(tags: dict[str, str]) -> bool:
    """Whether the run is an imported published model (its tag ``imported`` is "true")."""
    return tags.get("imported") == "true"


def label(variant: str, tags: dict[str, str]) -> str:
    """'hybrid · published: iDDPM L_hybrid CIFAR-10 (improved-diffusion, EMA)', or for a file no published model is
    known for, 'hybrid · imported: FILE (improved-diffusion, EMA unknown)'."""
    what = (f"published: {tags['published_as']}" if tags.get("published_as")
            else f"imported: {tags.get('source_file') or 'file not recorded'}")
    how = [tags.get("source_format") or "format not recorded", EMA_WORDS.get(tags.get("ema", ""), "EMA unknown")]
    return f"{variant} · {what} ({', '.join(how)})"


def row_values(variant: str, tags: dict[str, str]) -> dict[str, str]:
    """What a run puts in its report row: its KIND, SOURCE and the paper's values; for an imported run also its
    ``variant`` column, the label (so no trained row of the same variant takes it in)."""
    if not is_reference(tags):
        return {KIND: TRAINED, SOURCE: "", **{column: "" for column in PAPER.values()}}
    return {KIND: REFERENCE, "variant": label(variant, tags), SOURCE: tags.get(SOURCE, ""),
            **{column: tags.get(tag, "") for tag, column in PAPER.items()}}
