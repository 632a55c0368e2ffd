"""Cosmos Predict 2.5: NVIDIA's text/image/video-to-world diffusion transformer (2B and 14B) on Wan 2.1 VAE latents.

Paper: NVIDIA, "World Simulation with Video Foundation Models for Physical AI" (Cosmos-Predict2.5, arXiv:2511.00062);
official code https://github.com/nvidia-cosmos/cosmos-predict2.5 (checked at 50369b8), network
`cosmos_predict2/_src/predict2/networks/minimal_v4_dit.py::MiniTrainDIT` wrapped by `minimal_v1_lvg_dit.py`. FastGen's
port (fastgen/networks/cosmos_predict2) is the reference the tests compare against.

The network: a DiT on (B, 16, T, H, W) latents of the Wan 2.1 VAE (4x8x8 compression, per-channel mean/std
normalised). Two mask channels are appended to the latents: the video-condition mask (1 on latent frames given as
conditioning, Video2World) and the padding mask (zeros unless given). 1x2x2 patches become tokens; each of the 28
(2B) or 36 (14B) blocks runs self-attention with RMS-normalised q/k and 3-D RoPE, cross-attention to the text, and a
GELU MLP, each behind adaLN (shift, scale, gate) with a LoRA-factored modulation plus a shared AdaLN-LoRA term from the
time embedding. Text: Cosmos-Reason1-7B (Qwen2.5-VL) run on the prompt, all 28 decoder-layer outputs standardised over
channels and concatenated, (B, 512, 28 x 3584 = 100352), projected in here by `crossattn_proj` to 1024. That encoder
lives in the scripts (transformers), not in this file.

Time: `forward` takes the flow time t in [0, 1] (t = 1 is pure noise), (B,) or per frame (B, T), and feeds it to the
sinusoidal embedding unscaled. The official trainer and sampler pass the scheduler timestep 1000 t, but the released
configs build the network with `timestep_scale=0.001` (configs/video2world/experiment/reason_embeddings/
model_2B_reason_1p1_rectified_flow.py), so the embedding sees t in [0, 1] there too; FastGen and diffusers'
Cosmos2_5 pipeline also feed [0, 1]. Schedule: rectified flow, x_t = (1 - t) x0 + t eps, and the network predicts the
flow eps - x0 (the official `get_interpolation` with its x_0 = noise, velocity noise - data).

Checkpoints: the official `base/post-trained/<uuid>_ema_bf16.pt` of nvidia/Cosmos-Predict2.5-2B / -14B on the Hub
(gated), a plain state dict read with torch.load(weights_only=True). Module names here equal its keys after one
rule (`official_to_ours`): a `net.` (official) or `transformer.` (FastGen) prefix is removed, FastGen's activation-
checkpoint wrapper segment is removed, and the training counters `accum_*` and Transformer Engine `_extra_state`
entries are dropped. Safetensors files (single or sharded) with the same keys load too. diffusers'
CosmosTransformer3DModel is the same network under other names (`transformer_blocks.N.attn1.to_q`, ...); that layout
is not read here.

Left out: FastGen's logvar head, skip-layer guidance, adaLN/gate scale knobs and activation-checkpointing wrappers; the
non-LoRA adaLN variant and learnable absolute position embeddings (not used by 2.5); RoPE fps modulation (off in the
released configs; FastGen's default 24 fps is a no-op too); the UniPC sampler (an Euler sampler is given).

    model = from_pretrained("cosmos-predict2.5-2b", dtype=torch.bfloat16, device="cuda")
    noise = torch.randn(1, 16, 24, 88, 160, device="cuda")      # 93 frames of 704 x 1280
    latents = sample_euler(model, noise, text_embeds, neg_text_embeds, steps=35, guidance=8.0)
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
    model_channels: int = 2048  # token width
    num_blocks: int = 28  # transformer blocks
    num_heads: int = 16  # attention heads (head dim 128 in both releases)
    in_channels: int = 16  # latent channels; the two mask channels are added on top
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024  # text width inside the blocks
    crossattn_proj_in_channels: int = 100352  # text width in: 28 Cosmos-Reason1 layers x 3584
    adaln_lora_dim: int = 256  # rank of the adaLN modulation
    max_img_h: int = 240  # largest latent height / width / frame count with RoPE positions
    max_img_w: int = 240
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 3.0  # NTK scaling of the RoPE base per axis
    rope_w_extrapolation_ratio: float = 3.0
    rope_t_extrapolation_ratio: float = 1.0
    repo: str = ""  # Hub repo of the released weights
    file: str = ""  # the weights file in that repo


# ----------------------------------------------------------------------------
# Schedule: rectified flow. Time math in float64 on purpose: x0 = x_t - t v and its inverses subtract nearly equal
# numbers near t = 1, and the shifted time lists are compared against exact fractions.

PRED_TYPE = "flow"  # what the network predicts: eps - x0
T_MIN, T_MAX = 0.0, 0.999  # FastGen's rf range; t = 1 (pure noise) is only the sampler's start


def alpha(t):
    return 1 - t


def sigma(t):
    return t


def alpha_prime(t):
    return -torch.ones_like(t)


def sigma_prime(t):
    return torch.ones_like(t)


def _expand(t, x):
    """Broadcast a time (B,) or per-frame time (B, T) against a video x (B, C, T, H, W), in float64."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 2:
        return t[:, None, :, None, None]
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def _safe(d, eps=1e-6):
    """Keep a denominator away from zero without changing its sign."""
    return torch.where(d >= 0, d.clamp(min=eps), d.clamp(max=-eps))


def to_x0(x_t, out, t, pred_type=PRED_TYPE):
    """Convert a prediction of type `pred_type` (x0, eps, v or flow) at (x_t, t) to x0."""
    x, y, t = x_t.double(), out.double(), _expand(t, x_t)
    if pred_type == "x0":
        x0 = y
    elif pred_type == "eps":  # x_t = (1 - t) x0 + t eps
        x0 = (x - t * y) / _safe(1 - t)
    elif pred_type == "flow":  # flow = eps - x0, so x_t = x0 + t flow
        x0 = x - t * y
    elif pred_type == "v":  # v of the variance-preserving rescaling x_t / sqrt(a^2 + s^2) (Salimans & Ho 2022)
        a, s = 1 - t, t
        n = (a**2 + s**2).sqrt()
        x0 = (a / n) * (x / n) - (s / n) * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return x0.to(out.dtype)


def from_x0(x_t, x0, t, pred_type=PRED_TYPE):
    """Express an x0 prediction at (x_t, t) as a prediction of type `pred_type`."""
    x, y, t = x_t.double(), x0.double(), _expand(t, x_t)
    eps = (x - (1 - t) * y) / _safe(t)
    if pred_type == "x0":
        out = y
    elif pred_type == "eps":
        out = eps
    elif pred_type == "flow":
        out = eps - y
    elif pred_type == "v":
        n = ((1 - t) ** 2 + t**2).sqrt()
        out = ((1 - t) / n) * eps - (t / n) * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return out.to(x0.dtype)


def convert(x_t, out, t, src, dst):
    """Convert a prediction between the types x0, eps, v and flow (through x0)."""
    return out if src == dst else from_x0(x_t, to_x0(x_t, out, t, src), t, dst)


def shift_time(u, shift=5.0):
    """The SD3 time shift (Esser et al. 2024, Eq. 23) t = s u / (1 + (s - 1) u); Cosmos trains and samples with s = 5."""
    return shift * u / (1 + (shift - 1) * u)


def t_list(steps, shift=5.0):
    """Default few-step student times: the shift-5 warp of linspace(1, 0), capped at T_MAX, float64.

    4 steps: [0.999, 0.9375, 0.8333, 0.625, 0], FastGen's Cosmos DMD2 list [0.999, 0.937, 0.833, 0.624, 0] up to its
    rounding; 2 steps: [0.999, 0.8333, 0].
    """
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(u, shift).clamp(max=T_MAX)


def sample_t(
    n, kind="shifted", shift=5.0, p_mean=0.0, p_std=1.0, t_min=0.001, t_max=T_MAX, generator=None, device=None
):
    """Training times, float64 (n,), in [t_min, t_max].

    shifted:     u ~ U[0, 1] warped by shift_time (FastGen's Cosmos DMD2 configs, s = 5), then scaled to the range.
    uniform:     t ~ U[t_min, t_max] (FastGen's Cosmos SFT configs).
    logitnormal: u = sigmoid(p_mean + p_std n), optionally shifted (the official trainer: logit-normal, then s = 5).
    """
    if kind == "shifted":
        u = shift_time(torch.rand(n, dtype=torch.float64, generator=generator), shift)
    elif kind == "uniform":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
    elif kind == "logitnormal":
        u = torch.sigmoid(p_mean + p_std * torch.randn(n, dtype=torch.float64, generator=generator))
        u = shift_time(u, shift)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; expected shifted, uniform or logitnormal")
    return (t_min + (t_max - t_min) * u).clamp(t_min, t_max).to(device)


# ----------------------------------------------------------------------------
# Video2World conditioning: the first latent frames are given; the network sees them clean, marked by a mask channel.


def condition_mask(x, num_frames):
    """(B, 1, T, H, W) mask, 1 on the first `num_frames` latent frames of x (B, C, T, H, W)."""
    mask = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    mask[:, :, :num_frames] = 1
    return mask


def replace_frames(x, cond_latents):
    """x with its first cond_latents.shape[2] frames replaced by the given latents (B, C, Tc, H, W)."""
    return torch.cat([cond_latents.to(x.dtype), x[:, :, cond_latents.shape[2] :]], dim=2)


# ----------------------------------------------------------------------------
# Building blocks


def precision(dtype):
    """What the released model computes in float32 for half-precision weights (norms, RoPE, time features, the
    modulation: its use_wan_fp32_strategy) runs in float32, except in a float64 model, where it runs in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x):
    """x in float32, or in float64 if it is float64 (see `precision`)."""
    return x.to(precision(x.dtype))


class RMSNorm(nn.Module):
    """x / rms(x) * g over the last axis, normalised in float32 (float64 in a float64 model)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = upcast(x)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def layer_norm(x):
    """LayerNorm without gain or bias (the adaLN modulation supplies both)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x_i, x_{i + d/2}) of each head by the token's angles (the "split-half" layout, not Wan's
    interleaved pairs); x (B, L, N, d), cos/sin (L, 1, d/2). In float32 (the released use_wan_fp32_strategy; float64
    in a float64 model)."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class RopePositions(nn.Module):
    """3-D RoPE angles: the head dim splits into time, height, width parts (head 128: 44, 42, 42); each axis has base
    10000 * ratio^(d / (d - 2)) (NTK-aware extrapolation, ratio 3 on height and width), exponents 2i / d, and
    positions 0, 1, ... along the axis.

    NOTE: the official buffers (positions 0..max-1, each axis' exponents) are kept because the checkpoint holds them
    and loading is strict, but the angles are recomputed here in float32 (float64 in a float64 model): a bfloat16
    copy of the model (or of the file) would round the exponents by up to 0.4%, and the angles at far positions by
    ~1%. With float32 buffers, as in training, the two agree exactly."""

    def __init__(self, cfg):
        super().__init__()
        head_dim = cfg.model_channels // cfg.num_heads
        self.dim_h = head_dim // 6 * 2
        self.dim_t = head_dim - 2 * self.dim_h
        lengths = (cfg.max_img_h // cfg.patch_spatial, cfg.max_img_w // cfg.patch_spatial, cfg.max_frames // cfg.patch_temporal)  # fmt: skip
        self.register_buffer("seq", torch.arange(max(lengths), dtype=torch.float))
        self.register_buffer("dim_spatial_range", torch.arange(0, self.dim_h, 2).float() / self.dim_h)
        self.register_buffer("dim_temporal_range", torch.arange(0, self.dim_t, 2).float() / self.dim_t)
        self.ratios = (cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio)

    def forward(self, T, H, W, device=None, dtype=torch.float32):
        """cos and sin of the angles, each (T H W, 1, d/2), tokens in (t, h, w) order, float32 (float64 for a float64
        `dtype`, the model's)."""
        real = precision(dtype)
        if max(T, H, W) > len(self.seq):
            raise ValueError(f"{T}x{H}x{W} tokens exceed the {len(self.seq)} RoPE positions of this model")
        angles = []
        for n, ratio, dim in zip((T, H, W), self.ratios, (self.dim_t, self.dim_h, self.dim_h)):
            theta = 10000.0 * ratio ** (dim / (dim - 2))
            exponents = torch.arange(0, dim, 2, dtype=real, device=device) / dim
            angles.append(torch.outer(torch.arange(n, dtype=real, device=device), 1.0 / theta**exponents))
        t, h, w = angles
        grid = torch.cat(
            [t[:, None, None].expand(T, H, W, -1), h[None, :, None].expand(T, H, W, -1), w[None, None].expand(T, H, W, -1)],
            dim=-1,
        ).reshape(T * H * W, 1, -1)  # fmt: skip
        return grid.cos(), grid.sin()


class SinusoidalTime(nn.Module):
    """[cos | sin] of t times frequencies 10000^(-i / (D / 2)), float32 (float64 for a float64 `dtype`, the model's);
    (B, T) -> (B, T, D)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t, dtype=torch.float32):
        half, real = self.dim // 2, precision(dtype)
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=real, device=t.device) / half)
        angles = t.to(real)[..., None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """AdaLN-LoRA time MLP: D -> D -> 3D, the shared low-rank term added to every block's modulation."""

    def __init__(self, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, features):
        # float32 weights on purpose (the released use_wan_fp32_strategy): the modulation steers every block
        h = F.silu(F.linear(features, upcast(self.linear_1.weight)))
        return F.linear(h, upcast(self.linear_2.weight))


def modulation(dim, rank, chunks):
    """SiLU -> Linear(D, rank) -> Linear(rank, chunks D), no biases; indices 1 and 2 are the checkpoint's."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, rank, bias=False), nn.Linear(rank, chunks * dim, bias=False))


def modulate(mod, emb, lora):
    """mod(emb) + the shared AdaLN-LoRA term, in float32 (float64 in a float64 model); emb (B, T, D), lora (B, T, kD)
    -> k tensors (B, T, 1, D)."""
    h = F.linear(F.silu(emb), upcast(mod[1].weight))
    out = F.linear(h, upcast(mod[2].weight)) + lora
    return [c[:, :, None] for c in out.chunk(out.shape[-1] // emb.shape[-1], dim=-1)]


class Attention(nn.Module):
    """Multi-head attention with RMS-normalised q and k per head; RoPE only in self-attention."""

    def __init__(self, dim, context_dim, num_heads):
        super().__init__()
        self.num_heads, head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.k_norm = RMSNorm(head_dim)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, context=None, rope=None):
        context = x if context is None else context
        heads = (self.num_heads, -1)
        q = self.q_norm(self.q_proj(x).unflatten(-1, heads))  # (B, L, N, d)
        k = self.k_norm(self.k_proj(context).unflatten(-1, heads))  # (B, S, N, d)
        v = self.v_proj(context).unflatten(-1, heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, L, d)
        return self.output_proj(out.transpose(1, 2).flatten(2))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))


class Block(nn.Module):
    """Self-attention, cross-attention to the text, MLP; each x + gate * f(LN(x) (1 + scale) + shift), modulated per
    latent frame."""

    def __init__(self, cfg):
        super().__init__()
        D, rank = cfg.model_channels, cfg.adaln_lora_dim
        self.self_attn = Attention(D, D, cfg.num_heads)
        self.cross_attn = Attention(D, cfg.crossattn_emb_channels, cfg.num_heads)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio))
        self.adaln_modulation_self_attn = modulation(D, rank, 3)
        self.adaln_modulation_cross_attn = modulation(D, rank, 3)
        self.adaln_modulation_mlp = modulation(D, rank, 3)

    def forward(self, x, emb, lora, context, rope):
        B, T, HW, D = x.shape  # tokens grouped by frame, so that the modulation (B, T, 1, D) broadcasts

        def tokens(h):
            return h.reshape(B, T * HW, D)

        shift, scale, gate = (m.to(x.dtype) for m in modulate(self.adaln_modulation_self_attn, emb, lora))
        h = self.self_attn(tokens(layer_norm(x) * (1 + scale) + shift), rope=rope)
        x = x + gate * h.reshape(B, T, HW, D)
        shift, scale, gate = (m.to(x.dtype) for m in modulate(self.adaln_modulation_cross_attn, emb, lora))
        h = self.cross_attn(tokens(layer_norm(x) * (1 + scale) + shift), context)
        x = x + gate * h.reshape(B, T, HW, D)
        shift, scale, gate = (m.to(x.dtype) for m in modulate(self.adaln_modulation_mlp, emb, lora))
        return x + gate * self.mlp(layer_norm(x) * (1 + scale) + shift)


class Patchify(nn.Module):
    """(B, C, T, H, W) -> (B, T/r, H/p, W/p, C r p p), channel-major inside a patch (the official einops layout)."""

    def __init__(self, p, r):
        super().__init__()
        self.p, self.r = p, r

    def forward(self, x):
        B, C, T, H, W = x.shape
        p, r = self.p, self.r
        if T % r or H % p or W % p:
            raise ValueError(f"latent size {T}x{H}x{W} is not a multiple of the patch {r}x{p}x{p}")
        x = x.reshape(B, C, T // r, r, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, T // r, H // p, W // p, C * r * p * p)


class PatchEmbed(nn.Module):
    def __init__(self, cfg, in_channels):
        super().__init__()
        p, r = cfg.patch_spatial, cfg.patch_temporal
        self.proj = nn.Sequential(Patchify(p, r), nn.Linear(in_channels * r * p * p, cfg.model_channels, bias=False))

    def forward(self, x):
        return self.proj(x)


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, p, r = cfg.model_channels, cfg.patch_spatial, cfg.patch_temporal
        self.adaln_modulation = modulation(D, cfg.adaln_lora_dim, 2)
        self.linear = nn.Linear(D, p * p * r * cfg.out_channels, bias=False)

    def forward(self, x, emb, lora):
        shift, scale = (m.to(x.dtype) for m in modulate(self.adaln_modulation, emb, lora[..., : 2 * emb.shape[-1]]))
        return self.linear(layer_norm(x) * (1 + scale) + shift)


# ----------------------------------------------------------------------------
# Model


class CosmosPredict2(nn.Module):
    """The Cosmos Predict 2.5 DiT (the official MiniTrainDIT with the Video2World mask channel)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.model_channels
        self.x_embedder = PatchEmbed(cfg, cfg.in_channels + 2)  # latents, condition mask, padding mask
        self.pos_embedder = RopePositions(cfg)
        self.t_embedder = nn.Sequential(SinusoidalTime(D), TimestepEmbedding(D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        self.t_embedding_norm = RMSNorm(D)
        self.crossattn_proj = nn.Sequential(nn.Linear(cfg.crossattn_proj_in_channels, cfg.crossattn_emb_channels), nn.GELU())  # fmt: skip

    def unpatchify(self, x):
        """(B, T', H', W', p p r C) -> (B, C, T' r, H' p, W' p); the official (p1 p2 t C) order inside a patch."""
        B, T, H, W, _ = x.shape
        p, r, C = self.cfg.patch_spatial, self.cfg.patch_temporal, self.cfg.out_channels
        x = x.reshape(B, T, H, W, p, p, r, C).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(B, C, T * r, H * p, W * p)

    def forward(self, x, t, text_embeds, cond_latents=None, padding_mask=None, feature_indices=(), features_only=False):
        """x: (B, C, T, H, W) noisy latents; t: flow time in [0, 1], (B,), (B, T) per latent frame, or a scalar;
        text_embeds: (B, L, 100352) Cosmos-Reason1 embeddings; cond_latents: (B, C, Tc, H, W) clean latents of the
        first Tc frames (Video2World), which replace those frames of x and are marked in the mask channel;
        padding_mask: (B, 1, H', W') 1 on padded pixels, resized to the latent grid (nearest).

        Returns the flow eps - x0, (B, C, T, H, W); on conditioned frames it is not meaningful (use replace_frames on
        x0). With `feature_indices` (block indices) also the list of those blocks' outputs as (B, D, T, H/2, W/2);
        with `features_only` only that list, without running the blocks after the last index.
        """
        B, _, T, H, W = x.shape
        mask = torch.zeros(B, 1, T, H, W, dtype=x.dtype, device=x.device)
        if cond_latents is not None:
            x, mask = replace_frames(x, cond_latents), condition_mask(x, cond_latents.shape[2])
        if padding_mask is None:
            padding = torch.zeros_like(mask)
        else:
            padding = F.interpolate(padding_mask.float(), size=(H, W), mode="nearest").to(x.dtype)
            padding = padding[:, :, None].expand(B, 1, T, H, W)
        h = self.x_embedder(torch.cat([x, mask, padding], dim=1))  # (B, T', H', W', D)
        _, Tp, Hp, Wp, D = h.shape
        rope = self.pos_embedder(Tp, Hp, Wp, device=x.device, dtype=h.dtype)

        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1, 1).expand(B, 1) if t.ndim < 2 else t  # (B, 1) shared by all frames, or (B, T')
        features = self.t_embedder[0](t, h.dtype)  # (B, T, D) float32 (float64 in a float64 model)
        lora = self.t_embedder[1](features)  # (B, T, 3D)
        emb = self.t_embedding_norm(features)  # (B, T, D), the adaLN input: the normalised sinusoid, not the MLP
        context = self.crossattn_proj(text_embeds.to(h.dtype))  # (B, L, 1024)

        h = h.reshape(B, Tp, Hp * Wp, D)
        taps, last = [], max(feature_indices, default=-1)
        for i, block in enumerate(self.blocks):
            if features_only and i > last:
                return taps
            h = block(h, emb, lora, context, rope)  # (B, T', H' W', D)
            if i in feature_indices:
                taps.append(h.reshape(B, Tp, Hp, Wp, D).permute(0, 4, 1, 2, 3))
        if features_only:
            return taps
        out = self.unpatchify(self.final_layer(h, emb, lora).reshape(B, Tp, Hp, Wp, -1))
        return (out, taps) if len(feature_indices) else out


# ----------------------------------------------------------------------------
# Sampler


def guided(model, x, t, text_embeds, neg_text_embeds=None, guidance=1.0, **cond):
    """Flow with classifier-free guidance u + w (c - u), u from the negative prompt, in one batch of 2B.

    NOTE: the official model (Video2WorldModelRectifiedFlow, also used for text-to-world) combines c + g (c - u), so
    its guidance g is our w - 1 (its default 7 is our 8); FastGen and the official text2world model use this form.
    """
    if guidance == 1.0 or neg_text_embeds is None:
        return model(x, t, text_embeds, **cond)
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim < 2 else t
    doubled = {k: None if v is None else torch.cat([v, v]) for k, v in cond.items()}
    c, u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text_embeds, neg_text_embeds]), **doubled).chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def sample_euler(
    model,
    noise,
    text_embeds,
    neg_text_embeds=None,
    steps=35,
    guidance=8.0,
    shift=5.0,
    cond_latents=None,
    cond_t=0.0,
    times=None,
    progress=False,
):
    """Euler on the flow ODE dx/dt = flow(x, t), from noise at t = 1 to t = 0 on shift-5 warped times (the official
    35-step schedule and guidance; it integrates with UniPC). Returns latents.

    Video2World: `cond_latents` (B, C, Tc, H, W) are kept clean on the first Tc frames; those frames are fed at time
    `cond_t` (FastGen's sampler uses 0; None feeds them the current t, as the released training did), and their flow
    is the exact one, noise - cond_latents (the official denoise_replace_gt_frames).
    """
    times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift) if times is None else times
    times = torch.as_tensor(times, dtype=torch.float64)
    x = noise.double() * times[0]
    B, T = noise.shape[0], noise.shape[2]
    for i in _progress(range(len(times) - 1), progress):
        t = times[i].expand(B).to(noise.device)
        if cond_latents is not None:
            x = replace_frames(x, cond_latents.double())
            if cond_t is not None:
                frame_t = torch.full((B, T), cond_t, dtype=torch.float64, device=noise.device)
                t = torch.cat([frame_t[:, : cond_latents.shape[2]], t[:, None].expand(B, T)[:, cond_latents.shape[2] :]], 1)  # fmt: skip
        v = guided(model, x.to(noise.dtype), t, text_embeds, neg_text_embeds, guidance, cond_latents=cond_latents)
        v = v.double()
        if cond_latents is not None:
            v = replace_frames(v, noise[:, :, : cond_latents.shape[2]].double() - cond_latents.double())
        x = x + (times[i + 1] - times[i]) * v
    if cond_latents is not None:
        x = replace_frames(x, cond_latents.double())
    return x.to(noise.dtype)


@torch.no_grad()
def sample_student(model, noise, text_embeds, times=None, steps=4, neg_text_embeds=None, guidance=1.0, generator=None):
    """Few-step student sampling (FastGen's default): predict x0, re-noise it to the next time with fresh noise."""
    times = t_list(steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    x = noise * sigma(times[0]).to(noise.dtype)  # x_t of t_0 from pure noise (the x0 term is negligible at 0.999)
    for i in range(len(times) - 1):
        t = times[i].expand(len(x)).to(x.device)
        x0 = to_x0(x, guided(model, x, t, text_embeds, neg_text_embeds, guidance), t).to(x.dtype)
        if times[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (alpha(times[i + 1]) * x0 + sigma(times[i + 1]) * fresh).to(x.dtype)
    return x0


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, unit="step", leave=False)


# ----------------------------------------------------------------------------
# Checkpoint loading

_PREFIXES = ("net.", "transformer.")  # official training / EMA files; FastGen's wrapper attribute
_WRAPPER = "._checkpoint_wrapped_module"  # FastGen's activation-checkpointing wrapper, saved inside block names
_COUNTERS = ("accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration", "accum_train_in_hours")


def official_to_ours(state):
    """The one key rule: strip the `net.` or `transformer.` prefix and the checkpoint-wrapper segment; drop the
    official training counters and Transformer Engine `_extra_state` entries (no weights in either). Two keys that
    map to the same name are an error."""
    ours = {}
    for key, value in state.items():
        name = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key).replace(_WRAPPER, "")
        if name in _COUNTERS or name.endswith("._extra_state"):
            continue
        if name in ours:
            raise ValueError(f"checkpoint keys collide after removing prefixes: two entries for {name}")
        ours[name] = value
    return ours


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


def read_state_dict(path):
    """Tensors from safetensors (single or sharded) or an official .pt, renamed by official_to_ours. A .pt is read with
    torch.load(weights_only=True): only tensors and plain containers unpickle, no code runs."""
    if path.endswith((".safetensors", ".index.json")):
        return official_to_ours(_read_safetensors(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a plain state dict of tensors (refused by torch.load(weights_only=True)): {e}"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict")
    state = official_to_ours(state)
    if bad := [k for k, v in state.items() if not isinstance(v, torch.Tensor)]:
        raise ValueError(f"{path} holds non-tensor entries: {bad[:5]}")
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


def load_checkpoint(model, path):
    """Load a .pt or safetensors checkpoint into `model` strictly (assign=True keeps meta-built models cheap)."""
    state = read_state_dict(path)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


def config_from_state_dict(state):
    """The architecture of a checkpoint, read from its shapes (the released sizes give their presets)."""
    D, patch_in = state["x_embedder.proj.1.weight"].shape
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for cfg in CONFIGS.values():
        if cfg.repo and (cfg.model_channels, cfg.num_blocks) == (D, blocks):
            return cfg
    p = Config.patch_spatial  # the releases' 1x2x2 patches; other patch sizes need an explicit config
    positions = len(state["pos_embedder.seq"])
    return Config(
        model_channels=D,
        num_blocks=blocks,
        num_heads=D // state["blocks.0.self_attn.q_norm.weight"].shape[0],
        in_channels=patch_in // (p * p) - 2,
        out_channels=state["final_layer.linear.weight"].shape[0] // (p * p),
        mlp_ratio=state["blocks.0.mlp.layer1.weight"].shape[0] / D,
        crossattn_emb_channels=state["crossattn_proj.0.weight"].shape[0],
        crossattn_proj_in_channels=state["crossattn_proj.0.weight"].shape[1],
        adaln_lora_dim=state["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0],
        max_img_h=positions * p,
        max_img_w=positions * p,
        max_frames=positions,
    )


def _local_files_only():
    return os.environ.get("LOCAL_FILES_ONLY", "").lower() in ("1", "true", "yes")


def _hub(repo, filename=None):
    """A file (or, with filename None, a snapshot of config.json and safetensors) of a Hub repo, through the Hugging
    Face cache; huggingface_hub honours HF_HOME, HF_HUB_OFFLINE=1 and HF_TOKEN, and LOCAL_FILES_ONLY=true is
    honoured here."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if filename:
            return hf_hub_download(repo, filename, local_files_only=_local_files_only())
        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
        return snapshot_download(repo, allow_patterns=patterns, local_files_only=_local_files_only())
    except GatedRepoError as e:
        raise RuntimeError(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(f"{repo} is not a known model name ({', '.join(CONFIGS)}), local path or Hub repo") from e
    except LocalEntryNotFoundError as e:  # not cached, and no download: say why, as it is
        from huggingface_hub import constants, get_token

        off = [name for name, on in (("HF_HUB_OFFLINE=1", constants.HF_HUB_OFFLINE), ("LOCAL_FILES_ONLY=true", _local_files_only())) if on]  # fmt: skip
        why = f"downloads are off ({' and '.join(off)})" if off else "the Hugging Face Hub could not be reached (no network?)"  # fmt: skip
        what = f" --include '{filename}'" if filename else ""
        token = "" if get_token() else " (a gated repo also needs HF_TOKEN)"
        raise FileNotFoundError(
            f"{repo} is not in the Hugging Face cache (HF_HOME) and {why}: fetch it once with network access, "
            f"`hf download {repo}{what}`{token}"
        ) from e


def _weights_in(folder):
    for name in ("model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".pt", ".pth")))
    if len(found) != 1:
        raise FileNotFoundError(f"expected model.safetensors (or its index) or one .pt/.safetensors in {folder}, found {found}")  # fmt: skip
    return os.path.join(folder, found[0])


def _is_repo_id(name):
    org, _, repo = name.partition("/")
    return bool(org and repo) and "/" not in repo and not name.startswith(".")


def from_pretrained(name_or_path, config=None, root=None, device="cpu", dtype=torch.float32):
    """Build the network on the meta device and load its weights strictly.

    `name_or_path`: a released name in CONFIGS (its .pt under `root`, default $CKPT_ROOT_DIR or ./checkpoints, in the
    seed's folder cosmos_predict2/<repo name>/ where `python download.py NAME` writes it, else from the Hugging Face
    cache or the Hub), a local .pt / .safetensors file or sharded
    index, a local folder (config.json and model.safetensors or its index, as written by the training scripts), or
    a Hub repo id of such a folder. The architecture comes from `config` (a CONFIGS name or a Config), else the
    preset, else config.json, else the checkpoint's shapes. Returns the model in eval mode.
    """
    folder = None
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(f"{name_or_path} has no released weights; build it with CosmosPredict2(CONFIGS[...])")
        root = root or os.environ.get("CKPT_ROOT_DIR", "checkpoints")
        path = os.path.join(root, "cosmos_predict2", preset.repo.split("/")[-1], preset.file)
        path = path if os.path.exists(path) else _hub(preset.repo, preset.file)
        config = preset if config is None else config
    elif os.path.isfile(name_or_path):
        path = name_or_path
    elif os.path.isdir(name_or_path):
        folder = name_or_path
    elif _is_repo_id(name_or_path):
        folder = _hub(name_or_path)
    else:
        raise FileNotFoundError(f"{name_or_path} is not a known model name ({', '.join(CONFIGS)}), file or Hub repo")
    if folder is not None:
        path = _weights_in(folder)
        if config is None and os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json")) as f:
                config = config_from_json(f.read())
    state = read_state_dict(path)
    if isinstance(config, str):
        config = CONFIGS[config]
    config = config or config_from_state_dict(state)
    with torch.device("meta"):
        model = CosmosPredict2(config)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def config_to_json(cfg):
    return json.dumps(asdict(cfg))


def config_from_json(text):
    """Inverse of config_to_json; unknown fields are an error."""
    d = json.loads(text)
    known = {f.name for f in fields(Config)}
    if unknown := set(d) - known:
        raise ValueError(f"unknown Config fields {sorted(unknown)}")
    return Config(**d)


# ----------------------------------------------------------------------------
# Presets: the official configs (configs/video2world/defaults/net.py, 2.5 experiments), FastGen configs/net.py.

_2B = Config(repo="nvidia/Cosmos-Predict2.5-2B", file="base/post-trained/81edfebe-bd6a-4039-8c1d-737df1a790bf_ema_bf16.pt")  # fmt: skip
# fmt: off
CONFIGS = {
    "cosmos-predict2.5-2b":  _2B,
    "cosmos-predict2.5-14b": replace(_2B, model_channels=5120, num_blocks=36, num_heads=40, repo="nvidia/Cosmos-Predict2.5-14B",
                                     file="base/post-trained/e21d2a49-4747-44c8-ba44-9f6f9243715f_ema_bf16.pt"),
    "tiny": Config(model_channels=32, num_blocks=2, num_heads=2, in_channels=4, out_channels=4, crossattn_emb_channels=16,
                   crossattn_proj_in_channels=40, adaln_lora_dim=8, max_img_h=16, max_img_w=16, max_frames=8),
}
# fmt: on


if __name__ == "__main__":
    torch.manual_seed(0)
    model = CosmosPredict2(CONFIGS["tiny"]).eval()
    x, t, text = torch.randn(2, 4, 3, 8, 8), torch.tensor([0.3, 0.8]), torch.randn(2, 6, 40)
    with torch.no_grad():
        out, features = model(x, t, text, cond_latents=x[:, :, :1], feature_indices={1})
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny: {n:,} parameters, out {tuple(out.shape)}, features {tuple(features[0].shape)}")
