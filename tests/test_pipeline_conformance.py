"""diffusers-style checks for both pipelines: every scheduler, callbacks, num_images_per_prompt, output
types, components, loading with the installed classes, and offload."""

import inspect

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from cdm_pipelines import CDMBasePipeline, SR3Pipeline
from conftest import LABELS, TINY, base_stage, gens, make_cascade, sr_stage

from cdm.cascade import Cascade
from cdm.errors import UserError
from cdm.models import build_pipeline, sampling_scheduler
from cdm.stage_io import save_stage


def all_schedulers() -> list[str]:
    """Every scheduler class diffusers exports, found at test time so that new ones are covered."""
    return sorted(
        n for n in dir(diffusers) if n.endswith("Scheduler") and inspect.isclass(getattr(diffusers, n))
    )


SCHEDULERS = all_schedulers()


def sample(pipe, scheduler_name, steps=4):
    pipe.scheduler = sampling_scheduler(scheduler_name, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, SR3Pipeline):
        return pipe(
            torch.zeros(1, 3, 8, 8),
            num_inference_steps=steps,
            noise_level=10,
            output_type="np",
            generator=gens([0]),
        ).images
    return pipe([1], num_inference_steps=steps, output_type="np", generator=gens([0])).images


def test_the_scheduler_list_is_built_from_diffusers():
    assert (
        len(SCHEDULERS) >= 15
        and "UniPCMultistepScheduler" in SCHEDULERS
        and "LMSDiscreteScheduler" in SCHEDULERS
    )


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["base", "sr"])
def test_every_scheduler_runs_or_is_refused_clearly(name, kind):
    torch.manual_seed(0)
    stage = base_stage() if kind == "base" else sr_stage(8, 32)
    stage.prediction_type = "v_prediction"
    pipe = build_pipeline(stage, TINY, 3, LABELS)
    try:
        scheduler = sampling_scheduler(name, pipe.scheduler.config)
    except ValueError as err:  # refused up front, naming the scheduler
        assert name in str(err)
        return
    pipe.scheduler = scheduler
    images = sample(pipe, name)
    assert np.isfinite(images).all() and images.shape[0] == 1


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_in_a_truncated_cascade_runs_or_is_refused(tmp_path, name):
    root = make_cascade(tmp_path / "c", sizes=(8, 32), modes=("truncated",), levels=(300,))
    cascade = Cascade.from_pretrained(root)
    try:
        settings = cascade.with_overrides(scheduler=[name, "DDIMScheduler"])
    except UserError as err:
        assert name in str(err)
        return
    out = cascade([0], [0], settings, progress=False)
    assert torch.isfinite(out.images[-1]).all() and out.images[-1].shape == (1, 3, 32, 32)


def test_truncation_with_an_edm_scheduler_is_refused_in_one_line(tmp_path):
    root = make_cascade(tmp_path / "c", sizes=(8, 32), modes=("truncated",), levels=(300,))
    with pytest.raises(UserError, match="EDMEulerScheduler.*alphas_cumprod"):
        Cascade.from_pretrained(root).with_overrides(scheduler=["EDMEulerScheduler", "DDIMScheduler"])


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_callbacks_see_every_step_and_can_interrupt(kind, base_pipe):
    pipe = base_pipe if kind == "base" else build_pipeline(sr_stage(8, 32), TINY, 0)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t), tuple(kwargs["latents"].shape), p.num_timesteps, p.guidance_scale))
        if i == 1:
            p._interrupt = True
        return {"latents": kwargs["latents"] * 0}

    args = ([0],) if kind == "base" else (torch.zeros(1, 3, 8, 8),)
    out = pipe(
        *args,
        num_inference_steps=4,
        callback_on_step_end=callback,
        output_type="latent",
        callback_on_step_end_tensor_inputs=["latents"],
    )
    assert [s[0] for s in seen] == [0, 1] and all(s[3] == 4 for s in seen)
    assert seen[0][4] == 1.0
    if kind == "base":
        assert torch.equal(out.images, torch.zeros_like(out.images))  # the callback's replacement was used
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(
            *args,
            num_inference_steps=1,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["x"],
        )


def test_num_images_per_prompt_repeats_each_label_and_each_image(base_pipe):
    base_pipe.set_progress_bar_config(disable=True)
    out = base_pipe(
        [0, 2], num_images_per_prompt=3, num_inference_steps=2, output_type="pt", generator=gens(range(6))
    )
    assert out.images.shape[0] == 6
    alone = base_pipe([2], num_inference_steps=2, output_type="pt", generator=gens([3])).images
    torch.testing.assert_close(out.images[3:4], alone, atol=1e-5, rtol=0)
    sr = build_pipeline(sr_stage(8, 32), TINY, 0)
    sr.set_progress_bar_config(disable=True)
    images = sr(
        [torch.zeros(3, 8, 8), torch.ones(3, 8, 8) * 0.5],
        num_images_per_prompt=2,
        num_inference_steps=1,
        noise_level=0,
        output_type="pt",
    ).images
    assert images.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_output_types(kind, base_pipe):
    pipe = base_pipe if kind == "base" else build_pipeline(sr_stage(8, 32), TINY, 0)
    pipe.set_progress_bar_config(disable=True)
    args = ([0],) if kind == "base" else (torch.zeros(1, 3, 8, 8),)
    latent = pipe(*args, output_type="latent", num_inference_steps=1, generator=gens([0])).images
    pt = pipe(*args, output_type="pt", num_inference_steps=1, generator=gens([0])).images
    common = {"num_inference_steps": 1, "generator": gens([0])}
    assert isinstance(latent, torch.Tensor) and latent.shape == pt.shape
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))  # "pt": [0, 1], as diffusers gives
    np_images = pipe(*args, output_type="np", **common).images
    assert np_images.shape[-1] == 3
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert pipe(*args, output_type="pil", **common).images[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type='jpeg'"):
        pipe(*args, output_type="jpeg", **common)


def test_components_rebuild_the_same_pipeline():
    sr = build_pipeline(sr_stage(16, 64), TINY, 3, LABELS)
    again = SR3Pipeline(**sr.components)
    assert (again.config.low_res_size, again.scale_factor) == (16, 4)
    base = build_pipeline(base_stage(), TINY, 3, LABELS)
    assert CDMBasePipeline(**base.components).labels == base.labels


def test_installed_classes_load_a_stage_folder_without_remote_code(tmp_path):
    sr = build_pipeline(sr_stage(16, 64), TINY, 0)
    save_stage(sr, tmp_path / "sr")
    (tmp_path / "sr" / "pipeline_sr3.py").write_text("raise SystemExit('the folder code ran')\n")
    loaded = SR3Pipeline.from_pretrained(tmp_path / "sr")
    assert type(loaded) is SR3Pipeline and loaded.config.low_res_size == 16
    base = build_pipeline(base_stage(), TINY, 3, LABELS)
    save_stage(base, tmp_path / "base")
    assert CDMBasePipeline.from_pretrained(tmp_path / "base").labels == base.labels


def test_copied_helpers_match_their_originals():
    import re

    import cdm_pipelines.pipeline_cdm_base as base
    import cdm_pipelines.pipeline_sr3 as sr3

    text = inspect.getsource(sr3)
    names = re.findall(r"# Copied from cdm_pipelines\.pipeline_cdm_base\.(\w+)", text)
    assert {
        "cfg_combine",
        "to_output_type",
        "step_kwargs",
        "load_components",
        "check_weight_files",
        "run_offload_hooks_on_cpu",
    } <= set(names)
    for name in names:
        assert inspect.getsource(getattr(sr3, name)) == inspect.getsource(getattr(base, name)), name


def test_sr_reads_tensors_in_zero_one_like_pil_images():
    """A [0, 1] tensor, a list of them and the same image as PIL give one result; [-1, 1] is refused."""
    pipe = build_pipeline(sr_stage(8, 32), TINY, 0)
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = (x * 255).round() / 255  # exactly representable in 8 bits, like the PIL copy
    pil = [PIL.Image.fromarray((i.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for i in x]
    common = {"num_inference_steps": 1, "noise_level": 0, "output_type": "pt"}
    runs = [pipe(image, generator=gens([0, 1]), **common).images for image in (x, list(x), pil)]
    torch.testing.assert_close(runs[0], runs[1])
    torch.testing.assert_close(runs[0], runs[2])
    with pytest.raises(ValueError, match=r"image tensor values span \[-[\d.]+, [\d.]+\]: expected \[0, 1\]"):
        pipe(x * 2 - 1, generator=gens([0, 1]), **common)


@pytest.mark.parametrize("offload", ["sequential", "model"])
@pytest.mark.parametrize("kind", ["base", "sr"])
def test_cpu_offload_gives_the_plain_run_images(kind, offload):
    def build():
        torch.manual_seed(0)
        stage = base_stage() if kind == "base" else sr_stage(8, 32, class_conditional=True)
        pipe = build_pipeline(stage, TINY, 3, LABELS)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    args = ([0, 2],) if kind == "base" else (torch.rand(2, 3, 8, 8), [0, 2])
    kw = {"num_inference_steps": 2, "output_type": "np", "guidance_scale": 2.0}
    plain = build()(*args, generator=gens([0, 1]), **kw).images
    pipe = build()
    getattr(pipe, f"enable_{offload}_cpu_offload")(device="cpu")
    if offload == "sequential":  # the weights wait on the meta device until their module runs
        assert pipe.unet.conv_in.weight.device.type == "meta"
    offloaded = pipe(*args, generator=gens([0, 1]), **kw).images
    np.testing.assert_allclose(offloaded, plain, atol=1e-6)
