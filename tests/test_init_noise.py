"""The fidelity end: the SR pipeline's `init_noise_scale`, from the call, the folder and the command line."""

import json

import pytest
import torch
from conftest import TINY, make_imagefolder, run_cli, sr_stage

from cdm.cli.export import main as export_main
from cdm.models import build_pipeline, sampling_scheduler
from cdm.stage_io import export_stage, save_stage, stage_settings
from cdm.upscaling import load_sr_stage


def stage():
    st = sr_stage(8, 32)
    st.prediction_type, st.residual, st.residual_scale = "v_prediction", True, 4.0
    torch.manual_seed(0)
    pipe = build_pipeline(st, TINY, 0)
    config = {**pipe.scheduler.config, "timestep_spacing": "trailing"}  # one step starts at t = 999
    pipe.scheduler = sampling_scheduler("DDPMScheduler", config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


IMAGE = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def run(pipe, seed=0, **call):
    out = pipe(IMAGE, noise_level=0, output_type="pt", generator=torch.Generator().manual_seed(seed), **call)
    return out.images


def test_a_zero_scale_starts_from_the_noise_mean_so_one_step_is_one_estimate():
    pipe = stage()
    a, b = (
        run(pipe, 0, num_inference_steps=1, init_noise_scale=0.0),
        run(pipe, 1, num_inference_steps=1, init_noise_scale=0.0),
    )
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no seed reaches it
    zeros = run(pipe, 5, num_inference_steps=1, latents=torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(a, zeros, atol=1e-6, rtol=0)
    drawn = [run(pipe, s, num_inference_steps=1) for s in (0, 1)]
    assert (drawn[0] - drawn[1]).abs().max() > 1e-4  # from a draw, the seed matters


def test_the_scale_multiplies_the_initial_noise_and_one_is_the_library_default():
    pipe = stage()
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    half = run(pipe, num_inference_steps=3, latents=noise, init_noise_scale=0.5)
    torch.testing.assert_close(half, run(pipe, num_inference_steps=3, latents=noise * 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        run(pipe, num_inference_steps=3), run(pipe, num_inference_steps=3, init_noise_scale=1.0)
    )


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), "x", None])
def test_a_bad_scale_is_one_line_naming_it(value):
    pipe = stage()
    if value is None:  # None means "the stage's setting": refused only in the folder's defaults
        with pytest.raises(ValueError, match="init_noise_scale"):
            pipe.register_to_config(call_defaults={"init_noise_scale": None}) or pipe.call_settings()
        return
    with pytest.raises(ValueError, match="init_noise_scale"):
        pipe.call_settings(init_noise_scale=value)


def test_the_folder_default_is_read_by_plain_diffusers(tmp_path):
    pipe = stage()
    pipe.register_to_config(call_defaults={"init_noise_scale": 0.0, "num_inference_steps": 1})
    save_stage(pipe, tmp_path / "stage")
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "stage", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    fresh = stage()
    expected = run(fresh, 0, num_inference_steps=1, init_noise_scale=0.0)
    torch.testing.assert_close(run(loaded, 7), expected, atol=1e-6, rtol=0)


def test_export_set_writes_the_scale_where_plain_diffusers_and_cdm_read_it(tmp_path):
    src = tmp_path / "sr"
    info = {"stage": {"name": "sr", "sample": {"scheduler": "DDPMScheduler", "steps": 2}}, "unet": {}}
    export_stage(stage(), src, info)
    out = tmp_path / "out"
    export_main([str(src), "--out", str(out), "--set", "sr.init_noise_scale=0", "--set", "sr.steps=1"])
    index = json.loads((out / "model_index.json").read_text())
    assert (
        index["call_defaults"]["init_noise_scale"] == 0 and index["call_defaults"]["num_inference_steps"] == 1
    )
    pipe, settings = load_sr_stage(str(out), None)
    assert settings.init_noise_scale == 0 and pipe.call_settings()["init_noise_scale"] == 0
    assert "from the noise's mean" in (out / "README.md").read_text()
    assert (
        stage_settings(json.loads((src / "cdm_stage.json").read_text())).init_noise_scale == 1
    )  # source kept


def test_cdm_eval_sr_and_upscale_take_the_flag(tmp_path):
    save_stage(stage(), tmp_path / "stage")
    data = make_imagefolder(tmp_path / "data", classes=1, per_class=2, size=32)
    cmd = ["cdm-eval", "sr", "--model", str(tmp_path / "stage"), "--data", "imagefolder"]
    cmd += ["--data-path", str(data), "--split", "train", "--crop", "32", "--no-kid", "--steps", "1"]
    result = run_cli(cmd + ["--out", str(tmp_path / "ev"), "--init-noise-scale", "0"], tmp_path)
    assert result.returncode == 0, result.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["settings"]["init_noise_scale"] == 0
    assert "from the noise's mean" in (tmp_path / "ev" / "results.md").read_text()
    bad = run_cli(cmd + ["--out", str(tmp_path / "bad"), "--init-noise-scale", "1.5"], tmp_path)
    assert bad.returncode == 2 and "--init-noise-scale=1.5" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
