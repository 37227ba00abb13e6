"""Pipeline tests: tiny random UNets, 2 steps, CPU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cdm_pipelines import augment_low_res
from cdm_pipelines.pipeline_sr3 import cfg_combine, level_embedding
from conftest import LABELS, TINY, gens, sr_stage
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from cdm.models import build_pipeline
from cdm.stage_io import load_stage, save_stage


def low_res_batch(n=2, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [0, 1]


def sr_kwargs(pipe, n=2):
    kw = {"image": low_res_batch(n), "noise_level": 50, "num_inference_steps": 2}
    if pipe.num_classes:
        kw["class_labels"] = list(range(n))
    return kw


def run_sr(pipe, seeds, **extra):
    kw = sr_kwargs(pipe, len(seeds))
    kw.update(extra)
    return pipe(generator=gens(seeds), output_type="np", **kw).images


# -- pure functions ---------------------------------------------------------------------------


def test_noise_level_zero_leaves_upsampled_image_unchanged():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x = low_res_batch()
    out = augment_low_res(x, 32, 0, sched, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out, up)


@pytest.mark.parametrize("level", [50, 250, 700])
def test_augmentation_matches_forward_process_statistics(level):
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x = torch.full((64, 3, 16, 16), 0.5)
    out = augment_low_res(x, 16, level, sched, generator=torch.Generator().manual_seed(1))
    ab = sched.alphas_cumprod[level]
    assert out.mean().item() == pytest.approx((ab.sqrt() * 0.5).item(), abs=0.01)
    assert out.std().item() == pytest.approx((1 - ab).sqrt().item(), rel=0.02)


def test_augmentation_at_low_res_noises_before_upsampling():
    """CDM's form: z_s at the input size, then upsampled, so the noise is as smooth as a truncated
    handover's; the default adds white noise after upsampling."""
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x = low_res_batch()
    low = augment_low_res(x, 32, 400, sched, torch.Generator().manual_seed(2), at_low_res=True)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    z = sched.add_noise(x, eps, torch.tensor([400, 400]))
    up = torch.nn.functional.interpolate(z, size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(low, up)
    high = augment_low_res(x, 32, 400, sched, torch.Generator().manual_seed(2))
    clean = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    ab = sched.alphas_cumprod[400]

    def roughness(y):  # mean squared difference of neighbouring pixels of the noise
        n = y - ab.sqrt() * clean
        return (n[..., 1:] - n[..., :-1]).pow(2).mean()

    assert roughness(low) < 0.3 * roughness(high)


def test_augmentation_levels_are_per_sample():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x = torch.zeros(2, 3, 8, 8)
    out = augment_low_res(x, 8, torch.tensor([0, 999]), sched, generator=torch.Generator().manual_seed(0))
    assert out[0].abs().max() == 0
    assert out[1].std() > 0.9


def test_cfg_combine_is_the_guidance_formula():
    cond, uncond = torch.ones(2, 1), torch.zeros(2, 1)
    assert torch.equal(cfg_combine(torch.cat([cond, uncond]), 3.0), torch.full((2, 1), 3.0))


def test_level_embedding_distinguishes_levels():
    emb = level_embedding(torch.tensor([0, 1, 500]), 16)
    assert emb.shape == (3, 16)
    assert not torch.allclose(emb[1], emb[2])


# -- save / load --------------------------------------------------------------------------------


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def test_base_save_load_roundtrip_is_identical(base_pipe, tmp_path):
    before = base_pipe([0, "deuce"], num_inference_steps=2, generator=gens([3, 4]), output_type="np").images
    save_stage(base_pipe, tmp_path / "base")
    files = _files(tmp_path / "base")
    assert all(f.endswith((".safetensors", ".json", ".py")) for f in files), files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    loaded = load_stage(tmp_path / "base")
    assert loaded.labels == {0: "zero", 1: "one", 2: "two, deuce"}
    after = loaded([0, "deuce"], num_inference_steps=2, generator=gens([3, 4]), output_type="np").images
    np.testing.assert_allclose(before, after, atol=1e-5)


def test_sr_save_load_roundtrip_is_identical(sr_pipe, tmp_path):
    before = run_sr(sr_pipe, [5, 6])
    save_stage(sr_pipe, tmp_path / "sr")
    assert all(f.endswith((".safetensors", ".json", ".py")) for f in _files(tmp_path / "sr"))
    after = run_sr(load_stage(tmp_path / "sr"), [5, 6])
    np.testing.assert_allclose(before, after, atol=1e-5)


PLAIN_DIFFUSERS = """
import sys, json, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
kind = type(pipe).__name__
if kind == "SR3Pipeline":
    out = pipe(image=torch.zeros(1, 3, 8, 8), noise_level=10, num_inference_steps=2, output_type="np")
else:
    out = pipe(class_labels=[1], num_inference_steps=2, output_type="np")
leaked = [m for m in sys.modules if m == "cdm" or m.startswith(("cdm.", "cdm_pipelines"))]
print(json.dumps({"class": kind, "shape": list(out.images.shape), "leaked": leaked}))
"""


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_saved_folder_loads_with_plain_diffusers_in_fresh_process(base_pipe, tmp_path, stage):
    pipe = base_pipe if stage == "base" else build_pipeline(sr_stage(), TINY, 0)
    save_stage(pipe, tmp_path / stage)
    res = subprocess.run(
        [sys.executable, "-c", PLAIN_DIFFUSERS, str(tmp_path / stage)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["leaked"] == []
    assert info["shape"] == ([1, 32, 32, 3] if stage == "sr" else [1, 16, 16, 3])


def test_load_stage_never_runs_code_from_the_folder(tmp_path):
    pipe = build_pipeline(sr_stage(), TINY, 0)
    save_stage(pipe, tmp_path / "sr")
    marker = tmp_path / "executed"
    (tmp_path / "sr" / "pipeline_sr3.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    loaded = load_stage(tmp_path / "sr")
    assert type(loaded).__module__ == "cdm_pipelines.pipeline_sr3"
    assert not marker.exists()


# -- behaviour ----------------------------------------------------------------------------------


def test_base_batch_equals_single_runs(base_pipe):
    batch = base_pipe([0, 1, 2], num_inference_steps=2, generator=gens([7, 8, 9]), output_type="np").images
    for i, seed in enumerate([7, 8, 9]):
        single = base_pipe([i], num_inference_steps=2, generator=gens([seed]), output_type="np").images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-5)


def test_sr_batch_equals_single_runs(sr_pipe):
    x = low_res_batch(2)
    kw = {"noise_level": 100, "num_inference_steps": 2, "output_type": "np"}
    labels = [0, 1] if sr_pipe.num_classes else [None, None]
    batch = sr_pipe(
        x, class_labels=labels if sr_pipe.num_classes else None, generator=gens([1, 2]), **kw
    ).images
    for i, seed in enumerate([1, 2]):
        one = sr_pipe(
            x[i : i + 1],
            class_labels=[labels[i]] if sr_pipe.num_classes else None,
            generator=gens([seed]),
            **kw,
        ).images
        np.testing.assert_allclose(batch[i], one[0], atol=1e-5)


@pytest.mark.parametrize(
    "cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
)
def test_any_scheduler_swaps_in(base_pipe, sr_pipe, cls):
    base_pipe.scheduler = cls.from_config(base_pipe.scheduler.config)
    img = base_pipe([0, 1], num_inference_steps=2, generator=gens([0, 1]), output_type="pt").images
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
    sr_pipe.scheduler = cls.from_config(sr_pipe.scheduler.config)
    out = sr_pipe(generator=gens([0, 1]), output_type="pt", **sr_kwargs(sr_pipe)).images
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and not torch.equal(out[0], out[1])  # two seeds, two samples


class CallCounter:
    def __init__(self, unet):
        self.batches = []
        unet.register_forward_pre_hook(
            lambda m, args, kwargs: self.batches.append(args[0].shape[0]), with_kwargs=True
        )


def test_guidance_scale_one_runs_no_null_pass(base_pipe):
    calls = CallCounter(base_pipe.unet)
    base_pipe([0, 1], guidance_scale=1.0, num_inference_steps=2, output_type="np")
    assert calls.batches == [2, 2]


def test_guidance_doubles_the_batch_once_and_changes_output(base_pipe):
    calls = CallCounter(base_pipe.unet)
    plain = base_pipe(
        [0, 1], guidance_scale=1.0, num_inference_steps=2, generator=gens([0, 1]), output_type="np"
    )
    guided = base_pipe(
        [0, 1], guidance_scale=4.0, num_inference_steps=2, generator=gens([0, 1]), output_type="np"
    )
    assert calls.batches == [2, 2, 4, 4]
    assert np.abs(plain.images - guided.images).max() > 1e-4


def test_class_conditional_sr_guidance_doubles_batch():
    pipe = build_pipeline(sr_stage(class_conditional=True), TINY, 3, LABELS)
    calls = CallCounter(pipe.unet)
    pipe(low_res_batch(2), class_labels=[0, 2], guidance_scale=2.0, noise_level=10, num_inference_steps=2)
    assert calls.batches == [4, 4]


def test_sr_output_size_and_label_effect():
    pipe = build_pipeline(sr_stage(class_conditional=True), TINY, 3, LABELS)
    a = run_sr(pipe, [0, 1], class_labels=[0, 0])
    b = run_sr(pipe, [0, 1], class_labels=[2, 2])
    assert a.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() > 1e-5


def test_truncated_run_returns_noisy_sample_with_its_level(base_pipe):
    with pytest.raises(ValueError, match="a truncated run returns noisy z_s, use 'latent'"):
        base_pipe([0], num_inference_steps=10, truncate_alphabar=0.5, output_type="pt")
    out = base_pipe([0], num_inference_steps=10, truncate_alphabar=0.5, output_type="latent")
    assert out.alphabar is not None and 0.5 <= out.alphabar < 1
    full = base_pipe([0], num_inference_steps=10, output_type="pt")
    assert full.alphabar is None


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": [3]}, r"class id 3 is out of range: expected 0\.\.2"),
        ({"class_labels": ["seven"]}, r"unknown class label 'seven'"),
        ({"class_labels": [0], "num_inference_steps": 0}, r"num_inference_steps=0"),
        ({"class_labels": [0], "guidance_scale": 0.5}, r"guidance_scale=0.5"),
        ({"class_labels": [0, 1], "generator": gens([1])}, r"got 1 generators for 2 images"),
    ],
)
def test_base_bad_input_names_the_value(base_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        base_pipe(**kwargs)


def test_sr_bad_input_names_the_value():
    pipe = build_pipeline(sr_stage(), TINY, 0)
    good = {"image": low_res_batch(1), "num_inference_steps": 1}
    cases = [
        (
            {"image": low_res_batch(1, size=9), "tile_size": 0},  # no tiles: the training size only
            r"image size 9x9 does not match this stage's input: expected 8x8",
        ),
        ({"noise_level": 1000}, r"noise_level=1000: expected an integer in 0\.\.999"),
        ({"guidance_scale": float("nan")}, r"guidance_scale=nan: expected a finite number"),
        ({"num_inference_steps": 2.5}, r"num_inference_steps=2\.5: expected an integer"),
        ({"noise_level": -1}, r"noise_level=-1"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0"),
        ({"guidance_scale": 2.0}, r"guidance_scale=2.0"),
        ({"generator": gens([1, 2])}, r"got 2 generators for 1 images"),
        ({"class_labels": [0]}, r"not class-conditional"),
        (
            {"image": low_res_batch(1) * 2 - 1},
            r"image tensor values span \[-0\.\d+, 0\.\d+\]: expected \[0, 1\]",
        ),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe(**{**good, **extra})
    cond = build_pipeline(sr_stage(class_conditional=True), TINY, 3, LABELS)
    with pytest.raises(ValueError, match=r"class id 5 is out of range: expected 0\.\.2"):
        cond(**good, class_labels=[5])


def test_sr_runs_fully_convolutional_on_other_sizes_when_allowed():
    pipe = build_pipeline(sr_stage(), TINY, 0)
    out = pipe(low_res_batch(1, size=12), allow_any_size=True, num_inference_steps=1, output_type="np")
    assert out.images.shape == (1, 48, 48, 3)
