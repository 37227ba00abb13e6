"""Blur augmentation (256 -> 1024): the demo recipe with and without CDM's blur of the low-res input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cdm.experiments.common import (
    POINTS,
    REFERENCE_LIMIT,
    RUNS,
    SEEDS,
    Judges,
    ablation_cascade,
    sample,
    sampling_pipe,
    score_real,
    score_row,
    score_samples,
    spread,
    stored,
    stored_samples,
    template,
    tied_lowest,
    train_missing,
    upscale_samples,
)
from cdm.measure.heldout import real_images
from cdm.measure.plots import figure, save_figure
from cdm.measure.sr import Degradation

BLUR_PER_CLASS = 2


BLUR_REAL_IMAGES = 20


BLUR_TEST_SIGMA = 0.5  # a soft handover: the middle of the recipe's blur range [0.4, 0.6], low-res px


BLUR_STAGES = {  # the demo recipe, with and without CDM's blur of the low-res input, same machine and seed
    "blur": (RUNS / "sr256to1024-blur" / "export", "ablate_sr256to1024_blur"),
    "no blur": (RUNS / "sr256to1024-noblur" / "export", "ablate_sr256to1024_noblur"),
}


def run_blur(judges: Judges) -> dict:
    """Both 1024 stages on the shipped cascade's own 256 px outputs (FID/KID, class agreement) and on
    real low-res test digits (PSNR, SSIM, consistency, HF ratio, against bicubic)."""
    from cdm.stage_io import load_stage

    for folder, recipe in BLUR_STAGES.values():
        train_missing(folder, recipe)
    cascade = ablation_cascade()
    s = cascade.settings[2]
    ids = [c for c in range(cascade.num_classes) for _ in range(BLUR_PER_CLASS)]
    points, lows = {}, {}
    for seed in SEEDS:  # what the 1024 stage sees in use: the first two stages' samples
        lows[seed], points[("inputs", seed)] = stored_samples(
            RUNS / "blur" / f"inputs-seed{seed}.safetensors",
            lambda: sample(cascade[:2], ids, seed, cascade.settings[:2])[1],
        )
    real = list(real_images(judges.data, "test", 1024, BLUR_REAL_IMAGES)[0].split(1))
    for name, (folder, _) in BLUR_STAGES.items():
        pipe = sampling_pipe(load_stage(folder), s)
        slug = name.replace(" ", "-")
        for seed in SEEDS:
            points[(name, seed)] = stored(
                POINTS / "blur" / f"{slug}-seed{seed}.json",
                lambda: score_samples(
                    upscale_samples(pipe, lows[seed], s.noise_level, seed, s.steps, 2), ids, judges
                ),
            )
        points[(name, "real")] = stored(
            POINTS / "blur" / f"{slug}-real.json", lambda: score_real(pipe, real, s.steps)
        )
        points[(name, "blurred")] = stored(
            POINTS / "blur" / f"{slug}-real-blurred.json",
            lambda: score_real(pipe, real, s.steps, degrade=Degradation(blur=BLUR_TEST_SIGMA)),
        )
    points["sharpness"] = stored(POINTS / "blur" / "sharpness.json", lambda: handover_sharpness(lows, real))
    floor = stored(POINTS / "blur" / "floor.json", lambda: judges.floor(1024, len(ids)))
    return {"points": points, "floor": floor, "samples": len(ids), "settings": s, "real": len(real)}


def handover_sharpness(lows: dict, real: list[torch.Tensor]) -> dict:
    """How sharp the 1024 stage's inputs are: mean energy above 1/8 cycle per pixel of the cascade's
    256 px samples and of real test digits blurred by BLUR_TEST_SIGMA, each over real digits' at 256 px."""
    from cdm.measure.metrics import high_frequency_energy
    from cdm.train.degradations import downsample, gaussian_blur

    def energy(x: torch.Tensor) -> float:
        return high_frequency_energy(x.float().cpu(), 0.125).mean().item()

    clean = torch.cat([downsample(x, 4).clamp(0, 1) for x in real])
    blurred = gaussian_blur(clean, torch.full((len(clean),), BLUR_TEST_SIGMA))
    return {
        "samples": float(np.mean([energy(lows[seed]) for seed in SEEDS])) / energy(clean),
        "blurred": energy(blurred) / energy(clean),
    }


def report_blur(result: dict) -> list[str]:
    points, floor, s = result["points"], result["floor"], result["settings"]
    inputs = np.mean([points[("inputs", seed)]["seconds"] for seed in SEEDS])
    lines = [
        "## Blur augmentation (256 → 1024)",
        "",
        *template(
            "blur",
            samples=result["samples"],
            per_class=BLUR_PER_CLASS,
            seeds=list(SEEDS),
            inputs=inputs,
            noise_level=s.noise_level,
            scheduler=s.scheduler,
            steps=s.steps,
            reference=REFERENCE_LIMIT.get(1024, "all"),
        ),
        "",
        "| stage | FID | KID | class agreement | seconds per seed |",
        "|---|---|---|---|---|",
    ]
    for name in BLUR_STAGES:
        p = [points[(name, seed)] for seed in SEEDS]
        lines.append(score_row([name], p))
    lines += [
        f"| real train digits (floor) | {floor['fid']:.1f} | {floor['kid']:.4f} | | |",
        "",
        f"`cdm-eval sr` on real low-res inputs ({result['real']} test digits downsampled from 1024 px, s = 0), "
        f"as they are and blurred by σ = {BLUR_TEST_SIGMA} low-res pixels (`cdm-eval sr --blur "
        f"{BLUR_TEST_SIGMA}`: a soft handover, the kind blur augmentation prepares a stage for; consistency "
        "is measured against the blurred input):",
        "",
        *real_input_rows(points),
    ]
    return lines + ["", *blur_findings(result)]


def real_input_rows(points: dict) -> list[str]:
    """Both stages and bicubic on clean and on blurred real low-res inputs, as table rows."""
    lines = [
        "| stage | input | PSNR (dB) | SSIM | consistency (MSE) | HF ratio | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, label in (("real", "clean"), ("blurred", f"blurred, σ = {BLUR_TEST_SIGMA}")):
        for name in [*BLUR_STAGES, "bicubic"]:
            r = points[(name if name in BLUR_STAGES else next(iter(BLUR_STAGES)), kind)]
            m = r["model" if name in BLUR_STAGES else "bicubic"]
            seconds = f" {r['seconds']:.0f}" if name in BLUR_STAGES else ""
            lines.append(
                f"| {name} | {label} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['consistency']:.2e} "
                f"| {m['hf_ratio']:.2f} |{seconds} |"
            )
    return lines


def blur_findings(result: dict) -> list[str]:
    points = result["points"]
    kid = {name: spread([points[(name, seed)] for seed in SEEDS], "kid") for name in BLUR_STAGES}
    tied = tied_lowest(kid)
    paired = ", ".join(
        f"{points[('blur', seed)]['kid'] - points[('no blur', seed)]['kid']:+.4f}" for seed in SEEDS
    )
    verdict = (
        "tie: the difference is within the seeds' spread"
        if len(tied) > 1
        else f"the stage with {tied[0]} is better"
    )
    on, off = (points[(name, "real")]["model"] for name in BLUR_STAGES)
    soft_on, soft_off = (points[(name, "blurred")]["model"] for name in BLUR_STAGES)
    sharp = points["sharpness"]
    return [
        f"On the cascade's own samples, KID {kid['blur'][0]:.4f} with blur and {kid['no blur'][0]:.4f} without "
        f"({verdict}; blur minus no blur within each seed: {paired}). On clean real inputs: "
        f"{on['psnr']:.2f} against {off['psnr']:.2f} dB, SSIM {on['ssim']:.3f} against {off['ssim']:.3f}, "
        f"HF ratio {on['hf_ratio']:.2f} against {off['hf_ratio']:.2f} (with blur first). On blurred real "
        f"inputs: {soft_on['psnr']:.2f} against {soft_off['psnr']:.2f} dB, SSIM {soft_on['ssim']:.3f} against "
        f"{soft_off['ssim']:.3f}, HF ratio {soft_on['hf_ratio']:.2f} against {soft_off['hf_ratio']:.2f}.",
        "",
        "How soft is the handover? Energy above 1/8 cycle per pixel, relative to real 256 px test digits: "
        f"the cascade's 256 px samples {sharp['samples']:.2f}, real digits blurred by σ = {BLUR_TEST_SIGMA} "
        f"{sharp['blurred']:.2f}.{blur_diagnosis(sharp, soft_on['psnr'] - soft_off['psnr'])}",
    ]


def blur_diagnosis(sharp: dict, gain_on_blurred: float) -> str:
    """What the handover's softness and the blurred-input scores say about a missing effect."""
    text = ""
    if sharp["samples"] < sharp["blurred"] / 2:
        text += (
            " The cascade hands over 256 px samples far softer than anything the recipe's blur (σ ≤ 0.6) "
            "shows a stage in training, so neither stage is inside its training distribution on them, and "
            "the distance to real digits is set by the inputs, not by the 1024 stage."
        )
    if gain_on_blurred < 0.3:
        text += (
            f" Even on inputs blurred exactly as in training, the blur-trained stage gains {gain_on_blurred:+.2f} "
            "dB: at this scale (0.54 M parameters, 2250 steps) it has not learned to undo the blur, so this "
            "miniature cannot show CDM's benefit; a blur range matched to the measured handover is the next "
            "thing to try."
        )
    return text


def plot_blur(result: dict, path: Path) -> None:
    """KID on generated inputs, and PSNR on clean and on blurred real inputs, per stage and bicubic."""
    pts, names = result["points"], list(BLUR_STAGES)
    fig, (a, b) = figure(1, 2, figsize=(8, 3.2))
    kid = [spread([pts[(n, seed)] for seed in SEEDS], "kid") for n in names]
    a.bar(names, [m for m, _ in kid], yerr=[h for _, h in kid], capsize=4, color=["C0", "C1"])
    a.axhline(result["floor"]["kid"], color="grey", linestyle="--", label="real digits")
    a.set_ylabel("KID at 1024 px (generated inputs)")
    a.legend(fontsize=8)
    for k, (kind, label) in enumerate(
        (("real", "clean input"), ("blurred", f"blurred, σ = {BLUR_TEST_SIGMA}"))
    ):
        psnr = [pts[(n, kind)]["model"]["psnr"] for n in names] + [pts[(names[0], kind)]["bicubic"]["psnr"]]
        b.bar(np.arange(3) + (k - 0.5) * 0.38, psnr, width=0.38, label=label, color=f"C{k + 2}")
    b.set_xticks(range(3), [*names, "bicubic"])
    b.set_ylim(bottom=25)
    b.set_ylabel("PSNR (dB), real inputs")
    b.legend(fontsize=8)
    save_figure(fig, path)
