"""The sampler budget: the fewest UNet evaluations per stage that reach the 1000-step DDPM reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdm.cascade import DEMO_CASCADE, Cascade
from cdm.experiments.common import (
    GUIDANCE_PER_CLASS,
    POINTS,
    SEED_STRIDE,
    SEEDS,
    Judges,
    sample,
    score_real,
    score_samples,
    spread,
    stored,
    template,
)
from cdm.images import centre_crop
from cdm.measure.heldout import real_images
from cdm.measure.plots import figure, save_figure
from cdm.models import with_scheduler

SAMPLERS = {
    "DDPMScheduler": "DDPM",
    "DDIMScheduler": "DDIM",
    "DPMSolverMultistepScheduler": "DPM-Solver++",
    "UniPCMultistepScheduler": "UniPC",
}


BUDGET_STEPS = (5, 10, 25, 50, 100)


REFERENCE_STEPS = 1000  # DDPM, the sampler the models were trained for


BUDGET_REAL = 5  # real test digits per SR stage, cropped to BUDGET_CROP (fully convolutional stages)


BUDGET_CROP = {256: 128, 1024: 256}


def budget_grid() -> list[tuple[str, int]]:
    """Every (sampler, steps) point, cheapest first; the 1000-step reference last."""
    return [(name, steps) for steps in BUDGET_STEPS for name in SAMPLERS] + [
        ("DDPMScheduler", REFERENCE_STEPS)
    ]


def budget_order(num_stages: int) -> list[tuple[str, int, int]]:
    """(sampler, steps, stage index), cheap points first: every SR stage's points, steps rising, then
    the base stage's. A base point (50 guided samples) costs about ten SR points (5 crops), and its
    1000-step reference more than everything else together, so the SR curves are whole first."""
    jobs = [(name, steps, k) for name, steps in budget_grid() for k in range(num_stages)]
    return sorted(jobs, key=lambda job: (job[2] == 0, job[1]))


def run_sampler(judges: Judges, stored_only: bool = False) -> dict:
    """The base stage by KID of its samples; each SR stage by PSNR and SSIM on real low-res crops.
    `stored_only` measures nothing: the report then covers the stages whose points are all stored."""
    cascade = Cascade.from_pretrained(DEMO_CASCADE)
    ids = [c for c in range(cascade.num_classes) for _ in range(GUIDANCE_PER_CLASS)]
    crops = {}
    for stage in cascade.stages[1:]:
        size = stage.pipe.unet.config.sample_size
        real = real_images(judges.data, "test", size, BUDGET_REAL)[0]
        crops[stage.name] = [
            centre_crop(x, BUDGET_CROP[size], stage.pipe.scale_factor) for x in real.split(1)
        ]
        stage.pipe.set_progress_bar_config(disable=True)
    base, points = cascade[:1], {}
    for name, steps, k in budget_order(len(cascade.stages)):
        stage = cascade.stages[k]
        for seed in SEEDS:
            path = POINTS / "sampler" / f"{stage.name}-{SAMPLERS[name]}-{steps}-seed{seed}.json"
            if stored_only and not path.is_file():
                continue
            if k == 0:
                settings = base.with_overrides(scheduler=[name], steps=[steps])
                measure = lambda: score_samples(sample(base, ids, seed, settings)[0], ids, judges)  # noqa: E731
            else:
                pipe = with_scheduler(stage.pipe, name, steps)

                def measure():
                    return score_real(pipe, crops[stage.name], steps, seed * SEED_STRIDE)

            points[(stage.name, name, steps, seed)] = stored(path, measure)
    floor = stored(POINTS / "guidance" / "floor.json", lambda: judges.floor(64, len(ids)))
    return {
        "points": points,
        "floor": floor,
        "samples": len(ids),
        "stages": cascade.names,
        "guidance": cascade.settings[0].guidance_scale,
        "real": BUDGET_REAL,
    }


def budget_value(point: dict, stage_index: int) -> dict:
    """A point's scores, whatever the stage: KID for the base stage, the model's PSNR and SSIM for SR."""
    return point if stage_index == 0 else point["model"]


def complete_stages(result: dict, reference: bool = True) -> list[tuple[int, str]]:
    """(index, name) of the stages whose every point is stored, or with `reference=False` every point
    but the 1000-step reference: the stages whose curves a report can show."""
    return [
        (k, stage)
        for k, stage in enumerate(result["stages"])
        if all(
            (stage, name, steps, seed) in result["points"]
            for name, steps in budget_grid()
            for seed in SEEDS
            if reference or steps != REFERENCE_STEPS
        )
    ]


def budget_stats(result: dict) -> dict:
    """(stage, sampler, steps) -> {metric: (mean, half range)} over the seeds, for every point stored
    for both seeds of a stage whose curves are complete."""
    out = {}
    for k, stage in complete_stages(result, reference=False):
        for name, steps in budget_grid():
            if any((stage, name, steps, seed) not in result["points"] for seed in SEEDS):
                continue
            values = [budget_value(result["points"][(stage, name, steps, seed)], k) for seed in SEEDS]
            out[(stage, name, steps)] = {
                m: spread(values, m) for m in ("kid", "psnr", "ssim") if m in values[0]
            }
    return out


def evaluations(stage_index: int, steps: int, guidance: float) -> int:
    """UNet evaluations per sample: classifier-free guidance runs the UNet twice per step."""
    return steps * (2 if stage_index == 0 and guidance > 1 else 1)


def spent(stage_index: int, steps: int, guidance: float) -> str:
    """UNet evaluations, with the steps beside them where guidance makes the two differ."""
    n = evaluations(stage_index, steps, guidance)
    return str(n) if n == steps else f"{n} ({steps} steps)"


def reaches_reference(stats: dict, stage: str, stage_index: int, name: str, steps: int) -> bool:
    """Within the 1000-step quality: KID within the larger seed spread, or PSNR within 0.3 dB."""
    ref = stats[(stage, "DDPMScheduler", REFERENCE_STEPS)]
    here = stats[(stage, name, steps)]
    if stage_index == 0:
        return here["kid"][0] - ref["kid"][0] <= max(here["kid"][1], ref["kid"][1])
    return here["psnr"][0] >= ref["psnr"][0] - 0.3


def report_sampler(result: dict) -> list[str]:
    stats, w = budget_stats(result), result["guidance"]
    lines = [
        "## Sampler budget",
        "",
        *template(
            "sampler",
            budget=", ".join(map(str, BUDGET_STEPS)),
            reference=REFERENCE_STEPS,
            guidance=w,
            samples=result["samples"],
            floor=result["floor"]["kid"],
            real=result["real"],
            crops=" and ".join(f"{c} px at {r} px" for r, c in BUDGET_CROP.items()),
            seeds=list(SEEDS),
        ),
        "",
    ]
    for k, stage in complete_stages(result, reference=False):
        metric, fmt = ("kid", ".4f") if k == 0 else ("psnr", ".2f")
        lines += [
            f"{stage} ({'KID' if k == 0 else 'PSNR, dB'}):",
            "",
            "| sampler | " + " | ".join(f"{n} steps" for n in BUDGET_STEPS) + " |",
            "|---|" + "---|" * len(BUDGET_STEPS),
        ]
        for name, label in SAMPLERS.items():
            row = [stats[(stage, name, n)][metric] for n in BUDGET_STEPS]
            lines.append(f"| {label} | " + " | ".join(f"{m:{fmt}} ± {h:{fmt}}" for m, h in row) + " |")
        ref = stats.get((stage, "DDPMScheduler", REFERENCE_STEPS))
        cell = f"{ref[metric][0]:{fmt}} ± {ref[metric][1]:{fmt}}" if ref else "not measured yet"
        lines += [f"| DDPM, {REFERENCE_STEPS} steps | {cell} |" + " |" * (len(BUDGET_STEPS) - 1), ""]
    return lines + pending_stages(result) + sampler_findings(result, stats)


def pending_stages(result: dict) -> list[str]:
    """A line for each stage whose points are not all stored yet."""
    done = {stage for _, stage in complete_stages(result)}
    curves = {stage for _, stage in complete_stages(result, reference=False)}
    total = len(budget_grid()) * len(SEEDS)
    lines = [
        f"- {stage}: {sum(key[0] == stage for key in result['points'])} of {total} points stored; "
        + (
            f"its DDPM {REFERENCE_STEPS}-step reference, and the evaluations that reach it, follow"
            if stage in curves
            else "its table follows"
        )
        + " when the rest are measured."
        for stage in result["stages"]
        if stage not in done
    ]
    return ["Not finished yet:", "", *lines, ""] if lines else []


def sampler_findings(result: dict, stats: dict) -> list[str]:
    """For each stage and sampler, the fewest UNet evaluations that reach the 1000-step quality."""
    out = []
    for k, stage in complete_stages(result):
        parts = []
        for name, label in SAMPLERS.items():
            enough = [n for n in BUDGET_STEPS if reaches_reference(stats, stage, k, name, n)]
            parts.append(
                f"{label} {spent(k, enough[0], result['guidance'])}"
                if enough
                else f"{label} not within {BUDGET_STEPS[-1]} steps"
            )
        ref = evaluations(k, REFERENCE_STEPS, result["guidance"])
        rule = "KID within the seed spread" if k == 0 else "PSNR within 0.3 dB"
        out.append(
            f"- {stage}: UNet evaluations to reach the {ref}-evaluation quality ({rule}): "
            + ", ".join(parts)
            + "."
        )
    return [
        "What it takes to match DDPM at 1000 steps:",
        "",
        *out,
        "",
        "The photo stage's curve (DDIM and DPM-Solver++ from 1 to 50 steps against DDPM at 1000) is in "
        "[photo_sr.md](photo_sr.md).",
    ]


def plot_sampler(result: dict, path: Path) -> None:
    stats, w, stages = budget_stats(result), result["guidance"], complete_stages(result, reference=False)
    fig, axes = figure(1, len(stages), figsize=(4 * len(stages), 3.3))
    for ax, (k, stage) in zip(np.atleast_1d(axes), stages):
        metric = "kid" if k == 0 else "psnr"
        for name, label in SAMPLERS.items():
            pairs = [stats[(stage, name, n)][metric] for n in BUDGET_STEPS]
            ax.errorbar(
                [evaluations(k, n, w) for n in BUDGET_STEPS],
                [m for m, _ in pairs],
                yerr=[h for _, h in pairs],
                marker="o",
                capsize=3,
                label=label,
            )
        if (stage, "DDPMScheduler", REFERENCE_STEPS) in stats:
            ax.axhline(
                stats[(stage, "DDPMScheduler", REFERENCE_STEPS)][metric][0],
                color="grey",
                linestyle="--",
                label=f"DDPM {REFERENCE_STEPS}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("UNet evaluations per sample")
        ax.set_ylabel("KID" if k == 0 else "PSNR (dB)")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    save_figure(fig, path)
