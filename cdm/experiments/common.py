"""What every experiment shares: where points are stored, the judges that score samples, sampling with
per-image seeds, and the seed-spread arithmetic of the reports.

Every point (one setting, one seed) is stored as JSON under docs/experiments/points/<experiment>/ as
soon as it is measured, so an interrupted run starts again at the first missing point, on this
machine or, once the points are committed, on another. Trained ablation stages and generated
samples stay under runs/experiments/. Each point records how long it took; the report gives the
mean over the seeds and, as the spread, half the distance between the seeds' values.
Images are in [0, 1], as the pipelines return them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cdm.cascade import DEMO_CASCADE, Cascade
from cdm.measure.classifier import get_classifier, predict, prepare
from cdm.measure.fid import OfflineInception, feature_distances, inception_features
from cdm.measure.heldout import real_images
from cdm.measure.sr import Degradation, evaluate_sr
from cdm.models import with_scheduler

RUNS = Path("runs/experiments")  # trained ablation stages and their samples


# Every measured point, committed beside the report, so that a re-run on another machine measures only
# what is missing.
POINTS = Path("docs/experiments/points")


DOCS = Path("docs")


SEEDS = (0, 1)


SEED_STRIDE = 100_000  # seed s uses per-image seeds s * SEED_STRIDE + i


REFERENCE_LIMIT = {1024: 200}  # real test digits per reference; all 500 at 1024 px would take 6 GB


# The SR sampler of the ablations (augmentation, truncation, blur): fixed here, not read from the shipped
# cascade, so that a re-run reproduces their stored points whatever the shipped default becomes.
ABLATION_SR = {"scheduler": "DDIMScheduler", "steps": 5}


# sample sizes that several experiments share
AUG_LEVELS = (0, 50, 100, 250)


AUG_PER_CLASS = 5


AUG_REAL_IMAGES = 50


GUIDANCE_PER_CLASS = 5


TEMPLATES = Path(__file__).parent / "templates"  # each report's fixed prose, as markdown data


def template(name: str, **fields) -> list[str]:
    """A report's prose from templates/NAME.md, filled in: its paragraphs (blank-line separated) as
    single lines, the way the report pages hold them."""
    text = (TEMPLATES / f"{name}.md").read_text().format(**fields)
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    lines = []
    for p in paragraphs:
        lines += [p, ""]
    return lines[:-1]


TITLES = {
    "aug": "Conditioning augmentation ablation (64 → 256)",
    "levels": "The augmentation level under the shipped sampler (64 → 256)",
    "levels1024": "The augmentation level under the shipped sampler (256 → 1024)",
    "trunc": "Truncated vs non-truncated augmentation (64 → 256)",
    "blur": "Blur augmentation (256 → 1024)",
    "guidance": "Guidance sweep (base stage)",
    "sampler": "Sampler budget",
}


def ablation_cascade() -> Cascade:
    """The shipped demo cascade with its SR stages set to the ablations' sampler (`ABLATION_SR`)."""
    cascade = Cascade.from_pretrained(DEMO_CASCADE)
    for stage in cascade.stages[1:]:
        stage.sampling = replace(stage.sampling, **ABLATION_SR)
    return cascade


@dataclass
class Judges:
    """What scores samples: Inception features of real test digits per resolution, and the classifier."""

    feature: OfflineInception
    data: object
    refs: dict
    classifier: torch.nn.Module | None = None

    def reference(self, size: int) -> np.ndarray:
        if size not in self.refs:
            real = real_images(self.data, "test", size, REFERENCE_LIMIT.get(size))[0]
            self.refs[size] = inception_features(real, self.feature)
        return self.refs[size]

    def agreement(self, images: torch.Tensor, ids: list[int]) -> float:
        if self.classifier is None:
            self.classifier = get_classifier(self.data, 64)[0]
        return float((predict(self.classifier, prepare(images)) == torch.tensor(ids)).float().mean())

    def floor(self, size: int, count: int) -> dict:
        """What a perfect model would score: `count` real train images against the test reference."""
        real, labels = real_images(self.data, "train", size, count)
        pool = inception_features(real, self.feature)
        return {
            "num_images": len(real),
            **feature_distances(pool, self.reference(size)),
            "diversity": class_diversity(pool, labels.tolist()),
        }


def class_diversity(pool: np.ndarray, ids: list[int]) -> float:
    """Mean pairwise distance of Inception pool features within a class, averaged over the classes."""
    ids = np.asarray(ids)
    values = []
    for c in np.unique(ids):
        x = torch.from_numpy(pool[ids == c]).double()
        if len(x) > 1:
            d = torch.cdist(x, x)
            values.append(float(d.sum() / (len(x) * (len(x) - 1))))
    return float(np.mean(values))


def score_samples(images: torch.Tensor, ids: list[int], judges: Judges) -> dict:
    """FID/KID against the real test digits at the samples' size, class agreement and diversity."""
    pool = inception_features(images, judges.feature)
    return {
        **feature_distances(pool, judges.reference(images.shape[-1])),
        "class_agreement": judges.agreement(images, ids),
        "diversity": class_diversity(pool, ids),
    }


def sample(cascade: Cascade, ids: list[int], seed: int, settings, batch: int = 20) -> list[torch.Tensor]:
    """Every stage's outputs in [0, 1] for these labels, with seeds seed * SEED_STRIDE + i."""
    seeds = [seed * SEED_STRIDE + i for i in range(len(ids))]
    chunks = []
    for lo in range(0, len(ids), batch):
        out = cascade(ids[lo : lo + batch], seeds[lo : lo + batch], settings, progress=False)
        chunks.append([x.float().cpu() for x in out.images])
    return [torch.cat(parts) for parts in zip(*chunks)]


def stored(path: Path, measure) -> dict:
    """The point stored at `path`, or measure it now (timed) and store it."""
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = measure()
    result["seconds"] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(
        f"{path}: " + " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)), flush=True
    )
    return result


def spread(points: list[dict], key: str) -> tuple[float, float]:
    """Mean over the seeds and half the range (the spread reported beside each mean)."""
    values = [p[key] for p in points]
    return float(np.mean(values)), (max(values) - min(values)) / 2


def tied_lowest(stats: dict) -> list:
    """The keys whose mean is within the larger seed spread of the lowest mean: `stats` maps a key to
    `spread`'s (mean, half range). Differences smaller than the seeds' own spread are not findings."""
    low = min(stats, key=lambda k: stats[k][0])
    return [k for k, (mean, half) in stats.items() if mean - stats[low][0] <= max(half, stats[low][1])]


def cell(points: list[dict], key: str, fmt: str) -> str:
    mean, half = spread(points, key)
    return f"{mean:{fmt}} ± {half:{fmt}}"


def score_row(labels: list, points: list[dict], extra: tuple = ()) -> str:
    """One table row of sample scores: the labels, FID, KID, class agreement, any `extra` (key, format)
    cells, and the mean seconds per seed."""
    cells = [cell(points, "fid", ".1f"), cell(points, "kid", ".4f"), cell(points, "class_agreement", ".3f")]
    cells += [cell(points, key, fmt) for key, fmt in extra]
    seconds = f"{np.mean([x['seconds'] for x in points]):.0f}"
    return "| " + " | ".join([*map(str, labels), *cells, seconds]) + " |"


def train_missing(folder: Path, experiment: str | None) -> None:
    """Train a stage with its committed recipe unless its export exists (a stopped run resumes)."""
    if experiment is None or folder.is_dir():
        return
    run = folder.parent
    resume = ["train.resume=latest"] if (run / "checkpoints").is_dir() else []
    cmd = [sys.executable, "-m", "cdm.cli.train", f"experiment={experiment}", *resume]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def stored_samples(path: Path, make) -> tuple[torch.Tensor, dict]:
    """Images made by `make()` and kept at `path` (safetensors), with their timed JSON record."""
    from safetensors.torch import load_file, save_file

    def measure() -> dict:
        images = make()
        save_file({"images": images.contiguous()}, str(path))
        return {"samples": len(images)}

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():  # a record without its images is measured again
        path.with_suffix(".json").unlink(missing_ok=True)
    record = stored(path.with_suffix(".json"), measure)
    return load_file(str(path))["images"], record


def base_samples(
    cascade: Cascade, ids: list[int], seed: int, experiment: str = "aug"
) -> tuple[torch.Tensor, dict]:
    """The base stage's 64 px samples for this seed at its shipped settings, stored once (and timed)."""
    return stored_samples(
        RUNS / experiment / f"base-seed{seed}-unit.safetensors",
        lambda: sample(cascade[:1], ids, seed, cascade.settings[:1])[0],
    )


def sampling_pipe(pipe, s):
    """A pipeline over the stage's modules that samples with the settings `s`, quietly; the stage's own
    pipeline is left as it is."""
    pipe = with_scheduler(pipe, s.scheduler, s.steps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score_real(pipe, real: list[torch.Tensor], steps: int, seed: int = 0, degrade=Degradation()) -> dict:
    """`evaluate_sr` of an SR stage on real images at level 0, DDIM's eta 0 and no autoguidance, as every
    stored point was measured."""
    call = {"num_inference_steps": steps, "noise_level": 0, "eta": 0.0, "autoguidance_scale": 1.0}
    return evaluate_sr(pipe, real, seed, degrade, **call)


def upscale_samples(pipe, low: torch.Tensor, level: int, seed: int, steps: int, batch: int = 10):
    """An SR stage on a batch of 64 px samples with augmentation level `level`, seeds as `sample`."""
    outs = []
    for lo in range(0, len(low), batch):
        x = low[lo : lo + batch]
        gens = [torch.Generator().manual_seed(seed * SEED_STRIDE + i) for i in range(lo, lo + len(x))]
        out = pipe(x, noise_level=level, num_inference_steps=steps, generator=gens, output_type="pt")
        outs.append(out.images.float().cpu())
    return torch.cat(outs)
