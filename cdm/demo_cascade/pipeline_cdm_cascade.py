# Copyright the cdm authors. Licensed under the Apache License, Version 2.0.
"""A whole Cascaded Diffusion Model (Ho et al., arXiv 2106.15282) as one diffusers pipeline.

A cascade folder holds one pipeline folder per stage and, at its root, this file and a
`model_index.json` that names each stage folder as a component. Plain diffusers loads the whole
cascade from the root; every stage's weights stay in its own folder, nothing is duplicated. Loading
runs this file and the stage folders' pipeline files, so diffusers needs the user's explicit
`trust_remote_code` opt-in to `DiffusionPipeline.from_pretrained` (the model card shows the exact
call). Once loaded::

    image = pipe(class_labels=[7]).images[0]
    image = pipe(class_labels=[7], num_inference_steps=[50, 5, 5], noise_level=100).images[0]

Each stage's sampling defaults (scheduler, steps, guidance, conditioning augmentation level and
mode) come from the root `model_index.json`, which mirrors the cascade's `cascade.json` and each
stage folder's own defaults; `num_inference_steps`, `guidance_scale` and `noise_level` can be given
per call, one value or one per stage.

This file is self-contained: it imports only torch, PIL, numpy and diffusers. `STAGES` below is
written for each cascade, in stage order; the first stage is the class-conditional base stage.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

STAGES = ('base64', 'sr64to256', 'sr256to1024')  # this cascade's stages

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class CDMCascadePipelineOutput(BaseOutput):
    """Output of a cascade.

    Args:
        images: the last stage's images: PIL images, a numpy array (B, H, W, 3) in [0, 1], or a
            tensor (B, 3, H, W) in [0, 1].
        stage_images: with `return_all_stages=True`, each stage's images in the same format (for a
            stage that hands over truncated, its noisy z_s mapped to [0, 1]).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stage_images: list | None = None


# The per-stage settings the root keeps; `aug_level` is the old name of `noise_level`, still read.
SETTING_KEYS = ("scheduler", "steps", "guidance_scale", "noise_level", "aug_mode", "autoguidance_scale")
AUG_MODES = ("non-truncated", "truncated")


class CDMCascadePipeline(DiffusionPipeline):
    r"""All stages of a cascade: a class-conditional base stage, then SR stages, each a component.

    Between stages the previous output is noised to the next stage's augmentation level (CDM's
    Gaussian conditioning augmentation); in truncated mode the previous stage stops early and hands
    over its noisy sample. The settings of each stage are in `self.config.settings`.

    Args:
        settings: stage name -> dict with `scheduler`, `steps`, `guidance_scale`, `noise_level`,
            `aug_mode` and `autoguidance_scale`, as in the cascade's `cascade.json`. A key left out
            takes the stage's own default (its folder's `call_defaults` and `scheduler/`).
        **stages: one loaded stage pipeline per name in `STAGES`.
    """

    def __init__(self, settings: dict | None = None, **stages):
        super().__init__()
        self.register_modules(**stages)
        self.register_to_config(settings=settings or {})

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in STAGES]
        + [inspect.Parameter("settings", inspect.Parameter.KEYWORD_ONLY, default=None)]
    )

    @property
    def stages(self) -> list:
        return [getattr(self, n) for n in STAGES]

    def to(self, *args, **kwargs):
        for stage in self.stages:
            stage.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    def set_progress_bar_config(self, **kwargs):
        for stage in self.stages:
            stage.set_progress_bar_config(**kwargs)

    def stage_settings(self, k: int, **given) -> dict:
        """Stage k's settings for one call: a value given for this call (one, or one per stage), else the
        root's stored setting. Keys that stay `None` are left to the stage's own defaults."""
        stored = dict(self.config.settings.get(STAGES[k], {}))
        if "noise_level" not in stored and "aug_level" in stored:  # folders written before the rename
            stored["noise_level"] = stored["aug_level"]
        out = {key: stored.get(key) for key in SETTING_KEYS}
        out["aug_mode"] = out["aug_mode"] or "non-truncated"
        if out["aug_mode"] not in AUG_MODES:
            raise ValueError(
                f"aug_mode={out['aug_mode']!r} for stage {STAGES[k]}: expected one of {AUG_MODES}"
            )
        for key, value in given.items():
            if isinstance(value, (list, tuple)):
                if len(value) != len(STAGES):
                    raise ValueError(f"{key}: got {len(value)} values for {len(STAGES)} stages {STAGES}")
                out[key] = value[k]
            elif value is not None and self.takes_one_value(k, key):
                out[key] = value
        return out

    def takes_one_value(self, k: int, key: str) -> bool:
        """Which stages one value is for: `noise_level` the SR stages, `guidance_scale` the
        class-conditional stages, anything else every stage."""
        if key == "noise_level":
            return k > 0
        if key == "guidance_scale":
            return k == 0 or bool(self.stages[k].num_classes)
        return True

    def truncation_alphabar(self, k: int, next_settings: dict | None) -> float | None:
        """Where stage k stops when stage k + 1 takes its input truncated (CDM section 3.2)."""
        if next_settings is None or next_settings["aug_mode"] != "truncated":
            return None
        level = next_settings["noise_level"]
        if level is None:
            level = self.stages[k + 1].config.call_defaults.get("noise_level", 0)
        if not level:
            return None
        return float(self.stages[k + 1].image_noising_scheduler.alphas_cumprod[level])

    @staticmethod
    def with_scheduler(stage, name: str | None):
        """The stage with another scheduler class for this call, as a new pipeline over the same modules
        (diffusers' `Pipeline(**pipe.components)`): the loaded stage itself is never changed."""
        if not name or type(stage.scheduler).__name__ == name:
            return stage
        scheduler = getattr(diffusers, name, None)
        if scheduler is None or not name.endswith("Scheduler"):
            raise ValueError(f"scheduler={name!r}: expected a diffusers scheduler class name")
        view = type(stage)(**{**stage.components, "scheduler": scheduler.from_config(stage.scheduler.config)})
        view.set_progress_bar_config(**getattr(stage, "_progress_bar_config", {}))
        return view

    def run_stage(self, k: int, x, alphabar, ids: list[int], s: dict, truncate, generator):
        """Stage k: the base stage on the class `ids`; an SR stage on `x`, the previous stage's [0, 1]
        images or its truncated z_s (whose alpha-bar is `alphabar`). Returns its images and where it stopped."""
        stage = self.with_scheduler(self.stages[k], s["scheduler"])
        kwargs = {
            "num_inference_steps": s["steps"],
            "guidance_scale": s["guidance_scale"],
            "generator": generator,
            "output_type": "pt" if truncate is None else "latent",  # [0, 1], or a truncated z_s
            "truncate_alphabar": truncate,
        }
        if k == 0:
            out = stage(ids, **kwargs)
            return out.images, out.alphabar
        handed_over, level = alphabar is not None, s["noise_level"]
        if handed_over:  # the level whose alphabar is closest to where the previous stage stopped
            level = int((stage.image_noising_scheduler.alphas_cumprod - alphabar).abs().argmin())
        out = stage(
            x,
            class_labels=ids if stage.num_classes else None,
            noise_level=level,
            low_res_is_augmented=handed_over,
            autoguidance_scale=s["autoguidance_scale"],
            **kwargs,
        )
        return out.images, out.alphabar

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | list[int] | None = None,
        guidance_scale: float | list[float] | None = None,
        noise_level: int | list[int] | None = None,
        output_type: str = "pil",
        return_all_stages: bool = False,
        return_dict: bool = True,
    ):
        r"""Sample through every stage with the cascade's settings, or with those given for this call.

        Args:
            class_labels: class ids or label names (see the base stage's `labels`).
            num_images_per_prompt: images per class label.
            generator: one generator, or one per image; every stage draws from it in turn.
            num_inference_steps: steps, one value for every stage or a list with one per stage.
            guidance_scale: classifier-free guidance, one value for the class-conditional stages or a
                list with one per stage.
            noise_level: conditioning augmentation level s, one value for every SR stage or a list
                with one per stage (the base stage's entry is ignored).
            output_type: "pil", "np" or "pt" (a tensor in [0, 1]).
            return_all_stages: also return each stage's images in `stage_images`.
            return_dict: return a `CDMCascadePipelineOutput` rather than a tuple.
        """
        # 1. Check the call and resolve every stage's settings before any work
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        given = {"steps": num_inference_steps, "guidance_scale": guidance_scale, "noise_level": noise_level}
        settings = [self.stage_settings(k, **given) for k in range(len(STAGES))]
        ids = [i for i in self.stages[0].get_label_ids(class_labels) for _ in range(num_images_per_prompt)]

        # 2. Each stage in turn on the previous one's output ([0, 1], or a truncated z_s)
        x, alphabar, per_stage = None, None, []
        for k in range(len(STAGES)):
            truncate = self.truncation_alphabar(k, settings[k + 1] if k + 1 < len(STAGES) else None)
            x, alphabar = self.run_stage(k, x, alphabar, ids, settings[k], truncate, generator)
            if truncate is not None and alphabar is None:  # the sampler never reached the handover level
                x = (x / 2 + 0.5).clamp(0, 1)
            per_stage.append(x if alphabar is None else (x / 2 + 0.5).clamp(0, 1))

        # 3. Post-process
        images = [self.to_output(y, output_type) for y in per_stage]
        if not return_dict:
            return (images[-1], images) if return_all_stages else (images[-1],)
        return CDMCascadePipelineOutput(images=images[-1], stage_images=images if return_all_stages else None)

    @staticmethod
    def to_output(image: torch.Tensor, output_type: str):
        """A (B, 3, H, W) batch in [0, 1] as "pt" (unchanged), "np" (B, H, W, 3) or PIL images."""
        if output_type == "pt":
            return image
        array = image.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in array]
