"""train_edm.py's parts that reproduce FastGen's experiment setups (issue 13): TCM continuing ECT's gap schedule from
the stage-one step, MeanFlow's training-time guidance (Eq. 19) against an independent computation in rectified-flow
time, EDM's augmentation pipeline and its labels, EDM2's dropout resolutions, approximate R1 in FastGen's form; and
train_flux.py's fake score in the network's native prediction type."""

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import train_edm
import train_flux
from models import edm, edm2, sdxl


def args_for(method, *flags, **kw):
    parser = train_edm.parser
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    try:
        args = train_edm.parse_args(["--method", method, *flags])
    finally:
        parser.set_defaults(**defaults)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def tiny_edm(**overrides):
    torch.manual_seed(0)
    return edm.EDMPrecond(replace(edm.CONFIGS["tiny"], **overrides)).eval()


# ----------------------------------------------------------------------------
# TCM: stage two continues the consistency schedule where stage one stopped


def test_tcm_starts_at_the_stage_one_ratio(tmp_path, capsys):
    stage1 = str(tmp_path / "student.safetensors")
    save_file({"w": torch.zeros(1)}, stage1, metadata={"step": "350000"})
    args = args_for("tcm", stage1=stage1, ct_kimg_per_stage=1000, batch_size=1024)
    args.ct_start_step = train_edm.stage_one_step(args)
    assert args.ct_start_step == 350_000
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    net = tiny_edm(label_dim=0).train()
    torch.manual_seed(2)
    _, logs = train_edm.tcm_loss(net, net, net, None, x0, None, 0, args, edm)
    assert logs["ratio"] == train_edm.ct_ratio(350_000, args) == args.ct_ratio_limit  # ECT's ratio at stage one's end
    assert logs["ratio"] != train_edm.ct_ratio(0, args)  # not restarted at 0.5
    # The flag overrides the checkpoint; a checkpoint without a step is an error that names the flag.
    assert train_edm.stage_one_step(args_for("tcm", "--ct_start_step", "7", stage1=stage1)) == 7
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(SystemExit) as e:
        train_edm.stage_one_step(args_for("tcm", stage1=str(tmp_path / "bare.safetensors")))
    assert e.value.code == 2 and "--ct_start_step" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# MeanFlow's training-time guidance


def rf_guided_target(net, x0, eps, sigma, labels, w, kappa, t_start, t_end):
    """MeanFlow Eq. 19 computed in rectified-flow time, as FastGen does, then expressed in EDM's noise levels.

    rf: x = (1 - t) x0 + t eps, v = eps - x0, the network's instantaneous flow u(x, t) = (x - D) / t; guided
    v~ = w v + (1 - w - kappa) u(none) + kappa u(c) for t in [t_start, t_end] (else v). EDM: x = x0 + sigma eps
    with t = sigma / (1 + sigma), x_rf = x / (1 + sigma), and dx/dsigma = (v_rf + x) / (1 + sigma)."""
    b = lambda v: v.reshape(-1, 1, 1, 1)
    t = sigma / (1 + sigma)
    x = x0.double() + b(sigma) * eps.double()
    x_rf = x / b(1 + sigma)
    with torch.no_grad():
        d_none = net(x.float(), sigma, None, r=sigma).double()
        d_cond = net(x.float(), sigma, labels, r=sigma).double()
    u_none, u_cond = (x_rf - d_none) / b(t), (x_rf - d_cond) / b(t)
    v = eps.double() - x0.double()
    inside = b((t >= t_start) & (t <= t_end))
    guided = torch.where(inside, w * v + (1 - w - kappa) * u_none + kappa * u_cond, v)
    return (guided + x) / b(1 + sigma)


@pytest.mark.parametrize("w, kappa", [(0.2, 0.92), (1.0, 0.5), (2.0, None)])
def test_meanflow_guided_target_is_eq19(w, kappa):
    net = tiny_edm(r_timestep=True)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.2, 1.0, 2.5, 3.5, 9.0, 40.0], dtype=torch.float64)  # rf t from 0.17 to 0.98
    labels = torch.tensor([0, 3, 5, 7, 9, 1])
    args = args_for("meanflow", mf_guidance=w, mf_kappa=kappa, mf_cond_dropout=0.3, mf_t_start=0.1, mf_t_end=0.75)
    x_t = (x0.double() + sigma.reshape(-1, 1, 1, 1) * eps.double()).float()
    torch.manual_seed(4)
    target, cond = train_edm.meanflow_guidance(net, x_t, sigma, eps, labels, args)

    torch.manual_seed(4)
    dropped = int((torch.rand(6) < 0.3).sum())
    # Without a mixture, u_none + w (v - u_none) is the same formula with kappa = 0.
    expected = rf_guided_target(net, x0, eps, sigma, labels, w, 0.0 if kappa is None else kappa, 0.1, 0.75)
    expected[:dropped] = eps[:dropped].double()  # the first samples train unconditionally on the plain velocity
    assert torch.allclose(target.double(), expected, atol=1e-5)
    assert torch.equal(cond[:dropped], torch.zeros(dropped, 10))
    assert torch.equal(cond[dropped:].argmax(dim=1), labels[dropped:])
    assert not net.training  # the guidance passes ran in eval mode and left the mode as found


def test_meanflow_with_unit_guidance_and_no_dropout_is_the_unguided_loss():
    net = tiny_edm(r_timestep=True)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 2, 3, 4])
    losses = []
    for extra in ({}, {"mf_guidance": 1.0}):
        args = args_for("meanflow", jvp="fd", **extra)
        torch.manual_seed(6)
        losses.append(train_edm.meanflow_loss(net, net, None, x0, labels, 0, args, edm)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_sit_presets_carry_fastgen_meanflow_guidance():
    for name, w, kappa, t_end in (("meanflow-sit-b", None, 0.5, 1.0), ("meanflow-sit-xl", 0.2, 0.92, 0.75)):
        args = args_for("meanflow", "--preset", name)
        assert (args.mf_guidance, args.mf_kappa, args.mf_t_end, args.mf_cond_dropout) == (w, kappa, t_end, 0.1)
        assert math.isclose((w or 1.0) / (1 - kappa), 2.0 if name.endswith("-b") else 2.5)  # MeanFlow's effective w


# ----------------------------------------------------------------------------
# EDM's augmentation


def images(n=6, seed=7):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_augment_with_p_zero_is_the_identity():
    x = images()
    names = "yflip,scale,rotate_frac,aniso,translate_frac,brightness,contrast,lumaflip,hue,saturation"
    y, labels = train_edm.augment_pipe(x, names, 0.0, torch.Generator().manual_seed(1))
    assert labels.shape == (6, train_edm.augment_dim(names)) == (6, 14)
    assert torch.allclose(y, x, atol=1e-6) and not labels.any()
    assert train_edm.augment_dim("xflip,scale,aniso,translate_frac") == 6  # FastGen's MeanFlow CIFAR-10 pipe
    assert train_edm.augment_dim("scale,rotate_frac,brightness,contrast,lumaflip,hue,saturation") == 9  # its SFT pipe


def test_flips_are_labelled_and_invertible():
    x = images()
    y, labels = train_edm.augment_pipe(x, "xflip", 0.0, torch.Generator().manual_seed(2))  # xflip: every image
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < len(x)
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])
    assert torch.equal(torch.where(flipped.reshape(-1, 1, 1, 1), y.flip(3), y), x)


def test_colour_labels_encode_invertible_transforms():
    x = images()
    luma = torch.ones(3, dtype=torch.float64) / math.sqrt(3)
    P = torch.outer(luma, luma)  # projection on the luma axis
    cases = {
        "brightness": lambda w: (torch.eye(3, dtype=torch.float64), 0.2 * w[0] * torch.ones(3, dtype=torch.float64)),
        "contrast": lambda w: (2 ** (0.5 * w[0]) * torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)),
        "lumaflip": lambda w: (torch.eye(3, dtype=torch.float64) - 2 * w[0] * P, torch.zeros(3, dtype=torch.float64)),
        "saturation": lambda w: (P + (torch.eye(3, dtype=torch.float64) - P) * 2 ** w[0], torch.zeros(3, dtype=torch.float64)),
    }  # fmt: skip
    for name, matrix in cases.items():
        y, labels = train_edm.augment_pipe(x, name, 1.0, torch.Generator().manual_seed(3))
        for i in range(len(x)):
            A, b = matrix(labels[i].double())
            recovered = torch.linalg.solve(A, y[i].double().reshape(3, -1) - b[:, None]).reshape(3, 16, 16)
            assert torch.allclose(recovered, x[i].double(), atol=1e-4), name
    # Hue: a rotation about the luma axis by the angle in the label; it keeps the luma and the chroma's length.
    y, labels = train_edm.augment_pipe(x, "hue", 1.0, torch.Generator().manual_seed(4))
    angle = torch.atan2(labels[:, 1], labels[:, 0] + 1).double()
    assert angle.abs().max() > 0.1
    flat_x, flat_y = x.double().reshape(6, 3, -1), y.double().reshape(6, 3, -1)
    assert torch.allclose(luma @ flat_x, luma @ flat_y, atol=1e-5)
    assert torch.allclose((flat_x - P @ flat_x).norm(dim=1), (flat_y - P @ flat_y).norm(dim=1), atol=1e-4)


def test_geometric_transforms_stay_in_range_and_zero_labels_change_nothing():
    x = images()
    y, labels = train_edm.augment_pipe(
        x, "scale,rotate_frac,aniso,translate_frac", 1.0, torch.Generator().manual_seed(5)
    )
    assert labels.abs().sum(dim=1).min() > 0 and not torch.allclose(y, x)
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5  # bilinear, reflected borders: no new values
    y2, lab = train_edm.augment_pipe(x, "translate_frac", 0.0, torch.Generator().manual_seed(6))
    assert torch.allclose(y2, x, atol=1e-6) and not lab.any()


def test_networks_take_the_labels_and_narrow_labels_are_zero_padded():
    assert all(edm.CONFIGS[n].augment_dim == 9 for n in edm.CONFIGS if n.startswith("edm-cifar10"))
    net = tiny_edm(augment_dim=9)
    assert "model.map_augment.weight" in net.state_dict()  # the released CIFAR-10 checkpoints' key
    with torch.no_grad():  # random weights everywhere (EDM zero-initialises the output layer)
        for param in net.parameters():
            param.normal_(0, 0.2)
    x, t = images(2)[:, :, :8, :8], torch.tensor([1.0, 2.0])
    labels = torch.randn(2, 6)
    hook = train_edm.AugmentLabels()
    hook.attach(net)
    with torch.no_grad():
        plain = net(x, t)
        with hook.given(labels):
            hooked = net(x, t)
        padded = net(x, t, augment_labels=torch.cat([labels, torch.zeros(2, 3)], dim=1))
        after = net(x, t)
    assert torch.equal(hooked, padded) and not torch.allclose(hooked, plain) and torch.equal(after, plain)


def test_fastgen_augmentation_presets():
    sft = args_for("sft", "--preset", "sft-cifar10")
    assert (sft.augment_p, sft.xflip, train_edm.augment_dim(sft.augment)) == (0.12, True, 9)
    mf = args_for("meanflow", "--preset", "meanflow-cifar10")
    assert (mf.augment, mf.augment_p, mf.xflip) == ("xflip,scale,aniso,translate_frac", 0.12, True)


# ----------------------------------------------------------------------------
# EDM2 dropout resolutions, approximate R1, the fake score's space


def test_edm2_dropout_acts_at_the_given_resolutions_only(capsys):
    args = args_for("cm", "--preset", "cm-imagenet64-edm2")
    overrides = train_edm.dropout_resolutions(args)
    assert overrides == {"dropout_resolutions": (16, 8)}
    net = edm2.EDM2Precond(replace(edm2.CONFIGS["tiny"], dropout=0.4, **overrides | {"dropout_resolutions": (4,)}))
    rates = {m.dropout for name, m in net.named_modules() if hasattr(m, "dropout") and "4x4" in name}
    assert rates == {0.4}
    assert {m.dropout for name, m in net.named_modules() if hasattr(m, "dropout") and "8x8" in name} == {0.0}
    with pytest.raises(SystemExit) as e:  # refused as the flags are parsed, before anything loads
        train_edm.dropout_resolutions(args_for("cm", "--dropout_resolutions", "16"))
    assert e.value.code == 2 and "--model edm2" in capsys.readouterr().err


class Probe(torch.nn.Module):
    """GAN-head stand-in: records the teacher inputs, logits from their mean."""

    def __init__(self):
        super().__init__()
        self.indices, self.seen = (0,), []
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, maps):
        return maps[0].mean(dim=(1, 2, 3)).reshape(-1, 1) + self.bias


def test_approximate_r1_perturbs_the_clean_real_sample_at_t_real():
    """FastGen's form (dmd2.py): the teacher sees x0 + alpha n at t_real, against the noised real x0 + t_real eps."""

    class Teacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.calls = edm.CONFIGS["tiny"], []

        def forward(self, x, t, labels=None, **kw):
            return x

        def features(self, x, t, labels=None, indices=(0,)):
            self.calls.append((x.clone(), torch.as_tensor(t).clone()))
            return [x]

    teacher, student = Teacher(), Teacher()
    args = args_for("dmd2", r1_weight=100.0, r1_alpha=0.1, student_steps=1)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(9)
    _, logs = train_edm.dmd2_critic_loss(student, teacher, student, Probe(), x0, None, args, edm)
    (_, t_fake), (x_real, t_real), (x_pert, t_pert) = teacher.calls
    assert torch.equal(t_pert, t_real)
    assert (x_pert - x0).std() < 0.2  # clean plus 0.1 n ...
    assert (x_real - x0).std() > (x_pert - x0).std()  # ... while the real branch is noised to t_real
    assert "gan_loss_r1" in logs


def test_sdxl_fake_score_learns_in_eps_space():
    args = train_flux.parse_args(["--preset", "dmd2-sdxl"])
    train_flux.parser.set_defaults(**{a.dest: a.default for a in train_flux.parser._actions if a.dest != "help"})
    assert args.fake_score_pred_type == "native"
    g = torch.Generator().manual_seed(10)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([200.0, 700.0], dtype=torch.float64)
    x_t = train_flux.noised(sdxl, x0, eps, t)
    fake = lambda x, tt, **cond: torch.zeros_like(x)  # predicts eps = 0
    loss = train_flux.fake_score_loss(fake, x_t, x0, t, {}, args, sdxl)
    assert torch.allclose(loss, eps.square().mean(), rtol=1e-4)  # ||0 - eps||^2
    args.fake_score_pred_type = "x0"
    loss_x0 = train_flux.fake_score_loss(fake, x_t, x0, t, {}, args, sdxl)
    x0_of_zero = sdxl.to_x0(x_t, torch.zeros_like(x_t), t, "eps")
    assert torch.allclose(loss_x0, (x0_of_zero.float() - x0).square().mean(), rtol=1e-4)
