"""Classifier-free guidance where train_edm.py's losses use it, with a teacher whose output depends on the label (so
that guidance changes the target). Guidance in x0 space is D_w = D(x | c) + (w - 1) (D(x | c) - D(x)); sCM applies it
to the TrigFlow output F and MeanFlow to the velocity, both affine in D with the same coefficients for the two
calls, so every method must give the same loss with guidance w as with an unguided teacher that returns D_w. The
check replays each loss twice on the same draws: teacher + guidance w, and the guided wrapper below + guidance 1."""

import pytest
import torch
from test_train_edm import GaussDenoiser, args_for

import train_edm
from models import edm


class LabelDenoiser(GaussDenoiser):
    """GaussDenoiser plus a label-dependent shift (label None = unconditional), with one 'feature map' (its input)
    for the GAN heads."""

    def forward(self, x, t, labels=None, r=None, return_logvar=False, feature_indices=()):
        out = super().forward(x, t, labels, r, return_logvar)
        if labels is not None:
            shift = (0.2 * (labels.double() + 1) - 0.5).reshape(-1, 1, 1, 1).to(x.dtype)
            out = (out[0] + shift, out[1]) if return_logvar else out + shift
        return (out, [x.float()]) if feature_indices else out


class Guided(torch.nn.Module):
    """The teacher with guidance w applied to its output, written independently of train_edm.py."""

    def __init__(self, teacher, w):
        super().__init__()
        self.teacher, self.w = teacher, w

    def forward(self, x, t, labels=None, feature_indices=(), **kw):
        out = self.teacher(x, t, labels, feature_indices=feature_indices, **kw)
        if labels is None:
            return out
        cond, features = (out[0], out[1]) if feature_indices else (out, None)
        uncond = self.teacher(x, t, None, **kw)
        if kw.get("return_logvar"):  # the logvar head is the conditional one
            guided = (cond[0] + (self.w - 1) * (cond[0] - uncond[0]), cond[1])
        else:
            guided = cond + (self.w - 1) * (cond - uncond)
        return (guided, features) if feature_indices else guided


LABELS = torch.tensor([0, 3, 1, 2])


def replay(loss_fn, seed=3):
    torch.manual_seed(seed)
    loss, _ = loss_fn()
    return loss.detach().double()


def losses(method, w, **kw):
    """(loss with the teacher and guidance w, loss with Guided(teacher, w) and guidance 1, loss without guidance)."""
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    student, teacher = LabelDenoiser(), LabelDenoiser()
    student.scale.data.fill_(0.8)

    def run(t, guidance):
        args = args_for(method, cd=True, guidance=guidance, **kw)
        if method == "cm":
            return lambda: train_edm.cm_loss(student, student, t, x0, LABELS, 0, args, edm)
        if method == "scm":
            return lambda: train_edm.scm_loss(student, student, t, x0, LABELS, 5, args, edm)
        if method == "meanflow":
            return lambda: train_edm.meanflow_loss(student, student, t, x0, LABELS, 0, args, edm)
        fake = LabelDenoiser()
        fake.scale.data.fill_(0.7)
        torch.manual_seed(0)
        disc = train_edm.Discriminator([0], [(3, 4)]) if args.gan_weight else None
        return lambda: train_edm.dmd2_generator_loss(student, t, fake, disc, x0, LABELS, args, edm)

    return replay(run(teacher, w)), replay(run(Guided(teacher, w), 1.0)), replay(run(teacher, 1.0))


@pytest.mark.parametrize(
    "method, kw",
    [
        ("cm", dict(huber_c=0.01)),
        ("scm", dict(tangent_warmup_steps=10)),
        ("meanflow", dict()),
        ("dmd2", dict(t_sampler="polynomial", gan_weight=0.0, student_steps=1)),
        ("dmd2", dict(t_sampler="polynomial", gan_weight=0.3, student_steps=1)),
    ],
)
@pytest.mark.parametrize("w", [2.0, 4.5])
def test_guided_loss_is_the_loss_of_the_guided_teacher(method, kw, w):
    guided, reference, unguided = losses(method, w, **kw)
    assert torch.allclose(guided, reference, rtol=1e-5, atol=1e-9), (guided, reference)
    assert not torch.allclose(guided, unguided, rtol=1e-3), "guidance changed nothing: the test would not see it"


def test_teacher_x0_is_classifier_free_guidance():
    teacher = LabelDenoiser()
    x, t = torch.randn(4, 3, 4, 4), torch.tensor([0.5, 1.0, 2.0, 10.0])
    cond, uncond = teacher(x, t, LABELS), teacher(x, t, None)
    for w in (1.0, 1.5, 3.0):
        expected = cond + (w - 1) * (cond - uncond)
        assert torch.allclose(train_edm.teacher_x0(teacher, x, t, LABELS, w), expected, rtol=1e-6)
    assert torch.equal(train_edm.teacher_x0(teacher, x, t, None, 3.0), uncond)  # no label: nothing to guide
