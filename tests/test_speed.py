"""Speed settings: what `--precision auto` picks on which hardware, that they change rounding only, and
that `--exact` gives plain diffusers' arithmetic back."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_cascade

from cdm import devices
from cdm.devices import Speed, training_precision
from cdm.errors import UserError

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_auto_takes_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, fast_bf16):
    monkeypatch.setattr(devices, "has_fast_bf16", lambda device: fast_bf16)
    speed = Speed.resolve("auto", CPU)
    assert speed.dtype == (torch.bfloat16 if fast_bf16 else None)
    assert speed.channels_last  # oneDNN's convolutions are faster in it on any CPU
    assert speed.keep_memory
    assert training_precision("auto") == ("bf16" if fast_bf16 else "no")
    assert training_precision("fp16") == "fp16"  # a chosen precision is kept
    assert Speed.resolve("fp32", CPU).dtype is None
    assert Speed.resolve("bf16", CPU).dtype == torch.bfloat16  # asked for: emulated if need be
    assert Speed.resolve("auto", CPU, exact=True) == Speed.exact() == Speed(None, False)


FAULTS = """
import resource, torch
from cdm import devices

def faults_of_64_mib_activations():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    y = (x + 1) * 2  # three tensors of 64 MiB, as a 1024 px layer's, each page written, then freed
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_64_mib_activations() for _ in range(3)]
applied = devices.keep_freed_memory()
kept = [faults_of_64_mib_activations() for _ in range(8)]
print(applied, min(default), sum(kept[1:]))  # after the first, which grows the heap to its working size
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a setting of glibc's malloc")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    # In a process of its own: the setting stays for the life of the process.
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    applied, default, kept = out.stdout.split()
    assert applied == "True"
    assert int(default) > 40_000  # 3 x 16,384 pages of 4 KiB, mapped and faulted in again each time
    # Seven more rounds fault in fewer pages than two rounds did before: freed blocks are reused (the heap
    # still grows now and then, where Python's own allocations split a free block).
    assert int(kept) < 2 * int(default)


def test_exact_with_bf16_or_an_unknown_precision_is_one_clear_error():
    with pytest.raises(UserError, match="--exact runs in fp32"):
        Speed.resolve("bf16", CPU, exact=True)
    with pytest.raises(UserError, match="--precision fp8: expected one of auto, fp32, bf16"):
        Speed.resolve("fp8", CPU)


def test_the_speed_settings_change_rounding_only_and_exact_undoes_them(tmp_path):
    from cdm.cascade import Cascade

    cascade = Cascade.from_pretrained(make_cascade(tmp_path / "c", sizes=(8, 32)))

    def sample():
        return cascade([1, 2], seeds=[3, 4], progress=False).images[-1].float().numpy()  # the last stage

    exact = sample()
    diffs = []
    for speed in (Speed(None, True), Speed(torch.bfloat16, True)):
        cascade.optimize(speed)
        assert cascade.pipes[-1].unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        diffs.append(np.abs(sample() - exact).mean())
    channels_last, bf16 = diffs
    assert channels_last < 1e-5  # float rounding of another summation order
    assert 1e-4 < bf16 < 0.02  # bf16 ran (it rounds visibly more) and stayed close
    cascade.optimize(Speed.exact())
    assert cascade.pipes[-1].unet.conv_in.weight.is_contiguous()
    assert np.array_equal(sample(), exact)


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_training_records_the_precision_auto_resolved_to(monkeypatch, tmp_path, fast_bf16):
    from accelerate.state import AcceleratorState
    from omegaconf import OmegaConf

    from cdm.cli.train import compose_config
    from cdm.config import TrainRunConfig
    from cdm.train.loop import make_accelerator

    monkeypatch.setattr(devices, "has_fast_bf16", lambda device: fast_bf16)
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig),
        compose_config(["stage=base64", f"train.output_dir={tmp_path}", "train.tracker=none"]),
    )
    assert cfg.train.mixed_precision.value == "auto"  # the default
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = make_accelerator(cfg)
    expected = "bf16" if fast_bf16 else "no"
    assert accelerator.mixed_precision == expected
    assert cfg.train.mixed_precision.value == expected  # what the run's config and record will say
    AcceleratorState._reset_state(reset_partial_state=True)
