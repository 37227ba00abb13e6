"""The experiment suite: every experiment's run, report and plot by name, and docs/experiments.md.

`python -m cdm.cli.experiments [NAME ...]` runs them (`make experiments`).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from cdm.errors import UserError
from cdm.experiments import aug, blur, common, guidance, levels, sampler, trunc
from cdm.measure.fid import OfflineInception
from cdm.measure.heldout import data_config

EXPERIMENTS = {  # name: (run, report, plot)
    "aug": (aug.run_aug, aug.report_aug, aug.plot_aug),
    "levels": (levels.run_levels, levels.report_levels, levels.plot_levels),
    "levels1024": (partial(levels.run_levels, name="levels1024"), levels.report_levels, levels.plot_levels),
    "trunc": (trunc.run_trunc, trunc.report_trunc, trunc.plot_trunc),
    "blur": (blur.run_blur, blur.report_blur, blur.plot_blur),
    "guidance": (guidance.run_guidance, guidance.report_guidance, guidance.plot_guidance),
    "sampler": (sampler.run_sampler, sampler.report_sampler, sampler.plot_sampler),
}


COSTS = {  # measured on 2 CPU cores
    "aug": "about 35 min of training and 40 min of measuring",
    "levels": "about 20 min",
    "levels1024": "about 30 min",
    "trunc": "about 35 min of training and 45 min of measuring",
    "blur": "two trainings of about 14 min and 45 min of measuring",
    "guidance": "about 21 min",
    "sampler": "126 points, about 2 hours, half of it DDPM at 1000 steps; the photo stage's curve is in "
    "[photo_sr.md](photo_sr.md)",
}


def write_report() -> Path:
    """docs/experiments.md from every experiment's section (docs/experiments/NAME.md), in order."""
    path = common.DOCS / "experiments.md"
    lines = [
        "# Experiments: CDM's claims in miniature",
        "",
        "Each experiment below runs on the shipped demo cascade (digits) on 2 CPU cores; "
        "`make experiments` re-creates every table and plot, resuming at the first missing point "
        "(`python -m cdm.cli.experiments NAME` runs one); the measured points are committed under "
        f"`{common.POINTS}/`. Sample counts are small, so every FID/KID comes "
        "with the real-data floor (real train digits scored the same way) and with the spread over two seeds.",
        "",
    ]
    for name in EXPERIMENTS:
        section = common.DOCS / "experiments" / f"{name}.md"
        if section.is_file():
            lines += [section.read_text().rstrip(), ""]
            if not any(
                p.name != "floor.json" for p in (common.POINTS / name).glob("*.json")
            ):  # floors are shared
                lines += [
                    "This section was measured before its points were stored beside the report: "
                    f"a re-run measures them again ({COSTS[name]}).",
                    "",
                ]
            lines += [f"![{name}](experiments/{name}.png)", ""]
        else:
            done = len(list((common.POINTS / name).glob("*.json")))
            lines += [
                f"## {common.TITLES[name]}",
                "",
                f"Not finished yet: `python -m cdm.cli.experiments {name}` ({COSTS[name]}). "
                f"{done} points were stored under `{common.POINTS}/{name}/` when this page was written; "
                "a re-run measures only the missing ones.",
                "",
            ]
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def run(names: list[str], stored_only: bool = False) -> Path:
    """Run the named experiments (all when empty): measure their missing points, then rewrite each one's
    section and plot and the report page. `stored_only` (the sampler budget alone) measures nothing."""
    judges = common.Judges(OfflineInception(), data_config("digits", None), {})
    for name in names or EXPERIMENTS:
        run_one, report, plot = EXPERIMENTS[name]
        start = time.perf_counter()
        result = sampler.run_sampler(judges, stored_only=True) if stored_only else run_one(judges)
        if stored_only and not sampler.complete_stages(result, reference=False):
            raise UserError("no stage of the sampler budget has all its points stored yet: nothing to report")
        plot(result, common.DOCS / "experiments" / f"{name}.png")
        took = sum(p["seconds"] for p in result["points"].values()) + result["floor"]["seconds"]
        lines = report(result) + [
            "",
            f"Measuring these points took {took / 60:.0f} min on 2 CPU cores "
            f"(this run: {time.perf_counter() - start:.0f} s, the rest was stored).",
        ]
        (common.DOCS / "experiments" / f"{name}.md").write_text("\n".join(lines) + "\n")
    return write_report()
