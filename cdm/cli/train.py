"""cdm-train: train one cascade stage with accelerate, configured by Hydra.

cdm-train stage=sr64to256 data=imagefolder data.path=DIR train.max_steps=20000
accelerate launch --num_processes 8 -m cdm.cli.train stage=base64 data=imagenet
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cdm.config import TrainRunConfig, config_dir, register_configs, validate
from cdm.devices import training_precision
from cdm.errors import DISK_ERRORS, UserError, cli, one_line
from cdm.train.loop import train
from cdm.train.run_folder import LAUNCH_FILES

HELP = """usage: cdm-train [KEY=VALUE ...]

Train one stage of a cascade. Overrides use Hydra syntax; config groups:
  stage=base64|sr64to256|sr256to1024   unet=tiny|small|paper
  data=digits|photos|imagefolder|hub|imagenet   experiment=NAME (conf/experiment/)
Common keys: data.path=DIR  train.max_steps=N  train.batch_size=N  train.mixed_precision=auto|no|fp16|bf16
             train.output_dir=DIR  train.resume=latest|PATH
Hydra:       --cfg job|hydra|all [--resolve]  --info  --config-dir DIR  -m (sweep: KEY=A,B)
             hydra.run.dir=DIR  hydra.sweep.dir=DIR  --hydra-help
Scale out:   accelerate launch --num_processes N -m cdm.cli.train stage=...
"""


def _group_options(group: str, extra_dir: Path | None = None) -> list[str]:
    dirs = [config_dir()] + ([Path(extra_dir)] if extra_dir else [])
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def compose_config(overrides: list[str], extra_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml with overrides (and configs in `extra_dir`, as --config-dir adds them);
    any problem becomes a one-line UserError."""
    for o in overrides:  # an optional group ignores an unknown option silently: refuse it here
        key, _, value = o.lstrip("+~").partition("=")
        if key == "experiment" and value not in ("null", "") and value not in _group_options(key, extra_dir):
            raise UserError(
                f"{o}: no such experiment; expected one of {', '.join(_group_options(key, extra_dir))}"
            )
    if extra_dir:
        overrides = [*overrides, f"hydra.searchpath=[file://{Path(extra_dir).resolve()}]"]

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
        raise UserError(one_line(err)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UserError(one_line(err)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " (data=imagefolder needs data.path=DIR)" if "data.path" in missing else ""
        raise UserError(f"{', '.join(missing)} is missing: pass {missing[0]}=VALUE{hint}")
    return cfg


@cli
def main(argv: list[str] | None = None) -> None:
    """cdm-train as a Hydra app (`@hydra.main` semantics: --cfg, --info, -m, --config-dir, hydra.*),
    with bad overrides refused in one line before Hydra starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return
    argv = _with_cfg_target(argv)
    parser = get_args_parser()
    parser.error = lambda message: parser.exit(2, f"error: cdm-train: {message} (see --help)\n")
    args = parser.parse_args(argv)
    if not (args.multirun or args.shell_completion or args.info or args.hydra_help):
        cfg = run_config(_own_overrides(args.overrides), args.config_dir)  # the run's checks, in one line
        if args.cfg == "job":  # the job's config as the run will use it: launcher settings resolved
            print(OmegaConf.to_yaml(cfg), end="")
            return
    register_configs()
    config_path = str(config_dir())
    app = hydra.main(config_path=config_path, config_name="train", version_base=None)(hydra_task)
    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "cdm-train", *argv]
    try:
        app()
    finally:
        sys.argv = saved


def hydra_task(cfg: DictConfig) -> None:
    """One job: the run folder is Hydra's output folder (train.output_dir, or a sweep's job folder)."""
    overrides = list(HydraConfig.get().overrides.task)
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        cfg.train.output_dir = portable(HydraConfig.get().runtime.output_dir)
        cfg, notes = check_config(cfg, overrides)
        train(cfg, notes)
    except OSError as err:  # a full disk or a refused permission, e.g. while writing a checkpoint
        if err.errno not in DISK_ERRORS or os.environ.get("CDM_DEBUG"):
            raise
        print(f"error: {err.filename or ''}: {err.strerror}: nothing more was written", file=sys.stderr)
        sys.exit(2)
    except UserError as err:  # Hydra would print a traceback; a bad value is one line and exit 2
        hydra = HydraConfig.get()
        run_dir = Path(hydra.runtime.output_dir)
        remove_launch_files(run_dir, run_dir / hydra.output_subdir if hydra.output_subdir else None)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def remove_launch_files(run_dir: Path, record: Path | None) -> None:
    """A refused launch takes back what it wrote before refusing: this launch's Hydra record, and, in a
    folder that holds nothing else, the lock, an empty log and the folder itself. Anything else stays."""
    if record is not None and record.is_dir():
        shutil.rmtree(record, ignore_errors=True)
    if not run_dir.is_dir() or any(p.name not in LAUNCH_FILES for p in run_dir.iterdir()):
        with contextlib.suppress(OSError):
            (run_dir / ".hydra").rmdir()  # only when this launch's record was all it held
            log = run_dir / "train.log"  # so this launch made Hydra's (empty) log too
            if log.is_file() and log.stat().st_size == 0:
                log.unlink()
        return
    for path in (run_dir / ".hydra", run_dir / ".lock", run_dir / "train.log", run_dir):
        try:
            if path.is_dir():
                path.rmdir()  # only when empty
            elif path.is_file() and (path.name == ".lock" or path.stat().st_size == 0):
                path.unlink()
        except OSError:
            pass


def portable(folder: str) -> str:
    """Hydra's absolute run folder, relative to the working directory when inside it: the run's
    records (and an exported card) then name `runs/...`, not this machine's paths."""
    path, here = Path(folder).resolve(), Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)


def run_config(overrides: list[str], extra_dir: Path | None = None) -> DictConfig:
    cfg, _ = check_config(compose_config(overrides, extra_dir), overrides)
    return cfg


def check_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """Known keys, launcher precedence, value checks and the sharded-launch guard."""
    schema = OmegaConf.structured(TrainRunConfig)
    check_known_keys(cfg, schema)
    cfg = OmegaConf.merge(schema, cfg)
    notes = apply_launcher_settings(cfg, {o.split("=")[0].lstrip("+~") for o in overrides})
    validate(cfg)
    refuse_sharded_launch()
    return cfg, notes


def _with_cfg_target(argv: list[str]) -> list[str]:
    """`--cfg` alone shows the job's config, as it did before cdm-train was a Hydra app."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a in ("--cfg", "-c") and (i + 1 == len(argv) or argv[i + 1] not in ("job", "hydra", "all")):
            out.append("job")
    return out


def _own_overrides(overrides: list[str]) -> list[str]:
    """The overrides of cdm's config: Hydra's own (hydra.*, hydra/...) are Hydra's to check."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def check_known_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Every composed key must exist in the schema: `+train.max_stepz=5` fails instead of being ignored."""
    known = list(schema.keys())  # `in` on a DictConfig is False for a key whose value is missing (???)
    for key in cfg.keys():
        if key not in known:
            close = [k for k in known if str(k)[:3] == str(key)[:3]]
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(f"{prefix}{key}: not a cdm-train setting{hint}; `cdm-train --cfg job` lists them")
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
            raise UserError(f"{var}={launched} (from accelerate launch): {one_line(err)}") from None
        notes.append(f"{key}={launched} (from accelerate launch)")
    mp = training_precision(getattr(cfg.train.mixed_precision, "value", cfg.train.mixed_precision))
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
