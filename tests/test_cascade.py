"""The cascade orchestrator, cdm-generate and cdm-upscale on tiny random stages."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY, build_pipeline, make_cascade, run_cli, sr_stage, two_process_launch

from cdm.cascade import Cascade, imagenet_labels
from cdm.errors import UserError
from cdm.stage_io import save_stage
from cdm.upscaling import upscale


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    return make_cascade(tmp_path_factory.mktemp("cascade") / "tiny")


@pytest.mark.parametrize("mode", ["non-truncated", "truncated"])
def test_three_stage_cascade_sizes_and_batch_equals_single_runs(tmp_path, mode):
    root = make_cascade(tmp_path / "c", modes=(mode, mode), levels=(300, 300), sr_classes=(True, False))
    cascade = Cascade.from_pretrained(root)
    out = cascade([0, "two", 1], seeds=[5, 6, 7], progress=False)
    assert [tuple(x.shape) for x in out.images] == [(3, 3, 8, 8), (3, 3, 32, 32), (3, 3, 128, 128)]
    assert out.class_ids == [0, 2, 1]
    assert all(x.std() > 0.01 for x in out.images[-1])  # each final image carries content, not a constant
    for i, (label, seed) in enumerate(zip([0, 2, 1], [5, 6, 7])):
        single = cascade([label], seeds=[seed], progress=False)
        torch.testing.assert_close(single.images[-1][0], out.images[-1][i], atol=1e-4, rtol=0)


def test_truncated_with_level_zero_equals_non_truncated_level_zero(tmp_path):
    a = Cascade.from_pretrained(make_cascade(tmp_path / "a", modes=("truncated",) * 2, levels=(0, 0)))
    b = Cascade.from_pretrained(make_cascade(tmp_path / "b", modes=("non-truncated",) * 2, levels=(0, 0)))
    ya = a([1, 2], seeds=[3, 4], progress=False).images[-1]
    yb = b([1, 2], seeds=[3, 4], progress=False).images[-1]
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=0)


def test_truncated_hand_over_stops_the_previous_stage_early(tmp_path):
    root = make_cascade(tmp_path / "c", modes=("truncated", "non-truncated"), levels=(500, 100))
    cascade = Cascade.from_pretrained(root)
    settings = cascade.with_overrides(steps=[10, 2, 2])
    calls = []
    cascade.base.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    cascade([0], seeds=[0], settings=settings, progress=False)
    assert 0 < len(calls) < 10  # stopped at alphabar(500), before the end of its 10 steps
    full = cascade.with_overrides(steps=[10, 2, 2], aug_mode=["non-truncated"])
    calls.clear()
    cascade([0], seeds=[0], settings=full, progress=False)
    assert len(calls) == 10


def test_truncation_needs_a_stage_trained_with_its_noise_at_low_res(tmp_path):
    """A handover's noise lives at the low resolution; a stage trained on noise added after upsampling
    never saw such input, so the cascade refuses to hand it one (and still samples it non-truncated)."""
    cascade = Cascade.from_pretrained(make_cascade(tmp_path / "c", sizes=(8, 32), noise_at_low_res=False))
    assert not cascade.pipes[1].config.noise_at_low_res
    with pytest.raises(
        UserError, match="stage sr64to256: a truncated handover is noisy at the low resolution"
    ):
        cascade.with_overrides(aug_mode=["non-truncated", "truncated"], noise_level=[0, 100])
    with pytest.raises(ValueError, match="or a stage trained with noise_at_low_res=True"):
        cascade.pipes[1](torch.zeros(1, 3, 8, 8), num_inference_steps=1, low_res_is_augmented=True)
    assert cascade([0], seeds=[0], progress=False).images[-1].shape == (1, 3, 32, 32)
    loaded = Cascade.from_pretrained(make_cascade(tmp_path / "d", sizes=(8, 32)))
    assert loaded.pipes[1].config.noise_at_low_res  # saved and loaded with the stage
    loaded.with_overrides(aug_mode=["non-truncated", "truncated"], noise_level=[0, 100])


def test_mismatched_chain_fails_before_any_compute(tmp_path):
    root = make_cascade(tmp_path / "c")
    shutil.rmtree(root / "sr256to1024")
    save_stage(build_pipeline(sr_stage(16, 64, name="sr256to1024"), TINY, 0), root / "sr256to1024")
    with pytest.raises(UserError, match=r"'sr64to256' outputs 32x32 but 'sr256to1024' expects 16x16"):
        Cascade.from_pretrained(root)


def test_imagenet_label_names_resolve(tmp_path):
    labels = imagenet_labels()
    assert labels["207"] == "golden retriever" and len(labels) == 1000
    root = make_cascade(tmp_path / "c", sizes=(8,), num_classes=1000, labels={}, label_set="imagenet")
    cascade = Cascade.from_pretrained(root)
    assert cascade.class_ids(["golden retriever", "Tench", 3]) == [207, 0, 3]


# -- cdm-generate --------------------------------------------------------------------------------


def test_generate_writes_every_stage_and_a_grid(cascade_dir, tmp_path):
    out = tmp_path / "out"
    res = run_cli(
        [
            "cdm-generate",
            "--class",
            "1",
            "--class",
            "deuce",
            "--model",
            str(cascade_dir),
            "--num-images",
            "2",
            "--seed",
            "10",
            "--out",
            str(out),
            "--save-intermediates",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert "grid.png" in files
    assert len([f for f in files if f.endswith("128px.png")]) == 4
    assert len([f for f in files if f.endswith("32px.png")]) == 4
    assert "000-one-seed10-8px.png" in files and "003-two-seed13-128px.png" in files
    assert PIL.Image.open(out / "003-two-seed13-128px.png").size == (128, 128)
    assert "sr256to1024" in res.stdout and "s per image" in res.stdout


def test_generate_image_equals_same_seed_alone(cascade_dir, tmp_path):
    args = ["cdm-generate", "--class", "2", "--model", str(cascade_dir), "--quiet"]
    assert (
        run_cli(
            [*args, "--num-images", "3", "--seed", "4", "--out", str(tmp_path / "a")], tmp_path
        ).returncode
        == 0
    )
    assert run_cli([*args, "--seed", "6", "--out", str(tmp_path / "b")], tmp_path).returncode == 0
    a = np.asarray(PIL.Image.open(tmp_path / "a" / "002-two-seed6-128px.png"), dtype=float)
    b = np.asarray(PIL.Image.open(tmp_path / "b" / "000-two-seed6-128px.png"), dtype=float)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--class", "7"], "class id 7 is out of range: expected 0..2"),
        (["--class", "golden retriever"], "unknown class label 'golden retriever'"),
        (["--class", "1", "--model", "/no/such/cascade"], "/no/such/cascade: no such folder"),
        (
            ["--class", "1", "--steps", "0"],
            "stage base64: num_inference_steps=0: expected an integer in 1..10000",
        ),
        (["--class", "1", "--steps", "2,2"], "steps: got 2 values for 3 stages"),
        (["--class", "1", "--scheduler", "NopeScheduler"], "'NopeScheduler' is not a diffusers scheduler"),
        (["--class", "1", "--aug-mode", "sideways"], "aug_mode='sideways'"),
    ],
)
def test_generate_bad_input_exits_2_with_one_line_and_writes_nothing(cascade_dir, tmp_path, args, needle):
    model = [] if "--model" in args else ["--model", str(cascade_dir)]
    res = run_cli(["cdm-generate", *args, *model, "--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_generate_mismatched_chain_exits_2(cascade_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(cascade_dir, bad)
    spec = json.loads((bad / "cascade.json").read_text())
    spec["stages"] = [spec["stages"][0], spec["stages"][2]]  # 8 px base straight into the 32 -> 128 stage
    (bad / "cascade.json").write_text(json.dumps(spec))
    res = run_cli(
        ["cdm-generate", "--class", "1", "--model", str(bad), "--out", str(tmp_path / "out")], tmp_path
    )
    assert res.returncode == 2 and "stage chain mismatch" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_generate_never_overwrites_without_flag(cascade_dir, tmp_path):
    out = tmp_path / "out"
    args = ["cdm-generate", "--class", "1", "--model", str(cascade_dir), "--out", str(out), "--quiet"]
    assert run_cli(args, tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_cli([*args, "--seed", "0"], tmp_path)
    assert again.returncode == 2 and "already exists: pass --overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run_cli([*args, "--overwrite"], tmp_path).returncode == 0


# -- cdm-upscale ---------------------------------------------------------------------------------


def test_upscale_odd_sized_rgba_gives_exactly_4x(cascade_dir, tmp_path):
    rgba = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (29, 37, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "odd.png")
    PIL.Image.new("L", (20, 20), 128).save(tmp_path / "grey.png")
    res = run_cli(
        [
            "cdm-upscale",
            str(tmp_path / "odd.png"),
            str(tmp_path / "grey.png"),
            "--model",
            str(cascade_dir / "sr64to256"),
            "--out",
            str(tmp_path / "up"),
            "--steps",
            "2",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert PIL.Image.open(tmp_path / "up" / "odd-x4.png").size == (148, 116)
    assert PIL.Image.open(tmp_path / "up" / "grey-x4.png").size == (80, 80)


def test_upscale_rejects_a_corrupt_image_without_writing(cascade_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    res = run_cli(
        [
            "cdm-upscale",
            str(tmp_path / "bad.png"),
            "--model",
            str(cascade_dir),
            "--out",
            str(tmp_path / "up"),
        ],
        tmp_path,
    )
    assert res.returncode == 2 and "not a readable image" in res.stderr
    assert not (tmp_path / "up").exists()


def test_tiled_upscale_matches_untiled_without_seams():
    torch.manual_seed(0)
    pipe = build_pipeline(sr_stage(8, 32), TINY, 0)
    pipe.set_progress_bar_config(disable=True)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 5), size=(24, 30), mode="bicubic")
    image = PIL.Image.fromarray((smooth[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy())

    def run(tile, overlap, seed=1):
        return np.asarray(upscale(pipe, image, tile, overlap, steps=2, noise_level=0, seed=seed), dtype=float)

    whole, other_seed, tiled = run(64, 0), run(64, 0, seed=2), run(16, 8)  # tiled: 2 x 2 tiles of 64 px
    assert whole.shape == tiled.shape == (96, 120, 3)
    # tiles share one sample and one noise field; only the context at tile borders differs, so the
    # tiled result stays far closer to the untiled one than another seed is
    assert np.abs(whole - tiled).mean() < 0.05 * np.abs(whole - other_seed).mean()
    # no seam: the jump across the tile borders is no larger than the image's own pixel-to-pixel jumps
    col_jump = np.abs(np.diff(tiled, axis=1)).mean(axis=(0, 2))
    row_jump = np.abs(np.diff(tiled, axis=0)).mean(axis=(1, 2))
    typical = np.abs(np.diff(whole, axis=1)).mean()
    assert col_jump[[31, 55, 63, 87]].max() < 1.5 * typical
    assert row_jump[[31, 63]].max() < 1.5 * typical


def test_demo_cascade_loads_and_its_pipeline_copies_match_the_package():
    from pathlib import Path

    from cdm.cascade import DEMO_CASCADE

    cascade = Cascade.from_pretrained(DEMO_CASCADE)
    assert cascade.resolutions == [64, 256, 1024] and cascade.num_classes == 10
    assert cascade.class_ids(["seven"]) == [7]
    size = sum(f.stat().st_size for f in DEMO_CASCADE.rglob("*.safetensors"))
    assert size <= 30 * 2**20
    # the copies beside the weights (for plain-diffusers users) must be the installed pipeline files
    package = Path(__file__).resolve().parents[1] / "pipelines"
    copies = sorted(DEMO_CASCADE.glob("*/pipeline_*.py"))
    assert len(copies) == 3
    for copy in copies:
        assert copy.read_text() == (package / copy.name).read_text(), copy

    # the root pipeline: the installed file with this cascade's stage names, naming each stage folder
    def body(path):
        return [line for line in path.read_text().splitlines() if not line.startswith("STAGES = ")]

    root_file = DEMO_CASCADE / "pipeline_cdm_cascade.py"
    assert body(root_file) == body(package / root_file.name)
    assert "STAGES = ('base64', 'sr64to256', 'sr256to1024')" in root_file.read_text()
    index = json.loads((DEMO_CASCADE / "model_index.json").read_text())
    assert index["base64"] == ["pipeline_cdm_base", "CDMBasePipeline"]
    assert index["settings"]["base64"]["guidance_scale"] == cascade.settings[0].guidance_scale


@pytest.mark.slow
def test_two_process_generation_writes_the_same_files_as_one_process(tmp_path):
    import subprocess
    import sys

    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    common = [
        "--model",
        str(root),
        "--class",
        "0",
        "--class",
        "2",
        "--num-images",
        "3",
        "--quiet",
        "--save-intermediates",
    ]
    env = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "MASTER_PORT": "29536"}
    one = run_cli(
        [sys.executable, "-m", "cdm.cli.generate", *common, "--out", str(tmp_path / "one")], tmp_path, env
    )
    assert one.returncode == 0, one.stderr[-2000:]
    try:
        two = run_cli(
            [
                *two_process_launch("cdm.cli.generate"),
                *common,
                "--out",
                str(tmp_path / "two"),
            ],
            tmp_path,
            env,
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the two-process generation did not finish in 240 s")
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.png")) and len(files) == 13
    assert (tmp_path / "two" / ".cdm-outputs.json").is_file()  # the main process records every rank's files
    # The same seeds give the same images. A rank samples other batches than one process does, and
    # batch composition moves float results by about 1e-6: now and then a pixel that lies on a
    # rounding boundary lands one 8-bit level away. Another seed or class would differ everywhere.
    for name in files:
        a = np.asarray(PIL.Image.open(tmp_path / "one" / name), dtype=int)
        b = np.asarray(PIL.Image.open(tmp_path / "two" / name), dtype=int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, name
    assert two.stdout.count("wrote 12 PNGs") == 1  # the main process alone reports


@pytest.mark.parametrize("mode", ["non-truncated", "truncated"])
def test_a_device_map_runs_the_stages_as_a_pipeline_with_the_same_images(tmp_path, mode):
    root = make_cascade(tmp_path / "c", sizes=(8, 32, 128), modes=(mode, mode), levels=(100, 100))
    common = ["--model", str(root), "--class", "0", "--class", "2", "--num-images", "3", "--quiet"]
    common += ["--save-intermediates", "--steps", "2"]
    plain = run_cli(["cdm-generate", *common, "--out", str(tmp_path / "plain")], tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    mapped = run_cli(
        ["cdm-generate", *common, "--device-map", "cpu,cpu,cpu", "--out", str(tmp_path / "mapped")], tmp_path
    )
    assert mapped.returncode == 0, mapped.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "plain").iterdir() if p.name != ".cdm-outputs.json")
    mapped_files = sorted(p.name for p in (tmp_path / "mapped").iterdir() if p.name != ".cdm-outputs.json")
    assert files == mapped_files and len(files) == 19
    for name in files:
        a = np.asarray(PIL.Image.open(tmp_path / "plain" / name), dtype=int)
        b = np.asarray(PIL.Image.open(tmp_path / "mapped" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name


def test_pipelined_stages_see_every_chunk_and_match_the_sequential_cascade(tmp_path):
    cascade = Cascade.from_pretrained(make_cascade(tmp_path / "c", sizes=(8, 32, 128)))
    seen = []
    cascade.pipelined(
        [0, 1, 2, 0], [5, 6, 7, 8], chunk=1, on_chunk_end=lambda k, lo, hi, x: seen.append((k, lo))
    )
    assert sorted(seen) == [(k, lo) for k in range(3) for lo in range(4)]
    assert [lo for k, lo in seen if k == 2] == [0, 1, 2, 3]  # each stage keeps the order of the chunks
    got = {}
    cascade.pipelined([0, 1], [5, 6], chunk=1, on_chunk_end=lambda k, lo, hi, x: got.setdefault((k, lo), x))
    ref = cascade([0, 1], seeds=[5, 6], progress=False)
    for k in range(3):
        torch.testing.assert_close(torch.cat([got[(k, 0)], got[(k, 1)]]), ref.images[k], atol=1e-5, rtol=0)


def test_a_call_with_other_settings_never_changes_the_loaded_stages(tmp_path):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    cascade = Cascade.from_pretrained(root)
    schedulers = [p.scheduler for p in cascade.pipes]
    euler = cascade[:1].with_overrides(scheduler=["EulerDiscreteScheduler"])
    cascade[:1]([0], [0], euler, progress=False)  # a slice shares the parent's pipelines
    assert [p.scheduler for p in cascade.pipes] == schedulers
    assert type(cascade.pipes[0].scheduler).__name__ == "DDIMScheduler"
    twin = Cascade.from_pretrained(root)  # a second cascade over the same stage folders
    one_step = twin([0], [1], twin.with_overrides(steps=[1]), progress=False).images[-1]
    shipped = cascade([0], [1], progress=False).images[-1]
    assert not torch.equal(one_step, shipped)
    assert torch.equal(twin([0], [1], twin.with_overrides(steps=[1]), progress=False).images[-1], one_step)
    assert torch.equal(cascade([0], [1], progress=False).images[-1], shipped)
