"""``bench eval FILE --from FORMAT``: a published model measured by the project's ruler and recorded as a run.

The file is read into the project's network (:data:`FORMATS`), its diffusion becomes a RunConfig (the variant it
was trained as, its T and schedule), and the evaluation is the one a trained run's checkpoint gets
(:func:`bench.training.evaluation.run_evaluation`): the exact bound or its estimate under both x̂0 conventions,
nll_ode, samples and FID. It is logged as a new MLflow run tagged ``imported`` with its source format, the
file's SHA-256, the flags it was built from and whether its weights are an EMA, so ``bench report`` shows it as a
reference row beside trained ones. Files the papers' authors released are recognised (:data:`KNOWN`): their flags
need not be given, and the paper's value is printed and tagged beside the measured one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.published.common import Converted
from bench.published.diffusers_format import WEIGHTS, read_diffusers
from bench.published.improved_diffusion import read_improved_diffusion
from bench.published.pytorch_diffusion import read_pytorch_diffusion
from bench.runtime import dist as dist_mod
from bench.runtime.files import file_digest
from bench.tracking import liveness, provenance
from bench.tracking import store as tracking
from bench.tracking.logger import RunLogger
from bench.training.config import IMPORTED, flatten, make_config
from bench.training.evaluation import HEADLINE, CheckpointEval
from bench.training.state import setup

FORMATS = {"improved-diffusion": read_improved_diffusion, "pytorch-diffusion": read_pytorch_diffusion,
           "diffusers": read_diffusers}
EXPERIMENT = "published"  # where imported models are recorded unless --experiment says otherwise
EMA_WORDS = ("yes", "no", "unknown")


@dataclass(frozen=True)
class Published:
    """A file its authors released: where, what it is, and what their paper reports for it."""

    file: str  # its name as published
    source_format: str
    published_as: str  # a short name for tables
    url: str
    flags: str  # what it was trained with, in the format's own flags
    ema: str  # yes, no or unknown
    md5: str = ""  # a checksum its publisher gives, where one does
    sha256: tuple[str, ...] = ()  # the weights file's SHA-256 as its host lists it (every published version)
    paper_bpd: str = ""  # the paper's test-set bits/dim, as printed there
    paper_fid: str = ""
    paper: str = ""  # where the paper values are from

    def paper_values(self) -> str:
        values = [f"bpd {self.paper_bpd}" if self.paper_bpd else "", f"FID {self.paper_fid}" if self.paper_fid else ""]
        return ", ".join(v for v in values if v) + (f" ({self.paper})" if self.paper else "")


IDDPM_CIFAR10 = ("--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                 "--diffusion_steps 4000 --noise_schedule cosine")
PORT_URL = "https://heibox.uni-heidelberg.de/f/"
KNOWN: tuple[Published, ...] = (
    Published("cifar10_uncond_50M_500K.pt", "improved-diffusion", "iDDPM L_hybrid CIFAR-10",
              "https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt",
              IDDPM_CIFAR10, "unknown"),
    Published("cifar10_uncond_vlb_50M_500K.pt", "improved-diffusion", "iDDPM L_vlb CIFAR-10",
              "https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_vlb_50M_500K.pt",
              IDDPM_CIFAR10 + " --use_kl True", "unknown", paper_bpd="2.94",
              paper="Nichol & Dhariwal 2021, CIFAR-10 test NLL of the L_vlb model"),
    Published("ema_diffusion_cifar10_model/model-790000.ckpt", "pytorch-diffusion", "DDPM CIFAR-10 (EMA)",
              PORT_URL + "2e4f01e2d9ee49bab1d5/?dl=1", "", "yes", md5="1fa350b952534ae442b1d5235cce5cd3",
              paper_bpd="≤ 3.75", paper_fid="3.17",
              paper="Ho et al. 2020, Table 1: test NLL bound; FID on 50k samples against the train split"),
    Published("diffusion_cifar10_model/model-790000.ckpt", "pytorch-diffusion", "DDPM CIFAR-10 (raw)",
              PORT_URL + "869980b53bf5416c8a28/?dl=1", "", "no", md5="82ed3067fd1002f5cf4c339fb80c4669"),
    # Hugging Face lists the SHA-256 of each file: the safetensors weights, and the .bin of its "convert weights"
    # commit (the paper's FID is the EMA model's; these are not EMA weights)
    Published("google/ddpm-cifar10-32", "diffusers", "DDPM CIFAR-10 (google/ddpm-cifar10-32, raw)",
              "https://huggingface.co/google/ddpm-cifar10-32", "", "no",
              sha256=("1558dbe3fb093b0857d473e376b711eeda1b186c557be5e85b3a56300cd49f0f",
                      "ac3416a548879738893e935b42cab9119f51745b62bec4b6d8375e4d86e98ea4")),
)


def weights_file(path: Path) -> Path | None:
    """The weights a model folder holds (a diffusers pipeline's unet/ or a UNet folder's), None if none; a file is
    its own."""
    if path.is_file():
        return path
    unet = path / "unet" if (path / "unet").is_dir() else path
    return next((unet / w for w in WEIGHTS if (unet / w).is_file()), None)


def recognise(path: Path, source_format: str, sha256: str) -> Published | None:
    """The released file this is (``sha256``: its weights file's): by the checksum its publisher gives where there
    is one (the SHA-256 Hugging Face lists for a diffusers folder's weights, the PyTorch port's MD5), else by its
    name and format (improved-diffusion publishes no checksum; the SHA-256 is recorded, not checked)."""
    candidates = [k for k in KNOWN if k.source_format == source_format]
    found = next((k for k in candidates if sha256 in k.sha256), None)
    if found is None and path.is_file() and any(k.md5 for k in candidates):
        md5 = file_digest(path, "md5")
        found = next((k for k in candidates if k.md5 == md5), None)
    return found or next((k for k in candidates if not (k.md5 or k.sha256) and k.file == path.name), None)


@dataclass
class Imported:
    """What ``bench eval --from`` read: the converted model, the file's identity and what it is known as."""

    converted: Converted
    path: Path
    weights: Path  # the file read (path itself, or the weights file in a model folder)
    sha256: str  # the weights file's
    ema: str
    known: Published | None

    @property
    def name(self) -> str:
        return self.known.published_as if self.known else self.path.name

    def tags(self) -> dict[str, str]:
        k = self.known
        file = self.path.name if self.weights == self.path else str(self.weights.relative_to(self.path.parent))
        return {"imported": "true", "source_format": self.converted.source_format, "source_file": file,
                "source_sha256": self.sha256, "source_flags": json.dumps(self.converted.flags, sort_keys=True),
                "ema": self.ema, "published_as": k.published_as if k else "",
                **({"paper_bpd": k.paper_bpd} if k and k.paper_bpd else {}),
                **({"paper_fid": k.paper_fid} if k and k.paper_fid else {}),
                **({"paper": k.paper, "source_url": k.url} if k else {})}


def read_published(path: str | Path, source_format: str, flags: str | None = None, ema: str | None = None) -> Imported:
    """Read ``path`` in ``source_format`` with ``flags`` (for a recognised released file, its own by default)."""
    if source_format not in FORMATS:
        raise BenchError(f"--from {source_format}: unknown format; choose one of {', '.join(sorted(FORMATS))}")
    path = Path(path)
    if not path.exists():
        raise BenchError(f"{path} does not exist")
    if ema is not None and ema not in EMA_WORDS:
        raise BenchError(f"--ema {ema}: say yes, no or unknown")
    weights = weights_file(path)  # a folder's weights file (its configs are recorded as the flags)
    if weights is None:
        raise BenchError(f"{path} holds no weights file ({' or '.join(WEIGHTS)})")
    digest = file_digest(weights)
    known = recognise(path, source_format, digest)
    converted = FORMATS[source_format](path, flags if flags is not None else (known.flags if known else ""))
    return Imported(converted, path, weights, digest, ema or (known.ema if known else "unknown"), known)


def prepare_import(imported: Imported, overrides: dict | None = None, dataset: str = "cifar10",
                   experiment: str | None = None, device: str = "auto",
                   tracking_uri: str | None = None) -> CheckpointEval:
    """The evaluation of an imported model (see :class:`~bench.training.evaluation.CheckpointEval`), its config the
    dataset's defaults with the model's diffusion and ``overrides`` (the evaluation's options), logged into a new
    run of ``experiment`` (default ``published``) that is open until :func:`finish_import`."""
    c = imported.converted
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = make_config(dataset, **{**values, **c.diffusion, "network": IMPORTED,
                                     "experiment": experiment or EXPERIMENT, "tracking_uri": tracking_uri})
    d, device_name = dist_mod.setup(device)
    dev, train_images, test_images, variant, sched = setup(config, device_name)
    shape = tuple(train_images.shape[1:])
    if shape != (c.in_channels, c.image_size, c.image_size):
        raise BenchError(f"{imported.path.name} takes images {c.in_channels}×{c.image_size}×{c.image_size}; "
                         f"{dataset} has {'×'.join(map(str, shape))}: give the --dataset it was trained on")
    if variant.out_channels(c.in_channels) != c.out_channels:
        raise BenchError(f"{imported.path.name} outputs {c.out_channels} channels; as {variant.label} it would "
                         f"output {variant.out_channels(c.in_channels)}: check --flags (learn_sigma?)")
    model = c.network()
    client, run_id = None, None
    if d.main:
        client = tracking.client(tracking.resolve_tracking_uri(config.tracking_uri))
        run_id = client.create_run(tracking.experiment_id(client, config.experiment),
                                   run_name=f"{imported.name} ({c.source_format})",
                                   tags={**provenance.source_tags(), **imported.tags(), "variant": variant.label,
                                         "dataset": config.dataset, **liveness.owner_tags()}).info.run_id
        log = RunLogger(client, run_id)
        log.params({**flatten(config), **{f"variant.{k}": v for k, v in variant.describe().items()},
                    **{f"network.{k}": v for k, v in asdict(c.unet).items()},
                    **{f"schedule.{k}": v for k, v in sched.spec.items()},
                    "protocol.bpd": "x0-clipped", **provenance.versions()})
    ema = {"yes": "its EMA weights", "no": "its raw (not EMA) weights", "unknown": "its weights (EMA or not: unknown)"}
    source = (f"{imported.name}, {ema[imported.ema]} ({c.source_format} file {imported.path.name}, "
              f"sha256 {imported.sha256[:16]}…, as {variant.label}, T = {sched.T})")
    return CheckpointEval({"run_id": run_id, "step": 0, "ema": None}, config, d, dev, train_images, test_images,
                          variant, sched, client, HEADLINE, "nll_ode" if config.final_eval_ode else None,
                          bool(config.fid_samples), model=model, source=source)


def finish_import(plan: CheckpointEval, ok: bool) -> None:
    """End the import's run: FINISHED when its evaluation completed, else FAILED."""
    if plan.client is not None:
        plan.client.set_terminated(plan.run_id, "FINISHED" if ok else "FAILED")
