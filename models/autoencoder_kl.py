"""The KL-regularised autoencoder of latent diffusion: the VAE of SD1.5, SDXL, DiT (sd-vae-ft-ema/-mse) and FLUX.1.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (arXiv:2112.10752),
Sec. 3.1 and App. G. Official code: https://github.com/CompVis/latent-diffusion (ldm/modules/diffusionmodules/model.py);
the checkpoints used here are the diffusers `AutoencoderKL` files (`vae/diffusion_pytorch_model.safetensors` with its
`config.json`), and module names equal their keys (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...), so they load
strictly. Older files (stabilityai/sd-vae-ft-mse) name the attention projections `query/key/value/proj_attn`; they are
renamed on load. FLUX.1's autoencoder is the same network with 16 latent channels and no 1x1 quant convs.

An image in [-1, 1] of side H becomes a latent of side H / 8 (one factor 2 per level after the first). The encoder
predicts a diagonal Gaussian posterior; the diffusion model sees normalised latents (z - shift_factor) * scaling_factor
(SD1.5 and DiT 0.18215, SDXL 0.13025, Flux shift 0.1159 and scale 0.3611), and `decode` undoes that. Tiled encode and
decode bound the memory of large images: tiles overlap and are cross-faded. Each tile is normalised and attended over
on its own, so tiled results differ slightly from whole-image ones (see `_tiled`).

Precision: the SDXL autoencoder overflows in float16 (NaN images); run it in bfloat16 or float32, or use
madebyollin/sdxl-vae-fp16-fix (preset "sdxl-fp16-fix"), weights rescaled to stay finite in float16. `Config.force_upcast`
carries the diffusers flag that says so. Left out: the VAE training losses, the original LDM / BFL `ae.safetensors`
single-file key layouts, slicing over the batch (call it per sample instead).

    vae = from_pretrained("sdxl")                          # stabilityai/stable-diffusion-xl-base-1.0, subfolder vae
    latents = vae.encode(images)                           # images (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8)
    images = vae.decode(latents, tile=128)                 # tiles of 128 latents (1024 px), clamped to [-1, 1]
"""

import json
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    latent_channels: int = 4  # 4 for the SD family, 16 for FLUX.1
    block_out_channels: tuple = (128, 256, 512, 512)  # width per level; each level after the first halves H, W
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments (absent in FLUX.1)
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before decoding (absent in FLUX.1)
    mid_block_add_attention: bool = True  # one self-attention in each mid block
    scaling_factor: float = 0.18215  # latents seen by the diffusion model: (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    sample_size: int = 512  # image side the autoencoder was trained at; the default tile side
    force_upcast: bool = True  # diffusers' hint: keep this autoencoder in float32 when the denoiser runs in float16
    repo: str = ""  # Hugging Face Hub repo holding the weights
    subfolder: str = "vae"  # folder of the repo with config.json and diffusion_pytorch_model.safetensors


# fmt: off
_FLUX = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
CONFIGS = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5 is the copy of runwayml/stable-diffusion-v1-5, which left the Hub.
    "sd15":          Config(sample_size=512, repo="stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sdxl":          Config(sample_size=1024, scaling_factor=0.13025, repo="stabilityai/stable-diffusion-xl-base-1.0"),
    "sdxl-fp16-fix": Config(sample_size=512, scaling_factor=0.13025, force_upcast=False, repo="madebyollin/sdxl-vae-fp16-fix", subfolder=""),
    "sd-vae-ft-ema": Config(sample_size=256, repo="stabilityai/sd-vae-ft-ema", subfolder=""),
    "sd-vae-ft-mse": Config(sample_size=256, repo="stabilityai/sd-vae-ft-mse", subfolder=""),  # DiT's autoencoder
    # Gated (accept the licence on the Hub); black-forest-labs/FLUX.1-schnell ships the same autoencoder ungated.
    "flux":          Config(**_FLUX, sample_size=1024, repo="black-forest-labs/FLUX.1-dev"),
    "tiny":          Config(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16),
}
# fmt: on

# ----------------------------------------------------------------------------
# Building blocks. Every GroupNorm uses eps 1e-6, as the released weights were trained with.


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 conv on the skip when the width changes."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only so the key reads to_out.0

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The released weights were trained with one row and column of zeros added at the bottom and
    right only, so H, W halve exactly and the sampling grid is not centred."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block, at the lowest resolution."""

    def __init__(self, channels, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)  # (B, widths[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, widths[-1], H/f, W/f) after the last one
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 * latent_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))  # (B, widest, h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, block_out_channels[0], h*f, w*f) after the last one
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, h*f, w*f)


# ----------------------------------------------------------------------------
# Posterior and tiling


class DiagonalGaussian:
    """The encoder's posterior: independent N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in the LDM code, so that exp() stays finite in every precision.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # Noise is drawn on the generator's device (a CPU generator also serves GPU tensors), then moved.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


def _tile_starts(size, tile, overlap):
    """Offsets of tiles of length `tile` covering [0, size), each overlapping the next by at least `overlap`."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _fade_weights(starts, tile, scale):
    """Per tile, a weight along one axis at output resolution: ones, ramping linearly down to near zero across the
    stretch it shares with each neighbour, so that neighbouring tiles cross-fade."""
    weights = []
    for k, start in enumerate(starts):
        w = torch.ones(tile * scale)
        before = (starts[k - 1] + tile - start) * scale if k > 0 else 0  # shared with the previous tile
        after = (start + tile - starts[k + 1]) * scale if k + 1 < len(starts) else 0  # shared with the next tile
        if before:
            w[:before] = (torch.arange(before) + 0.5) / before
        if after:
            w[-after:] = torch.minimum(w[-after:], (torch.arange(after).flip(0) + 0.5) / after)
        weights.append(w)
    return weights


def _tiled(fn, x, tile, overlap, scale_in, scale_out):
    """Apply `fn` to overlapping square tiles of `x` and cross-fade the results.

    Positions are counted on the latent grid: a tile spans `tile` latents, `tile * scale_in` input pixels and
    `tile * scale_out` output pixels (scale_in 1, scale_out 8 to decode; the reverse to encode).

    Away from tile borders a tiled result differs from the whole-image one only through the GroupNorm statistics
    and the mid-block attention, which see one tile instead of the whole image; near a border the tile's zero padding
    also enters. The cross-fade hides the seams; wider overlaps bring the result closer to the whole-image one.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be at least 0 and less than the tile side {tile}")
    B, _, H, W = x.shape
    h, w = H // scale_in, W // scale_in
    tile_h, tile_w = min(tile, h), min(tile, w)
    rows, cols = _tile_starts(h, tile_h, overlap), _tile_starts(w, tile_w, overlap)
    fade_rows, fade_cols = _fade_weights(rows, tile_h, scale_out), _fade_weights(cols, tile_w, scale_out)
    out = total = None
    for i, fade_row in zip(rows, fade_rows):
        for j, fade_col in zip(cols, fade_cols):
            piece = x[..., i * scale_in : (i + tile_h) * scale_in, j * scale_in : (j + tile_w) * scale_in]
            y = fn(piece)  # (B, C_out, tile_h * scale_out, tile_w * scale_out)
            if out is None:
                out = y.new_zeros(B, y.shape[1], h * scale_out, w * scale_out)
                total = y.new_zeros(h * scale_out, w * scale_out)
            weight = (fade_row[:, None] * fade_col[None, :]).to(y)
            window = (slice(i * scale_out, (i + tile_h) * scale_out), slice(j * scale_out, (j + tile_w) * scale_out))
            out[(..., *window)] += y * weight
            total[window] += weight
    return out / total


# ----------------------------------------------------------------------------
# Model


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)  # image side / latent side
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def _moments(self, x):
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode(self, z):
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def posterior(self, x, tile=None, overlap=None):
        """The Gaussian posterior of images x (B, C, H, W) in [-1, 1]; mean and logvar are (B, latent_channels, H/f, W/f).

        `tile` (in latents) encodes tiles of `tile * f` pixels overlapping by `overlap` latents (default tile // 4)."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} must be multiples of {self.factor}")
        if tile is None:
            return DiagonalGaussian(self._moments(x))
        overlap = tile // 4 if overlap is None else overlap
        return DiagonalGaussian(_tiled(self._moments, x, tile, overlap, self.factor, 1))

    def decode_raw(self, z, tile=None, overlap=None):
        """Images from un-normalised latents z (what `posterior` describes), not clamped; `tile` as in `posterior`."""
        if tile is None:
            return self._decode(z)
        overlap = tile // 4 if overlap is None else overlap
        return _tiled(self._decode, z, tile, overlap, 1, self.factor)

    def encode(self, x, sample=True, generator=None, tile=None, overlap=None):
        """Images in [-1, 1] to the normalised latents a diffusion model sees. `sample=True` draws from the posterior
        (what FastGen's encoders do), `sample=False` takes its mean."""
        posterior = self.posterior(x, tile, overlap)
        z = posterior.sample(generator) if sample else posterior.mean
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents, tile=None, overlap=None):
        """Normalised latents back to images, clamped to [-1, 1]."""
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decode_raw(z, tile, overlap).clamp(-1.0, 1.0)

    def forward(self, x):
        """Reconstruction through the posterior mean, not clamped."""
        return self.decode_raw(self.posterior(x).mean)


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


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_keys(state):
    """Older diffusers files name the mid-block attention projections query/key/value/proj_attn (same shapes)."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 6 and parts[1:4] == ["mid_block", "attentions", "0"] and parts[4] in _LEGACY_ATTENTION:
            key = ".".join(parts[:4] + [_LEGACY_ATTENTION[parts[4]], parts[5]])
        renamed[key] = value
    return renamed


def load_checkpoint(model, path):
    """Load a diffusers-layout safetensors file into `model`, strictly (assign=True keeps meta-built models cheap)."""
    state = rename_legacy_keys(_read_safetensors(path))
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_DIFFUSERS_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}  # the only values this file implements


def config_from_diffusers(d):
    """Config from the fields of a diffusers AutoencoderKL config.json; values this file does not implement are an error."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config.json describes a {d['_class_name']}, not an AutoencoderKL")
    known = {f.name for f in fields(Config)} - {"repo", "subfolder"}
    allowed = known | _DIFFUSERS_IGNORED | _DIFFUSERS_FIXED.keys() | {"down_block_types", "up_block_types"}
    if unknown := set(d) - allowed:
        raise ValueError(f"config.json has fields this AutoencoderKL does not know: {sorted(unknown)}")
    for name, value in _DIFFUSERS_FIXED.items():
        if d.get(name, value) != value:
            raise ValueError(f"config.json sets {name}={d[name]!r}; only {value!r} is implemented")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})
    levels = len(cfg.block_out_channels)
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(name, [block] * levels))
        if types != [block] * levels:
            raise ValueError(f"config.json sets {name}={types}; only {levels} x {block} is implemented")
    if isinstance(cfg.sample_size, tuple):  # some configs give (height, width)
        cfg = replace(cfg, sample_size=cfg.sample_size[0])
    return replace(cfg, shift_factor=cfg.shift_factor or 0.0)  # diffusers writes null for "no shift"


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


def from_pretrained(name_or_path, subfolder="vae", config=None, device="cpu", dtype=torch.float32):
    """Build an AutoencoderKL on the meta device and load its weights strictly.

    `name_or_path`: a name in CONFIGS (its Hub repo and folder), a Hub repo id, a local directory (its `subfolder`
    if that exists, else the directory itself), or a single .safetensors file. The architecture comes from `config`
    (a CONFIGS name or a Config) if given, else from the preset, else from the config.json next to the weights.
    The model comes back in eval mode with gradients off, as the diffusion methods use it.
    """
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(f"{name_or_path} has no released weights; build it with AutoencoderKL(CONFIGS[...])")
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
        model = AutoencoderKL(config)
    load_checkpoint(model, weights)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = AutoencoderKL(CONFIGS["tiny"]).eval()
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(image, generator=torch.Generator().manual_seed(0))
        decoded = model.decode(latents)
    n = sum(p.numel() for p in model.parameters())
    shapes = " -> ".join(str(tuple(t.shape)) for t in (image, latents, decoded))
    print(f"autoencoder_kl tiny: {n:,} parameters, image -> latents -> image {shapes}")
