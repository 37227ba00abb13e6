# Copyright the cdm authors. Licensed under the Apache License, Version 2.0.
"""A whole Cascaded Diffusion Model (Ho et al., arXiv 2106.15282) as one diffusers pipeline.

A cascade folder holds one pipeline folder per stage and, at its root, this file and a
`model_index.json` that names each stage folder as a component. Plain diffusers loads the whole
cascade from the root; every stage's weights stay in its own folder, nothing is duplicated. Loading
runs this file and the stage folders' pipeline files, so diffusers needs the user's explicit
`trust_remote_code` opt-in to `DiffusionPipeline.from_pretrained` (the model card shows the exact
call). Once loaded::

    image = pipe(class_labels=[7]).images[0]

Each stage's sampling defaults (scheduler, steps, guidance, conditioning augmentation level and
mode) come from the root `model_index.json`, which mirrors the cascade's `cascade.json`.

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

STAGES = ("base64", "sr64to256", "sr256to1024")  # written for each cascade

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


class CDMCascadePipeline(DiffusionPipeline):
    r"""All stages of a cascade: a class-conditional base stage, then SR stages, each a component.

    Between stages the previous output is noised to the next stage's augmentation level (CDM's
    Gaussian conditioning augmentation); in truncated mode the previous stage stops early and hands
    over its noisy sample. The settings of each stage are in `self.config.settings`.

    Args:
        settings: stage name -> dict with `scheduler`, `steps`, `guidance_scale`, `aug_level` and
            `aug_mode`, as in the cascade's `cascade.json`.
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

    def stage_settings(self, name: str) -> dict:
        s = dict(self.config.settings.get(name, {}))
        s.setdefault("steps", 50)
        s.setdefault("guidance_scale", 1.0)
        s.setdefault("aug_level", 0)
        s.setdefault("aug_mode", "non-truncated")
        return s

    def truncation_alphabar(self, k: int) -> float | None:
        """Where stage k stops when stage k + 1 takes its input truncated (CDM section 3.2)."""
        if k + 1 >= len(STAGES):
            return None
        nxt = self.stage_settings(STAGES[k + 1])
        if nxt["aug_mode"] != "truncated" or nxt["aug_level"] == 0:
            return None
        return float(self.stages[k + 1].image_noising_scheduler.alphas_cumprod[nxt["aug_level"]])

    def use_scheduler(self, stage, name: str | None) -> None:
        if name and type(stage.scheduler).__name__ != name:
            stage.scheduler = getattr(diffusers, name).from_config(stage.scheduler.config)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_all_stages: bool = False,
        return_dict: bool = True,
    ):
        r"""Sample through every stage with the cascade's settings.

        Args:
            class_labels: class ids or label names (see the base stage's `labels`).
            num_images_per_prompt: images per class label.
            generator: one generator, or one per image; every stage draws from it.
            output_type: "pil", "np" or "pt" (a tensor in [0, 1]).
            return_all_stages: also return each stage's images in `stage_images`.
            return_dict: return a `CDMCascadePipelineOutput` rather than a tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        ids = [i for i in self.stages[0].get_label_ids(class_labels) for _ in range(num_images_per_prompt)]
        x, alphabar, per_stage = None, None, []
        for k in range(len(STAGES)):
            x, alphabar = self.run_stage(k, ids, x, alphabar, generator)
            per_stage.append(x if alphabar is None else (x / 2 + 0.5).clamp(0, 1))
        images = [self.to_output(y, output_type) for y in per_stage]
        if not return_dict:
            return (images[-1], images) if return_all_stages else (images[-1],)
        return CDMCascadePipelineOutput(images=images[-1], stage_images=images if return_all_stages else None)

    def run_stage(self, k: int, ids: list[int], x, alphabar, generator):
        """Stage k with its settings: the base stage on the labels; an SR stage on the previous output
        (in [0, 1], noised to its augmentation level), or on its noisy z_s handed over (truncated)."""
        stage, s = self.stages[k], self.stage_settings(STAGES[k])
        self.use_scheduler(stage, s.get("scheduler"))
        truncate = self.truncation_alphabar(k)
        common = {
            "num_inference_steps": s["steps"],
            "guidance_scale": s["guidance_scale"],
            "generator": generator,
            "output_type": "pt" if truncate is None else "latent",  # [0, 1], or a truncated z_s
            "truncate_alphabar": truncate,
        }
        if k == 0:
            out = stage(ids, **common)
            return out.images, out.alphabar
        handed_over = alphabar is not None
        level = s["aug_level"]
        if handed_over:  # the level whose alphabar is closest to where the previous stage stopped
            level = int((stage.image_noising_scheduler.alphas_cumprod - alphabar).abs().argmin())
        out = stage(
            x,
            class_labels=ids if stage.num_classes else None,
            noise_level=level,
            low_res_is_augmented=handed_over,
            **common,
        )
        return out.images, out.alphabar

    @staticmethod
    def to_output(image: torch.Tensor, output_type: str):
        """A (B, 3, H, W) batch in [0, 1] as "pt" (unchanged), "np" (B, H, W, 3) or PIL images."""
        if output_type == "pt":
            return image
        array = image.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in array]
