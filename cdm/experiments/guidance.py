"""The guidance sweep: the shipped base stage at classifier-free guidance w (fidelity against diversity)."""

from __future__ import annotations

from pathlib import Path

from cdm.cascade import DEMO_CASCADE, Cascade
from cdm.experiments.common import (
    GUIDANCE_PER_CLASS,
    POINTS,
    SEEDS,
    Judges,
    sample,
    score_row,
    score_samples,
    spread,
    stored,
    template,
    tied_lowest,
)
from cdm.measure.plots import figure, save_figure

GUIDANCE = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def run_guidance(judges: Judges) -> dict:
    cascade = Cascade.from_pretrained(DEMO_CASCADE)[:1]
    ids = [c for c in range(cascade.num_classes) for _ in range(GUIDANCE_PER_CLASS)]
    points = {}
    for w in GUIDANCE:
        settings = cascade.with_overrides(guidance_scale=[w])
        for seed in SEEDS:
            points[(w, seed)] = stored(
                POINTS / "guidance" / f"w{w:g}-seed{seed}.json",
                lambda: score_samples(sample(cascade, ids, seed, settings)[0], ids, judges),
            )
    floor = stored(POINTS / "guidance" / "floor.json", lambda: judges.floor(64, len(ids)))
    return {"points": points, "floor": floor, "samples": len(ids), "settings": cascade.settings[0]}


def report_guidance(result: dict) -> list[str]:
    points, floor, s = result["points"], result["floor"], result["settings"]
    lines = [
        "## Guidance sweep (base stage)",
        "",
        *template(
            "guidance",
            scheduler=s.scheduler,
            steps=s.steps,
            samples=result["samples"],
            per_class=GUIDANCE_PER_CLASS,
            seeds=list(SEEDS),
        ),
        "",
        "| w | FID | KID | class agreement | diversity | seconds per seed |",
        "|---|---|---|---|---|---|",
    ]
    for w in GUIDANCE:
        p = [points[(w, seed)] for seed in SEEDS]
        lines.append(score_row([f"{w:g}"], p, (("diversity", ".2f"),)))
    lines.append(
        f"| real train digits (floor) | {floor['fid']:.1f} | {floor['kid']:.4f} | | {floor['diversity']:.2f} "
        f"| |"
    )
    return lines + ["", *guidance_findings(result)]


def guidance_findings(result: dict) -> list[str]:
    """The best w by KID (a KID within the larger seed spread of the lowest ties; the tie goes to agreement)."""
    stats = {
        w: {k: spread([result["points"][(w, seed)] for seed in SEEDS], k) for k in ("kid", "class_agreement")}
        for w in GUIDANCE
    }
    tied = tied_lowest({w: stats[w]["kid"] for w in GUIDANCE})
    best = max(tied, key=lambda w: stats[w]["class_agreement"][0])
    top = max(GUIDANCE, key=lambda w: stats[w]["class_agreement"][0])
    low = min(tied, key=lambda w: stats[w]["kid"][0])
    return [
        f"The lowest KID is at w = {low:g}; within the seed spread of it: w = {', '.join(f'{w:g}' for w in tied)}, "
        f"of which w = {best:g} has the highest class "
        f"agreement ({stats[best]['class_agreement'][0]:.3f}). The highest agreement overall is at w = {top:g} "
        f"({stats[top]['class_agreement'][0]:.3f}, KID {stats[top]['kid'][0]:.4f})."
    ]


def plot_guidance(result: dict, path: Path) -> None:
    """KID, class agreement and within-class diversity against w: the fidelity-diversity trade-off."""
    pts, floor = result["points"], result["floor"]
    keys = {
        "kid": "KID at 64 px",
        "class_agreement": "class agreement",
        "diversity": "within-class diversity",
    }
    fig, axes = figure(1, 3, figsize=(11, 3.3))
    for ax, (key, label) in zip(axes, keys.items()):
        pairs = [spread([pts[(w, seed)] for seed in SEEDS], key) for w in GUIDANCE]
        ax.errorbar(GUIDANCE, [m for m, _ in pairs], yerr=[h for _, h in pairs], marker="o", capsize=3)
        if key in floor:
            ax.axhline(floor[key], color="grey", linestyle="--", label="real digits")
            ax.legend(fontsize=8)
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    save_figure(fig, path)
