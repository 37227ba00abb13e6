"""The browser app: generate through a cascade stage by stage, and upscale a photo, in Gradio.

`build_app` returns a `gradio.Blocks`; `cdm-app` serves it, and a Hub Space runs it from `app.py`.
Gradio is an optional dependency (`pip install 'cdm-diffusion[app]'`), imported only here.
"""

from __future__ import annotations

import atexit
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import PIL.Image
import torch
from cdm_pipelines.pipeline_sr3 import check_number

from cdm.cascade import DEMO_CASCADE, Cascade
from cdm.config import SamplingConfig
from cdm.devices import Speed
from cdm.errors import UserError
from cdm.images import to_pil
from cdm.models import with_scheduler
from cdm.upscaling import PHOTO_STAGE, check_size, load_sr_stage, read_image, upscale

MAX_IMAGES = 8


@dataclass
class AppModels:
    cascade: Cascade
    sr_pipe: object
    sr_settings: SamplingConfig
    workdir: Path  # every file the app writes lives under this temporary folder


def class_choices(cascade: Cascade) -> list[str]:
    return [f"{i}: {name}" for i, name in sorted(cascade.base.labels.items())] or [
        str(i) for i in range(cascade.base.num_classes)
    ]


def parse_class(cascade: Cascade, choice) -> int:
    """'207: golden retriever', '207' or a label name -> the class id; a bad value is a UserError."""
    text = str(choice if choice is not None else "").strip()
    if not text:
        raise UserError("pick a class")
    head = text.split(":", 1)[0].strip()
    return cascade.class_ids([int(head) if head.isdigit() else text])[0]


def whole(name: str, value, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """A number from a form field (Gradio sends floats) as an integer, by the pipelines' rule."""
    value = float(value)
    return check_number(name, int(value) if value.is_integer() else value, lo, hi, integer=True)


def stage_settings(models: AppModels, guidance, aug_mode, stage_values) -> list[SamplingConfig]:
    """The cascade's settings with the UI's values (steps per stage, then the augmentation level of
    each SR stage); the same checks as cdm-generate."""
    cascade = models.cascade
    n = len(cascade.pipes)
    steps, levels = stage_values[:n], stage_values[n:]
    return cascade.with_overrides(
        steps=[whole("steps", s) for s in steps],
        guidance_scale=[check_number("guidance", float(guidance), 1, 100)],
        noise_level=[0] + [whole("augmentation level", level) for level in levels] if n > 1 else None,
        aug_mode=[cascade.settings[0].aug_mode] + [aug_mode] * (n - 1) if n > 1 else None,
    )


def run_cascade(models: AppModels, ids: list[int], seeds: list[int], settings, events: queue.Queue) -> None:
    """Sample in a worker thread; each finished stage (or an error) goes to `events`."""
    try:
        start = [time.perf_counter()]

        def on_stage_end(k, name, images):
            now = time.perf_counter()
            events.put(("stage", k, name, [to_pil(x) for x in images], now - start[0]))
            start[0] = now

        models.cascade(ids, seeds=seeds, settings=settings, on_stage_end=on_stage_end, progress=True)
        events.put(("done",))
    except Exception as err:  # handed to the UI thread, which shows it
        events.put(("error", err))


def generate(models: AppModels, choice, num_images, seed, guidance, aug_mode, *stage_values, progress=None):
    """Yields every stage's images as that stage finishes, with the time per stage."""
    cascade, n = models.cascade, len(models.cascade.pipes)
    try:
        class_id = parse_class(cascade, choice)
        count = whole("number of images", num_images, 1, MAX_IMAGES)
        settings = stage_settings(models, guidance, aug_mode, stage_values)
        seeds = [whole("seed", seed, 0, 2**63 - 1 - count) + i for i in range(count)]
    except (UserError, ValueError, TypeError, OverflowError) as err:
        raise gr.Error(str(err)) from None
    events: queue.Queue = queue.Queue()
    threading.Thread(
        target=run_cascade, args=(models, [class_id] * count, seeds, settings, events), daemon=True
    ).start()
    galleries, times = [None] * n, []
    if progress is not None:
        progress((0, n), desc=f"stage 1 of {n}: {cascade.names[0]}")
    while True:
        event = events.get()
        if event[0] == "error":
            raise gr.Error(str(event[1])) from None
        if event[0] == "done":
            return
        _, k, name, images, seconds = event
        galleries[k] = images
        times.append(f"{name}: {seconds:.1f} s")
        if progress is not None and k + 1 < n:
            progress((k + 1, n), desc=f"stage {k + 2} of {n}: {cascade.names[k + 1]}")
        yield (*galleries, " · ".join(times))


def upscale_photo(models: AppModels, path, steps, seed):
    """The 4x result beside bicubic (for the slider), and the result as a PNG file to download."""
    pipe, settings = models.sr_pipe, models.sr_settings
    try:
        if not path:
            raise UserError("upload an image first")
        image = read_image(Path(path))
        check_size(Path(path).name, image, pipe.scale_factor)
        steps = pipe.call_settings(num_inference_steps=whole("steps", steps))["num_inference_steps"]
        seed = whole("seed", seed)
    except (
        UserError,
        ValueError,
        TypeError,
        OverflowError,
    ) as err:  # name the upload, not the server's copy of it
        raise gr.Error(str(err).replace(str(path), Path(path).name) if path else str(err)) from None
    sampler = with_scheduler(pipe, settings.scheduler, steps)
    result = upscale(sampler, image, steps=steps, seed=seed, speed=models.cascade.speed)
    bicubic = image.resize(result.size, PIL.Image.BICUBIC)
    out = Path(tempfile.mkdtemp(dir=models.workdir)) / f"{Path(path).stem}-x{pipe.scale_factor}.png"
    result.save(out)
    prune(models.workdir, KEEP_RESULTS)
    return (bicubic, result), str(out)


KEEP_RESULTS = 16  # result files kept for download; older ones are removed, so disk use stays bounded
CACHE_SECONDS = 900  # uploads and results Gradio caches are removed once this old (checked every 5 min)


def prune(workdir: Path, keep: int) -> None:
    """Remove all but the `keep` newest result folders the app wrote under `workdir`."""
    folders = sorted((p for p in workdir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in folders[: max(len(folders) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_models(model: str | None, sr_model: str | None, workdir: Path) -> AppModels:
    """The cascade and the SR stage, on the CPU with the speed settings `--precision auto` picks."""
    speed = Speed.resolve("auto", torch.device("cpu"))
    cascade = Cascade.from_pretrained(model or DEMO_CASCADE).optimize(speed)
    sr_pipe, sr_settings = load_sr_stage(sr_model or str(PHOTO_STAGE), None)
    speed.apply(sr_pipe)
    for pipe in [*cascade.pipes, sr_pipe]:
        pipe.set_progress_bar_config(disable=False, leave=False)
    return AppModels(cascade, sr_pipe, sr_settings, workdir)


def generate_tab(models: AppModels) -> None:
    cascade = models.cascade
    s0 = cascade.settings[-1]
    with gr.Row():
        with gr.Column(scale=1):
            choice = gr.Dropdown(
                class_choices(cascade),
                value=class_choices(cascade)[0],
                label="Class",
                allow_custom_value=True,
                info="pick a label, or type a class id",
            )
            num_images = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Number of images")
            seed = gr.Number(0, precision=0, label="Seed")
            guidance = gr.Number(cascade.settings[0].guidance_scale, label="Guidance (base stage)")
            aug_mode = gr.Dropdown(
                ["non-truncated", "truncated"], value=s0.aug_mode, label="Augmentation mode"
            )
            steps = [
                gr.Number(s.steps, precision=0, label=f"Steps: {name}")
                for name, s in zip(cascade.names, cascade.settings)
            ]
            levels = [
                gr.Number(s.noise_level, precision=0, label=f"Augmentation level: {name}")
                for name, s in zip(cascade.names[1:], cascade.settings[1:])
            ]
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=3):
            galleries = [
                gr.Gallery(label=f"{name}: {res} px", columns=4, format="png", elem_id=f"stage-{k}")
                for k, (name, res) in enumerate(zip(cascade.names, cascade.resolutions))
            ]
            timing = gr.Markdown(elem_id="stage-times")

    def run(*values, progress=gr.Progress()):
        yield from generate(models, *values, progress=progress)

    button.click(
        run,
        [choice, num_images, seed, guidance, aug_mode, *steps, *levels],
        [*galleries, timing],
        api_name="generate",
    )


def upscale_tab(models: AppModels) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Photo", file_types=["image"], type="filepath", elem_id="upscale-input")
            steps = gr.Number(
                models.sr_settings.steps,
                precision=0,
                label="Steps (0: the estimate, most faithful; more: detail)",
            )
            seed = gr.Number(0, precision=0, label="Seed")
            button = gr.Button("Upscale 4x", variant="primary", elem_id="upscale-button")
        with gr.Column(scale=3):
            slider = gr.ImageSlider(label="bicubic | cdm", type="pil", format="png", elem_id="upscale-slider")
            download = gr.File(label="Download the result (PNG)", elem_id="upscale-download")
    button.click(
        lambda path, st, sd: upscale_photo(models, path, st, sd),
        [upload, steps, seed],
        [slider, download],
        api_name="upscale",
    )


def build_app(
    model: str | None = None, sr_model: str | None = None, workdir: Path | None = None
) -> gr.Blocks:
    """The two-tab app over a cascade (default: the shipped demo) and an SR stage (the photo stage)."""
    if workdir is None:  # the app's own temporary folder, removed when the process ends
        workdir = Path(tempfile.mkdtemp(prefix="cdm-app-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = load_models(model, sr_model, workdir)
    with gr.Blocks(title="cdm: cascaded diffusion", delete_cache=(300, CACHE_SECONDS)) as demo:
        gr.Markdown(
            f"# Cascaded diffusion\n{len(models.cascade.pipes)} stages: "
            + " → ".join(f"{n} ({r} px)" for n, r in zip(models.cascade.names, models.cascade.resolutions))
        )
        with gr.Tab("Generate"):
            generate_tab(models)
        with gr.Tab("Upscale"):
            upscale_tab(models)
    return demo
