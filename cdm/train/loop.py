"""The training loop of one cascade stage, with accelerate: setup, data, one step, samples, checkpoints, export.

`cdm-train` (cdm.cli.train) composes the configuration and calls `train(cfg)`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import accelerate
import torch
from accelerate.utils import set_seed
from cdm_pipelines import augment_low_res, level_embedding
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cdm.config import StageKind
from cdm.devices import training_precision
from cdm.errors import UserError, one_line
from cdm.images import save_grid
from cdm.models import build_noise_scheduler, build_pipeline, build_unet, count_parameters
from cdm.seeding import generator
from cdm.stage_io import export_stage, find_stage_folder, load_stage, resolve_model, stage_info
from cdm.train.checkpoint import list_checkpoints, load_latest, save_checkpoint
from cdm.train.data import (
    IndexStream,
    StageDataset,
    StreamingStageDataset,
    check_images_fit,
    collate,
    open_dataset,
)
from cdm.train.degradations import downsample, drop_labels, random_blur, sample_levels
from cdm.train.losses import DiffusionLoss
from cdm.train.run_folder import finished, flat_config, lock_run, resolve_run_dir


def stage_model_fn(unet, cfg, batch, noising, num_classes, generator):
    """The stage's conditioning, closed over a `model_fn(x_t, t)` for the loss, and the target x_0."""
    stage = cfg.stage
    x0 = batch["images"] * 2 - 1  # the model's space: images in [0, 1] become [-1, 1] here, and only here
    labels = batch["labels"].to(x0.device)
    if stage.class_conditional:
        labels = drop_labels(labels, stage.label_dropout, num_classes, generator)
    else:
        labels = None
    if stage.kind == StageKind.base:
        return x0, lambda x_t, t: unet(x_t, t, class_labels=labels).sample
    # SR: anti-aliased bicubic downsample, optional blur, then noise augmentation at a random level s
    x_lr = random_blur(
        downsample(x0, stage.resolution // stage.low_res), stage.blur_prob, stage.blur_sigma, generator
    )
    noise_level = sample_levels(x0.shape[0], stage.noise_level_max, generator).to(x0.device)
    cond = augment_low_res(x_lr, x0.shape[-2:], noise_level, noising, generator, stage.noise_at_low_res)
    cond = cond.to(x0.dtype)
    if stage.residual:  # the target is the scaled residual over the clean upsample (as the pipeline adds it)
        x0 = (x0 - augment_low_res(x_lr, x0.shape[-2:], 0, noising).to(x0.dtype)) * stage.residual_scale
    level_emb = level_embedding(noise_level, cfg.unet.level_embed_dim).to(x0.device, x0.dtype)

    def model_fn(x_t, t):
        x_in = torch.cat([x_t, cond], dim=1)
        return unet(x_in, t, encoder_hidden_states=None, class_labels=labels, timestep_cond=level_emb).sample

    return x0, model_fn


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """All training randomness of one micro-step on one rank: a pure function of (seed, step, rank)."""
    return generator(seed, step, rank, weight=1_009)


def save_samples(cfg, pipe, fixed, path: Path, num_classes: int) -> None:
    """A grid from the EMA weights: classes for the base stage; [input | output | target] for SR."""
    n = cfg.train.num_samples
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    kw = {"num_inference_steps": cfg.stage.sample.steps, "generator": gens, "output_type": "pt"}
    pipe.set_progress_bar_config(disable=True)
    if cfg.stage.kind == StageKind.base:
        out = pipe([i % num_classes for i in range(n)], guidance_scale=cfg.stage.sample.guidance_scale, **kw)
        save_grid(list(out.images), path, ncols=min(n, 8))
        return
    target = fixed["images"][:n]
    # the anti-aliased bicubic downsample rings past [0, 1], which the pipeline refuses
    x_lr = downsample(target, cfg.stage.resolution // cfg.stage.low_res).clamp(0, 1)
    labels = fixed["labels"][:n].tolist() if cfg.stage.class_conditional else None
    kw["generator"] = gens[: len(target)]
    out = pipe(
        x_lr,
        class_labels=labels,
        noise_level=cfg.stage.sample.noise_level,
        allow_any_size=True,
        **kw,
    )
    up = torch.nn.functional.interpolate(x_lr, size=target.shape[-2:], mode="bicubic").clamp(0, 1)
    rows = [img for triple in zip(up, out.images, target) for img in triple]
    save_grid(rows, path, ncols=3)


class Trainer:
    """One training launch: the accelerator, the data, the model and its optimisation, and the progress.

    Built whole from the config: the data first (the UNet's class count comes from it), then the model,
    restored from `resume_from` when a run resumes. `run_loop` and `finish` then advance and close it.
    """

    def __init__(self, cfg: DictConfig, accelerator, run_dir: Path, resume_from: Path | None):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.step = 0
        self.loss = float("nan")
        self.skipped = {"corrupt": 0, "small": 0}
        self.side_seconds = 0.0  # sampling and checkpoints, timed apart from training steps
        self.init_record: dict | None = None  # what train.init_from named, read once when the run began
        self._load_data()
        self._build_model(resume_from)
        self.start_step = self.step  # where this launch began (resume)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    def _load_data(self) -> None:
        cfg, opts = self.cfg, self.cfg.train
        with self.accelerator.main_process_first():  # offline sets are built once, by the main process
            ds, label_col, self.id2label = open_dataset(cfg.data)
        if hasattr(ds, "__len__"):
            self.dataset = StageDataset(
                ds, cfg.data, label_col, (cfg.stage.resolution, cfg.stage.crop_size), opts.seed
            )
        else:
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            self.dataset = StreamingStageDataset(
                ds,
                cfg.data,
                label_col,
                (cfg.stage.resolution, cfg.stage.crop_size),
                opts.seed,
                opts.batch_size,
                rank,
                world,
            )
        check_images_fit(self.dataset)

    def _build_model(self, resume_from: Path | None) -> None:
        """UNet, forward process, loss, EMA, optimizer and LR schedule; restored from a checkpoint on resume."""
        cfg, opts, accelerator = self.cfg, self.cfg.train, self.accelerator
        unet = build_unet(cfg.stage, cfg.unet, self.num_classes)
        if resume_from is None and opts.init_from:  # before the EMA copies the weights
            self.init_record = init_weights(unet, opts.init_from)
        self.noising = build_noise_scheduler(cfg.stage)
        self.loss_fn = DiffusionLoss(
            self.noising,
            cfg.stage.prediction_type.value,
            cfg.stage.timestep_power,
            cfg.stage.estimate_fraction,
        )
        self.ema = EMAModel(
            unet.parameters(),
            decay=opts.ema_decay,
            use_ema_warmup=opts.ema_warmup,
            model_cls=type(unet),
            model_config=unet.config,
        )
        optimizer = torch.optim.AdamW(
            unet.parameters(),
            lr=opts.learning_rate,
            betas=(0.9, opts.adam_beta2),
            weight_decay=opts.weight_decay,
            fused=accelerator.device.type in ("cpu", "cuda"),  # one kernel for every parameter's update
        )
        lr_scheduler = make_lr_scheduler(optimizer, opts, accelerator.num_processes)
        if resume_from is not None:
            candidates = (
                list_checkpoints(self.run_dir / "checkpoints") if opts.resume == "latest" else [resume_from]
            )
            state = load_latest(candidates, unet, self.ema, optimizer, lr_scheduler)
            self.step, self.init_record = state["step"], state.get("init_from")
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        self.ema.to(accelerator.device)


def train(cfg: DictConfig, notes: list[str] = ()) -> Path:
    """Train one stage, top to bottom: setup, data, model, batches, the loop, the export."""
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.train.output_dir)
    resolve_run_dir(cfg, locked=False)  # refuse before taking the lock: a refused launch changes nothing
    _lock = lock_run(run_dir) if accelerator.is_main_process else None  # one writer per run folder
    run_dir, resume_from = resolve_run_dir(cfg)  # again, now that no other process can change it
    if resume_from is not None and finished(resume_from, cfg.train.max_steps, run_dir):
        if accelerator.is_main_process:
            print(
                f"{run_dir} is finished ({cfg.train.max_steps} steps, exported to {run_dir / 'export'}): nothing to do"
            )
        return run_dir
    set_seed(cfg.train.seed)
    trainer = Trainer(cfg, accelerator, run_dir, resume_from)
    write_run_config(trainer)
    loader, fixed = make_loader(trainer)
    if trainer.main:  # every check has passed: log how the launcher's settings were resolved
        for note in notes:
            print(note, file=sys.stderr)
    elapsed = run_loop(trainer, loader, fixed)
    finish(trainer, elapsed)
    # Drop the DDP wrapper while the process group is still registered: if its reducer held the last
    # reference, gloo's destructor would join worker threads that wait for the GIL this thread holds.
    trainer.unet = trainer.optimizer = trainer.lr_scheduler = loader = None
    accelerator.free_memory()
    accelerator.end_training()
    return run_dir


def make_accelerator(cfg: DictConfig):
    opts = cfg.train
    precision = training_precision(getattr(opts.mixed_precision, "value", opts.mixed_precision))
    opts.mixed_precision = precision  # what ran, in the run's config and record
    try:
        return accelerate.Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=opts.grad_accum,
            log_with=None if opts.tracker == "none" else opts.tracker,
            project_config=accelerate.utils.ProjectConfiguration(
                project_dir=opts.output_dir, logging_dir=str(Path(opts.output_dir) / "logs")
            ),
        )
    except (ValueError, RuntimeError) as err:
        raise UserError(f"train.mixed_precision={precision}: {one_line(err)}") from None


LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def make_lr_scheduler(optimizer, opts, num_processes: int = 1):
    """Linear warm-up, then train.lr_schedule (accelerate steps a prepared scheduler once per process)."""
    return get_scheduler(
        LR_SCHEDULES[getattr(opts.lr_schedule, "value", opts.lr_schedule)],
        optimizer,
        num_warmup_steps=opts.warmup_steps * num_processes,
        num_training_steps=opts.max_steps * num_processes,
    )


def init_weights(unet, source: str) -> dict:
    """Copy the UNet weights of a stage folder, a finished run or a Hub repo id into `unet` (fine-tuning);
    returns the source and its own training record, for the card."""
    try:
        folder = find_stage_folder(resolve_model(source))
        pipe = load_stage(folder)
    except UserError as err:
        raise UserError(f"train.init_from={source}: {err}") from None
    theirs, ours = pipe.unet.state_dict(), unet.state_dict()
    wrong = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    extra = [k for k in theirs if k not in ours]
    if wrong or extra:
        k = (wrong or extra)[0]
        got = tuple(theirs[k].shape) if k in theirs else "missing"
        want = tuple(ours[k].shape) if k in ours else "no such weight"
        raise UserError(
            f"train.init_from={source}: its UNet does not match this run's unet/stage settings "
            f"({len(wrong) + len(extra)} weights differ, e.g. {k}: {got}, expected {want})"
        )
    unet.load_state_dict({k: v.float() for k, v in theirs.items()})
    run = (stage_info(folder) or {}).get("run") or {}
    keep = ("steps", "images_per_step", "data", "init_from")
    return {"source": str(source), **{k: run[k] for k in keep if run.get(k) is not None}}


def write_run_config(trainer: Trainer) -> None:
    tree = OmegaConf.to_container(trainer.cfg, enum_to_str=True)
    if trainer.main:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        (trainer.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(trainer.cfg))
        (trainer.run_dir / "config.json").write_text(json.dumps(tree, indent=1))
    if trainer.accelerator.log_with:
        flat = {k: v for k, v in flat_config(tree).items() if isinstance(v, (int, float, str, bool))}
        trainer.accelerator.init_trackers("cdm", config=flat)


def make_loader(trainer: Trainer):
    """A deterministic stream of batches from the current micro-step, and a fixed batch for samples."""
    opts, accelerator, dataset = trainer.cfg.train, trainer.accelerator, trainer.dataset
    micro, workers = trainer.step * opts.grad_accum, trainer.cfg.data.num_workers
    if isinstance(dataset, StreamingStageDataset):  # records already read are skipped, not decoded
        dataset.start = micro
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=opts.batch_size, collate_fn=collate, num_workers=workers
        )
        fixed = collate(dataset.first_examples(opts.num_samples * 4))
    else:
        sampler = IndexStream(
            len(dataset),
            opts.batch_size,
            opts.seed,
            accelerator.process_index,
            accelerator.num_processes,
            start=micro,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers
        )
        fixed = collate([dataset[(0, i)] for i in range(min(len(dataset), opts.num_samples * 4))])
    if fixed["images"] is not None:
        fixed["images"] = fixed["images"][: opts.num_samples]
    return loader, fixed


ESTIMATE_AFTER = 10  # steps timed before the whole run's time is estimated


def run_estimate(trainer: Trainer, seconds: float, total_steps: int) -> str:
    """One line after the first steps: how long the whole run will take on this machine."""
    hours = seconds / ESTIMATE_AFTER * total_steps / 3600
    device = trainer.accelerator.device.type
    took = f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"
    line = f"{trainer.cfg.stage.name}: {seconds / ESTIMATE_AFTER:.2f}s per step on {device}: about {took} for {total_steps} steps"
    if device == "cpu" and hours > 2:
        line += (
            "; this recipe is sized for a GPU (the README lists the recipes that fit a CPU, "
            "e.g. experiment=demo_sr64to256), or shorten it with train.max_steps=N"
        )
    return line


def run_loop(trainer: Trainer, loader, fixed) -> float:
    """Optimizer steps until train.max_steps (or train.stop_after); returns the seconds it took."""
    opts = trainer.cfg.train
    bar = tqdm(
        total=opts.max_steps,
        initial=trainer.step,
        disable=not trainer.main,
        desc=f"train {trainer.cfg.stage.name}",
        unit="step",
    )
    start_time, stop_at = (
        time.time(),
        min(opts.max_steps, opts.stop_after) if opts.stop_after else opts.max_steps,
    )
    micro, first_step = trainer.step * opts.grad_accum, trainer.step
    trainer.unet.train()
    for batch in loader:
        if trainer.step >= stop_at:
            break
        loss = train_micro_step(
            trainer, batch, step_generator(opts.seed, micro, trainer.accelerator.process_index)
        )
        micro += 1
        if not trainer.accelerator.sync_gradients:
            continue
        trainer.step += 1
        trainer.ema.step(trainer.unet.parameters())
        trainer.loss = trainer.accelerator.gather(loss.detach().float().reshape(1)).mean().item()
        bar.update(1)
        if trainer.step - first_step == ESTIMATE_AFTER and trainer.main:
            tqdm.write(run_estimate(trainer, time.time() - start_time, stop_at - first_step), file=sys.stderr)
        after_step(trainer, bar, fixed, stop_at)
    bar.close()
    trainer.accelerator.wait_for_everyone()
    return time.time() - start_time


def train_micro_step(trainer: Trainer, batch: dict, gen: torch.Generator) -> torch.Tensor:
    """Forward, backward and (when gradients sync) one optimizer step."""
    accelerator, opts = trainer.accelerator, trainer.cfg.train
    trainer.skipped["corrupt"] += batch["skipped_corrupt"]
    trainer.skipped["small"] += batch["skipped_small"]
    with accelerator.accumulate(trainer.unet):
        if batch["images"] is not None:
            batch["images"] = batch["images"].to(accelerator.device)
            x0, model_fn = stage_model_fn(
                trainer.unet, trainer.cfg, batch, trainer.noising, trainer.num_classes, gen
            )
            with accelerator.autocast():
                loss = trainer.loss_fn(model_fn, x0, gen)
        else:  # every example of this micro-batch was skipped: keep ranks in step with a zero loss
            loss = sum(p.sum() for p in trainer.unet.parameters()) * 0.0
        accelerator.backward(loss)
        if accelerator.sync_gradients and opts.grad_clip > 0:
            accelerator.clip_grad_norm_(trainer.unet.parameters(), opts.grad_clip)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return loss


def after_step(trainer: Trainer, bar, fixed, stop_at: int) -> None:
    """Logging every train.log_every steps; samples and checkpoints, timed apart from training."""
    opts, step = trainer.cfg.train, trainer.step
    if step % opts.log_every == 0 or step == stop_at:
        bar.set_postfix(loss=f"{trainer.loss:.4f}")
        logs = {
            "loss": trainer.loss,
            "lr": trainer.lr_scheduler.get_last_lr()[0],
            "ema_decay": trainer.ema.cur_decay_value or 0.0,
        }
        trainer.accelerator.log(logs, step=step)
    side_start = time.time()
    if (
        trainer.main
        and (step % opts.sample_every == 0 or step == opts.max_steps)
        and fixed["images"] is not None
    ):
        pipe = ema_pipeline(trainer).to(trainer.accelerator.device)
        save_samples(
            trainer.cfg,
            pipe,
            fixed,
            trainer.run_dir / "samples" / f"step-{step:07d}.png",
            trainer.num_classes,
        )
    if step % opts.checkpoint_every == 0 or step == stop_at:
        trainer.accelerator.wait_for_everyone()
        if trainer.main:
            extra = {"skipped": trainer.skipped, "world_size": trainer.accelerator.num_processes}
            extra["init_from"] = trainer.init_record  # a resumed run keeps what it started from
            unet = trainer.accelerator.unwrap_model(trainer.unet)
            save_checkpoint(
                trainer.run_dir / "checkpoints",
                step,
                unet,
                trainer.ema,
                trainer.optimizer,
                trainer.lr_scheduler,
                extra,
                opts.keep_checkpoints,
            )
    trainer.side_seconds += time.time() - side_start


def ema_pipeline(trainer: Trainer):
    """The stage pipeline with the EMA weights (a fresh UNet; the training one keeps its own)."""
    unet = build_unet(trainer.cfg.stage, trainer.cfg.unet, trainer.num_classes)
    trainer.ema.copy_to(unet.parameters())
    return build_pipeline(
        trainer.cfg.stage, trainer.cfg.unet, trainer.num_classes, trainer.id2label, unet=unet.eval()
    )


def finish(trainer: Trainer, elapsed: float) -> None:
    """Check the ranks agree, export the EMA stage if training is complete, and record the run."""
    checksum = torch.tensor(
        [sum(p.double().sum().item() for p in trainer.unet.parameters())], device=trainer.accelerator.device
    )
    checksums = trainer.accelerator.gather(
        checksum
    ).tolist()  # data-parallel ranks must hold the same weights
    if not trainer.main:
        return
    info = run_record(trainer, elapsed, checksums)
    done = trainer.step >= trainer.cfg.train.max_steps
    if done:
        sections = ("stage", "unet", "data", "train")
        record = {k: OmegaConf.to_container(trainer.cfg[k], enum_to_str=True) for k in sections}
        export_stage(ema_pipeline(trainer), trainer.run_dir / "export", {**record, "run": info})
    info_path = trainer.run_dir / "run_info.json"
    previous = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["seconds_total"] = round(previous.get("seconds_total", 0) + elapsed, 2)
    info_path.write_text(json.dumps(info, indent=1))
    if any(trainer.skipped.values()):
        print(
            f"skipped {trainer.skipped['corrupt']} corrupt images and {trainer.skipped['small']} smaller than the crop",
            file=sys.stderr,
        )
    where = trainer.run_dir / "export" if done else trainer.run_dir / "checkpoints"
    print(
        f"{trainer.cfg.stage.name}: {trainer.step} steps in {elapsed:.1f}s, loss {trainer.loss:.4f}; saved to {where}"
    )


def run_record(trainer: Trainer, elapsed: float, checksums: list) -> dict:
    opts, world = trainer.cfg.train, trainer.accelerator.num_processes
    return {
        "stage": trainer.cfg.stage.name,
        "steps": trainer.step,
        "target_steps": opts.max_steps,
        "final_loss": trainer.loss if math.isfinite(trainer.loss) else None,  # JSON has no NaN
        "seconds_this_launch": round(elapsed, 2),
        "steps_per_second": round(
            (trainer.step - trainer.start_step) / max(elapsed - trainer.side_seconds, 1e-9), 4
        ),
        "seconds_sampling_and_checkpoints": round(trainer.side_seconds, 2),
        "images_per_step": opts.batch_size * opts.grad_accum * world,
        "world_size": world,
        "rank_weight_checksums": checksums,
        "parameters": count_parameters(trainer.accelerator.unwrap_model(trainer.unet)),
        "num_classes": trainer.num_classes,
        "skipped_examples": trainer.skipped,
        "data": _data_name(trainer.cfg),
        "init_from": trainer.init_record,
    }


def _data_name(cfg) -> str:
    d = cfg.data
    return d.name or (f"{d.source.value}" if d.source.value in ("digits", "photos") else str(d.path))
