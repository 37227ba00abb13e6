# Copyright the cdm authors. Licensed under the Apache License, Version 2.0.
"""Class-conditional base stage of a Cascaded Diffusion Model (Ho et al., arXiv 2106.15282).

This file is self-contained: it imports only torch, numpy, PIL and diffusers, so it can be
uploaded next to the weights. Plain diffusers runs it only when the user opts in with the
`trust_remote_code` argument of `DiffusionPipeline.from_pretrained` (the model card shows the
exact call); cdm loads such a folder with its installed copy of this file and never runs the
folder's. Once loaded::

    image = pipe(class_labels=[7]).images[0]

A call samples with the stage's tuned settings (its `scheduler/` and the `call_defaults` of its
`model_index.json`); any of them can be given per call instead.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

EXAMPLE_DOC_STRING = """
    Examples:

    ```py
    >>> from cdm_pipelines import CDMBasePipeline
    >>> pipe = CDMBasePipeline.from_pretrained("cdm/demo_cascade/base64")
    >>> images = pipe(class_labels=["seven", 3], num_images_per_prompt=2, guidance_scale=4.0).images
    >>> len(images)
    4
    ```
"""


@dataclass
class CDMBasePipelineOutput(BaseOutput):
    """Output of a cascade stage.

    Args:
        images: PIL images, a numpy array (B, H, W, 3) in [0, 1], a tensor (B, 3, H, W) in [0, 1]
            ("pt"), or the raw sample in the model's [-1, 1] range ("latent").
        alphabar: `None` for finished samples. For a truncated run (`truncate_alphabar`), the
            signal level alphabar_s of the returned noisy sample z_s.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    alphabar: float | None = None


def cfg_combine(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u) on a [cond; null] batch."""
    cond, uncond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def to_output_type(sample: torch.Tensor, output_type: str):
    """Map a sample in the model's [-1, 1] range to "latent" (unchanged), "pt" (B, 3, H, W in [0, 1]),
    "np" (B, H, W, 3 in [0, 1]) or "pil", as diffusers' image processors do."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    if output_type == "latent":
        return sample
    image = (sample / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in array]


def step_kwargs(scheduler, generator, eta: float | None = None) -> dict:
    """The optional arguments that this scheduler's `step` accepts (diffusers' prepare_extra_step_kwargs)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in params else {}
    if eta is not None and "eta" in params:
        kwargs["eta"] = eta
    return kwargs


def check_number(name: str, value, lo=None, hi=None, integer: bool = False):
    """One rule for every number a caller passes: of the right kind, finite, within [lo, hi]. Returns it
    as int or float; raises ValueError naming the value and what was expected."""
    if integer:
        hi = 2**63 - 1 if hi is None else hi  # a torch.Generator seed and an index must fit in 64 bits
        lo = -(2**63) if lo is None else lo
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and lo <= value <= hi
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if ok:
        return int(value) if integer else float(value)
    kind = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None and (not integer or hi < 2**63 - 1):
        where = f" in {lo}..{hi}"
    elif lo is not None and lo > -(2**63):
        where = f" >= {lo}"
    else:
        where = f" <= {hi}" if hi is not None and hi < 2**63 - 1 else ""
    raise ValueError(f"{name}={value!r}: expected {kind}{where}")


def merge_call_defaults(library: dict, stored: dict | None, given: dict) -> dict:
    """The call's settings: each argument the caller gave, else the folder's tuned default, else the
    library's. Unknown keys in the folder's defaults are refused."""
    stored = dict(stored or {})
    unknown = sorted(set(stored) - set(library))
    if unknown:
        raise ValueError(f"call_defaults has unknown keys {unknown}: expected keys from {sorted(library)}")
    return {k: given[k] if given.get(k) is not None else stored.get(k, v) for k, v in library.items()}


def check_weight_files(folder: Path) -> None:
    """Weights load from safetensors only: no pickle-based files, and shard indexes name only .safetensors."""
    pickled = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
    )
    if pickled:
        raise ValueError(
            f"{folder}: {pickled[0]} is a pickle-based weights file; only .safetensors files are loaded"
        )
    for index in folder.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        odd = sorted(s for s in shards if not str(s).endswith(".safetensors") or "/" in s or "\\" in s)
        if odd:
            raise ValueError(f"{index}: shard {odd[0]!r} is not a .safetensors file beside it")


def load_components(cls, folder: Path, torch_dtype=None) -> dict:
    """`__init__` arguments from a pipeline folder: stock diffusers models (safetensors only) and schedulers."""
    index = json.loads((folder / "model_index.json").read_text())
    params = inspect.signature(cls.__init__).parameters
    init = {}
    for key, value in index.items():
        if key.startswith("_") or key not in params:
            continue
        if not (isinstance(value, list) and len(value) == 2):
            init[key] = value
            continue
        if value == [None, None]:  # an optional component, saved as absent
            init[key] = None
            continue
        library, name = value
        component = getattr(diffusers, name, None) if library == "diffusers" else None
        if component is None or not name.endswith(("Model", "Scheduler")):
            raise ValueError(
                f"{folder}/model_index.json: {key} is {value}, not a diffusers model or scheduler"
            )
        if name.endswith("Model"):
            check_weight_files(folder / key)
        kwargs = {} if name.endswith("Scheduler") else {"use_safetensors": True, "torch_dtype": torch_dtype}
        init[key] = component.from_pretrained(folder, subfolder=key, **kwargs)
    return init


def run_offload_hooks_on_cpu(pipe) -> None:
    """Sequential offload on CPU: diffusers names the device "cpu:0", and torch moves a parameter to
    "cpu:0" as a copy that is no longer a `Parameter`, which accelerate's hooks then reject. Use "cpu"."""
    modules = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
    for hook in (getattr(m, "_hf_hook", None) for m in modules):
        for h in getattr(hook, "hooks", [hook]):
            if getattr(h, "execution_device", None) is not None:
                h.execution_device = torch.device("cpu")


# The call's library defaults; a stage folder's `call_defaults` (model_index.json) replaces any of them
# with the values tuned for that stage, so that `pipe(class_labels)` samples as the stage was meant to.
BASE_CALL_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 1.0, "eta": 0.0}


class CDMBasePipeline(DiffusionPipeline):
    r"""Class-conditional pixel-space generator: the first stage of a cascade.

    The UNet carries `num_classes + 1` class embeddings; the last id is the null label used
    for classifier-free guidance (the model is trained with label dropout to that id).

    Args:
        unet (`UNet2DModel`): denoiser with `num_class_embeds = num_classes + 1`.
        scheduler (`SchedulerMixin`): any diffusers noise scheduler.
        id2label (`dict`, *optional*): class id (as a string key, since it is stored in JSON) to a
            human-readable name. Saved in `model_index.json`, so it survives `save_pretrained`.
        call_defaults (`dict`, *optional*): the stage's tuned values for any of the call arguments
            `num_inference_steps`, `guidance_scale` and `eta`. Stored in `model_index.json`, so plain
            diffusers reads them too: an argument left out of a call takes its value from here.

    Call arguments (`pipe(class_labels, ...)`); those left as `None` take the stage's `call_defaults`:
        class_labels: a class id, a label name, or a list of either; one image each.
        guidance_scale: classifier-free guidance weight w; 1 runs only the conditional pass.
        num_inference_steps: reverse-process steps.
        num_images_per_prompt: images per class label; the batch is each label repeated this often.
        generator: a `torch.Generator`, or a list with one per image for per-image seeds.
        latents: optional initial noise of shape (B, C, H, W).
        output_type: "pil", "np" (values in [0, 1]), "pt" (a tensor in [0, 1]) or "latent" (the
            sample in the model's [-1, 1] range, unclipped; a truncated run returns its noisy z_s this way).
        return_dict: return a `CDMBasePipelineOutput` rather than a tuple.
        callback_on_step_end: called as `fn(pipe, i, t, callback_kwargs)` after each step, with
            the tensors named in `callback_on_step_end_tensor_inputs`; may return replacements.
            Setting `pipe._interrupt = True` inside it stops the loop.
        callback_on_step_end_tensor_inputs: tensor names passed to the callback (default ["latents"]).
        truncate_alphabar: CDM's truncated conditioning augmentation. Stop the reverse process at
            the first timestep whose alphabar is >= this value, and return the noisy z_s as a
            variance-preserving tensor (not clipped) with its alphabar in the output.
        eta: DDIM's eta, for schedulers whose `step` takes it (0 is deterministic DDIM).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self, unet: UNet2DModel, scheduler, id2label: dict | None = None, call_defaults: dict | None = None
    ):
        super().__init__()
        if unet.config.num_class_embeds is None or unet.config.num_class_embeds < 2:
            raise ValueError(
                f"unet.config.num_class_embeds={unet.config.num_class_embeds}: a class-conditional base "
                "stage needs num_classes + 1 >= 2 embeddings (the last one is the null label)"
            )
        num_classes = unet.config.num_class_embeds - 1
        if not isinstance(id2label, (dict, type(None))):
            raise ValueError(f"id2label={id2label!r}: expected an object of class id -> name")
        id2label = {str(k): str(v) for k, v in (id2label or {}).items()}
        bad = [k for k in id2label if not k.isdigit() or int(k) >= num_classes]
        if bad:
            raise ValueError(f"id2label has ids {bad} outside 0..{num_classes - 1}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(id2label=id2label, call_defaults=dict(call_defaults or {}))
        self.call_settings()  # the stored defaults follow the call's rules

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved stage (a folder or a Hub repo id) with this installed class.

        Components are stock diffusers classes and weights load from safetensors only; the folder's
        own copy of this file is never run, so no `trust_remote_code` is needed. Keyword arguments
        `torch_dtype` and `revision` are understood; any other replaces the stored component or setting.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    revision=kwargs.pop("revision", None),
                    allow_patterns=["*.json", "*.safetensors"],
                )
            )
        init = load_components(cls, folder, kwargs.pop("torch_dtype", None))
        return cls(**{**init, **kwargs})

    @property
    def components(self) -> dict:
        """The modules and the stored settings, so that `type(pipe)(**pipe.components)` rebuilds this pipeline."""
        return {**super().components, **{k: self.config[k] for k in ("id2label", "call_defaults")}}

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda"):
        """diffusers' sequential offload, which also runs on CPU (see `run_offload_hooks_on_cpu`)."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if torch.device(device).type == "cpu":
            run_offload_hooks_on_cpu(self)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

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
            if not isinstance(item, (str, numbers.Integral)) or isinstance(item, bool):
                raise ValueError(f"class label {item!r}: expected a class id or a label name")
            idx = int(item)
            if not 0 <= idx < self.num_classes:
                raise ValueError(f"class id {idx} is out of range: expected 0..{self.num_classes - 1}")
            out.append(idx)
        return out

    def call_settings(self, **given) -> dict:
        """The settings of one call: the given arguments, else this stage's `call_defaults`, checked."""
        settings = merge_call_defaults(BASE_CALL_DEFAULTS, self.config.call_defaults, given)
        return {
            "num_inference_steps": check_number(
                "num_inference_steps", settings["num_inference_steps"], 1, 10_000, integer=True
            ),
            "guidance_scale": check_number("guidance_scale", settings["guidance_scale"], 1, 100),
            "eta": check_number("eta", settings["eta"], 0, 1),
        }

    def check_inputs(self, class_ids, generator, truncate_alphabar, tensor_inputs) -> None:
        """The rules for the inputs of one call (labels, generators, callbacks, truncation)."""
        bad = [k for k in tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}: expected names from {self._callback_tensor_inputs}"
            )
        if isinstance(generator, list) and len(generator) != len(class_ids):
            raise ValueError(
                f"got {len(generator)} generators for {len(class_ids)} images: expected one per image"
            )
        if truncate_alphabar is not None:
            check_number("truncate_alphabar", truncate_alphabar, 1e-9, 1)

    def prepare_latents(self, batch_size, generator, latents):
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}: expected {shape}")
        return latents.to(device) * self.scheduler.init_noise_sigma

    def alphabar_at(self, t) -> float:
        return float(self.scheduler.alphas_cumprod[int(round(float(t)))])

    def prepare_labels(self, class_ids: list[int]) -> torch.Tensor:
        """The labels of one UNet batch: [cond; null] when guiding, so the UNet runs once per step."""
        labels = torch.tensor(class_ids, device=self._execution_device)
        if self.guidance_scale > 1.0:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class_id)])
        return labels

    def denoise(self, latents, labels, step: dict, truncate_alphabar):
        """The denoising loop; with `truncate_alphabar`, it stops at the first timestep whose alpha-bar
        reaches it and returns (z_s, alpha-bar), else (x_0, None). `step` holds the scheduler's extra
        arguments, the step-end callback and the tensors it may read."""
        timesteps, do_cfg = self.scheduler.timesteps, self.guidance_scale > 1.0
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                break
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(model_input, t, class_labels=labels).sample
            if do_cfg:
                model_output = cfg_combine(model_output, self.guidance_scale)
            latents = self.scheduler.step(model_output, t, latents, **step["extra"]).prev_sample
            if step["callback"] is not None:
                available = {"latents": latents}
                chosen = {k: available[k] for k in step["tensor_inputs"]}
                latents = (step["callback"](self, i, t, chosen) or {}).get("latents", latents)
            if truncate_alphabar is not None and i + 1 < len(timesteps):
                t_next = timesteps[i + 1]
                if self.alphabar_at(t_next) >= truncate_alphabar:  # VP form for sigma schedulers
                    return self.scheduler.scale_model_input(latents, t_next), self.alphabar_at(t_next)
        return latents, None

    @staticmethod
    def finish(latents, alphabar, output_type: str):
        """A finished sample clamped to [-1, 1] and converted; a truncated run's z_s only as latents."""
        if output_type == "latent":
            return latents
        if alphabar is not None:
            raise ValueError(f"output_type={output_type!r}: a truncated run returns noisy z_s, use 'latent'")
        return to_output_type(latents.clamp(-1, 1), output_type)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        truncate_alphabar: float | None = None,
        eta: float | None = None,
    ):
        r"""Generate one image per class label; the arguments are described in the class docstring.

        Examples:
        """
        # 1. Check the call: settings (given, else the stage's tuned defaults), labels, output type
        settings = self.call_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta
        )
        check_number("num_images_per_prompt", num_images_per_prompt, 1, 4096, integer=True)
        class_ids = [c for c in self.get_label_ids(class_labels) for _ in range(num_images_per_prompt)]
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(class_ids, generator, truncate_alphabar, tensor_inputs)
        to_output_type(torch.zeros(0, 3, 1, 1), output_type)  # an unknown output_type fails before work
        self._guidance_scale, self._interrupt = settings["guidance_scale"], False

        # 2. Timesteps and the initial noise
        self.scheduler.set_timesteps(settings["num_inference_steps"], device=self._execution_device)
        self._num_timesteps = len(self.scheduler.timesteps)
        latents = self.prepare_latents(len(class_ids), generator, latents)
        extra = step_kwargs(self.scheduler, generator, settings["eta"])

        # 3. Denoising loop (stops early to hand over z_s when truncating, CDM section 3.2)
        step = {"callback": callback_on_step_end, "tensor_inputs": tensor_inputs, "extra": extra}
        latents, alphabar = self.denoise(latents, self.prepare_labels(class_ids), step, truncate_alphabar)

        # 4. Post-process: a finished sample is clamped; a truncated run returns the noisy z_s as is
        images = self.finish(latents, alphabar, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return CDMBasePipelineOutput(images=images, alphabar=alphabar)
