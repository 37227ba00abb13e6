# Copyright the cdm authors. Licensed under the Apache License, Version 2.0.
"""SR3 super-resolution stage (Saharia et al., arXiv 2104.07636) with CDM conditioning augmentation.

This file is self-contained: it imports only torch, numpy, PIL and diffusers, so it can be
uploaded next to the weights. Plain diffusers runs it only when the user opts in with the
`trust_remote_code` argument of `DiffusionPipeline.from_pretrained` (the model card shows the
exact call); cdm loads such a folder with its installed copy of this file and never runs the
folder's. Once loaded::

    big = pipe(image=small_pil, noise_level=100, num_inference_steps=50).images[0]

Conditioning. The low-res image is upsampled (bicubic) to the output size, noised to the
augmentation level s with `image_noising_scheduler` (`augment_low_res`, the same function that
training uses; with `noise_at_low_res` the noise is added before upsampling, as in CDM), and
concatenated to the noisy sample, so the UNet takes 6 input channels.
The level s reaches the UNet through `timestep_cond`: a sinusoidal embedding of s
(`level_embedding`) that `UNet2DConditionModel` projects (`time_cond_proj_dim`) and adds to the
timestep embedding. That leaves the model's `class_labels` input free for an optional class
label, so one stock diffusers model carries both, with no cross-attention blocks.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

EXAMPLE_DOC_STRING = """
    Examples:

    ```py
    >>> import PIL.Image
    >>> from cdm_pipelines import SR3Pipeline
    >>> pipe = SR3Pipeline.from_pretrained("cdm/photo_sr4x")  # a 4x residual photo stage
    >>> small = PIL.Image.open("photo.png").convert("RGB")
    >>> sharp = pipe(small, noise_level=0, num_inference_steps=1, tile_size=256).images[0]
    >>> detailed = pipe(small, noise_level=0, num_inference_steps=20, tile_size=256).images[0]
    ```
"""


@dataclass
class SR3PipelineOutput(BaseOutput):
    """Output of an SR stage.

    Args:
        images: PIL images, a numpy array (B, H, W, 3) in [0, 1], a tensor (B, 3, H, W) in [0, 1]
            ("pt"), or the raw sample ("latent").
        alphabar: `None` for finished samples; for a truncated run, the alphabar of the returned z_s.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    alphabar: float | None = None


def level_embedding(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the augmentation level s (Transformer/DDPM timestep embedding)."""
    return get_timestep_embedding(level.float().flatten(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def augment_low_res(x_lr, size, level, noising_scheduler, generator=None, at_low_res=False) -> torch.Tensor:
    """CDM Gaussian conditioning augmentation: z = sqrt(ab_s) x + sqrt(1-ab_s) eps, and bicubic upsampling.

    By default the image is upsampled first and the noise is white at the output size. With
    `at_low_res` the noise is added at the input size and upsampled with the image, as CDM defines it;
    that is what a truncated handover (the previous stage's noisy z_s) looks like.
    `level` is an int or a (B,) tensor of integer levels s; s = 0 means no noise at all. `generator`
    may be a list with one generator per sample. Training and sampling both call this function.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = (
        x_lr.float()
        if at_low_res
        else F.interpolate(x_lr.float(), size=size, mode="bicubic", align_corners=False)
    )
    s = torch.as_tensor(level, device=x.device).long().expand(x.shape[0])
    eps = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noised = torch.where((s > 0).view(-1, 1, 1, 1), noising_scheduler.add_noise(x, eps, s.clamp(min=0)), x)
    if at_low_res:
        return F.interpolate(noised, size=size, mode="bicubic", align_corners=False)
    return noised


# Copied from cdm_pipelines.pipeline_cdm_base.cfg_combine
def cfg_combine(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u) on a [cond; null] batch."""
    cond, uncond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# Copied from cdm_pipelines.pipeline_cdm_base.to_output_type
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


# Copied from cdm_pipelines.pipeline_cdm_base.step_kwargs
def step_kwargs(scheduler, generator, eta: float | None = None) -> dict:
    """The optional arguments that this scheduler's `step` accepts (diffusers' prepare_extra_step_kwargs)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in params else {}
    if eta is not None and "eta" in params:
        kwargs["eta"] = eta
    return kwargs


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of overlapping tiles covering 0..n, the last one flush with the end."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def feather(tile: int, overlap: int) -> torch.Tensor:
    """1-D blending weights: a linear ramp over `overlap` pixels at each end, 1 in the middle, never 0."""
    i = torch.arange(tile, dtype=torch.float32)
    return (torch.minimum(i + 1, tile - i).clamp(max=overlap + 1)) / (overlap + 1)


def image_to_tensor(image, raw: bool = False) -> torch.Tensor:
    """PIL image(s), numpy (H, W, C) or (B, H, W, C) in [0, 1], or tensor(s) (C, H, W) or (B, C, H, W) in
    [0, 1] -> (B, 3, H, W) in the model's [-1, 1]. `raw`: a tensor already in the model's range, as is."""
    if isinstance(image, list) and image and all(isinstance(i, torch.Tensor) for i in image):
        image = torch.cat([i.unsqueeze(0) if i.ndim == 3 else i for i in image])
    if isinstance(image, torch.Tensor):
        image = image.unsqueeze(0) if image.ndim == 3 else image
        if raw:
            return image
        lo, hi = (float(v) for v in image.aminmax()) if image.numel() else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise ValueError(
                f"image tensor values span [{lo:.3g}, {hi:.3g}]: expected [0, 1] (a stage's "
                "output_type='pt'); a truncated hand-over passes output_type='latent' with low_res_is_augmented=True"
            )
        return image * 2 - 1
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, list) and all(isinstance(i, PIL.Image.Image) for i in image):
        sizes = {i.size for i in image}
        if len(sizes) > 1:
            raise ValueError(f"images have different sizes {sorted(sizes)}: expected one size per batch")
        image = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in image])
    if isinstance(image, np.ndarray):
        image = image[None] if image.ndim == 3 else image
        return torch.from_numpy(image).float().permute(0, 3, 1, 2) * 2 - 1
    raise ValueError(f"image of type {type(image).__name__}: expected PIL, a list of PIL, numpy or torch")


# Copied from cdm_pipelines.pipeline_cdm_base.check_weight_files
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


# Copied from cdm_pipelines.pipeline_cdm_base.load_components
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


# Copied from cdm_pipelines.pipeline_cdm_base.run_offload_hooks_on_cpu
def run_offload_hooks_on_cpu(pipe) -> None:
    """Sequential offload on CPU: diffusers names the device "cpu:0", and torch moves a parameter to
    "cpu:0" as a copy that is no longer a `Parameter`, which accelerate's hooks then reject. Use "cpu"."""
    modules = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
    for hook in (getattr(m, "_hf_hook", None) for m in modules):
        for h in getattr(hook, "hooks", [hook]):
            if getattr(h, "execution_device", None) is not None:
                h.execution_device = torch.device("cpu")


def check_guide(unet, guide_unet) -> None:
    """An autoguidance guide must take the same inputs and give the same outputs as the UNet."""
    if guide_unet is None:
        return
    keys = ("in_channels", "out_channels", "time_cond_proj_dim", "num_class_embeds")
    for key in keys:
        if guide_unet.config[key] != unet.config[key]:
            raise ValueError(
                f"guide_unet.config.{key}={guide_unet.config[key]}: expected the UNet's, {unet.config[key]}"
            )


class SR3Pipeline(DiffusionPipeline):
    r"""SR3 super-resolution from `low_res_size` to `unet.config.sample_size`.

    Args:
        unet (`UNet2DConditionModel`): 6 input channels (noisy sample + upsampled low-res),
            `time_cond_proj_dim` set for the augmentation level, and optionally
            `num_class_embeds = num_classes + 1` (last id = null label) for class conditioning.
        scheduler (`SchedulerMixin`): any diffusers noise scheduler for the reverse process.
        image_noising_scheduler (`DDPMScheduler`): the forward process used for conditioning
            augmentation; its `num_train_timesteps` bounds `noise_level`.
        guide_unet (`UNet2DConditionModel`, *optional*): a weaker UNet of the same inputs and
            outputs, for autoguidance (`autoguidance_scale`).
        low_res_size (`int`): the input resolution the stage was built for.
        id2label (`dict`, *optional*): class id (string key) to name, for class-conditional stages.
        residual (`bool`): the diffused sample is the residual over the bicubic upsample of the clean
            low-res input, times `residual_scale` (SRDiff, Li et al. 2022); the image is
            `upsample + sample / residual_scale`. `False`: the sample is the whole image (SR3).
        residual_scale (`float`): brings the small residual closer to unit scale for the schedule.
        noise_at_low_res (`bool`): conditioning augmentation adds its noise to the low-res input before
            upsampling (CDM), rather than to the upsampled image. Only such a stage can take a truncated
            handover, whose noise is the previous stage's, at the low resolution.

    Call arguments (`pipe(image, ...)`):
        image: PIL image, list of PIL, numpy (B, H, W, 3) in [0, 1], or a tensor (B, 3, H, W) or list
            of tensors in [0, 1], as diffusers' image processors read them; values outside [0, 1] are
            refused. With `low_res_is_augmented`, the previous stage's noisy z_s (`output_type="latent"`).
        class_labels: class id(s) for a class-conditional stage; `None` otherwise.
        noise_level: augmentation level s in 0..`image_noising_scheduler.num_train_timesteps - 1`;
            0 feeds the clean upsampled image.
        num_inference_steps: reverse-process steps.
        guidance_scale: classifier-free guidance on the class label (class-conditional stages).
        generator: a `torch.Generator`, or a list with one per image.
        output_type: "pil", "np" (values in [0, 1]), "pt" (a tensor in [0, 1]) or "latent" (the raw
            sample: for a residual stage the scaled residual; for a truncated run the noisy z_s).
        return_dict: return an `SR3PipelineOutput` rather than a tuple.
        latents: optional initial noise at the output size.
        num_images_per_prompt: samples per input image; the batch is each image repeated this often.
        callback_on_step_end: called as `fn(pipe, i, t, callback_kwargs)` after each step, with
            the tensors named in `callback_on_step_end_tensor_inputs`; may return replacements.
            Setting `pipe._interrupt = True` inside it stops the loop.
        callback_on_step_end_tensor_inputs: tensor names passed to the callback (default ["latents"]).
        eta: DDIM's eta, for schedulers whose `step` takes it (0 is deterministic DDIM).
        truncate_alphabar: stop at the first timestep whose alphabar >= this value and return
            the noisy z_s (CDM truncated conditioning augmentation for the next stage).
        low_res_is_augmented: the image is already z_s from a truncated previous stage at level
            `noise_level`; upsample it but add no further noise.
        allow_any_size: the UNet is fully convolutional; accept inputs other than `low_res_size`.
        tile_size: evaluate the UNet on overlapping tiles of this many output pixels (a multiple of
            the UNet's downsampling factor), so memory does not grow with the image; implies
            `allow_any_size`.
        tile_overlap: overlap between tiles, in output pixels.
        autoguidance_scale: with a `guide_unet`, extrapolate each prediction away from the guide's,
            `guide + w (unet - guide)` (autoguidance, Karras et al. 2024); 1 (the default) runs the
            UNet alone. The guide, a smaller and shorter-trained model of the same task, errs in the
            same directions as the UNet but more, so the extrapolation puts back detail that both
            smooth away. It costs one guide evaluation per step.
    """

    model_cpu_offload_seq = "unet->guide_unet"
    _optional_components = ["guide_unet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler,
        image_noising_scheduler,
        low_res_size: int = 64,
        id2label: dict | None = None,
        residual: bool = False,
        residual_scale: float = 1.0,
        noise_at_low_res: bool = False,
        guide_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        check_guide(unet, guide_unet)
        if unet.config.in_channels != 2 * unet.config.out_channels:
            raise ValueError(
                f"unet.config.in_channels={unet.config.in_channels}: an SR3 UNet takes the noisy sample and "
                f"the upsampled image, expected {2 * unet.config.out_channels}"
            )
        if not unet.config.time_cond_proj_dim:
            raise ValueError("unet.config.time_cond_proj_dim is not set: it carries the augmentation level")
        if unet.config.sample_size % low_res_size:
            raise ValueError(
                f"low_res_size={low_res_size} does not divide the output size {unet.config.sample_size}"
            )
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            image_noising_scheduler=image_noising_scheduler,
            guide_unet=guide_unet,
        )
        if not residual_scale > 0:
            raise ValueError(f"residual_scale={residual_scale}: expected a value > 0")
        self.register_to_config(
            low_res_size=int(low_res_size),
            id2label={str(k): str(v) for k, v in (id2label or {}).items()},
            residual=bool(residual),
            residual_scale=float(residual_scale),
            noise_at_low_res=bool(noise_at_low_res),
        )

    @property
    def num_classes(self) -> int:
        n = self.unet.config.num_class_embeds
        return 0 if n is None else n - 1

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
        return {
            **super().components,
            **{
                k: self.config[k]
                for k in ("low_res_size", "id2label", "residual", "residual_scale", "noise_at_low_res")
            },
        }

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda"):
        """diffusers' sequential offload, which also runs on CPU (see `run_offload_hooks_on_cpu`)."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if torch.device(device).type == "cpu":
            run_offload_hooks_on_cpu(self)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def autoguidance_scale(self) -> float:
        return getattr(self, "_autoguidance_scale", 1.0)

    def check_autoguidance(self, scale: float) -> float:
        if not scale >= 1:
            raise ValueError(f"autoguidance_scale={scale}: expected >= 1 (1 runs the UNet alone)")
        if scale > 1 and self.guide_unet is None:
            raise ValueError(
                f"autoguidance_scale={scale}: this stage has no guide_unet; expected 1, or a stage with a guide"
            )
        return float(scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def scale_factor(self) -> int:
        return self.unet.config.sample_size // self.config.low_res_size

    @property
    def max_noise_level(self) -> int:
        return self.image_noising_scheduler.config.num_train_timesteps - 1

    def check_inputs(self, x, class_ids, noise_level, steps, guidance_scale, generator, allow_any_size):
        lr = self.config.low_res_size
        h, w = x.shape[-2:]
        if allow_any_size:
            mult = 2 ** (len(self.unet.config.block_out_channels) - 1)
            if (h * self.scale_factor) % mult or (w * self.scale_factor) % mult:
                raise ValueError(
                    f"image size {w}x{h}: each side times {self.scale_factor} must be a multiple of {mult}"
                )
        elif (h, w) != (lr, lr):
            raise ValueError(f"image size {w}x{h} does not match this stage's input: expected {lr}x{lr}")
        if x.shape[1] != self.unet.config.out_channels:
            raise ValueError(f"image has {x.shape[1]} channels: expected {self.unet.config.out_channels}")
        if not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(
                f"noise_level={noise_level} is outside the noising schedule 0..{self.max_noise_level}"
            )
        if steps < 1:
            raise ValueError(f"num_inference_steps={steps}: expected an integer >= 1")
        if guidance_scale < 1 or (guidance_scale > 1 and self.num_classes == 0):
            raise ValueError(
                f"guidance_scale={guidance_scale}: expected >= 1, and exactly 1 for a stage without a null class label"
            )
        if class_ids is not None:
            if self.num_classes == 0:
                raise ValueError("class_labels given, but this SR stage is not class-conditional")
            bad = [c for c in class_ids if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"class id {bad[0]} is out of range: expected 0..{self.num_classes - 1}")
            if len(class_ids) != x.shape[0]:
                raise ValueError(f"got {len(class_ids)} class labels for {x.shape[0]} images")
        elif self.num_classes:
            raise ValueError(
                f"this SR stage is class-conditional: pass class_labels in 0..{self.num_classes - 1}"
            )
        if isinstance(generator, list) and len(generator) != x.shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for {x.shape[0]} images: expected one per image"
            )

    def alphabar_at(self, t) -> float:
        return float(self.scheduler.alphas_cumprod[int(round(float(t)))])

    def predict(self, x, t, labels, s_emb, tile_size=None, tile_overlap=0):
        """UNet prediction, on overlapping tiles blended with linear ramps when `tile_size` is set.

        Blending the predictions at every step (as in MultiDiffusion, Bar-Tal et al. 2023) keeps one
        shared sample, so tiles agree and leave no seams; memory is bounded by the tile size.
        """
        h, w = x.shape[-2:]
        if tile_size is None or (h <= tile_size and w <= tile_size):
            return self.model_output(x, t, labels, s_emb)
        out = torch.zeros((x.shape[0], self.unet.config.out_channels, h, w), device=x.device, dtype=x.dtype)
        total = torch.zeros((1, 1, h, w), device=x.device, dtype=x.dtype)
        ramp = feather(tile_size, tile_overlap).to(x.device, x.dtype)
        for top in tile_starts(h, tile_size, tile_overlap):
            for left in tile_starts(w, tile_size, tile_overlap):
                th, tw = min(tile_size, h), min(tile_size, w)
                crop = (..., slice(top, top + th), slice(left, left + tw))
                weight = ramp[:th, None] * ramp[None, :tw]
                out[crop] += self.model_output(x[crop], t, labels, s_emb) * weight
                total[crop] += weight
        return out / total

    def model_output(self, x, t, labels, s_emb) -> torch.Tensor:
        """The UNet's prediction; with autoguidance, extrapolated away from the guide's: g + w (d - g)."""
        kwargs = {"encoder_hidden_states": None, "class_labels": labels, "timestep_cond": s_emb}
        out = self.unet(x, t, **kwargs).sample
        if self.autoguidance_scale == 1.0:
            return out
        guide = self.guide_unet(x.to(self.guide_unet.dtype), t, **kwargs).sample.to(out.dtype)
        return guide + self.autoguidance_scale * (out - guide)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image,
        class_labels: int | list[int] | None = None,
        noise_level: int = 100,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        eta: float = 0.0,
        truncate_alphabar: float | None = None,
        low_res_is_augmented: bool = False,
        allow_any_size: bool = False,
        tile_size: int | None = None,
        tile_overlap: int = 32,
        autoguidance_scale: float = 1.0,
    ):
        r"""Super-resolve a batch of images; the arguments are described in the class docstring.

        Examples:
        """
        # checks, conditioning (upsampled input noised to level s), initial noise, denoising, output
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        tiles, handover = (tile_size, tile_overlap), (low_res_is_augmented, truncate_alphabar is not None)
        self.check_call(num_images_per_prompt, tensor_inputs, output_type, tiles, handover)
        x_lr, ids, size = self.prepare_low_res(
            image, class_labels, num_images_per_prompt, low_res_is_augmented
        )
        self._guidance_scale, self._interrupt = guidance_scale, False
        self._autoguidance_scale = self.check_autoguidance(autoguidance_scale)
        any_size = allow_any_size or tile_size is not None  # tiles: any size
        self.check_inputs(x_lr, ids, noise_level, num_inference_steps, guidance_scale, generator, any_size)
        cond, s_emb, labels = self.prepare_conditioning(
            x_lr, size, ids, noise_level, low_res_is_augmented, generator
        )
        latents = self.prepare_latents((x_lr.shape[0], *size), num_inference_steps, generator, latents)
        step = (cond, labels, s_emb, step_kwargs(self.scheduler, generator, eta), tiles)
        latents, alphabar = self.denoise(
            latents, step, (callback_on_step_end, tensor_inputs), truncate_alphabar
        )
        images = self.postprocess(latents, x_lr, size, alphabar, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SR3PipelineOutput(images=images, alphabar=alphabar)

    def prepare_latents(self, shape: tuple, num_inference_steps: int, generator, latents=None):
        """Set the timesteps and return the initial noise (B, C, H, W), scaled for the scheduler."""
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        shape = (shape[0], self.unet.config.out_channels, *shape[1:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        return latents.to(device) * self.scheduler.init_noise_sigma

    def check_call(self, num_images_per_prompt, tensor_inputs, output_type, tiles, handover):
        """Checks of the call's own arguments, before any work (the input image: `check_inputs`).
        `handover`: (takes a truncated z_s as input, stops early to hand one over)."""
        tile_size, tile_overlap = tiles
        takes_handover, gives_handover = handover
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt}: expected an integer >= 1")
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}: expected names from {self._callback_tensor_inputs}"
            )
        to_output_type(torch.zeros(0, 3, 1, 1), output_type)  # an unknown output_type fails before work
        if tile_size is not None:
            mult = 2 ** (len(self.unet.config.block_out_channels) - 1)
            if tile_size < mult or tile_size % mult:
                raise ValueError(f"tile_size={tile_size}: expected a positive multiple of {mult}")
            if not 0 <= tile_overlap < tile_size:
                raise ValueError(
                    f"tile_overlap={tile_overlap}: expected 0 <= overlap < tile_size={tile_size}"
                )
        if self.config.residual and (takes_handover or gives_handover):
            raise ValueError(
                "a residual SR stage adds its output to the upsampled clean input: truncated "
                "conditioning augmentation (low_res_is_augmented, truncate_alphabar) is not supported"
            )
        if takes_handover and not self.config.noise_at_low_res:
            raise ValueError(
                "low_res_is_augmented=True: this stage was trained with its augmentation noise added after "
                "upsampling, and a truncated handover's noise is the previous stage's, at the low resolution; "
                "expected a stage trained with noise_at_low_res=True"
            )

    def prepare_low_res(self, image, class_labels, num_images_per_prompt: int, raw: bool = False):
        """The input batch as a tensor in [-1, 1], each image (and its label) repeated per prompt,
        and the output size. `raw`: a handed-over z_s, already in the model's range."""
        x_lr = image_to_tensor(image, raw).to(self._execution_device)
        x_lr = x_lr.repeat_interleave(num_images_per_prompt, dim=0)
        size = (x_lr.shape[-2] * self.scale_factor, x_lr.shape[-1] * self.scale_factor)
        if class_labels is None:
            return x_lr, None, size
        labels = class_labels if isinstance(class_labels, (list, tuple)) else [class_labels]
        return x_lr, [int(c) for c in labels for _ in range(num_images_per_prompt)], size

    def prepare_conditioning(self, x_lr, size, class_ids, noise_level: int, already_noised: bool, generator):
        """The UNet's extra input channels, level embedding and labels (doubled for guidance). An input
        already noised to `noise_level` (truncated handover) is upsampled without further noise."""
        device, level = x_lr.device, 0 if already_noised else noise_level
        cond = augment_low_res(
            x_lr, size, level, self.image_noising_scheduler, generator, self.config.noise_at_low_res
        )
        cond = cond.to(self.unet.dtype)
        s = torch.full((x_lr.shape[0],), noise_level, device=device)
        s_emb = level_embedding(s, self.unet.config.time_cond_proj_dim).to(device, self.unet.dtype)
        labels = None if class_ids is None else torch.tensor(class_ids, device=device)
        if self.guidance_scale > 1.0:
            cond, s_emb = torch.cat([cond] * 2), torch.cat([s_emb] * 2)
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        return cond, s_emb, labels

    def denoise(self, latents, step, callback, truncate_alphabar):
        """The reverse process; for truncation, hand over z_s once the next timestep is at or below level s.

        Returns the sample and, for a truncated run, the alphabar it stopped at (else None).
        """
        cond, labels, s_emb, extra, (tile_size, tile_overlap) = step
        callback_fn, tensor_inputs = callback
        timesteps, do_cfg = self.scheduler.timesteps, self.guidance_scale > 1.0
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                break
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = torch.cat([self.scheduler.scale_model_input(model_input, t), cond], dim=1)
            model_output = self.predict(model_input, t, labels, s_emb, tile_size, tile_overlap)
            if do_cfg:
                model_output = cfg_combine(model_output, self.guidance_scale)
            latents = self.scheduler.step(model_output, t, latents, **extra).prev_sample
            if callback_fn is not None:
                available = {"latents": latents}
                outputs = callback_fn(self, i, t, {k: available[k] for k in tensor_inputs}) or {}
                latents = outputs.get("latents", latents)
            if truncate_alphabar is not None and i + 1 < len(timesteps):
                t_next = timesteps[i + 1]
                if self.alphabar_at(t_next) >= truncate_alphabar:
                    return self.scheduler.scale_model_input(latents, t_next), self.alphabar_at(t_next)
        return latents, None

    def postprocess(self, latents, x_lr, size, alphabar, output_type: str):
        """A residual stage adds the sample to the clean upsampled input; "latent" returns the raw sample
        (for a residual stage, the scaled residual); a truncated run returns the noisy z_s, unclamped."""
        if output_type != "latent" and self.config.residual:
            base = augment_low_res(x_lr, size, 0, self.image_noising_scheduler)
            latents = base.to(latents.dtype) + latents / self.config.residual_scale
        if alphabar is None and output_type != "latent":
            latents = latents.clamp(-1, 1)
        elif alphabar is not None and output_type != "latent":
            raise ValueError(f"output_type={output_type!r}: a truncated run returns noisy z_s, use 'latent'")
        return to_output_type(latents, output_type)
