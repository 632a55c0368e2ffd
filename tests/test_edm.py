"""models/edm.py: schedule math, key manifests of the released checkpoints, golden parity with the official code,
strict loading, forward-mode AD, and the method switches (logvar head, r input, feature taps)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import edm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tiny_config(arch, **kw):
    """The config the fixture generator used for its tiny official networks."""
    size = dict(model_channels=32, num_blocks=1) if arch == "adm" else dict(model_channels=16, num_blocks=2)
    size.update(kw)
    return edm.Config(
        arch=arch, img_resolution=8, label_dim=10, augment_dim=9, channel_mult=(1, 2), attn_resolutions=(4,), **size
    )


def load_fixture(arch):
    tensors = load_file(os.path.join(HERE, "fixtures", f"edm_{arch}.safetensors"))
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    return weights, tensors


# ----------------------------------------------------------------------------
# Schedule


def test_alpha_sigma_identities():
    t = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    assert torch.equal(edm.alpha(t), torch.ones_like(t))
    assert torch.equal(edm.sigma(t), t)
    assert torch.equal(edm.alpha_prime(t), torch.zeros_like(t))
    assert torch.equal(edm.sigma_prime(t), torch.ones_like(t))


@pytest.mark.parametrize("pred_type", ["x0", "eps", "v", "flow"])
def test_prediction_round_trip(pred_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.002, 0.5, 10.0, 80.0], dtype=torch.float64)
    x_t = (x0.double() + t.reshape(-1, 1, 1, 1) * eps.double()).float()
    out = edm.from_x0(x_t, x0, t, pred_type)
    assert torch.allclose(edm.to_x0(x_t, out, t, pred_type), x0, atol=1e-4)
    assert torch.allclose(edm.convert(x_t, out, t, pred_type, "x0"), x0, atol=1e-4)


def test_prediction_types_match_their_definitions():
    """eps is the noise, flow is dx_t/dt = eps for alpha = 1, sigma = t; v is the VP-rescaled velocity."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    x_t = x0 + t[:, None] * eps
    assert torch.allclose(edm.from_x0(x_t, x0, t, "eps"), eps)
    assert torch.allclose(edm.from_x0(x_t, x0, t, "flow"), eps)
    a, s = 1 / (1 + t[:, None] ** 2).sqrt(), t[:, None] / (1 + t[:, None] ** 2).sqrt()
    assert torch.allclose(edm.from_x0(x_t, x0, t, "v"), a * eps - s * x0)
    with pytest.raises(ValueError, match="unknown prediction type"):
        edm.convert(x_t, x0, t, "x0", "score")


def test_karras_grid_follows_the_formula():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    grid = edm.karras_sigmas(n, lo, hi, rho)
    for i in (0, 5, 17):
        expected = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert math.isclose(grid[i].item(), expected, rel_tol=1e-12)
    assert grid.dtype == torch.float64 and math.isclose(grid[0].item(), hi) and math.isclose(grid[-1].item(), lo)


def test_default_student_times():
    """FastGen's EDM get_t_list values (reference/methods.md §1.4)."""
    assert torch.allclose(edm.t_list(1), torch.tensor([79.564, 0.0], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(
        edm.t_list(4), torch.tensor([79.564, 17.498, 2.5265, 0.17257, 0.0], dtype=torch.float64), atol=1e-3
    )


@pytest.mark.parametrize("kind", ["polynomial", "lognormal", "log_t", "uniform"])
def test_time_samplers_stay_in_range(kind):
    g = torch.Generator().manual_seed(0)
    t = edm.sample_t(4096, kind, p_mean=-1.1, p_std=2.0, generator=g)
    assert t.shape == (4096,) and t.dtype == torch.float64
    assert t.min() >= edm.T_MIN and t.max() <= edm.T_MAX
    assert t.unique().numel() > 100


def test_time_sampler_distributions():
    g = torch.Generator().manual_seed(0)
    # lognormal with bounds far in the tails is the plain lognormal: ln t ~ N(-1.2, 1.2^2)
    log_t = edm.sample_t(20000, "lognormal", generator=g).log()
    assert abs(log_t.mean().item() + 1.2) < 0.03 and abs(log_t.std().item() - 1.2) < 0.03
    # polynomial draws only Karras-grid levels with indices 2..998
    grid = edm.karras_sigmas().flip(0)
    t = edm.sample_t(2000, "polynomial", generator=g)
    assert torch.isin(t, grid[2:999]).all()
    # uniform: mean of U[a, b]
    u = edm.sample_t(20000, "uniform", t_min=1.0, t_max=3.0, generator=g)
    assert abs(u.mean().item() - 2.0) < 0.02
    with pytest.raises(ValueError, match="unknown time sampler"):
        edm.sample_t(4, "cosine")


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", [n for n, c in edm.CONFIGS.items() if c.url])  # the released checkpoints
def test_full_size_keys_match_the_released_checkpoint(name):
    with open(os.path.join(HERE, "manifests", f"{name}.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = edm.EDMPrecond(edm.CONFIGS[name])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest
    assert list(ours) == list(manifest)  # same order too: the official ModuleDict order


def test_parameter_count_of_cifar10_ddpmpp():
    with torch.device("meta"):
        model = edm.EDMPrecond(replace(edm.CONFIGS["edm-cifar10-32x32-cond-vp"], logvar_head=True))
    assert sum(v.numel() for v in model.state_dict().values()) == 55_735_460  # FastGen's count, logvar head included


# ----------------------------------------------------------------------------
# Golden parity with the official implementation


# The fixture holds the official outputs in float32 (`output.<case>`) and from the same official code run in float64 on
# the same weights and inputs (`output.<case>.f64`, tests/generate/fixture_tools.py). Bounds, relative to the output
# scale:
# - float64 against float64: 1e-12. Measured 3e-16..1e-15 (ddpmpp, ncsnpp, adm; 1 and 2 threads): float64 rounding,
#   which no CPU moves to 1e-12.
# - float32 against the official float32: 20x the official code's own float32 error on the fixture (its float32 vs
#   float64 outputs, measured 2e-7..5e-7; ours against it 1e-7..4e-7). The bound follows the fixture, not a machine.
F64_BOUND = 1e-12
F32_FACTOR = 20


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def official_float32_error(t):
    """The official code's own float32 error on a fixture: its float32 vs float64 outputs, worst case."""
    return max(relative_error(t[k].double(), t[k + ".f64"]) for k in t if k.startswith("output.") and k + ".f64" in t)


def parity_cases(model, t, dtype):
    x, sigma, labels, augment = (t[k].to(dtype) for k in ("input.x", "input.sigma", "input.labels", "input.augment"))
    with torch.no_grad():
        return {  # case -> (our output, the official output it must equal)
            "cond": (model(x, sigma, labels), "cond"),
            "uncond": (model(x, sigma), "uncond"),
            "cond_augment": (model(x, sigma, labels, augment_labels=augment), "cond_augment"),
            "int_labels": (model(x, sigma, labels.argmax(1)), "cond"),
        }


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_matches_official_outputs(arch):
    """Ours in float64 against the official code in float64; bound F64_BOUND (measured above)."""
    weights, t = load_fixture(arch)
    model = edm.EDMPrecond(tiny_config(arch)).double().eval()
    model.load_state_dict(weights, strict=True)
    for case, (out, key) in parity_cases(model, t, torch.float64).items():
        assert out.dtype == torch.float64
        err = relative_error(out, t[f"output.{key}.f64"])
        assert err < F64_BOUND, f"{arch} {case}: max abs error {err:.2e} of output scale"


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_float32_matches_official_float32_outputs(arch):
    """Ours in float32 against the official code in float32: the float32 path (weights and time math cast to the
    input dtype). Bound: F32_FACTOR x the official code's own float32 error on this fixture."""
    weights, t = load_fixture(arch)
    model = edm.EDMPrecond(tiny_config(arch)).eval()
    model.load_state_dict(weights, strict=True)
    bound = F32_FACTOR * official_float32_error(t)
    for case, (out, key) in parity_cases(model, t, torch.float32).items():
        assert out.dtype == torch.float32
        err = relative_error(out, t[f"output.{key}"])
        assert err < bound, f"{arch} {case}: max abs error {err:.2e} of output scale, bound {bound:.1e}"


# ----------------------------------------------------------------------------
# Strict loading


def _fixture_file(tmp_path, arch, edit):
    weights, _ = load_fixture(arch)
    edit(weights)
    path = str(tmp_path / "ckpt.safetensors")
    save_file(weights, path)
    return path


def test_load_checkpoint_is_strict(tmp_path):
    with torch.device("meta"):
        model = edm.EDMPrecond(tiny_config("ddpmpp"))
    path = _fixture_file(tmp_path, "ddpmpp", lambda w: None)
    edm.load_checkpoint(model, path)
    assert not any(p.is_meta for p in model.parameters())

    cases = {
        "missing:    model.map_layer1.bias": lambda w: w.pop("model.map_layer1.bias"),
        "unexpected: model.extra.weight": lambda w: w.update({"model.extra.weight": torch.zeros(2)}),
        "shape:      model.map_layer0.weight": lambda w: w.update({"model.map_layer0.weight": torch.zeros(3, 3)}),
    }
    for message, edit in cases.items():
        with torch.device("meta"):
            model = edm.EDMPrecond(tiny_config("ddpmpp"))
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            edm.load_checkpoint(model, _fixture_file(tmp_path, "ddpmpp", edit))


def test_from_pretrained_by_name_and_by_path(tmp_path, monkeypatch):
    weights, t = load_fixture("adm")
    cfg = tiny_config("adm", file="imagenet-64/tiny.safetensors")
    monkeypatch.setitem(edm.CONFIGS, "tiny-adm", cfg)
    os.makedirs(tmp_path / "imagenet-64")
    save_file(weights, str(tmp_path / "imagenet-64" / "tiny.safetensors"))
    model = edm.from_pretrained("tiny-adm", root=str(tmp_path), dtype=torch.float64)
    x, sigma, labels = (t[k].double() for k in ("input.x", "input.sigma", "input.labels"))
    with torch.no_grad():  # the official output in float64, bound F64_BOUND (see the parity tests)
        assert relative_error(model(x, sigma, labels), t["output.cond.f64"]) < F64_BOUND

    # A trained checkpoint carries its config in the safetensors metadata.
    save_file(weights, str(tmp_path / "student.safetensors"), metadata={"config": edm.config_to_json(cfg)})
    model = edm.from_pretrained(str(tmp_path / "student.safetensors"))
    assert model.cfg.arch == "adm" and model.cfg.channel_mult == (1, 2)

    with pytest.raises(FileNotFoundError, match="python download.py edm-cifar10-32x32-cond-vp"):
        edm.from_pretrained("edm-cifar10-32x32-cond-vp", root=str(tmp_path))
    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="names no architecture"):
        edm.from_pretrained(str(tmp_path / "bare.safetensors"))
    # A converted official checkpoint names its CONFIGS entry (download.py convert --as NAME).
    save_file(weights, str(tmp_path / "converted.safetensors"), metadata={"name": "tiny-adm"})
    assert edm.from_pretrained(str(tmp_path / "converted.safetensors")).cfg == cfg


# ----------------------------------------------------------------------------
# Method switches: logvar head, r input, feature taps, forward-mode AD


def test_adapted_heads_reproduce_the_checkpoint(tmp_path):
    weights, t = load_fixture("ddpmpp")
    path = str(tmp_path / "ckpt.safetensors")
    save_file(weights, path)
    for arch in ("ddpmpp", "adm"):
        weights, t = load_fixture(arch)
        save_file(weights, path)
        with torch.device("meta"):
            model = edm.EDMPrecond(tiny_config(arch, logvar_head=True, r_timestep=True))
        added = edm.load_checkpoint(model, path, adapt=True)
        assert added == ["model.logvar_linear (fresh)", "r input (zero-initialised)"]
        model.double().eval()
        x, sigma, labels = (t[k].double() for k in ("input.x", "input.sigma", "input.labels"))
        with torch.no_grad():
            out, logvar = model(x, sigma, labels, r=sigma / 2, return_logvar=True)
        # The official output in float64, bound F64_BOUND (see the parity tests): the zero r input adds nothing.
        assert relative_error(out, t["output.cond.f64"]) < F64_BOUND
        assert logvar.shape == (4, 1)


def test_r_needs_the_r_input():
    model = edm.EDMPrecond(tiny_config("ddpmpp"))
    with pytest.raises(ValueError, match="r_timestep=True"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), r=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="logvar_head=True"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), return_logvar=True)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_feature_taps(arch):
    torch.manual_seed(0)
    model = edm.EDMPrecond(tiny_config(arch)).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([1, 2])
    feats = model.features(x, t, y, indices=(0, 1))
    mc = model.cfg.model_channels
    assert [tuple(f.shape) for f in feats] == [(2, mc, 8, 8), (2, 2 * mc, 4, 4)]
    out, feats2 = model(x, t, y, feature_indices={1})
    assert torch.equal(feats2[0], feats[1]) and torch.equal(out, model(x, t, y))
    with pytest.raises(ValueError, match="feature indices"):
        model.features(x, t, y, indices=(2,))


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_jvp_matches_finite_differences(arch):
    """torch.func.jvp through the whole network (attention included) equals a central difference in float64."""
    torch.manual_seed(0)
    model = edm.EDMPrecond(tiny_config(arch, r_timestep=True)).double().eval()
    randomize = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    model.load_state_dict(randomize, strict=False)
    x, t, r = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
        torch.tensor([0.7, 2.0], dtype=torch.float64),
        torch.tensor([0.1, 0.3], dtype=torch.float64),
    )
    dx = torch.randn_like(x)
    y = torch.tensor([1, 2])

    def f(x, t):
        return model(x, t, y, r=r)

    _, tangent = torch.func.jvp(f, (x, t), (dx, torch.ones_like(t)))
    h = 1e-5
    fd = (f(x + h * dx, t + h) - f(x - h * dx, t - h)) / (2 * h)
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-6 * fd.abs().max().item())


def test_forward_backward_and_label_dropout():
    torch.manual_seed(0)
    model = edm.EDMPrecond(tiny_config("ddpmpp", label_dropout=1.0, logvar_head=True)).train()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([1, 2])
    out, logvar = model(x, t, y, return_logvar=True)
    (out.square().mean() + logvar.mean()).backward()
    unused = {"model.map_augment.weight"}  # no augmentation labels given
    assert all(p.grad is not None and p.grad.isfinite().all() for n, p in model.named_parameters() if n not in unused)
    with torch.no_grad():  # dropout probability 1 in training = unconditional
        assert torch.allclose(model(x, t, y), model(x, t, None))


# ----------------------------------------------------------------------------
# Samplers


def test_samplers_on_an_exact_denoiser():
    """For data that is a single point mu, the exact x0 prediction is mu: every sampler must land on it."""
    mu = torch.full((2, 3, 4, 4), 0.3)

    class Point(torch.nn.Module):
        def _labels(self, y, x):
            return y

        def forward(self, x, t, y=None):
            return mu.to(x.dtype).expand_as(x)

    noise = torch.randn(2, 3, 4, 4)
    assert torch.allclose(edm.sample_heun(Point(), noise, steps=8), mu, atol=1e-5)
    assert torch.allclose(edm.sample_euler(Point(), noise, steps=8), mu, atol=1e-5)
    assert torch.allclose(edm.sample_student(Point(), noise, steps=2), mu, atol=1e-6)


def test_heun_on_a_gaussian_converges_at_second_order():
    """Data N(0, s^2): the exact denoiser is x0 = s^2 / (s^2 + t^2) x, and the ODE maps x_T to x_T s / sqrt(s^2 + T^2).

    Heun's error must fall ~4x per doubling of steps (2nd order), Euler's ~2x (1st order)."""
    s = 0.5

    class Gauss(torch.nn.Module):
        def _labels(self, y, x):
            return y

        def forward(self, x, t, y=None):
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
            return s**2 / (s**2 + t**2) * x

    noise = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    exact = 80.0 * s / math.sqrt(s**2 + 80.0**2)
    heun = [abs(edm.sample_heun(Gauss(), noise, steps=n).item() - exact) for n in (64, 128, 256)]
    euler = [abs(edm.sample_euler(Gauss(), noise, steps=n).item() - exact) for n in (64, 128, 256)]
    assert heun[-1] < 2e-4
    assert all(3.5 < a / b < 4.5 for a, b in zip(heun, heun[1:]))
    assert all(1.7 < a / b < 2.3 for a, b in zip(euler, euler[1:]))


def test_guidance_extrapolates_from_the_unconditional_prediction():
    torch.manual_seed(0)
    model = edm.EDMPrecond(tiny_config("ddpmpp")).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 1.0]), torch.tensor([1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, None)
        guided = edm._guided_x0(model, x, t, y, 2.0)
    assert torch.allclose(guided, uncond + 2.0 * (cond - uncond), atol=1e-5)


def test_smoke_test_runs():
    result = subprocess.run([sys.executable, "models/edm.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "edm ncsnpp tiny" in result.stdout and "parameters" in result.stdout
