"""Typed configuration schemas, registered in Hydra's ConfigStore.

`conf/train.yaml` composes one node of each group onto `TrainRunConfig`, so a misspelt key or
a value of the wrong type fails at start-up with the key's name. `validate` then checks
ranges and cross-field rules that a type cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cdm_pipelines.pipeline_sr3 import check_handover, check_number
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cdm.errors import UserError


class StageKind(str, Enum):
    base = "base"
    sr = "sr"


class PredictionType(str, Enum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"


class MixedPrecision(str, Enum):
    """auto: bf16 where the training device has bf16 units (`devices.has_fast_bf16`), else no (fp32)."""

    auto = "auto"
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class LRSchedule(str, Enum):
    """After the warm-up: hold the learning rate, or decay it to zero by train.max_steps."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class DataSource(str, Enum):
    imagefolder = "imagefolder"
    hub = "hub"
    digits = "digits"
    photos = "photos"


class ResizeMode(str, Enum):
    resize = "resize"  # short side to the stage resolution, then crop
    crisp = "crisp"  # strokes re-rendered at the stage resolution with sharp edges
    none = "none"  # native resolution; crops only


AUG_MODES = ("non-truncated", "truncated")


@dataclass
class UNetConfig:
    """A named size preset (DiT-style factories): tiny for tests, small for CPU, paper for real runs."""

    name: str = "tiny"
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    # Feature-map sizes (in pixels, at the stage's output resolution) that get self-attention.
    # SR stages never use attention above 32x32, since they run on whole high-resolution images.
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    dropout: float = 0.0
    level_embed_dim: int = 64


@dataclass
class SamplingConfig:
    """Per-stage sampling defaults: set at training (stage.sample), stored in cascade.json, overridable per call."""

    scheduler: str = "DPMSolverMultistepScheduler"
    steps: int = 25
    guidance_scale: float = 1.0
    noise_level: int = 0  # SR stages: conditioning augmentation level of this stage's input
    aug_mode: str = "non-truncated"  # or "truncated" (CDM section 3.2)
    max_batch: int = 8  # images per UNet call; bounds memory at high resolution
    # SR stages with a guide UNet: extrapolate away from the guide's prediction (1 runs the UNet alone)
    autoguidance_scale: float = 1.0


@dataclass
class StageConfig:
    name: str = MISSING
    kind: StageKind = MISSING
    resolution: int = MISSING  # output size
    low_res: int = 0  # SR input size; 0 for a base stage
    class_conditional: bool = True
    label_dropout: float = 0.1  # p of replacing a label with the null id (classifier-free guidance)
    prediction_type: PredictionType = PredictionType.epsilon
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    # Training draws t = floor(T u^p): p = 1 is uniform (DDPM); p > 1 trains low noise levels more.
    timestep_power: float = 1.0
    # SR stages with v-prediction: the fraction of examples that train the 0-step estimate directly
    # (zeros at the last timestep, target x0), the estimate `num_inference_steps=0` returns.
    estimate_fraction: float = 0.0
    crop_size: int = 0  # high-res training crop for SR stages; 0 trains on whole images
    noise_level_max: int = 250  # conditioning augmentation: s ~ U{0..noise_level_max}
    blur_prob: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.4, 0.6])
    # SR stages: diffuse the residual over the bicubic upsample, times `residual_scale`, instead of
    # the whole image (SRDiff, Li et al. 2022). The low frequencies are then exact from step one.
    residual: bool = False
    residual_scale: float = 1.0
    # SR stages: add the augmentation noise to the low-res input before upsampling (CDM), not after.
    # Only such a stage can take a truncated handover (the previous stage's noisy z_s).
    noise_at_low_res: bool = False
    sample: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class DataConfig:
    source: DataSource = MISSING
    path: str | None = None  # imagefolder root, or where an offline set is built
    name: str | None = None  # Hub dataset id
    config_name: str | None = None
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = "label"
    streaming: bool = False
    resize: ResizeMode = ResizeMode.resize
    num_workers: int = 0
    # Standard SR augmentations, applied before cropping: a random anti-aliased downscale by a
    # factor in [min_scale, max_scale] (more scales of the same scene), random flips and 90-degree
    # turns. max_scale < 1 also cleans the targets: sensor noise and JPEG ripple shrink below a pixel.
    min_scale: float = 1.0
    max_scale: float = 1.0
    random_flip: bool = False
    random_rot90: bool = False
    # For the offline photos set: how many images are held out for evaluation, and whether to add
    # the photographs of Debian's background packages (cdm.train.builders) to its training split.
    holdout: int = 3
    debian_photos: bool = False
    # data=hub: local or remote data files (a path, a glob, or a list) for a builder such as
    # parquet, csv or imagefolder named by data.name.
    data_files: list[str] | None = None
    # Integer labels without class names: the class count (0 infers it from the data).
    num_classes: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 8
    max_steps: int = 1000
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    lr_schedule: LRSchedule = LRSchedule.constant
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    grad_accum: int = 1
    grad_clip: float = 1.0
    mixed_precision: MixedPrecision = MixedPrecision.auto
    ema_decay: float = 0.999
    ema_warmup: bool = True
    log_every: int = 10
    sample_every: int = 500
    num_samples: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    # Fine-tune: start from the UNet of a stage folder, a finished run or a Hub repo id (same architecture).
    init_from: str | None = None
    stop_after: int = 0  # stop at this step, resumable (time-sliced jobs); 0 runs to max_steps
    output_dir: str = "runs/${stage.name}"
    tracker: str = "tensorboard"  # or "none"
    license: str = "apache-2.0"


@dataclass
class TrainRunConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def sampling_fields() -> dict[str, type]:
    """SamplingConfig's field names and value types, for reading it from JSON and from `--set`."""
    defaults = SamplingConfig()
    return {name: type(getattr(defaults, name)) for name in SamplingConfig.__dataclass_fields__}


def unet_stride(block_out_channels) -> int:
    """How many pixels one latent cell spans after the UNet's downsamplings: sizes must be multiples."""
    return 2 ** (len(block_out_channels) - 1)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)


def config_dir() -> Path:
    """The conf/ folder: beside the package in a checkout, inside it when installed from a wheel."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "conf",
        Path(__file__).resolve().parent / "conf",
    ):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError("cdm's conf/ folder was not found beside the package")


# key -> (low, high, integer): every number of the config, checked by the same rule as the pipelines' numbers
NUMBERS = {
    "train.seed": (0, 2**63 - 1, True),
    "train.batch_size": (1, 65_536, True),
    "train.max_steps": (1, 10**9, True),
    "train.learning_rate": (1e-30, 1, False),
    "train.warmup_steps": (0, 10**9, True),
    "train.weight_decay": (0, 10, False),
    "train.adam_beta2": (0, 0.999999, False),
    "train.grad_accum": (1, 4096, True),
    "train.grad_clip": (0, 1e6, False),
    "train.ema_decay": (0, 0.999999, False),
    "train.stop_after": (0, 10**9, True),
    "train.num_samples": (0, 4096, True),
    "stage.resolution": (1, 4096, True),
    "stage.num_train_timesteps": (2, 100_000, True),
    "stage.label_dropout": (0, 0.99, False),
    "stage.residual_scale": (1e-6, 1e6, False),
    "stage.sample.steps": (0, 10_000, True),
    "stage.sample.guidance_scale": (1, 100, False),
    "stage.sample.autoguidance_scale": (1, 100, False),
    "stage.sample.max_batch": (1, 4096, True),
    "unet.layers_per_block": (1, 16, True),
    "unet.attention_head_dim": (1, 4096, True),
    "unet.norm_num_groups": (1, 1024, True),
    "unet.dropout": (0, 0.99, False),
    "unet.level_embed_dim": (2, 8192, True),
    "data.num_workers": (0, 256, True),
    "data.holdout": (0, 10_000, True),
}


def check_numbers(cfg) -> None:
    """Finite, of the right kind, in range: `check_number`, the pipelines' rule, for every number of the config."""
    for key, (lo, hi, integer) in NUMBERS.items():
        section, *rest = key.split(".")
        value = cfg[section]
        for part in rest:
            value = value[part]
        try:
            check_number(key, value, lo, hi, integer)
        except ValueError as err:
            raise UserError(str(err)) from None
    channels = list(cfg.unet.block_out_channels)
    if not 1 <= len(channels) <= 8 or not all(isinstance(c, int) and 1 <= c <= 8192 for c in channels):
        raise UserError(f"unet.block_out_channels={channels}: expected 1 to 8 integers in 1..8192")
    if not str(cfg.train.output_dir).strip():
        raise UserError("train.output_dir is empty: expected a folder for the run (e.g. runs/my-run)")


def validate(cfg) -> None:
    """Range and cross-field checks; each raises ValueError naming the key and the expected value."""
    check_numbers(cfg)
    opts, stage = cfg.train, cfg.stage
    positive = {
        "train.batch_size": opts.batch_size,
        "train.max_steps": opts.max_steps,
        "train.grad_accum": opts.grad_accum,
        "train.keep_checkpoints": opts.keep_checkpoints,
        "train.checkpoint_every": opts.checkpoint_every,
        "train.sample_every": opts.sample_every,
        "train.log_every": opts.log_every,
        "stage.resolution": stage.resolution,
        "stage.num_train_timesteps": stage.num_train_timesteps,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key}={value}: expected an integer >= 1")
    if not 0 < opts.learning_rate < 1:
        raise UserError(f"train.learning_rate={opts.learning_rate}: expected a value in (0, 1)")
    if not 0 <= opts.ema_decay < 1:
        raise UserError(f"train.ema_decay={opts.ema_decay}: expected a value in [0, 1)")
    if not 0 <= stage.label_dropout < 1:
        raise UserError(f"stage.label_dropout={stage.label_dropout}: expected a value in [0, 1)")
    if not 0 <= stage.blur_prob <= 1:
        raise UserError(f"stage.blur_prob={stage.blur_prob}: expected a value in [0, 1]")
    if len(stage.blur_sigma) != 2 or not 0 < stage.blur_sigma[0] <= stage.blur_sigma[1]:
        raise UserError(
            f"stage.blur_sigma={list(stage.blur_sigma)}: expected [low, high] with 0 < low <= high"
        )
    validate_stage(cfg)
    validate_sizes(cfg)
    validate_data(cfg)


def validate_objective(stage) -> None:
    """Training-loss rules: where the timesteps are drawn, the share that trains the 0-step estimate, and
    where the 0-step estimate can be sampled at all."""
    if not 0.25 <= stage.timestep_power <= 8:
        raise UserError(
            f"stage.timestep_power={stage.timestep_power}: expected a value in 0.25..8 (1 is uniform)"
        )
    if not 0 <= stage.estimate_fraction <= 1:
        raise UserError(f"stage.estimate_fraction={stage.estimate_fraction}: expected a value in [0, 1]")
    v_sr = stage.kind == StageKind.sr and stage.prediction_type == PredictionType.v_prediction
    if stage.sample.steps == 0 and not v_sr:
        raise UserError(
            "stage.sample.steps=0: expected 1 or more (0 steps, the estimate, is for v-prediction SR stages)"
        )
    if stage.estimate_fraction > 0 and stage.prediction_type != PredictionType.v_prediction:
        raise UserError(
            f"stage.estimate_fraction={stage.estimate_fraction} with stage.prediction_type="
            f"{stage.prediction_type.value}: expected v_prediction (an epsilon stage has no 0-step estimate)"
        )


def validate_stage(cfg) -> None:
    """Stage rules: residual scale, augmentation levels and modes, SR sizes and crops."""
    stage = cfg.stage
    validate_objective(stage)
    if not stage.residual_scale > 0:
        raise UserError(f"stage.residual_scale={stage.residual_scale}: expected a value > 0")
    if not 0 < cfg.data.min_scale <= 1:
        raise UserError(f"data.min_scale={cfg.data.min_scale}: expected a value in (0, 1]")
    if not cfg.data.min_scale <= cfg.data.max_scale <= 1:
        raise UserError(
            f"data.max_scale={cfg.data.max_scale}: expected a value in [data.min_scale={cfg.data.min_scale}, 1]"
        )
    if stage.sample.aug_mode == "truncated" and stage.kind == StageKind.sr:
        try:
            check_handover(stage.residual, stage.noise_at_low_res, takes=True)
        except ValueError as err:
            raise UserError(f"stage.sample.aug_mode=truncated: {err}") from None
    if stage.sample.aug_mode not in AUG_MODES:
        raise UserError(
            f"stage.sample.aug_mode={stage.sample.aug_mode!r}: expected one of {', '.join(AUG_MODES)}"
        )
    if not 0 <= stage.sample.noise_level < stage.num_train_timesteps:
        raise UserError(
            f"stage.sample.noise_level={stage.sample.noise_level}: expected 0..{stage.num_train_timesteps - 1}"
        )
    if not 0 <= stage.noise_level_max < stage.num_train_timesteps:
        raise UserError(
            f"stage.noise_level_max={stage.noise_level_max}: expected 0..{stage.num_train_timesteps - 1}"
        )
    if stage.kind == StageKind.base and not stage.class_conditional:
        raise UserError("stage.class_conditional=false: the base stage is class-conditional")
    if stage.kind == StageKind.sr:
        if stage.low_res < 1 or stage.resolution % stage.low_res:
            raise UserError(
                f"stage.low_res={stage.low_res}: expected a positive size dividing stage.resolution={stage.resolution}"
            )
        scale = stage.resolution // stage.low_res
        too_big = stage.crop_size > stage.resolution and cfg.data.resize != ResizeMode.none
        if stage.crop_size and (stage.crop_size % scale or too_big):
            raise UserError(
                f"stage.crop_size={stage.crop_size}: expected a multiple of the scale {scale} "
                f"and at most stage.resolution={stage.resolution}"
            )


def validate_sizes(cfg) -> None:
    """The UNet's downsampling and group norm must fit the training size and the channels."""
    stage = cfg.stage
    levels = unet_stride(cfg.unet.block_out_channels)
    train_size = stage.crop_size or stage.resolution
    if train_size % levels:
        raise UserError(
            f"unet.block_out_channels has {len(cfg.unet.block_out_channels)} levels: training size "
            f"{train_size} must be a multiple of {levels}"
        )
    if any(c % cfg.unet.norm_num_groups for c in cfg.unet.block_out_channels):
        raise UserError(
            f"unet.norm_num_groups={cfg.unet.norm_num_groups} must divide every unet.block_out_channels "
            f"{list(cfg.unet.block_out_channels)}"
        )
    if cfg.data.source == DataSource.imagefolder and not cfg.data.path:
        raise UserError(
            "data.path is missing: data=imagefolder needs data.path=DIR (one sub-folder per class)"
        )


def validate_data(cfg) -> None:
    """Data-source rules that a type cannot express."""
    if cfg.data.source == DataSource.hub and cfg.data.path:
        raise UserError(
            f"data.path={cfg.data.path} is not read by data=hub: use data=imagefolder data.path=DIR, or "
            "data.name=imagefolder data.data_files=GLOB"
        )
    if cfg.data.source == DataSource.imagefolder and cfg.data.path and not Path(cfg.data.path).is_dir():
        raise UserError(
            f"data.path={cfg.data.path}: no such folder (data=imagefolder reads a folder of images)"
        )
    if cfg.data.num_classes < 0:
        raise UserError(f"data.num_classes={cfg.data.num_classes}: expected 0 (infer) or a positive count")
    if cfg.data.source == DataSource.hub and not cfg.data.name:
        raise UserError("data.name is missing: data=hub needs data.name=OWNER/DATASET")
