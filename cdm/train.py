"""cdm-train: train one cascade stage with accelerate, configured by Hydra.

cdm-train stage=sr64to256 data=imagefolder data.path=DIR train.max_steps=20000
accelerate launch --num_processes 8 -m cdm.train stage=base64 data=imagenet
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from cdm_pipelines import augment_low_res, level_embedding
from omegaconf import DictConfig, OmegaConf

from cdm.config import StageKind, TrainRunConfig, config_dir, register_configs, validate
from cdm.degradations import downsample, drop_labels, random_blur, sample_levels
from cdm.errors import UserError, cli

HELP = """usage: cdm-train [KEY=VALUE ...]

Train one stage of a cascade. Overrides use Hydra syntax; config groups:
  stage=base64|sr64to256|sr256to1024   unet=tiny|small|paper
  data=digits|photos|imagefolder|hub|imagenet   experiment=NAME (conf/experiment/)
Common keys: data.path=DIR  train.max_steps=N  train.batch_size=N  train.mixed_precision=no|fp16|bf16
             train.output_dir=DIR  train.resume=latest|PATH  --cfg (print the composed config and exit)
Scale out:   accelerate launch --num_processes N -m cdm.train stage=...
"""


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _one_line(err: Exception) -> str:
    """Hydra and OmegaConf errors span lines and chained causes; keep the informative lines."""
    skip = (
        "full_key:",
        "object_type",
        "reference_type",
        "Set the environment",
        "Use --",
        "Available options",
        "To append to your config",
    )
    lines = []
    while err is not None:
        lines += [
            ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith(skip)
        ]
        err = err.__cause__
    return ": ".join(dict.fromkeys(lines))


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml with overrides; any problem becomes a one-line UserError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose(config_name="train", overrides=overrides)
        OmegaConf.resolve(cfg)
    except MissingConfigException as err:
        for group in ("stage", "unet", "data", "experiment"):
            for o in overrides:
                if o.split("=")[0].lstrip("+~") == group and f"'{group}/" in str(err):
                    raise UserError(
                        f"{o}: no such {group}; expected one of {', '.join(_group_options(group))}"
                    ) from None
        raise UserError(_one_line(err)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UserError(_one_line(err)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " (data=imagefolder needs data.path=DIR)" if "data.path" in missing else ""
        raise UserError(f"{', '.join(missing)} is missing: pass {missing[0]}=VALUE{hint}")
    return cfg


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from; never reuse a finished or running folder silently."""
    from cdm.checkpoint import list_checkpoints

    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume = cfg.train.resume
    if resume is None:
        if list_checkpoints(ckpt_dir) or (run_dir / "export").exists():
            raise UserError(
                f"train.output_dir={run_dir} already holds a run: pass train.resume=latest to continue it, "
                "or choose another train.output_dir"
            )
        return run_dir, None
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"train.resume=latest: no checkpoint in {ckpt_dir}")
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
    x0 = batch["images"]
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
    s = sample_levels(x0.shape[0], stage.aug_max_level, generator).to(x0.device)
    cond = augment_low_res(x_lr, x0.shape[-2:], s, noising, generator).to(x0.dtype)
    if stage.residual:  # the target is the scaled residual over the clean upsample (as the pipeline adds it)
        x0 = (x0 - augment_low_res(x_lr, x0.shape[-2:], 0, noising).to(x0.dtype)) * stage.residual_scale
    s_emb = level_embedding(s, cfg.unet.level_embed_dim).to(x0.device, x0.dtype)

    def model_fn(x_t, t):
        x_in = torch.cat([x_t, cond], dim=1)
        return unet(x_in, t, encoder_hidden_states=None, class_labels=labels, timestep_cond=s_emb).sample

    return x0, model_fn


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """All training randomness of one micro-step on one rank: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1))


def save_samples(cfg, pipe, fixed, path: Path, num_classes: int) -> None:
    """A grid from the EMA weights: classes for the base stage; [input | output | target] for SR."""
    from cdm.images import save_grid

    n = cfg.train.num_samples
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    kw = {"num_inference_steps": cfg.stage.sample.steps, "generator": gens, "output_type": "pt"}
    pipe.set_progress_bar_config(disable=True)
    if cfg.stage.kind == StageKind.base:
        out = pipe([i % num_classes for i in range(n)], guidance_scale=cfg.stage.sample.guidance_scale, **kw)
        save_grid(list(out.images), path, ncols=min(n, 8))
        return
    target = fixed["images"][:n]
    x_lr = downsample(target, cfg.stage.resolution // cfg.stage.low_res)
    labels = fixed["labels"][:n].tolist() if cfg.stage.class_conditional else None
    kw["generator"] = gens[: len(target)]
    out = pipe(x_lr, class_labels=labels, noise_level=cfg.stage.sample.aug_level, allow_any_size=True, **kw)
    up = torch.nn.functional.interpolate(x_lr, size=target.shape[-2:], mode="bicubic").clamp(-1, 1)
    rows = [img for triple in zip(up, out.images, target) for img in triple]
    save_grid(rows, path, ncols=3)


def train(cfg: DictConfig, notes: list[str] = ()) -> Path:
    import accelerate
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from cdm.checkpoint import list_checkpoints, load_latest, save_checkpoint
    from cdm.data import (
        IndexStream,
        StageDataset,
        StreamingStageDataset,
        check_images_fit,
        collate,
        open_dataset,
    )
    from cdm.losses import DiffusionLoss
    from cdm.models import build_noise_scheduler, build_pipeline, build_unet, count_parameters
    from cdm.stage_io import save_stage

    t, stage = cfg.train, cfg.stage
    run_dir = Path(cfg.train.output_dir)
    try:
        accelerator = accelerate.Accelerator(
            mixed_precision=t.mixed_precision.value
            if hasattr(t.mixed_precision, "value")
            else t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            log_with=None if t.tracker == "none" else t.tracker,
            project_config=accelerate.utils.ProjectConfiguration(
                project_dir=str(run_dir), logging_dir=str(run_dir / "logs")
            ),
        )
    except (ValueError, RuntimeError) as err:
        value = getattr(t.mixed_precision, "value", t.mixed_precision)
        raise UserError(f"train.mixed_precision={value}: {_one_line(err)}") from None
    main = accelerator.is_main_process
    _lock = lock_run(run_dir) if main else None  # one writer per run folder, held until this process ends
    run_dir, resume_from = resolve_run_dir(cfg)
    if resume_from is not None and finished(resume_from, t.max_steps, run_dir):
        if main:
            print(
                f"{run_dir} is finished ({t.max_steps} steps, exported to {run_dir / 'export'}): nothing to do"
            )
        return run_dir
    set_seed(t.seed)

    # Data
    with accelerator.main_process_first():  # offline sets are built once, by the main process
        ds, label_col, id2label = open_dataset(cfg.data)
    streamed = not hasattr(ds, "__len__")
    if streamed:
        rank, world = accelerator.process_index, accelerator.num_processes
        dataset = StreamingStageDataset(ds, cfg.data, label_col, stage, t.seed, t.batch_size, rank, world)
    else:
        dataset = StageDataset(ds, cfg.data, label_col, stage, t.seed)
    check_images_fit(dataset)
    num_classes = len(id2label)

    # Model, forward process, loss, EMA, optimizer
    unet = build_unet(stage, cfg.unet, num_classes)
    noising = build_noise_scheduler(stage)
    loss_fn = DiffusionLoss(noising, stage.prediction_type.value)
    ema = EMAModel(
        unet.parameters(),
        decay=t.ema_decay,
        use_ema_warmup=t.ema_warmup,
        model_cls=type(unet),
        model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=t.learning_rate, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup",
        optimizer,
        num_warmup_steps=t.warmup_steps * accelerator.num_processes,
        num_training_steps=t.max_steps * accelerator.num_processes,
    )
    step = 0
    if resume_from is not None:
        candidates = list_checkpoints(run_dir / "checkpoints") if t.resume == "latest" else [resume_from]
        step = load_latest(candidates, unet, ema, optimizer, lr_scheduler)["step"]
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema.to(accelerator.device)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (run_dir / "config.json").write_text(
            json.dumps(OmegaConf.to_container(cfg, enum_to_str=True), indent=1)
        )
    if accelerator.log_with:
        flat = {
            k: v
            for k, v in _flatten(OmegaConf.to_container(cfg, enum_to_str=True)).items()
            if isinstance(v, (int, float, str, bool))
        }
        accelerator.init_trackers("cdm", config=flat)

    # Batches: a deterministic stream from the current micro-step
    micro = step * t.grad_accum
    workers = cfg.data.num_workers
    if streamed:  # records already read are skipped, not decoded
        dataset.start = micro
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, collate_fn=collate, num_workers=workers
        )
        fixed = collate(dataset.first_examples(t.num_samples * 4))
    else:
        sampler = IndexStream(
            len(dataset),
            t.batch_size,
            t.seed,
            accelerator.process_index,
            accelerator.num_processes,
            start=micro,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers
        )
        fixed = collate([dataset[(0, i)] for i in range(min(len(dataset), t.num_samples * 4))])
    if fixed["images"] is not None:
        fixed["images"] = fixed["images"][: t.num_samples]

    if main:  # every check has passed: log how the launcher's settings were resolved
        for note in notes:
            print(note, file=sys.stderr)
    skipped = {"corrupt": 0, "small": 0}
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, desc=f"train {stage.name}", unit="step")
    start_time, start_step, loss_value, side_seconds = time.time(), step, float("nan"), 0.0
    stop_at = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
    unet.train()
    for batch in loader:
        if step >= stop_at:
            break
        skipped["corrupt"] += batch["skipped_corrupt"]
        skipped["small"] += batch["skipped_small"]
        gen = step_generator(t.seed, micro, accelerator.process_index)
        micro += 1
        with accelerator.accumulate(unet):
            if batch["images"] is not None:
                batch["images"] = batch["images"].to(accelerator.device)
                x0, model_fn = stage_model_fn(unet, cfg, batch, noising, num_classes, gen)
                with accelerator.autocast():
                    loss = loss_fn(model_fn, x0, gen)
            else:  # every example of this micro-batch was skipped: keep ranks in step with a zero loss
                loss = sum(p.sum() for p in unet.parameters()) * 0.0
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip > 0:
                accelerator.clip_grad_norm_(unet.parameters(), t.grad_clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        ema.step(unet.parameters())
        loss_value = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
        bar.update(1)
        if step % t.log_every == 0 or step == stop_at:
            logs = {
                "loss": loss_value,
                "lr": lr_scheduler.get_last_lr()[0],
                "ema_decay": ema.cur_decay_value or 0.0,
            }
            bar.set_postfix(loss=f"{loss_value:.4f}")
            accelerator.log(logs, step=step)
        side_start = time.time()  # sampling and checkpoints are timed apart from training steps
        if main and (step % t.sample_every == 0 or step == t.max_steps) and fixed["images"] is not None:
            pipe = build_pipeline(
                stage, cfg.unet, num_classes, id2label, unet=_ema_unet(ema, stage, cfg, num_classes)
            )
            pipe.to(accelerator.device)
            save_samples(cfg, pipe, fixed, run_dir / "samples" / f"step-{step:07d}.png", num_classes)
        if step % t.checkpoint_every == 0 or step == stop_at:
            accelerator.wait_for_everyone()
            if main:
                extra = {"skipped": skipped, "world_size": accelerator.num_processes}
                save_checkpoint(
                    run_dir / "checkpoints",
                    step,
                    accelerator.unwrap_model(unet),
                    ema,
                    optimizer,
                    lr_scheduler,
                    extra,
                    t.keep_checkpoints,
                )
        side_seconds += time.time() - side_start
    bar.close()
    accelerator.wait_for_everyone()
    elapsed = time.time() - start_time

    # Every rank must hold the same weights after data-parallel training
    checksum = torch.tensor(
        [sum(p.double().sum().item() for p in unet.parameters())], device=accelerator.device
    )
    checksums = accelerator.gather(checksum).tolist()
    if main:
        info = {
            "stage": stage.name,
            "steps": step,
            "target_steps": t.max_steps,
            "final_loss": loss_value,
            "seconds_this_launch": round(elapsed, 2),
            "steps_per_second": round((step - start_step) / max(elapsed - side_seconds, 1e-9), 4),
            "seconds_sampling_and_checkpoints": round(side_seconds, 2),
            "images_per_step": t.batch_size * t.grad_accum * accelerator.num_processes,
            "world_size": accelerator.num_processes,
            "rank_weight_checksums": checksums,
            "parameters": count_parameters(accelerator.unwrap_model(unet)),
            "num_classes": num_classes,
            "skipped_examples": skipped,
            "data": _data_name(cfg),
        }
        if step >= t.max_steps:
            pipe = build_pipeline(
                stage, cfg.unet, num_classes, id2label, unet=_ema_unet(ema, stage, cfg, num_classes)
            )
            _export_atomically(pipe, run_dir / "export", save_stage, cfg, info)
        previous = (
            json.loads((run_dir / "run_info.json").read_text())
            if (run_dir / "run_info.json").exists()
            else {}
        )
        info["seconds_total"] = round(previous.get("seconds_total", 0) + elapsed, 2)
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=1))
        if any(skipped.values()):
            print(
                f"skipped {skipped['corrupt']} corrupt images and {skipped['small']} smaller than the crop",
                file=sys.stderr,
            )
        where = run_dir / "export" if step >= t.max_steps else run_dir / "checkpoints"
        print(f"{stage.name}: {step} steps in {elapsed:.1f}s, loss {loss_value:.4f}; saved to {where}")
    # Drop the DDP wrapper while the process group is still registered: if its reducer held the last
    # reference, gloo's destructor would join worker threads that wait for the GIL this thread holds.
    del unet, optimizer, lr_scheduler, loader
    accelerator.free_memory()
    accelerator.end_training()
    return run_dir


def _ema_unet(ema, stage, cfg, num_classes):
    from cdm.models import build_unet

    unet = build_unet(stage, cfg.unet, num_classes)
    ema.copy_to(unet.parameters())
    return unet.eval()


def _export_atomically(pipe, folder: Path, save_stage, cfg, info) -> None:
    import shutil

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_stage(pipe, tmp)
    stage_info = {
        "stage": OmegaConf.to_container(cfg.stage, enum_to_str=True),
        "unet": OmegaConf.to_container(cfg.unet, enum_to_str=True),
        "data": OmegaConf.to_container(cfg.data, enum_to_str=True),
        "train": OmegaConf.to_container(cfg.train, enum_to_str=True),
        "run": info,
    }
    (tmp / "cdm_stage.json").write_text(json.dumps(stage_info, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


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


@cli
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return
    show = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        raise UserError(f"unknown option {bad[0]}: cdm-train takes KEY=VALUE overrides (see --help)")
    cfg = compose_config(overrides)
    schema = OmegaConf.structured(TrainRunConfig)
    check_known_keys(cfg, schema)
    cfg = OmegaConf.merge(schema, cfg)
    notes = apply_launcher_settings(cfg, {o.split("=")[0].lstrip("+~") for o in overrides})
    validate(cfg)
    refuse_sharded_launch()
    if show:
        print(OmegaConf.to_yaml(cfg))
        return
    train(cfg, notes)


def check_known_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Every composed key must exist in the schema: `+train.max_stepz=5` fails instead of being ignored."""
    known = list(schema.keys())  # `in` on a DictConfig is False for a key whose value is missing (???)
    for key in cfg.keys():
        if key not in known:
            close = [k for k in known if str(k)[:3] == str(key)[:3]]
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(f"{prefix}{key}: not a cdm-train setting{hint}; `cdm-train --cfg` lists them")
        if OmegaConf.is_dict(cfg._get_node(key)) and OmegaConf.is_dict(schema._get_node(key)):
            check_known_keys(cfg[key], schema[key], f"{prefix}{key}.")


# accelerate launch passes its settings (flags or a config file) to the process as these variables
LAUNCHER_SETTINGS = {
    "train.mixed_precision": "ACCELERATE_MIXED_PRECISION",
    "train.grad_accum": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
}


def apply_launcher_settings(cfg, explicit: set[str]) -> list[str]:
    """Precedence: a train.* override on the command line, else accelerate launch's setting, else the config.

    accelerate passes its precision (flag or config file) to every launched process; it passes
    --gradient_accumulation_steps only to DeepSpeed runs, so elsewhere train.grad_accum sets it.

    Returns the lines to log: the resolved values, and a warning where an override beats the launcher.
    """
    notes = []
    for key, var in LAUNCHER_SETTINGS.items():
        launched = os.environ.get(var)
        section, name = key.split(".")
        current = getattr(cfg[section][name], "value", cfg[section][name])
        # accelerate always sets a precision, "no" when none was chosen: that one is not a choice
        if (
            launched is None
            or str(launched) == str(current)
            or (name == "mixed_precision" and launched == "no")
        ):
            continue
        if key in explicit:
            notes.append(f"warning: {key}={current} (command line) overrides accelerate launch's {launched}")
            continue
        try:
            cfg[section][name] = int(launched) if name == "grad_accum" else launched
        except Exception as err:  # OmegaConf validation of the launcher's value
            raise UserError(f"{var}={launched} (from accelerate launch): {_one_line(err)}") from None
        notes.append(f"{key}={launched} (from accelerate launch)")
    mp = getattr(cfg.train.mixed_precision, "value", cfg.train.mixed_precision)
    notes.append(f"resolved: train.mixed_precision={mp}, train.grad_accum={cfg.train.grad_accum}")
    return notes


def refuse_sharded_launch() -> None:
    """DeepSpeed and FSDP shard the model and optimizer, which the EMA and checkpoint code does not handle."""
    for var, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            raise UserError(
                f"{name} is not supported by cdm-train (EMA and checkpoints need whole weights on every rank): "
                "launch with plain data parallelism (accelerate launch --multi_gpu)"
            )


if __name__ == "__main__":
    main()
