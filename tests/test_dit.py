"""models/dit.py: the DDPM and rectified-flow schedules, key manifests of the released checkpoints, golden parity with
the official DiT and SiT code (network, guidance, samplers), feature taps, samplers and strict loading."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import dit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RELEASED = [name for name, cfg in dit.CONFIGS.items() if cfg.url]


def load_fixture(name):
    """(weights under the real key names, all tensors) of tests/fixtures/<name>.safetensors."""
    tensors = load_file(os.path.join(HERE, "fixtures", f"{name}.safetensors"))
    weights = {k: v for k, v in tensors.items() if k.split(".")[0] not in ("input", "output", "schedule")}
    return weights, tensors


def fixture_model(name):
    weights, tensors = load_fixture(f"{name}_tiny")
    model = dit.DiT(dit.CONFIGS["tiny" if name == "dit" else "tiny-sit"]).eval()
    model.load_state_dict(weights, strict=True)
    return model, tensors


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


# ----------------------------------------------------------------------------
# Schedules


def test_ddpm_tables_match_the_official_diffusion_code():
    _, t = load_fixture("dit_tiny")
    assert torch.allclose(dit.ddpm_betas(), t["schedule.betas"], rtol=1e-12, atol=0)
    assert torch.allclose(dit.alphas_cumprod(), t["schedule.alphas_cumprod"], rtol=1e-12, atol=0)
    steps = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(dit.alpha(steps, "ddpm") ** 2, t["schedule.alphas_cumprod"], rtol=1e-12)
    assert torch.allclose(dit.sigma(steps, "ddpm") ** 2, 1 - t["schedule.alphas_cumprod"], rtol=1e-12)
    assert abs(t["schedule.alphas_cumprod"][-1].item() - 4.04e-5) < 1e-7  # nearly pure noise at t = 999


def test_schedule_identities():
    t = torch.tensor([0.0, 0.3, 10.5, 500.0, 998.7, 999.0], dtype=torch.float64)
    a, s = dit.alpha(t, "ddpm"), dit.sigma(t, "ddpm")
    assert torch.allclose(a**2 + s**2, torch.ones_like(t))  # variance preserving, also between timesteps
    assert (a[1:] < a[:-1]).all()
    u = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.equal(dit.alpha(u, "rf"), 1 - u) and torch.equal(dit.sigma(u, "rf"), u)
    assert torch.equal(dit.alpha_prime(u, "rf"), -torch.ones_like(u))
    assert torch.equal(dit.sigma_prime(u, "rf"), torch.ones_like(u))
    with pytest.raises(ValueError, match="unknown schedule"):
        dit.alpha(u, "edm")


def test_ddpm_derivatives_match_finite_differences():
    t, h = torch.tensor([0.4, 17.3, 640.6, 998.2], dtype=torch.float64), 1e-4
    for f, df in ((dit.alpha, dit.alpha_prime), (dit.sigma, dit.sigma_prime)):
        fd = (f(t + h, "ddpm") - f(t - h, "ddpm")) / (2 * h)
        assert torch.allclose(df(t, "ddpm"), fd, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["ddpm", "rf"])
@pytest.mark.parametrize("pred_type", ["x0", "eps", "v", "flow"])
def test_prediction_round_trip(schedule, pred_type):
    g = torch.Generator().manual_seed(0)  # float64: at t = 999 and t = 0.999, x0 from eps divides by alpha ~ 1e-3
    x0, eps = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1.0, 250.5, 600.0, 999.0] if schedule == "ddpm" else [0.01, 0.3, 0.7, 0.999], dtype=torch.float64)
    a, s = (f(t, schedule).reshape(-1, 1, 1, 1) for f in (dit.alpha, dit.sigma))
    x_t = a * x0 + s * eps
    out = dit.from_x0(x_t, x0, t, pred_type, schedule)
    assert torch.allclose(dit.to_x0(x_t, out, t, pred_type, schedule), x0, atol=1e-9)
    if pred_type == "eps":
        assert torch.allclose(out, eps, atol=1e-9)
    if pred_type == "flow" and schedule == "rf":
        assert torch.allclose(out, eps - x0, atol=1e-9)  # rectified flow: dx_t/dt = eps - x0


def test_conversions_use_the_first_channels():
    """DiT's raw output has 2C channels: eps, then the variance interpolation; conversions read only eps."""
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    raw = torch.cat([eps, torch.rand(2, 4, 8, 8)], dim=1)
    t = torch.tensor([100.0, 800.0], dtype=torch.float64)
    assert torch.equal(dit.to_x0(x_t, raw, t, "eps", "ddpm"), dit.to_x0(x_t, eps, t, "eps", "ddpm"))
    assert dit.convert(x_t, raw, t, "eps", "eps", "ddpm").shape == x_t.shape


def test_default_student_times():
    """FastGen's get_t_list on its [0, 0.999] time axis; DiT's timesteps are that time x 1000."""
    assert torch.equal(dit.t_list(1, "ddpm"), torch.tensor([999.0, 0.0], dtype=torch.float64))
    assert torch.allclose(dit.t_list(4, "ddpm"), torch.tensor([999.0, 749.25, 499.5, 249.75, 0.0], dtype=torch.float64))
    assert torch.allclose(dit.t_list(2, "rf"), torch.tensor([0.999, 0.4995, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("schedule", ["ddpm", "rf"])
@pytest.mark.parametrize("kind", ["logitnormal", "uniform", "shifted"])
def test_time_samplers_stay_in_range(schedule, kind):
    g = torch.Generator().manual_seed(0)
    t = dit.sample_t(4096, schedule, kind, generator=g)
    lo, hi = dit.T_RANGES[schedule]
    assert t.shape == (4096,) and t.dtype == torch.float64
    assert t.min() >= lo and t.max() <= hi and t.unique().numel() > 100


def test_time_sampler_distributions():
    g = torch.Generator().manual_seed(0)
    u = dit.sample_t(20000, "rf", "logitnormal", p_mean=0.5, p_std=1.0, generator=g)
    assert abs(torch.logit(u).mean().item() - 0.5) < 0.03 and abs(torch.logit(u).std().item() - 1.0) < 0.03
    shifted = dit.sample_t(20000, "rf", "shifted", shift=3.0, generator=g)
    assert abs(shifted.median().item() - 0.75) < 0.01  # the median 1/2 of u maps to 3 / 4
    steps = dit.sample_t(5000, "ddpm", "discrete", generator=g)
    assert torch.equal(steps, steps.round()) and steps.min() == 0 and steps.max() == 999
    with pytest.raises(ValueError, match="unknown time sampler"):
        dit.sample_t(4, "rf", "discrete")


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", RELEASED)
def test_full_size_keys_match_the_released_checkpoint(name):
    with open(os.path.join(HERE, "manifests", f"{name}.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = dit.DiT(dit.CONFIGS[name])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest
    assert list(ours) == list(manifest)  # same order too


def test_presets_follow_the_official_table():
    cfg = dit.CONFIGS["SiT-B/4"]
    assert (cfg.schedule, cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == ("rf", 12, 768, 12, 4)
    assert len([n for n in dit.CONFIGS if "/" in n]) == 24  # {DiT, SiT} x {XL, L, B, S} x {2, 4, 8}
    with torch.device("meta"):
        model = dit.DiT(dit.CONFIGS["DiT-XL-2-256x256"])
    assert sum(v.numel() for v in model.state_dict().values()) == 675_129_632  # FastGen's count less its logvar head


# ----------------------------------------------------------------------------
# Golden parity with the official code


def test_pos_embed_equals_the_official_sincos_table():
    weights, _ = load_fixture("dit_tiny")
    assert torch.equal(dit.DiT(dit.CONFIGS["tiny"]).pos_embed, weights["pos_embed"])


# The fixtures hold the official outputs in float32 (`output.<name>`) and from the same official code (network,
# diffusion and ODE samplers) run in float64 on the same weights and inputs (`output.<name>.f64`,
# tests/generate/fixture_tools.py). Bounds, relative to the output scale:
# - float64 against float64: 1e-12. Measured 2e-16..1.4e-15 (DiT forward, guidance, DDIM, DDPM; SiT forward,
#   guidance, Euler, Heun; 1 and 2 threads): float64 rounding, which no CPU moves to 1e-12.
# - float32 against the official float32: 20x the official code's own float32 error on the fixture (its float32 vs
#   float64 outputs, measured up to 4.5e-6 for DiT, whose timestep features round in float32 at t up to 999, and
#   7.4e-7 for SiT; ours against it up to 1.9e-6 and 9e-7). DDPM's float64 run draws its fresh noise in float64 (the
#   same seed, other numbers), so its float32 vs float64 difference is not rounding and does not count.
F64_BOUND = 1e-12
F32_FACTOR = 20


def official_float32_error(t):
    """The official code's own float32 error on a fixture: its float32 vs float64 outputs, worst case (not DDPM)."""
    keys = [k for k in t if k.startswith("output.") and k + ".f64" in t and k != "output.ddpm"]
    return max(relative_error(t[k].double(), t[k + ".f64"]) for k in keys)


def official_cases(name, model, t, dtype):
    """name -> our output in the official convention (SiT: time t_SiT = 1 - t, output x0 - eps = -flow)."""
    x, steps, labels, noise = t["input.x"].to(dtype), t["input.t"].double(), t["input.labels"], t["input.noise"]
    if name == "sit":
        steps = 1 - steps
    sign = 1 if name == "dit" else -1
    with torch.no_grad():
        out = {"forward": sign * model(x, steps, labels)}
        out["cfg"] = sign * dit.guided(model, x, steps, labels, 4.0, guided_channels=3)
    noise = noise.to(dtype)
    if name == "dit":  # 5 respaced steps of DiT's ddim_sample_loop and p_sample_loop (learned variance)
        out["ddim"] = dit.sample_ddim(model, noise, labels, steps=5)
        out["ddpm"] = dit.sample_ddpm(model, noise, labels, steps=5, generator=torch.Generator().manual_seed(7))
    else:  # 5 fixed steps of SiT's sample_ode (torchdiffeq euler and heun2) from t_SiT = 0 to 1
        out["euler"] = dit.sample_euler(model, noise, labels, steps=5)
        out["heun2"] = dit.sample_heun(model, noise, labels, steps=5)
    return out


def test_dit_matches_official_outputs():
    """Ours in float64 against the official code in float64; bound F64_BOUND (measured above)."""
    model, t = fixture_model("dit")
    model.double()
    x, steps, labels = t["input.x"].double(), t["input.t"], t["input.labels"]
    one_hot = torch.nn.functional.one_hot(labels, 11)[:, :10].double()  # the null class (10) becomes an all-zero row
    with torch.no_grad():
        out = model(x, steps.double(), labels)
        assert out.shape == (4, 8, 8, 8) and out.dtype == torch.float64  # eps and the variance channels
        assert relative_error(out, t["output.forward.f64"]) < F64_BOUND
        assert torch.equal(model(x, steps.double(), one_hot), out)
        assert torch.equal(model(x, steps, labels), out)  # integer timesteps, as the official sampler passes them
        guided = dit.guided(model, x, steps.double(), labels, 4.0, guided_channels=3)
    assert relative_error(guided, t["output.cfg.f64"]) < F64_BOUND


def test_sit_matches_official_outputs_in_the_flow_convention():
    """Official SiT: x_t = t x0 + (1 - t) eps, output x0 - eps. Ours: time 1 - t, output eps - x0. In float64 against
    the official float64 outputs, bound F64_BOUND."""
    model, t = fixture_model("sit")
    model.double()
    x, t_sit, labels = t["input.x"].double(), t["input.t"], t["input.labels"]
    with torch.no_grad():
        out = model(x, 1 - t_sit.double(), labels)
        assert out.shape == (4, 4, 8, 8)
        assert relative_error(out, -t["output.forward.f64"]) < F64_BOUND
        guided = dit.guided(model, x, 1 - t_sit.double(), labels, 4.0, guided_channels=3)
    assert relative_error(guided, -t["output.cfg.f64"]) < F64_BOUND


def test_guidance_of_all_latent_channels_by_default():
    """The official samplers guide 3 of the 4 channels; ours guides all 4 unless asked: only channel 3 differs.
    In float64 (F64_BOUND against the formula and the official float64 output)."""
    model, t = fixture_model("dit")
    model.double()
    x, steps, labels = t["input.x"].double(), t["input.t"].double(), t["input.labels"]
    with torch.no_grad():
        ours = dit.guided(model, x, steps, labels, 4.0)
        cond, uncond = model(x, steps, labels), model(x, steps, None)
    assert relative_error(ours[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])) < F64_BOUND
    assert torch.equal(ours[:, 4:], cond[:, 4:])
    assert relative_error(ours[:, :3], t["output.cfg.f64"][:, :3]) < F64_BOUND
    assert not torch.allclose(ours[:, 3], t["output.cfg.f64"][:, 3])


@pytest.mark.parametrize("name", ["dit", "sit"])
def test_samplers_match_the_official_samplers(name):
    """DiT: 5 respaced steps of its ddim_sample_loop and p_sample_loop (learned variance, the same noise stream: in
    float64 both draw float64 noise from seed 7). SiT: 5 fixed steps of its sample_ode (torchdiffeq euler and heun2)
    from t_SiT = 0 to 1. In float64 against the official float64 samples, bound F64_BOUND."""
    model, t = fixture_model(name)
    assert dit.respaced_timesteps(5) == [0, 250, 500, 749, 999]
    for case, out in official_cases(name, model.double(), t, torch.float64).items():
        assert out.dtype == torch.float64
        err = relative_error(out, t[f"output.{case}.f64"])
        assert err < F64_BOUND, f"{name} {case}: max abs error {err:.2e} of output scale"


@pytest.mark.parametrize("name", ["dit", "sit"])
def test_float32_matches_official_float32_outputs(name):
    """Ours in float32 against the official code in float32 (network, guidance, samplers): the float32 path, with
    DiT's timestep features in float32 as the original. Bound: F32_FACTOR x the official code's own float32 error on
    the fixture."""
    model, t = fixture_model(name)
    bound = F32_FACTOR * official_float32_error(t)
    for case, out in official_cases(name, model, t, torch.float32).items():
        assert out.dtype == torch.float32
        err = relative_error(out, t[f"output.{case}"])
        assert err < bound, f"{name} {case}: max abs error {err:.2e} of output scale, bound {bound:.1e}"


# ----------------------------------------------------------------------------
# Feature taps, training mode, forward-mode AD


def test_feature_taps():
    model, t = fixture_model("dit")
    x, steps, labels = t["input.x"], t["input.t"].double(), t["input.labels"]
    with torch.no_grad():
        out, features = model(x, steps, labels, feature_indices={0, 1})
        early = model(x, steps, labels, feature_indices={0}, features_only=True)
    assert [tuple(f.shape) for f in features] == [(4, 32, 4, 4)] * 2  # (B, D, H / p, W / p)
    assert torch.equal(out, model(x, steps, labels)) and torch.equal(early[0], features[0])
    # Token n is the patch at row n // 4, column n % 4.
    tokens = features[1].flatten(2).transpose(1, 2)
    assert torch.equal(model.tokens_to_image(tokens), features[1])


def test_forward_backward_and_label_dropout():
    torch.manual_seed(0)
    model, t = fixture_model("sit")
    model = dit.DiT(replace(model.cfg, label_dropout=1.0)).train()
    x, time, labels = t["input.x"], torch.tensor([0.2, 0.5, 0.7, 0.9]), t["input.labels"]
    out = model(x, time, labels)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with torch.no_grad():  # dropout probability 1 in training = the null class
        assert torch.equal(model(x, time, labels), model(x, time, None))


def test_jvp_matches_finite_differences():
    """torch.func.jvp through the whole network equals a central difference in float64 (sCM, MeanFlow need it)."""
    model, t = fixture_model("sit")
    model = model.double()
    x, time, labels = t["input.x"].double(), torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64), t["input.labels"]
    dx = torch.randn_like(x)

    def f(x, time):
        return model(x, time, labels)

    _, tangent = torch.func.jvp(f, (x, time), (dx, torch.ones_like(time)))
    h = 1e-5
    fd = (f(x + h * dx, time + h) - f(x - h * dx, time - h)) / (2 * h)
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-6 * fd.abs().max().item())


# ----------------------------------------------------------------------------
# FastGen's method heads: the second time input r (MeanFlow) and the logvar head (sCM)


def perturbed(model, seed=0, scale=0.05):
    """The model with every parameter moved off its (partly zero) initialisation, so each path shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-sit"])
def test_r_input_embeds_r_or_the_interval(name):
    """r_embedder sees r ("abs") or t - r ("diff"), in the caller's time convention (before SiT's 1 - t), and its
    output joins the conditioning vector: with its last layer at zero the model is the one without r."""
    torch.manual_seed(0)
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    t = torch.tensor([600.0, 300.0]) if name == "tiny" else torch.tensor([0.6, 0.3])
    r = t * torch.tensor([0.5, 0.1])
    seen = []
    for kind in ("abs", "diff"):
        model = perturbed(dit.DiT(replace(dit.CONFIGS[name], r_timestep=True, time_cond_type=kind))).eval()
        hook = model.r_embedder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        with torch.no_grad():
            with_r = model(x, t, labels, r=r)
        hook.remove()
        assert torch.allclose(seen[-1], (t - r if kind == "diff" else r).double())
        with torch.no_grad():
            assert not torch.allclose(with_r, model(x, t, labels, r=r * 0.5))
            model.r_embedder.mlp[2].weight.zero_()
            model.r_embedder.mlp[2].bias.zero_()
            plain = dit.DiT(dit.CONFIGS[name]).eval()
            plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("r_embedder.")})
            assert torch.allclose(model(x, t, labels, r=r), plain(x, t, labels), atol=1e-6)
    with pytest.raises(ValueError, match="r_timestep=True"):
        plain(x, t, labels, r=r)
    with pytest.raises(ValueError, match="time_cond_type"):
        dit.DiT(replace(dit.CONFIGS[name], r_timestep=True, time_cond_type="relative"))


@pytest.mark.parametrize("name", ["tiny", "tiny-sit"])
def test_jvp_through_the_r_input_matches_finite_differences(name):
    """MeanFlow's tangent: the JVP along (dx, dt = 1, dr = 0) through a model with the r input (and logvar head)."""
    torch.manual_seed(0)
    cfg = replace(dit.CONFIGS[name], r_timestep=True, time_cond_type="diff", logvar_head=True)
    model = perturbed(dit.DiT(cfg)).double().eval()
    x, labels = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 7])
    scale = 999.0 if name == "tiny" else 1.0
    t, r = torch.tensor([0.6, 0.3], dtype=torch.float64) * scale, torch.tensor([0.2, 0.0], dtype=torch.float64) * scale
    dx = torch.randn_like(x)

    def f(x, t, r):
        return model(x, t, labels, r=r)

    _, tangent = torch.func.jvp(f, (x, t, r), (dx, torch.ones_like(t), torch.zeros_like(r)))
    h = 1e-5
    fd = (f(x + h * dx, t + h, r) - f(x - h * dx, t - h, r)) / (2 * h)
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-6 * fd.abs().max().item())
    out, logvar = model(x, t, labels, r=r, return_logvar=True)
    assert logvar.shape == (2, 1) and torch.equal(out, f(x, t, r))
    out, features, logvar = model(x, t, labels, r=r, feature_indices={1}, return_logvar=True)
    assert features[0].shape == (2, 32, 4, 4)
    with pytest.raises(ValueError, match="logvar_head=True"):
        dit.DiT(dit.CONFIGS[name])(x.float(), t, labels, return_logvar=True)


def test_from_pretrained_adds_zero_method_heads(tmp_path, capsys):
    """A released network loaded with r_timestep and logvar_head: the heads it lacks start at zero, so its output
    is the released one whatever r is; a file with the heads loads them as they are."""
    weights, t = load_fixture("dit_tiny")
    torch.save(weights, tmp_path / "tiny.pt")
    model = dit.from_pretrained(str(tmp_path / "tiny.pt"), config="tiny", dtype=torch.float64, r_timestep=True, time_cond_type="diff", logvar_head=True)  # fmt: skip
    assert "added r input (zero-initialised), logvar head (zero-initialised)" in capsys.readouterr().out
    x, steps, labels = t["input.x"].double(), t["input.t"].double(), t["input.labels"]
    with torch.no_grad():
        out, logvar = model(x, steps, labels, r=steps / 2, return_logvar=True)
    # The official float64 output, bound F64_BOUND (see the parity tests): the zero heads add nothing.
    assert relative_error(out, t["output.forward.f64"]) < F64_BOUND
    assert torch.equal(logvar, torch.zeros(len(x), 1, dtype=torch.float64))
    assert model.r_embedder.mlp[0].weight.std() > 0.01  # the first layer is live, so the r path trains

    trained = perturbed(model)
    save_file(trained.state_dict(), str(tmp_path / "trained.safetensors"), metadata={"config": dit.config_to_json(trained.cfg)})  # fmt: skip
    again = dit.from_pretrained(str(tmp_path / "trained.safetensors"), dtype=torch.float64)
    assert again.cfg.r_timestep and all(torch.equal(again.state_dict()[k], v) for k, v in trained.state_dict().items())


# ----------------------------------------------------------------------------
# Samplers


@pytest.mark.parametrize("name", ["dit", "sit"])
def test_samplers_run(name):
    model, t = fixture_model(name)
    noise, labels = t["input.noise"], t["input.labels"]
    g = torch.Generator().manual_seed(0)
    runs = [
        dit.sample_student(model, noise, labels, steps=2, generator=g),
        dit.sample_student(model, noise, labels, steps=1, guidance=2.0),
        dit.sample_euler(model, noise, labels, steps=3, guidance=2.0),
    ]
    if name == "dit":
        runs += [dit.sample_ddpm(model, noise, labels, steps=3, guidance=2.0), dit.sample_ddim(model, noise, steps=3)]
    else:
        runs += [dit.sample_heun(model, noise, labels, steps=3, guidance=2.0)]
        with pytest.raises(ValueError, match="needs a DiT"):
            dit.sample_ddim(model, noise, labels)
    for x in runs:
        assert x.shape == noise.shape and x.isfinite().all()


def test_flow_samplers_on_exact_flows():
    """Point data mu: the exact flow (x_t - mu) / t is constant along each straight path, so Euler and the student
    sampler land on mu. Gaussian data N(0, s^2): the ODE scales x_1 by s; Heun's error falls 4x per doubling of steps
    (2nd order), Euler's 2x."""
    model = dit.DiT(dit.CONFIGS["tiny-sit"]).eval()
    noise, mu, s = torch.randn(2, 4, 8, 8), 0.3, 0.5

    def point(x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return ((x.double() - mu) / t).float()

    model.forward = point
    assert torch.allclose(dit.sample_euler(model, noise, steps=4), torch.full_like(noise, mu), atol=1e-5)
    assert torch.allclose(dit.sample_student(model, noise, steps=2), torch.full_like(noise, mu), atol=1e-5)

    def gaussian(x, t, class_labels=None):  # flow = E[eps | x_t] - E[x0 | x_t]
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * x

    model.forward = gaussian
    noise = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    heun = [abs(dit.sample_heun(model, noise, steps=n).item() - s) for n in (16, 32, 64)]
    euler = [abs(dit.sample_euler(model, noise, steps=n).item() - s) for n in (16, 32, 64)]
    assert heun[-1] < 1e-4
    assert all(3.5 < a / b < 4.5 for a, b in zip(heun, heun[1:]))
    assert all(1.7 < a / b < 2.3 for a, b in zip(euler, euler[1:]))


# ----------------------------------------------------------------------------
# Loading


def test_from_pretrained_reads_an_official_pt(tmp_path, monkeypatch):
    weights, t = load_fixture("dit_tiny")
    torch.save(weights, tmp_path / "tiny.pt")  # the release format: a plain state dict
    model = dit.from_pretrained(str(tmp_path / "tiny.pt"), config="tiny", dtype=torch.float64)
    with torch.no_grad():
        out = model(t["input.x"].double(), t["input.t"].double(), t["input.labels"])
    assert relative_error(out, t["output.forward.f64"]) < F64_BOUND  # the official float64 output (parity tests)

    # By released name, under the checkpoint root.
    monkeypatch.setitem(dit.CONFIGS, "tiny-release", replace(dit.CONFIGS["tiny"], file="imagenet-256/tiny.pt"))
    os.makedirs(tmp_path / "imagenet-256")
    torch.save(weights, tmp_path / "imagenet-256" / "tiny.pt")
    assert dit.from_pretrained("tiny-release", root=str(tmp_path)).cfg.depth == 2
    # A file named after a config needs no config argument; safetensors work the same way.
    save_file(weights, str(tmp_path / "tiny-sit.safetensors"))
    assert dit.from_pretrained(str(tmp_path / "tiny-sit.safetensors")).cfg.schedule == "rf"

    with pytest.raises(FileNotFoundError, match="python download.py DiT-XL-2-256x256"):
        dit.from_pretrained("DiT-XL-2-256x256", root=str(tmp_path))
    torch.save(weights, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="pass config=NAME"):  # DiT and SiT have the same keys: no guessing
        dit.from_pretrained(str(tmp_path / "weights.pt"))


def test_from_pretrained_names_mismatched_keys(tmp_path):
    weights, _ = load_fixture("dit_tiny")
    weights.pop("blocks.1.attn.qkv.bias")
    weights["blocks.2.attn.qkv.bias"] = torch.zeros(96)
    weights["y_embedder.embedding_table.weight"] = weights["y_embedder.embedding_table.weight"][:10]  # no null row
    torch.save(weights, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as error:
        dit.from_pretrained(str(tmp_path / "bad.pt"), config="tiny")
    message = str(error.value)
    assert "missing:    blocks.1.attn.qkv.bias (96,)" in message
    assert "unexpected: blocks.2.attn.qkv.bias (96,)" in message
    assert "shape:      y_embedder.embedding_table.weight checkpoint (10, 32) != model (11, 32)" in message


class Payload:
    """Anything but tensors and containers must not unpickle."""


def test_from_pretrained_refuses_pickled_objects(tmp_path):
    weights, _ = load_fixture("dit_tiny")
    torch.save({**weights, "extra": Payload()}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="weights_only"):
        dit.from_pretrained(str(tmp_path / "objects.pt"), config="tiny")


def test_smoke_test_runs():
    result = subprocess.run([sys.executable, "models/dit.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tiny: 51,168 parameters" in result.stdout and "tiny-sit" in result.stdout
