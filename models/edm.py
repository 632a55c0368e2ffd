"""EDM: the DDPM++ / NCSN++ (SongUNet) and ADM (DhariwalUNet) denoisers under EDM preconditioning.

Paper: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022
(arXiv:2206.00364). Official code: https://github.com/NVlabs/edm (training/networks.py).

Checkpoints: the official pickles (`edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl`, `edm-imagenet-64x64-cond-adm.pkl`)
carry their own source code, so `download.py` converts their `ema` network to safetensors without running any of it.
Module names here equal the names in those files (`model.enc.32x32_block0.conv0.weight`, ...), so they load strictly.

Time convention: t is the noise level sigma (alpha = 1, sigma = t, t in [0.002, 80]); the network predicts x0.

Beyond the official network, three switches the training methods turn on (all off for the released checkpoints):
`logvar_head` (a scalar log-variance of the loss per noise level, sCM), `r_timestep` (a second time input r, MeanFlow)
and `precond=False` (raw x_t, raw t and raw output, MeanFlow from scratch). Left out: the VP/VE/iDDPM preconditioners
(only the EDM one is used by released checkpoints and by FastGen), fp16 execution flags (use torch.autocast instead).

    model = from_pretrained("edm-cifar10-32x32-cond-vp")          # after `python download.py edm-cifar10-32x32-cond-vp`
    noise = torch.randn(16, 3, 32, 32)
    images = sample_heun(model, noise, class_labels=torch.arange(16) % 10, steps=18)   # in [-1, 1]
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
    arch: str = "ddpmpp"  # "ddpmpp" or "ncsnpp" (SongUNet, CIFAR-10) or "adm" (DhariwalUNet, ImageNet-64)
    img_resolution: int = 32  # image side at input and output
    img_channels: int = 3  # colour channels
    label_dim: int = 10  # number of classes, 0 = unconditional
    augment_dim: int = 9  # width of the augmentation-label input, 0 = none (EDM's AugmentPipe uses 9)
    model_channels: int = 128  # base channel count
    channel_mult: tuple = (2, 2, 2)  # channel multiplier per resolution level
    channel_mult_emb: int = 4  # embedding width = model_channels * channel_mult_emb
    num_blocks: int = 4  # residual blocks per resolution level
    attn_resolutions: tuple = (16,)  # resolutions with self-attention
    dropout: float = 0.0  # EDM trained CIFAR-10 with 0.13; FastGen fine-tunes and distills with 0
    label_dropout: float = 0.0  # probability of dropping the class label in training (for guidance)
    sigma_data: float = 0.5  # expected standard deviation of the data
    precond: bool = True  # EDM preconditioning; False feeds raw x_t and t and returns the raw output
    logvar_head: bool = False  # adds `model.logvar_linear`, a per-noise-level loss log-variance (sCM)
    r_timestep: bool = False  # adds a second time input r (MeanFlow); doubles the width entering `map_layer0`
    url: str = ""  # official checkpoint
    file: str = ""  # where `download.py` writes it, relative to the checkpoint root


_CIFAR = dict(arch="ddpmpp", img_resolution=32, label_dim=10, augment_dim=9, model_channels=128)
_NCSNPP = dict(_CIFAR, arch="ncsnpp")
_EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"

# fmt: off
CONFIGS = {
    "edm-cifar10-32x32-cond-vp":   Config(**_CIFAR, url=_EDM_URL + "edm-cifar10-32x32-cond-vp.pkl", file="cifar10/edm-cifar10-32x32-cond-vp.safetensors"),
    "edm-cifar10-32x32-uncond-vp": Config(**dict(_CIFAR, label_dim=0), url=_EDM_URL + "edm-cifar10-32x32-uncond-vp.pkl", file="cifar10/edm-cifar10-32x32-uncond-vp.safetensors"),
    "edm-cifar10-32x32-cond-ve":   Config(**_NCSNPP, url=_EDM_URL + "edm-cifar10-32x32-cond-ve.pkl", file="cifar10/edm-cifar10-32x32-cond-ve.safetensors"),
    "edm-cifar10-32x32-uncond-ve": Config(**dict(_NCSNPP, label_dim=0), url=_EDM_URL + "edm-cifar10-32x32-uncond-ve.pkl", file="cifar10/edm-cifar10-32x32-uncond-ve.safetensors"),
    "edm-imagenet-64x64-cond-adm": Config(arch="adm", img_resolution=64, label_dim=1000, augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), url=_EDM_URL + "edm-imagenet-64x64-cond-adm.pkl", file="imagenet-64/edm-imagenet-64x64-cond-adm.safetensors"),
    "toy":                         Config(img_resolution=32, augment_dim=0, model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,)),
    "tiny":                        Config(img_resolution=8, model_channels=16, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,)),
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
# Layers. Weights are cast to the input dtype at each call, so bf16/fp16 inputs run without autocast.


def weight_init(shape, mode, fan_in, fan_out):
    """The four initialisations of the EDM networks."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """3x3/1x1 convolution with optional 2x up- or downsampling by a fixed FIR filter (`kernel=0`: resample only)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_mode="kaiming_normal",
        init_weight=1,
        init_bias=0,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample  # fused: downsampling only (NCSN++)
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)  # persistent: it is in the checkpoints

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        # The [1, 1] filter (DDPM++, ADM) is a 2x2 box: resampling by it is exactly nearest-neighbour upsampling and
        # 2x2 average pooling, which cost far less than the grouped (transposed) convolutions of the general case.
        box = f is not None and f.shape[-1] == 2
        if self.up and box:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        elif self.up:
            x = F.conv_transpose2d(
                x, f.mul(4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad
            )
        if self.down and self.fused_resample:  # NCSN++'s residual path: convolve at full resolution, then filter
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if self.down and box:
            x = F.avg_pool2d(x, 2)
        elif self.down:
            x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
        return x if w is None else F.conv2d(x, w, b, padding=w_pad)


class GroupNorm(nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q, k, v):
    """softmax(q^T k / sqrt(c)) over [B*N, C, L] tensors, with the scores in float32 as the original.

    Written with plain differentiable ops (no custom autograd.Function, no fused kernel) so that forward-mode AD
    (`torch.func.jvp`, needed by sCM and MeanFlow) and double backward work through it.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # at least float32, float64 stays float64
    w = torch.einsum("ncq,nck->nqk", q.to(dtype), k.to(dtype) / math.sqrt(k.shape[1])).softmax(dim=2).to(q.dtype)
    return torch.einsum("nqk,nck->ncq", w, v)


class UNetBlock(nn.Module):
    """Residual block with optional 2x resampling and self-attention: the union of DDPM++, NCSN++ and ADM blocks."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0.0,
        skip_scale=1.0,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
    ):
        super().__init__()
        init, init_zero = init or {}, init_zero or dict(init_weight=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))  # (B, C_out, H, W)
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:  # ADM: scale-and-shift by the embedding
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:  # DDPM++: add the embedding
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)
            a = attention(q, k, v)  # (B*N, C/N, H*W)
            x = (self.proj(a.reshape(B, C, H, W)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (DDPM++ uses endpoint=True, ADM endpoint=False); output [cos | sin]."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        # The frequencies in float32 as the original (also for half-precision x), in float64 for float64 x.
        dtype = torch.promote_types(x.dtype, torch.float32)
        freqs = torch.arange(self.num_channels // 2, dtype=dtype, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (self.num_channels // 2 - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++); output [cos | sin]."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------
# Networks


class SongUNet(nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021), as re-implemented by EDM."""

    def __init__(self, cfg: Config):
        super().__init__()
        ncsnpp = cfg.arch == "ncsnpp"
        # NCSN++: Fourier time features of twice the width, a residual encoder path and the [1, 3, 3, 1] filter.
        encoder_type = "residual" if ncsnpp else "standard"
        resample_filter = (1, 3, 3, 1) if ncsnpp else (1, 1)
        in_channels = out_channels = cfg.img_channels
        self.label_dropout = cfg.label_dropout
        emb_channels = cfg.model_channels * cfg.channel_mult_emb
        noise_channels = cfg.model_channels * (2 if ncsnpp else 1)
        cond_channels = noise_channels * (2 if cfg.r_timestep else 1)
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=cfg.dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping: noise level (and r) -> embedding, plus class and augmentation labels.
        embed = (
            (lambda: FourierEmbedding(noise_channels))
            if ncsnpp
            else (lambda: PositionalEmbedding(noise_channels, endpoint=True))
        )
        self.map_noise = embed()
        self.map_r = embed() if cfg.r_timestep else None
        self.map_label = Linear(cfg.label_dim, cond_channels, **init) if cfg.label_dim else None
        self.map_augment = Linear(cfg.augment_dim, cond_channels, bias=False, **init) if cfg.augment_dim else None
        self.map_layer0 = Linear(cond_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. ModuleDict order is the execution order and the checkpoint's key order.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                cin, cout = cout, cfg.model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(cfg.num_blocks):
                cin, cout = cout, cfg.model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in cfg.attn_resolutions, **block
                )
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), cfg.model_channels * mult
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
        self.logvar_linear = Linear(noise_channels, 1) if cfg.logvar_head else None
        # Feature taps for discriminator heads: the last encoder block of each resolution level.
        self.taps = [
            f"{cfg.img_resolution >> lv}x{cfg.img_resolution >> lv}_block{cfg.num_blocks - 1}"
            for lv in range(len(cfg.channel_mult))
        ]

    def embed(self, noise_labels, class_labels, augment_labels, r_labels):
        t_emb = self.map_noise(noise_labels)
        emb = t_emb.reshape(t_emb.shape[0], 2, -1).flip(1).reshape(t_emb.shape)  # [sin | cos], as in the checkpoints
        if self.map_r is not None:
            r_emb = self.map_r(noise_labels if r_labels is None else r_labels)
            emb = torch.cat([emb, r_emb.reshape(r_emb.shape[0], 2, -1).flip(1).reshape(r_emb.shape)], dim=1)
        elif r_labels is not None:
            raise ValueError("r was given but this model has no r input; build it with Config(r_timestep=True)")
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb)), t_emb

    def forward(
        self, x, noise_labels, class_labels, augment_labels=None, r_labels=None, feature_indices=(), features_only=False
    ):
        emb, t_emb = self.embed(noise_labels, class_labels, augment_labels, r_labels)  # (B, E)
        skips, features, aux = [], [], x
        for name, block in self.enc.items():
            if "aux_residual" in name:  # NCSN++: a progressively downsampled copy of the input joins each level
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)  # (B, C, r, r)
                skips.append(x)
                if name in self.taps and self.taps.index(name) in feature_indices:
                    features.append(x)
        if features_only:
            return None, features, t_emb
        out = None
        for name, block in self.dec.items():
            if "aux_norm" in name:
                out = block(x)
            elif "aux_conv" in name:
                out = block(F.silu(out))  # (B, C_img, H, W)
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out, features, t_emb


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021), as re-implemented by EDM."""

    def __init__(self, cfg: Config):
        super().__init__()
        in_channels = out_channels = cfg.img_channels
        self.label_dropout = cfg.label_dropout
        mc = cfg.model_channels
        emb_channels = mc * cfg.channel_mult_emb
        cond_channels = mc * (2 if cfg.r_timestep else 1)
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=cfg.dropout, init=init, init_zero=init_zero
        )

        self.map_noise = PositionalEmbedding(mc)
        self.map_r = PositionalEmbedding(mc) if cfg.r_timestep else None
        self.map_augment = Linear(cfg.augment_dim, cond_channels, bias=False, **init_zero) if cfg.augment_dim else None
        self.map_layer0 = Linear(cond_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(
                cfg.label_dim,
                emb_channels,
                bias=False,
                init_mode="kaiming_normal",
                init_weight=math.sqrt(cfg.label_dim),
            )
            if cfg.label_dim
            else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                cin, cout = cout, mc * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, mc * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in cfg.attn_resolutions, **block
                )
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in cfg.attn_resolutions, **block
                )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)
        self.logvar_linear = Linear(mc, 1) if cfg.logvar_head else None
        self.taps = [
            f"{cfg.img_resolution >> lv}x{cfg.img_resolution >> lv}_block{cfg.num_blocks - 1}"
            for lv in range(len(cfg.channel_mult))
        ]

    def embed(self, noise_labels, class_labels, augment_labels, r_labels):
        t_emb = emb = self.map_noise(noise_labels)
        if self.map_r is not None:
            emb = torch.cat([emb, self.map_r(noise_labels if r_labels is None else r_labels)], dim=1)
        elif r_labels is not None:
            raise ValueError("r was given but this model has no r input; build it with Config(r_timestep=True)")
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb), t_emb

    def forward(
        self, x, noise_labels, class_labels, augment_labels=None, r_labels=None, feature_indices=(), features_only=False
    ):
        emb, t_emb = self.embed(noise_labels, class_labels, augment_labels, r_labels)  # (B, E)
        skips, features = [], []
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)  # (B, C, r, r)
            skips.append(x)
            if name in self.taps and self.taps.index(name) in feature_indices:
                features.append(x)
        if features_only:
            return None, features, t_emb
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x))), features, t_emb  # (B, C_img, H, W)


def _batch_times(t, x):
    """A time given as a scalar or (B,) -> (B,) float64: the preconditioning divides by it (sigma spans 0.002..80)."""
    return torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM Eq. 7, Table 1), around a SongUNet or DhariwalUNet."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.arch not in ("ddpmpp", "ncsnpp", "adm"):
            raise ValueError(f"unknown EDM arch {cfg.arch!r}; expected ddpmpp, ncsnpp or adm")
        self.cfg = cfg
        self.model = DhariwalUNet(cfg) if cfg.arch == "adm" else SongUNet(cfg)

    def _labels(self, class_labels, x):
        """One-hot class labels [B, label_dim]; accepts integer classes [B]; None means unconditional (zeros)."""
        if self.cfg.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(x.shape[0], self.cfg.label_dim, device=x.device, dtype=x.dtype)
        if not class_labels.is_floating_point():
            return F.one_hot(class_labels.long(), self.cfg.label_dim).to(x.dtype)
        return class_labels.to(x.dtype).reshape(-1, self.cfg.label_dim)

    def _run(self, x, t, class_labels, r, augment_labels, feature_indices, features_only):
        """The network F on preconditioned inputs: c_in x and c_noise = ln(sigma) / 4 (EDM Table 1)."""
        t = _batch_times(t, x)
        r = None if r is None else _batch_times(r, x)
        if self.cfg.precond:
            x = x * (1 / (self.cfg.sigma_data**2 + t**2).sqrt()).to(x.dtype).reshape(-1, 1, 1, 1)
            t = t.clamp(min=1e-6).log() / 4
            r = None if r is None else r.clamp(min=1e-6).log() / 4
        r = None if r is None else r.to(x.dtype)
        labels = self._labels(class_labels, x)
        return self.model(x, t.to(x.dtype), labels, augment_labels, r, feature_indices, features_only)

    def forward(self, x, t, class_labels=None, r=None, augment_labels=None, feature_indices=(), return_logvar=False):
        """x: (B, C, H, W) noisy image, t: (B,) noise level sigma, class_labels: (B,) ints or (B, label_dim) one-hot.

        Returns the x0 prediction (B, C, H, W); with `return_logvar` also the loss log-variance (B, 1); with
        `feature_indices` also the list of encoder features at those resolution levels (0 = full resolution).
        """
        F_x, features, t_emb = self._run(x, t, class_labels, r, augment_labels, feature_indices, False)
        out = F_x.to(x.dtype)
        if self.cfg.precond:  # D = c_skip x + c_out F (EDM Eq. 7)
            sd, t = self.cfg.sigma_data, _batch_times(t, x).reshape(-1, 1, 1, 1)
            c_skip = (sd**2 / (t**2 + sd**2)).to(x.dtype)
            c_out = (t * sd / (t**2 + sd**2).sqrt()).to(x.dtype)
            out = c_skip * x + c_out * out
        extras = []
        if feature_indices:
            extras.append(features)
        if return_logvar:
            if self.model.logvar_linear is None:
                raise ValueError("return_logvar needs the logvar head; build the model with Config(logvar_head=True)")
            extras.append(self.model.logvar_linear(t_emb))
        return (out, *extras) if extras else out

    def features(self, x, t, class_labels=None, indices=(0,), r=None, augment_labels=None):
        """Encoder features at the given resolution levels (0 = full resolution), without running the decoder."""
        if any(not 0 <= i < len(self.model.taps) for i in indices):
            raise ValueError(f"feature indices must be in [0, {len(self.model.taps)}), got {sorted(indices)}")
        return self._run(x, t, class_labels, r, augment_labels, set(indices), True)[1]


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
    """Fit a released checkpoint to a model with method heads switched on (and say what was added).

    The logvar head starts fresh; with an r input, the r half of the first mapping layer's input starts at zero so
    the network initially ignores r and reproduces the checkpoint exactly.
    """
    state, added = dict(state), []
    net = model.model
    if net.logvar_linear is not None and "model.logvar_linear.weight" not in state:
        fresh = Linear(net.logvar_linear.in_features, 1)
        state.update({f"model.logvar_linear.{k}": v for k, v in fresh.state_dict().items()})
        added.append("model.logvar_linear (fresh)")
    if net.map_r is not None and state["model.map_layer0.weight"].shape[1] * 2 == net.map_layer0.in_features:
        for name in ("map_layer0", "map_label", "map_augment"):
            key, width = f"model.{name}.weight", getattr(net, name) and getattr(net, name).weight.shape
            if key in state and tuple(state[key].shape) != tuple(width):
                w = state[key]
                if name == "map_layer0":  # widen the input: r columns start at zero
                    state[key] = torch.cat([w, torch.zeros_like(w)], dim=1)
                else:  # widen the output feeding map_layer0: the r half starts at zero
                    state[key] = torch.cat([w, torch.zeros_like(w)], dim=0)
                    if f"model.{name}.bias" in state:
                        b = state[f"model.{name}.bias"]
                        state[f"model.{name}.bias"] = torch.cat([b, torch.zeros_like(b)])
        if "model.map_noise.freqs" in state:  # NCSN++: r uses its own copy of the Fourier features
            state.setdefault("model.map_r.freqs", state["model.map_noise.freqs"].clone())
        added.append("r input (zero-initialised)")
    return state, added


def load_checkpoint(model, path, adapt=False):
    """Load a safetensors checkpoint into `model` with strict key and shape checks (assign=True keeps meta-built
    models cheap). `adapt=True` lets a released checkpoint fill a model whose method heads are switched on."""
    state, _ = _read_safetensors(path)
    added = []
    if adapt:
        state, added = _adapt_heads(model, state)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return added


def from_pretrained(name_or_path, root=None, device="cpu", dtype=torch.float32, **overrides):
    """Build an EDMPrecond and load its weights.

    `name_or_path`: a name in CONFIGS (the file is looked up under `root`, default `$CKPT_ROOT_DIR` or ./checkpoints,
    where `python download.py NAME` puts it), or a path to a .safetensors file whose metadata names its architecture
    (the config written by `train_edm.py`, or the CONFIGS name written by `download.py`). `overrides` change Config fields, e.g. `logvar_head=True` or `label_dropout=0.1`.
    """
    if name_or_path in CONFIGS:
        cfg = CONFIGS[name_or_path]
        root = root or os.environ.get("CKPT_ROOT_DIR", "checkpoints")
        path = os.path.join(root, cfg.file)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found; fetch it with `python download.py {name_or_path} --root {root}`"
            )
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
        model = EDMPrecond(cfg)
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
    for arch in ("ddpmpp", "ncsnpp", "adm"):
        model = EDMPrecond(replace(CONFIGS["tiny"], arch=arch, logvar_head=True))
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 10.0])
        out, logvar = model(x, t, torch.tensor([1, 7]), return_logvar=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"edm {arch} tiny: {n:,} parameters, out {tuple(out.shape)}, logvar {tuple(logvar.shape)}")
