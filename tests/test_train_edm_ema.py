"""train_edm.py's EMAs against their formulas: a constant EMA, ema_k = beta ema_(k-1) + (1 - beta) student_k, and
EDM2's power EMA, beta_k = (1 - 1/k)^(gamma + 1) (EDM2 Eq. 4), whose gamma follows from the relative standard
deviation sigma_rel of the averaging profile (EDM2 Eq. 3; phema.py's `std_to_exp` solves the same cubic). The weights
come from a real 3-step run whose every step is checkpointed; an EMA that is never updated, or with beta and 1 - beta
swapped, fails here."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_edm


def gamma_from_sigma_rel(sigma_rel):
    """EDM2 Eq. 3 inverted: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), i.e. the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2, its largest real root."""
    s = sigma_rel**-2
    roots = np.roots([1, 7, 16 - s, 12 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def test_power_ema_presets_are_edm2s_sigma_rel():
    """sft-cifar10's power EMAs are FastGen's ema_1 / ema_5 / ema_10 profiles: sigma_rel 0.01, 0.05 and 0.10."""
    specs = train_edm.PRESETS["sft-cifar10"]["ema"].split(",")
    expected = [gamma_from_sigma_rel(s) for s in (0.01, 0.05, 0.10)]
    assert [float(s.split(":")[1]) for s in specs] == pytest.approx(expected, abs=0.005)


def test_ema_beta_formulas():
    assert train_edm.ema_beta("0.999", 1) == 0.999 and train_edm.ema_beta("0.999", 10_000) == 0.999
    gamma = 6.94
    for k in (1, 2, 3, 10, 1000):
        assert train_edm.ema_beta(f"power:{gamma}", k) == pytest.approx((1 - 1 / k) ** (gamma + 1), rel=1e-12)
    assert train_edm.ema_beta(f"power:{gamma}", 1) == 0.0  # the first step copies the student


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    """A tiny sft run of 3 steps with a constant and a power EMA, checkpointed at every step."""
    out = tmp_path_factory.mktemp("ema") / "run"
    argv = ["--tiny", "--method", "sft", "--num_threads", "1", "--eval_every", "0", "--max_steps", "3"]
    argv += ["--save_every", "1", "--ema", "0.9,power:6.94", "--lr", "1e-2", "--out_dir", str(out)]
    train_edm.main(train_edm.parse_args(argv))
    return {k: {name: load_file(out / f"ckpt_{k:07d}" / f"{name}.safetensors") for name in ("student", "ema_0.9", "ema_p6.94")} for k in (1, 2, 3)}  # fmt: skip


@pytest.mark.parametrize("name, spec", [("ema_0.9", "0.9"), ("ema_p6.94", "power:6.94")])
def test_each_ema_step_is_the_formula(every_step, name, spec):
    for k in (2, 3):
        beta = train_edm.ema_beta(spec, k)
        prev, student, ema = every_step[k - 1][name], every_step[k]["student"], every_step[k][name]
        moved = 0.0
        for key, value in ema.items():
            if not value.is_floating_point():
                continue
            expected = beta * prev[key].double() + (1 - beta) * student[key].double()
            assert torch.allclose(value.double(), expected, rtol=1e-6, atol=1e-7), (name, k, key)
            moved = max(moved, (value - prev[key]).abs().max().item())
        assert moved > 0, f"{name} did not move at step {k}"


def test_the_power_ema_starts_as_the_student(every_step):
    """beta_1 = 0: after the first step the power EMA is the student; the constant EMA is not yet."""
    first = every_step[1]
    assert all(torch.equal(first["ema_p6.94"][k], v) for k, v in first["student"].items())
    assert not all(torch.equal(first["ema_0.9"][k], v) for k, v in first["student"].items())
