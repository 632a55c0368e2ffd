"""EDM2: the magnitude-preserving U-Net (S, M, L, XL on ImageNet-64) under EDM preconditioning, with its logvar head.

Paper: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024 (arXiv:2312.02696).
Official code: https://github.com/NVlabs/edm2 (training/networks_edm2.py, commit 4bf8162). Equation numbers below are
the paper's (arXiv version), as the official code cites them.

Checkpoints: the official post-hoc EMA pickles (`edm2-img64-{s,m,l,xl}-*.pkl`) carry their own source code, so
`download.py` converts their `ema` network to safetensors without running any of it (0-dim gains become shape [1]).
Module names here equal the names in those files (`unet.enc.64x64_block0.conv_res0.weight`, ..., `logvar_linear.weight`,
203 keys for every size), so they load strictly. The loss log-variance head u(sigma) (Eq. 21) is part of every released
checkpoint and always present here.

Time convention: t is the noise level sigma (alpha = 1, sigma = t, t in [0.002, 80]); the network predicts x0.

Every weight is normalised at every call (Eq. 47), so `forward` never writes to the weights: it is a pure function that
works under DDP and torch.func.jvp (forward-mode AD). The official code additionally *forces* the stored weights back to
unit norm during training (Eq. 66, done inside its forward in training mode); here that is the plain function
`forced_weight_normalization(model)`, which the training loop calls once before training and after every optimizer step.

Beyond the official network, two switches the training methods turn on (both off for the released checkpoints):
`r_timestep` (a second time input r, MeanFlow) and `precond=False` (raw x_t, raw t and raw output). Label dropout
(`label_dropout`) trains for classifier-free guidance; EDM2 itself guides with a separate small model (autoguidance),
which the samplers here do not do. Left out: resampling filters other than EDM2's [1, 1], the `channel_mult_noise` and
`channel_mult_emb` overrides (unused by released models), fp16 execution flags (use torch.autocast instead).

    model = from_pretrained("edm2-img64-s-fid")                      # after `python download.py edm2-img64-s-fid`
    noise = torch.randn(16, 3, 64, 64)
    images = sample_heun(model, noise, class_labels=torch.arange(16), steps=32)   # in [-1, 1]
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    img_resolution: int = 64  # image side at input and output
    img_channels: int = 3  # colour channels
    label_dim: int = 1000  # number of classes, 0 = unconditional
    model_channels: int = 192  # base channel count: S 192, M 256, L 320, XL 384
    channel_mult: tuple = (1, 2, 3, 4)  # channel multiplier per resolution level
    num_blocks: int = 3  # encoder blocks per resolution level (the decoder has one more)
    attn_resolutions: tuple = (16, 8)  # resolutions with self-attention
    channels_per_head: int = 64  # attention heads = block channels // channels_per_head
    label_balance: float = 0.5  # mp_sum weight of the class embedding against the noise embedding
    concat_balance: float = 0.5  # mp_cat weight of the main path against the skip connection
    res_balance: float = 0.3  # mp_sum weight of the residual branch against the main path
    attn_balance: float = 0.3  # mp_sum weight of self-attention against the main path
    clip_act: float = 256  # clip block outputs to [-clip_act, clip_act] (keeps fp16 finite), 0 = no clipping
    dropout: float = 0.0  # residual-branch dropout in training; official img64 M/L/XL trained with 0.1
    dropout_resolutions: tuple = ()  # where dropout applies, () = everywhere (FastGen's CM/sCM/TCM: 0.4-0.5 at (16, 8))
    label_dropout: float = 0.0  # probability of dropping the class label in training (for guidance)
    sigma_data: float = 0.5  # expected standard deviation of the data
    logvar_channels: int = 128  # Fourier features feeding the loss log-variance head (Eq. 21)
    precond: bool = True  # EDM preconditioning; False feeds raw x_t and t and returns the raw output
    r_timestep: bool = False  # adds a second time input r (MeanFlow): `unet.emb_fourier_r`, `emb_noise_r`, `emb_r_gain`
    url: str = ""  # official checkpoint
    file: str = ""  # where `download.py` writes it, relative to the checkpoint root


_EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"

# fmt: off
CONFIGS = {
    "edm2-img64-s-fid":  Config(model_channels=192, url=_EDM2_URL + "edm2-img64-s-1073741-0.075.pkl", file="imagenet-64/edm2-img64-s-fid.safetensors"),
    "edm2-img64-m-fid":  Config(model_channels=256, url=_EDM2_URL + "edm2-img64-m-2147483-0.060.pkl", file="imagenet-64/edm2-img64-m-fid.safetensors"),
    "edm2-img64-l-fid":  Config(model_channels=320, url=_EDM2_URL + "edm2-img64-l-1073741-0.040.pkl", file="imagenet-64/edm2-img64-l-fid.safetensors"),
    "edm2-img64-xl-fid": Config(model_channels=384, url=_EDM2_URL + "edm2-img64-xl-0671088-0.040.pkl", file="imagenet-64/edm2-img64-xl-fid.safetensors"),
    # channels_per_head=8 so the tiny model has attention (4 heads at 4x4); with 64 it would have none.
    "tiny":              Config(img_resolution=8, label_dim=10, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8),
}
# fmt: on

# ----------------------------------------------------------------------------
# Schedule: alpha(t) = 1, sigma(t) = t (variance exploding), EDM Sec. 2.
# Time math runs in float64 on purpose: sigma spans 0.002..80 and the conversions divide by it.

PRED_TYPE = "x0"
T_MIN, T_MAX, RHO = 0.002, 80.0, 7.0


def alpha(t):
    return torch.ones_like(t)


def sigma(t):
    return t


def alpha_prime(t):
    return torch.zeros_like(t)


def sigma_prime(t):
    return torch.ones_like(t)


def _expand(t, x):
    """Broadcast a per-sample time [B] (or scalar) against x [B, ...], in float64."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def _safe(d, eps=1e-6):
    """Keep a denominator away from zero without changing its sign."""
    return torch.where(d >= 0, d.clamp(min=eps), d.clamp(max=-eps))


def to_x0(x_t, out, t, pred_type):
    """Convert a raw prediction of type `pred_type` at (x_t, t) to an x0 prediction."""
    x, y = x_t.double(), out.double()
    a, s, da, ds = (f(_expand(t, x)) for f in (alpha, sigma, alpha_prime, sigma_prime))
    if pred_type == "x0":
        x0 = y
    elif pred_type == "eps":  # x_t = a x0 + s eps
        x0 = (x - s * y) / _safe(a)
    elif pred_type == "flow":  # flow = dx_t/dt = a' x0 + s' eps
        x0 = (x * ds / _safe(s) - y) / _safe(a * ds / _safe(s) - da)
    elif pred_type == "v":  # v of the variance-preserving rescaling x_t / sqrt(a^2 + s^2) (Salimans & Ho 2022)
        n = (a**2 + s**2).sqrt()
        x0 = (a / n) * (x / n) - (s / n) * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return x0.to(out.dtype)


def from_x0(x_t, x0, t, pred_type):
    """Express an x0 prediction at (x_t, t) as a prediction of type `pred_type`."""
    x, y = x_t.double(), x0.double()
    a, s, da, ds = (f(_expand(t, x)) for f in (alpha, sigma, alpha_prime, sigma_prime))
    eps = (x - a * y) / _safe(s)
    if pred_type == "x0":
        out = y
    elif pred_type == "eps":
        out = eps
    elif pred_type == "flow":
        out = da * y + ds * eps
    elif pred_type == "v":
        n = (a**2 + s**2).sqrt()
        out = (a / n) * eps - (s / n) * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return out.to(x0.dtype)


def convert(x_t, out, t, src, dst):
    """Convert a prediction between the types x0, eps, v and flow (through x0)."""
    return out if src == dst else from_x0(x_t, to_x0(x_t, out, t, src), t, dst)


def karras_sigmas(n=1000, sigma_min=T_MIN, sigma_max=T_MAX, rho=RHO):
    """The EDM noise levels (Eq. 5), n values from sigma_max down to sigma_min, float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def t_list(steps):
    """Default few-step times for students: FastGen's Karras-grid indices 998 -> 2 of 1000, last entry 0.

    1 step: [79.56, 0]; 2 steps: [79.56, 2.53, 0]; 4 steps: [79.56, 17.50, 2.53, 0.17, 0].
    """
    grid = karras_sigmas().flip(0)  # ascending
    times = grid[torch.linspace(998, 2, steps + 1, dtype=torch.float64).long()]
    times[-1] = 0.0
    return times


def sample_t(
    n, kind="polynomial", p_mean=-1.2, p_std=1.2, t_min=T_MIN, t_max=T_MAX, df=0.01, generator=None, device=None
):
    """Training-time noise levels, float64 [n].

    polynomial: a uniform index into the 1000-level Karras grid (2..998), as DMD2 and FastGen's EDM default.
    lognormal:  ln(t) ~ N(p_mean, p_std^2) truncated to [t_min, t_max] (EDM Sec. 5, by inverse CDF).
    log_t:      ln(t) = p_mean + p_std * T with T Student-t(df), truncated (heavy-tailed, sCM/ECT variants).
    uniform:    t ~ U[t_min, t_max].
    """
    if kind == "polynomial":
        index = torch.randint(2, 999, (n,), generator=generator)
        t = karras_sigmas().flip(0)[index]
    elif kind == "lognormal":
        normal = torch.distributions.Normal(torch.tensor(p_mean, dtype=torch.float64), p_std)
        lo, hi = (
            normal.cdf(torch.tensor(math.log(t_min), dtype=torch.float64)),
            normal.cdf(torch.tensor(math.log(t_max))),
        )
        t = normal.icdf(lo + (hi - lo) * torch.rand(n, dtype=torch.float64, generator=generator)).exp()
    elif kind == "log_t":
        # Exact truncation by rejection: a Student-t draw is a normal over sqrt(chi2_df / df).
        lo, hi = (math.log(t_min) - p_mean) / p_std, (math.log(t_max) - p_mean) / p_std
        kept = torch.empty(0, dtype=torch.float64)
        while kept.numel() < n:
            z = torch.randn(4 * n + 64, dtype=torch.float64, generator=generator)
            g = torch._standard_gamma(torch.full_like(z, df / 2)) * 2  # chi2 with df degrees of freedom
            draw = z / (g / df).sqrt()
            kept = torch.cat([kept, draw[(draw >= lo) & (draw <= hi)]])
        t = (p_mean + p_std * kept[:n]).exp()
    elif kind == "uniform":
        t = t_min + (t_max - t_min) * torch.rand(n, dtype=torch.float64, generator=generator)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; expected polynomial, lognormal, log_t or uniform")
    return t.clamp(t_min, t_max).to(device)


# ----------------------------------------------------------------------------
# Magnitude-preserving layers (EDM2 Sec. 2, Appendix B). Each layer keeps unit-magnitude inputs at unit magnitude,
# so the network needs no normalisation layers, no biases and no careful init.


def _acc_dtype(x):
    """float32 for reductions and the time path (float64 inputs stay float64, for finite-difference tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(x, dim=None, eps=1e-4):
    """x / (eps + rms(x)) over `dim` (default: all but the first): unit magnitude per row, or per pixel with dim=1."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_acc_dtype(x))
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())  # the L2 norm over n elements is sqrt(n) * rms
    return x / norm.to(x.dtype)


def mp_silu(x):
    """SiLU divided by its output magnitude for unit-normal input (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """(1 - t) a + t b rescaled to unit magnitude for independent unit-magnitude a and b (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation whose halves contribute (1 - t) : t to the next layer and keep unit magnitude (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """sqrt(2) cos(f x + p) with fixed random f ~ N(0, (2 pi)^2), p ~ U[0, 2 pi): unit-magnitude features (Eq. 75)."""

    def __init__(self, num_channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)  # persistent: in checkpoints
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):  # x: (B,) float32 or float64
        return (torch.outer(x, self.freqs.to(x.dtype)) + self.phases.to(x.dtype)).cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Convolution (kernel k) or linear layer (kernel 0) without bias whose weight rows are normalised to unit norm at
    every call (Eq. 47), so that the output magnitude equals the input magnitude times `gain`."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        shape = (out_channels, in_channels, kernel, kernel) if kernel else (out_channels, in_channels)
        self.weight = nn.Parameter(torch.randn(shape))

    def forward(self, x, gain=1.0):
        w = self.weight.to(_acc_dtype(x))  # normalise in float32, as the official code, then cast to the input dtype
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # rms 1 per row, divided by sqrt(fan_in): row norm 1
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


@torch.no_grad()
def forced_weight_normalization(model):
    """Forced weight normalisation (EDM2 Sec. 2.3, Eq. 66): rescale every stored MPConv weight row to unit magnitude.

    Call it once before training and after every optimizer step (EDM2 normalises before every training step). With the
    weights kept on the unit sphere, Adam's updates change their direction only, so the effective learning rate is
    the scheduled one and does not decay as the weights grow. The official code does this inside MPConv.forward in
    training mode; here forward stays free of side effects (DDP, torch.func.jvp, several forwards per step) and the
    training loop makes the call explicit. It changes outputs only through the eps of `normalize` (~1e-4 relative for
    rows far from unit magnitude), since MPConv normalises at every call anyway.
    """
    for m in model.modules():
        if isinstance(m, MPConv):
            m.weight.copy_(normalize(m.weight.to(_acc_dtype(m.weight))))


def attention(q, k, v):
    """softmax(q^T k / sqrt(c)) v over [B, N, C, L] tensors, with the scores in float32 (or float64).

    EDM2 pixel-normalises q and k per head before this (cosine attention), so the logits are bounded by sqrt(C).
    Written with plain differentiable ops (no custom autograd.Function, no fused kernel) so that forward-mode AD
    (`torch.func.jvp`, needed by sCM and MeanFlow) and double backward work through it.
    """
    dt = _acc_dtype(q)
    w = torch.einsum("bncq,bnck->bnqk", q.to(dt), k.to(dt) / math.sqrt(k.shape[2])).softmax(dim=3).to(v.dtype)
    return torch.einsum("bnqk,bnck->bncq", w, v)


class Block(nn.Module):
    """EDM2 encoder or decoder block (Fig. 21): optional 2x resampling, a residual branch scaled per channel by the
    embedding, and optional self-attention, all joined by magnitude-preserving sums."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        flavor,
        resample="keep",
        attention=False,
        channels_per_head=64,
        dropout=0.0,
        res_balance=0.3,
        attn_balance=0.3,
        clip_act=256,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.flavor, self.resample = in_channels, out_channels, flavor, resample
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        # Zero gain: the embedding modulation starts switched off (c = 1) and is learned. Shape [1] as FSDP needs
        # (the official 0-dim tensor; download.py converts).
        self.emb_gain = nn.Parameter(torch.zeros(1))
        # The encoder changes the width on the main path before the residual branch, the decoder after it.
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.emb_linear = MPConv(emb_channels, out_channels, 0)
        self.conv_res1 = MPConv(out_channels, out_channels, 3)
        self.conv_skip = MPConv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, 1) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, 1) if self.num_heads else None

    def forward(self, x, emb):
        # EDM2's resampling filter [1, 1] is a 2x2 box: down = average pooling, up = nearest neighbour.
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: the encoder's main path is kept at unit magnitude per pixel

        y = self.conv_res0(mp_silu(x))  # (B, C_out, H, W)
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C_out) per-channel scale, 1 while emb_gain = 0
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            B, C, H, W = x.shape
            # Channel layout of qkv is [head, channel, (q, k, v)], as in the checkpoints.
            qkv = self.attn_qkv(x).reshape(B, self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # pixel norm per head: cosine-similarity attention
            y = attention(q, k, v).reshape(B, C, H, W)  # (B, N, C/N, HW) -> (B, C, H, W)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act) if self.clip_act else x  # NOTE: official clips in place


# ----------------------------------------------------------------------------
# Network


class UNet(nn.Module):
    """The EDM2 U-Net (Fig. 21, config G): magnitude-preserving, no biases, no normalisation layers."""

    def __init__(self, cfg: Config):
        super().__init__()
        cblock = [cfg.model_channels * m for m in cfg.channel_mult]
        cnoise, cemb = cblock[0], max(cblock)  # the official defaults (channel_mult_noise/emb = None)
        self.label_balance, self.concat_balance, self.label_dropout = cfg.label_balance, cfg.concat_balance, cfg.label_dropout  # fmt: skip
        self.out_gain = nn.Parameter(torch.zeros(1))  # zero: the network output F starts at 0, so D(x) = c_skip x

        # Embedding: noise level (and r) -> Fourier features -> linear, mixed with the class embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, 0)
        # MeanFlow's r input as in FastGen (emb_fourier_r, emb_noise_r), plus a gain on the r embedding (see embed).
        self.emb_r_gain = nn.Parameter(torch.ones(1)) if cfg.r_timestep else None
        self.emb_fourier_r = MPFourier(cnoise) if cfg.r_timestep else None
        self.emb_noise_r = MPConv(cnoise, cemb, 0) if cfg.r_timestep else None
        self.emb_label = MPConv(cfg.label_dim, cemb, 0) if cfg.label_dim else None

        def block(res):
            """Block arguments shared by every block at resolution `res`."""
            dropout = cfg.dropout if not cfg.dropout_resolutions or res in cfg.dropout_resolutions else 0.0
            return dict(
                emb_channels=cemb, channels_per_head=cfg.channels_per_head, dropout=dropout,
                res_balance=cfg.res_balance, attn_balance=cfg.attn_balance, clip_act=cfg.clip_act,
            )  # fmt: skip

        # Encoder. ModuleDict order is the execution order and the checkpoint's key order.
        self.enc = nn.ModuleDict()
        cout = cfg.img_channels + 1  # + a constant channel of ones (see forward)
        for level, channels in enumerate(cblock):
            res = cfg.img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, flavor="enc", resample="down", **block(res))
            for idx in range(cfg.num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="enc", attention=res in cfg.attn_resolutions, **block(res))  # fmt: skip
        skips = [b.out_channels for b in self.enc.values()]

        # Decoder: every `block` concatenates one skip, the last encoder output first.
        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = cfg.img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, flavor="dec", attention=True, **block(res))
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, flavor="dec", **block(res))
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, flavor="dec", resample="up", **block(res))
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="dec", attention=res in cfg.attn_resolutions, **block(res))  # fmt: skip
        self.out_conv = MPConv(cout, cfg.img_channels, 3)
        # Feature taps for discriminator heads: the last encoder block of each resolution level.
        self.taps = [f"{cfg.img_resolution >> lv}x{cfg.img_resolution >> lv}_block{cfg.num_blocks - 1}" for lv in range(len(cfg.channel_mult))]  # fmt: skip

    def embed(self, noise_labels, class_labels, r_labels):
        """Embedding (B, E) in float32 (or float64): the official code keeps this path in float32 under fp16 too."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_noise_r is not None:
            # NOTE: FastGen combines the two as mp_sum(emb, emb_r, 0.5). Here the r embedding has a learned gain g and
            # the sum is (emb + g emb_r) / sqrt(1 + g^2): magnitude-preserving for every g, equal to FastGen's at
            # g = 1 (the fresh default), and exactly the r-free network at g = 0 (how a released checkpoint is
            # adapted, see _adapt_heads). r = None means r = t.
            r_emb = self.emb_noise_r(self.emb_fourier_r(noise_labels if r_labels is None else r_labels), gain=self.emb_r_gain)  # fmt: skip
            emb = (emb + r_emb) / (1 + self.emb_r_gain.square()).sqrt().to(emb.dtype)
        elif r_labels is not None:
            raise ValueError("r was given but this model has no r input; build it with Config(r_timestep=True)")
        if self.emb_label is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            # A one-hot vector times sqrt(label_dim) has unit magnitude; all-zero labels (unconditional) give 0.
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x, noise_labels, class_labels, r_labels=None, feature_indices=(), features_only=False):
        emb = self.embed(noise_labels, class_labels, r_labels)  # (B, E)
        # A constant channel of ones: the bias-free first conv can still add a per-channel offset.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, C_img + 1, H, W)
        skips, features = [], []
        for name, block in self.enc.items():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)  # (B, C, r, r)
            skips.append(x)
            if name in self.taps and self.taps.index(name) in feature_indices:
                features.append(x)
                if features_only and len(features) == len(feature_indices):
                    break  # early exit: the rest of the encoder and the decoder are not needed
        if features_only:
            return None, features
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain), features  # (B, C_img, H, W)


class EDM2Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM Eq. 7, Table 1) around the EDM2 U-Net, plus the loss
    log-variance u(sigma) = logvar_linear(logvar_fourier(c_noise)) (EDM2 Eq. 21)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg)
        self.logvar_fourier = MPFourier(cfg.logvar_channels)
        self.logvar_linear = MPConv(cfg.logvar_channels, 1, 0)

    def _labels(self, class_labels, x):
        """One-hot class labels [B, label_dim]; accepts integer classes [B]; None means unconditional (zeros)."""
        if self.cfg.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(x.shape[0], self.cfg.label_dim, device=x.device, dtype=x.dtype)
        if not class_labels.is_floating_point():
            return F.one_hot(class_labels.long(), self.cfg.label_dim).to(x.dtype)
        return class_labels.to(x.dtype).reshape(-1, self.cfg.label_dim)

    def _run(self, x, t, class_labels, r, feature_indices, features_only):
        sd, tdt = self.cfg.sigma_data, _acc_dtype(x)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        r = None if r is None else torch.as_tensor(r, dtype=torch.float64, device=x.device).expand(x.shape[0])
        if self.cfg.precond:
            c_in = (1 / (sd**2 + t**2).sqrt()).to(x.dtype).reshape(-1, 1, 1, 1)
            c_noise = t.clamp(min=1e-6).log() / 4
            r_noise = None if r is None else r.clamp(min=1e-6).log() / 4
        else:
            c_in, c_noise, r_noise = 1, t, r
        c_noise, r_noise = c_noise.to(tdt), None if r_noise is None else r_noise.to(tdt)
        labels = self._labels(class_labels, x)
        F_x, features = self.unet(c_in * x, c_noise, labels, r_noise, feature_indices, features_only)
        return F_x, features, c_noise

    def forward(self, x, t, class_labels=None, r=None, feature_indices=(), return_logvar=False):
        """x: (B, C, H, W) noisy image, t: (B,) noise level sigma, class_labels: (B,) ints or (B, label_dim) one-hot.

        Returns the x0 prediction (B, C, H, W); with `return_logvar` also the loss log-variance (B, 1) in float32; with
        `feature_indices` also the list of encoder features at those resolution levels (0 = full resolution).
        """
        F_x, features, c_noise = self._run(x, t, class_labels, r, feature_indices, False)
        if self.cfg.precond:
            sd = self.cfg.sigma_data
            t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(-1, 1, 1, 1)
            c_skip = (sd**2 / (t64**2 + sd**2)).to(x.dtype)
            c_out = (t64 * sd / (t64**2 + sd**2).sqrt()).to(x.dtype)
            out = c_skip * x + c_out * F_x.to(x.dtype)
        else:
            out = F_x.to(x.dtype)
        extras = []
        if feature_indices:
            extras.append(features)
        if return_logvar:
            extras.append(self.logvar_linear(self.logvar_fourier(c_noise)))  # (B, 1)
        return (out, *extras) if extras else out

    def features(self, x, t, class_labels=None, indices=(0,), r=None):
        """Encoder features at the given resolution levels (0 = full resolution), without running the decoder."""
        if any(not 0 <= i < len(self.unet.taps) for i in indices):
            raise ValueError(f"feature indices must be in [0, {len(self.unet.taps)}), got {sorted(indices)}")
        return self._run(x, t, class_labels, r, set(indices), True)[1]


# ----------------------------------------------------------------------------
# Samplers


def _guided_x0(model, x, t, class_labels, guidance):
    """x0 prediction with classifier-free guidance x0_u + w (x0_c - x0_u) (unconditional = all-zero label)."""
    if guidance == 1.0 or class_labels is None:
        return model(x, t, class_labels)
    x0_u, x0_c = model(
        torch.cat([x, x]),
        torch.cat([t, t]),
        torch.cat([torch.zeros_like(model._labels(class_labels, x)), model._labels(class_labels, x)]),
    ).chunk(2)
    return x0_u + guidance * (x0_c - x0_u)


@torch.no_grad()
def sample_heun(
    model,
    noise,
    class_labels=None,
    steps=18,
    guidance=1.0,
    sigma_min=T_MIN,
    sigma_max=T_MAX,
    rho=RHO,
    times=None,
    progress=False,
):
    """EDM's deterministic 2nd-order sampler (EDM Alg. 1) on the Karras grid; 2 * steps - 1 network evaluations.
    `times` (descending) replaces the grid, e.g. to stop at an intermediate noise level; x starts at noise * times[0]."""
    if times is None:
        times = torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    times = torch.as_tensor(times, dtype=torch.float64)
    x = noise.double() * times[0]
    for i in _progress(range(len(times) - 1), progress):
        t_cur, t_next = times[i], times[i + 1]
        d = (x - _guided_x0(model, x.to(noise.dtype), t_cur.expand(len(x)), class_labels, guidance).double()) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next > 0:  # 2nd-order correction, skipped at sigma = 0
            d2 = (
                x_next
                - _guided_x0(model, x_next.to(noise.dtype), t_next.expand(len(x)), class_labels, guidance).double()
            ) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.to(noise.dtype)


@torch.no_grad()
def sample_euler(model, noise, class_labels=None, times=None, steps=18, guidance=1.0, progress=False):
    """Deterministic Euler on the probability-flow ODE dx/dt = (x - x0) / t, on `times` (default: the Karras grid)."""
    if times is None:
        times = torch.cat([karras_sigmas(steps), torch.zeros(1, dtype=torch.float64)])
    times = torch.as_tensor(times, dtype=torch.float64)
    x = noise.double() * times[0]
    for i in _progress(range(len(times) - 1), progress):
        x0 = _guided_x0(model, x.to(noise.dtype), times[i].expand(len(x)), class_labels, guidance).double()
        x = x + (times[i + 1] - times[i]) * (x - x0) / times[i]
    return x.to(noise.dtype)


@torch.no_grad()
def sample_student(model, noise, class_labels=None, times=None, steps=1, guidance=1.0, generator=None):
    """Few-step student sampling (FastGen's default): predict x0, re-noise it to the next time with fresh noise."""
    times = t_list(steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    x = noise * times[0]
    for i in range(len(times) - 1):
        x0 = _guided_x0(model, x, times[i].expand(len(x)).to(x.device), class_labels, guidance)
        if times[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = alpha(times[i + 1]).to(x.dtype) * x0 + sigma(times[i + 1]).to(x.dtype) * fresh
    return x0


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, unit="step", leave=False)


# ----------------------------------------------------------------------------
# Checkpoint loading


def _read_safetensors(path):
    """State dict and metadata from one safetensors file, or from a sharded `*.safetensors.index.json`. A file that
    cannot be read (truncated, empty, damaged, a folder) is a ValueError that names it."""
    from safetensors import SafetensorError, safe_open

    if path.endswith(".index.json"):
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, IsADirectoryError) as e:
            raise ValueError(f"{path} is not a safetensors index ({type(e).__name__}: {e}): write or download it again") from e  # fmt: skip
        state, meta = {}, {}
        for shard in shards:
            s, m = _read_safetensors(os.path.join(os.path.dirname(path), shard))
            state.update(s)
            meta.update(m)
        return state, meta
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; write or download it again") from e  # fmt: skip


def check_keys(model, state, source="checkpoint"):
    """Fail with a readable list unless `state` has exactly the model's keys and shapes, and only finite values (NaN
    or Inf weights would sample black images). `source`, the file, names it in the error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"  missing:    {k} {expected[k]}" for k in missing]
        lines += [f"  unexpected: {k} {got[k]}" for k in unexpected]
        lines += [f"  shape:      {k} checkpoint {got[k]} != model {expected[k]}" for k in wrong]
        raise ValueError(
            f"{source} does not match the model:\n" + "\n".join(lines[:50]) + ("\n  ..." if len(lines) > 50 else "")
        )
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.is_meta and not v.isfinite().all())
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"NaN or Inf in {len(bad)} of {len(state)} tensors ({source}: {names}): the run that saved it diverged or "
            "the file is damaged; load an earlier checkpoint"
        )


def _adapt_heads(model, state):
    """Fit a released checkpoint to a model with the r input switched on (and say what was added).

    The r embedding starts as a copy of the noise embedding behind a zero gain, so the network initially ignores r and
    reproduces the checkpoint exactly; once the gain moves, r lives in the same feature space as t. (The logvar head
    needs no adapting: it is in every released EDM2 checkpoint.)
    """
    state, added = dict(state), []
    net = model.unet
    sources = ("unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight")
    if net.emb_noise_r is not None and "unet.emb_noise_r.weight" not in state and all(k in state for k in sources):
        for key in sources:
            state[key.replace("emb_fourier.", "emb_fourier_r.").replace("emb_noise.", "emb_noise_r.")] = state[key].clone()  # fmt: skip
        state["unet.emb_r_gain"] = torch.zeros(1, dtype=state["unet.emb_noise.weight"].dtype)
        added.append("r input (zero gain)")
    return state, added


def load_checkpoint(model, path, adapt=False):
    """Load a safetensors checkpoint into `model` with strict key and shape checks (assign=True keeps meta-built
    models cheap). `adapt=True` lets a released checkpoint fill a model whose r input is switched on."""
    state, _ = _read_safetensors(path)
    added = []
    if adapt:
        state, added = _adapt_heads(model, state)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return added


def from_pretrained(name_or_path, root=None, device="cpu", dtype=torch.float32, **overrides):
    """Build an EDM2Precond and load its weights.

    `name_or_path`: a name in CONFIGS (the file is looked up under `root`, default `$CKPT_ROOT_DIR` or ./checkpoints,
    where `python download.py NAME` puts it), or a path to a .safetensors file whose metadata names its architecture
    (the config written by `train_edm.py`, or the CONFIGS name written by `download.py`). `overrides` change Config
    fields, e.g. `r_timestep=True` or `label_dropout=0.1`.
    """
    if name_or_path in CONFIGS:
        cfg = CONFIGS[name_or_path]
        root = root or os.environ.get("CKPT_ROOT_DIR", "checkpoints")
        path = os.path.join(root, cfg.file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; fetch it with `python download.py {name_or_path} --root {root}`")  # fmt: skip
    else:
        path = name_or_path
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found, and it is not a known model name ({', '.join(CONFIGS)})")
        meta = _read_safetensors(path)[1]
        if "config" in meta:  # written by train_edm.py
            cfg = config_from_json(meta["config"])
        elif meta.get("name") in CONFIGS:  # written by download.py
            cfg = CONFIGS[meta["name"]]
        else:
            raise ValueError(
                f"{path} names no architecture in its metadata; convert it with "
                f"`python download.py convert PICKLE OUT.safetensors --as NAME`, NAME one of {', '.join(CONFIGS)}"
            )
    cfg = replace(cfg, **overrides)
    with torch.device("meta"):
        model = EDM2Precond(cfg)
    added = load_checkpoint(model, path, adapt=True)
    if added:
        print(f"{os.path.basename(path)}: added {', '.join(added)}")
    return model.to(device=device, dtype=dtype).eval()


def config_to_json(cfg):
    return json.dumps(asdict(cfg))


def config_from_json(text):
    """Inverse of config_to_json; unknown fields are an error, tuples come back as tuples."""
    d = json.loads(text)
    known = {f.name for f in fields(Config)}
    if unknown := set(d) - known:
        raise ValueError(f"unknown Config fields {sorted(unknown)}")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


if __name__ == "__main__":
    torch.manual_seed(0)
    model = EDM2Precond(replace(CONFIGS["tiny"], r_timestep=True))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 10.0])
    out, logvar = model(x, t, torch.tensor([1, 7]), r=t / 2, return_logvar=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"edm2 tiny: {n:,} parameters, out {tuple(out.shape)}, logvar {tuple(logvar.shape)}")
