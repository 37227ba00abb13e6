"""The cascade: chains stage pipelines with conditioning augmentation between them (CDM, Ho et al. 2021).

A cascade folder holds `cascade.json` (stage order and per-stage sampling defaults) and one
diffusers pipeline folder per stage. Between stages, images are what the pipelines return and take:
a finished stage's `output_type="pt"` tensor in [0, 1], or a truncated stage's raw `"latent"` z_s.
Settings are passed per call: a stage sampled with another scheduler is a new pipeline over the same
modules, so the loaded stages (and every slice sharing them) never change.

Conditioning augmentation at sampling, per SR stage, with level s:
- non-truncated: the previous stage runs to the end; its output is upsampled and noised to s by
  the SR stage's `image_noising_scheduler` (`augment_low_res`, the function training used).
- truncated: the previous stage stops early and hands over its noisy z_s. Timesteps of the two
  schedules are matched through alphabar: the previous stage stops at the first of its own
  timesteps t with alphabar_prev(t) >= alphabar_noise(s), and the SR stage is told the level s'
  whose alphabar_noise(s') is closest to alphabar_prev(t). Any scheduler works: sigma-scaled
  samplers (Euler) are converted to the variance-preserving form by `scale_model_input`.
  s = 0 never truncates, so it equals non-truncated sampling at level 0. z_s is noisy at the previous
  stage's resolution: only an SR stage trained with `noise_at_low_res` takes it.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from cdm_pipelines import CDMBasePipeline, SR3Pipeline
from cdm_pipelines.pipeline_sr3 import check_handover, check_number

from cdm.config import AUG_MODES, SamplingConfig
from cdm.devices import Speed
from cdm.errors import UserError
from cdm.models import sampling_scheduler, with_scheduler
from cdm.stage_io import (
    CASCADE_FILE,
    load_stage,
    parse_stage_entry,
    read_json,
    resolve_model,
    stage_info,
    stage_settings,
)


@dataclass
class CascadeOutput:
    images: list[torch.Tensor]  # one (B, 3, H, W) tensor in [0, 1] per stage (a truncated stage: its z_s)
    seconds: list[float]
    stage_names: list[str]
    class_ids: list[int] = field(default_factory=list)


def imagenet_labels() -> dict[str, str]:
    """ILSVRC-2012 class names by index (WordNet lemmas): 207 is "golden retriever"."""
    return json.loads((Path(__file__).parent / "imagenet_classes.json").read_text())


MAX_STAGES = 8  # a cascade of more stages than this is not a cascade cdm wrote
DEMO_CASCADE = Path(__file__).resolve().parent / "demo_cascade"  # the shipped digit cascade


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per image, from the image's seed; every stage draws from it in turn, as the cascade
    root pipeline does with the generator it is given. The same image in any batch."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@contextlib.contextmanager
def pipeline_rules():
    """A pipeline's refusal of its inputs (a ValueError naming the value) as the user's one-line error."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from None


def viewable(images: torch.Tensor, alphabar: float | None) -> torch.Tensor:
    """A stage's output in [0, 1]: a finished stage's as is, a truncated stage's noisy z_s mapped from the
    model's [-1, 1] range, as the cascade root pipeline shows it."""
    return images if alphabar is None else (images / 2 + 0.5).clamp(0, 1)


def nearest_level(alphabar: float, noising) -> int:
    """The augmentation level s whose alphabar in `noising` is closest to `alphabar`."""
    return int((noising.alphas_cumprod - alphabar).abs().argmin())


def check_settings(name: str, pipe, sampling: SamplingConfig) -> None:
    """One stage's sampling settings, checked by the rules its pipeline owns (`call_settings`), plus the
    cascade's own (mode, batch size); for reading and for writing cascade.json."""
    try:
        pipe.call_settings(**call_arguments(pipe, sampling))
        check_number("max_batch", sampling.max_batch, 1, 4096, integer=True)
    except ValueError as err:
        raise UserError(f"stage {name}: {err}") from None
    if sampling.aug_mode not in AUG_MODES:
        raise UserError(
            f"stage {name}: aug_mode={sampling.aug_mode!r}: expected one of {', '.join(AUG_MODES)}"
        )


def call_arguments(pipe, sampling: SamplingConfig) -> dict:
    """A stage's sampling settings as its pipeline's call arguments."""
    kwargs = {"num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance_scale}
    if isinstance(pipe, SR3Pipeline):
        kwargs.update(noise_level=sampling.noise_level, autoguidance_scale=sampling.autoguidance_scale)
    return kwargs


@dataclass
class Stage:
    """One stage of a cascade: its name (and folder), its pipeline, its sampling defaults."""

    name: str
    pipe: CDMBasePipeline | SR3Pipeline
    sampling: SamplingConfig


class Cascade:
    """An ordered list of stages: a base generator, then SR stages whose input size matches."""

    def __init__(self, stages: list[Stage], root: Path | None = None):
        self.stages, self.root = list(stages), root
        self.speed = Speed.exact()
        self.check_chain()

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    @property
    def pipes(self) -> list:
        return [stage.pipe for stage in self.stages]

    @property
    def settings(self) -> list[SamplingConfig]:
        return [stage.sampling for stage in self.stages]

    def optimize(self, speed: Speed) -> Cascade:
        """Run the UNets with `speed` (autocast dtype and memory layout); `Speed.exact()` undoes it."""
        self.speed = speed
        for p in self.pipes:
            speed.apply(p)
        return self

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path, torch_dtype=torch.float32) -> Cascade:
        root = resolve_model(model)
        spec_path = root / CASCADE_FILE
        if not spec_path.is_file() and (root / "model_index.json").is_file():  # a single base stage
            return cls(
                [Stage(root.name, load_stage(root, torch_dtype), stage_settings(stage_info(root)))], root
            )
        if not spec_path.is_file():
            raise UserError(f"{root} is not a cascade folder: expected {CASCADE_FILE} inside it")
        spec = read_json(spec_path, "a cascade description (a JSON object with a stages list)")
        stages = spec.get("stages")
        if not isinstance(stages, list) or not 1 <= len(stages) <= MAX_STAGES:
            raise UserError(
                f"{spec_path}: stages is {json.dumps(stages)[:80]}: expected a list of 1..{MAX_STAGES} stage entries"
            )
        entries = [
            parse_stage_entry(spec_path, k, entry) for k, entry in enumerate(stages)
        ]  # all, before any weight
        loaded = [
            Stage(name, load_stage(folder, torch_dtype=torch_dtype), sampling)
            for name, folder, sampling in entries
        ]
        if spec.get("label_set") == "imagenet" and not loaded[0].pipe.labels:
            loaded[0].pipe.register_to_config(id2label=imagenet_labels())
        return cls(loaded, root)

    def check_chain(self) -> None:
        """Sizes and class spaces must line up before any compute is spent."""
        if not self.pipes:
            raise UserError("the cascade has no stages")
        if not isinstance(self.pipes[0], CDMBasePipeline):
            raise UserError(
                f"stage {self.names[0]!r} must be a base generator, got {type(self.pipes[0]).__name__}"
            )
        for k in range(1, len(self.pipes)):
            prev, pipe = self.pipes[k - 1], self.pipes[k]
            if not isinstance(pipe, SR3Pipeline):
                raise UserError(f"stage {self.names[k]!r} must be an SR stage, got {type(pipe).__name__}")
            out = prev.unet.config.sample_size
            if pipe.config.low_res_size != out:
                raise UserError(
                    f"stage chain mismatch: {self.names[k - 1]!r} outputs {out}x{out} but {self.names[k]!r} "
                    f"expects {pipe.config.low_res_size}x{pipe.config.low_res_size} input"
                )
            if pipe.num_classes and pipe.num_classes != self.num_classes:
                raise UserError(
                    f"class space mismatch: {self.names[k]!r} has {pipe.num_classes} classes, "
                    f"the base stage {self.num_classes}"
                )
        for stage in self.stages:
            check_settings(stage.name, stage.pipe, stage.sampling)

    @property
    def base(self) -> CDMBasePipeline:
        return self.pipes[0]

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def resolutions(self) -> list[int]:
        return [p.unet.config.sample_size for p in self.pipes]

    def to(self, device) -> Cascade:
        for p in self.pipes:
            p.to(device)
        return self

    def place(self, devices: list[str]) -> Cascade:
        """Each stage on its own device (a device map), for cascades that one device cannot hold."""
        if len(devices) != len(self.pipes):
            raise UserError(
                f"--device-map has {len(devices)} devices for {len(self.pipes)} stages ({', '.join(self.names)}): "
                "expected one per stage"
            )
        for pipe, device in zip(self.pipes, devices):
            pipe.to(device)
        return self

    def pipelined(self, class_labels, seeds: list[int], settings=None, chunk: int = 1, on_chunk_end=None):
        """`__call__` with the stages at work at once, one thread per stage (one device per stage with
        `place`): stage k+1 takes chunk i while stage k makes chunk i + 1. Each image is the one
        `__call__` gives (per-image seeds). `on_chunk_end(k, lo, hi, images)` sees every chunk of every
        stage; returns the seconds each stage worked."""
        settings = settings or self.settings
        ids = self.class_ids(class_labels)
        if len(ids) != len(seeds):
            raise UserError(f"got {len(seeds)} seeds for {len(ids)} images: expected one per image")
        links = [queue.Queue() for _ in range(len(self.pipes) + 1)]
        for lo in range(0, len(ids), chunk):
            links[0].put((lo, min(lo + chunk, len(ids)), None, None))
        links[0].put(None)
        seconds, errors = [0.0] * len(self.pipes), []

        gens = image_generators(seeds)  # stage k + 1 takes image i only after stage k is done with it

        def work(k: int) -> None:
            sampling = settings[k]
            pipe = with_scheduler(self.pipes[k], sampling.scheduler, sampling.steps)
            pipe.set_progress_bar_config(disable=True)
            truncate = self.truncation_alphabar(k, settings)
            while (item := links[k].get()) is not None:
                lo, hi, x, alphabar = item
                start = time.perf_counter()
                try:
                    images, out_alphabar = self.run_stage(
                        pipe, sampling, ids[lo:hi], x, alphabar, gens[lo:hi], truncate
                    )
                except BaseException as err:  # stop the line; the caller raises it
                    errors.append(err)
                    break
                images = images.float().cpu()
                seconds[k] += time.perf_counter() - start
                if on_chunk_end is not None:
                    on_chunk_end(k, lo, hi, viewable(images, out_alphabar))
                links[k + 1].put((lo, hi, images, out_alphabar))
            links[k + 1].put(None)

        threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(self.pipes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return seconds

    def class_ids(self, labels) -> list[int]:
        try:
            return self.base.get_label_ids(labels)
        except ValueError as err:
            raise UserError(str(err)) from None

    def with_overrides(self, **per_stage: list | None) -> list[SamplingConfig]:
        """Settings with per-stage overrides: each keyword is a list with one value per stage, or None."""
        out = [replace(sampling) for sampling in self.settings]
        for key, values in per_stage.items():
            if values is None:
                continue
            if len(values) == 1 and key == "guidance_scale":  # one value: the class-conditional stages
                values = [
                    values[0] if p.num_classes else sampling.guidance_scale
                    for p, sampling in zip(self.pipes, out)
                ]
            elif len(values) == 1:
                values = values * len(out)
            if len(values) != len(out):
                raise UserError(
                    f"{key}: got {len(values)} values for {len(out)} stages ({', '.join(self.names)})"
                )
            for sampling, v in zip(out, values):
                setattr(sampling, key, v)
        for name, pipe, sampling in zip(self.names, self.pipes, out):
            check_settings(name, pipe, sampling)
        for k in range(len(out)):
            self.check_sampler(k, out[k], out[k + 1] if k + 1 < len(out) else None)
        return out

    def check_sampler(self, k: int, sampling: SamplingConfig, nxt: SamplingConfig | None) -> None:
        """The scheduler must run at the stage's steps; a truncated handover needs its alphabar too."""
        try:
            scheduler = sampling_scheduler(sampling.scheduler, self.pipes[k].scheduler.config, sampling.steps)
        except ValueError as err:
            raise UserError(f"stage {self.names[k]}: {err}") from None
        if nxt is None or nxt.aug_mode != "truncated" or nxt.noise_level == 0:
            return
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise UserError(
                f"scheduler={sampling.scheduler} for stage {self.names[k]}: truncated conditioning augmentation "
                "needs a scheduler with a DDPM noise schedule (alphas_cumprod), e.g. DDIMScheduler"
            )
        nxt_pipe = self.pipes[k + 1]
        try:
            check_handover(nxt_pipe.config.residual, nxt_pipe.config.noise_at_low_res, takes=True)
        except ValueError as err:
            raise UserError(f"stage {self.names[k + 1]}: {err}") from None

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        seeds: list[int],
        settings: list[SamplingConfig] | None = None,
        on_stage_end=None,
        progress: bool = True,
    ) -> CascadeOutput:
        """Sample one image per (label, seed) through every stage.

        Args:
            class_labels: ids or label names, one per image.
            seeds: one integer seed per image; image i equals the same seed run alone.
            settings: per-stage settings (see `with_overrides`); defaults from cascade.json.
            on_stage_end: called as `fn(stage_index, name, images)` after each stage.
            progress: show a progress bar per stage.
        """
        settings = settings or self.settings
        ids = self.class_ids(class_labels)
        if len(ids) != len(seeds):
            raise UserError(f"got {len(seeds)} seeds for {len(ids)} images: expected one per image")
        outputs, seconds = [], []
        x, alphabar = None, None
        gens = image_generators(seeds)
        for k, (name, sampling) in enumerate(zip(self.names, settings)):
            start = time.perf_counter()
            pipe = with_scheduler(self.pipes[k], sampling.scheduler, sampling.steps)
            pipe.set_progress_bar_config(disable=not progress, desc=name, leave=False)
            truncate = self.truncation_alphabar(k, settings)
            chunks, alphabars = [], []
            for lo in range(0, len(ids), sampling.max_batch):
                hi = min(lo + sampling.max_batch, len(ids))
                low_res = None if k == 0 else x[lo:hi]
                images, out_alphabar = self.run_stage(
                    pipe, sampling, ids[lo:hi], low_res, alphabar, gens[lo:hi], truncate
                )
                chunks.append(images.float().cpu())
                alphabars.append(out_alphabar)
            x, alphabar = torch.cat(chunks), alphabars[0]
            seconds.append(time.perf_counter() - start)
            outputs.append(viewable(x, alphabar))
            if on_stage_end is not None:
                on_stage_end(k, name, outputs[-1])
        return CascadeOutput(images=outputs, seconds=seconds, stage_names=list(self.names), class_ids=ids)

    def __getitem__(self, index: slice) -> Cascade:
        """The first stages, `cascade[:n]`: a shorter cascade sharing the same pipelines."""
        if not isinstance(index, slice):
            raise TypeError(f"a Cascade is sliced, e.g. cascade[:2]; got {type(index).__name__}")
        return Cascade(self.stages[index], self.root)

    def truncation_alphabar(self, k: int, settings: list[SamplingConfig]) -> float | None:
        """Where stage k stops when the next stage takes its input truncated (CDM section 3.2)."""
        nxt = settings[k + 1] if k + 1 < len(settings) else None
        if nxt is None or nxt.aug_mode != "truncated" or nxt.noise_level == 0:
            return None
        return float(self.pipes[k + 1].image_noising_scheduler.alphas_cumprod[nxt.noise_level])

    def run_stage(self, pipe, sampling: SamplingConfig, ids, low_res, alphabar, gens, truncate):
        """One chunk through a stage's pipeline: labels for the base stage; for an SR stage, the previous
        stage's output in [0, 1], noised to `sampling.noise_level`, or handed over already noisy at
        `alphabar` (truncated).

        Returns the images in [0, 1] (for a truncated stage, its noisy z_s) and the alphabar it stopped at.
        """
        kwargs = {
            **call_arguments(pipe, sampling),
            "generator": gens,
            "output_type": "pt" if truncate is None else "latent",
            "truncate_alphabar": truncate,
        }
        with self.speed.autocast(pipe.device), pipeline_rules():
            if low_res is None:
                out = pipe(ids, **kwargs)
            else:
                handed_over = alphabar is not None
                if handed_over:
                    kwargs["noise_level"] = nearest_level(alphabar, pipe.image_noising_scheduler)
                out = pipe(
                    low_res.to(pipe.device),
                    class_labels=ids if pipe.num_classes else None,
                    low_res_is_augmented=handed_over,
                    **kwargs,
                )
        if (
            truncate is not None and out.alphabar is None
        ):  # asked to stop early, but the sampler never got there
            return (out.images / 2 + 0.5).clamp(0, 1), None
        return out.images, out.alphabar
