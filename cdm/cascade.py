"""The cascade: chains stage pipelines with conditioning augmentation between them (CDM, Ho et al. 2021).

A cascade folder holds `cascade.json` (stage order and per-stage sampling defaults) and one
diffusers pipeline folder per stage. Stages talk through `output_type="pt"` tensors in [-1, 1].

Conditioning augmentation at sampling, per SR stage, with level s:
- non-truncated: the previous stage runs to the end; its output is upsampled and noised to s by
  the SR stage's `image_noising_scheduler` (`augment_low_res`, the function training used).
- truncated: the previous stage stops early and hands over its noisy z_s. Timesteps of the two
  schedules are matched through alphabar: the previous stage stops at the first of its own
  timesteps t with alphabar_prev(t) >= alphabar_noise(s), and the SR stage is told the level s'
  whose alphabar_noise(s') is closest to alphabar_prev(t). Any scheduler works: sigma-scaled
  samplers (Euler) are converted to the variance-preserving form by `scale_model_input`.
  s = 0 never truncates, so it equals non-truncated sampling at level 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from cdm_pipelines import CDMBasePipeline, SR3Pipeline

from cdm.config import AUG_MODES
from cdm.errors import UserError
from cdm.models import sampling_scheduler
from cdm.stage_io import load_stage

CASCADE_FILE = "cascade.json"


@dataclass
class StageSettings:
    """Per-stage sampling defaults, stored in cascade.json and overridable per call."""

    scheduler: str = "DPMSolverMultistepScheduler"
    steps: int = 25
    guidance_scale: float = 1.0
    aug_level: int = 0  # SR stages: conditioning augmentation level s of this stage's input
    aug_mode: str = "non-truncated"
    max_batch: int = 8  # images per UNet call; bounds memory at high resolution


@dataclass
class CascadeOutput:
    images: list[torch.Tensor]  # one (B, 3, H, W) tensor in [-1, 1] per stage
    seconds: list[float]
    stage_names: list[str]
    class_ids: list[int] = field(default_factory=list)


def imagenet_labels() -> dict[str, str]:
    """ILSVRC-2012 class names by index (WordNet lemmas): 207 is "golden retriever"."""
    return json.loads((Path(__file__).parent / "imagenet_classes.json").read_text())


def stage_seed(seed: int, stage_index: int) -> int:
    """Each image's seed drives every stage; stages draw from independent streams."""
    return (seed * 1_000_003 + stage_index * 7_919) % (2**63 - 1)


def nearest_level(alphabar: float, noising) -> int:
    """The augmentation level s whose alphabar in `noising` is closest to `alphabar`."""
    return int((noising.alphas_cumprod - alphabar).abs().argmin())


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id fetched with snapshot_download (safetensors and JSON only)."""
    path = Path(model)
    if path.exists():
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return Path(
                snapshot_download(
                    str(model),
                    revision=revision,
                    allow_patterns=["*.json", "*.safetensors", "*.md", "*.png", "*.py"],
                )
            )
        except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise UserError(
                f"model {model}: not a local folder, and the Hub repo could not be fetched "
                f"({str(err).splitlines()[0][:160]})"
            ) from None
    raise UserError(f"model {model}: no such folder (expected a cascade folder or a Hub repo id)")


def check_settings(name: str, pipe, s: StageSettings) -> None:
    """Range checks of one stage's sampling settings, for reading and for writing cascade.json."""
    if s.steps < 1:
        raise UserError(f"steps={s.steps} for stage {name}: expected an integer >= 1")
    if s.guidance_scale < 1:
        raise UserError(
            f"guidance_scale={s.guidance_scale} for stage {name}: expected >= 1 (1 disables guidance)"
        )
    if s.max_batch < 1:
        raise UserError(f"max_batch={s.max_batch} for stage {name}: expected an integer >= 1")
    if s.aug_mode not in AUG_MODES:
        raise UserError(f"aug_mode={s.aug_mode!r} for stage {name}: expected one of {', '.join(AUG_MODES)}")
    if isinstance(pipe, SR3Pipeline) and not 0 <= s.aug_level <= pipe.max_noise_level:
        raise UserError(f"aug_level={s.aug_level} for stage {name}: expected 0..{pipe.max_noise_level}")


def parse_stage_entry(spec_path: Path, k: int, entry) -> tuple[str, Path, StageSettings]:
    """One `stages` entry of cascade.json: a name, a folder inside the cascade, typed sampling settings."""
    where = f"{spec_path}: stages[{k}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise UserError(f'{where} is {json.dumps(entry)[:80]}: expected an object with a "name" string')
    rel = entry.get("path", entry["name"])
    root = spec_path.parent.resolve()
    folder = (root / str(rel)).resolve()
    if not isinstance(rel, str) or Path(rel).is_absolute() or root not in folder.parents:
        raise UserError(f"{where}: path {rel!r} is outside the cascade folder: expected a sub-folder name")
    sampling = entry.get("sampling", {})
    if not isinstance(sampling, dict):
        raise UserError(f"{where}: sampling is {json.dumps(sampling)[:80]}: expected an object")
    fields = StageSettings.__dataclass_fields__
    values = {}
    for key, value in sampling.items():
        if key not in fields:
            continue
        kind = type(getattr(StageSettings(), key))
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise UserError(f"{where}: sampling.{key}={json.dumps(value)}: expected a {kind.__name__}")
        values[key] = kind(value)
    return entry["name"], folder, StageSettings(**values)


class Cascade:
    """An ordered list of stages: a base generator, then SR stages whose input size matches."""

    def __init__(
        self, names: list[str], pipes: list, settings: list[StageSettings], root: Path | None = None
    ):
        self.names, self.pipes, self.settings, self.root = names, pipes, settings, root
        self.autocast_dtype: torch.dtype | None = None
        self.check_chain()

    def optimize(self, bf16: bool = False, channels_last: bool = False) -> Cascade:
        """Speed settings: bf16 autocast for the UNets, and channels-last memory layout."""
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        for p in self.pipes:
            p.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path, torch_dtype=torch.float32) -> Cascade:
        root = resolve_model(model)
        spec_path = root / CASCADE_FILE
        if not spec_path.is_file() and (root / "model_index.json").is_file():  # a single base stage
            from cdm.export import stage_info, stage_settings

            return cls([root.name], [load_stage(root, torch_dtype)], [stage_settings(stage_info(root))], root)
        if not spec_path.is_file():
            raise UserError(f"{root} is not a cascade folder: expected {CASCADE_FILE} inside it")
        try:
            spec = json.loads(spec_path.read_text())
            stages = spec["stages"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{spec_path} is not a valid cascade description ({err})") from None
        names, pipes, settings = [], [], []
        for k, entry in enumerate(stages if isinstance(stages, list) else [stages]):
            name, folder, sampling = parse_stage_entry(spec_path, k, entry)
            names.append(name)
            pipes.append(load_stage(folder, torch_dtype=torch_dtype))
            settings.append(sampling)
        if spec.get("label_set") == "imagenet" and not pipes[0].labels:
            pipes[0].register_to_config(id2label=imagenet_labels())
        return cls(names, pipes, settings, root)

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
        for name, s in zip(self.names, self.settings):
            if s.aug_mode not in AUG_MODES:
                raise UserError(f"{name}: aug_mode={s.aug_mode!r}: expected one of {', '.join(AUG_MODES)}")

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

    def class_ids(self, labels) -> list[int]:
        try:
            return self.base.get_label_ids(labels)
        except ValueError as err:
            raise UserError(str(err)) from None

    def with_overrides(self, **per_stage: list | None) -> list[StageSettings]:
        """Settings with per-stage overrides: each keyword is a list with one value per stage, or None."""
        out = [replace(s) for s in self.settings]
        for key, values in per_stage.items():
            if values is None:
                continue
            if len(values) == 1 and key == "guidance_scale":  # one value: the class-conditional stages
                values = [values[0] if p.num_classes else s.guidance_scale for p, s in zip(self.pipes, out)]
            elif len(values) == 1:
                values = values * len(out)
            if len(values) != len(out):
                raise UserError(
                    f"{key}: got {len(values)} values for {len(out)} stages ({', '.join(self.names)})"
                )
            for s, v in zip(out, values):
                setattr(s, key, v)
        for name, pipe, s in zip(self.names, self.pipes, out):
            check_settings(name, pipe, s)
        for k in range(len(out)):
            self.check_sampler(k, out[k], out[k + 1] if k + 1 < len(out) else None)
        return out

    def check_sampler(self, k: int, s: StageSettings, nxt: StageSettings | None) -> None:
        """The scheduler must run at the stage's steps; a truncated handover needs its alphabar too."""
        try:
            scheduler = sampling_scheduler(s.scheduler, self.pipes[k].scheduler.config, s.steps)
        except ValueError as err:
            raise UserError(f"stage {self.names[k]}: {err}") from None
        if nxt is None or nxt.aug_mode != "truncated" or nxt.aug_level == 0:
            return
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise UserError(
                f"scheduler={s.scheduler} for stage {self.names[k]}: truncated conditioning augmentation "
                "needs a scheduler with a DDPM noise schedule (alphas_cumprod), e.g. DDIMScheduler"
            )
        if self.pipes[k + 1].config.residual:
            raise UserError(
                f"aug_mode=truncated for stage {self.names[k + 1]}: a residual SR stage needs the finished "
                "previous stage, expected non-truncated"
            )

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        seeds: list[int],
        settings: list[StageSettings] | None = None,
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
        for k, (name, pipe, s) in enumerate(zip(self.names, self.pipes, settings)):
            start = time.perf_counter()
            pipe.scheduler = sampling_scheduler(s.scheduler, pipe.scheduler.config, s.steps)
            pipe.set_progress_bar_config(disable=not progress, desc=name, leave=False)
            nxt = settings[k + 1] if k + 1 < len(settings) else None
            truncate = None
            if nxt is not None and nxt.aug_mode == "truncated" and nxt.aug_level > 0:
                truncate = float(self.pipes[k + 1].image_noising_scheduler.alphas_cumprod[nxt.aug_level])
            chunks, alphabars = [], []
            for lo in range(0, len(ids), s.max_batch):
                hi = min(lo + s.max_batch, len(ids))
                gens = [torch.Generator().manual_seed(stage_seed(seed, k)) for seed in seeds[lo:hi]]
                common = {
                    "num_inference_steps": s.steps,
                    "guidance_scale": s.guidance_scale,
                    "generator": gens,
                    "output_type": "pt",
                    "truncate_alphabar": truncate,
                }
                autocast = torch.autocast(
                    pipe.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                )
                if k == 0:
                    with autocast:
                        out = pipe(ids[lo:hi], **common)
                else:
                    handed_over = alphabar is not None
                    level = (
                        nearest_level(alphabar, pipe.image_noising_scheduler) if handed_over else s.aug_level
                    )
                    labels = ids[lo:hi] if pipe.num_classes else None
                    with autocast:
                        out = pipe(
                            x[lo:hi].to(pipe.device),
                            class_labels=labels,
                            noise_level=level,
                            low_res_is_augmented=handed_over,
                            **common,
                        )
                chunks.append(out.images.float().cpu())
                alphabars.append(out.alphabar)
            x, alphabar = torch.cat(chunks), alphabars[0]
            seconds.append(time.perf_counter() - start)
            outputs.append(x)  # for a truncated stage: the noisy z_s handed to the next stage
            if on_stage_end is not None:
                on_stage_end(k, name, x)
        return CascadeOutput(images=outputs, seconds=seconds, stage_names=list(self.names), class_ids=ids)


def write_cascade_json(
    root: Path, names: list[str], settings: list[StageSettings], extra: dict | None = None
):
    """cascade.json: stage order, each stage's folder and sampling defaults."""
    spec = {
        "format": "cdm-cascade",
        "version": 1,
        "stages": [{"name": n, "path": n, "sampling": asdict(s)} for n, s in zip(names, settings)],
        **(extra or {}),
    }
    (Path(root) / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
