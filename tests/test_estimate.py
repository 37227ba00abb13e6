"""The fidelity end: an SR stage at 0 steps returns its one-evaluation estimate of E[x | low-res], from the
call, the folder and the command line."""

import json

import pytest
import torch
from conftest import TINY, make_imagefolder, run_cli, sr_stage

from cdm.cli.export import main as export_main
from cdm.models import build_pipeline, sampling_scheduler
from cdm.stage_io import export_stage, save_stage, stage_settings
from cdm.upscaling import load_sr_stage


def stage(prediction_type="v_prediction", scheduler="DDPMScheduler"):
    st = sr_stage(8, 32)
    st.prediction_type, st.residual, st.residual_scale = prediction_type, True, 4.0
    torch.manual_seed(0)
    pipe = build_pipeline(st, TINY, 0)
    config = {**pipe.scheduler.config, "timestep_spacing": "trailing"}  # one step starts at t = 999
    pipe.scheduler = sampling_scheduler(scheduler, config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


IMAGE = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def run(pipe, seed=0, **call):
    gen = torch.Generator().manual_seed(seed)
    return pipe(IMAGE, noise_level=0, output_type="pt", generator=gen, **call).images


def test_zero_steps_is_one_step_from_the_noise_mean_whatever_the_seed_or_scheduler():
    pipe = stage()
    a, b = run(pipe, 0, num_inference_steps=0), run(pipe, 1, num_inference_steps=0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no seed reaches it
    zeros = torch.zeros(1, 3, 32, 32)
    one_step_from_zeros = run(pipe, 5, num_inference_steps=1, latents=zeros)  # trailing: t = 999, then x0
    torch.testing.assert_close(a, one_step_from_zeros, atol=1e-5, rtol=0)
    drawn = [run(pipe, s, num_inference_steps=1) for s in (0, 1)]
    assert (drawn[0] - drawn[1]).abs().max() > 1e-4  # a step from a draw depends on the seed
    for name in ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
        other = stage(scheduler=name)
        torch.testing.assert_close(run(other, 3, num_inference_steps=0), a, atol=1e-5, rtol=0)


def test_zero_steps_refuses_latents_and_an_epsilon_stage():
    with pytest.raises(ValueError, match="latents given with num_inference_steps=0"):
        run(stage(), num_inference_steps=0, latents=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_inference_steps=0 on an epsilon-prediction stage"):
        stage("epsilon").call_settings(num_inference_steps=0)


@pytest.mark.parametrize("value", [-1, 1.5, float("nan"), "x"])
def test_bad_steps_are_one_line_naming_them(value):
    with pytest.raises(ValueError, match="num_inference_steps"):
        stage().call_settings(num_inference_steps=value)


def test_the_folder_default_is_read_by_plain_diffusers(tmp_path):
    pipe = stage()
    pipe.register_to_config(call_defaults={"num_inference_steps": 0})
    save_stage(pipe, tmp_path / "stage")
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "stage", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, 7), run(stage(), 0, num_inference_steps=0), atol=1e-6, rtol=0)


def test_export_set_writes_zero_steps_where_plain_diffusers_and_cdm_read_them_and_keeps_the_tiles(tmp_path):
    src = tmp_path / "sr"
    info = {"stage": {"name": "sr", "sample": {"scheduler": "DDPMScheduler", "steps": 2}}, "unet": {}}
    export_stage(stage(), src, info)
    index = json.loads((src / "model_index.json").read_text())
    index["call_defaults"]["tile_overlap"] = 4  # tuned in the folder, not in cdm_stage.json
    (src / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    export_main([str(src), "--out", str(out), "--set", "sr.steps=0"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["call_defaults"]["num_inference_steps"] == 0
    assert index["call_defaults"]["tile_overlap"] == 4  # a re-export keeps the folder's tiles
    pipe, settings = load_sr_stage(str(out), None)
    assert settings.steps == 0 and pipe.call_settings()["num_inference_steps"] == 0
    assert "the estimate from the noise's mean" in (out / "README.md").read_text()
    assert stage_settings(json.loads((src / "cdm_stage.json").read_text())).steps == 2  # source kept


def test_cdm_eval_sr_takes_zero_steps_and_refuses_negative_ones(tmp_path):
    save_stage(stage(), tmp_path / "stage")
    data = make_imagefolder(tmp_path / "data", classes=1, per_class=2, size=32)
    cmd = ["cdm-eval", "sr", "--model", str(tmp_path / "stage"), "--data", "imagefolder"]
    cmd += ["--data-path", str(data), "--split", "train", "--crop", "32", "--no-kid"]
    result = run_cli(cmd + ["--out", str(tmp_path / "ev"), "--steps", "0,1"], tmp_path)
    assert result.returncode == 0, result.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["settings"]["steps"] == 0 and [row["steps"] for row in res["sweep"]] == [0, 1]
    assert "the estimate from the noise's mean" in (tmp_path / "ev" / "results.md").read_text()
    bad = run_cli(cmd + ["--out", str(tmp_path / "bad"), "--steps", "-1"], tmp_path)
    assert bad.returncode == 2 and "--steps=-1" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
