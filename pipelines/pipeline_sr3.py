# Copyright the cdm authors. Licensed under the Apache License, Version 2.0.
"""SR3 super-resolution stage (Saharia et al., arXiv 2104.07636) with CDM conditioning augmentation.

This file is self-contained: it imports only torch, numpy, PIL and diffusers, so it can be
uploaded next to the weights. Plain diffusers runs it only when the user opts in with the
`trust_remote_code` argument of `DiffusionPipeline.from_pretrained` (the model card shows the
exact call); cdm loads such a folder with its installed copy of this file and never runs the
folder's. Once loaded::

    big = pipe(image=small_pil).images[0]

A call samples with the stage's tuned settings (its `scheduler/` and the `call_defaults` of its
`model_index.json`); any of them can be given per call instead.

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
import math
import numbers
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
    >>> import PIL.Image, torch
    >>> from cdm_pipelines import SR3Pipeline
    >>> pipe = SR3Pipeline.from_pretrained("cdm/photo_sr4x")  # a 4x residual photo stage
    >>> small = PIL.Image.open("photo.png").convert("RGB")
    >>> big = pipe(small, generator=torch.Generator().manual_seed(0)).images[0]  # the stage's tuned settings
    >>> detailed = pipe(small, num_inference_steps=20).images[0]  # any setting can be given per call
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


def local_contrast(x_lr: torch.Tensor) -> torch.Tensor:
    """Fine contrast of a low-res batch in [-1, 1], as (B, 1, h, w) in [0, 1] pixel units: the RMS, over
    3x3 pixels, of the grey image minus its Gaussian blur of sigma 0.5 pixel, which keeps only the finest
    octave below the input's Nyquist frequency. Flat regions give about 0, and so do soft ones (out of
    focus, motion blur), whose originals have little detail to restore; sharp edges and texture do not."""
    grey = (x_lr.float().mean(1, keepdim=True) + 1) / 2
    k = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float32, device=x_lr.device) / 0.5) ** 2)
    k = k / k.sum()
    padded = F.pad(grey, (2, 2, 2, 2), mode="replicate")
    blurred = F.conv2d(F.conv2d(padded, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))
    energy = F.avg_pool2d(F.pad((grey - blurred) ** 2, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return energy.sqrt()


def detail_mask(x_lr: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Where a sample keeps its own detail: 1 where the low-res input's local contrast reaches `threshold`,
    falling linearly to 0 where the input is flat; (B, 1, H, W) at the output size."""
    mask = (local_contrast(x_lr) / threshold).clamp(0, 1)
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


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


# Copied from cdm_pipelines.pipeline_cdm_base.check_number
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


# Copied from cdm_pipelines.pipeline_cdm_base.merge_call_defaults
def merge_call_defaults(library: dict, stored: dict | None, given: dict) -> dict:
    """The call's settings: each argument the caller gave, else the folder's tuned default, else the
    library's. Unknown keys in the folder's defaults are refused."""
    stored = dict(stored or {})
    unknown = sorted(set(stored) - set(library))
    if unknown:
        raise ValueError(f"call_defaults has unknown keys {unknown}: expected keys from {sorted(library)}")
    return {k: given[k] if given.get(k) is not None else stored.get(k, v) for k, v in library.items()}


def check_handover(residual: bool, noise_at_low_res: bool, takes: bool, gives: bool = False) -> None:
    """Truncated conditioning augmentation (CDM section 3.2): which SR stages can take a noisy z_s from the
    stage before (`takes`) or stop early to hand one over (`gives`)."""
    if residual and (takes or gives):
        raise ValueError(
            "a residual SR stage adds its output to the upsampled clean input: truncated conditioning "
            "augmentation (aug_mode=truncated, low_res_is_augmented, truncate_alphabar) is not supported"
        )
    if takes and not noise_at_low_res:
        raise ValueError(
            "a truncated handover is noisy at the low resolution, but this stage was trained with its "
            "augmentation noise added after upsampling: expected aug_mode=non-truncated, or a stage trained "
            "with noise_at_low_res=True"
        )


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


# The call's library defaults; a stage folder's `call_defaults` (model_index.json) replaces any of them
# with the values tuned for that stage, so that `pipe(image)` samples as the stage was meant to be used.
SR3_CALL_DEFAULTS = {
    "num_inference_steps": 50,
    "noise_level": 100,
    "guidance_scale": 1.0,
    "autoguidance_scale": 1.0,
    "tile_size": 0,
    "tile_overlap": 32,
    "eta": 0.0,
    "detail_threshold": 0.0,
}


class SR3Pipeline(DiffusionPipeline):
    r"""SR3 super-resolution from `low_res_size` to `unet.config.sample_size`.

    Args:
        unet (`UNet2DConditionModel`): 6 input channels (noisy sample + upsampled low-res),
            `time_cond_proj_dim` set for the augmentation level, and optionally
            `num_class_embeds = num_classes + 1` (last id = null label) for class conditioning.
        scheduler (`SchedulerMixin`): any diffusers noise scheduler for the reverse process; a saved
            stage stores the one it is tuned for.
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
        call_defaults (`dict`, *optional*): the stage's tuned values for any of the call arguments
            `num_inference_steps`, `noise_level`, `guidance_scale`, `autoguidance_scale`, `tile_size`,
            `tile_overlap`, `eta` and `detail_threshold`. Stored in `model_index.json`, so plain diffusers reads them too:
            an argument left out of a call takes its value from here.

    Call arguments (`pipe(image, ...)`); those left as `None` take the stage's `call_defaults`:
        image: PIL image, list of PIL, numpy (B, H, W, 3) in [0, 1], or a tensor (B, 3, H, W) or list
            of tensors in [0, 1] (a previous stage's `output_type="pt"`); values outside [0, 1] are
            refused. With `low_res_is_augmented`, the previous stage's noisy z_s (`output_type="latent"`).
        class_labels: class id(s) for a class-conditional stage; `None` otherwise.
        noise_level: augmentation level s in 0..`image_noising_scheduler.num_train_timesteps - 1`;
            0 feeds the clean upsampled image.
        num_inference_steps: reverse-process steps. 0 samples nothing: the UNet is evaluated once, at the
            last training timestep, on the initial noise's mean (zeros), and its prediction of the clean
            image is returned: the stage's estimate of E[x | low-res], with no noise of its own to
            average out. The highest PSNR and SSIM a stage gives, and the smoothest result (the
            fidelity end); the scheduler and `generator` play no part, and `latents` are refused. For
            v- and sample-prediction stages.
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
        allow_any_size: the UNet is fully convolutional; accept inputs other than `low_res_size`
            (edges are padded by replication to the UNet's stride and cropped off again).
        tile_size: evaluate the UNet on overlapping tiles of this many output pixels (a multiple of
            the UNet's downsampling factor), so memory does not grow with the image; implies
            `allow_any_size`. 0: the whole image at once.
        tile_overlap: overlap between tiles, in output pixels.
        autoguidance_scale: with a `guide_unet`, extrapolate each prediction away from the guide's,
            `guide + w (unet - guide)` (autoguidance, Karras et al. 2024); 1 runs the UNet alone.
            The guide, a smaller and shorter-trained model of the same task, errs in the same
            directions as the UNet but more, so the extrapolation puts back detail that both smooth
            away. It costs one guide evaluation per step.
        detail_threshold: detail that follows the content. Where the low-res input is flat or soft (its
            fine contrast, `local_contrast`, below this value in [0, 1] pixel units), the output fades from
            the sample to the first step's estimate of the image, E[x0 | low-res], which adds no
            texture of its own; at and above it the sample is kept as it is. 0 (the library default)
            keeps the sample everywhere. It costs nothing: the estimate is the first step's prediction.
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
        call_defaults: dict | None = None,
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
        low_res_size = check_number("low_res_size", low_res_size, 1, unet.config.sample_size, integer=True)
        if unet.config.sample_size % low_res_size:
            raise ValueError(
                f"low_res_size={low_res_size} does not divide the output size {unet.config.sample_size}"
            )
        check_number("residual_scale", residual_scale, 1e-6)
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            image_noising_scheduler=image_noising_scheduler,
            guide_unet=guide_unet,
        )
        if not isinstance(id2label, (dict, type(None))):
            raise ValueError(f"id2label={id2label!r}: expected an object of class id -> name")
        self.register_to_config(
            low_res_size=int(low_res_size),
            id2label={str(k): str(v) for k, v in (id2label or {}).items()},
            residual=bool(residual),
            residual_scale=float(residual_scale),
            noise_at_low_res=bool(noise_at_low_res),
            call_defaults=dict(call_defaults or {}),
        )
        self.check_settings(merge_call_defaults(SR3_CALL_DEFAULTS, call_defaults, {}))

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
        """The modules and the stored settings, so that `type(pipe)(**pipe.components)` rebuilds this pipeline
        (diffusers' way to share components: a new scheduler for one call never touches this pipeline)."""
        keys = ("low_res_size", "id2label", "residual", "residual_scale", "noise_at_low_res", "call_defaults")
        return {**super().components, **{k: self.config[k] for k in keys}}

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
    def stride(self) -> int:
        """Output sizes must be multiples of this: the UNet halves the size at each level but the last."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def max_noise_level(self) -> int:
        return self.image_noising_scheduler.config.num_train_timesteps - 1

    def call_settings(self, **given) -> dict:
        """The settings of one call: the given arguments, else this stage's `call_defaults`, checked."""
        return self.check_settings(merge_call_defaults(SR3_CALL_DEFAULTS, self.config.call_defaults, given))

    def check_settings(self, settings: dict) -> dict:
        """The rules for the sampling settings, wherever they come from (a call, the folder, a CLI)."""
        out = dict(settings)
        out["num_inference_steps"] = check_number(
            "num_inference_steps", settings["num_inference_steps"], 0, 10_000, integer=True
        )
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if out["num_inference_steps"] == 0 and kind == "epsilon":
            raise ValueError(
                "num_inference_steps=0 on an epsilon-prediction stage: its estimate at the last timestep "
                "divides by sqrt(alphabar), which is near 0 there; expected 1 or more steps"
            )
        out["noise_level"] = check_number(
            "noise_level", settings["noise_level"], 0, self.max_noise_level, True
        )
        guidance = out["guidance_scale"] = check_number("guidance_scale", settings["guidance_scale"], 1, 100)
        if guidance > 1 and self.num_classes == 0:
            raise ValueError(f"guidance_scale={guidance}: expected 1 for a stage without a null class label")
        auto = out["autoguidance_scale"] = check_number(
            "autoguidance_scale", settings["autoguidance_scale"], 1, 100
        )
        if auto > 1 and self.guide_unet is None:
            raise ValueError(
                f"autoguidance_scale={auto}: this stage has no guide UNet (guide_unet); expected 1, or a stage with a guide"
            )
        tile = out["tile_size"] = check_number("tile_size", settings["tile_size"], 0, 65_536, integer=True)
        if tile % self.stride:
            raise ValueError(
                f"tile_size={tile}: expected 0 (no tiles) or a positive multiple of {self.stride}"
            )
        hi = max(tile - 1, 0)
        out["tile_overlap"] = check_number(
            "tile_overlap", settings["tile_overlap"], 0, hi if tile else None, True
        )
        out["eta"] = check_number("eta", settings["eta"], 0, 1)
        out["detail_threshold"] = check_number("detail_threshold", settings["detail_threshold"], 0, 1)
        return out

    def check_inputs(self, x, class_ids, generator, any_size: bool, handover: tuple[bool, bool]) -> None:
        """The rules for the inputs of one call (the image, labels, generators and a truncated handover)."""
        lr, (h, w) = self.config.low_res_size, x.shape[-2:]
        if not any_size and (h, w) != (lr, lr):
            raise ValueError(f"image size {w}x{h} does not match this stage's input: expected {lr}x{lr}")
        if min(h, w) < 1:
            raise ValueError(f"image size {w}x{h}: expected at least 1x1 pixels")
        if x.shape[1] != self.unet.config.out_channels:
            raise ValueError(f"image has {x.shape[1]} channels: expected {self.unet.config.out_channels}")
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
        check_handover(self.config.residual, self.config.noise_at_low_res, *handover)

    def alphabar_at(self, t) -> float:
        return float(self.scheduler.alphas_cumprod[int(round(float(t)))])

    def predict(self, x, t, labels, s_emb, tile_size: int = 0, tile_overlap: int = 0):
        """UNet prediction, on overlapping tiles blended with linear ramps when `tile_size` is set.

        Blending the predictions at every step (as in MultiDiffusion, Bar-Tal et al. 2023) keeps one
        shared sample, so tiles agree and leave no seams; memory is bounded by the tile size.
        """
        h, w = x.shape[-2:]
        if not tile_size or (h <= tile_size and w <= tile_size):
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

    def clean_estimate(self, model_output, x_t, t) -> torch.Tensor:
        """The model's estimate of the clean sample x0 from its output at timestep t, for the scheduler's
        prediction type; `x_t` is the variance-preserving model input (after `scale_model_input`)."""
        if len(model_output) != len(x_t):  # classifier-free guidance doubled the batch
            x_t = x_t[: len(model_output)]
        alphabar = self.alphabar_at(t)
        a, b = alphabar**0.5, (1 - alphabar) ** 0.5
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind == "v_prediction":
            x0 = a * x_t - b * model_output
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = (x_t - b * model_output) / a
        if self.scheduler.config.get("clip_sample"):  # as the scheduler clips its own estimate
            limit = self.scheduler.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-limit, limit)
        return x0

    def fade_detail(self, sample, first_estimate, x_lr, threshold: float) -> torch.Tensor:
        """The sample where the low-res input has fine contrast, the first step's estimate where it has
        none, and a linear blend between (`detail_mask`)."""
        mask = detail_mask(x_lr, sample.shape[-2:], threshold).to(sample.dtype)
        first_estimate = first_estimate.to(sample.dtype)
        return first_estimate + mask * (sample - first_estimate)

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

    def check_call(self, call: dict) -> tuple[dict, list[str]]:
        """Check a call's arguments: its settings (given, else the stage's tuned defaults), then the output
        type and the callback's tensor names; sets the guidance scales the loop reads."""
        settings = self.call_settings(**{k: call[k] for k in SR3_CALL_DEFAULTS})
        check_number("num_images_per_prompt", call["num_images_per_prompt"], 1, 4096, integer=True)
        tensor_inputs = call["callback_on_step_end_tensor_inputs"] or ["latents"]
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {bad}: expected names from {self._callback_tensor_inputs}"
            )
        to_output_type(
            torch.zeros(0, 3, 1, 1), call["output_type"]
        )  # an unknown output_type fails before work
        if call["truncate_alphabar"] is not None:
            check_number("truncate_alphabar", call["truncate_alphabar"], 1e-9, 1)
        self._guidance_scale, self._interrupt = settings["guidance_scale"], False
        self._autoguidance_scale = settings["autoguidance_scale"]
        return settings, tensor_inputs

    def prepare_batch(self, call: dict, settings: dict):
        """The low-res batch in [-1, 1], each image (and label) repeated per prompt, checked, then padded to
        the UNet's stride; returns it, the class ids and the size before padding."""
        n, augmented = call["num_images_per_prompt"], call["low_res_is_augmented"]
        x_lr = image_to_tensor(call["image"], raw=augmented).to(self._execution_device)
        x_lr = x_lr.repeat_interleave(n, dim=0)
        class_ids, labels = None, call["class_labels"]
        if labels is not None:
            labels = labels if isinstance(labels, (list, tuple)) else [labels]
            class_ids = [int(c) for c in labels for _ in range(n)]
        any_size = call["allow_any_size"] or settings["tile_size"] > 0
        handover = (augmented, call["truncate_alphabar"] is not None)
        self.check_inputs(x_lr, class_ids, call["generator"], any_size, handover)
        return self.pad_to_stride(x_lr), class_ids, tuple(x_lr.shape[-2:])

    def prepare_timesteps(self, steps: int, device) -> torch.Tensor:
        """The scheduler's timesteps; 0 steps: the last training timestep alone (the estimate)."""
        if steps:
            self.scheduler.set_timesteps(steps, device=device)
            timesteps = self.scheduler.timesteps
        else:
            timesteps = torch.tensor([self.scheduler.config.num_train_timesteps - 1], device=device)
        self._num_timesteps = len(timesteps)
        return timesteps

    def prepare_latents(self, shape, steps: int, latents, generator, device) -> torch.Tensor:
        """The initial noise at the output size, scaled for the scheduler; 0 steps: its mean (zeros)."""
        if latents is not None and not steps:
            raise ValueError(
                "latents given with num_inference_steps=0: the estimate starts from the noise's mean"
            )
        if latents is None:
            latents = (
                randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
                if steps
                else torch.zeros(shape, device=device, dtype=self.unet.dtype)
            )
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}: expected {shape}")
        return latents.to(device) * self.scheduler.init_noise_sigma

    def pad_to_stride(self, x_lr: torch.Tensor) -> torch.Tensor:
        """Pad the low-res batch with replicated edges so the output is a multiple of the UNet's stride."""
        step = max(1, self.stride // self.scale_factor)
        h, w = x_lr.shape[-2:]
        pad_h, pad_w = (-h) % step, (-w) % step
        return F.pad(x_lr, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x_lr

    def finish(self, sample: torch.Tensor, x_lr: torch.Tensor, size, alphabar, output_type) -> torch.Tensor:
        """A finished sample in [-1, 1]: a residual stage adds its sample to the clean upsampled input. A
        truncated run's noisy z_s is not finished."""
        if alphabar is not None:
            raise ValueError(f"output_type={output_type!r}: a truncated run returns noisy z_s, use 'latent'")
        if self.config.residual:
            base = augment_low_res(x_lr, size, 0, self.image_noising_scheduler)
            sample = base.to(sample.dtype) + sample / self.config.residual_scale
        return sample.clamp(-1, 1)

    def denoise(self, latents, timesteps, conditioning, x_lr, settings: dict, call: dict, tensor_inputs):
        """The denoising loop; stops early to hand over z_s when truncating (CDM section 3.2), returning its
        alphabar. With a detail threshold, the first step's estimate of the clean sample keeps the detail
        where the input has content."""
        cond, s_emb, labels = conditioning
        steps = settings["num_inference_steps"]
        extra = step_kwargs(self.scheduler, call["generator"], settings["eta"])
        callback, truncate = call["callback_on_step_end"], call["truncate_alphabar"]
        do_cfg, alphabar, first_estimate = self.guidance_scale > 1.0, None, None
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                break
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            if steps:  # (zeros, the 0-step input, are the same in every scheduler's scaling)
                model_input = self.scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, cond], dim=1)
            model_output = self.predict(
                model_input, t, labels, s_emb, settings["tile_size"], settings["tile_overlap"]
            )
            if do_cfg:
                model_output = cfg_combine(model_output, self.guidance_scale)
            if i == 0 and settings["detail_threshold"] > 0:
                first_estimate = self.clean_estimate(model_output, model_input[:, : latents.shape[1]], t)
            if steps:
                latents = self.scheduler.step(model_output, t, latents, **extra).prev_sample
            else:  # no sampling: the prediction of the clean sample is the result
                latents = self.clean_estimate(model_output, model_input[:, : latents.shape[1]], t)
            if callback is not None:
                available = {"latents": latents}
                outputs = callback(self, i, t, {k: available[k] for k in tensor_inputs}) or {}
                latents = outputs.get("latents", latents)
            if truncate is not None and i + 1 < len(timesteps):
                alphabar = self.alphabar_at(timesteps[i + 1])
                if alphabar >= truncate:  # hand over z_s, in VP form for sigma schedulers
                    latents = self.scheduler.scale_model_input(latents, timesteps[i + 1])
                    break
                alphabar = None
        if first_estimate is not None and alphabar is None:
            latents = self.fade_detail(latents, first_estimate, x_lr, settings["detail_threshold"])
        return latents, alphabar

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image,
        class_labels: int | list[int] | None = None,
        noise_level: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        eta: float | None = None,
        truncate_alphabar: float | None = None,
        low_res_is_augmented: bool = False,
        allow_any_size: bool = False,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        autoguidance_scale: float | None = None,
        detail_threshold: float | None = None,
    ):
        r"""Super-resolve a batch of images; the arguments are described in the class docstring.

        Examples:
        """
        # 1. Check the call: settings (given, else the stage's tuned defaults), output type, callbacks
        call = {k: v for k, v in locals().items() if k != "self"}  # every argument, as given
        settings, tensor_inputs = self.check_call(call)
        # 2. The low-res batch (padded to the UNet's stride, cropped back in step 5), its conditioning
        x_lr, class_ids, (h, w) = self.prepare_batch(call, settings)
        f, level = self.scale_factor, settings["noise_level"]
        size = (x_lr.shape[-2] * f, x_lr.shape[-1] * f)
        cond = self.prepare_conditioning(x_lr, size, class_ids, level, low_res_is_augmented, generator)
        # 3. Timesteps and the initial noise at the output size; 0 steps: the last timestep, the noise's mean
        steps, shape = settings["num_inference_steps"], (x_lr.shape[0], self.unet.config.out_channels, *size)
        timesteps = self.prepare_timesteps(steps, x_lr.device)
        latents = self.prepare_latents(shape, steps, latents, generator, x_lr.device)
        # 4. Denoise; a finished sample gets the upsampled input back (residual stages) and is clamped
        latents, alphabar = self.denoise(latents, timesteps, cond, x_lr, settings, call, tensor_inputs)
        if output_type != "latent":
            latents = self.finish(latents, x_lr, size, alphabar, output_type)
        # 5. Post-process: crop the padding off, convert
        images = to_output_type(latents[..., : h * f, : w * f], output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SR3PipelineOutput(images=images, alphabar=alphabar)
