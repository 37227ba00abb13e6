"""Model factory: a stage config and a size preset make a diffusers UNet, schedulers and pipeline."""

from __future__ import annotations

import importlib.util
import inspect

import diffusers
import torch
from cdm_pipelines import CDMBasePipeline, SR3Pipeline
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from cdm.config import PredictionType, SamplingConfig, StageConfig, StageKind, UNetConfig
from cdm.errors import UserError

SR_MAX_ATTENTION_RES = 32  # SR3: no self-attention above 32x32, so stages run on whole big images


def attention_levels(unet: UNetConfig, resolution: int, max_res: int | None = None) -> list[bool]:
    """Which UNet levels get self-attention: the feature size at level i is resolution / 2**i."""
    sizes = [resolution // 2**i for i in range(len(unet.block_out_channels))]
    return [size in unet.attention_resolutions and (max_res is None or size <= max_res) for size in sizes]


def shared_unet_kwargs(stage: StageConfig, unet: UNetConfig, max_attention_res: int | None = None) -> dict:
    """Size-preset arguments common to both UNet classes; attention where the preset asks for it."""
    attn = attention_levels(unet, stage.resolution, max_attention_res)
    return {
        "sample_size": stage.resolution,
        "out_channels": 3,
        "block_out_channels": tuple(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "attention_head_dim": unet.attention_head_dim,
        "norm_num_groups": unet.norm_num_groups,
        "dropout": unet.dropout,
    }


def build_base_unet(stage: StageConfig, unet: UNetConfig, num_classes: int) -> UNet2DModel:
    """Class-conditional UNet2DModel with num_classes + 1 embeddings (last id = null label)."""
    return UNet2DModel(in_channels=3, num_class_embeds=num_classes + 1, **shared_unet_kwargs(stage, unet))


def build_sr_unet(stage: StageConfig, unet: UNetConfig, num_classes: int) -> UNet2DConditionModel:
    """SR3 UNet: 6 input channels, level through `timestep_cond`, optional class label, no cross-attention."""
    return UNet2DConditionModel(
        in_channels=6,
        mid_block_type="UNetMidBlock2D",
        time_cond_proj_dim=unet.level_embed_dim,
        num_class_embeds=num_classes + 1 if num_classes else None,
        cross_attention_dim=unet.block_out_channels[-1],  # unused: no cross-attention blocks
        **shared_unet_kwargs(stage, unet, max_attention_res=SR_MAX_ATTENTION_RES),
    )


def build_noise_scheduler(stage: StageConfig) -> DDPMScheduler:
    """The training forward process q(x_t | x_0); also the SR noising scheduler for augmentation."""
    # "trailing" spacing starts sampling at the last training timestep, so even one step starts from
    # pure noise and returns E[x_0 | conditioning] (Lin et al. 2023, "Common diffusion noise schedules
    # are flawed"). A residual is not bounded by [-1, 1], so it is not clipped.
    return DDPMScheduler(
        num_train_timesteps=stage.num_train_timesteps,
        beta_schedule=stage.beta_schedule,
        prediction_type=PredictionType(stage.prediction_type).value,
        clip_sample=not stage.residual,
        timestep_spacing="leading" if stage.prediction_type == PredictionType.epsilon else "trailing",
    )


def sampling_scheduler(name: str, config, steps: int = 4):
    """Any diffusers scheduler by class name, built from another scheduler's config and tried at `steps`."""
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None or not inspect.isclass(cls):
        raise UserError(f"scheduler {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler)")
    missing = [b for b in getattr(cls, "_backends", []) if not importlib.util.find_spec(b)]
    if missing:  # diffusers exports a placeholder that raises when used
        raise UserError(f"scheduler {name!r} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    extra, params = {}, inspect.signature(cls.__init__).parameters
    if "thresholding" in params and config.get("clip_sample", True):
        extra["thresholding"] = True  # Imagen's dynamic thresholding keeps pixel-space x_0 in [-1, 1]
    if "timestep_spacing" in params and config.get("prediction_type") != "epsilon":
        # start from the last training step, where one step of a v model gives E[x_0]; an epsilon model's
        # x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) is ill-conditioned there, so it keeps its spacing
        extra["timestep_spacing"] = "trailing"
    if config.get("beta_schedule") == "squaredcos_cap_v2" and "lambda_min_clipped" in params:
        extra["lambda_min_clipped"] = -5.1  # the cosine schedule's last steps are unstable without it
    try:
        probe_scheduler(cls.from_config(config, **extra), steps)
        return cls.from_config(config, **extra)
    except Exception as err:  # any scheduler class may be named; each fails in its own way
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(
            f"scheduler {name!r} does not work at {steps} steps with this stage's DDPM noise schedule and "
            f"{config.get('prediction_type')} model ({type(err).__name__}: {reason})"
        ) from None


def with_scheduler(pipe, name: str | None, steps: int = 4):
    """The stage sampled with scheduler class `name`: the stage itself when it already has one, else a new
    pipeline over the same modules (diffusers' `Pipeline(**pipe.components)`), so that a setting of one
    call never changes a loaded stage, nor the cascades and slices that share it."""
    if not name or type(pipe.scheduler).__name__ == name:
        return pipe
    view = type(pipe)(
        **{**pipe.components, "scheduler": sampling_scheduler(name, pipe.scheduler.config, steps)}
    )
    view.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return view


def probe_scheduler(scheduler, steps: int = 4) -> None:
    """Run the whole sampling API once on a 4x4 zero image: what a pipeline calls, in that order. An SR
    stage's 0 steps (its one-evaluation estimate) calls none of it; that is probed at 1 step."""
    scheduler.set_timesteps(max(steps, 1))
    x = torch.zeros(1, 3, 4, 4) * scheduler.init_noise_sigma
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        pred = torch.zeros_like(scheduler.scale_model_input(x, t))
        kwargs = {"generator": torch.Generator().manual_seed(0)} if accepts_generator else {}
        x = scheduler.step(pred, t, x, **kwargs).prev_sample
    if not torch.isfinite(x).all():
        raise UserError("non-finite samples")


def build_pipeline(
    stage: StageConfig,
    unet_cfg: UNetConfig,
    num_classes: int,
    id2label: dict | None = None,
    unet: torch.nn.Module | None = None,
):
    """A stage's diffusers pipeline; pass `unet` to wrap trained weights instead of a fresh init."""
    noise = build_noise_scheduler(stage)
    scheduler = sampling_scheduler(stage.sample.scheduler, noise.config)
    labels = id2label if num_classes and stage.class_conditional else None
    unet = unet if unet is not None else build_unet(stage, unet_cfg, num_classes)
    sr = stage.kind == StageKind.sr
    defaults = call_defaults(stage.sample, stage.resolution, sr)
    if not sr:
        return CDMBasePipeline(unet=unet, scheduler=scheduler, id2label=labels, call_defaults=defaults)
    noising = DDPMScheduler.from_config(noise.config)
    return SR3Pipeline(
        unet=unet,
        scheduler=scheduler,
        image_noising_scheduler=noising,
        low_res_size=stage.low_res,
        id2label=labels,
        residual=stage.residual,
        residual_scale=stage.residual_scale,
        noise_at_low_res=stage.noise_at_low_res,
        call_defaults=defaults,
    )


def call_defaults(sampling: SamplingConfig, size: int, sr: bool) -> dict:
    """A stage's sampling settings as the `call_defaults` its pipeline keeps in model_index.json, so that
    plain diffusers samples as cdm does. An SR stage tiles whole images at its training size (`size`)."""
    out = {"num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance_scale}
    if sr:
        out.update(
            noise_level=sampling.noise_level,
            autoguidance_scale=sampling.autoguidance_scale,
            tile_size=size,
            tile_overlap=size // 4,
        )
    return out


def build_unet(stage: StageConfig, unet_cfg: UNetConfig, num_classes: int) -> torch.nn.Module:
    if stage.kind == StageKind.base:
        return build_base_unet(stage, unet_cfg, num_classes)
    return build_sr_unet(stage, unet_cfg, num_classes if stage.class_conditional else 0)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
