"""Detail that follows the content (the SR pipeline's `detail_threshold`), and the per-image spread of
`cdm-eval sr`'s scores (median and worst decile)."""

import json

import pytest
import torch
from cdm_pipelines.pipeline_sr3 import detail_mask, local_contrast
from conftest import TINY, run_cli, sr_stage

from cdm.measure.sr import spread, worst_decile
from cdm.models import build_pipeline, sampling_scheduler
from cdm.stage_io import save_stage


def stage(prediction_type="v_prediction"):
    st = sr_stage(8, 32)
    st.prediction_type, st.residual, st.residual_scale = prediction_type, True, 4.0
    torch.manual_seed(0)
    pipe = build_pipeline(st, TINY, 0)
    config = {**pipe.scheduler.config, "timestep_spacing": "trailing"}  # one step starts at t = 999
    pipe.scheduler = sampling_scheduler("DDIMScheduler", config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def half_flat(seed=0) -> torch.Tensor:
    """A 16 px low-res image whose left half is one flat colour and whose right half is random texture."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    x[..., :8] = torch.tensor([0.3, 0.5, 0.7])[:, None, None]
    return x


def run(pipe, image, steps, **call):
    gen = torch.Generator().manual_seed(0)
    out = pipe(
        image,
        num_inference_steps=steps,
        noise_level=0,
        output_type="pt",
        generator=gen,
        allow_any_size=True,
        **call,
    )
    return out.images


FLAT, TEXTURED = (..., slice(0, 16)), (..., slice(-24, None))  # output columns well inside each half


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_flat_regions_get_the_first_estimate_and_textured_ones_the_sample(prediction_type):
    """One DDIM step from t = 999 returns the first step's estimate of x0, so where the input is flat the
    thresholded 6-step output equals the 1-step output, and where it has contrast, the 6-step sample."""
    pipe = stage(prediction_type)
    image = half_flat()
    one, six = run(pipe, image, 1), run(pipe, image, 6)
    out = run(pipe, image, 6, detail_threshold=0.01)
    mask = detail_mask(image * 2 - 1, (64, 64), 0.01)
    assert mask[FLAT].max() < 1e-3 and (mask[TEXTURED] == 1).all()
    torch.testing.assert_close(out[FLAT], one[FLAT], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[TEXTURED], six[TEXTURED], atol=1e-5, rtol=0)
    assert (one[FLAT] - six[FLAT]).abs().max() > 1e-3  # the two really differ there


def test_zero_threshold_and_the_library_default_keep_the_sample():
    pipe = stage()
    image = half_flat()
    torch.testing.assert_close(run(pipe, image, 4, detail_threshold=0.0), run(pipe, image, 4))


def test_the_folder_default_is_read_by_plain_diffusers(tmp_path):
    pipe = stage()
    pipe.register_to_config(call_defaults={"detail_threshold": 0.01, "num_inference_steps": 6})
    save_stage(pipe, tmp_path / "stage")
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "stage", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    image = half_flat()
    torch.testing.assert_close(
        run(loaded, image, None), run(pipe, image, 6, detail_threshold=0.01), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(run(loaded, image, None)[FLAT], run(pipe, image, 1)[FLAT], atol=1e-4, rtol=0)


def test_local_contrast_is_zero_on_flat_input_and_grows_with_texture():
    flat = torch.full((1, 3, 16, 16), 0.2)
    assert local_contrast(flat).abs().max() < 1e-6
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert local_contrast(noise * 0.5).mean() < local_contrast(noise).mean()


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "x"])
def test_a_bad_threshold_is_one_line_naming_it(value):
    with pytest.raises(ValueError, match="detail_threshold"):
        stage().call_settings(detail_threshold=value)


def test_worst_decile_takes_the_images_farthest_from_one_on_a_log_scale():
    hf = [1.0, 0.9, 5.0, 1.1, 0.15, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 0.95]
    assert worst_decile(hf) == [2, 4]  # 12 images: two; log 5 = 1.61 and |log 0.15| = 1.90
    assert worst_decile([1.0, 2.0]) == [1]


def test_spread_reports_medians_and_worst_deciles():
    torch.manual_seed(0)
    smooth = [torch.rand(1, 3, 8, 8) for _ in range(5)]
    images = [torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 1) for x in smooth]
    lrs = [torch.nn.functional.avg_pool2d(x, 4) for x in images]
    preds = [x.clone() for x in images]
    preds[3] = (preds[3] + 0.3 * torch.randn_like(preds[3])).clamp(0, 1)
    out = spread(preds, images, lrs, kid=False)
    s = out["spread"]
    assert s["psnr_p10"] < s["psnr_median"]  # one image is much worse than the rest
    assert s["hf_ratio_p90"] > 1.5 and s["hf_ratio_median"] == pytest.approx(1.0)
    assert len(out["per_image"]["psnr"]) == 5


def test_cdm_eval_sr_writes_the_spread_and_takes_the_detail_flag(tmp_path):
    pipe = stage()
    pipe.scheduler = sampling_scheduler("DDPMScheduler", pipe.scheduler.config)
    save_stage(pipe, tmp_path / "stage")
    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data", classes=1, per_class=3, size=32)
    cmd = ["cdm-eval", "sr", "--model", str(tmp_path / "stage"), "--data", "imagefolder"]
    cmd += ["--data-path", str(data), "--split", "train", "--crop", "32", "--no-kid", "--steps", "2"]
    result = run_cli(cmd + ["--out", str(tmp_path / "ev"), "--detail-threshold", "0.02"], tmp_path)
    assert result.returncode == 0, result.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["settings"]["detail_threshold"] == 0.02
    assert set(res["spread"]) == {"model", "bicubic"} and len(res["per_image"]["model"]["psnr"]) == 3
    assert "PSNR p10" in (tmp_path / "ev" / "results.md").read_text()
    bad = run_cli(cmd + ["--out", str(tmp_path / "bad"), "--detail-threshold", "2"], tmp_path)
    assert bad.returncode == 2 and "--detail-threshold=2" in bad.stderr and "Traceback" not in bad.stderr
