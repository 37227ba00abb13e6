"""One table of bad inputs across the CLIs. Each case must exit 2 with exactly one stderr line
that names the bad value, show no traceback, and leave every file under the working folder as it was."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import make_cascade, run_cli
from test_data_safety import tree_hashes


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def stage_entry(change):
    def setup(root: Path):
        edit_json(root / "cascade.json", lambda spec: change(spec["stages"][0]))

    return setup


def unet_config(**values):
    def setup(root: Path):
        edit_json(root / "base64" / "unet" / "config.json", lambda c: c.update(values))

    return setup


def cascade_json(text: str):
    def setup(root: Path):
        (root / "cascade.json").write_text(text)

    return setup


def foreign_class(root: Path):
    edit_json(root / "base64" / "model_index.json", lambda i: i.update(_class_name="StableDiffusionPipeline"))


def corrupt_weights(root: Path):
    (root / "base64" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00garbage")


def bad_scheduler_config(root: Path):
    (root / "base64" / "scheduler" / "scheduler_config.json").write_text("{ not json")


GEN = ["cdm-generate", "--model", "CASCADE", "--out", "NEW"]
UP = ["cdm-upscale", "IMG", "--model", "CASCADE", "--out", "NEW"]
SR = ["cdm-eval", "sr", "--model", "CASCADE", "--data", "digits", "--out", "NEW"]
EVAL_GEN = ["cdm-eval", "gen", "--model", "CASCADE", "--out", "NEW"]
EXPORT = ["cdm-export", "CASCADE/base64", "CASCADE/sr64to256", "--out", "NEW"]
TRAIN = ["cdm-train", "train.output_dir=NEW"]

# (id, command, text the one error line must contain, setup of the tiny cascade or None)
CASES = [
    # cdm-generate
    ("gen-unknown-class-id", [*GEN, "--class", "99"], "class id 99", None),
    ("gen-unknown-class-name", [*GEN, "--class", "seventeen"], "'seventeen'", None),
    ("gen-missing-model", [*GEN, "--class", "0", "--model", "MISSING"], "MISSING", None),
    ("gen-model-is-a-file", [*GEN, "--class", "0", "--model", "FILE"], "FILE", None),
    ("gen-zero-images", [*GEN, "--class", "0", "--num-images", "0"], "--num-images=0", None),
    ("gen-zero-steps", [*GEN, "--class", "0", "--steps", "0"], "steps=0", None),
    ("gen-unknown-scheduler", [*GEN, "--class", "0", "--scheduler", "NopeScheduler"], "NopeScheduler", None),
    ("gen-negative-guidance", [*GEN, "--class", "0", "--guidance", "-1"], "guidance_scale=-1.0", None),
    ("gen-noise-level-too-high", [*GEN, "--class", "0", "--noise-level", "5000"], "5000", None),
    ("gen-unknown-device", [*GEN, "--class", "0", "--device", "tpu9"], "tpu9", None),
    ("gen-out-is-a-file", [*GEN, "--class", "0", "--out", "FILE", "--overwrite"], "is a file", None),
    ("gen-too-many-stages", [*GEN, "--class", "0", "--stages", "7"], "--stages=7", None),
    ("gen-device-map-count", [*GEN, "--class", "0", "--device-map", "cpu"], "1 devices for 2 stages", None),
    ("gen-device-map-unknown", [*GEN, "--class", "0", "--device-map", "cpu,tpu9"], "tpu9", None),
    ("gen-stages-are-ints", [*GEN, "--class", "0"], "cascade.json", cascade_json('{"stages": [1, 2]}')),
    ("gen-cascade-not-json", [*GEN, "--class", "0"], "cascade.json", cascade_json("{ nope")),
    ("gen-stage-without-name", [*GEN, "--class", "0"], "name", stage_entry(lambda e: e.pop("name"))),
    (
        "gen-stage-path-escapes",
        [*GEN, "--class", "0"],
        "../../x",
        stage_entry(lambda e: e.update(path="../../x")),
    ),
    (
        "gen-stage-steps-not-a-number",
        [*GEN, "--class", "0"],
        "many",
        stage_entry(lambda e: e["sampling"].update(steps="many")),
    ),
    ("gen-foreign-pipeline-class", [*GEN, "--class", "0"], "StableDiffusionPipeline", foreign_class),
    ("gen-corrupt-weights", [*GEN, "--class", "0"], "diffusion_pytorch_model.safetensors", corrupt_weights),
    ("gen-bad-scheduler-config", [*GEN, "--class", "0"], "scheduler_config.json", bad_scheduler_config),
    ("gen-huge-sample-size", [*GEN, "--class", "0"], "sample_size=100000", unet_config(sample_size=100000)),
    (
        "gen-quantization-config",
        [*GEN, "--class", "0"],
        "quantization_config",
        unet_config(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
    ),
    # cdm-upscale
    (
        "up-missing-image",
        ["cdm-upscale", "MISSING.png", "--model", "CASCADE", "--out", "NEW"],
        "MISSING",
        None,
    ),
    ("up-folder-as-image", ["cdm-upscale", "DIR", "--model", "CASCADE", "--out", "NEW"], "is a folder", None),
    ("up-text-as-png", ["cdm-upscale", "TXT", "--model", "CASCADE", "--out", "NEW"], "fake.png", None),
    ("up-zero-steps", [*UP, "--steps", "0"], "--steps=0", None),
    ("up-noise-level-too-high", [*UP, "--noise-level", "5000"], "--noise-level=5000", None),
    ("up-negative-tile", [*UP, "--tile", "-4"], "--tile=-4", None),
    ("up-unknown-stage", [*UP, "--stage", "nope"], "--stage=nope", None),
    (
        "up-autoguidance-without-guide",
        [*UP, "--autoguidance", "1.5"],
        "--autoguidance=1.5: this stage has no guide",
        None,
    ),
    (
        "up-autoguidance-below-one",
        [*UP, "--autoguidance", "0.5"],
        "--autoguidance=0.5: expected a finite number in 1..100",
        None,
    ),
    ("up-unknown-scheduler", [*UP, "--scheduler", "NopeScheduler"], "NopeScheduler", None),
    # cdm-eval
    ("eval-zero-batch", [*EVAL_GEN, "--batch", "0"], "--batch=0", None),
    ("eval-zero-images", [*SR, "--num-images", "0"], "--num-images=0", None),
    ("eval-negative-noise-level", [*SR, "--noise-level", "-3"], "--noise-level=-3", None),
    ("eval-negative-blur", [*SR, "--blur", "-1"], "--blur=-1.0", None),
    ("eval-bad-tile", [*SR, "--tile", "7"], "--tile=7", None),
    ("eval-jpeg-quality-too-high", [*SR, "--jpeg", "200"], "--jpeg=200: expected a JPEG quality 1..95", None),
    ("eval-unknown-downsample", [*SR, "--downsample", "nearest"], "'nearest'", None),
    ("eval-unknown-scheduler", [*SR, "--scheduler", "NopeScheduler"], "NopeScheduler", None),
    (
        "eval-autoguidance-without-guide",
        [*SR, "--autoguidance", "2"],
        "--autoguidance=2.0: this stage has no guide",
        None,
    ),
    (
        "eval-only-corrupt-images",
        [*SR[:4], "--data", "imagefolder", "--data-path", "JPEGS", "--crop", "0", "--out", "NEW"],
        "broken.jpg: not a readable image",
        None,
    ),
    (
        "eval-corrupt-and-too-small-images",
        [*SR[:4], "--data", "imagefolder", "--data-path", "MIXED", "--crop", "0", "--out", "NEW"],
        "no test image of imagefolder is at least 4x4 pixels (1 more could not be read)",
        None,
    ),
    (
        "eval-only-corrupt-images-cropped",
        [*SR[:4], "--data", "imagefolder", "--data-path", "JPEGS", "--crop", "16", "--out", "NEW"],
        "none of the 1 test images of imagefolder could be read",
        None,
    ),
    ("eval-missing-reference-stats", [*EVAL_GEN, "--reference-stats", "MISSING.npz"], "MISSING.npz", None),
    # cdm-export
    ("export-negative-steps", [*EXPORT, "--set", "base64.steps=-5"], "steps=-5", None),
    ("export-noise-level-too-high", [*EXPORT, "--set", "sr64to256.noise_level=99999"], "99999", None),
    ("export-unknown-scheduler", [*EXPORT, "--set", "base64.scheduler=Foo"], "Foo", None),
    ("export-unknown-stage-in-set", [*EXPORT, "--set", "nope.steps=3"], "nope", None),
    ("export-missing-input", ["cdm-export", "MISSING", "--out", "NEW"], "MISSING", None),
    ("export-missing-notes", [*EXPORT, "--notes", "MISSING.md"], "--notes MISSING.md", None),
    (
        "export-guide-for-a-cascade",
        [*EXPORT, "--guide", "MISSING"],
        "MISSING: a guide is attached to one SR stage",
        None,
    ),
    ("export-cascade-as-stage", ["cdm-export", "CASCADE", "--out", "NEW"], "is a cascade folder", None),
    ("export-into-existing", [*EXPORT[:-1], "FILE"], "already exists", None),
    ("export-push-offline", ["cdm-export", "CASCADE", "--push-to-hub", "someone/x"], "someone/x", None),
    # cdm-app
    ("app-missing-model", ["cdm-app", "--model", "MISSING"], "MISSING", None),
    ("app-bad-port", ["cdm-app", "--model", "CASCADE", "--port", "0"], "--port=0", None),
    # cdm-train
    ("train-zero-batch", [*TRAIN, "train.batch_size=0"], "train.batch_size=0", None),
    ("train-into-a-folder-of-the-users", ["cdm-train", "train.output_dir=JPEGS"], "holds 'broken.jpg'", None),
    ("train-empty-output-dir", ["cdm-train", "train.output_dir="], "train.output_dir is empty", None),
    ("train-adam-beta2-above-one", [*TRAIN, "train.adam_beta2=2"], "train.adam_beta2=2.0", None),
    ("train-zero-norm-groups", [*TRAIN, "unet.norm_num_groups=0"], "unet.norm_num_groups=0", None),
    ("train-no-unet-levels", [*TRAIN, "unet.block_out_channels=[]"], "unet.block_out_channels=[]", None),
    ("train-huge-seed", [*TRAIN, "train.seed=99999999999999999999"], "train.seed=99999999999999999999", None),
    ("train-nan-learning-rate", [*TRAIN, "train.learning_rate=nan"], "train.learning_rate=nan", None),
    ("train-misspelt-key", [*TRAIN, "+train.max_stepz=5"], "max_stepz", None),
    ("train-unknown-top-level-key", [*TRAIN, "+foo=1"], "foo", None),
    ("train-unknown-stage", [*TRAIN, "stage=nope"], "nope", None),
    ("train-unknown-experiment", [*TRAIN, "experiment=nope"], "nope", None),
    ("train-missing-imagefolder", [*TRAIN, "data=imagefolder", "data.path=MISSING"], "MISSING", None),
    ("train-negative-learning-rate", [*TRAIN, "train.learning_rate=-1"], "learning_rate", None),
    ("train-zero-timestep-power", [*TRAIN, "stage.timestep_power=0"], "stage.timestep_power=0.0", None),
    (
        "train-estimate-fraction-above-one",
        [*TRAIN, "stage.estimate_fraction=2"],
        "stage.estimate_fraction=2.0",
        None,
    ),
    (
        "train-zero-sample-steps-on-a-base-stage",
        [*TRAIN, "stage.sample.steps=0"],
        "stage.sample.steps=0: expected 1 or more",
        None,
    ),
    (
        "train-estimate-fraction-on-epsilon",
        [*TRAIN, "stage.prediction_type=epsilon", "stage.estimate_fraction=0.5"],
        "expected v_prediction",
        None,
    ),
    (
        "train-max-scale-below-min",
        [*TRAIN, "data.min_scale=0.5", "data.max_scale=0.25"],
        "data.max_scale=0.25",
        None,
    ),
]


def test_the_table_is_large_and_its_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name, cmd, needle, setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, name, cmd, needle, setup):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    if setup is not None:
        setup(root)
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "DIR").mkdir()
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "JPEGS").mkdir()
    (tmp_path / "JPEGS" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xdb\x00\x43 truncated")
    (tmp_path / "MIXED").mkdir()
    (tmp_path / "MIXED" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xdb\x00\x43 truncated")
    PIL.Image.fromarray(np.full((2, 2, 3), 9, np.uint8)).save(tmp_path / "MIXED" / "tiny.png")
    PIL.Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "img.png")
    subs = {
        "FILE": str(tmp_path / "FILE"),
        "NEW": str(tmp_path / "new"),
        "CASCADE": str(root),
        "CASCADE/base64": str(root / "base64"),
        "CASCADE/sr64to256": str(root / "sr64to256"),
        "IMG": str(tmp_path / "img.png"),
        "DIR": str(tmp_path / "DIR"),
        "TXT": str(tmp_path / "fake.png"),
        "JPEGS": str(tmp_path / "JPEGS"),
        "MIXED": str(tmp_path / "MIXED"),
        "MISSING": str(tmp_path / "MISSING"),
        "MISSING.png": str(tmp_path / "MISSING.png"),
        "MISSING.npz": str(tmp_path / "MISSING.npz"),
    }
    args = [subs.get(a, a.replace("data.path=MISSING", f"data.path={tmp_path / 'MISSING'}")) for a in cmd]
    args = [a.replace("train.output_dir=NEW", f"train.output_dir={tmp_path / 'new'}") for a in args]
    args = [a.replace("train.output_dir=JPEGS", f"train.output_dir={tmp_path / 'JPEGS'}") for a in args]
    before = tree_hashes(tmp_path)
    res = run_cli(args, tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert tree_hashes(tmp_path) == before and not (tmp_path / "new").exists()
