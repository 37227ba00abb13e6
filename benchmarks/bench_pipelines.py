"""Each pipeline's __call__ against a bare loop over the same UNet and scheduler (small preset, batch 1)."""

from __future__ import annotations

import torch
from cdm_pipelines import augment_low_res, level_embedding
from common import SMOKE, header, timeit

from cdm.config import SamplingConfig, StageConfig, StageKind, UNetConfig
from cdm.models import build_pipeline

SMALL = UNetConfig(
    name="small",
    block_out_channels=[32, 64, 128, 128],
    layers_per_block=1,
    attention_resolutions=[16, 8],
    attention_head_dim=32,
    norm_num_groups=16,
    level_embed_dim=64,
)
STEPS = 1 if SMOKE else 10


def bare_base(pipe, seed):
    unet, sched = pipe.unet, pipe.scheduler
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 3, 64, 64), generator=g)
    labels = torch.tensor([3])
    sched.set_timesteps(STEPS)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
            x = sched.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def bare_sr(pipe, lr, seed):
    unet, sched = pipe.unet, pipe.scheduler
    g = torch.Generator().manual_seed(seed)
    cond = augment_low_res(lr * 2 - 1, 256, 100, pipe.image_noising_scheduler, generator=g)
    s_emb = level_embedding(torch.tensor([100]), unet.config.time_cond_proj_dim)
    x = torch.randn((1, 3, 256, 256), generator=g)
    sched.set_timesteps(STEPS)
    with torch.no_grad():
        for t in sched.timesteps:
            inp = torch.cat([sched.scale_model_input(x, t), cond], dim=1)
            eps = unet(inp, t, encoder_hidden_states=None, timestep_cond=s_emb).sample
            x = sched.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def main():
    torch.manual_seed(0)
    sample = SamplingConfig(scheduler="DDIMScheduler", steps=STEPS)
    base = build_pipeline(
        StageConfig(name="base64", kind=StageKind.base, resolution=64, sample=sample), SMALL, 10
    )
    sr = build_pipeline(
        StageConfig(
            name="sr64to256",
            kind=StageKind.sr,
            resolution=256,
            low_res=64,
            class_conditional=False,
            sample=sample,
        ),
        SMALL,
        0,
    )
    for p in (base, sr):
        p.set_progress_bar_config(disable=True)
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # a "pt" image in [0, 1]
    header(f"pipeline __call__ vs bare loop, small preset, batch 1, {STEPS} DDIM steps")
    rows = [
        (
            "base64",
            lambda: base(
                [3], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt"
            ),
            lambda: bare_base(base, 0),
        ),
        (
            "sr64to256",
            lambda: sr(
                lr,
                noise_level=100,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ),
            lambda: bare_sr(sr, lr, 0),
        ),
    ]
    for name, pipe_fn, bare_fn in rows:
        t_pipe, t_bare = timeit(pipe_fn), timeit(bare_fn)
        print(
            f"{name:<10} pipeline {t_pipe:6.3f}s  bare loop {t_bare:6.3f}s  ratio {t_pipe / t_bare:.3f} (goal <= 1.03)"
        )


if __name__ == "__main__":
    main()
