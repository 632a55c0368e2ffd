"""DiT and SiT: class-conditional diffusion transformers on ImageNet SD-VAE latents (4x32x32 at 256px, 4x64x64 at 512px).

Papers: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (arXiv:2212.09748), official code
https://github.com/facebookresearch/DiT (models.py, diffusion/); Ma et al., "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers", ECCV 2024 (arXiv:2401.08740), https://github.com/willisma/SiT.
SiT is the DiT network trained as a velocity field on a linear interpolant; one class serves both.

Checkpoints: the released `DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt` and `SiT-XL-2-256x256.pt` are plain state dicts
of tensors, read with `torch.load(weights_only=True)` (nothing in them executes). Module names here equal their keys
(`x_embedder.proj.weight`, `blocks.0.attn.qkv.weight`, `y_embedder.embedding_table.weight` with the extra null-class
row, `pos_embed`, ...), so they load strictly; safetensors files with the same keys load too.

Two schedules, selected by `Config.schedule` and passed by name to the schedule functions:
  "ddpm" (DiT): t is the DDPM timestep in [0, 999] (fractional values interpolate the table), x_t = sqrt(abar(t)) x0 +
    sqrt(1 - abar(t)) eps with DiT's linear betas 1e-4..0.02. The network predicts eps in its first C output channels
    and, in the last C, the interpolation between the two DDPM posterior variances (Nichol & Dhariwal 2021, Eq. 15).
  "rf" (SiT): the rectified-flow convention of this project, x_t = (1 - t) x0 + t eps with t in [0, 1] (t = 1 is pure
    noise), predicting flow = eps - x0. SiT's release runs the other way (x_t = t x0 + (1 - t) eps, velocity x0 - eps),
    so the model feeds its backbone 1 - t and negates the output, as FastGen does; SiT's unused extra C channels are
    dropped, as in the official forward.

FastGen's two method heads are switches, off for the released checkpoints: `r_timestep` (a second time input r for
MeanFlow, `r_embedder`, embedding r itself or the interval t - r) and `logvar_head` (a loss log-variance per time for
sCM, `logvar_linear` on the time embedding). Left out: SiT's SDE samplers and other interpolants.

    model = from_pretrained("DiT-XL-2-256x256")              # after `python download.py DiT-XL-2-256x256`
    noise = torch.randn(8, 4, 32, 32)
    latents = sample_ddpm(model, noise, class_labels=torch.arange(8), steps=250, guidance=4.0)  # sd-vae-ft-mse, / 0.18215
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
    schedule: str = "ddpm"  # "ddpm" (DiT: eps and learned variance) or "rf" (SiT: flow)
    input_size: int = 32  # latent side: image side / 8
    patch_size: int = 2  # side of the square patches that become tokens
    in_channels: int = 4  # latent channels
    hidden_size: int = 1152  # token width
    depth: int = 28  # transformer blocks
    num_heads: int = 16  # attention heads
    mlp_ratio: float = 4.0  # MLP width / token width
    num_classes: int = 1000  # class labels; index num_classes is the null class
    null_class: bool = True  # an extra embedding row for the null class (guidance); the releases have it
    learn_sigma: bool = True  # 2C output channels; the releases have them
    label_dropout: float = 0.0  # probability of the null class in training (DiT and SiT were trained with 0.1)
    r_timestep: bool = False  # a second time input r (MeanFlow): `r_embedder`, added to the conditioning vector
    time_cond_type: str = "abs"  # what r_embedder sees: "abs" r, or "diff" t - r (FastGen's DiT MeanFlow configs)
    logvar_head: bool = False  # `logvar_linear`: a per-time loss log-variance from the time embedding (sCM)
    url: str = ""  # official checkpoint
    file: str = ""  # where `download.py` writes it, relative to the checkpoint root


# The official size presets (DiT and SiT models.py): name -> (depth, hidden_size, num_heads), with patch sizes 2, 4, 8.
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
_SIT_URL = "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=1"  # fmt: skip

CONFIGS = {
    f"{family}-{size}/{patch}": Config(
        schedule=schedule, patch_size=patch, **dict(zip(("depth", "hidden_size", "num_heads"), SIZES[size]))
    )
    for family, schedule in (("DiT", "ddpm"), ("SiT", "rf"))
    for size in SIZES
    for patch in (2, 4, 8)
}
# fmt: off
CONFIGS.update({
    "DiT-XL-2-256x256": replace(CONFIGS["DiT-XL/2"], url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", file="imagenet-256/DiT-XL-2-256x256.pt"),
    "DiT-XL-2-512x512": replace(CONFIGS["DiT-XL/2"], input_size=64, url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", file="imagenet-512/DiT-XL-2-512x512.pt"),
    "SiT-XL-2-256x256": replace(CONFIGS["SiT-XL/2"], url=_SIT_URL, file="imagenet-256/SiT-XL-2-256x256.pt"),
    "tiny":             Config(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10),
    "tiny-sit":         Config(schedule="rf", input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10),
})
# fmt: on

# ----------------------------------------------------------------------------
# Schedules. Time math runs in float64 on purpose: abar spans 1..4e-5 and the conversions divide by alpha and sigma.

PRED_TYPES = {"ddpm": "eps", "rf": "flow"}  # what the network predicts under each schedule
T_RANGES = {"ddpm": (0.0, 999.0), "rf": (0.0, 1.0)}  # valid times; t_max is pure noise for rf, nearly so for ddpm
NUM_TIMESTEPS = 1000


def ddpm_betas():
    """DiT's linear beta schedule (Ho et al. 2020): 1000 values from 1e-4 to 0.02, float64."""
    return torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)


def alphas_cumprod():
    """abar[i] = prod_{j <= i} (1 - beta_j): timestep i has x_i = sqrt(abar[i]) x0 + sqrt(1 - abar[i]) eps."""
    return torch.cumprod(1 - ddpm_betas(), dim=0)


def _log_abar(t):
    """log abar(t) and its slope d/dt, linear between the integer timesteps (exact at them), float64."""
    table = alphas_cumprod().log().to(t.device)
    i = t.floor().clamp(0, NUM_TIMESTEPS - 2)
    slope = table[i.long() + 1] - table[i.long()]
    return table[i.long()] + (t - i) * slope, slope


def _check_schedule(schedule):
    if schedule not in PRED_TYPES:
        raise ValueError(f"unknown schedule {schedule!r}; expected 'ddpm' (DiT) or 'rf' (SiT)")


def alpha(t, schedule):
    _check_schedule(schedule)
    return _log_abar(t)[0].mul(0.5).exp() if schedule == "ddpm" else 1 - t


def sigma(t, schedule):
    _check_schedule(schedule)
    return (-torch.expm1(_log_abar(t)[0])).sqrt() if schedule == "ddpm" else t


def alpha_prime(t, schedule):
    if schedule == "ddpm":  # d/dt exp(l / 2) = exp(l / 2) l' / 2
        log_abar, slope = _log_abar(t)
        return (0.5 * log_abar).exp() * slope / 2
    _check_schedule(schedule)
    return -torch.ones_like(t)


def sigma_prime(t, schedule):
    if schedule == "ddpm":  # d/dt sqrt(1 - exp(l)) = -exp(l) l' / (2 sqrt(1 - exp(l)))
        log_abar, slope = _log_abar(t)
        return -log_abar.exp() * slope / (2 * (-torch.expm1(log_abar)).sqrt())
    _check_schedule(schedule)
    return torch.ones_like(t)


def _expand(t, x):
    """Broadcast a per-sample time [B] (or scalar) against x [B, ...], in float64."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def _safe(d, eps=1e-6):
    """Keep a denominator away from zero without changing its sign."""
    return torch.where(d >= 0, d.clamp(min=eps), d.clamp(max=-eps))


def to_x0(x_t, out, t, pred_type, schedule):
    """Convert a raw prediction of type `pred_type` at (x_t, t) to an x0 prediction.

    Only the first C channels of `out` are a prediction of the mean; DiT's other C channels are its variance.
    """
    x, y = x_t.double(), out[:, : x_t.shape[1]].double()
    a, s, da, ds = (f(_expand(t, x), schedule) for f in (alpha, sigma, alpha_prime, sigma_prime))
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


def from_x0(x_t, x0, t, pred_type, schedule):
    """Express an x0 prediction at (x_t, t) as a prediction of type `pred_type`."""
    x, y = x_t.double(), x0.double()
    a, s, da, ds = (f(_expand(t, x), schedule) for f in (alpha, sigma, alpha_prime, sigma_prime))
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


def convert(x_t, out, t, src, dst, schedule):
    """Convert a prediction between the types x0, eps, v and flow (through x0), on its first C channels."""
    if src == dst:
        return out[:, : x_t.shape[1]]
    return from_x0(x_t, to_x0(x_t, out, t, src, schedule), t, dst, schedule)


def t_list(steps, schedule):
    """Default few-step times for students: FastGen's linspace(0.999, 0, steps + 1), in DiT timesteps x 1000.

    ddpm, 1 step: [999, 0]; 4 steps: [999, 749.25, 499.5, 249.75, 0]. rf, 4 steps: [0.999, 0.749, 0.4995, 0.2498, 0].
    """
    _check_schedule(schedule)
    t_max = 999.0 if schedule == "ddpm" else 0.999
    return torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)


def sample_t(
    n,
    schedule,
    kind="logitnormal",
    p_mean=0.0,
    p_std=1.0,
    t_min=None,
    t_max=None,
    shift=5.0,
    generator=None,
    device=None,
):
    """Training-time times, float64 [n], in [t_min, t_max] (default: the schedule's range).

    logitnormal: t = t_min + (t_max - t_min) sigmoid(p_mean + p_std n), FastGen's default for both schedules.
    uniform:     t ~ U[t_min, t_max]; SiT's own training (t in [0, 1]).
    shifted:     u ~ U[0, 1] warped to s u / (1 + (s - 1) u) (more weight on high noise, SD3 Eq. 23), then scaled.
    discrete:    a uniform integer timestep in [t_min, t_max]; DiT's own training (ddpm only).
    """
    _check_schedule(schedule)
    lo, hi = T_RANGES[schedule]
    t_min, t_max = lo if t_min is None else t_min, hi if t_max is None else t_max
    if kind == "logitnormal":
        u = torch.sigmoid(p_mean + p_std * torch.randn(n, dtype=torch.float64, generator=generator))
    elif kind == "uniform":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
    elif kind == "shifted":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        u = shift * u / (1 + (shift - 1) * u)
    elif kind == "discrete" and schedule == "ddpm":
        t = torch.randint(math.ceil(t_min), math.floor(t_max) + 1, (n,), generator=generator).double()
        return t.to(device)
    else:
        raise ValueError(
            f"unknown time sampler {kind!r} for {schedule}; expected logitnormal, uniform, shifted or discrete (ddpm)"
        )
    return (t_min + (t_max - t_min) * u).clamp(t_min, t_max).to(device)


# ----------------------------------------------------------------------------
# Building blocks


def modulate(x, shift, scale):
    """adaLN: a per-sample affine map of the normalised tokens (DiT Sec. 3.2); x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (MAE): the first half of the channels encodes the column, the second half
    the row, each as [sin | cos] with frequencies 10000^(-i / (dim / 4)); (N, dim) for the row-major N tokens."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid_size), pos.repeat(grid_size)  # token n sits at (n // size, n % size)

    def embed(p):
        angles = torch.outer(p, omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """p x p patches -> tokens by a strided convolution; (B, C, H, W) -> (B, H W / p^2, D), row-major."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features [cos | sin] of the scalar time (frequencies 10000^(-i/128)), then an MLP."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        # In float32 for float32 (and half-precision) weights, exactly as the original: at t up to 999 the rounding
        # of the angles is visible in the output. A float64 model gets float64 features.
        dtype = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=dtype, device=t.device) / half)
        angles = t.to(dtype)[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A learned vector per class, plus the null class at index num_classes that guidance uses as 'unconditional'."""

    def __init__(self, num_classes, hidden_size, null_class):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
        # Plain differentiable ops rather than a fused kernel, so forward-mode AD (sCM, MeanFlow) works through it;
        # the scores in at least float32.
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = torch.einsum("bhqd,bhkd->bhqk", q.to(dtype), k.to(dtype)) / math.sqrt(q.shape[-1])
        out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1).to(v.dtype), v)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT Sec. 3.2): c gives shift, scale and gate of both branches."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN, then a linear map of each token to its p x p x C_out patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------
# Model


class DiT(nn.Module):
    """The DiT/SiT network in the time convention and prediction type of `cfg.schedule` (see the module docstring)."""

    def __init__(self, cfg: Config):
        super().__init__()
        _check_schedule(cfg.schedule)
        self.cfg = cfg
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.grid_size = cfg.input_size // cfg.patch_size
        # A fixed buffer, but persistent: the released checkpoints carry it.
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.hidden_size, self.grid_size)[None])
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.null_class)
        if cfg.time_cond_type not in ("abs", "diff"):
            raise ValueError(f"unknown time_cond_type {cfg.time_cond_type!r}; expected 'abs' or 'diff'")
        self.r_embedder = TimestepEmbedder(cfg.hidden_size) if cfg.r_timestep else None
        self.logvar_linear = nn.Linear(cfg.hidden_size, 1) if cfg.logvar_head else None
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation: Xavier everywhere, small embeddings, adaLN and output layer at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.r_embedder is not None:  # as FastGen
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.r_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def labels(self, class_labels, x):
        """Class indices (B,) with the null class at num_classes. Accepts indices, one-hot rows (an all-zero row is the
        null class, as FastGen's conditions) or None (all null)."""
        null = self.cfg.num_classes
        if class_labels is None:
            return torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
        if class_labels.is_floating_point():
            class_labels = class_labels.reshape(-1, self.cfg.num_classes)
            return torch.where(class_labels.any(dim=1), class_labels.argmax(dim=1), null)
        return class_labels.long().expand(x.shape[0])

    def tokens_to_image(self, tokens):
        """(B, N, D) block tokens -> (B, D, H / p, W / p) feature maps for discriminator heads."""
        B, N, D = tokens.shape
        return tokens.transpose(1, 2).reshape(B, D, self.grid_size, self.grid_size)

    def unpatchify(self, x):
        """(B, N, p p C_out) -> (B, C_out, H, W)."""
        p, c, g = self.cfg.patch_size, self.out_channels, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, class_labels=None, r=None, feature_indices=(), features_only=False, return_logvar=False):
        """x: (B, C, H, W) noisy latents, t: (B,) or scalar time (DDPM timestep for ddpm, flow time for rf),
        class_labels: (B,) indices or (B, num_classes) one-hot, None = null class; r: (B,) or scalar second time in
        the same convention (MeanFlow's end time, r <= t), only with `r_timestep`; None adds no r embedding.

        Returns the raw prediction: (B, 2C, H, W) eps and variance for ddpm, (B, C, H, W) flow for rf. With
        `feature_indices` (block indices) also the list of those blocks' tokens as (B, D, H / p, W / p); with
        `features_only` only that list, without running the blocks after the last index. With `return_logvar` also
        the loss log-variance (B, 1), last.
        """
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        r_in = None
        if r is not None:
            if self.r_embedder is None:
                raise ValueError("r was given but this model has no r input; build it with Config(r_timestep=True)")
            r = torch.as_tensor(r, dtype=torch.float64, device=x.device).expand(x.shape[0])
            # In the caller's time convention, before SiT's flip: "diff" embeds the interval t - r >= 0 (FastGen's
            # MeanFlow DiT runs rf time without the flip, so this is its t - r).
            r_in = t - r if self.cfg.time_cond_type == "diff" else r
        if self.cfg.schedule == "rf":  # SiT was trained on time 1 - t (its t = 0 is noise)
            t = 1 - t
        labels = self.labels(class_labels, x)
        if self.training and self.cfg.label_dropout:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = torch.where(drop, self.cfg.num_classes, labels)

        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D), N = H W / p^2
        t_emb = self.t_embedder(t)  # (B, D)
        c = t_emb + self.y_embedder(labels)
        if r_in is not None:
            c = c + self.r_embedder(r_in)
        features, last = [], max(feature_indices, default=-1)
        for i, block in enumerate(self.blocks):
            if features_only and i > last:
                return features
            h = block(h, c)  # (B, N, D)
            if i in feature_indices:
                features.append(self.tokens_to_image(h))
        if features_only:
            return features
        out = self.unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)
        if self.cfg.schedule == "rf":  # SiT's velocity is x0 - eps; flow is eps - x0. Its extra channels are unused.
            out = -out[:, : self.cfg.in_channels]
        extras = [features] if len(feature_indices) else []
        if return_logvar:
            if self.logvar_linear is None:
                raise ValueError("return_logvar needs the logvar head; build the model with Config(logvar_head=True)")
            extras.append(self.logvar_linear(t_emb))
        return (out, *extras) if extras else out


# ----------------------------------------------------------------------------
# Samplers


def guided(model, x, t, class_labels, guidance=1.0, guided_channels=None):
    """Raw prediction with classifier-free guidance u + w (c - u), u from the null class, in one batch of 2B.

    Guidance applies to the first `guided_channels` channels, default C: the whole eps (or flow) prediction; DiT's
    variance channels come from the conditional pass. The official samplers guide only the first 3 of the 4 channels
    ("for exact reproducibility", DiT and SiT models.py forward_with_cfg); `guided_channels=3` reproduces them and
    their reported FIDs exactly.
    """
    if guidance == 1.0 or class_labels is None:
        return model(x, t, class_labels)
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
    labels = model.labels(class_labels, x)
    null = torch.full_like(labels, model.cfg.num_classes)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    k = model.cfg.in_channels if guided_channels is None else guided_channels
    return torch.cat([uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)


def _x0(model, x, t, class_labels, guidance, guided_channels=None):
    out = guided(model, x, t, class_labels, guidance, guided_channels)
    return to_x0(x, out, t, PRED_TYPES[model.cfg.schedule], model.cfg.schedule)


def respaced_timesteps(steps):
    """DiT's evenly spaced subset of the 1000 timesteps (diffusion/respace.py, one section), ascending."""
    stride = (NUM_TIMESTEPS - 1) / (steps - 1) if steps > 1 else 1
    return [round(i * stride) for i in range(steps)]  # Python's round (half to even), as the original


@torch.no_grad()
def sample_ddpm(
    model, noise, class_labels=None, steps=250, guidance=1.0, guided_channels=None, generator=None, progress=False
):
    """DiT's default sampler: ancestral DDPM on `steps` respaced timesteps with the learned variance (Improved DDPM
    Eq. 15: log var = v log beta + (1 - v) log beta_tilde, v = (out + 1) / 2). Returns latents."""
    if model.cfg.schedule != "ddpm" or not model.cfg.learn_sigma:
        raise ValueError("sample_ddpm needs a DiT with learned variance (schedule='ddpm', learn_sigma=True)")
    used = respaced_timesteps(steps)
    abar = alphas_cumprod()[used]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1 - abar / abar_prev  # the betas of the respaced chain
    posterior_var = betas * (1 - abar_prev) / (1 - abar)
    # log beta_tilde, with its first entry (0) replaced by the second, as the original
    min_log = torch.cat([posterior_var[1:2], posterior_var[1:]]).log() if steps > 1 else posterior_var.log()
    x = noise.double()
    C = noise.shape[1]
    for i in _progress(reversed(range(steps)), progress):
        t = torch.full((len(x),), float(used[i]), dtype=torch.float64)
        out = guided(model, x.to(noise.dtype), t, class_labels, guidance, guided_channels).double()
        x0 = (x - (1 - abar[i]).sqrt() * out[:, :C]) / abar[i].sqrt()
        mean = (betas[i] * abar_prev[i].sqrt() * x0 + (1 - abar_prev[i]) * (1 - betas[i]).sqrt() * x) / (1 - abar[i])
        frac = (out[:, C:] + 1) / 2
        log_var = frac * betas[i].log() + (1 - frac) * min_log[i]
        z = torch.randn(x.shape, generator=generator, device=noise.device, dtype=noise.dtype).double()
        x = mean + (i > 0) * (0.5 * log_var).exp() * z
    return x.to(noise.dtype)


@torch.no_grad()
def sample_ddim(model, noise, class_labels=None, steps=50, guidance=1.0, guided_channels=None, progress=False):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) on DiT's respaced timesteps. Returns latents."""
    if model.cfg.schedule != "ddpm":
        raise ValueError("sample_ddim needs a DiT (schedule='ddpm'); sample SiT with sample_euler or sample_heun")
    used = respaced_timesteps(steps)
    abar = alphas_cumprod()[used]
    x = noise.double()
    for i in _progress(reversed(range(steps)), progress):
        t = torch.full((len(x),), float(used[i]), dtype=torch.float64)
        eps = guided(model, x.to(noise.dtype), t, class_labels, guidance, guided_channels)[:, : x.shape[1]].double()
        x0 = (x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
        prev = abar[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    return x.to(noise.dtype)


def _flow(model, x, t, class_labels, guidance):
    out = guided(model, x, t, class_labels, guidance)
    return convert(x, out, t, PRED_TYPES[model.cfg.schedule], "flow", model.cfg.schedule).double()


@torch.no_grad()
def sample_euler(model, noise, class_labels=None, steps=50, guidance=1.0, times=None, progress=False):
    """Euler on the probability-flow ODE dx/dt = flow(x, t), from pure noise at t = 1 to t = 0 (SiT's ODE sampler,
    run in the rf direction). Default times: uniform in t."""
    times = _ode_times(model, steps, times)
    x = noise.double() * sigma(times[0], model.cfg.schedule)
    for i in _progress(range(len(times) - 1), progress):
        v = _flow(model, x.to(noise.dtype), times[i].expand(len(x)), class_labels, guidance)
        x = x + (times[i + 1] - times[i]) * v
    return x.to(noise.dtype)


@torch.no_grad()
def sample_heun(model, noise, class_labels=None, steps=50, guidance=1.0, times=None, progress=False):
    """Heun's 2nd-order method (explicit trapezoid) on the same ODE; 2 evaluations per step."""
    times = _ode_times(model, steps, times)
    x = noise.double() * sigma(times[0], model.cfg.schedule)
    for i in _progress(range(len(times) - 1), progress):
        dt = times[i + 1] - times[i]
        v = _flow(model, x.to(noise.dtype), times[i].expand(len(x)), class_labels, guidance)
        x_euler = x + dt * v
        v_next = _flow(model, x_euler.to(noise.dtype), times[i + 1].expand(len(x)), class_labels, guidance)
        x = x + dt * (v + v_next) / 2
    return x.to(noise.dtype)


def _ode_times(model, steps, times):
    if times is not None:
        return torch.as_tensor(times, dtype=torch.float64)
    t_min, t_max = T_RANGES[model.cfg.schedule]
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


@torch.no_grad()
def sample_student(model, noise, class_labels=None, times=None, steps=1, guidance=1.0, generator=None):
    """Few-step student sampling (FastGen's default): predict x0, re-noise it to the next time with fresh noise."""
    schedule = model.cfg.schedule
    times = t_list(steps, schedule) if times is None else torch.as_tensor(times, dtype=torch.float64)
    x = noise * sigma(times[0], schedule).to(noise.dtype)
    for i in range(len(times) - 1):
        x0 = _x0(model, x, times[i].expand(len(x)).to(x.device), class_labels, guidance)
        if times[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            t_next = times[i + 1]
            x = alpha(t_next, schedule).to(x.dtype) * x0 + sigma(t_next, schedule).to(x.dtype) * fresh
    return x0


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, unit="step", leave=False)


# ----------------------------------------------------------------------------
# Checkpoint loading


def read_state_dict(path):
    """Tensors from a safetensors file or an official .pt state dict; a .pt is unpickled with weights_only=True, so
    only tensors and plain containers are accepted and no code runs."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; write or download it again") from e  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a plain state dict of tensors (refused by torch.load(weights_only=True)): {e}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


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


def _add_method_heads(model, state):
    """Fill the method heads a checkpoint lacks (a released network fine-tuned with `r_timestep` or `logvar_head`):
    the r embedder with its first layer as initialised and its last layer at zero, so that it adds nothing until
    trained and the released network's output is unchanged; the logvar head at zero. Returns the names added."""
    added = []
    if model.r_embedder is not None and not any(k.startswith("r_embedder.") for k in state):
        hidden, freq = model.r_embedder.mlp[0].weight.shape
        state["r_embedder.mlp.0.weight"] = torch.randn(hidden, freq) * 0.02
        state["r_embedder.mlp.0.bias"] = torch.zeros(hidden)
        state["r_embedder.mlp.2.weight"] = torch.zeros(hidden, hidden)
        state["r_embedder.mlp.2.bias"] = torch.zeros(hidden)
        added.append("r input (zero-initialised)")
    if model.logvar_linear is not None and not any(k.startswith("logvar_linear.") for k in state):
        state["logvar_linear.weight"] = torch.zeros(1, model.cfg.hidden_size)
        state["logvar_linear.bias"] = torch.zeros(1)
        added.append("logvar head (zero-initialised)")
    return added


def load_checkpoint(model, path, adapt=False):
    """Load a .pt or .safetensors checkpoint into `model` with strict key and shape checks (assign=True keeps
    meta-built models cheap). `adapt=True` lets a checkpoint without the method heads fill a model that has them;
    returns the names of the heads added."""
    state = read_state_dict(path)
    added = _add_method_heads(model, state) if adapt else []
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return added


def from_pretrained(name_or_path, config=None, root=None, device="cpu", dtype=torch.float32, **overrides):
    """Build a DiT/SiT and load its weights.

    `name_or_path`: a released name in CONFIGS (the file is looked up under `root`, default `$CKPT_ROOT_DIR` or
    ./checkpoints, where `python download.py NAME` puts it), or a path to a .pt or .safetensors file. A file's
    architecture comes from `config` (a CONFIGS name or a Config), else from its file name when that is a CONFIGS name
    (`DiT-XL-2-256x256.pt`), else from safetensors metadata (`config` JSON or CONFIGS `name`). `overrides` change
    Config fields, e.g. `label_dropout=0.1`, or `r_timestep=True` (heads the file lacks start at zero).
    """
    if name_or_path in CONFIGS and CONFIGS[name_or_path].file:
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
            raise FileNotFoundError(f"{path} not found, and it is not a released model name")
        cfg = _config_of_file(path, config)
    with torch.device("meta"):
        model = DiT(replace(cfg, **overrides))
    added = load_checkpoint(model, path, adapt=True)
    if added:
        print(f"{os.path.basename(path)}: added {', '.join(added)}")
    return model.to(device=device, dtype=dtype).eval()


def _config_of_file(path, config):
    if isinstance(config, Config):
        return config
    if config is not None:
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
        return CONFIGS[config]
    stem = os.path.basename(path).rsplit(".", 1)[0]
    if stem in CONFIGS:
        return CONFIGS[stem]
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; write or download it again") from e  # fmt: skip
        if "config" in meta:  # written by a training script
            return config_from_json(meta["config"])
        if meta.get("name") in CONFIGS:
            return CONFIGS[meta["name"]]
    raise ValueError(
        f"cannot tell the architecture of {path} (DiT and SiT checkpoints have the same keys); "
        f"pass config=NAME, NAME one of {', '.join(CONFIGS)}"
    )


def config_to_json(cfg):
    return json.dumps(asdict(cfg))


def config_from_json(text):
    """Inverse of config_to_json; unknown fields are an error."""
    d = json.loads(text)
    known = {f.name for f in fields(Config)}
    if unknown := set(d) - known:
        raise ValueError(f"unknown Config fields {sorted(unknown)}")
    return Config(**d)


if __name__ == "__main__":
    torch.manual_seed(0)
    for name in ("tiny", "tiny-sit"):
        model = DiT(CONFIGS[name]).eval()
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]) if name == "tiny" else torch.tensor([0.3, 0.8])
        out, features = model(x, t, torch.tensor([1, 7]), feature_indices={1})
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n:,} parameters, out {tuple(out.shape)}, features {tuple(features[0].shape)}")
