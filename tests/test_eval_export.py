"""Evaluation metrics, cdm-eval, model cards, cdm-export and the Hub push (with a fake HfApi)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    TINY,
    build_pipeline,
    make_cascade,
    make_imagefolder,
    run_cli,
    sr_stage,
    two_process_launch,
)
from huggingface_hub import ModelCard

from cdm.cli.export import main as export_main
from cdm.hub.publish import push_to_hub
from cdm.measure.metrics import consistency, psnr, ssim
from cdm.stage_io import save_stage
from cdm.train.degradations import downsample

# -- metrics --------------------------------------------------------------------------------------


def test_psnr_and_ssim_reference_values():
    x = torch.full((1, 3, 16, 16), 0.5)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 20 dB
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.2 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert ssim(x, noisy).item() < 0.9


def test_consistency_of_bicubic_upsampling_on_a_constant_image_by_hand():
    lr = torch.full((1, 3, 8, 8), 0.25)
    up = torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False)
    # bicubic reproduces a constant, and the anti-aliased downsampler averages it back: MSE exactly ~0
    assert consistency(up, lr).item() == pytest.approx(0.0, abs=1e-12)
    # an output brighter by 0.1 everywhere is inconsistent by exactly 0.1^2
    assert consistency(up + 0.1, lr).item() == pytest.approx(0.01, rel=1e-4)
    assert downsample(up, 4).shape == lr.shape


# -- cdm-eval -------------------------------------------------------------------------------------


def _split_imagefolder(root, size, classes=3):
    make_imagefolder(root / "train", classes=classes, per_class=6, size=size, seed=1)
    make_imagefolder(root / "test", classes=classes, per_class=2, size=size, seed=2)
    return root


def test_eval_sr_reports_finite_metrics_for_model_and_bicubic(tmp_path, cache_env):
    stage_dir = tmp_path / "sr"
    save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), stage_dir)
    data = _split_imagefolder(tmp_path / "imgs", size=48)
    res = run_cli(
        [
            "cdm-eval",
            "sr",
            "--model",
            str(stage_dir),
            "--data",
            "imagefolder",
            "--data-path",
            str(data),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "ev"),
        ],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["dataset"]["num_images"] == 6 and result["dataset"]["crop"] == 32
    assert result["settings"]["tile"] is None  # whole images through the UNet unless --tile
    for method in ("model", "bicubic"):
        assert all(np.isfinite(v) for v in result["metrics"][method].values())
    assert result["metrics"]["bicubic"]["psnr"] > 15  # smooth images: bicubic is good, a random model is not
    assert "| bicubic upsampling |" in (tmp_path / "ev" / "results.md").read_text()


@pytest.mark.slow
def test_eval_sr_skips_a_corrupt_image_and_names_it(tmp_path, cache_env):
    stage_dir = tmp_path / "sr"
    save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), stage_dir)
    data = _split_imagefolder(tmp_path / "imgs", size=48)
    class_dir = next(p for p in (data / "test").iterdir() if p.is_dir())
    (class_dir / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for crop, named in (("0", True), ("32", False)):
        cmd = ["cdm-eval", "sr", "--model", str(stage_dir), "--data", "imagefolder", "--data-path", str(data)]
        res = run_cli(
            [*cmd, "--crop", crop, "--no-kid", "--out", str(tmp_path / f"ev{crop}")], tmp_path, cache_env
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "skipped 1 unreadable image(s)" in res.stderr
        assert ("zz_broken.png" in res.stderr) == named  # whole images know their file names
        result = json.loads((tmp_path / f"ev{crop}" / "results.json").read_text())
        assert result["dataset"]["num_images"] == 6  # the seven files less the broken one


def test_other_downsamplers_and_jpeg_make_other_inputs_and_the_table_says_so():
    from cdm.hub.cards import sr_table
    from cdm.train.degradations import downsample, other_downsample

    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 3, 4, 6, generator=g)
    x = blocks.repeat_interleave(4, -2).repeat_interleave(4, -1)  # 16 x 24, constant 4 x 4 blocks
    assert torch.equal(other_downsample(x, 4), downsample(x, 4))
    # a box filter averages each block: the blocks back, to 8-bit precision; bicubic's kernel spills over
    assert (other_downsample(x, 4, "box") - blocks).abs().max() <= 1 / 255
    assert (downsample(x, 4) - blocks).abs().max() > 0.025
    noisy = torch.rand(2, 3, 64, 64, generator=g)
    plain, stored = other_downsample(noisy, 4, "lanczos"), other_downsample(noisy, 4, "lanczos", jpeg=20)
    assert stored.shape == plain.shape == (2, 3, 16, 16)
    assert (stored - plain).abs().mean() > 0.01  # the JPEG round trip changed the pixels
    assert torch.equal(stored, torch.round(stored * 255) / 255)  # 8-bit values
    res = {
        "stage": "s",
        "dataset": {"name": "d", "num_images": 2},
        "settings": {"steps": 1, "noise_level": 0, "blur": 0.0, "downsample": "box", "jpeg": 20, "tile": 64},
        "metrics": {m: {"psnr": 20.0} for m in ("model", "bicubic")},
    }
    head = sr_table(res)[0]
    assert (
        "inputs downsampled with PIL's box filter, inputs stored as JPEG quality 20, UNet on 64 px tiles:"
        in head
    )
    plain_settings = {"steps": 1, "noise_level": 0, "downsample": "bicubic", "jpeg": 0, "tile": None}
    assert "inputs" not in sr_table({**res, "settings": plain_settings})[0]


def test_eval_sr_blur_softens_the_low_res_input_and_says_so():
    from cdm.hub.cards import sr_table
    from cdm.measure.metrics import high_frequency_energy
    from cdm.measure.sr import Degradation, evaluate_sr, sr_outputs

    pipe = build_pipeline(sr_stage(8, 32), TINY, 0)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 32, 32, generator=g) for _ in range(2)]
    call = {"num_inference_steps": 1, "noise_level": 0}
    sharp = sr_outputs(pipe, images, 0, **call)
    soft = sr_outputs(pipe, images, 0, Degradation(blur=1.0), **call)
    for a, b in zip(sharp["lr"], soft["lr"]):
        assert high_frequency_energy(b, 0.25).item() < 0.5 * high_frequency_energy(a, 0.25).item()
    plain, blurred = (
        evaluate_sr(pipe, images, 0, **call),
        evaluate_sr(pipe, images, 0, Degradation(blur=1.0), **call),
    )
    assert blurred["bicubic"]["psnr"] < plain["bicubic"]["psnr"] - 0.1
    res = {
        "stage": "s",
        "dataset": {"name": "d", "num_images": 2},
        "settings": {"steps": 1, "noise_level": 0, "blur": 1.0},
        "metrics": blurred,
    }
    assert "inputs blurred (sigma 1 low-res px)" in sr_table(res)[0]
    assert "blurred" not in sr_table({**res, "settings": {"steps": 1, "noise_level": 0, "blur": 0.0}})[0]


def test_sweep_writes_table_plot_and_best_level(tmp_path, cache_env):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    data = _split_imagefolder(tmp_path / "imgs", size=16)
    res = run_cli(
        [
            "cdm-eval",
            "sweep-aug",
            "--model",
            str(root),
            "--stage",
            "sr64to256",
            "--levels",
            "0,400",
            "--modes",
            "non-truncated,truncated",
            "--num-per-class",
            "1",
            "--data",
            "imagefolder",
            "--data-path",
            str(data),
            "--out",
            str(tmp_path / "sw"),
            "--write-best",
        ],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert len(sweep["rows"]) == 4
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    stage = json.loads((root / "cascade.json").read_text())["stages"][1]["sampling"]
    assert (stage["noise_level"], stage["aug_mode"]) == (
        sweep["best"]["noise_level"],
        sweep["best"]["aug_mode"],
    )


def _eval_gen_args(root, data, out, *extra):
    """cdm-eval gen on the first stage of a tiny cascade: 2 samples for each of 3 classes."""
    common = ["--stages", "1", "--num-per-class", "2", "--data", "imagefolder", "--data-path", str(data)]
    return ["cdm-eval", "gen", "--model", str(root), *common, "--out", str(out), *extra]


@pytest.mark.parametrize("fid", [False, True], ids=["agreement", "with-fid"])
def test_eval_gen_reports_class_agreement_with_classifier_accuracy(tmp_path, cache_env, fid):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    data = _split_imagefolder(tmp_path / "imgs", size=16)
    res = run_cli(
        _eval_gen_args(root, data, tmp_path / "g", *(["--fid"] if fid else [])), tmp_path, cache_env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "g" / "results.json").read_text())
    assert result["num_samples"] == 6
    # fractions of counts: 6 samples, and the 6 images of the test split (3 classes x 2)
    agreement, classifier = result["metrics"]["class_agreement"], result["classifier"]
    assert agreement * 6 == pytest.approx(round(agreement * 6))
    assert classifier["held_out_images"] == 6
    assert classifier["held_out_accuracy"] * 6 == pytest.approx(round(classifier["held_out_accuracy"] * 6))
    if fid:  # the offline Inception; the floor is as many real train images against the same reference
        assert result["metrics"]["fid"] > 0 and np.isfinite(result["metrics"]["kid"])
        floor = result["real_data_floor"]
        assert floor["split"] == "train" and floor["num_images"] == 6 and floor["fid"] > 0
        assert f"FID {floor['fid']:.1f}" in (tmp_path / "g" / "results.md").read_text()
    else:
        assert "fid" not in result["metrics"] and result["real_data_floor"] is None


def test_fid_and_kid_with_a_pluggable_extractor():
    from cdm.measure.fid import frechet_and_kernel_distance

    class MeanColour(torch.nn.Module):  # any module from uint8 images to (N, d) features
        def forward(self, x):
            f = x.float().mean(dim=(2, 3))
            return torch.cat([f, f**2 / 255], dim=1)

    g = torch.Generator().manual_seed(0)
    real = torch.rand(16, 3, 8, 8, generator=g)
    same = torch.rand(16, 3, 8, 8, generator=g)
    shifted = (same + 0.4).clamp(0, 1)
    near = frechet_and_kernel_distance(same, real, feature=MeanColour())
    far = frechet_and_kernel_distance(shifted, real, feature=MeanColour())
    assert far["fid"] > near["fid"] and far["kid"] > near["kid"]


@pytest.mark.slow
def test_offline_inception_tells_real_digits_from_tinted_ones(cache_env):
    """The shipped TorchScript Inception, end to end: two halves of the real test digits are closer
    to each other than a colour-tinted copy of one half is to the other."""
    from cdm.measure.fid import OfflineInception, frechet_and_kernel_distance
    from cdm.measure.heldout import data_config, real_images

    inception = OfflineInception()
    assert inception(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 2048)
    images, labels = real_images(data_config("digits", None), "test", 32, None)
    a, b = images[0::20], images[10::20]  # 25 each, spread over the classes
    assert len(set(labels[0::20].tolist())) == len(set(labels[10::20].tolist())) == 10
    tint = torch.tensor([0.15, -0.1, 0.05]).view(1, 3, 1, 1)
    near = frechet_and_kernel_distance(a, b, feature=inception)
    far = frechet_and_kernel_distance((a + tint).clamp(0, 1), b, feature=inception)
    assert far["fid"] > near["fid"] + 10 and far["kid"] > near["kid"]


# -- cards and export -----------------------------------------------------------------------------


def _meta(card_path):
    text = card_path.read_text()
    return yaml.safe_load(text.split("---")[1]), ModelCard.load(card_path)


def test_export_cascade_writes_a_card_that_parses_with_every_field(tmp_path, cache_env):
    src = make_cascade(tmp_path / "src", sizes=(8, 32))
    results = {
        "kind": "sr",
        "stage": "sr64to256",
        "dataset": {"name": "photos", "split": "test", "num_images": 3, "crop": 32},
        "settings": {"steps": 2, "noise_level": 0},
        "metrics": {
            "model": {"psnr": 21.5, "ssim": 0.61, "consistency": 1e-3},
            "bicubic": {"psnr": 23.0, "ssim": 0.7, "consistency": 2e-4},
        },
    }
    (tmp_path / "r.json").write_text(json.dumps(results))
    grid = tmp_path / "grid.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(grid)
    notes = tmp_path / "notes.md"
    notes.write_text("## How the defaults were chosen\n\nThe steps were swept.\n", encoding="utf-8")
    out = tmp_path / "cascade"
    res = run_cli(
        [
            "cdm-export",
            str(src / "base64"),
            str(src / "sr64to256"),
            "--out",
            str(out),
            "--eval",
            str(tmp_path / "r.json"),
            "--samples",
            str(grid),
            "--license",
            "mit",
            "--set",
            "base64.steps=7",
            "--set",
            "sr64to256.aug_mode=truncated",
            "--notes",
            str(notes),
        ],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    meta, card = _meta(out / "README.md")
    assert meta["library_name"] == "diffusers" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "cascaded-diffusion", "super-resolution", "class-conditional"} <= set(meta["tags"])
    evals = card.data.eval_results
    assert {(e.metric_type, e.metric_value) for e in evals} == {
        ("psnr", 21.5),
        ("ssim", 0.61),
        ("consistency", 0.001),
    }
    assert evals[0].dataset_name == "photos" and meta["model-index"][0]["results"]
    body = card.text
    for needle in (
        "## Stages",
        "## Samples",
        "## Conditioning augmentation",
        "## Results",
        "## Usage",
        "trust_remote_code=True",
        "## Training",
        "## Limitations",
        "| 23.00 |",
    ):
        assert needle in body, needle
    notes_at = body.index("## How the defaults were chosen\n\nThe steps were swept.")
    assert body.index("## Conditioning augmentation") < notes_at < body.index("## Results")
    spec = json.loads((out / "cascade.json").read_text())
    assert [s["name"] for s in spec["stages"]] == ["base64", "sr64to256"]
    assert spec["stages"][0]["sampling"]["steps"] == 7
    assert spec["stages"][1]["sampling"]["aug_mode"] == "truncated"
    assert (out / "samples.png").is_file() and (out / "sr64to256" / "pipeline_sr3.py").is_file()


def test_set_on_a_single_stage_reaches_the_settings_it_is_loaded_with(tmp_path):
    from cdm.stage_io import export_stage, stage_info, stage_settings
    from cdm.upscaling import load_sr_stage

    stage = tmp_path / "sr"
    info = {"stage": {"name": "sr", "sample": {"scheduler": "DDIMScheduler", "steps": 2}}, "unet": {}}
    export_stage(build_pipeline(sr_stage(8, 32), TINY, 0), stage, info)
    export_main([str(stage), "--out", str(tmp_path / "out"), "--set", "sr.scheduler=DDPMScheduler"])
    settings = stage_settings(stage_info(tmp_path / "out"))
    assert (settings.scheduler, settings.steps) == ("DDPMScheduler", 2)  # cdm reads this file
    pipe, loaded = load_sr_stage(str(tmp_path / "out"), None)
    assert loaded.scheduler == "DDPMScheduler" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert stage_info(tmp_path / "out")["unet"] == {}  # the rest of the record is kept
    assert stage_settings(stage_info(stage)).scheduler == "DDIMScheduler"  # the source is untouched


def test_single_stage_card_and_no_unmeasured_numbers(tmp_path):
    stage = tmp_path / "sr"
    save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), stage)
    export_main([str(stage), "--out", str(tmp_path / "card")])
    assert (tmp_path / "card" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta, card = _meta(tmp_path / "card" / "README.md")
    assert meta["pipeline_tag"] == "image-to-image" and "model-index" not in meta
    assert "No evaluation has been run" in card.text and "PSNR" not in card.text


@pytest.mark.parametrize(
    "setup, needle",
    [
        ("incomplete", "incomplete run: it has no export/"),
        ("mismatch", "stage chain mismatch"),
        ("exists", "already exists: pass --overwrite"),
    ],
)
def test_export_bad_input_exits_2(tmp_path, setup, needle):
    src = make_cascade(tmp_path / "src", sizes=(8, 32))
    args = [str(src / "base64"), str(src / "sr64to256")]
    out = tmp_path / "out"
    if setup == "incomplete":
        run = tmp_path / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.json").write_text("{}")
        args = [str(run)]
    elif setup == "mismatch":
        save_stage(build_pipeline(sr_stage(16, 64, name="sr2"), TINY, 0), tmp_path / "sr2")
        args = [str(src / "base64"), str(tmp_path / "sr2")]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    res = run_cli(["cdm-export", *args, "--out", str(out)], tmp_path)
    assert res.returncode == 2 and needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    if setup == "exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()


class FakeHfApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/user/tiny-cascade/commit/abc"


def test_push_uploads_only_safe_files(tmp_path):
    import fnmatch

    src = make_cascade(tmp_path / "src", sizes=(8, 32))
    export_main([str(src / "base64"), str(src / "sr64to256"), "--out", str(tmp_path / "c")])
    folder = tmp_path / "c"
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "optimizer.bin").write_bytes(b"pickle")
    (folder / "stray.pkl").write_bytes(b"pickle")
    api = FakeHfApi()
    push_to_hub(folder, "user/tiny-cascade", private=True, api=api)
    (name, create), (_, upload) = api.calls
    assert name == "create_repo" and create["repo_id"] == "user/tiny-cascade" and create["private"] is True
    assert upload["repo_id"] == "user/tiny-cascade" and upload["folder_path"] == str(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]

    def uploaded(f):
        allowed = any(fnmatch.fnmatch(f, pat) for pat in upload["allow_patterns"])
        return allowed and not any(fnmatch.fnmatch(f, pat) for pat in upload["ignore_patterns"])

    sent = sorted(f for f in files if uploaded(f))
    assert "cascade.json" in sent and "README.md" in sent
    assert "base64/unet/diffusion_pytorch_model.safetensors" in sent
    assert not [f for f in sent if f.endswith((".pkl", ".bin", ".pt")) or f.startswith("checkpoints/")]


def test_export_cli_pushes_with_the_hub_client(tmp_path, monkeypatch):
    import huggingface_hub

    api = FakeHfApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    src = make_cascade(tmp_path / "src", sizes=(8, 32))
    export_main(
        [
            str(src / "base64"),
            str(src / "sr64to256"),
            "--out",
            str(tmp_path / "c"),
            "--push-to-hub",
            "user/tiny",
        ]
    )
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    meta, _ = _meta(tmp_path / "c" / "README.md")
    assert meta["library_name"] == "diffusers"


def test_class_agreement_is_the_share_of_samples_the_judge_puts_in_the_requested_class(monkeypatch):
    import cdm.measure.generation as ev

    class Judge(torch.nn.Module):  # calls class 1 whatever has a bright left half, else class 0
        def forward(self, x):
            left = (
                x[..., : x.shape[-1] // 2].mean((1, 2, 3)) > x[..., x.shape[-1] // 2 :].mean((1, 2, 3))
            ).long()
            return torch.nn.functional.one_hot(left, 2).float()

    monkeypatch.setattr(ev, "get_classifier", lambda data, resolution: (Judge(), {"num_classes": 2}))
    images = torch.zeros(6, 3, 16, 16)
    images[:4, :, :, :8] = 1  # four samples look like class 1, two like class 0
    images[4:, :, :, 8:] = 1
    agreement, _ = ev.class_agreement(images, [1, 1, 1, 0, 0, 0], None, 16)
    assert agreement == pytest.approx(5 / 6)  # only sample 3 (asked for 0, looks like 1) disagrees


BATCH_FID = ("--batch", "2", "--fid")  # three batches, with Inception features

STOP_AFTER = """
import os, cdm.cascade
_call, _count = cdm.cascade.Cascade.__call__, [0]
def call(self, *args, **kwargs):  # log every sampled batch; stop the run after {stop} of them
    _count[0] += 1
    with open({log!r}, "a") as f:
        f.write(str(args[1][0]) + "\\n")  # the batch's first seed
    if _count[0] > {stop}:
        raise KeyboardInterrupt
    return _call(self, *args, **kwargs)
cdm.cascade.Cascade.__call__ = call
"""


@pytest.mark.slow
def test_a_stopped_eval_resumes_without_redoing_finished_batches(tmp_path, cache_env):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    data = _split_imagefolder(tmp_path / "imgs", size=16)
    site, log = tmp_path / "site", tmp_path / "batches.log"
    site.mkdir()

    def run(out, stop):
        (site / "sitecustomize.py").write_text(STOP_AFTER.format(stop=stop, log=str(log)))
        return run_cli(
            _eval_gen_args(root, data, out, *BATCH_FID), tmp_path, {**cache_env, "PYTHONPATH": str(site)}
        )

    stopped = run(tmp_path / "g", stop=2)  # 3 batches of 2: stopped while sampling the third
    assert stopped.returncode == 130 and not (tmp_path / "g" / "results.json").exists()
    assert len(list((tmp_path / "g" / ".partial").glob("batch-*.npz"))) == 2
    log.write_text("")
    resumed = run(tmp_path / "g", stop=99)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert log.read_text().split() == ["4"]  # only the unfinished batch (seeds 4, 5) was sampled
    assert not (tmp_path / "g" / ".partial").exists()
    fresh = run(tmp_path / "fresh", stop=99)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("g", "fresh"))
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.slow
def test_two_process_eval_gives_the_one_process_fid(tmp_path, cache_env):
    import sys

    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    data = _split_imagefolder(tmp_path / "imgs", size=16)
    env = {**cache_env, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "MASTER_PORT": "29537"}
    args = _eval_gen_args(root, data, tmp_path / "one", *BATCH_FID)[1:]
    one = run_cli([sys.executable, "-m", "cdm.cli.eval", *args], tmp_path, env)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = two_process_launch("cdm.cli.eval")
    two = run_cli(
        [*launch, *_eval_gen_args(root, data, tmp_path / "two", *BATCH_FID)[1:]], tmp_path, env, timeout=300
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("one", "two"))
    assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-4)


def test_a_card_names_the_repo_it_is_pushed_to_and_installs_this_distribution(tmp_path, monkeypatch):
    import re

    import huggingface_hub
    import tomllib

    api = FakeHfApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    src = make_cascade(tmp_path / "src", sizes=(8, 32))
    folder = tmp_path / "photo_sr4x"
    export_main([str(src / "base64"), str(src / "sr64to256"), "--out", str(folder)])
    assert '"photo_sr4x"' in (folder / "README.md").read_text()
    export_main([str(folder), "--push-to-hub", "alice/photo-sr"])
    card = (folder / "README.md").read_text()
    assert "photo_sr4x" not in card.replace("# photo_sr4x", "")  # the title keeps the folder's name
    assert card.count('"alice/photo-sr"') >= 3 and "--model alice/photo-sr " in card
    name = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["name"]
    assert set(re.findall(r"pip install (\S+)", card)) == {name}
    written = tmp_path / "named"
    export_main([str(src / "base64"), "--out", str(written), "--repo-id", "bob/digits-base"])
    assert '"bob/digits-base"' in (written / "README.md").read_text()
