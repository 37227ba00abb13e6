"""Training: the real cdm-train command on tiny settings, resume, data parallel, bad overrides."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cdm_pipelines.pipeline_sr3
import numpy as np
import pytest
import torch
from conftest import TINY, make_imagefolder, run_cli, sr_stage, two_process_launch
from safetensors.torch import load_file

from cdm.config import TrainConfig
from cdm.hub.cards import stage_rows
from cdm.stage_io import load_stage
from cdm.train.loop import make_lr_scheduler, stage_model_fn

TINY_STAGE = {
    "base64": ["stage.resolution=16"],
    "sr64to256": ["stage.resolution=32", "stage.low_res=8", "stage.crop_size=16"],
    "sr256to1024": ["stage.resolution=64", "stage.low_res=16", "stage.crop_size=32"],
}
FAST = [
    "unet=tiny",
    "train.batch_size=2",
    "train.num_samples=2",
    "stage.sample.steps=2",
    "train.tracker=none",
    "train.warmup_steps=1",
]


def train_args(stage, out, steps, *extra):
    return [
        "cdm-train",
        f"stage={stage}",
        *TINY_STAGE[stage],
        *FAST,
        f"train.max_steps={steps}",
        f"train.output_dir={out}",
        *extra,
    ]


@pytest.mark.parametrize("at_low_res", [False, True], ids=["noise-upsampled", "noise-at-low-res"])
def test_training_conditions_on_what_the_pipeline_augmentation_gives(at_low_res):
    """The SR UNet's training input is the pipeline's augment_low_res of the downsampled image, at the
    level and with the noise that training drew: train and sample see the same kind of input."""
    from omegaconf import OmegaConf

    from cdm.config import TrainRunConfig
    from cdm.models import build_noise_scheduler, build_unet
    from cdm.train.degradations import downsample, sample_levels

    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig),
        {"stage": OmegaConf.structured(sr_stage(4, 16)), "unet": OmegaConf.structured(TINY)},
    )
    cfg.stage.noise_level_max = 500
    cfg.stage.noise_at_low_res = at_low_res
    images = torch.rand(2, 3, 16, 16)  # a batch in [0, 1]; the model works in [-1, 1]
    x0 = images * 2 - 1
    noising = build_noise_scheduler(cfg.stage)
    unet = build_unet(cfg.stage, cfg.unet, 0)
    seen = {}

    def spy(x_in, t, **kw):
        seen["cond"] = x_in[:, 3:]
        return unet(x_in, t, **kw)

    batch = {"images": images, "labels": torch.zeros(2, dtype=torch.long)}
    _, model_fn = stage_model_fn(spy, cfg, batch, noising, 1, torch.Generator().manual_seed(3))
    model_fn(torch.zeros_like(x0), torch.tensor([10, 10]))
    replay = torch.Generator().manual_seed(3)  # blur_prob is 0: the levels are the first draw
    s = sample_levels(2, 500, replay)
    expected = cdm_pipelines.pipeline_sr3.augment_low_res(
        downsample(x0, 4), (16, 16), s, noising, replay, at_low_res
    )
    assert s.max() > 0  # the check covers a noised input, not only the clean upsample
    torch.testing.assert_close(seen["cond"], expected)


@pytest.mark.parametrize("stage", ["base64", "sr64to256", "sr256to1024"])
def test_each_stage_trains_and_exports_a_loadable_pipeline(stage, tmp_path, cache_env):
    data = ["data=photos"] if stage == "sr256to1024" else []
    res = run_cli(train_args(stage, tmp_path / "run", 3, "train.sample_every=3", *data), tmp_path, cache_env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "samples" / "step-0000003.png").is_file()
    info = json.loads((run / "run_info.json").read_text())
    assert info["steps"] == 3 and np.isfinite(info["final_loss"])
    pipe = load_stage(run / "export")
    gen = [torch.Generator().manual_seed(0)]
    if stage == "base64":
        out = pipe([3], num_inference_steps=2, generator=gen, output_type="np").images
        assert out.shape == (1, 16, 16, 3)
        assert pipe.labels[7] == "7, seven"
    else:
        lr = pipe.config.low_res_size
        out = pipe(
            torch.zeros(1, 3, lr, lr), noise_level=10, num_inference_steps=2, generator=gen, output_type="np"
        )
        assert out.images.shape == (1, 4 * lr, 4 * lr, 3)
    assert np.isfinite(out if isinstance(out, np.ndarray) else out.images).all()


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["map-style", "streamed"])
def test_resume_equals_an_uninterrupted_run(tmp_path, cache_env, streamed):
    common = ["train.checkpoint_every=3", "train.sample_every=100"]
    if streamed:  # a streamed dataset resumes by skipping the records already read
        root = make_imagefolder(tmp_path / "imgs", classes=2, per_class=5, size=40)
        common += ["data=imagefolder", f"data.path={root}", "data.streaming=true"]
    straight = run_cli(train_args("sr64to256", tmp_path / "a", 6, *common), tmp_path, cache_env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(
        train_args("sr64to256", tmp_path / "b", 6, *common, "train.stop_after=3"), tmp_path, cache_env
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "b" / "export").exists()
    # a crash in the middle of the next checkpoint write leaves a temporary folder behind
    partial = tmp_path / "b" / "checkpoints" / ".tmp-checkpoint-0000006"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    second = run_cli(
        train_args("sr64to256", tmp_path / "b", 6, *common, "train.resume=latest"), tmp_path, cache_env
    )
    assert second.returncode == 0, second.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "checkpoint-0000006" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "checkpoint-0000006" / name)
        assert a.keys() == b.keys()
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        assert worst <= 1e-6, (name, worst)


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(tmp_path, cache_env):
    args = train_args("base64", tmp_path / "run", 2)
    assert run_cli(args, tmp_path, cache_env).returncode == 0
    before = (tmp_path / "run" / "export" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = run_cli(args, tmp_path, cache_env)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "Traceback" not in again.stderr
    assert (
        tmp_path / "run" / "export" / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes() == before


def test_bad_images_are_converted_or_counted(tmp_path, cache_env):
    root = make_imagefolder(tmp_path / "imgs", classes=2, per_class=3, size=40)
    import PIL.Image as PIL

    PIL.new("RGBA", (40, 40), (255, 0, 0, 128)).save(root / "class0" / "rgba.png")
    PIL.new("L", (40, 40), 100).save(root / "class1" / "grey.png")
    PIL.new("RGB", (8, 8)).save(root / "class1" / "tiny.png")
    (root / "class0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = train_args(
        "sr64to256", tmp_path / "run", 8, "data=imagefolder", f"data.path={root}", "data.resize=none"
    )
    res = run_cli(args, tmp_path, cache_env)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["skipped_examples"]["small"] >= 1
    assert info["skipped_examples"]["corrupt"] >= 1
    assert "skipped" in res.stderr


@pytest.mark.parametrize(
    "override, needle",
    [
        (["stage=nope"], "stage=nope: no such stage; expected one of base64, sr256to1024, sr64to256"),
        (["train.batch_size=0"], "train.batch_size=0: expected an integer in 1..65536"),
        (["data=imagefolder"], "data.path"),
        (
            ["stage=sr64to256", "data=photos", "stage.crop_size=2048"],
            "stage.crop_size=2048 is larger than the images",
        ),
        (["train.mixed_precision=fp8"], "fp8"),
        (["train.batchsize=3"], "batchsize"),
        (["train.lr_schedule=step"], "step"),
        (
            ["stage=sr64to256", "train.init_from=/no/such/run"],
            "train.init_from=/no/such/run: model /no/such/run: no such folder",
        ),
        (["data=imagefolder", "data.path=/no/such/folder"], "data.path=/no/such/folder: no such folder"),
        (
            ["stage=sr64to256", "stage.sample.aug_mode=truncated"],
            "or a stage trained with noise_at_low_res=True",
        ),
    ],
)
def test_bad_overrides_exit_2_with_one_line(tmp_path, cache_env, override, needle):
    res = run_cli(["cdm-train", *override, f"train.output_dir={tmp_path / 'run'}"], tmp_path, cache_env)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("one_core", [False, True], ids=["free", "one-core"])
def test_two_process_data_parallel_run_keeps_ranks_identical(tmp_path, cache_env, one_core):
    """Two CPU ranks train in lock step and shut down cleanly, also when they share one core (which
    once exposed a shutdown deadlock between gloo's worker threads and the GIL)."""
    args = train_args("base64", tmp_path / "run", 4)[1:]
    cmd = [*two_process_launch("cdm.cli.train"), *args]
    if one_core:
        cpu = min(os.sched_getaffinity(0))
        pin = f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); os.execv(sys.argv[1], sys.argv[1:])"
        cmd = [sys.executable, "-c", pin, *cmd]
    env = {**cache_env, "ACCELERATE_USE_CPU": "1", "MASTER_PORT": "29534" if one_core else "29533"}
    try:
        res = run_cli(cmd, tmp_path, env, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the two-process run did not finish in 240 s; its last output: {str(err.stdout)[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert info["images_per_step"] == 4
    a, b = info["rank_weight_checksums"]
    assert a == b


def test_a_second_writer_on_one_run_folder_is_refused_with_the_holders_pid(tmp_path, cache_env):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **cache_env}
    exe = str(Path(sys.executable).parent / "cdm-train")
    first = subprocess.Popen(
        [exe, *train_args("base64", out, 100000)[1:]],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # wait until the first run holds the lock and has written its config
            if (out / "config.yaml").is_file() or first.poll() is not None:
                break
            import time

            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-2000:]
        second = run_cli(train_args("base64", out, 3, "train.seed=1"), tmp_path, cache_env)
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(tmp_path, cache_env):
    out = tmp_path / "run"
    assert run_cli(train_args("base64", out, 2), tmp_path, cache_env).returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    res = run_cli(train_args("base64", out, 2, "train.resume=latest"), tmp_path, cache_env)
    assert res.returncode == 0 and "finished" in res.stdout
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {p: after.get(p) for p in files} == files  # nothing that was there changed
    added = {p.relative_to(out).parts[0] for p in set(after) - set(files)}
    assert added == {".hydra"}  # only Hydra's record of this launch, in a folder of its own


@pytest.mark.parametrize("explicit", [False, True], ids=["launcher", "override-wins"])
def test_accelerate_launch_settings_apply_unless_overridden_on_the_command_line(tmp_path, explicit):
    import yaml

    env = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
    extra = ["train.mixed_precision=no"] if explicit else []
    res = run_cli(["cdm-train", "--cfg", "stage=base64", *extra], tmp_path, env)
    assert res.returncode == 0, res.stderr[-2000:]
    train = yaml.safe_load(res.stdout)["train"]
    assert train["grad_accum"] == 4
    assert train["mixed_precision"] == ("no" if explicit else "bf16")


def test_deepspeed_and_fsdp_launches_are_refused_in_one_line(tmp_path):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        res = run_cli(["cdm-train", "stage=base64"], tmp_path, {var: "true"})
        assert res.returncode == 2 and "not supported" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_process_run_takes_precision_and_accumulation_from_accelerate(tmp_path, cache_env):
    """A 2-process CPU launch from an accelerate config file (bf16) with accumulation 2 from the launcher."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
        "num_machines: 1\nmachine_rank: 0\nmixed_precision: bf16\nuse_cpu: true\n"
    )
    args = train_args("base64", tmp_path / "run", 2)[1:]
    env = {
        **cache_env,
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
        "MASTER_PORT": "29535",
        "ACCELERATE_USE_CPU": "1",
    }
    res = run_cli(
        [launcher, "launch", "--config_file", str(config), "-m", "cdm.cli.train", *args],
        tmp_path,
        env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (resolved["mixed_precision"], resolved["grad_accum"]) == ("bf16", 2)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["images_per_step"] == 2 * 2 * 2


@pytest.mark.slow
def test_resume_skips_a_truncated_latest_checkpoint_and_says_so(tmp_path, cache_env):
    out = tmp_path / "run"
    args = train_args("base64", out, 5, "train.checkpoint_every=2", "train.keep_checkpoints=3")
    assert run_cli([*args, "train.stop_after=4"], tmp_path, cache_env).returncode == 0
    latest = out / "checkpoints" / "checkpoint-0000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    (out / "checkpoints" / "checkpoint-0000004.bak").mkdir()  # not a checkpoint name: ignored
    res = run_cli([*args, "train.resume=latest"], tmp_path, cache_env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "checkpoint-0000004/model.safetensors" in res.stderr and "trying the one before" in res.stderr
    assert json.loads((out / "run_info.json").read_text())["steps"] == 5


def test_resume_with_another_model_config_is_one_line(tmp_path, cache_env):
    out = tmp_path / "run"
    assert run_cli(train_args("base64", out, 4, "train.stop_after=2"), tmp_path, cache_env).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = run_cli(train_args("base64", out, 4, "train.resume=latest", *OTHER_UNET), tmp_path, cache_env)
    assert_one_line(res, "the run was started with other settings (unet.block_out_channels=")
    for change, shown in (("train.seed=7", "train.seed=0 -> 7"), ("train.batch_size=3", "train.batch_size=")):
        res = run_cli(train_args("base64", out, 4, "train.resume=latest", change), tmp_path, cache_env)
        assert_one_line(res, shown)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the run's config stays


OTHER_UNET = ["unet.block_out_channels=[8,16]", "unet.norm_num_groups=8"]


def assert_one_line(res, needle: str) -> None:
    assert res.returncode == 2 and needle in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


@pytest.mark.parametrize("key", ["+train.max_stepz=5", "+foo=1"])
def test_unknown_keys_are_refused_even_with_plus(tmp_path, key):
    res = run_cli(["cdm-train", "stage=base64", key], tmp_path)
    assert res.returncode == 2 and key.lstrip("+").split("=")[0] in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# -- cdm-train as a Hydra app ----------------------------------------------------------------------


@pytest.mark.slow
def test_hydra_cfg_info_and_resolve(tmp_path):
    job = run_cli(["cdm-train", "--cfg", "job", "stage=sr64to256"], tmp_path)
    assert job.returncode == 0 and "name: sr64to256" in job.stdout and "hydra:" not in job.stdout
    hydra = run_cli(["cdm-train", "--cfg", "hydra", "stage=sr64to256"], tmp_path)
    assert hydra.returncode == 0 and "dir: ${train.output_dir}" in hydra.stdout
    resolved = run_cli(["cdm-train", "--cfg", "job", "--resolve", "stage=sr64to256"], tmp_path)
    assert resolved.returncode == 0 and "output_dir: runs/sr64to256" in resolved.stdout
    info = run_cli(["cdm-train", "--info"], tmp_path)
    assert info.returncode == 0 and "Hydra" in info.stdout
    completion = run_cli(["cdm-train", "--shell-completion", "install=bash"], tmp_path)
    assert completion.returncode == 0 and "complete" in completion.stdout


def test_hydra_run_dir_is_the_run_folder_with_its_hydra_records(tmp_path, cache_env):
    out = tmp_path / "elsewhere"
    args = train_args("base64", tmp_path / "ignored", 1, f"hydra.run.dir={out}", "hydra/job_logging=disabled")
    res = run_cli([a for a in args if not a.startswith("train.output_dir")], tmp_path, cache_env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "export" / "model_index.json").is_file() and list(out.glob(".hydra/*/overrides.yaml"))
    assert not (out / "train.log").exists()  # job logging disabled
    # recorded relative to the working directory (tmp_path), so no card names this machine's paths
    assert json.loads((out / "config.json").read_text())["train"]["output_dir"] == "elsewhere"
    assert json.loads((out / "export" / "cdm_stage.json").read_text())["train"]["output_dir"] == "elsewhere"


def test_a_run_folder_outside_the_working_directory_stays_absolute(tmp_path, monkeypatch):
    from cdm.cli.train import portable

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert portable(str(tmp_path / "work" / "runs" / "a")) == str(Path("runs") / "a")
    assert portable(str(tmp_path / "other")) == str(tmp_path / "other")


@pytest.mark.slow
def test_hydra_multirun_runs_each_job_in_its_own_folder(tmp_path, cache_env):
    sweep = tmp_path / "sweep"
    args = train_args(
        "base64", tmp_path / "unused", 1, "train.learning_rate=1e-4,3e-4", f"hydra.sweep.dir={sweep}"
    )
    res = run_cli(
        ["cdm-train", "-m", *[a for a in args[1:] if not a.startswith("train.output_dir")]],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rates = [
        json.loads((sweep / str(k) / "config.json").read_text())["train"]["learning_rate"] for k in (0, 1)
    ]
    assert rates == [1e-4, 3e-4]
    assert all((sweep / str(k) / "export" / "model_index.json").is_file() for k in (0, 1))


@pytest.mark.slow
def test_hydra_config_dir_adds_experiments_and_unknown_ones_are_refused(tmp_path):
    extra = tmp_path / "myconf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text("# @package _global_\ntrain:\n  max_steps: 7\n")
    res = run_cli(
        ["cdm-train", "--config-dir", str(tmp_path / "myconf"), "experiment=mine", "--cfg", "job"], tmp_path
    )
    assert res.returncode == 0 and "max_steps: 7" in res.stdout, res.stderr
    for argv in (["experiment=mine"], ["experiment=nope", "--config-dir", str(tmp_path / "myconf")]):
        res = run_cli(["cdm-train", *argv], tmp_path)
        assert res.returncode == 2 and "no such experiment" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_sr_training_samples_accept_inputs_whose_downsample_overshoots(tmp_path):
    """Bicubic downsampling of sharp edges overshoots [-1, 1]; the training sample grid must still render."""
    from types import SimpleNamespace

    from cdm.models import build_pipeline
    from cdm.train.degradations import downsample
    from cdm.train.loop import save_samples

    stage = sr_stage()  # 8 -> 32
    pipe = build_pipeline(stage, TINY, 0, None)
    edges = torch.ones(2, 3, 32, 32)
    edges[..., 10:12, :] = 0  # a thin dark line: the anti-aliased bicubic downsample rings past 1
    assert downsample(edges, 4).max() > 1
    cfg = SimpleNamespace(train=SimpleNamespace(num_samples=2), stage=stage)
    save_samples(
        cfg, pipe, {"images": edges, "labels": torch.zeros(2, dtype=torch.long)}, tmp_path / "s.png", 0
    )
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("schedule, last", [("constant", 1.0), ("cosine", 0.0), ("linear", 0.0)])
def test_lr_schedule_warms_up_then_holds_or_decays_to_zero(schedule, last):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(opt, TrainConfig(lr_schedule=schedule, warmup_steps=2, max_steps=10))
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == 0 and lrs[2] == 1.0 and lrs[-1] == pytest.approx(last, abs=1e-9)
    assert (lrs[6] == 1.0) if schedule == "constant" else (0.0 < lrs[6] < 1.0)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_source_weights_and_records_both_phases(tmp_path, cache_env):
    source, tuned, fresh = tmp_path / "source", tmp_path / "tuned", tmp_path / "fresh"
    assert run_cli(train_args("sr64to256", source, 3), tmp_path, cache_env).returncode == 0
    # a learning rate too small to move any weight: what the run exports is what it started from
    still = ["train.learning_rate=1e-20", "train.lr_schedule=cosine"]
    tune = train_args("sr64to256", tuned, 2, f"train.init_from={source}", *still)
    res = run_cli([*tune, "train.stop_after=1"], tmp_path, cache_env)
    assert res.returncode == 0, res.stderr[-3000:]
    # the second launch resumes from the checkpoint, which carries what the run started from
    res = run_cli([*tune, "train.resume=latest"], tmp_path, cache_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert run_cli(train_args("sr64to256", fresh, 2, *still), tmp_path, cache_env).returncode == 0
    want = load_stage(source / "export").unet.state_dict()
    for run, same in ((tuned, True), (fresh, False)):
        got = load_stage(run / "export").unet.state_dict()
        worst = max((want[k] - got[k]).abs().max().item() for k in want)
        assert (worst <= 1e-6) if same else (worst > 1e-4), (run.name, worst)
    info = json.loads((tuned / "export" / "cdm_stage.json").read_text())
    assert info["run"]["init_from"] == {
        "source": str(source),
        "steps": 3,
        "images_per_step": 2,
        "data": "digits",
    }
    assert "| 3 + 2 |" in stage_rows(["sr"], [load_stage(tuned / "export")], [info])
    # a source of another architecture is refused before any training
    other = train_args("sr64to256", tmp_path / "other", 2, f"train.init_from={source}", *OTHER_UNET)
    assert_one_line(run_cli(other, tmp_path, cache_env), "does not match this run's unet/stage settings")
