"""The augmentation level under the shipped sampler, for each SR stage of the demo cascade."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdm.cascade import DEMO_CASCADE, Cascade
from cdm.experiments.common import (
    ABLATION_SR,
    AUG_LEVELS,
    AUG_PER_CLASS,
    POINTS,
    REFERENCE_LIMIT,
    RUNS,
    SEEDS,
    TITLES,
    Judges,
    sample,
    sampling_pipe,
    score_row,
    score_samples,
    spread,
    stored,
    stored_samples,
    template,
    tied_lowest,
    upscale_samples,
)
from cdm.measure.plots import plot_lines


@dataclass(frozen=True)
class LevelCheck:
    """One SR stage of the shipped cascade at several augmentation levels, under its shipped sampler."""

    stage: int  # index in the cascade
    levels: tuple[int, ...]
    per_class: int  # samples per class and seed
    batch: int  # images per pipeline call
    why: str  # what the check adds to the experiments before it


LEVEL_CHECKS = {
    "levels": LevelCheck(
        1,
        AUG_LEVELS,
        AUG_PER_CLASS,
        10,
        f"The conditioning augmentation ablation above sampled both stages with a fixed sampler "
        f"({ABLATION_SR['scheduler']} at {ABLATION_SR['steps']} steps), not the cascade's own",
    ),
    "levels1024": LevelCheck(
        2,
        (0, 100, 200, 250),
        2,
        2,
        "The blur ablation below sampled the 256 → 1024 stage at one level only, and with a fixed sampler "
        f"({ABLATION_SR['scheduler']} at {ABLATION_SR['steps']} steps)",
    ),
}


def run_levels(judges: Judges, name: str = "levels") -> dict:
    """The shipped stage at every level of the check, sampled as the cascade samples it (cascade.json),
    on the cascade's own lower-resolution samples: is its shipped level the best?"""
    check = LEVEL_CHECKS[name]
    cascade = Cascade.from_pretrained(DEMO_CASCADE)
    s, stage = cascade.settings[check.stage], cascade.stages[check.stage]
    ids = [c for c in range(cascade.num_classes) for _ in range(check.per_class)]
    pipe, points = sampling_pipe(stage.pipe, s), {}
    for seed in SEEDS:
        low, points[("inputs", seed)] = stored_samples(
            RUNS / name / f"inputs-seed{seed}.safetensors",
            lambda: sample(cascade[: check.stage], ids, seed, cascade.settings[: check.stage])[-1],
        )
        for level in check.levels:
            points[(level, seed)] = stored(
                POINTS / name / f"{stage.name}-s{level}-seed{seed}.json",
                lambda: score_samples(
                    upscale_samples(pipe, low, level, seed, s.steps, check.batch), ids, judges
                ),
            )
    size = stage.pipe.unet.config.sample_size
    floor = stored(POINTS / name / "floor.json", lambda: judges.floor(size, len(ids)))
    return {
        "points": points,
        "floor": floor,
        "samples": len(ids),
        "settings": s,
        "stage": stage.name,
        "name": name,
        "size": size,
    }


def report_levels(result: dict) -> list[str]:
    points, floor, s = result["points"], result["floor"], result["settings"]
    check = LEVEL_CHECKS[result["name"]]
    stats = {level: spread([points[(level, seed)] for seed in SEEDS], "kid") for level in check.levels}
    tied = tied_lowest(stats)
    best = min(tied, key=lambda level: spread([points[(level, seed)] for seed in SEEDS], "fid")[0])
    made = np.mean([points[("inputs", seed)]["seconds"] for seed in SEEDS])
    verdict = (
        f"the shipped level, s = {s.noise_level}, is among them"
        if s.noise_level in tied
        else f"the shipped level, s = {s.noise_level}, is not (KID {stats[s.noise_level][0]:.4f})"
    )
    reference = REFERENCE_LIMIT.get(result["size"], "all")
    lines = [
        *template(
            "levels",
            why=check.why,
            stage=result["stage"],
            scheduler=s.scheduler,
            steps=s.steps,
            samples=result["samples"],
            per_class=check.per_class,
            seeds=list(SEEDS),
            made=made,
            reference=reference,
            size=result["size"],
        ),
        "",
        "| s | FID | KID | class agreement | seconds per seed |",
        "|---|---|---|---|---|",
        *(score_row([level], [points[(level, seed)] for seed in SEEDS]) for level in check.levels),
        f"| real train digits (floor) | {floor['fid']:.1f} | {floor['kid']:.4f} | | |",
        "",
        f"Under {s.scheduler} at {s.steps} steps the best level is s = {best} (levels whose KID is within "
        f"the seed spread of the lowest, {', '.join(map(str, tied))}, tie; the tie goes to the lowest FID); "
        f"{verdict}. At s = {check.levels[-1]} the stage scores KID {stats[check.levels[-1]][0]:.4f}.",
    ]
    return [f"## {TITLES[result['name']]}", "", *lines]


def plot_levels(result: dict, path: Path) -> None:
    pts, s, levels = result["points"], result["settings"], LEVEL_CHECKS[result["name"]].levels
    series = {
        f"{result['stage']}, {s.scheduler} {s.steps} steps": [
            spread([pts[(level, seed)] for seed in SEEDS], "kid") for level in levels
        ]
    }
    plot_lines(
        path,
        list(levels),
        series,
        "augmentation level s at sampling",
        f"KID at {result['size']} px",
        result["floor"]["kid"],
    )
