"""train_wan_causal.py's GAN term for causvid and self_forcing (FastGen's Wan CausVid / Self-Forcing configs, DMD2
Sec. 4.3): the logistic losses against their equations written out here, the generator's GAN gradient through the
frozen teacher into the student, the critic's heads on noised real and fake clips, and tiny runs that resume exactly."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_wan_causal as twc
from models import wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = wan.CONFIGS["tiny"]
T_LIST = list(wan.SELF_FORCING_T_LIST)
WIDTH = CFG.inner_dim // 4  # the tiny teacher's block features: (B, 6, F, H, W)


def args_for(method, *flags):
    return twc.parse_args(["--method", method, "--tiny", *flags])


def tiny_wan(seed):
    torch.manual_seed(seed)
    return wan.WanModel(CFG).eval()


def heads(seed=7, blocks=(0, 1)):
    torch.manual_seed(seed)
    return twc.Discriminator(blocks, [WIDTH] * len(blocks))


def clips(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 7, 4, 4, generator=g), torch.randn(B, 9, 32, generator=g)


def neg_log_sigmoid(x):
    return -torch.log(torch.sigmoid(x.double()))


def test_gan_losses_are_the_non_saturating_logistic_losses():
    """Generator -E log sigmoid(D(fake)); heads -E log(1 - sigmoid(D(fake))) - E log sigmoid(D(real)), over clips and
    heads (methods.md §4)."""
    fake = torch.tensor([[0.3, -1.2, 2.0], [-0.5, 0.0, 4.0]])
    real = torch.tensor([[1.5, 0.1, -2.5], [0.7, -0.2, 3.0]])
    assert twc.gan_generator_loss(fake).item() == pytest.approx(neg_log_sigmoid(fake).mean().item(), rel=1e-6)
    expected = -torch.log(1 - torch.sigmoid(fake.double())).mean() + neg_log_sigmoid(real).mean()
    assert twc.gan_discriminator_loss(fake, real).item() == pytest.approx(expected.item(), rel=1e-6)
    assert twc.gan_generator_loss(torch.zeros(2, 3)).item() == pytest.approx(0.6931471805599453, rel=1e-6)  # log 2


def test_generator_loss_adds_the_gan_term_through_the_teacher():
    """VSD (CFG'd teacher x0, fake score x0) + gan_weight E softplus(-D(teacher features of x_t)), where
    x_t = (1 - t) g + t eps keeps g's graph: the loss's value and its gradient with respect to g, written out."""
    args = args_for("causvid", "--guidance", "3", "--gan_weight", "0.5")
    teacher, fake = tiny_wan(0).requires_grad_(False), tiny_wan(1)  # the frozen teacher, as in the script
    disc = heads().requires_grad_(False)  # frozen in generator steps
    g0, text = clips(seed=2)
    neg = torch.randn(1, 9, 32).expand_as(text)
    g = g0.clone().requires_grad_()
    torch.manual_seed(9)
    loss, logs = twc.dmd_generator_loss(g, teacher, fake, text, neg, args, disc=disc)
    loss.backward()

    ref = g0.clone().requires_grad_()
    torch.manual_seed(9)
    t = wan.sample_t(2, "shifted", 5.0, t_min=0.001, t_max=0.999)
    eps = torch.randn_like(ref)
    tb = t.reshape(-1, 1, 1, 1, 1)
    x_t = ((1 - tb) * ref.double() + tb * eps.double()).float()
    flow, features = teacher(x_t, t, text, feature_indices=(0, 1))
    gan = neg_log_sigmoid(disc(features)).mean()
    with torch.no_grad():
        x_c = x_t.double() - tb * flow.double()
        x_u = x_t.double() - tb * teacher(x_t, t, neg).double()
        x_f = x_t.double() - tb * fake(x_t, t, text).double()
        x_teacher = x_c + 2 * (x_c - x_u)
        w = 1 / ((ref.double() - x_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
        target = ref.double() - w * (x_f - x_teacher)
    vsd = 0.5 * (ref.double() - target).square().mean()
    (vsd + 0.5 * gan).backward()
    assert logs["gan_loss_gen"] == pytest.approx(gan.item(), rel=1e-5)
    assert loss.item() == pytest.approx((vsd + 0.5 * gan).item(), rel=1e-4)
    assert torch.allclose(g.grad.double(), ref.grad.double(), rtol=1e-3, atol=1e-9)
    gan_part = ref.grad.double() - (w * (x_f - x_teacher) / ref.numel())  # what the GAN term adds to the VSD gradient
    assert gan_part.abs().sum() > 0.05 * ref.grad.abs().sum()
    assert all(p.grad is None for p in disc.parameters())


@pytest.mark.parametrize("method", ["causvid", "self_forcing"])
def test_the_gan_gradient_reaches_the_student(method):
    """With the fake score equal to the teacher and no CFG the VSD gradient is exactly zero, so every gradient the
    student gets is the GAN term's: gan_weight d/dtheta E softplus(-D(T_features((1 - t) G_theta + t eps)))."""
    args = args_for(method, "--guidance", "1", "--gan_weight", "0.25")
    teacher, fake, disc = tiny_wan(0).requires_grad_(False), tiny_wan(0), heads().requires_grad_(False)
    x0, text = clips(seed=3)

    def student_sample(student):
        if method == "causvid":
            return twc.diffusion_forcing_sample(student, x0, text, args)
        return twc.rollout(student, torch.randn_like(x0), text, T_LIST, 2, [1, 1, 1])

    student = tiny_wan(2).train()
    torch.manual_seed(4)
    g = student_sample(student)
    loss, _ = twc.dmd_generator_loss(g, teacher, fake, text, text, args, disc=disc)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    assert grads and sum(v.abs().sum() for v in grads.values()) > 0

    ref = tiny_wan(2).train()  # the same student, its gradient written out
    torch.manual_seed(4)
    g = student_sample(ref)
    t = wan.sample_t(2, "shifted", 5.0, t_min=0.001, t_max=0.999)
    tb = t.reshape(-1, 1, 1, 1, 1)
    x_t = ((1 - tb) * g.double() + tb * torch.randn_like(g).double()).float()
    (0.25 * neg_log_sigmoid(disc(teacher(x_t, t, text, feature_indices=(0, 1), features_only=True))).mean()).backward()  # fmt: skip
    for k, p in ref.named_parameters():
        assert (p.grad is None) == (k not in grads), k
        if p.grad is not None:
            assert torch.allclose(grads[k].double(), p.grad.double(), rtol=1e-3, atol=1e-8), k


@pytest.mark.parametrize("same", [True, False])
def test_critic_loss_is_x0_dsm_plus_the_heads_loss(same):
    """Fake score x0 DSM on g at (t, eps), plus E softplus(D(fake)) + E softplus(-D(real)) on the no-grad teacher
    features of x_t and of x_real = (1 - t') x0_real + t' eps', (t', eps') = (t, eps) or fresh draws after them."""
    args = args_for("self_forcing", "--gan_weight", "0.1", "--gan_same_t_noise" if same else "--no-gan_same_t_noise")
    teacher, fake, disc = tiny_wan(0).requires_grad_(False), tiny_wan(1), heads()
    g, text = clips(seed=5)
    x0_real, _ = clips(seed=6)
    torch.manual_seed(11)
    loss, logs = twc.critic_loss(fake, g, text, args, teacher=teacher, disc=disc, x0_real=x0_real)
    loss.backward()

    torch.manual_seed(11)
    t = wan.sample_t(2, "shifted", 5.0, t_min=0.001, t_max=0.999)
    eps = torch.randn_like(g)
    t_real, eps_real = (t, eps) if same else (wan.sample_t(2, "shifted", 5.0, t_min=0.001, t_max=0.999), torch.randn_like(g))  # fmt: skip
    noised = lambda x, s, e: ((1 - s.reshape(-1, 1, 1, 1, 1)) * x.double() + s.reshape(-1, 1, 1, 1, 1) * e.double()).float()  # noqa: E731  # fmt: skip
    x_t, x_real = noised(g, t, eps), noised(x0_real, t_real, eps_real)
    with torch.no_grad():
        dsm = (x_t.double() - t.reshape(-1, 1, 1, 1, 1) * fake(x_t, t, text).double() - g.double()).square().mean()
        f_fake = teacher(x_t, t, text, feature_indices=(0, 1), features_only=True)
        f_real = teacher(x_real, t_real, text, feature_indices=(0, 1), features_only=True)
        heads_loss = -torch.log(1 - torch.sigmoid(disc(f_fake).double())).mean() + neg_log_sigmoid(disc(f_real)).mean()
    assert logs["fake_score_loss"] == pytest.approx(dsm.item(), rel=1e-4)
    assert logs["gan_loss_disc"] == pytest.approx(heads_loss.item(), rel=1e-4)
    assert loss.item() == pytest.approx((dsm + heads_loss).item(), rel=1e-4)
    # one backward trains both critics
    assert all(p.grad is not None for p in disc.parameters()) and any(p.grad is not None for p in fake.parameters())


# ----------------------------------------------------------------------------
# The script end to end


def run(*flags):
    """The script's main in-process (a tiny run takes a second or two): its exit code."""
    try:
        twc.main(twc.parse_args([*flags, "--num_threads", "1"]))
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("method", ["causvid", "self_forcing"])
def test_gan_run_resumes_exactly(tmp_path, capsys, method):
    """4 steps = 2 steps + --resume 2 steps, bit for bit, for the student, the fake score and the GAN heads (their
    optimizer state included); causvid on the tiny run's toy clips, self_forcing with real clips from --data."""
    common = ["--method", method, "--tiny", "--sample_every", "0", "--student_update_freq", "2", "--gan_weight", "0.1"]
    if method == "self_forcing":
        os.makedirs(tmp_path / "data")
        save_file({"latents": torch.randn(3, 4, 7, 4, 4)}, str(tmp_path / "data" / "part0.safetensors"), metadata={"prompts": json.dumps(["a", "b", "c"])})  # fmt: skip
        common += ["--data", str(tmp_path / "data"), "--disc_blocks", "0,1", "--gan_same_t_noise"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run(*common, "--max_steps", "4", "--save_every", "4", "--out_dir", straight) == 0
    assert run(*common, "--max_steps", "2", "--save_every", "2", "--out_dir", split) == 0
    assert run(*common, "--max_steps", "4", "--save_every", "2", "--out_dir", split, "--resume") == 0
    for name in ("student", "fake_score", "discriminator"):
        a = load_file(os.path.join(straight, "ckpt_0000004", f"{name}.safetensors"))
        b = load_file(os.path.join(split, "ckpt_0000004", f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    records = [json.loads(line) for line in open(os.path.join(split, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("gan_loss_disc" in r for r in records if not r["generator_step"])
    assert all("gan_loss_gen" in r for r in records if r["generator_step"])
    assert all(r["skipped"] == 0 for r in records)
    if method == "causvid":  # other heads are another run
        assert run(*common, "--disc_blocks", "0", "--max_steps", "6", "--out_dir", split, "--resume") == 2
        assert "--disc_blocks" in capsys.readouterr().err
