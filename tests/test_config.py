"""Every stage x data x unet combination composes, validates and instantiates."""

from pathlib import Path

import pytest
from conftest import make_imagefolder
from omegaconf import OmegaConf

from cdm.cli.train import compose_config
from cdm.config import TrainRunConfig, validate
from cdm.models import build_pipeline, build_unet, count_parameters
from cdm.train.data import StageDataset, open_dataset

STAGES = ["base64", "sr64to256", "sr256to1024"]
DATA = ["digits", "photos", "imagefolder", "hub", "imagenet"]


def compose(*overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(TrainRunConfig), compose_config(list(overrides)))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("data", DATA)
def test_every_stage_and_data_composes_and_instantiates(stage, data, tmp_path, cache_env):
    extra = {
        "imagefolder": [f"data.path={make_imagefolder(tmp_path / 'imgs', size=300)}"],
        "hub": ["data.name=someone/some-images"],
    }.get(data, [])
    cfg = compose(f"stage={stage}", f"data={data}", "unet=tiny", *extra)
    assert cfg.stage.name == stage
    num_classes = 1000 if data == "imagenet" else 10
    unet = build_unet(cfg.stage, cfg.unet, num_classes)
    sr = cfg.stage.kind.value == "sr"
    assert unet.config.in_channels == (6 if sr else 3)  # SR: noise and the upsampled low-res image
    assert (unet.config.num_class_embeds if not sr else num_classes) == num_classes + (0 if sr else 1)
    if data in ("hub", "imagenet"):  # no network here: composing and building the model is what can run
        return
    ds, label_col, id2label = open_dataset(cfg.data)
    item = StageDataset(ds, cfg.data, label_col, (cfg.stage.resolution, cfg.stage.crop_size), seed=0)[(0, 0)]
    size = cfg.stage.crop_size or cfg.stage.resolution
    image = item["image"]
    assert image is not None and image.shape == (3, size, size)
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.01  # a real crop, not blank


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_presets_build_both_model_kinds(preset):
    sizes = {}
    for stage in ("base64", "sr64to256"):
        cfg = compose(f"stage={stage}", f"unet={preset}")
        pipe = build_pipeline(cfg.stage, cfg.unet, 10, {i: str(i) for i in range(10)})
        sizes[stage] = count_parameters(pipe.unet)
    assert sizes["base64"] > 0 and sizes["sr64to256"] > 0


def test_sr_stages_have_no_attention_above_32():
    cfg = compose("stage=sr64to256", "unet=paper")
    unet = build_unet(cfg.stage, cfg.unet, 0)
    # 256 -> 128 -> 64 -> 32: only the 32x32 level may attend
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
    ]
    base = build_unet(compose("stage=base64", "unet=paper").stage, cfg.unet, 10)
    assert [type(b).__name__ for b in base.down_blocks][1:] == ["AttnDownBlock2D"] * 3


def test_experiment_configs_compose():
    for name in ("demo_base64", "demo_sr64to256", "demo_sr256to1024"):
        cfg = compose(f"experiment={name}")
        assert cfg.train.output_dir.endswith(cfg.stage.name)
    names = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "experiment").glob("*.yaml"))
    assert "photo_sr4x_crop128" in names
    outputs = []
    for name in names:  # every committed recipe composes and validates, each into its own run folder
        outputs.append(compose(f"experiment={name}").train.output_dir)
        assert outputs[-1].startswith("runs/"), name
    assert len(set(outputs)) == len(outputs)


def test_typos_fail_with_the_key_name():
    with pytest.raises(ValueError, match="batchsize"):
        compose("train.batchsize=3")
    with pytest.raises(ValueError, match="stage.sample.aug_mode='sideways'"):
        compose("stage=sr64to256", "stage.sample.aug_mode=sideways")


def test_a_wheel_carries_the_configs_pipelines_and_demo_cascade(tmp_path):
    """cdm-train finds conf/ inside the installed package when cdm is not an editable checkout."""
    import importlib.util
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(root)]
    if importlib.util.find_spec("setuptools"):  # build with the installed setuptools: no download
        cmd.insert(5, "--no-build-isolation")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("cdm_diffusion-*.whl"))).namelist())
    conf = {f"cdm/conf/{p.relative_to(root / 'conf')}" for p in (root / "conf").rglob("*.yaml")}
    assert conf and conf <= names
    assert {
        "cdm_pipelines/pipeline_sr3.py",
        "cdm_pipelines/pipeline_cdm_base.py",
        "cdm/imagenet_classes.json",
        "cdm/demo_cascade/cascade.json",
        "cdm/hub/card_templates/limitations.md",
        "cdm/experiments/templates/guidance.md",
    } <= names
    assert any(n.startswith("cdm/demo_cascade/base64/unet/") and n.endswith(".safetensors") for n in names)


def test_zero_sample_steps_is_the_estimate_of_a_v_prediction_sr_stage_only():
    from cdm.errors import UserError

    photo = compose("experiment=photo_sr4x")
    assert photo.stage.sample.steps == 0  # the photo recipe samples as the shipped folder does
    validate(photo)
    for overrides in (["stage=base64"], ["experiment=photo_sr4x", "stage.prediction_type=epsilon"]):
        with pytest.raises(UserError, match="stage.sample.steps=0: expected 1 or more"):
            validate(compose(*overrides, "stage.sample.steps=0"))
