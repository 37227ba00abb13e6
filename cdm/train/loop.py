"""The training loop of one cascade stage, with accelerate: setup, data, one step, samples, checkpoints, export.

`cdm-train` (cdm.cli.train) composes the configuration and calls `train(cfg)`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
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

LAUNCH_FILES = {".hydra", ".lock", "train.log"}  # what a launch writes before it knows it may run
# settings a resumed run may change: when it stops, how often it logs, samples and saves
RESUMABLE = (
    "train.max_steps",
    "train.stop_after",
    "train.resume",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.num_samples",
    "train.tracker",
    "train.output_dir",
    "data.num_workers",
)


def flat_config(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """A resumed run continues the same run: a changed seed, batch size, learning rate or model is refused
    with the keys that differ; steps, logging and checkpoint settings may change."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        before = flat_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON: the run's config is needed to resume it") from None
    now = flat_config(OmegaConf.to_container(cfg, enum_to_str=True))
    changed = sorted(
        k for k in set(before) | set(now) if before.get(k) != now.get(k) and not k.startswith(RESUMABLE)
    )
    if changed:
        shown = ", ".join(f"{k}={before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise UserError(
            f"train.resume=latest: the run was started with other settings ({shown}"
            f"{', ...' if len(changed) > 3 else ''}); only {', '.join(RESUMABLE[:2])} and the logging and "
            "checkpoint settings may change; start a new run in another train.output_dir"
        )


def resolve_run_dir(cfg: DictConfig, locked: bool = True) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from; never reuse a finished or running folder silently."""
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume = cfg.train.resume
    if resume is None:
        if list_checkpoints(ckpt_dir) or (run_dir / "export").exists():
            raise UserError(
                f"train.output_dir={run_dir} already holds a run: pass train.resume=latest to continue it, "
                "or choose another train.output_dir"
            )
        foreign = (
            sorted(p.name for p in run_dir.iterdir() if p.name not in LAUNCH_FILES)
            if run_dir.is_dir()
            else []
        )
        if foreign and (run_dir / ".lock").is_file() and (run_dir / "config.yaml").is_file():
            if not locked:  # it may be running: taking the lock tells, with the holder's PID
                return run_dir, None
            raise UserError(  # a run another launch started (lock_run names its PID while it runs)
                f"train.output_dir={run_dir} holds a run that has no checkpoint yet: pass train.resume=latest "
                "once it has one, or choose another train.output_dir"
            )
        if foreign:
            raise UserError(
                f"train.output_dir={run_dir} holds {foreign[0]!r} and is not a cdm run: a new run starts in a new "
                "or empty folder, and nothing there was changed; choose another train.output_dir"
            )
        return run_dir, None
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"train.resume=latest: no checkpoint in {ckpt_dir}")
        check_resumable(run_dir, cfg)
        return run_dir, found[-1]
    path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise UserError(f"train.resume={resume}: not a checkpoint folder (expected trainer.json inside)")
    return run_dir, path


def lock_run(run_dir: Path):
    """An exclusive lock on the run folder (fcntl.flock); a second writer stops with the holder's PID."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(
            f"train.output_dir={run_dir} is in use by another cdm-train (PID {holder}): "
            "wait for it to finish or choose another train.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def finished(checkpoint: Path, max_steps: int, run_dir: Path) -> bool:
    """The checkpoint is the run's last step and the export exists: resuming would only rewrite records."""
    try:
        step = json.loads((checkpoint / "trainer.json").read_text()).get("step", 0)
    except (OSError, ValueError):
        return False  # unreadable: the loader falls back to an earlier checkpoint and says so
    return step >= max_steps and (run_dir / "export" / "model_index.json").is_file()


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


@dataclass
class Trainer:
    """What one training launch holds: the accelerator, the model and its optimisation, the data."""

    cfg: DictConfig
    accelerator: object
    run_dir: Path
    unet: torch.nn.Module = None
    ema: object = None
    optimizer: object = None
    lr_scheduler: object = None
    noising: object = None
    loss_fn: object = None
    dataset: object = None
    id2label: dict = field(default_factory=dict)
    step: int = 0
    start_step: int = 0  # where this launch began (resume)
    loss: float = float("nan")
    skipped: dict = field(default_factory=lambda: {"corrupt": 0, "small": 0})
    side_seconds: float = 0.0  # sampling and checkpoints, timed apart from training steps
    init_record: dict | None = None  # what train.init_from named, read once when the run began

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_classes(self) -> int:
        return len(self.id2label)


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
    tr = Trainer(cfg, accelerator, run_dir)
    setup_data(tr)
    setup_model(tr, resume_from)
    write_run_config(tr)
    loader, fixed = make_loader(tr)
    if tr.main:  # every check has passed: log how the launcher's settings were resolved
        for note in notes:
            print(note, file=sys.stderr)
    elapsed = run_loop(tr, loader, fixed)
    finish(tr, elapsed)
    # Drop the DDP wrapper while the process group is still registered: if its reducer held the last
    # reference, gloo's destructor would join worker threads that wait for the GIL this thread holds.
    tr.unet = tr.optimizer = tr.lr_scheduler = loader = None
    accelerator.free_memory()
    accelerator.end_training()
    return run_dir


def make_accelerator(cfg: DictConfig):
    t = cfg.train
    precision = getattr(t.mixed_precision, "value", t.mixed_precision)
    try:
        return accelerate.Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=t.grad_accum,
            log_with=None if t.tracker == "none" else t.tracker,
            project_config=accelerate.utils.ProjectConfiguration(
                project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs")
            ),
        )
    except (ValueError, RuntimeError) as err:
        raise UserError(f"train.mixed_precision={precision}: {one_line(err)}") from None


def setup_data(tr: Trainer) -> None:
    cfg, t = tr.cfg, tr.cfg.train
    with tr.accelerator.main_process_first():  # offline sets are built once, by the main process
        ds, label_col, tr.id2label = open_dataset(cfg.data)
    if hasattr(ds, "__len__"):
        tr.dataset = StageDataset(
            ds, cfg.data, label_col, (cfg.stage.resolution, cfg.stage.crop_size), t.seed
        )
    else:
        rank, world = tr.accelerator.process_index, tr.accelerator.num_processes
        tr.dataset = StreamingStageDataset(
            ds,
            cfg.data,
            label_col,
            (cfg.stage.resolution, cfg.stage.crop_size),
            t.seed,
            t.batch_size,
            rank,
            world,
        )
    check_images_fit(tr.dataset)


def setup_model(tr: Trainer, resume_from: Path | None) -> None:
    """UNet, forward process, loss, EMA, optimizer and LR schedule; restored from a checkpoint on resume."""
    cfg, t, acc = tr.cfg, tr.cfg.train, tr.accelerator
    unet = build_unet(cfg.stage, cfg.unet, tr.num_classes)
    if resume_from is None and t.init_from:  # before the EMA copies the weights
        tr.init_record = init_weights(unet, t.init_from)
    tr.noising = build_noise_scheduler(cfg.stage)
    tr.loss_fn = DiffusionLoss(tr.noising, cfg.stage.prediction_type.value, cfg.stage.timestep_power)
    tr.ema = EMAModel(
        unet.parameters(),
        decay=t.ema_decay,
        use_ema_warmup=t.ema_warmup,
        model_cls=type(unet),
        model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=t.learning_rate, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay
    )
    lr_scheduler = make_lr_scheduler(optimizer, t, acc.num_processes)
    if resume_from is not None:
        candidates = list_checkpoints(tr.run_dir / "checkpoints") if t.resume == "latest" else [resume_from]
        state = load_latest(candidates, unet, tr.ema, optimizer, lr_scheduler)
        tr.step, tr.init_record = state["step"], state.get("init_from")
    tr.start_step = tr.step
    tr.unet, tr.optimizer, tr.lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    tr.ema.to(acc.device)


LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def make_lr_scheduler(optimizer, t, num_processes: int = 1):
    """Linear warm-up, then train.lr_schedule (accelerate steps a prepared scheduler once per process)."""
    return get_scheduler(
        LR_SCHEDULES[getattr(t.lr_schedule, "value", t.lr_schedule)],
        optimizer,
        num_warmup_steps=t.warmup_steps * num_processes,
        num_training_steps=t.max_steps * num_processes,
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


def write_run_config(tr: Trainer) -> None:
    tree = OmegaConf.to_container(tr.cfg, enum_to_str=True)
    if tr.main:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        (tr.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(tr.cfg))
        (tr.run_dir / "config.json").write_text(json.dumps(tree, indent=1))
    if tr.accelerator.log_with:
        flat = {k: v for k, v in _flatten(tree).items() if isinstance(v, (int, float, str, bool))}
        tr.accelerator.init_trackers("cdm", config=flat)


def make_loader(tr: Trainer):
    """A deterministic stream of batches from the current micro-step, and a fixed batch for samples."""
    t, acc, dataset = tr.cfg.train, tr.accelerator, tr.dataset
    micro, workers = tr.step * t.grad_accum, tr.cfg.data.num_workers
    if isinstance(dataset, StreamingStageDataset):  # records already read are skipped, not decoded
        dataset.start = micro
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, collate_fn=collate, num_workers=workers
        )
        fixed = collate(dataset.first_examples(t.num_samples * 4))
    else:
        sampler = IndexStream(
            len(dataset), t.batch_size, t.seed, acc.process_index, acc.num_processes, start=micro
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers
        )
        fixed = collate([dataset[(0, i)] for i in range(min(len(dataset), t.num_samples * 4))])
    if fixed["images"] is not None:
        fixed["images"] = fixed["images"][: t.num_samples]
    return loader, fixed


ESTIMATE_AFTER = 10  # steps timed before the whole run's time is estimated


def run_estimate(tr: Trainer, seconds: float, total_steps: int) -> str:
    """One line after the first steps: how long the whole run will take on this machine."""
    hours = seconds / ESTIMATE_AFTER * total_steps / 3600
    device = tr.accelerator.device.type
    took = f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"
    line = f"{tr.cfg.stage.name}: {seconds / ESTIMATE_AFTER:.2f}s per step on {device}: about {took} for {total_steps} steps"
    if device == "cpu" and hours > 2:
        line += (
            "; this recipe is sized for a GPU (the README lists the recipes that fit a CPU, "
            "e.g. experiment=demo_sr64to256), or shorten it with train.max_steps=N"
        )
    return line


def run_loop(tr: Trainer, loader, fixed) -> float:
    """Optimizer steps until train.max_steps (or train.stop_after); returns the seconds it took."""
    t = tr.cfg.train
    bar = tqdm(
        total=t.max_steps,
        initial=tr.step,
        disable=not tr.main,
        desc=f"train {tr.cfg.stage.name}",
        unit="step",
    )
    start_time, stop_at = time.time(), min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
    micro, first_step = tr.step * t.grad_accum, tr.step
    tr.unet.train()
    for batch in loader:
        if tr.step >= stop_at:
            break
        loss = train_micro_step(tr, batch, step_generator(t.seed, micro, tr.accelerator.process_index))
        micro += 1
        if not tr.accelerator.sync_gradients:
            continue
        tr.step += 1
        tr.ema.step(tr.unet.parameters())
        tr.loss = tr.accelerator.gather(loss.detach().float().reshape(1)).mean().item()
        bar.update(1)
        if tr.step - first_step == ESTIMATE_AFTER and tr.main:
            tqdm.write(run_estimate(tr, time.time() - start_time, stop_at - first_step), file=sys.stderr)
        after_step(tr, bar, fixed, stop_at)
    bar.close()
    tr.accelerator.wait_for_everyone()
    return time.time() - start_time


def train_micro_step(tr: Trainer, batch: dict, gen: torch.Generator) -> torch.Tensor:
    """Forward, backward and (when gradients sync) one optimizer step."""
    acc, t = tr.accelerator, tr.cfg.train
    tr.skipped["corrupt"] += batch["skipped_corrupt"]
    tr.skipped["small"] += batch["skipped_small"]
    with acc.accumulate(tr.unet):
        if batch["images"] is not None:
            batch["images"] = batch["images"].to(acc.device)
            x0, model_fn = stage_model_fn(tr.unet, tr.cfg, batch, tr.noising, tr.num_classes, gen)
            with acc.autocast():
                loss = tr.loss_fn(model_fn, x0, gen)
        else:  # every example of this micro-batch was skipped: keep ranks in step with a zero loss
            loss = sum(p.sum() for p in tr.unet.parameters()) * 0.0
        acc.backward(loss)
        if acc.sync_gradients and t.grad_clip > 0:
            acc.clip_grad_norm_(tr.unet.parameters(), t.grad_clip)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
    return loss


def after_step(tr: Trainer, bar, fixed, stop_at: int) -> None:
    """Logging every train.log_every steps; samples and checkpoints, timed apart from training."""
    t, step = tr.cfg.train, tr.step
    if step % t.log_every == 0 or step == stop_at:
        bar.set_postfix(loss=f"{tr.loss:.4f}")
        logs = {
            "loss": tr.loss,
            "lr": tr.lr_scheduler.get_last_lr()[0],
            "ema_decay": tr.ema.cur_decay_value or 0.0,
        }
        tr.accelerator.log(logs, step=step)
    side_start = time.time()
    if tr.main and (step % t.sample_every == 0 or step == t.max_steps) and fixed["images"] is not None:
        pipe = ema_pipeline(tr).to(tr.accelerator.device)
        save_samples(tr.cfg, pipe, fixed, tr.run_dir / "samples" / f"step-{step:07d}.png", tr.num_classes)
    if step % t.checkpoint_every == 0 or step == stop_at:
        tr.accelerator.wait_for_everyone()
        if tr.main:
            extra = {"skipped": tr.skipped, "world_size": tr.accelerator.num_processes}
            extra["init_from"] = tr.init_record  # a resumed run keeps what it started from
            unet = tr.accelerator.unwrap_model(tr.unet)
            save_checkpoint(
                tr.run_dir / "checkpoints",
                step,
                unet,
                tr.ema,
                tr.optimizer,
                tr.lr_scheduler,
                extra,
                t.keep_checkpoints,
            )
    tr.side_seconds += time.time() - side_start


def ema_pipeline(tr: Trainer):
    """The stage pipeline with the EMA weights (a fresh UNet; the training one keeps its own)."""
    unet = build_unet(tr.cfg.stage, tr.cfg.unet, tr.num_classes)
    tr.ema.copy_to(unet.parameters())
    return build_pipeline(tr.cfg.stage, tr.cfg.unet, tr.num_classes, tr.id2label, unet=unet.eval())


def finish(tr: Trainer, elapsed: float) -> None:
    """Check the ranks agree, export the EMA stage if training is complete, and record the run."""
    checksum = torch.tensor(
        [sum(p.double().sum().item() for p in tr.unet.parameters())], device=tr.accelerator.device
    )
    checksums = tr.accelerator.gather(checksum).tolist()  # data-parallel ranks must hold the same weights
    if not tr.main:
        return
    info = run_record(tr, elapsed, checksums)
    done = tr.step >= tr.cfg.train.max_steps
    if done:
        sections = ("stage", "unet", "data", "train")
        record = {k: OmegaConf.to_container(tr.cfg[k], enum_to_str=True) for k in sections}
        export_stage(ema_pipeline(tr), tr.run_dir / "export", {**record, "run": info})
    info_path = tr.run_dir / "run_info.json"
    previous = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["seconds_total"] = round(previous.get("seconds_total", 0) + elapsed, 2)
    info_path.write_text(json.dumps(info, indent=1))
    if any(tr.skipped.values()):
        print(
            f"skipped {tr.skipped['corrupt']} corrupt images and {tr.skipped['small']} smaller than the crop",
            file=sys.stderr,
        )
    where = tr.run_dir / "export" if done else tr.run_dir / "checkpoints"
    print(f"{tr.cfg.stage.name}: {tr.step} steps in {elapsed:.1f}s, loss {tr.loss:.4f}; saved to {where}")


def run_record(tr: Trainer, elapsed: float, checksums: list) -> dict:
    t, world = tr.cfg.train, tr.accelerator.num_processes
    return {
        "stage": tr.cfg.stage.name,
        "steps": tr.step,
        "target_steps": t.max_steps,
        "final_loss": tr.loss if math.isfinite(tr.loss) else None,  # JSON has no NaN
        "seconds_this_launch": round(elapsed, 2),
        "steps_per_second": round((tr.step - tr.start_step) / max(elapsed - tr.side_seconds, 1e-9), 4),
        "seconds_sampling_and_checkpoints": round(tr.side_seconds, 2),
        "images_per_step": t.batch_size * t.grad_accum * world,
        "world_size": world,
        "rank_weight_checksums": checksums,
        "parameters": count_parameters(tr.accelerator.unwrap_model(tr.unet)),
        "num_classes": tr.num_classes,
        "skipped_examples": tr.skipped,
        "data": _data_name(tr.cfg),
        "init_from": tr.init_record,
    }


def _data_name(cfg) -> str:
    d = cfg.data
    return d.name or (f"{d.source.value}" if d.source.value in ("digits", "photos") else str(d.path))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
