"""Photo super-resolution: the residual SR stage, SR augmentations, HF ratio and patch KID, cdm-upscale's
shipped photo stage and its comparison figure."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_cli, sr_stage

from cdm.measure.metrics import hf_ratio, patch_grid
from cdm.models import build_pipeline, sampling_scheduler
from cdm.stage_io import load_stage, save_stage
from cdm.train.degradations import downsample
from cdm.upscaling import PHOTO_STAGE


def textured(size=64, seed=0) -> torch.Tensor:
    """A (1, 3, size, size) image in [-1, 1] with detail at every scale (smoothed noise at three scales)."""
    g = torch.Generator().manual_seed(seed)
    x = sum(
        F.interpolate(
            torch.rand(1, 3, max(1, size // k), max(1, size // k), generator=g),
            size=(size, size),
            mode="bicubic",
        )
        for k in (1, 4, 16)
    )
    return (x / 3 * 2 - 1).clamp(-1, 1)


def v_stage(**kw):
    stage = sr_stage(8, 32, **kw)
    stage.prediction_type = "v_prediction"
    return stage


def residual_stage(**kw):
    stage = v_stage(**kw)
    stage.residual, stage.residual_scale = True, 4.0
    return stage


# -- metrics ----------------------------------------------------------------------------------------


def test_hf_ratio_is_one_for_the_original_near_zero_for_bicubic_and_above_one_for_grain():
    hr = textured(64)
    up = F.interpolate(downsample(hr, 4), size=(64, 64), mode="bicubic", align_corners=False)
    grain = hr + 0.3 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(1))
    assert hf_ratio(hr, hr, 4).item() == pytest.approx(1.0)
    assert hf_ratio(up, hr, 4).item() < 0.1
    assert hf_ratio(grain, hr, 4).item() > 1.5


def test_patch_grid_covers_the_image_corners_and_skips_small_images():
    x = torch.arange(100.0).reshape(1, 1, 10, 10)
    patches = patch_grid(x, 4, 9)
    assert patches.shape == (9, 1, 4, 4)
    assert patches[0, 0, 0, 0] == 0 and patches[-1, 0, -1, -1] == 99  # first and last corners
    assert patch_grid(x, 12, 9).shape[0] == 0


# -- the residual stage -------------------------------------------------------------------------------


def test_one_trailing_step_starts_at_the_last_training_timestep():
    pipe = build_pipeline(v_stage(), TINY, 0)
    for name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"):
        scheduler = sampling_scheduler(name, pipe.scheduler.config)
        scheduler.set_timesteps(1)
        assert int(scheduler.timesteps[0]) >= 950, name  # DPM-Solver clips lambda near the end


def test_residual_stage_with_a_silent_unet_returns_the_bicubic_upsample():
    torch.manual_seed(0)
    pipes = {r: build_pipeline(residual_stage() if r else v_stage(), TINY, 0) for r in (True, False)}
    lr = textured(8)
    bicubic = F.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    out = {}
    for residual, pipe in pipes.items():
        torch.nn.init.zeros_(pipe.unet.conv_out.weight)
        torch.nn.init.zeros_(pipe.unet.conv_out.bias)  # v = 0: the one-step x_0 estimate is ~0
        pipe.scheduler = sampling_scheduler("DDIMScheduler", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        out[residual] = (
            pipe(
                (lr + 1) / 2,
                num_inference_steps=1,
                noise_level=0,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ).images
            * 2
            - 1
        )
    assert (out[True] - bicubic).abs().max() < 1e-2
    assert (out[False] - bicubic).abs().mean() > 0.2  # a whole-image stage has no bicubic to fall back on


def test_residual_stage_saves_loads_and_refuses_truncated_input(tmp_path):
    pipe = build_pipeline(residual_stage(), TINY, 0)
    loaded = load_stage(save_stage(pipe, tmp_path / "st"))
    assert (loaded.config.residual, loaded.config.residual_scale) == (True, 4.0)
    with pytest.raises(ValueError, match="truncated"):
        loaded(textured(8), num_inference_steps=1, low_res_is_augmented=True, output_type="pt")


def test_residual_training_target_is_the_scaled_residual_over_the_clean_upsample():
    from omegaconf import OmegaConf

    from cdm.config import TrainRunConfig
    from cdm.models import build_noise_scheduler, build_unet
    from cdm.train.loop import stage_model_fn

    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig),
        {"stage": OmegaConf.structured(residual_stage()), "unet": OmegaConf.structured(TINY)},
    )
    cfg.stage.noise_level_max = 100
    hr = textured(32)
    noising = build_noise_scheduler(cfg.stage)
    unet = build_unet(cfg.stage, cfg.unet, 0)
    batch = {"images": (hr + 1) / 2, "labels": torch.zeros(1, dtype=torch.long)}  # batches are in [0, 1]
    x0, _ = stage_model_fn(unet, cfg, batch, noising, 1, torch.Generator().manual_seed(0))
    up = F.interpolate(downsample(hr, 4), size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(x0, (hr - up) * 4.0, atol=1e-5, rtol=0)


# -- SR augmentations ---------------------------------------------------------------------------------


def test_flips_and_rot90_are_dihedral_transforms_of_the_same_crop():
    from cdm.config import ResizeMode
    from cdm.train.data import Preprocess

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    plain = Preprocess(16, 16, ResizeMode.none)(image, torch.Generator().manual_seed(0))
    dihedral = [torch.rot90(t, k, dims=(-2, -1)) for t in (plain, plain.flip(-1)) for k in range(4)]
    pre = Preprocess(16, 16, ResizeMode.none, flip=True, rot90=True)
    seen = set()
    for seed in range(40):
        x = pre(image, torch.Generator().manual_seed(seed))
        matches = [k for k, d in enumerate(dihedral) if torch.equal(x, d)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 8


@pytest.mark.parametrize("min_scale,max_scale", [(0.5, 1.0), (0.25, 0.5)])
def test_random_scaled_crop_shrinks_the_content_within_the_range(min_scale, max_scale):
    from cdm.train.data import random_scaled_crop

    # vertical stripes with a period of 8 pixels; a crop downscaled by s shows a period of 8 * s
    stripes = np.tile(((np.arange(512) // 4) % 2 * 255).astype(np.uint8), (512, 1))
    image = PIL.Image.fromarray(np.stack([stripes] * 3, -1))
    periods = []
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        crop = np.asarray(random_scaled_crop(image, 64, min_scale, max_scale, gen), dtype=float)
        row = crop[32, :, 0] - crop[32, :, 0].mean()
        crossings = np.sum(np.diff(np.sign(row)) != 0)
        periods.append(2 * 64 / max(crossings, 1))
        assert crop.shape == (64, 64, 3)
    assert min(periods) >= 8 * min_scale - 0.5 and max(periods) <= 8 * max_scale + 0.5
    assert max(periods) - min(periods) > 8 * (max_scale - min_scale) / 3  # the scale really varies


def test_every_photo_source_loads_as_rgb():
    from cdm.train.builders import PHOTO_SOURCES, load_photo

    for spec in PHOTO_SOURCES:
        image = load_photo(spec).convert("RGB")
        assert min(image.size) >= 256, spec


# -- the shipped photo stage and cdm-upscale ----------------------------------------------------------


def test_shipped_photo_stage_beats_bicubic_on_the_held_out_photos(cache_env):
    """The default cdm-upscale model, at its shipped settings, on the centre 256 px of photos it never saw."""
    from cdm.cli.upscale import held_out_photos
    from cdm.measure.metrics import psnr
    from cdm.stage_io import stage_info, stage_settings

    pipe = load_stage(PHOTO_STAGE)
    settings = stage_settings(stage_info(PHOTO_STAGE))
    assert (pipe.scale_factor, pipe.config.residual) == (4, True)
    pipe.scheduler = sampling_scheduler(settings.scheduler, pipe.scheduler.config, settings.steps)
    pipe.set_progress_bar_config(disable=True)
    gains = {}
    for name, photo in held_out_photos(3):
        hr = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        top, left = hr.shape[-2] // 2 - 128, hr.shape[-1] // 2 - 128
        hr = hr[..., top : top + 256, left : left + 256]
        lr = downsample(hr, 4).clamp(-1, 1)
        out = pipe(
            (lr + 1) / 2,
            num_inference_steps=settings.steps,
            noise_level=0,
            output_type="pt",
            allow_any_size=True,
            generator=torch.Generator().manual_seed(0),
        ).images
        bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        gains[name] = (psnr(out, hr * 0.5 + 0.5) - psnr(bicubic * 0.5 + 0.5, hr * 0.5 + 0.5)).item()
    assert min(gains.values()) > 0 and sum(gains.values()) / len(gains) > 0.5, gains


@pytest.mark.slow
def test_upscale_compare_writes_the_figure_and_reports_psnr(tmp_path, cache_env):
    stage_dir = save_stage(build_pipeline(residual_stage(), TINY, 0), tmp_path / "st")
    (stage_dir / "cdm_stage.json").write_text(
        json.dumps({"stage": {"sample": {"scheduler": "DDIMScheduler", "steps": 1}}})
    )
    PIL.Image.fromarray(((textured(48)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(
        tmp_path / "a.png"
    )
    res = run_cli(
        [
            "cdm-upscale",
            str(tmp_path / "a.png"),
            "--model",
            str(stage_dir),
            "--compare",
            str(tmp_path / "fig.png"),
            "--held-out",
            "1",
        ],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if "PSNR bicubic" in ln]
    assert len(lines) == 2 and lines[0].startswith("a 12x12 -> 48x48")
    figure = PIL.Image.open(tmp_path / "fig.png")
    assert figure.width > 4 * 48 and figure.height > 4 * 48  # two photos, each full and zoomed, 4 columns
    again = run_cli(
        [
            "cdm-upscale",
            str(tmp_path / "a.png"),
            "--model",
            str(stage_dir),
            "--compare",
            str(tmp_path / "fig.png"),
        ],
        tmp_path,
        cache_env,
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def test_upscale_without_model_uses_the_shipped_photo_stage(tmp_path):
    res = run_cli(["cdm-upscale", "--help"], tmp_path)
    assert res.returncode == 0 and "shipped 4x photo stage" in res.stdout
    assert (PHOTO_STAGE / "model_index.json").is_file() and (PHOTO_STAGE / "README.md").is_file()
    weights = sum(f.stat().st_size for f in PHOTO_STAGE.rglob("*.safetensors"))
    assert weights <= 15e6


def test_shipped_photo_stage_card_and_pipeline_copy():
    import cdm_pipelines.pipeline_sr3 as installed
    import yaml

    assert (PHOTO_STAGE / "pipeline_sr3.py").read_text() == Path(installed.__file__).read_text()
    card = (PHOTO_STAGE / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-to-image"
    names = {r["metrics"][0]["type"] for r in meta["model-index"][0]["results"]} | {
        m["type"] for r in meta["model-index"][0]["results"] for m in r["metrics"]
    }
    assert {"psnr", "hf_ratio", "patch_kid"} <= names
    assert "| bicubic upsampling |" in card


@pytest.mark.slow
def test_eval_sr_on_a_flat_folder_of_photos_reports_every_metric_and_a_sweep(tmp_path, cache_env):
    stage_dir = save_stage(build_pipeline(residual_stage(), TINY, 0), tmp_path / "st")
    flat = tmp_path / "photos"
    flat.mkdir()
    for i, size in enumerate((64, 72)):
        PIL.Image.fromarray(((textured(size, seed=i)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(
            flat / f"{i}.png"
        )
    res = run_cli(
        [
            "cdm-eval",
            "sr",
            "--model",
            str(stage_dir),
            "--data",
            "imagefolder",
            "--data-path",
            str(flat),
            "--crop",
            "0",
            "--steps",
            "1,2",
            "--scheduler",
            "DDIMScheduler",
            "--out",
            str(tmp_path / "ev"),
        ],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["dataset"]["num_images"] == 2 and result["dataset"]["crop"] is None
    assert result["dataset"]["pixels"] == 64 * 64 + 72 * 72  # whole images at native size
    for method in ("model", "bicubic"):
        assert set(result["metrics"][method]) == {"psnr", "ssim", "consistency", "hf_ratio", "patch_kid"}
    assert result["metrics"]["bicubic"]["hf_ratio"] < 0.2
    assert [r["steps"] for r in result["sweep"]] == [1, 2]
    assert (tmp_path / "ev" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| HF ratio | patch KID |" in (tmp_path / "ev" / "results.md").read_text()


def test_self_ensemble_averages_the_eight_rotations_and_mirror_images():
    from cdm.upscaling import DIHEDRAL, dihedral, upscale

    x = torch.arange(24.0).reshape(1, 1, 4, 6)
    for k, flip in DIHEDRAL:
        assert torch.equal(dihedral(dihedral(x, k, flip), k, flip, inverse=True), x)
    assert len({tuple(dihedral(x, k, flip).flatten().tolist()) for k, flip in DIHEDRAL}) == 8
    torch.manual_seed(0)
    pipe = build_pipeline(residual_stage(), TINY, 0)
    pipe.scheduler = sampling_scheduler("DDIMScheduler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    single = np.asarray(upscale(pipe, image, 8, 2, 1, 0, 0), dtype=float)
    ensemble = np.asarray(upscale(pipe, image, 8, 2, 1, 0, 0, self_ensemble=True), dtype=float)
    assert ensemble.shape == single.shape == (48, 64, 3)
    # a random UNet is not equivariant: the average of 8 differs from one run, and is smoother
    assert np.abs(ensemble - single).mean() > 0.5
    assert np.abs(np.diff(ensemble, axis=1)).mean() < np.abs(np.diff(single, axis=1)).mean()


def silent_residual_pipe():
    """A residual stage whose UNet outputs zero: it returns the bicubic upsample, exactly."""
    torch.manual_seed(0)
    pipe = build_pipeline(residual_stage(), TINY, 0)
    for p in pipe.unet.conv_out.parameters():
        torch.nn.init.zeros_(p)
    pipe.scheduler = sampling_scheduler("DDIMScheduler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_upscale_keeps_grey_images_grey_and_alpha_channels():
    from cdm.upscaling import upscale

    pipe, rng = silent_residual_pipe(), np.random.default_rng(0)
    grey = PIL.Image.fromarray(rng.integers(0, 255, (12, 16), dtype=np.uint8), "L")
    out = upscale(pipe, grey, 8, 2, 1, 0, 0)
    assert out.mode == "L" and out.size == (64, 48)
    rgba = np.concatenate([rng.integers(0, 255, (12, 16, 3)), np.full((12, 16, 1), 255)], -1)
    rgba[:, :8, 3] = 0  # the left half is transparent
    out = upscale(pipe, PIL.Image.fromarray(rgba.astype(np.uint8), "RGBA"), 8, 2, 1, 0, 0)
    assert out.mode == "RGBA" and out.size == (64, 48)
    alpha = np.asarray(out.getchannel("A"))
    assert alpha[:, :28].max() < 10 and alpha[:, 36:].min() > 245  # the alpha is upscaled, not dropped
    rgb = PIL.Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    assert upscale(pipe, rgb, 8, 2, 1, 0, 0).mode == "RGB"


def test_images_are_read_upright_by_their_exif_orientation(tmp_path):
    from cdm.images import decode_image
    from cdm.upscaling import read_image

    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # stored: white on the left of a 20 x 10 image
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    PIL.Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    for image in (read_image(tmp_path / "phone.jpg"), decode_image({"path": str(tmp_path / "phone.jpg")})):
        shown = np.asarray(image.convert("L"), dtype=float)
        assert image.size == (10, 20)  # displayed portrait
        assert shown[:10].mean() > 200 and shown[10:].mean() < 50  # white on top, as viewers show it


def test_eval_sr_defaults_to_the_shipped_photo_stage_on_the_held_out_photos(tmp_path, cache_env):
    res = run_cli(
        ["cdm-eval", "sr", "--num-images", "1", "--no-kid", "--out", str(tmp_path / "ev")],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["stage"] == "photo_sr4x" and Path(result["model"]) == PHOTO_STAGE
    assert result["dataset"]["name"] == "photos" and result["dataset"]["num_images"] == 1
    assert result["metrics"]["model"]["psnr"] > result["metrics"]["bicubic"]["psnr"]
