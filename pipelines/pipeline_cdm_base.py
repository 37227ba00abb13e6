# Copyright the cdm authors. Licensed under the Apache License, Version 2.0.
"""Class-conditional base stage of a Cascaded Diffusion Model (Ho et al., arXiv 2106.15282).

This file is self-contained: it imports only torch, numpy, PIL and diffusers, so it can be
uploaded next to the weights. Plain diffusers runs it only when the user opts in with the
`trust_remote_code` argument of `DiffusionPipeline.from_pretrained` (the model card shows the
exact call); cdm loads such a folder with its installed copy of this file and never runs the
folder's. Once loaded::

    image = pipe(class_labels=[7], num_inference_steps=50).images[0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class CDMBasePipelineOutput(BaseOutput):
    """Output of a cascade stage.

    Args:
        images: PIL images, a numpy array (B, H, W, 3) in [0, 1], or a tensor (B, 3, H, W) in [-1, 1].
        alphabar: `None` for finished samples. For a truncated run (`truncate_alphabar`), the
            signal level alphabar_s of the returned noisy sample z_s.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    alphabar: float | None = None


def cfg_combine(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u) on a [cond; null] batch."""
    cond, uncond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def to_output_type(sample: torch.Tensor, output_type: str):
    """Map a [-1, 1] tensor batch to "pt" (unchanged), "np" (B, H, W, C in [0, 1]) or "pil"."""
    if output_type == "pt":
        return sample
    array = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in array]


class CDMBasePipeline(DiffusionPipeline):
    r"""Class-conditional pixel-space generator: the first stage of a cascade.

    The UNet carries `num_classes + 1` class embeddings; the last id is the null label used
    for classifier-free guidance (the model is trained with label dropout to that id).

    Args:
        unet (`UNet2DModel`): denoiser with `num_class_embeds = num_classes + 1`.
        scheduler (`SchedulerMixin`): any diffusers noise scheduler.
        id2label (`dict`, *optional*): class id (as a string key, since it is stored in JSON) to a
            human-readable name. Saved in `model_index.json`, so it survives `save_pretrained`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler, id2label: dict | None = None):
        super().__init__()
        if unet.config.num_class_embeds is None or unet.config.num_class_embeds < 2:
            raise ValueError(
                f"unet.config.num_class_embeds={unet.config.num_class_embeds}: a class-conditional base "
                "stage needs num_classes + 1 >= 2 embeddings (the last one is the null label)"
            )
        num_classes = unet.config.num_class_embeds - 1
        id2label = {str(k): str(v) for k, v in (id2label or {}).items()}
        bad = [k for k in id2label if not k.isdigit() or int(k) >= num_classes]
        if bad:
            raise ValueError(f"id2label has ids {bad} outside 0..{num_classes - 1}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(id2label=id2label)

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config.id2label.items()}

    def get_label_ids(self, label: int | str | list[int | str]) -> list[int]:
        """Map class ids or label names (case-insensitive, any of the comma-separated synonyms) to ids."""
        names = {}
        for i, text in self.labels.items():
            for name in text.split(","):
                names.setdefault(name.strip().lower(), i)
        out = []
        for item in label if isinstance(label, (list, tuple)) else [label]:
            if isinstance(item, str) and not item.strip().isdigit():
                key = item.strip().lower()
                if key not in names:
                    known = ", ".join(sorted(names)[:5]) or "none: this model has no label names"
                    raise ValueError(f"unknown class label {item!r}; known labels include: {known}")
                out.append(names[key])
                continue
            idx = int(item)
            if not 0 <= idx < self.num_classes:
                raise ValueError(f"class id {idx} is out of range: expected 0..{self.num_classes - 1}")
            out.append(idx)
        return out

    def check_inputs(self, class_ids, guidance_scale, num_inference_steps, generator, truncate_alphabar):
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: expected an integer >= 1")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale={guidance_scale}: expected >= 1 (1 disables guidance)")
        if isinstance(generator, list) and len(generator) != len(class_ids):
            raise ValueError(
                f"got {len(generator)} generators for {len(class_ids)} images: expected one per image"
            )
        if truncate_alphabar is not None and not 0 < truncate_alphabar <= 1:
            raise ValueError(f"truncate_alphabar={truncate_alphabar}: expected a value in (0, 1]")

    def prepare_latents(self, batch_size, generator, latents):
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}: expected {shape}")
        return latents.to(self.device) * self.scheduler.init_noise_sigma

    def alphabar_at(self, t) -> float:
        return float(self.scheduler.alphas_cumprod[int(round(float(t)))])

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        truncate_alphabar: float | None = None,
    ):
        r"""Generate one image per class label.

        Args:
            class_labels: a class id, a label name, or a list of either; one image each.
            guidance_scale: classifier-free guidance weight w; 1 runs only the conditional pass.
            num_inference_steps: reverse-process steps.
            generator: a `torch.Generator`, or a list with one per image for per-image seeds.
            latents: optional initial noise of shape (B, C, H, W).
            output_type: "pil", "np" (values in [0, 1]) or "pt" (values in [-1, 1], for the next stage).
            return_dict: return a `CDMBasePipelineOutput` rather than a tuple.
            callback_on_step_end: called as `fn(pipe, i, t, {"latents": x})` after each step; may
                return a dict with replacement "latents".
            truncate_alphabar: CDM's truncated conditioning augmentation. Stop the reverse process at
                the first timestep whose alphabar is >= this value, and return the noisy z_s as a
                variance-preserving tensor (not clipped) with its alphabar in the output.
        """
        # 1. Check inputs
        class_ids = self.get_label_ids(class_labels)
        self.check_inputs(class_ids, guidance_scale, num_inference_steps, generator, truncate_alphabar)
        do_cfg = guidance_scale > 1.0

        # 2. Class labels: one batch of [cond; null] when guiding, so the UNet runs once per step
        labels = torch.tensor(class_ids, device=self.device)
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class_id)])

        # 3. Timesteps and initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(len(class_ids), generator, latents)
        alphabar = None

        # 4. Denoising loop
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(model_input, t, class_labels=labels).sample
            if do_cfg:
                model_output = cfg_combine(model_output, guidance_scale)
            latents = self.scheduler.step(model_output, t, latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)
            # 5. Truncation: hand over z_s once the next timestep is at or below level s
            if truncate_alphabar is not None and i + 1 < len(timesteps):
                t_next = timesteps[i + 1]
                if self.alphabar_at(t_next) >= truncate_alphabar:
                    alphabar = self.alphabar_at(t_next)
                    latents = self.scheduler.scale_model_input(
                        latents, t_next
                    )  # VP form for sigma schedulers
                    break

        # 6. Post-process
        if alphabar is None:
            latents = latents.clamp(-1, 1)
        elif output_type != "pt":
            raise ValueError(f"output_type={output_type!r}: a truncated run returns noisy z_s, use 'pt'")
        images = to_output_type(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return CDMBasePipelineOutput(images=images, alphabar=alphabar)
