"""Stable Diffusion XL: the text-conditioned latent-diffusion UNet of SDXL base 1.0, predicting eps of 4x128x128 latents.

Paper: Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", ICLR 2024
(arXiv:2307.01952), Sec. 2.1 (architecture) and 2.2 (micro-conditioning); official code
https://github.com/Stability-AI/generative-models (sgm/modules/diffusionmodules/openaimodel.py). The network is the
SD1.5 UNet (models/sd15.py; the shared blocks are copied here verbatim and a test keeps the copies identical) with
three levels of 320, 640, 1280 channels; the first level has no attention and the others stack 2 and 10 transformer
blocks per transformer (10 in the mid block too), heads of width 64, Linear projections in and out of the
transformers, cross-attention to 2048-wide text tokens (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 penultimate hidden
states, concatenated), and a second embedding added to the time embedding: the pooled bigG text embedding (1280) and
sinusoidal features (256 each) of six micro-conditioning numbers, original size, crop top-left and target size
(`add_time_ids`), through a two-layer MLP from 2816 inputs.

Checkpoint: the diffusers layout of the `unet/` folder of stabilityai/stable-diffusion-xl-base-1.0 (`config.json` and
`diffusion_pytorch_model.safetensors`, or a sharded `*.safetensors.index.json`). Module names equal its keys
(`add_embedding.linear_1.weight`, `down_blocks.1.attentions.0.proj_in.weight`, ...), so it loads strictly.

Schedule "sdxl" (eps prediction): the same scaled-linear DDPM chain as SD1.5 (betas 0.00085..0.012, 1000 steps), with
t the DDPM timestep in [0, 999] fed to the UNet as is and log abar interpolated linearly between integer timesteps.
The release's scheduler config (EulerDiscreteScheduler) uses "leading" timestep spacing with steps_offset 1:
k * (1000 // steps) + 1, so 50 steps run 981, 961, ..., 1 (`leading_timesteps`), and Euler starts from noise scaled by
sqrt(1 + sigma_max^2) in the variance-exploding variable (`sample_euler`).

Left out: FastGen's logvar head (its path is broken in FastGen), gradient checkpointing (wrap the blocks in the training
script), LoRA, ControlNet residuals, the refiner's aesthetic-score conditioning, the text encoders (transformers) and
the VAE (models/autoencoder_kl.py, preset "sdxl" or "sdxl-fp16-fix").

    model = from_pretrained("sdxl")                      # stabilityai/stable-diffusion-xl-base-1.0, subfolder unet
    cond = dict(text=text, pooled=pooled, time_ids=add_time_ids(batch=B))  # (B, 77, 2048), (B, 1280), (B, 6)
    latents = sample_euler(model, torch.randn(B, 4, 128, 128), cond, uncond, steps=50, guidance=5.0)
"""

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # eps channels out
    block_out_channels: tuple = (320, 640, 1280)  # width per level; each level but the last halves H, W
    layers_per_block: int = 2  # ResNet blocks per down level (the up levels have one more)
    attention: tuple = (False, True, True)  # which down levels have transformers (the up levels mirror them)
    transformer_layers_per_block: tuple = (1, 2, 10)  # transformer blocks per transformer, per level; mid uses last
    num_attention_heads: tuple = (5, 10, 20)  # heads per level (diffusers' config.json calls them attention_head_dim)
    cross_attention_dim: int = 2048  # width of the text token embeddings (768 + 1280)
    use_linear_projection: bool = True  # transformers project in and out with Linear (else 1x1 conv)
    norm_num_groups: int = 32  # GroupNorm groups in the ResNets and transformers
    norm_eps: float = 1e-5  # GroupNorm eps of the ResNets and the output norm
    addition_time_embed_dim: int = 256  # sinusoidal features per micro-conditioning number
    projection_class_embeddings_input_dim: int = 2816  # pooled text width + 6 * addition_time_embed_dim
    sample_size: int = 128  # latent side the model was trained at
    repo: str = ""  # Hugging Face Hub repo holding the weights
    subfolder: str = "unet"  # folder of the repo with config.json and diffusion_pytorch_model.safetensors


# fmt: off
CONFIGS = {
    "sdxl": Config(repo="stabilityai/stable-diffusion-xl-base-1.0"),
    # The SDXL layout at about a tenth of the width and depth (text widths unchanged), for speed comparisons.
    "mid":  Config(block_out_channels=(128, 256, 512), transformer_layers_per_block=(1, 2, 2),
                   num_attention_heads=(2, 4, 8)),
    "tiny": Config(block_out_channels=(32, 64), layers_per_block=1, attention=(False, True),
                   transformer_layers_per_block=(1, 2), num_attention_heads=(2, 4), cross_attention_dim=64,
                   norm_num_groups=8, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                   sample_size=8),
}
# fmt: on

# ----------------------------------------------------------------------------
# Schedule "sdxl", the same as SD1.5's "sd". Time math runs in float64 on purpose: abar spans 1..0.0047, the
# conversions divide by alpha and sigma, and float32 would round timesteps near 999 in the interpolation.

PRED_TYPE = "eps"
NUM_TIMESTEPS = 1000
T_MIN, T_MAX = 0.0, 999.0
# The scheduler_config.json of the release (identical for SD1.5 and SDXL apart from the scheduler class).
BETA_START, BETA_END = 0.00085, 0.012
STEPS_OFFSET = 1  # "leading" spacing: inference timesteps are k * (1000 // steps) + 1


def betas():
    """Scaled-linear betas (LDM): sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) over 1000 steps, float64.

    diffusers builds the same table in float32; the two agree to about 1e-7 relative."""
    return torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2


def alphas_cumprod():
    """abar[i] = prod_{j <= i} (1 - beta_j): timestep i has x_i = sqrt(abar[i]) x0 + sqrt(1 - abar[i]) eps."""
    return torch.cumprod(1 - betas(), dim=0)


def _log_abar(t):
    """log abar(t) and its slope d/dt, linear between the integer timesteps (exact at them), float64."""
    table = alphas_cumprod().log().to(t.device)
    i = t.floor().clamp(0, NUM_TIMESTEPS - 2)
    slope = table[i.long() + 1] - table[i.long()]
    return table[i.long()] + (t - i) * slope, slope


def alpha(t):
    return _log_abar(t)[0].mul(0.5).exp()


def sigma(t):
    return (-torch.expm1(_log_abar(t)[0])).sqrt()


def alpha_prime(t):
    log_abar, slope = _log_abar(t)  # d/dt exp(l / 2) = exp(l / 2) l' / 2
    return (0.5 * log_abar).exp() * slope / 2


def sigma_prime(t):
    log_abar, slope = _log_abar(t)  # d/dt sqrt(1 - exp(l)) = -exp(l) l' / (2 sqrt(1 - exp(l)))
    return -log_abar.exp() * slope / (2 * (-torch.expm1(log_abar)).sqrt())


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


def t_list(steps):
    """Default few-step times for students: FastGen's linspace(0.999, 0, steps + 1) in timesteps (x 1000).

    1 step: [999, 0]; 2 steps: [999, 499.5, 0]; 4 steps: [999, 749.25, 499.5, 249.75, 0].
    """
    return torch.linspace(T_MAX, T_MIN, steps + 1, dtype=torch.float64)


def sample_t(n, kind="logitnormal", p_mean=0.0, p_std=1.0, t_min=T_MIN, t_max=T_MAX, generator=None, device=None):
    """Training-time timesteps, float64 [n], in [t_min, t_max].

    logitnormal: t = t_min + (t_max - t_min) sigmoid(p_mean + p_std n), FastGen's default for the sd schedules.
    uniform:     t ~ U[t_min, t_max]; FastGen's SD1.5/SDXL DMD2 configs use it on [1, 999].
    discrete:    a uniform integer timestep in [t_min, t_max], as the original SD training.
    """
    if kind == "logitnormal":
        u = torch.sigmoid(p_mean + p_std * torch.randn(n, dtype=torch.float64, generator=generator))
    elif kind == "uniform":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
    elif kind == "discrete":
        return torch.randint(math.ceil(t_min), math.floor(t_max) + 1, (n,), generator=generator).double().to(device)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; expected logitnormal, uniform or discrete")
    return (t_min + (t_max - t_min) * u).clamp(t_min, t_max).to(device)


def leading_timesteps(steps):
    """The inference timesteps of the released scheduler config ("leading" spacing, steps_offset 1), descending:
    k * (1000 // steps) + 1 for k = steps - 1 .. 0; 50 steps: 981, 961, ..., 21, 1."""
    return (torch.arange(steps, dtype=torch.float64) * (NUM_TIMESTEPS // steps)).flip(0) + STEPS_OFFSET


# ----------------------------------------------------------------------------
# Building blocks


def timestep_features(t, dim, dtype=torch.float32):
    """Sinusoidal features [cos | sin] of t (B,) with frequencies 10000^(-i / (dim / 2)): (B, dim), in float32 as the
    release computed them (at t near 1000 the rounding of the angles is visible in the output); a float64 model asks
    for float64."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=dtype, device=t.device) / half)
    angles = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP with SiLU from sinusoidal features to the width every ResNet block reads."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Pre-activation residual block; the time embedding is projected and added per channel after the first conv."""

    def __init__(self, in_channels, out_channels, emb_channels, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention of the tokens x over `context` (cross) or over themselves (self); q, k, v have no bias.

    `bias`: an additive (B, 1, 1, L) bias on the logits, -10000 at masked text tokens (as the release masks them)."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only so the key reads to_out.0

    def forward(self, x, context=None, bias=None):
        B, N, D = x.shape
        context = x if context is None else context
        q, k, v = (
            proj(h).reshape(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, N or L, D / heads)
            for proj, h in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, D / heads)
        return self.to_out[0](h.transpose(1, 2).reshape(B, N, D))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, Eq. 6): one projection to twice the width; half is gated by GELU of the other."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is the release's dropout (rate 0); the placeholder keeps the last layer's key at net.2.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward, each residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, text, bias):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), text, bias)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens (GroupNorm, 1x1 conv or Linear projection) -> transformer blocks -> back, residual."""

    def __init__(self, channels, depth, heads, context_dim, groups, linear):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        project = nn.Linear if linear else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = project(channels, channels)

    def forward(self, x, text, bias):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H W, C), row-major tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, text, bias)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with padding 1: H, W -> ceil(H / 2), ceil(W / 2)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the size of the matching skip (2x unless a side was odd), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _transformers(cfg, channels, level_depth, heads, count):
    return nn.ModuleList(
        [
            SpatialTransformer(
                channels, level_depth, heads, cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection
            )
            for _ in range(count)
        ]
    )


class DownBlock(nn.Module):
    """One encoder level: `layers` ResNets (each followed by a transformer on attention levels), then a downsampler
    unless it is the last level. Returns the output and the skip tensors the decoder concatenates."""

    def __init__(self, cfg, level, in_channels, emb_channels):
        super().__init__()
        out = cfg.block_out_channels[level]
        widths = [in_channels] + [out] * cfg.layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock(w, out, emb_channels, cfg.norm_num_groups, cfg.norm_eps) for w in widths[:-1]]
        )
        self.attentions = None
        if cfg.attention[level]:
            depth, heads = cfg.transformer_layers_per_block[level], cfg.num_attention_heads[level]
            self.attentions = _transformers(cfg, out, depth, heads, cfg.layers_per_block)
        is_last = level == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample(out)])

    def forward(self, x, emb, text, bias):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, text, bias)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: layers_per_block + 1 ResNets, each reading the running features concatenated with one skip
    (the last skip of the matching encoder level first), transformers on attention levels, then an upsampler unless
    it is the last level."""

    def __init__(self, cfg, level, emb_channels):
        super().__init__()
        reversed_widths = cfg.block_out_channels[::-1]
        levels = len(reversed_widths)
        out, prev = reversed_widths[level], reversed_widths[max(level - 1, 0)]
        skip_of_last = reversed_widths[min(level + 1, levels - 1)]  # the encoder level below produced the last skip
        n = cfg.layers_per_block + 1
        ins = [(prev if j == 0 else out) + (skip_of_last if j == n - 1 else out) for j in range(n)]
        self.resnets = nn.ModuleList(
            [ResnetBlock(w, out, emb_channels, cfg.norm_num_groups, cfg.norm_eps) for w in ins]
        )
        self.attentions = None
        if cfg.attention[::-1][level]:
            depth, heads = cfg.transformer_layers_per_block[::-1][level], cfg.num_attention_heads[::-1][level]
            self.attentions = _transformers(cfg, out, depth, heads, n)
        self.upsamplers = None if level == levels - 1 else nn.ModuleList([Upsample(out)])

    def forward(self, x, emb, skips, text, bias, size):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, text, bias)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution."""

    def __init__(self, cfg, emb_channels):
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            [ResnetBlock(c, c, emb_channels, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)]
        )
        depth, heads = cfg.transformer_layers_per_block[-1], cfg.num_attention_heads[-1]
        self.attentions = _transformers(cfg, c, depth, heads, 1)

    def forward(self, x, emb, text, bias):
        x = self.resnets[0](x, emb)
        return self.resnets[1](self.attentions[0](x, text, bias), emb)


def _text_bias(text_mask, dtype):
    """(B, L) mask, 1 = keep -> additive (B, 1, 1, L) logit bias, -10000 at dropped tokens (as the release)."""
    return None if text_mask is None else ((1 - text_mask.to(dtype)) * -10000.0)[:, None, None, :]


# ----------------------------------------------------------------------------
# Model


def add_time_ids(original_size=(1024, 1024), crop_top_left=(0, 0), target_size=(1024, 1024), batch=1, device=None):
    """SDXL's micro-conditioning numbers (Podell et al. 2023, Sec. 2.2), (batch, 6) float32:
    [original height, original width, crop top, crop left, target height, target width], in pixels.

    The default, [1024, 1024, 0, 0, 1024, 1024], is what the SDXL pipeline passes for an uncropped 1024 px image and
    what FastGen fixes for every training resolution."""
    ids = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32, device=device)
    return ids.expand(batch, 6)


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        widths = cfg.block_out_channels
        emb_channels = 4 * widths[0]  # 1280 for SDXL
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], emb_channels)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, emb_channels)
        ins = [widths[0]] + list(widths[:-1])
        self.down_blocks = nn.ModuleList([DownBlock(cfg, i, ins[i], emb_channels) for i in range(len(widths))])
        self.mid_block = MidBlock(cfg, emb_channels)
        self.up_blocks = nn.ModuleList([UpBlock(cfg, i, emb_channels) for i in range(len(widths))])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, t, text, pooled, time_ids, text_mask=None, feature_indices=(), features_only=False):
        """x: (B, 4, H, W) noisy latents, t: (B,) or scalar timestep in [0, 999], text: (B, L, 2048) token embeddings
        of both text encoders, pooled: (B, 1280) projected pooled embedding of the second, time_ids: (B, 6) from
        `add_time_ids`, text_mask: optional (B, L), 1 for tokens to attend to (the SDXL pipeline passes none).

        Returns eps (B, 4, H, W). With `feature_indices` also the list of those features for discriminator heads:
        index i < len(down_blocks) is the output of down block i, index len(down_blocks) the mid block's output
        (FastGen's classify_forward; SDXL at 1024 px: 320x64x64, 640x32x32, 1280x32x32, mid 1280x32x32). With
        `features_only` only that list, without running the blocks after the last index.
        """
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(B)
        math_dtype = torch.promote_types(x.dtype, torch.float32)  # the time features: float32, float64 in float64
        time_features = timestep_features(t, self.cfg.block_out_channels[0], math_dtype)
        emb = self.time_embedding(time_features.to(x.dtype))  # (B, 4 C0)
        D = self.cfg.addition_time_embed_dim
        micro = timestep_features(time_ids.flatten(), D, math_dtype).reshape(B, -1)  # (B, 6 D)
        emb = emb + self.add_embedding(torch.cat([pooled.to(x.dtype), micro.to(x.dtype)], dim=1))
        bias = _text_bias(text_mask, x.dtype)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips, features, last = [h], [], max(feature_indices, default=-1)
        for i, block in enumerate(self.down_blocks):
            if features_only and i > last:
                return features
            h, block_skips = block(h, emb, text, bias)
            skips += block_skips
            if i in feature_indices:
                features.append(h)
        if features_only and len(self.down_blocks) > last:
            return features
        h = self.mid_block(h, emb, text, bias)  # (B, C_last, H / 2^(levels - 1), W / 2^(levels - 1))
        if len(self.down_blocks) in feature_indices:
            features.append(h)
        if features_only:
            return features

        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            h = block(h, emb, block_skips, text, bias, skips[-1].shape[-2:] if skips else None)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 4, H, W)
        return (out, features) if len(feature_indices) else out


# ----------------------------------------------------------------------------
# Samplers. Conditioning travels as dicts of the model's keyword arguments: dict(text=..., pooled=...,
# time_ids=...), optionally text_mask=...; `uncond` has the same keys (the empty prompt's embeddings, or zeros as the
# SDXL pipeline uses for an empty negative prompt).


def guided(model, x, t, cond, uncond=None, guidance=1.0):
    """eps with classifier-free guidance u + w (c - u) (Ho & Salimans 2022), both halves in one batch of 2B."""
    if uncond is None or guidance == 1.0:
        return model(x, t, **cond)
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond has {sorted(cond)} but uncond has {sorted(uncond)}; they need the same keys")
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    uncond_eps, cond_eps = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    return uncond_eps + guidance * (cond_eps - uncond_eps)


def _times(steps, times):
    """Descending times ending at 0: given, or the release's leading timesteps followed by 0."""
    if times is not None:
        return torch.as_tensor(times, dtype=torch.float64)
    return torch.cat([leading_timesteps(steps), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_ddim(model, noise, cond, uncond=None, steps=50, guidance=7.5, times=None, progress=False):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) from times[0] down to times[-1]. Returns latents.

    Default times: the released scheduler's leading timesteps (981, 961, ..., 1 for 50 steps), then timestep 0 as
    the final target (diffusers' DDIMScheduler with set_alpha_to_one false), which this reproduces. FastGen's teacher
    sampler runs on times=t_list(steps) instead. x starts as the unit noise (alpha^2 + sigma^2 = 1 here).
    """
    times = _times(steps, times)
    x = noise.double()
    for i in _progress(range(len(times) - 1), progress):
        t, t_next = times[i], times[i + 1]
        eps = guided(model, x.to(noise.dtype), t.expand(len(x)), cond, uncond, guidance).double()
        x0 = (x - sigma(t) * eps) / alpha(t)
        x = alpha(t_next) * x0 + sigma(t_next) * eps
    return x.to(noise.dtype)


@torch.no_grad()
def sample_euler(model, noise, cond, uncond=None, steps=50, guidance=7.5, times=None, progress=False):
    """Euler on the probability-flow ODE in the variance-exploding variable z = x_t / alpha, noise level
    s = sigma / alpha: dz/ds = eps (Karras et al. 2022, Eq. 4 with the eps network); diffusers' EulerDiscreteScheduler,
    the SDXL default, reproduced. The last target is s = 0, the data itself.

    Default times: the leading timesteps. z starts as noise * sqrt(1 + s_max^2) (diffusers' init_noise_sigma for
    leading spacing), so the network first sees the unit noise itself.
    """
    times = _times(steps, times)
    levels = sigma(times) / alpha(times)
    levels[times == 0] = 0.0  # the final target is the data, not timestep 0's small noise level
    z = noise.double() * (1 + levels[0] ** 2).sqrt()
    for i in _progress(range(len(times) - 1), progress):
        x_t = z / (1 + levels[i] ** 2).sqrt()  # = alpha z, the model's input
        eps = guided(model, x_t.to(noise.dtype), times[i].expand(len(z)), cond, uncond, guidance).double()
        z = z + (levels[i + 1] - levels[i]) * eps
    return z.to(noise.dtype)


@torch.no_grad()
def sample_student(model, noise, cond, uncond=None, times=None, steps=1, guidance=1.0, generator=None):
    """Few-step student sampling (FastGen's default): predict x0, re-noise it to the next time with fresh noise."""
    times = t_list(steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    x = noise * sigma(times[0]).to(noise.dtype)
    for i in range(len(times) - 1):
        t = times[i].expand(len(x)).to(x.device)
        x0 = to_x0(x, guided(model, x, t, cond, uncond, guidance), t, PRED_TYPE)
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
    """State dict from one safetensors file, or from a sharded `*.safetensors.index.json`. A file that cannot be read
    (truncated, empty, damaged, a folder) is a ValueError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.endswith(".index.json"):
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, IsADirectoryError) as e:
            raise ValueError(f"{path} is not a safetensors index ({type(e).__name__}: {e}): write or download it again") from e  # fmt: skip
        state = {}
        for shard in shards:
            state.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return state
    try:
        return load_file(path)
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


def load_checkpoint(model, path):
    """Load a diffusers-layout safetensors file (or sharded index) into `model`, strictly (assign=True keeps
    meta-built models cheap)."""
    state = _read_safetensors(path)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size"}
# Fields of diffusers' UNet2DConditionModel config with the only values this file implements (their defaults).
_DIFFUSERS_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "dual_cross_attention": False,
    "only_cross_attention": False, "upcast_attention": None, "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "cross_attention_norm": None,
    "mid_block_only_cross_attention": None, "attention_type": "default", "dropout": 0.0,
    "reverse_transformer_layers_per_block": None, "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
}  # fmt: skip


def _per_level(value, levels, name):
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(value) != levels:
        raise ValueError(f"config.json sets {name} for {len(value)} levels; block_out_channels has {levels}")
    return value


def _unet_fields(d, fixed):
    """The Config fields shared by the SD UNets from a diffusers config.json; values this file does not implement are
    an error."""
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"config.json describes a {d['_class_name']}, not a UNet2DConditionModel")
    derived = {"attention", "num_attention_heads", "transformer_layers_per_block", "repo", "subfolder"}
    plain = {f.name for f in fields(Config)} - derived  # named as in config.json
    per_level = {"down_block_types", "up_block_types", "attention_head_dim", "num_attention_heads"}
    allowed = plain | per_level | {"transformer_layers_per_block"} | _DIFFUSERS_IGNORED | fixed.keys()
    if unknown := set(d) - allowed:
        raise ValueError(f"config.json has fields this UNet does not know: {sorted(unknown)}")
    for name, value in fixed.items():
        if d.get(name, value) != value and not (name == "upcast_attention" and d[name] is False):
            raise ValueError(f"config.json sets {name}={d[name]!r}; only {value!r} is implemented")
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in plain}
    out["sample_size"] = out["sample_size"][0] if isinstance(out.get("sample_size"), tuple) else out.get("sample_size")
    levels = len(d["block_out_channels"])
    down = list(d["down_block_types"])
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or len(down) != levels:
        raise ValueError(f"config.json sets down_block_types={down}; only CrossAttnDownBlock2D / DownBlock2D per level")
    out["attention"] = tuple(b == "CrossAttnDownBlock2D" for b in down)
    mirror = [b.replace("Down", "Up") for b in down[::-1]]
    if list(d["up_block_types"]) != mirror:
        raise ValueError(f"config.json sets up_block_types={list(d['up_block_types'])}; only the mirror {mirror}")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' naming quirk: these are heads
    out["num_attention_heads"] = _per_level(heads, levels, "num_attention_heads")
    depth = d.get("transformer_layers_per_block", 1)
    out["transformer_layers_per_block"] = _per_level(depth, levels, "transformer_layers_per_block")
    return {k: v for k, v in out.items() if v is not None}


def config_from_diffusers(d):
    """Config from the fields of a diffusers UNet2DConditionModel config.json; values this file does not implement
    (other block types, embeddings or conditionings) are an error."""
    return Config(**_unet_fields(d, _DIFFUSERS_FIXED))


_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _hub_folder(repo, subfolder):
    """Local snapshot of a Hub repo's config.json and weights in `subfolder`, through the Hugging Face cache.

    huggingface_hub honours HF_HOME (cache location), HF_HUB_OFFLINE=1 and HF_TOKEN itself; LOCAL_FILES_ONLY=true
    (FastGen's switch) is honoured here."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    prefix = f"{subfolder}/" if subfolder else ""
    shards = "diffusion_pytorch_model-*"  # diffusion_pytorch_model-0000N-of-0000M.safetensors, if sharded
    patterns = [prefix + name for name in ("config.json", _WEIGHTS, _WEIGHTS + ".index.json", shards)]
    local_only = os.environ.get("LOCAL_FILES_ONLY", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only)
    except GatedRepoError as e:
        raise RuntimeError(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(f"{repo} is not a known model name ({', '.join(CONFIGS)}), local path or Hub repo") from e
    except LocalEntryNotFoundError as e:  # not cached, and no download: say why, as it is
        from huggingface_hub import constants, get_token

        off = [name for name, on in (("HF_HUB_OFFLINE=1", constants.HF_HUB_OFFLINE), ("LOCAL_FILES_ONLY=true", local_only)) if on]  # fmt: skip
        why = f"downloads are off ({' and '.join(off)})" if off else "the Hugging Face Hub could not be reached (no network?)"  # fmt: skip
        token = "" if get_token() else " (a gated repo also needs HF_TOKEN)"
        raise FileNotFoundError(
            f"{repo} is not in the Hugging Face cache (HF_HOME) and {why}: fetch it once with network access, "
            f"`hf download {repo} --include '{prefix}*'`{token}"
        ) from e
    return os.path.join(folder, subfolder)


def _is_repo_id(name):
    """Spelled like a Hub repo id, org/name, rather than a path to a file."""
    org, _, repo = name.partition("/")
    return bool(org and repo) and "/" not in repo and not name.startswith(".") and not name.endswith(".safetensors")


def from_pretrained(name_or_path, subfolder="unet", config=None, device="cpu", dtype=torch.float32):
    """Build the UNet on the meta device and load its weights strictly.

    `name_or_path`: a name in CONFIGS (its Hub repo and folder), a Hub repo id, a local directory (its `subfolder`
    if that exists, else the directory itself), or a single .safetensors file or sharded index. The architecture comes
    from `config` (a CONFIGS name or a Config) if given, else from the preset, else from the config.json
    next to the weights. The model comes back in eval mode; call .requires_grad_(False) for a frozen teacher.
    """
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(f"{name_or_path} has no released weights; build it with UNet(CONFIGS[...])")
        folder = _hub_folder(preset.repo, preset.subfolder)
        config = preset if config is None else config
    elif os.path.isfile(name_or_path):
        folder = os.path.dirname(name_or_path)
    elif os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder)
        folder = folder if os.path.isdir(folder) else name_or_path
    elif _is_repo_id(name_or_path):
        folder = _hub_folder(name_or_path, subfolder)
    else:
        raise FileNotFoundError(f"{name_or_path} is not a known model name ({', '.join(CONFIGS)}), file or Hub repo")

    if os.path.isfile(name_or_path):
        weights = name_or_path
    elif os.path.exists(os.path.join(folder, _WEIGHTS)):
        weights = os.path.join(folder, _WEIGHTS)
    elif os.path.exists(os.path.join(folder, _WEIGHTS + ".index.json")):
        weights = os.path.join(folder, _WEIGHTS + ".index.json")
    else:
        raise FileNotFoundError(f"no {_WEIGHTS} (or its sharded index) in {folder}")

    if isinstance(config, str):
        config = CONFIGS[config]
    if config is None:
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json next to {weights}; pass config=, a Config or a CONFIGS name")
        with open(config_path) as f:
            config = config_from_diffusers(json.load(f))

    with torch.device("meta"):
        model = UNet(config)
    load_checkpoint(model, weights)
    return model.to(device=device, dtype=dtype).eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    model = UNet(CONFIGS["tiny"]).eval()
    x, t, text, pooled = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 7, 64), torch.randn(2, 32)
    with torch.no_grad():
        out, features = model(x, t, text, pooled, add_time_ids((8, 8), (0, 0), (8, 8), batch=2), feature_indices={0, 2})
    n = sum(p.numel() for p in model.parameters())
    shapes = ", ".join(str(tuple(f.shape)) for f in features)
    print(f"sdxl tiny: {n:,} parameters, out {tuple(out.shape)}, features {shapes}")
