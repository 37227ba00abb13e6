"""Autoguidance in the SR stage: a guide UNet, extrapolated away from; saved, loaded, attached by
cdm-export --guide, and used by cdm-upscale and cdm-eval sr."""

import json

import pytest
import torch
from conftest import TINY, run_cli, sr_stage

from cdm.cascade import check_settings
from cdm.config import SamplingConfig, UNetConfig
from cdm.errors import UserError
from cdm.models import build_pipeline, sampling_scheduler
from cdm.stage_io import load_stage, save_stage

SMALLER = UNetConfig(
    name="smaller",
    block_out_channels=[8, 16],
    attention_resolutions=[],
    norm_num_groups=4,
    level_embed_dim=16,
)


def stage(unet=TINY, seed=0):
    st = sr_stage(8, 32)
    st.prediction_type, st.residual, st.residual_scale = "v_prediction", True, 4.0
    torch.manual_seed(seed)
    pipe = build_pipeline(st, unet, 0)
    pipe.scheduler = sampling_scheduler("DDIMScheduler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guided(seed=1):
    pipe, guide = stage(), stage(SMALLER, seed)
    pipe.register_modules(guide_unet=guide.unet)
    return pipe


def upscale(pipe, w, steps=2):
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(
        lr,
        num_inference_steps=steps,
        noise_level=0,
        output_type="latent",
        autoguidance_scale=w,
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def test_one_step_prediction_is_extrapolated_away_from_the_guide():
    """With one DDIM step from pure noise the sample is linear in the model output (v), so the guided
    sample is exactly guide + w (unet - guide) of the two unguided ones."""
    pipe = guided()
    main = upscale(pipe, 1.0, steps=1)
    pipe.unet, pipe.guide_unet = pipe.guide_unet, pipe.unet  # run the guide alone
    guide = upscale(pipe, 1.0, steps=1)
    pipe.unet, pipe.guide_unet = pipe.guide_unet, pipe.unet
    assert (main - guide).abs().mean() > 1e-3  # the two models differ, so the test can see w
    for w in (1.5, 3.0):
        torch.testing.assert_close(
            upscale(pipe, w, steps=1), guide + w * (main - guide), atol=1e-4, rtol=1e-4
        )


def test_scale_one_runs_the_unet_alone_and_never_calls_the_guide():
    pipe = guided()
    calls = []
    pipe.guide_unet.register_forward_hook(lambda *a: calls.append(1))
    plain = stage()
    torch.testing.assert_close(upscale(pipe, 1.0), upscale(plain, 1.0))
    assert not calls
    upscale(pipe, 2.0, steps=2)
    assert len(calls) == 2  # one guide evaluation per step


def test_guided_sampling_on_tiles_matches_whole_images_in_shape_and_blends():
    pipe = guided()
    lr = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    out = pipe(
        lr,
        num_inference_steps=1,
        noise_level=0,
        output_type="pt",
        autoguidance_scale=2.0,
        tile_size=32,
        tile_overlap=8,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 64, 48) and torch.isfinite(out).all()


def test_bad_scales_and_a_missing_guide_are_refused_before_work():
    with pytest.raises(ValueError, match="no guide UNet"):
        upscale(stage(), 1.5)
    with pytest.raises(ValueError, match="autoguidance_scale=0.5: expected a finite number in 1"):
        upscale(guided(), 0.5)
    with pytest.raises(ValueError, match="out_channels"):
        mismatched = stage(SMALLER)
        mismatched.unet.register_to_config(out_channels=4)
        type(stage())(**{**stage().components, "guide_unet": mismatched.unet})
    with pytest.raises(UserError, match="stage photo: autoguidance_scale=1.5: this stage has no guide UNet"):
        check_settings("photo", stage(), SamplingConfig(autoguidance_scale=1.5))
    with pytest.raises(UserError, match="autoguidance_scale=0.0: expected a finite number in 1"):
        check_settings("photo", guided(), SamplingConfig(autoguidance_scale=0.0))


def test_a_guided_stage_saves_and_loads_and_an_unguided_one_still_loads(tmp_path):
    pipe = guided()
    folder = save_stage(pipe, tmp_path / "guided")
    assert json.loads((folder / "model_index.json").read_text())["guide_unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    loaded = load_stage(folder)
    assert loaded.guide_unet is not None
    torch.testing.assert_close(upscale(loaded, 2.0), upscale(pipe, 2.0))
    plain = load_stage(save_stage(stage(), tmp_path / "plain"))
    assert plain.guide_unet is None
    assert json.loads((tmp_path / "plain" / "model_index.json").read_text())["guide_unet"] == [None, None]
    assert type(plain)(**plain.components).guide_unet is None


def test_export_attaches_a_guide_and_the_clis_use_it(tmp_path):
    save_stage(stage(), tmp_path / "main")
    save_stage(stage(SMALLER, 1), tmp_path / "guide")
    res = run_cli(
        [
            "cdm-export",
            str(tmp_path / "main"),
            "--guide",
            str(tmp_path / "guide"),
            "--out",
            str(tmp_path / "out"),
            "--half",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert (out / "guide_unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_stage(out)
    assert loaded.guide_unet.config.block_out_channels == [8, 16]
    assert "## Autoguidance" in (out / "README.md").read_text()
    from PIL import Image

    Image.new("RGB", (8, 8), (120, 60, 30)).save(tmp_path / "in.png")
    up = ["cdm-upscale", str(tmp_path / "in.png"), "--model", str(out), "--out", str(tmp_path / "up")]
    res = run_cli(up + ["--autoguidance", "2", "--steps", "2", "--scheduler", "DDIMScheduler"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "up" / "in-x4.png").size == (32, 32)
    res = run_cli(up[:3] + [str(tmp_path / "main"), "--autoguidance", "2"], tmp_path)
    assert res.returncode == 2 and "--autoguidance=2.0: this stage has no guide UNet" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_export_refuses_a_guide_of_another_task(tmp_path):
    save_stage(stage(), tmp_path / "main")
    other = sr_stage(8, 32)  # epsilon prediction, whole-image target
    save_stage(build_pipeline(other, SMALLER, 0), tmp_path / "other")
    res = run_cli(
        [
            "cdm-export",
            str(tmp_path / "main"),
            "--guide",
            str(tmp_path / "other"),
            "--out",
            str(tmp_path / "out"),
        ],
        tmp_path,
    )
    assert res.returncode == 2 and "not the same task" in res.stderr and not (tmp_path / "out").exists()


def test_guidance_is_applied_per_tile_before_the_tiles_are_blended():
    """On 16 px tiles of a 32 px output, one DDIM step is still linear in the blended prediction, so the
    guided tiled sample is guide + w (unet - guide) of the two unguided tiled ones."""
    pipe = guided()
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def tiled(w):
        kw = dict(num_inference_steps=1, noise_level=0, output_type="latent", tile_size=16, tile_overlap=8)
        return pipe(lr, autoguidance_scale=w, generator=torch.Generator().manual_seed(0), **kw).images

    main = tiled(1.0)
    pipe.unet, pipe.guide_unet = pipe.guide_unet, pipe.unet
    guide = tiled(1.0)
    pipe.unet, pipe.guide_unet = pipe.guide_unet, pipe.unet
    assert (main - upscale(pipe, 1.0, steps=1)).abs().mean() > 1e-4  # the tiles change the result
    torch.testing.assert_close(tiled(2.0), guide + 2.0 * (main - guide), atol=1e-4, rtol=1e-4)
