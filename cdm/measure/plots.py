"""Plots of measured results (matplotlib, imported when a plot is drawn): one `save_figure` for all."""

from __future__ import annotations

from pathlib import Path


def figure(*args, **kwargs):
    """matplotlib's `subplots` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> None:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: dict, path: Path) -> None:
    """PSNR and HF ratio against sampling steps, one line per scheduler, bicubic as a dashed line."""
    fig, axes = figure(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("psnr", "hf_ratio")):
        for name in dict.fromkeys(r["scheduler"] for r in result["sweep"]):
            rows = [r for r in result["sweep"] if r["scheduler"] == name]
            ax.plot(
                [r["steps"] for r in rows],
                [r[key] for r in rows],
                marker="o",
                label=name.replace("Scheduler", ""),
            )
        ax.axhline(result["metrics"]["bicubic"][key], color="grey", linestyle="--", label="bicubic")
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (UNet evaluations)")
        ax.set_ylabel({"psnr": "PSNR (dB)", "hf_ratio": "HF ratio (1 = original)"}[key])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['stage']} on {result['dataset']['num_images']} {result['dataset']['name']} images")
    save_figure(fig, path)


def plot_aug_sweep(rows: list[dict], modes: list[str], stage: str, metric: str, path: Path) -> None:
    """The metric against the augmentation level, one line per mode."""
    fig, ax = figure(figsize=(5, 3.5))
    for mode in modes:
        pts = [r for r in rows if r["aug_mode"] == mode]
        ax.plot([r["noise_level"] for r in pts], [r[metric] for r in pts], marker="o", label=mode)
    ax.set_xlabel(f"augmentation level s ({stage})")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_lines(path: Path, xs, series: dict, xlabel: str, ylabel: str, floor: float | None = None) -> None:
    """One line per series, each point the seeds' mean with half their range as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pairs in series.items():
        ax.errorbar(xs, [m for m, _ in pairs], yerr=[h for _, h in pairs], marker="o", capsize=3, label=label)
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle="--", label="real data (floor)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
