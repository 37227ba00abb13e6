import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(2)

from cdm.config import SamplingConfig, StageConfig, StageKind, UNetConfig  # noqa: E402
from cdm.models import build_pipeline  # noqa: E402

TINY = UNetConfig(
    name="tiny",
    block_out_channels=[16, 32],
    attention_resolutions=[8],
    attention_head_dim=8,
    norm_num_groups=8,
    level_embed_dim=16,
)
LABELS = {0: "zero", 1: "one", 2: "two, deuce"}


def base_stage(resolution=16, scheduler="DDIMScheduler"):
    return StageConfig(
        name="base64",
        kind=StageKind.base,
        resolution=resolution,
        sample=SamplingConfig(scheduler=scheduler, steps=2),
    )


def sr_stage(low_res=8, resolution=32, class_conditional=False, name="sr64to256", scheduler="DDIMScheduler"):
    return StageConfig(
        name=name,
        kind=StageKind.sr,
        resolution=resolution,
        low_res=low_res,
        class_conditional=class_conditional,
        sample=SamplingConfig(scheduler=scheduler, steps=2),
    )


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture
def base_pipe():
    torch.manual_seed(0)
    return build_pipeline(base_stage(), TINY, 3, LABELS)


@pytest.fixture(params=[False, True], ids=["sr", "sr-class"])
def sr_pipe(request):
    torch.manual_seed(0)
    return build_pipeline(sr_stage(class_conditional=request.param), TINY, 3, LABELS)


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

BIN = Path(sys.executable).parent


def run_cli(cmd: list[str], cwd, env_extra=None, timeout=600):
    """Run a console script of this environment in a subprocess, with no network and tiny threads."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        **(env_extra or {}),
    }
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    return subprocess.run(
        [exe, *cmd[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def two_process_launch(module: str) -> list[str]:
    """`accelerate launch` of a cdm module in two CPU processes on this machine."""
    import shutil
    import sys

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    return [launcher, "launch", *flags, "--dynamo_backend", "no", "-m", module]


def make_imagefolder(root: Path, classes=2, per_class=4, size=40, seed=0) -> Path:
    """A tiny labelled imagefolder of smooth random RGB images."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)
            PIL.Image.fromarray(small).resize((size, size), PIL.Image.BICUBIC).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """Offline data sets and the datasets cache in one place for the whole test session."""
    root = tmp_path_factory.mktemp("cache")
    env = {"CDM_CACHE": str(root / "cdm"), "HF_DATASETS_CACHE": str(root / "hf")}
    os.environ.update(env)
    return env


def make_cascade(
    root: Path,
    sizes=(8, 32, 128),
    num_classes=3,
    labels=None,
    sr_classes=(False, False),
    label_set=None,
    modes=("non-truncated", "non-truncated"),
    levels=(100, 100),
    noise_at_low_res=True,
) -> Path:
    """A tiny random cascade folder: base at sizes[0], then 4x SR stages, saved as cdm-export does.
    The SR stages add their augmentation noise at the low resolution, so they take truncated handovers."""
    from cdm.config import SamplingConfig
    from cdm.stage_io import save_stage, write_cascade_json

    torch.manual_seed(0)
    labels = labels if labels is not None else LABELS
    names = ["base64", "sr64to256", "sr256to1024"][: len(sizes)]
    settings = [SamplingConfig(scheduler="DDIMScheduler", steps=2, guidance_scale=1.0)]
    save_stage(build_pipeline(base_stage(sizes[0]), TINY, num_classes, labels), root / names[0])
    for k in range(1, len(sizes)):
        stage = sr_stage(sizes[k - 1], sizes[k], class_conditional=sr_classes[k - 1], name=names[k])
        stage.noise_at_low_res = noise_at_low_res
        save_stage(build_pipeline(stage, TINY, num_classes, labels), root / names[k])
        settings.append(
            SamplingConfig(
                scheduler="DDIMScheduler",
                steps=2,
                noise_level=levels[k - 1],
                aug_mode=modes[k - 1],
                max_batch=2,
            )
        )
    write_cascade_json(root, names, settings, {"label_set": label_set} if label_set else None)
    return root
