"""``bench export``: a trained checkpoint in the field's format (a diffusers ``DDPMPipeline`` folder)."""

from __future__ import annotations

import click

from bench.published.diffusers_format import write_diffusers

FORMATS = {"diffusers": write_diffusers}  # --format → the writer: (checkpoint, folder) → what it wrote


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(FORMATS)),
              help="diffusers: a DDPMPipeline folder (UNet2DModel + DDPMScheduler) that "
                   "DDPMPipeline.from_pretrained(DIR) loads.")
def export_cmd(checkpoint, out, fmt) -> None:
    """Write CHECKPOINT's EMA network and its diffusion as a new folder DIR in another format. Only ε-prediction
    models of fixed variance can be written; DIR must not exist or be empty (nothing is overwritten)."""
    done = FORMATS[fmt](checkpoint, out)
    schedule = "by name" if done.named_schedule else "as trained_betas (the project's float64 betas)"
    click.echo(f"wrote {done.folder}: the EMA weights of {checkpoint} (step {done.step}) as a diffusers DDPMPipeline "
               f"(variance_type {done.variance_type}, the β schedule {schedule}, x̂_0 clipped as bench samples)")
    for name in done.files:
        click.echo(f"  {done.folder / name}")
    click.echo("load it with: from diffusers import DDPMPipeline; "
               f"pipe = DDPMPipeline.from_pretrained({str(done.folder)!r}); all T steps "
               "(pipe(num_inference_steps=T)) are the project's ancestral sampler")
