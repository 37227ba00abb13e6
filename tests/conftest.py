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
