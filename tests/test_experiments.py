"""The experiment suite's bookkeeping: resumable points, the diversity measure, the report."""

import json

import numpy as np
import pytest

from cdm.cli import experiments as experiments_cli
from cdm.experiments import blur, common, guidance, levels, sampler, suite, trunc


def test_class_diversity_is_the_mean_within_class_pairwise_distance():
    pool = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 10.0], [10.0, 10.0], [10.0, 12.0]])
    ids = [0, 0, 1, 1, 1]
    # class 0: one pair at distance 5; class 1: pairs at 0, 2, 2 -> mean 4/3
    assert common.class_diversity(pool, ids) == pytest.approx((5 + 4 / 3) / 2)
    # identical samples within every class have no diversity, whatever the classes' spread
    assert common.class_diversity(np.array([[1.0], [1.0], [9.0], [9.0]]), [0, 0, 1, 1]) == 0


def test_a_stored_point_is_not_measured_again(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"kid": 0.5}

    path = tmp_path / "guidance" / "w1-seed0.json"
    first = common.stored(path, measure)
    again = common.stored(path, measure)
    assert calls == [1]
    assert first == again and first["kid"] == 0.5 and first["seconds"] >= 0
    assert json.loads(path.read_text()) == first
    assert not path.with_suffix(".tmp").exists()


def test_spread_is_the_seed_mean_and_half_range():
    assert common.spread([{"fid": 10.0}, {"fid": 14.0}], "fid") == (12.0, 2.0)


def test_the_report_lists_run_and_missing_experiments(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DOCS", tmp_path)
    monkeypatch.setattr(common, "POINTS", tmp_path / "points")
    (tmp_path / "points" / "aug").mkdir(parents=True)
    (tmp_path / "points" / "aug" / "floor.json").write_text("{}")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "guidance.md").write_text("## Guidance sweep\n\n| w | FID |\n")
    text = suite.write_report().read_text()
    assert "## Guidance sweep" in text and "![guidance](experiments/guidance.png)" in text
    assert (
        "## Conditioning augmentation ablation (64 → 256)\n\nNot finished yet: `python -m cdm.cli.experiments aug`"
        in text
    )
    assert f"1 points were stored under `{tmp_path / 'points'}/aug/`" in text
    assert f"the measured points are committed under `{tmp_path / 'points'}/`" in text
    # a section written before its points were stored says that a re-run measures them again
    assert (
        "## Guidance sweep\n\n| w | FID |\n\nThis section was measured before its points were stored" in text
    )
    (tmp_path / "points" / "guidance").mkdir()
    (tmp_path / "points" / "guidance" / "floor.json").write_text("{}")  # a floor alone is not the points
    assert (
        "## Guidance sweep\n\n| w | FID |\n\nThis section was measured before"
        in suite.write_report().read_text()
    )
    (tmp_path / "points" / "guidance" / "w1-seed0.json").write_text("{}")
    assert "This section was measured before" not in suite.write_report().read_text()
    assert set(common.TITLES) == set(suite.COSTS) == set(suite.EXPERIMENTS)


def test_an_unknown_experiment_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as err:
        experiments_cli.main(["guidence"])
    assert err.value.code == 2
    assert "unknown experiment 'guidence'" in capsys.readouterr().err


def test_a_missing_stage_is_trained_with_its_recipe_and_resumed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(common.subprocess, "run", lambda cmd, check: calls.append(cmd))
    export = tmp_path / "run" / "export"
    common.train_missing(export, "ablate_sr64to256_noaug")
    assert calls[-1][-1] == "experiment=ablate_sr64to256_noaug"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    common.train_missing(export, "ablate_sr64to256_noaug")
    assert calls[-1][-2:] == ["experiment=ablate_sr64to256_noaug", "train.resume=latest"]
    export.mkdir()
    common.train_missing(export, "ablate_sr64to256_noaug")
    assert len(calls) == 2  # an exported stage is not trained again


def test_guidance_findings_pick_the_tied_w_with_the_best_agreement(tmp_path):
    from cdm.config import SamplingConfig

    kid = {1.0: 0.030, 1.5: 0.020, 2.0: 0.0205, 3.0: 0.025, 4.0: 0.030, 6.0: 0.040}
    agree = {1.0: 0.90, 1.5: 0.95, 2.0: 0.98, 3.0: 0.99, 4.0: 1.0, 6.0: 1.0}
    points = {
        (w, seed): {
            "fid": 50.0,
            "kid": kid[w] + 0.001 * seed,
            "class_agreement": agree[w],
            "diversity": 10 - w,
            "seconds": 1.0,
        }
        for w in guidance.GUIDANCE
        for seed in common.SEEDS
    }
    floor = {"fid": 30.0, "kid": 0.0, "diversity": 12.0, "seconds": 1.0}
    result = {"points": points, "floor": floor, "samples": 50, "settings": SamplingConfig()}
    text = "\n".join(guidance.report_guidance(result))
    # 1.5 has the lowest KID; 2.0 is within the 0.0005 seed spread and agrees more often
    assert "The lowest KID is at w = 1.5; within the seed spread of it: w = 1.5, 2" in text
    assert "of which w = 2 has the highest class agreement (0.980)" in text
    assert "| 1.5 | 50.0 ± 0.0 | 0.0205 ± 0.0005 |" in text
    guidance.plot_guidance(result, tmp_path / "guidance.png")
    assert (tmp_path / "guidance.png").stat().st_size > 0


def test_trunc_findings_call_ties_within_the_seed_spread(tmp_path):
    from cdm.config import SamplingConfig

    kid = {  # truncated clearly better at 250, a tie at 100 (0.0005 apart, spread 0.001), worse at 50
        ("non-truncated", 0): 0.050,
        ("non-truncated", 50): 0.040,
        ("non-truncated", 100): 0.0400,
        ("non-truncated", 250): 0.060,
        ("truncated", 50): 0.045,
        ("truncated", 100): 0.0405,
        ("truncated", 250): 0.030,
    }
    points = {
        (mode, level, seed): {"fid": 80.0, "kid": v + 0.002 * seed, "class_agreement": 1.0, "seconds": 2.0}
        for (mode, level), v in kid.items()
        for seed in common.SEEDS
    }
    for seed in common.SEEDS:
        points[("truncated", 0, seed)] = points[("non-truncated", 0, seed)]
        points[("base", seed)] = {"samples": 50, "seconds": 100.0}
    real = {"psnr": 30.0, "ssim": 0.9, "consistency": 1e-4, "hf_ratio": 0.5}
    points["real"] = {"model": real, "bicubic": real, "seconds": 5.0}
    points["handover"] = {
        f"s{level}": {"alphabar": 0.9, "expected_std": 0.3162, "measured_std": 0.3 + level / 1e4}
        for level in trunc.TRUNC_LEVELS
    }
    floor = {"fid": 30.0, "kid": 0.0, "seconds": 1.0}
    result = {"points": points, "floor": floor, "samples": 50, "settings": SamplingConfig(), "real": 50}
    text = "\n".join(trunc.report_trunc(result))
    assert "s = 250: 0.3250 against 0.3162." in text
    assert "s = 50: non-truncated better; s = 100: tie; s = 250: truncated better" in text
    assert "The lowest KID overall: truncated at s = 250 (0.0310)" in text
    assert "| either (s = 0) | 0 | 80.0 ± 0.0 | 0.0510 ± 0.0010 |" in text
    trunc.plot_trunc(result, tmp_path / "trunc.png")
    assert (tmp_path / "trunc.png").stat().st_size > 0


def test_blur_report_names_the_better_stage_only_beyond_the_seed_spread(tmp_path):
    from cdm.config import SamplingConfig

    def result_with(kid_blur: float, kid_noblur: float) -> dict:
        points = {("inputs", seed): {"samples": 20, "seconds": 60.0} for seed in common.SEEDS}
        for name, kid in (("blur", kid_blur), ("no blur", kid_noblur)):
            for seed in common.SEEDS:
                points[(name, seed)] = {
                    "fid": 90.0,
                    "kid": kid + 0.002 * seed,
                    "class_agreement": 1.0,
                    "seconds": 9.0,
                }
            model = {
                "psnr": 39.0,
                "ssim": 0.96,
                "consistency": 3e-5,
                "hf_ratio": 0.8 if name == "blur" else 0.9,
            }
            bicubic = {"psnr": 35.5, "ssim": 0.99, "consistency": 5e-5, "hf_ratio": 0.1}
            points[(name, "real")] = {"model": model, "bicubic": bicubic, "seconds": 100.0}
            soft = {**model, "psnr": 38.0 if name == "blur" else 33.0}
            soft_bicubic = {**bicubic, "psnr": 31.25}
            points[(name, "blurred")] = {"model": soft, "bicubic": soft_bicubic, "seconds": 100.0}
        points["sharpness"] = {"samples": 0.62, "blurred": 0.41}
        floor = {"fid": 40.0, "kid": 0.0, "seconds": 1.0}
        return {
            "points": points,
            "floor": floor,
            "samples": 20,
            "settings": SamplingConfig(noise_level=200),
            "real": 20,
        }

    text = "\n".join(blur.report_blur(result_with(0.050, 0.060)))
    assert "(the stage with blur is better;" in text
    assert "HF ratio 0.80 against 0.90" in text
    assert "| bicubic | clean | 35.50 | 0.990 | 5.00e-05 | 0.10 | |" in text
    assert "| no blur | blurred, σ = 0.5 | 33.00 |" in text
    assert "| bicubic | blurred, σ = 0.5 | 31.25 |" in text
    assert "On blurred real inputs: 38.00 against 33.00 dB" in text
    assert "the cascade's 256 px samples 0.62, real digits blurred by σ = 0.5 0.41" in text
    assert "within each seed: -0.0100, -0.0100" in text
    assert "tie: the difference is within the seeds' spread" in "\n".join(
        blur.report_blur(result_with(0.0500, 0.0505))
    )
    blur.plot_blur(result_with(0.05, 0.06), tmp_path / "blur.png")
    assert (tmp_path / "blur.png").stat().st_size > 0


def budget_result() -> dict:
    """A made-up sampler budget over two stages, with every point stored."""
    stages = ["base64", "sr64to256"]
    kid_at = {5: 0.08, 10: 0.04, 25: 0.021, 50: 0.020, 100: 0.020, 1000: 0.020}
    psnr_at = {5: 30.0, 10: 31.5, 25: 31.8, 50: 31.9, 100: 31.9, 1000: 32.0}
    points = {}
    for name, steps in sampler.budget_grid():
        ddpm = name == "DDPMScheduler" and steps < 1000  # DDPM lags: at n steps, the others' KID at n / 2
        kid = kid_at[{5: 5, 10: 5, 25: 10, 50: 25, 100: 50}[steps] if ddpm else steps]
        psnr = psnr_at[steps] - (1.0 if ddpm else 0.0)
        for seed in common.SEEDS:
            points[("base64", name, steps, seed)] = {
                "fid": 70.0,
                "kid": kid + 0.001 * seed,
                "class_agreement": 1.0,
            }
            model = {"psnr": psnr, "ssim": 0.9, "consistency": 1e-5, "hf_ratio": 0.8}
            points[("sr64to256", name, steps, seed)] = {"model": model, "bicubic": model}
    return {
        "points": points,
        "floor": {"kid": 0.0},
        "samples": 50,
        "stages": stages,
        "guidance": 2.0,
        "real": 5,
    }


def test_sampler_budget_finds_the_fewest_evaluations_that_reach_the_reference(tmp_path):
    result = budget_result()
    text = "\n".join(sampler.report_sampler(result))
    assert "Not finished yet" not in text
    # base (two evaluations a step): KID 0.0215 at 25 steps is 0.001 above the reference's 0.0205, beyond the
    # 0.0005 spread; 0.0205 at 50 steps ties: 100 evaluations, DDPM 200
    assert (
        "- base64: UNet evaluations to reach the 2000-evaluation quality (KID within the seed spread): "
        "DDPM 200 (100 steps), DDIM 100 (50 steps), DPM-Solver++ 100 (50 steps), UniPC 100 (50 steps)."
        in text
    )
    # SR: PSNR within 0.3 dB of 32.0 from 10 steps (31.5 is not; 31.8 is): 25 evaluations; DDPM never
    assert "DDPM not within 100 steps, DDIM 25, DPM-Solver++ 25, UniPC 25." in text
    assert "| DDPM, 1000 steps | 0.0205 ± 0.0005 |" in text
    sampler.plot_sampler(result, tmp_path / "sampler.png")
    assert (tmp_path / "sampler.png").stat().st_size > 0


def test_sampler_budget_runs_cheap_points_first_and_the_base_reference_last():
    order = sampler.budget_order(3)
    n = len(sampler.budget_grid())
    assert len(order) == len(set(order)) == 3 * n
    assert {k for _, _, k in order[: 2 * n]} == {1, 2} and {k for _, _, k in order[2 * n :]} == {0}
    assert order[-1] == ("DDPMScheduler", sampler.REFERENCE_STEPS, 0)  # the base stage's reference
    for part in (order[: 2 * n], order[2 * n :]):
        steps = [s for _, s, _ in part]
        assert steps == sorted(steps)  # rising cost within the SR stages and within the base stage
    assert order[:2] == [("DDPMScheduler", sampler.BUDGET_STEPS[0], k) for k in (1, 2)]


def test_sampler_budget_reports_the_complete_stages_while_the_others_run(tmp_path):
    result = budget_result()
    ref = sampler.REFERENCE_STEPS
    del result["points"][("base64", "DDPMScheduler", ref, common.SEEDS[-1])]
    assert sampler.complete_stages(result) == [(1, "sr64to256")]
    assert sampler.complete_stages(result, reference=False) == [(0, "base64"), (1, "sr64to256")]
    text = "\n".join(sampler.report_sampler(result))
    total = len(sampler.budget_grid()) * len(common.SEEDS)
    # the base stage's curves are whole: its table shows them, with the reference still to come
    assert f"- base64: {total - 1} of {total} points stored; its DDPM {ref}-step reference" in text
    assert "sr64to256 (PSNR, dB):" in text and "base64 (KID):" in text
    assert f"| DDPM, {ref} steps | not measured yet |" in text
    assert "- sr64to256: UNet evaluations" in text and "- base64: UNet evaluations" not in text
    sampler.plot_sampler(result, tmp_path / "sampler.png")
    assert (tmp_path / "sampler.png").stat().st_size > 0
    # a point of a curve missing: no table for that stage at all
    del result["points"][("base64", "DDIMScheduler", sampler.BUDGET_STEPS[0], common.SEEDS[0])]
    text = "\n".join(sampler.report_sampler(result))
    assert "base64 (KID):" not in text and f"{total - 2} of {total} points stored; its table follows" in text


def test_the_ablations_keep_their_own_sr_sampler_whatever_the_shipped_default():
    from cdm.cascade import DEMO_CASCADE, Cascade

    shipped, ablation = Cascade.from_pretrained(DEMO_CASCADE), common.ablation_cascade()
    assert ablation.settings[0] == shipped.settings[0]  # the base stage as shipped
    for mine, theirs in zip(ablation.settings[1:], shipped.settings[1:]):
        assert (mine.scheduler, mine.steps) == ("DDIMScheduler", 5) == tuple(common.ABLATION_SR.values())
        assert (mine.noise_level, mine.aug_mode) == (theirs.noise_level, theirs.aug_mode)


def levels_result(kid: dict, shipped: int) -> dict:
    from cdm.config import SamplingConfig

    points = {
        (level, seed): {
            "fid": 100.0 - level / 10,
            "kid": v + 0.002 * seed,
            "class_agreement": 1.0,
            "seconds": 2.0,
        }
        for level, v in kid.items()
        for seed in common.SEEDS
    }
    for seed in common.SEEDS:
        points[("inputs", seed)] = {"samples": 50, "seconds": 80.0}
    settings = SamplingConfig(scheduler="DDPMScheduler", steps=5, noise_level=shipped)
    floor = {"fid": 30.0, "kid": 0.0, "seconds": 1.0}
    return {
        "points": points,
        "floor": floor,
        "samples": 50,
        "settings": settings,
        "stage": "sr64to256",
        "name": "levels",
        "size": 256,
    }


def test_levels_report_checks_the_shipped_level_under_the_shipped_sampler(tmp_path):
    # 0 and 50 tie (0.0005 apart, spread 0.001); the tie goes to the lower FID, s = 50
    result = levels_result({0: 0.0405, 50: 0.040, 100: 0.050, 250: 0.080}, shipped=50)
    text = "\n".join(levels.report_levels(result))
    assert "samples its sr64to256 stage with DDPMScheduler at 5 steps" in text
    assert (
        "the best level is s = 50 (levels whose KID is within the seed spread of the lowest, 0, 50, tie"
        in text
    )
    assert "tie; the tie goes to the lowest FID); the shipped level, s = 50, is among them." in text
    assert "| 100 | 90.0 ± 0.0 | 0.0510 ± 0.0010 | 1.000 ± 0.000 | 2 |" in text
    assert "making them took 80 s per seed" in text
    # a shipped level outside the tie is named as such
    text = "\n".join(levels.report_levels(levels_result({0: 0.040, 50: 0.060, 100: 0.070, 250: 0.08}, 50)))
    assert "the best level is s = 0" in text and "the shipped level, s = 50, is not (KID 0.0610)" in text
    levels.plot_levels(result, tmp_path / "levels.png")
    assert (tmp_path / "levels.png").stat().st_size > 0


def test_the_1024_level_check_uses_its_own_levels_and_reference():
    result = levels_result({0: 0.30, 100: 0.25, 200: 0.20, 250: 0.21}, shipped=200)
    result.update(name="levels1024", stage="sr256to1024", size=1024)
    text = "\n".join(levels.report_levels(result))
    assert text.startswith("## The augmentation level under the shipped sampler (256 → 1024)")
    assert "FID/KID against 200 real 1024 px test digits" in text
    assert "the best level is s = 200" in text and "the shipped level, s = 200, is among them." in text
    assert "At s = 250 the stage scores KID 0.2110." in text
