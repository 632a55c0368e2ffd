"""Train and distill the bidirectional video family (Wan 2.1 T2V / I2V / VACE, CogVideoX, Cosmos Predict 2.5):
fine-tuning, knowledge distillation from teacher ODE pairs, and distribution matching with GAN heads.

    python train_video.py --model wan --method dmd2 --tiny --max_steps 10               # any method, seconds on a CPU
    python train_video.py --model cogvideox --method sft --tiny --data DIR --max_steps 20
    python download.py video-latents videos/ --model wan --out latents/          # --data shards from a folder of videos
    torchrun --nproc_per_node=8 train_video.py --preset dmd2-wan-t2v-1.3b --data latents/ --prompts prompts.txt
    torchrun --nproc_per_node=8 train_video.py --preset kd-wan-t2v-1.3b --prompts prompts.txt --pairs pairs/
    torchrun --nproc_per_node=8 train_video.py --model cosmos --teacher cosmos-predict2.5-14b --method sft \\
        --data latents/ --fsdp --grad_checkpointing --precision bf16                  # FSDP2 for the 14B models
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        train_video.py --preset dmd2-wan-t2v-1.3b --data latents/ --prompts prompts.txt   # several nodes

Methods (the loss of each is written out below, with its paper's equations):
  sft   denoising score matching in the network's native prediction (flow for Wan and Cosmos, v for CogVideoX)
  kd    regression onto the teacher's ODE solutions (Luhman & Luhman 2021); the pairs are generated first into
        --pairs DIR (resumable shards), then the student regresses onto them
  dmd2  distribution matching (Yin et al. 2024): VSD gradient from the teacher (with CFG) and a fake score, GAN
        heads on frozen teacher features; critic steps (fake score, heads) between generator steps

The schedule is the chosen model file's: alpha, sigma, to_x0 / from_x0, sample_t and t_list of models/wan.py
(rectified flow, t in [0, 1], shifted times), models/cogvideox.py (DDPM timesteps in [0, 999], zero-terminal-SNR v
prediction with snr_shift_scale) or models/cosmos_predict2.py (rectified flow, t in [0, 1]); nothing here assumes one.

Data (--data DIR): *.safetensors shards of N clips each (the form train_wan_causal.py and train_flux.py read), holding
  latents        (N, C, T, H, W) float, the latents exactly as the denoiser sees them (wan_vae.encode / cogvideox_vae.encode
                 output: Wan's per-channel normalised latents, CogVideoX's latents times scaling_factor)
  metadata       "prompts": a JSON list of the N captions, encoded here through encoders.py (cached on disk once)
  anything else  of leading dimension N, passed to the denoiser as a keyword: Wan I2V `image_tokens` (N, 257, 1280)
                 and `image_latents` (N, 20, T, H, W) from wan.i2v_latents; VACE `control` (N, 96, T, H, W)
Every shard holds the same tensors; clips are read from their shard (memory-mapped) as batches draw them. Write the
shards from a folder of videos with `python download.py video-latents FOLDER --model wan|cogvideox-2b|cogvideox-5b|
cosmos_predict2 --out DIR` (GIFs, MP4s or folders of frames, captions in NAME.txt).
Without --data, prompts come from --prompts FILE (one per line): enough for kd and data-free dmd2 (a 1-step student
starts from noise; a K-step student is fed its own no-grad rollout; GAN heads need real latents, so --gan_weight 0).

Outputs in --out_dir: metrics.jsonl, samples/step_NNNNNNN.png (rows: samples, columns: frames, decoded by the VAE),
checkpoints ckpt_NNNNNNN/ (student.safetensors, ema_*.safetensors, fake_score.safetensors and
discriminator.safetensors for dmd2, state.pt with optimizer state, args.json). --resume continues exactly.
"""

import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from encoders import TextEncoder, cached_embeddings
from models import cogvideox, cogvideox_vae, cosmos_predict2, wan, wan_vae
from sample import image_grid, to_uint8

# model -> (model file, network class, tiny config, text encoder family, default text encoder repo, VAE file, VAE
# preset, the attributes that hold the transformer blocks)
# fmt: off
MODELS = {
    "wan": (wan, wan.WanModel, "tiny", "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", wan_vae, "wan2.1", ("blocks", "vace_blocks")),
    "cogvideox": (cogvideox, cogvideox.CogVideoXTransformer, "tiny-2b", "cogvideox", "THUDM/CogVideoX-2b", cogvideox_vae, "cogvideox-2b", ("transformer_blocks",)),
    "cosmos": (cosmos_predict2, cosmos_predict2.CosmosPredict2, "tiny", "cosmos", None, wan_vae, "wan2.1", ("blocks",)),
}
TINY_PROMPTS = ["a red fox runs through snow", "waves break on a rocky shore", "a city street at night, rain", "a cat sleeps on a sofa"]
# fmt: on
WAN_T_LIST = ",".join(str(t) for t in wan.SELF_FORCING_T_LIST)  # FastGen's 4-step list [0.999, 0.937, 0.833, 0.624, 0]

# Named presets: FastGen's bidirectional video experiment configs (NVlabs/FastGen fastgen/configs/experiments/{WanT2V,
# WanI2V,WanV2V,CogVideoX,CosmosPredict2}, commit 34f30e8; reference/methods.md §7.1, §7.3, §7.9) as flag defaults,
# each a few small bases joined with `|` plus what it changes; tests/test_presets.py compares them with FastGen value
# by value and README's "Presets vs FastGen" lists the deliberate differences. These configs set only a per-GPU batch
# (their global batch is that times the GPU count; Wan 1.3B DMD2 alone fixes 64): --micro_batch is FastGen's per-GPU
# batch and --batch_size the global one of a node of 8 GPUs (more GPUs: pass --batch_size per-GPU x GPUs).
_WAN = dict(
    model="wan",
    teacher="wan2.1-t2v-1.3b",
    precision="bf16",
    latent_shape="16,21,60,104",
    guidance=5.0,
)
_WAN14 = dict(
    _WAN,
    teacher="wan2.1-t2v-14b",
    fsdp=True,
    grad_checkpointing=True,
)
_WAN_I2V = _WAN14 | dict(teacher="wan2.1-i2v-14b-480p")
_VACE = dict(
    _WAN,
    teacher="wan2.1-vace-1.3b",
)
_COG = dict(
    model="cogvideox",
    teacher="cogvideox-5b",
    precision="bf16",
    latent_shape="16,13,60,90",
    guidance=6.0,
)
_COSMOS = dict(
    model="cosmos",
    teacher="cosmos-predict2.5-2b",
    precision="bf16",
    latent_shape="16,24,60,104",
    guidance=3.0,
)
_COSMOS14 = dict(
    _COSMOS,
    teacher="cosmos-predict2.5-14b",
    fsdp=True,
    grad_checkpointing=True,
)
_SFT = dict(
    method="sft",
    lr=5e-5,
    t_sampler="uniform",
    student_steps=50,  # the grids sample the fine-tuned model with FastGen's 50 steps
    micro_batch=1,
    batch_size=8,
    max_steps=1_000_000,
)
_KD = dict(
    method="kd",
    lr=7e-5,
    micro_batch=2,
    batch_size=16,
    max_steps=6000,
    student_steps=1,
)
_DMD2 = dict(
    method="dmd2",
    lr=1e-5,
    gan_weight=0.03,
    gan_same_t_noise=True,
    t_sampler="shifted",
    shift=5.0,
    student_sample_type="ode",
    student_steps=4,
    t_list=WAN_T_LIST,
    student_update_freq=5,
)
_TWO_STEPS = dict(
    student_steps=2,
    t_list="0.999,0.833,0",
)
_SFT_COSMOS = dict(
    _SFT,
    lr=1e-5,
    student_steps=35,
    max_steps=10_000,
)
_DMD2_COSMOS = dict(
    _DMD2,
    disc_blocks="13,20,27",
    micro_batch=1,
    batch_size=8,
    max_steps=10_000,
)
PRESETS = {
    # Wan 2.1 T2V (WanT2V/config_*.py)
    "sft-wan-t2v-1.3b": _WAN | _SFT,
    "sft-wan-t2v-14b": _WAN14 | _SFT,
    "kd-wan-t2v-1.3b": _WAN | _KD,
    "kd-wan-t2v-1.3b-4step": dict(
        _WAN | _KD,
        max_steps=10_000,
        student_steps=4,
        t_list=WAN_T_LIST,
    ),
    # FastGen's headline 4-step bidirectional Wan 1.3B DMD2 student.
    "dmd2-wan-t2v-1.3b": dict(
        _WAN | _DMD2,
        disc_blocks="15,22,29",
        batch_size=64,
        micro_batch=1,
        max_steps=6000,
    ),
    "dmd2-wan-t2v-14b": dict(
        _WAN14 | _DMD2 | _TWO_STEPS,
        disc_blocks="21,30,39",
        micro_batch=2,
        batch_size=16,
        max_steps=1_000_000,
    ),
    # Wan 2.1 I2V 14B 480p (WanI2V/config_*_14b.py): --data shards carry image_tokens and image_latents.
    "sft-wan-i2v-14b": _WAN_I2V | _SFT,
    "dmd2-wan-i2v-14b": dict(
        _WAN_I2V | _DMD2 | _TWO_STEPS,
        disc_blocks="21,30,39",
        micro_batch=1,
        batch_size=8,
        max_steps=5000,
    ),
    # Wan 2.1 VACE (WanV2V/config_*.py): --data shards carry the control input.
    "sft-wan-vace-1.3b": _VACE | _SFT,
    "sft-wan-vace-14b": dict(
        _WAN14 | _SFT,
        teacher="wan2.1-vace-14b",
    ),
    "dmd2-wan-vace-1.3b": dict(
        _VACE | _DMD2,
        guidance=4.0,
        ema="0.9999",
        disc_blocks="15,22,29",
        micro_batch=2,
        batch_size=16,
        max_steps=1_000_000,
    ),
    # CogVideoX (CogVideoX/config_*.py); t in DDPM timesteps, FastGen's [0, 1) times x 1000.
    "sft-cogvideox-5b": dict(
        _COG | _SFT,
        lr=2e-5,
        micro_batch=2,
        batch_size=16,
    ),
    "kd-cogvideox-2b": dict(
        _COG | _KD,
        teacher="cogvideox-2b",
        lr=1e-4,
    ),
    "dmd2-cogvideox-5b": dict(
        _COG | _DMD2,
        t_sampler="uniform",
        t_list="999,937,833,624,0",
        disc_blocks="21,31,41",
        micro_batch=2,
        batch_size=16,
        max_steps=10_000,
    ),
    # Cosmos Predict 2.5 (CosmosPredict2/config_*.py); v2w: Video2World, the first latent frame given.
    "sft-cosmos-2b": _COSMOS | _SFT_COSMOS,
    "sft-cosmos-14b": _COSMOS14 | _SFT_COSMOS,
    "sft-cosmos-2b-v2w": dict(
        _COSMOS | _SFT_COSMOS,
        cond_frames=1,
    ),
    "dmd2-cosmos-2b": _COSMOS | _DMD2_COSMOS,
    "dmd2-cosmos-14b": dict(
        _COSMOS14 | _DMD2_COSMOS,
        disc_blocks="18",
    ),
    "dmd2-cosmos-2b-v2w": dict(
        _COSMOS | _DMD2_COSMOS,
        cond_frames=1,
    ),
}

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="presets (flag defaults; explicit flags win):\n" + "\n".join(f"  {k:22s} {' '.join(f'--{a}={v}' for a, v in p.items())}" for k, p in PRESETS.items()))
parser.add_argument("--preset", choices=sorted(PRESETS), default="", help="named flag defaults (see below)")
parser.add_argument("--method", choices=["sft", "kd", "dmd2"], default="dmd2")
# models and data
parser.add_argument("--model", choices=sorted(MODELS), default="wan", help="model file: wan (T2V/I2V/VACE), cogvideox or cosmos")
parser.add_argument("--teacher", default="", help="CONFIGS name, Hub repo or local path of the pretrained network (student init; teacher of kd/dmd2)")
parser.add_argument("--arch", default="", help="CONFIGS name of the architecture for --tiny runs or a --teacher file without config (default: the tiny one)")
parser.add_argument("--student", default="", help="optional .safetensors to start the student from instead of the teacher")
parser.add_argument("--data", default="", help="DIR of latent shards (N clips each; format in the docstring); sft and the GAN's real branch need it")
parser.add_argument("--prompts", default="", help="text file, one prompt per line (data-free dmd2, kd pairs, sample grids)")
parser.add_argument("--neg_prompt", default="", help="negative prompt of classifier-free guidance (and --cond_dropout)")
parser.add_argument("--text_encoder", default="", help="Hub repo or folder of the text encoder (default: the family's pipeline)")
parser.add_argument("--text_cache", default="", help="where prompt embeddings are cached (default OUT_DIR/text_cache)")
parser.add_argument("--vae", default="", help="VAE for the sample grids: a CONFIGS name or path of the family's VAE file, or 'none'")
parser.add_argument("--latent_shape", default="", help="C,T,H,W of generated latents without --data (default: the tiny 4,3,8,8)")
parser.add_argument("--cond_frames", type=int, default=0, help="cosmos Video2World: the first N latent frames of --data are given")
parser.add_argument("--tiny", action="store_true", help="tiny random networks and encoders: checks the code path in seconds")
# optimisation and scale
parser.add_argument("--batch_size", type=int, default=4, help="global batch (all GPUs); gradient accumulation makes up the rest. FastGen's video configs set a per-GPU batch: the presets convert (--micro_batch)")
parser.add_argument("--micro_batch", type=int, default=0, help="per-process batch per forward (0 = batch_size / world)")
parser.add_argument("--max_steps", type=int, default=1000)
parser.add_argument("--lr", type=float, default=1e-5)
parser.add_argument("--critic_lr", type=float, default=0.0, help="dmd2: lr of the fake score and the GAN heads (0 = --lr)")
parser.add_argument("--beta1", type=float, default=0.9)
parser.add_argument("--beta2", type=float, default=0.999)
parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW, FastGen's default optimizer")
parser.add_argument("--grad_clip", type=float, default=10.0, help="max gradient norm of the student (non-finite entries are zeroed first)")
parser.add_argument("--ema", default="", help="comma list of constant EMA rates of the student, e.g. 0.9999 (empty: none)")
parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (and FSDP2 param dtype), fp32 weights and reductions")
parser.add_argument("--fsdp", action="store_true", help="FSDP2: shard each transformer block, then the rest; meta-device init, weights loaded once")
parser.add_argument("--grad_checkpointing", action="store_true", help="recompute each transformer block's activations in the backward pass")
# time, guidance and the student's steps
parser.add_argument("--t_sampler", default=None, help="training t distribution of the model file's sample_t (wan/cosmos: shifted, logitnormal, uniform; cogvideox: logitnormal, uniform, discrete)")
parser.add_argument("--shift", type=float, default=None, help="time shift of wan/cosmos sample_t and t_list (default: the file's 5)")
parser.add_argument("--p_mean", type=float, default=0.0)
parser.add_argument("--p_std", type=float, default=1.0)
parser.add_argument("--t_min", type=float, default=None, help="default: the model file's (in its own time units)")
parser.add_argument("--t_max", type=float, default=None)
parser.add_argument("--cond_dropout", type=float, default=0.0, help="sft: probability of training on the negative prompt")
parser.add_argument("--guidance", type=float, default=1.0, help="teacher classifier-free guidance (kd pairs, dmd2 targets, teacher grids)")
parser.add_argument("--student_steps", type=int, default=4, help="sampling steps of the student")
parser.add_argument("--t_list", default="", help="comma list of the student's times, first to last 0 (default: the model file's t_list)")
parser.add_argument("--student_sample_type", choices=["sde", "ode"], default="sde", help="re-noise with fresh noise (sde) or the predicted noise (ode)")
parser.add_argument("--teacher_steps", type=int, default=48, help="teacher ODE steps for kd pairs and teacher grids (a multiple of the 4-step path)")
# dmd2 and kd
parser.add_argument("--student_update_freq", type=int, default=5, help="dmd2: a generator step every N steps, critic steps between")
parser.add_argument("--gan_weight", type=float, default=0.0, help="dmd2: weight of the generator's GAN loss (0 = no GAN heads)")
parser.add_argument("--disc_blocks", default="", help="dmd2: teacher blocks whose features the GAN heads read (default: the middle one)")
parser.add_argument("--gan_same_t_noise", action=argparse.BooleanOptionalAction, default=False, help="dmd2: noise real latents with the fake sample's t and noise")  # fmt: skip
parser.add_argument("--pairs", default="", help="kd: DIR of teacher pairs (generated there first when incomplete; default OUT_DIR/pairs)")
parser.add_argument("--num_pairs", type=int, default=64, help="kd: teacher trajectories to generate")
parser.add_argument("--pairs_batch", type=int, default=4, help="kd: trajectories per shard")
# evaluation, checkpoints, logging
parser.add_argument("--eval_every", type=int, default=500, help="sample grid every N steps (0 = never)")
parser.add_argument("--eval_n", type=int, default=4, help="videos in the sample grid")
parser.add_argument("--save_every", type=int, default=1000)
parser.add_argument("--out_dir", default="out/train_video")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out_dir")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
parser.add_argument("--wandb", default="", help="also log to this wandb project (if wandb is installed)")
# fmt: on


def parse_args(argv=None):
    """Flags over the preset over argparse defaults."""
    known = parser.parse_known_args(argv)[0]
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    if args.tiny:  # the same code path at CPU size
        args.batch_size, args.eval_n, args.teacher_steps = min(args.batch_size, 4), min(args.eval_n, 2), min(args.teacher_steps, 8)  # fmt: skip
        args.latent_shape = "" if args.latent_shape.startswith("16,") else args.latent_shape
    return args


def rng_seed(*parts):
    """A seed that is a fixed function of integers (Python's hash() of strings changes from run to run)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % 2**63
    return seed


# ----------------------------------------------------------------------------
# The schedule: the chosen model file's own functions with this network's constants bound (CogVideoX's schedule also
# takes snr_shift_scale; rf files take a time shift). Times are float64 tensors in the file's own units.


def bind(fn, **consts):
    """fn with those of `consts` that it takes (and that are not None) bound by keyword."""
    params = inspect.signature(fn).parameters
    return functools.partial(fn, **{k: v for k, v in consts.items() if k in params and v is not None})


def make_schedule(module, cfg, args):
    s = getattr(cfg, "snr_shift_scale", None)
    sched = argparse.Namespace(
        alpha=bind(module.alpha, snr_shift_scale=s),
        sigma=bind(module.sigma, snr_shift_scale=s),
        to_x0=bind(module.to_x0, pred_type=module.PRED_TYPE, snr_shift_scale=s),
        from_x0=bind(module.from_x0, pred_type=module.PRED_TYPE, snr_shift_scale=s),
        sample_t=bind(
            module.sample_t,
            kind=args.t_sampler,
            shift=args.shift,
            p_mean=args.p_mean,
            p_std=args.p_std,
            t_min=args.t_min,
            t_max=args.t_max,
        ),  # fmt: skip
        t_list=bind(module.t_list, shift=args.shift),
    )
    if args.t_list:
        times = torch.tensor([float(v) for v in args.t_list.split(",")], dtype=torch.float64)
        if len(times) != args.student_steps + 1 or times[-1] != 0:
            raise SystemExit(f"error: --t_list needs {args.student_steps + 1} decreasing times ending in 0, got {args.t_list}")  # fmt: skip
        sched.student_times = times
    else:
        sched.student_times = sched.t_list(args.student_steps)
    return sched


def bcast(t, x):
    """(B,) -> (B, 1, 1, 1, 1) in float64 on x's device."""
    return torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(sched, x0, eps, t):
    """The forward process x_t = alpha(t) x0 + sigma(t) eps, in float64 (methods.md §1.1 forward_process)."""
    a, s = bcast(sched.alpha(t), x0), bcast(sched.sigma(t), x0)
    return (a * x0.double() + s * eps.double()).to(x0.dtype)


def denoise(net, sched, x, t, text, cond, feature_indices=(), features_only=False):
    """The network's x0 prediction: its native output converted by the model file's to_x0. Cosmos Video2World
    (`cond_latents` in cond): the given frames are fed at time 0 (FastGen's conditional_frame_timestep) and kept in
    x0. With feature_indices, also the features of those blocks for the GAN heads (only those: features_only)."""
    t_in = t
    if "cond_latents" in cond:
        t_in = t[:, None].expand(-1, x.shape[2]).clone()
        t_in[:, : cond["cond_latents"].shape[2]] = 0
    if features_only:
        return net(x, t_in, text, **cond, feature_indices=feature_indices, features_only=True)
    out = net(x, t_in, text, **cond, feature_indices=feature_indices) if feature_indices else net(x, t_in, text, **cond)
    out, features = out if feature_indices else (out, None)
    x0 = sched.to_x0(x, out, t_in)
    if "cond_latents" in cond:
        x0 = cosmos_predict2.replace_frames(x0, cond["cond_latents"])
    return (x0, features) if feature_indices else x0


def guided_x0(teacher, sched, x, t, text, neg_text, cond, guidance):
    """Classifier-free guidance in x0 space, x0_c + (w - 1)(x0_c - x0_u) (methods.md §7.9 step 5, Q11)."""
    x0 = denoise(teacher, sched, x, t, text, cond)
    if guidance != 1.0:
        x0 = x0 + (guidance - 1) * (x0 - denoise(teacher, sched, x, t, neg_text.expand_as(text), cond))
    return x0


@torch.no_grad()
def student_sample(net, sched, noise, text, cond, times, sample_type, upto=None):
    """The K-step student sampler (methods.md §5.2): x = sigma(t_0) z; predict x0, move to the next time with fresh
    noise (sde) or the predicted noise (ode, DDIM-like). Returns x0, or with `upto` the list of states x at
    times[0..upto]."""
    x = (bcast(sched.sigma(times[:1]), noise) * noise.double()).to(noise.dtype)
    states = [x]
    for k in range(len(times) - 1 if upto is None else upto):
        t = times[k].expand(len(x)).to(x.device)
        x0 = denoise(net, sched, x, t, text, cond)
        if times[k + 1] > 0:
            eps = torch.randn_like(x) if sample_type == "sde" else sched.from_x0(x, x0, t, pred_type="eps")
            x = add_noise(sched, x0, eps, times[k + 1].expand(len(x)).to(x.device))
            states.append(x)
    return states if upto is not None else x0


@torch.no_grad()
def teacher_ode(teacher, sched, noise, text, neg_text, cond, guidance, times):
    """The teacher's deterministic sampler on `times`: DDIM steps x' = alpha(t') x0 + sigma(t') eps_hat with the
    guided x0 (for rectified flow this is exactly Euler on the flow; for CogVideoX it is its DDIM). Returns all
    states x(times[k]) and the final x0."""
    x = (bcast(sched.sigma(times[:1]), noise) * noise.double()).to(noise.dtype)
    states = [x]
    for k in range(len(times) - 1):
        t = times[k].expand(len(x)).to(x.device)
        x0 = guided_x0(teacher, sched, x, t, text, neg_text, cond, guidance)
        if times[k + 1] > 0:
            x = add_noise(sched, x0, sched.from_x0(x, x0, t, pred_type="eps"), times[k + 1].expand(len(x)).to(x.device))  # fmt: skip
            states.append(x)
    return states, x0


# ----------------------------------------------------------------------------
# Data: latents (B, C, T, H, W), text (B, L, D) and the extra network inputs, each batch a pure function of
# (step, shard) so that --resume is exact and the global batch is the same however it is split.


class LatentDataset:
    """DIR/*.safetensors shards of N clips each: `latents` (N, C, T, H, W), the N prompts as a JSON list in the
    metadata key "prompts", and any other tensor of leading dimension N passed to the network as a keyword. Only the
    index (shard, row) and the prompts are held; `load` reads one clip from its shard (memory-mapped) when a batch
    needs it. Every prompt is encoded once up front through `encode` (a collective under torchrun) into the text cache,
    which `lookup` (local) reads per clip."""

    def __init__(self, path, encode, lookup):
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
        if not names:
            raise SystemExit(f"error: --data {path} holds no .safetensors shards (format: see train_video.py --help)")
        self.rows, self.prompts, self.keys, self.lookup = [], [], None, lookup
        for name in names:
            file = os.path.join(path, name)
            with safe_open(file, "pt") as f:
                meta, keys = f.metadata() or {}, sorted(f.keys())
                shapes = {k: f.get_slice(k).get_shape() for k in keys}
            if "prompts" not in meta or len(shapes.get("latents", [])) != 5:
                raise SystemExit(
                    f"error: {file} is not a shard of latent clips: --data takes *.safetensors shards, each with `latents` "
                    "(N, C, T, H, W) and the N prompts as a JSON list in the metadata key 'prompts' (one file per clip "
                    "with `latents` (C, T, H, W) and a metadata 'prompt' is the old format; "
                    "`python download.py video-latents` writes the shards)"
                )  # fmt: skip
            n, prompts = shapes["latents"][0], json.loads(meta["prompts"])
            if len(prompts) != n or any(shape[:1] != [n] for shape in shapes.values()):
                raise SystemExit(f"error: {file}: {len(prompts)} prompts and tensors {shapes}; all need N = {n} rows")
            if "text" in keys:
                raise SystemExit(f"error: {file}: 'text' is the prompts' embedding, made here; rename that tensor")
            if self.keys is not None and keys != self.keys:
                raise SystemExit(f"error: {file} holds {keys}, the shards before it {self.keys}; every shard needs the same tensors")  # fmt: skip
            self.keys = keys
            self.rows += [(file, i) for i in range(n)]
            self.prompts += prompts
        unique = sorted(set(self.prompts))
        for i in range(0, len(unique), 64):  # into the cache, a few at a time (the embeddings are not kept here)
            encode(unique[i : i + 64])

    def load(self, i):
        """Clip i: its tensors (latents (C, T, H, W) and the keywords) and `text`, its prompt's embedding."""
        file, row = self.rows[i]
        with safe_open(file, "pt") as f:
            clip = {k: f.get_slice(k)[row : row + 1][0] for k in self.keys}
        return clip | {"text": self.lookup([self.prompts[i]])[0]}

    def __len__(self):
        return len(self.rows)


def make_batches(args, dataset, prompt_text, shape):
    """(step, shard, n) -> (latents or None, text, cond dict) on the CPU."""

    def batch(step, shard, n):
        g = torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0))
        if dataset is None:
            index = torch.randint(len(prompt_text), (n,), generator=g)
            return None, prompt_text[index], {}
        clips = [dataset.load(int(i)) for i in torch.randint(len(dataset), (n,), generator=g)]
        x0 = torch.stack([c["latents"] for c in clips]).float()
        if x0.shape[1] != shape[0]:
            raise SystemExit(f"error: the data's latents have {x0.shape[1]} channels; the model takes {shape[0]}")
        cond = {k: torch.stack([c[k] for c in clips]).float() for k in clips[0] if k not in ("latents", "text")}
        if args.cond_frames:
            cond["cond_latents"] = x0[:, :, : args.cond_frames]
        return x0, torch.stack([c["text"] for c in clips]).float(), cond

    return batch


# ----------------------------------------------------------------------------
# Losses. Each takes the trainable network `net` (DDP/FSDP-wrapped when distributed), the batch (x0 is None without
# --data) and returns (loss, logs). All means are element means (methods.md Q12).


def sft_loss(net, sched, x0, text, neg_text, cond, args):
    """Denoising score matching in the network's native prediction, unweighted (methods.md §4 DSM, §7.1): with
    x_t = alpha x0 + sigma eps, E ||net(x_t, t) - target||^2 where target = from_x0(x_t, x0, t), i.e. eps - x0 for
    the flow of Wan/Cosmos and alpha eps - sigma x0 for CogVideoX's v. Prompts drop to the negative one with
    probability --cond_dropout (what classifier-free guidance needs)."""
    t = sched.sample_t(len(x0)).to(x0.device)
    eps = torch.randn_like(x0)
    x_t = add_noise(sched, x0, eps, t)
    if args.cond_dropout > 0:
        drop = torch.rand(len(x0), device=x0.device) < args.cond_dropout
        text = torch.where(drop[:, None, None], neg_text.expand_as(text), text)
    t_in = t
    if "cond_latents" in cond:  # Video2World: given frames at t = 0, left out of the loss
        t_in = t[:, None].expand(-1, x0.shape[2]).clone()
        t_in[:, : args.cond_frames] = 0
    target = sched.from_x0(x_t, x0, t_in)
    err = (net(x_t, t_in, text, **cond).float() - target.float()).square()
    return err[:, :, args.cond_frames :].mean(), {}


def kd_loss(net, sched, pairs, text, cond, args):
    """Knowledge distillation (Luhman & Luhman 2021; methods.md §7.3): 0.5 ||G(x_k, t_k) - x0_teacher||^2, where x_k
    is the teacher's state at one of the student's K times (drawn uniformly), the teacher having started from the
    same noise. `pairs` (B, P + 1, C, T, H, W): P states at the teacher path's times, then the teacher's x0."""
    states, target = pairs[:, :-1], pairs[:, -1]
    K, P = args.student_steps, states.shape[1]
    pick = torch.randint(K, (len(pairs),), device=pairs.device) * (P // K)
    x_in = states[torch.arange(len(pairs), device=pairs.device), pick]
    x0_student = denoise(net, sched, x_in, sched.path_times.to(pairs.device)[pick], text, cond)
    return 0.5 * (x0_student.float() - target.float()).square().mean(), {}


def student_input(net, sched, x0_real, noise, text, cond, args):
    """The generator's input and time (methods.md §7.9, Q6): 1 step: sigma(t_0) z at t_0. K steps: t_s uniform among
    the K non-zero student times and, with real latents, x0_real noised to it (FastGen's few-step DMD2); without data,
    the student's own no-grad rollout to t_s (backward simulation)."""
    times = sched.student_times.to(noise.device)
    k = torch.randint(args.student_steps, (len(noise),), device=noise.device)
    if args.student_steps == 1:
        return (bcast(sched.sigma(times[:1]), noise) * noise.double()).to(noise.dtype), times[k]
    if x0_real is not None:
        return add_noise(sched, x0_real, noise, times[k]), times[k]
    states = student_sample(net, sched, noise, text, cond, times, args.student_sample_type, upto=int(k.max()))
    return torch.stack(states, 1)[torch.arange(len(noise), device=noise.device), k], times[k]


def vsd_loss(g, x_teacher, x_fake):
    """The distribution-matching gradient (DMD Eq. 7) as a regression onto a fixed target: grad = w (x_fake - x_teacher)
    with w = 1 / mean|g - x_teacher| per sample (DMD Eq. 8); 0.5 ||g - sg(g - grad)||^2 has gradient grad / numel
    with respect to g (methods.md §4). Weights in float32."""
    with torch.no_grad():
        w = 1 / ((g.float() - x_teacher.float()).abs().mean(dim=tuple(range(1, g.ndim)), keepdim=True) + 1e-6)
        target = g.float() - w * (x_fake.float() - x_teacher.float())
    return 0.5 * (g.float() - target).square().mean()


def dmd2_generator_loss(net, student, teacher, fake, disc, sched, x0_real, text, neg_text, cond, args):
    """DMD2's generator step (DMD2 Eq. 2 + Sec. 4.3; methods.md §7.9): g = G(x_in, t_s), x_t = alpha(t) g + sigma(t) eps,
    VSD between the guided teacher x0 and the fake score's x0 at x_t, plus gan_weight softplus(-D(teacher features))
    with the GAN gradient flowing through the frozen teacher into g."""
    noise = torch.randn(x0_real.shape if x0_real is not None else sched.shape, device=text.device, dtype=text.dtype)
    x_in, t_s = student_input(student, sched, x0_real, noise, text, cond, args)
    g = denoise(net, sched, x_in, t_s, text, cond)
    t = sched.sample_t(len(g)).to(g.device)
    x_t = add_noise(sched, g, torch.randn_like(g), t)
    with torch.no_grad():
        x_fake = denoise(fake, sched, x_t, t, text, cond)
    logs, loss_gan = {}, g.new_zeros((), dtype=torch.float32)
    if disc is not None:
        x_teacher, features = denoise(teacher, sched, x_t, t, text, cond, feature_indices=disc.indices)
        loss_gan = F.softplus(-disc(features).float()).mean()
        logs["gan_loss_gen"] = loss_gan.item()
    else:
        with torch.no_grad():
            x_teacher = denoise(teacher, sched, x_t, t, text, cond)
    x_teacher = x_teacher.detach()
    if args.guidance != 1.0:
        with torch.no_grad():
            x_uncond = denoise(teacher, sched, x_t, t, neg_text.expand_as(text), cond)
            x_teacher = x_teacher + (args.guidance - 1) * (x_teacher - x_uncond)
    loss_vsd = vsd_loss(g, x_teacher, x_fake)
    logs["vsd_loss"] = loss_vsd.item()
    return loss_vsd + args.gan_weight * loss_gan, logs


def dmd2_critic_loss(student, teacher, fake_net, disc_net, disc, sched, x0_real, text, cond, args):
    """DMD2's critic step: the fake score learns the student's distribution by denoising score matching in x0 space
    on student samples, mean (F_x0(x_t) - g)^2 (FastGen's Wan config: fake score x0); the GAN heads learn to tell
    noised real latents from noised student samples, softplus(D(fake)) + softplus(-D(real))."""
    noise = torch.randn(x0_real.shape if x0_real is not None else sched.shape, device=text.device, dtype=text.dtype)
    with torch.no_grad():
        x_in, t_s = student_input(student, sched, x0_real, noise, text, cond, args)
        g = denoise(student, sched, x_in, t_s, text, cond)
    t = sched.sample_t(len(g)).to(g.device)
    eps = torch.randn_like(g)
    x_t = add_noise(sched, g, eps, t)
    loss_fake = (denoise(fake_net, sched, x_t, t, text, cond).float() - g.float()).square().mean()
    logs = {"fake_score_loss": loss_fake.item()}
    if disc_net is None:
        return loss_fake, logs
    t_real, eps_real = (t, eps) if args.gan_same_t_noise else (sched.sample_t(len(g)).to(g.device), torch.randn_like(g))
    x_real = add_noise(sched, x0_real, eps_real, t_real)
    with torch.no_grad():
        both = torch.cat([x_t, x_real]), torch.cat([t, t_real]), torch.cat([text, text])
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        features = denoise(teacher, sched, *both, cond2, feature_indices=disc.indices, features_only=True)
    logits_fake, logits_real = disc_net(features).float().chunk(2)
    loss_disc = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
    logs["gan_loss_disc"] = loss_disc.item()
    return loss_fake + loss_disc, logs


class Discriminator(nn.Module):
    """GAN heads on frozen teacher block features (DMD2 Sec. 4.3), one per feature map (B, C, T, H, W): FastGen's
    simple video head (`dit_simple_conv3d`, methods.md §3): Conv3d k(2,4,4) s2 to C/2 channels, GroupNorm, LeakyReLU
    0.2, a 1x1x1 conv to one channel and the mean over positions. Output: logits (B, heads).

    NOTE: FastGen's Wan experiments use the larger `multiscale_down_mlp_large` head (~50M parameters) on the same
    blocks; this one keeps the same inputs and loss with a far smaller head."""

    def __init__(self, indices, channels):
        super().__init__()
        self.indices = tuple(indices)  # which teacher blocks the heads read, in order
        self.heads = nn.ModuleList()
        for c in channels:
            hidden = max(c // 2, 4)
            groups = max(g for g in range(1, 33) if hidden % g == 0)
            self.heads.append(nn.Sequential(nn.Conv3d(c, hidden, (2, 4, 4), 2, 1), nn.GroupNorm(groups, hidden),
                                            nn.LeakyReLU(0.2), nn.Conv3d(hidden, 1, 1)))  # fmt: skip

    def forward(self, features):
        return torch.cat([head(f.float()).flatten(1).mean(1, keepdim=True) for head, f in zip(self.heads, features)], 1)


# ----------------------------------------------------------------------------
# Knowledge-distillation pairs: the teacher's ODE from noise, with the states at the 4-step path times kept.


def path_times(sched, args):
    """The teacher's fine grid and the indices of the P-state path on it. P = 4 when the student's K steps divide 4
    and no --t_list is given (methods.md §7.3: the K-step grid is a subsample of the 4-step path), else P = K on the
    student's own list. The fine grid is the model file's t_list(teacher_steps) where it passes through the path's
    times, else each path interval split evenly."""
    P = 4 if 4 % args.student_steps == 0 and not args.t_list else args.student_steps
    if args.teacher_steps % P:
        raise SystemExit(f"error: --teacher_steps {args.teacher_steps} must be a multiple of the {P}-state path")
    coarse = sched.student_times if P == args.student_steps else sched.t_list(P)
    m = args.teacher_steps // P
    fine = sched.t_list(args.teacher_steps)
    if not torch.allclose(fine[::m], coarse, rtol=0, atol=1e-9):
        fine = torch.cat([torch.linspace(float(a), float(b), m + 1, dtype=torch.float64)[:-1] for a, b in zip(coarse[:-1], coarse[1:])] + [coarse[-1:]])  # fmt: skip
    return fine, torch.arange(P) * m


def generate_pairs(args, sched, teacher, prompt_text, neg_text, shape, device, rank, world):
    """Write --num_pairs teacher trajectories to --pairs DIR as shards pairs_NNNNN.safetensors (`path` (B, P, C, T, H,
    W), `x0`, `prompt` indices), each written atomically from its own seed; shards already on disk are kept, so an
    interrupted run resumes. pairs.json records the path times and the shards."""
    os.makedirs(args.pairs, exist_ok=True)
    fine, index = path_times(sched, args)
    shards = math.ceil(args.num_pairs / args.pairs_batch)
    names = [f"pairs_{i:05d}.safetensors" for i in range(shards)]
    todo = [i for i in range(shards) if not os.path.exists(os.path.join(args.pairs, names[i]))]
    for i in tqdm(todo[rank::world] if not args.fsdp else todo, disable=rank != 0, desc="teacher pairs", unit="shard"):
        n = min(args.pairs_batch, args.num_pairs - i * args.pairs_batch)
        g = torch.Generator().manual_seed(rng_seed(args.seed, i, 7))
        noise = torch.randn(n, *shape, generator=g).to(device)
        prompt = torch.randint(len(prompt_text), (n,), generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            states, x0 = teacher_ode(teacher, sched, noise, prompt_text[prompt].to(device), neg_text, {}, args.guidance, fine)  # fmt: skip
        if rank == 0 or not args.fsdp:
            path = torch.stack([states[j] for j in index.tolist()], 1)
            tmp = os.path.join(args.pairs, names[i] + ".tmp")
            save_file({"path": path.float().cpu().contiguous(), "x0": x0.float().cpu().contiguous(), "prompt": prompt}, tmp)  # fmt: skip
            os.replace(tmp, os.path.join(args.pairs, names[i]))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(args.pairs, "pairs.json"), "w") as f:
            json.dump({"times": fine[index].tolist(), "shards": names, "model": args.model, "guidance": args.guidance}, f)  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
    return fine[index]


def load_pairs(args, prompt_text):
    """(step, shard, n) -> (pairs (n, P + 1, C, T, H, W), text, {}) from the --pairs shards."""
    with open(os.path.join(args.pairs, "pairs.json")) as f:
        meta = json.load(f)
    shards = [load_file(os.path.join(args.pairs, name)) for name in meta["shards"]]
    pairs = torch.cat([torch.cat([s["path"], s["x0"][:, None]], 1) for s in shards])
    prompts = torch.cat([s["prompt"] for s in shards])
    if int(prompts.max()) >= len(prompt_text):
        raise SystemExit(f"error: {args.pairs} was made with more prompts than --prompts gives; use the same prompts")

    def batch(step, shard, n):
        index = torch.randint(len(pairs), (n,), generator=torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0)))  # fmt: skip
        return pairs[index], prompt_text[prompts[index]], {}

    return batch, torch.tensor(meta["times"], dtype=torch.float64)


# ----------------------------------------------------------------------------
# Networks at scale: meta-device build, activation checkpointing, FSDP2 sharding per block, weights loaded once.


def transformer_blocks(model, attrs):
    return [block for attr in attrs for block in getattr(model, attr, [])]


def checkpoint_blocks(model, attrs):
    """Recompute each transformer block in the backward pass (non-reentrant torch.utils.checkpoint); module names,
    and so checkpoint keys, stay as they are."""
    for block in transformer_blocks(model, attrs):
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def place(make, state, args, device, attr, trainable):
    """A network with the weights `state` (a full state dict, needed on rank 0 only under FSDP): FSDP2 builds it on
    the meta device, shards every transformer block then the root (bf16 compute, fp32 reductions with --precision
    bf16), allocates its shard and receives the weights broadcast from rank 0; otherwise it is built and loaded
    here. Frozen networks are sharded too (the teacher is as large as the student)."""
    if not args.fsdp:
        with torch.device("meta"):
            model = make()
        model.to_empty(device=device).load_state_dict(state)  # a copy: student, teacher and fake score never share
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        with torch.device("meta"):
            model = make()
        if args.grad_checkpointing and trainable:
            checkpoint_blocks(model, attr)
        bf16 = args.precision == "bf16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in transformer_blocks(model, attr):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device=device)
        # a shallow copy: the broadcast replaces the dict's entries by the shards, and the teacher's state is reused
        set_model_state_dict(
            model, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        return model.train(trainable).requires_grad_(trainable)
    if args.grad_checkpointing and trainable:
        checkpoint_blocks(model, attr)
    return model.train(trainable).requires_grad_(trainable)


def full_state_dict(model, fsdp):
    """The full state dict on the CPU (collective under FSDP; rank 0 gets it, the others an empty dict)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model, optimizer, fsdp, load=None):
    """Get (or with `load`, set) an optimizer's full state; under FSDP through torch.distributed.checkpoint."""
    if not fsdp:
        return optimizer.load_state_dict(load) if load is not None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (  # fmt: skip
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if load is not None:
        return set_optimizer_state_dict(model, optimizer, load, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))  # fmt: skip
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def config_json(cfg):
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()})


# ----------------------------------------------------------------------------
# Sample grids and checkpoints


@torch.no_grad()
def sample_grid(model, sched, vae, noise, text, cond, args, path=None):
    """The student's K-step samples on fixed noise, decoded by the VAE (or the first three latent channels without
    one): one row per video, up to 8 frames each."""
    x0 = student_sample(model, sched, noise, text, cond, sched.student_times.to(noise.device), args.student_sample_type)
    if vae is not None:
        video = vae.decode(x0.float())
    else:
        v = x0[:, :3].float()
        video = v / (v.abs().amax(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
    frames = video[:, :, torch.linspace(0, video.shape[2] - 1, min(8, video.shape[2])).round().long()]
    cols = frames.shape[2]
    if path is not None:
        Image.fromarray(image_grid(to_uint8(frames.transpose(1, 2).flatten(0, 1).cpu()), cols)).save(path)


def save_checkpoint(args, step, weights, state, config):
    """ckpt_NNNNNNN/ written as a temporary directory and renamed, so a crash never leaves a half checkpoint.
    `weights`: name -> full state dict (saved as NAME.safetensors with the config in the metadata, except for the
    script's GAN heads); `state`: optimizer state for state.pt."""
    final = os.path.join(args.out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, sd in weights.items():
        meta = {"step": str(step)} | ({"config": config} if name != "discriminator" else {})
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, f"{name}.safetensors"), metadata=meta)
    torch.save(state | {"step": step}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(vars(args) | {"step": step}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def latest_checkpoint(out_dir):
    ckpts = sorted(d for d in os.listdir(out_dir) if d.startswith("ckpt_") and not d.endswith(".tmp")) if os.path.isdir(out_dir) else []  # fmt: skip
    return os.path.join(out_dir, ckpts[-1]) if ckpts else None


# ----------------------------------------------------------------------------


def main(args):
    # Distributed setup: torchrun sets these; a plain `python` run is one process.
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    master = rank == 0
    if master:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        print(json.dumps(vars(args)))
    if args.fsdp and not distributed:
        raise SystemExit("error: --fsdp shards over processes; start it with torchrun (--nproc_per_node >= 2)")
    if args.method == "sft" and not args.data:
        raise SystemExit("error: --method sft trains on real latents; give --data DIR (format: train_video.py --help)")
    if args.method == "dmd2" and args.gan_weight > 0 and not args.data:
        raise SystemExit("error: the GAN heads compare with real latents; give --data DIR, or --gan_weight 0 for data-free dmd2")  # fmt: skip
    if args.cond_frames and (args.model != "cosmos" or not args.data or args.method == "kd"):
        raise SystemExit("error: --cond_frames is Cosmos Video2World: --model cosmos with --data (sft or dmd2)")

    module, Net, tiny_name, family, text_repo, vae_module, vae_name, blocks = MODELS[args.model]

    # The pretrained weights, read once (on rank 0 only under FSDP); --tiny: a random network of the tiny config.
    arch = args.arch or tiny_name
    if args.tiny and not args.teacher:
        cfg = module.CONFIGS[arch]
        torch.manual_seed(args.seed)
        teacher_state = Net(cfg).state_dict() if master or not args.fsdp else {}
    elif args.teacher:
        kw = {"config": module.CONFIGS[args.arch]} if args.arch else {}
        loaded = module.from_pretrained(args.teacher, **kw) if master or not args.fsdp else None
        cfg = loaded.cfg if loaded is not None else None
        if args.fsdp:  # the other ranks need the config only: the same lookup without the weights
            cfg_list = [cfg]
            dist.broadcast_object_list(cfg_list, src=0)
            cfg = cfg_list[0]
        teacher_state = loaded.state_dict() if loaded is not None else {}
        del loaded
    else:
        raise SystemExit("error: give --teacher (a CONFIGS name, Hub repo or path), or --tiny")
    make = functools.partial(Net, cfg)

    # Text: prompt embeddings through encoders.py, cached on disk once (rank 0 encodes, the others read the cache).
    text_dim = {"wan": "text_dim", "cogvideox": "text_embed_dim", "cosmos": "crossattn_proj_in_channels"}[args.model]
    if args.tiny:
        width = getattr(cfg, text_dim)
        name = {"wan": "umt5", "cogvideox": "t5", "cosmos": "qwen"}[args.model]
        encoder = TextEncoder(family, tiny={name: width // 2 if args.model == "cosmos" else width})  # cosmos: 2 layers concatenated  # fmt: skip
    else:
        encoder = TextEncoder(family, args.text_encoder or text_repo, device=device, dtype=torch.bfloat16)
    cache = args.text_cache or os.path.join(args.out_dir, "text_cache")

    def encode(prompts):
        if master:
            out = cached_embeddings(encoder, prompts, cache)
        if distributed:
            dist.barrier()
        return out if master else cached_embeddings(encoder, prompts, cache)

    prompts = TINY_PROMPTS if args.tiny and not args.prompts else []
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts and not args.data:
        raise SystemExit("error: give --prompts FILE (one prompt per line) or --data DIR")
    prompt_text = encode(prompts)["text"] if prompts else None
    neg_text = encode([args.neg_prompt])["text"].to(device)
    dataset = LatentDataset(args.data, encode, lambda p: cached_embeddings(encoder, p, cache)["text"]) if args.data else None  # fmt: skip
    if args.latent_shape:
        shape = tuple(int(v) for v in args.latent_shape.split(","))
    elif dataset is not None:
        shape = tuple(dataset.load(0)["latents"].shape)
    else:
        shape = (cfg.out_channels, 3, 8, 8)
    if shape[0] != cfg.out_channels:
        raise SystemExit(f"error: latents of {shape[0]} channels; the {args.model} network makes {cfg.out_channels}")
    if prompt_text is None:  # sample grids of a data-only run use the data's prompts
        prompt_text = torch.stack([dataset.load(i)["text"] for i in range(min(len(dataset), args.eval_n))]).float()
    sched = make_schedule(module, cfg, args)
    sched.shape = (0, *shape)  # replaced by (micro, ...) below

    # Networks: the student (trainable, from the teacher's weights or --student), its EMAs, the frozen teacher, and
    # for dmd2 the fake score (a trainable copy of the teacher) and GAN heads on the teacher's block features.
    student_state = load_file(args.student) if args.student and (master or not args.fsdp) else teacher_state
    student = place(make, student_state, args, device, blocks, trainable=True)
    teacher = place(make, teacher_state, args, device, blocks, trainable=False) if args.method != "sft" else None
    fake = place(make, teacher_state, args, device, blocks, trainable=True) if args.method == "dmd2" else None
    disc = None
    if args.method == "dmd2" and args.gan_weight > 0:
        depth = len(getattr(teacher, blocks[0]))
        indices = [int(i) for i in args.disc_blocks.split(",")] if args.disc_blocks else [depth // 2]
        if max(indices) >= depth:
            raise SystemExit(f"error: --disc_blocks {args.disc_blocks}: the teacher has {depth} blocks")
        with torch.no_grad():  # one probe on a real clip for the feature widths
            x_probe, text_probe, cond_probe = make_batches(args, dataset, prompt_text, shape)(0, 0, 1)
            t_probe = sched.student_times[:1].to(device)
            cond_probe = {k: v.to(device) for k, v in cond_probe.items()}
            maps = denoise(teacher, sched, x_probe.to(device), t_probe, text_probe.to(device), cond_probe, indices, features_only=True)  # fmt: skip
        torch.manual_seed(rng_seed(args.seed, 3))
        disc = Discriminator(indices, [m.shape[1] for m in maps]).to(device).train()
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(disc)
    del teacher_state, student_state
    emas = {}
    for spec in filter(None, args.ema.split(",")):
        emas[spec] = make().to(device).eval().requires_grad_(False)
        emas[spec].load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in student.state_dict().items()})  # fmt: skip
    ddp = distributed and not args.fsdp
    net = DDP(student, find_unused_parameters=True) if ddp else student
    fake_net = DDP(fake) if ddp and fake is not None else fake
    disc_net = DDP(disc) if ddp and disc is not None else disc
    if master:
        print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters, method {args.method}, {world} process(es)")  # fmt: skip

    # Data: real latents, or prompts alone; kd reads (and first writes) the teacher's pairs.
    micro = args.micro_batch or max(1, args.batch_size // world)
    accum = max(1, args.batch_size // (micro * world))
    sched.shape = (micro, *shape)
    if args.method == "kd":
        args.pairs = args.pairs or os.path.join(args.out_dir, "pairs")
        generate_pairs(args, sched, teacher, prompt_text, neg_text, shape, device, rank, world)  # finished shards kept
        batch_fn, sched.path_times = load_pairs(args, prompt_text)
    else:
        batch_fn = make_batches(args, dataset, prompt_text, shape)

    optim = functools.partial(torch.optim.AdamW, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    optimizer = optim(student.parameters(), lr=args.lr)
    critic = {name: (m, optim(m.parameters(), lr=args.critic_lr or args.lr)) for name, m in (("fake_score", fake), ("discriminator", disc)) if m is not None}  # fmt: skip
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    # What a checkpoint holds: every trained network and the state to continue exactly (the teacher never).
    trained = {"student": (student, optimizer), **critic}
    start = 0
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    if ckpt:
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True, map_location="cpu")
        for name, (m, o) in trained.items():
            sd = load_file(os.path.join(ckpt, f"{name}.safetensors")) if master or not args.fsdp else {}
            if args.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(m, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            else:
                m.load_state_dict(sd)
            optimizer_state(m, o, args.fsdp, load=state[name])
        for spec, ema in emas.items():
            ema.load_state_dict(load_file(os.path.join(ckpt, f"ema_{spec}.safetensors")))
        start = state["step"]
        if master:
            print(f"resumed from {ckpt} at step {start}")

    vae = None
    if master or args.fsdp:
        if args.vae != "none" and (args.tiny or args.vae):
            vae_cls = vae_module.WanVAE if vae_module is wan_vae else vae_module.AutoencoderKLCogVideoX
            if args.tiny and not args.vae:
                torch.manual_seed(0)
                vae = vae_cls(vae_module.CONFIGS["tiny"])
            else:
                vae = vae_module.from_pretrained(args.vae or vae_name)
            vae = vae.to(device).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(12345)  # the same noise and prompts in every grid
        grid_noise = torch.randn(args.eval_n, *shape, generator=g).to(device)
        grid_text = prompt_text[torch.arange(args.eval_n) % len(prompt_text)].to(device)
        grid_cond = {}
        if dataset is not None:
            _, _, grid_cond = make_batches(args, dataset, prompt_text, shape)(0, 10**6, args.eval_n)
            grid_cond = {k: v.to(device) for k, v in grid_cond.items()}
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if master else None
    wandb = None
    if args.wandb and master:
        import wandb

        wandb.init(project=args.wandb, config=vars(args))

    def grid(step):
        model = next(iter(emas.values()), student)
        with torch.autocast(**amp):
            path = os.path.join(args.out_dir, "samples", f"step_{step:07d}.png") if master else None
        sample_grid(model, sched, vae, grid_noise, grid_text, grid_cond, args, path)

    eval_here = master or args.fsdp  # FSDP: every rank takes part in the forward passes
    if eval_here and args.eval_every and start == 0:
        grid(0)
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=not master, unit="step")
    for step in bar:
        # dmd2 alternates: a generator step every student_update_freq steps (counting from 1), critic steps (fake
        # score and GAN heads) in between (methods.md §7.9). sft and kd update the student at every step.
        generator_step = args.method != "dmd2" or (step + 1) % args.student_update_freq == 0
        for m, _ in critic.values():
            m.train(not generator_step).requires_grad_(not generator_step)
        active = [(student, net, optimizer)] if generator_step else [(m, w, o) for (m, o), w in zip(critic.values(), (fake_net, disc_net))]  # fmt: skip
        tic, total, logs = time.time(), 0.0, {}
        for r in range(accum):
            shard = rank * accum + r  # this micro-batch's place in the global batch
            x0, text, cond = batch_fn(step, shard, micro)
            x0 = x0.to(device) if x0 is not None else None
            text, cond = text.to(device), {k: v.to(device) for k, v in cond.items()}
            torch.manual_seed(rng_seed(args.seed, step, shard, 2))  # times and noise: exact on resume
            last = r == accum - 1
            with contextlib.ExitStack() as sync:  # all-reduce gradients on the last accumulation round only
                for _, wrapped, _ in active:
                    if ddp and not last:
                        sync.enter_context(wrapped.no_sync())
                    elif args.fsdp:
                        wrapped.set_requires_gradient_sync(last)
                with torch.autocast(**amp):
                    if args.method == "sft":
                        loss, logs = sft_loss(net, sched, x0, text, neg_text, cond, args)
                    elif args.method == "kd":
                        loss, logs = kd_loss(net, sched, x0, text, cond, args)
                    elif generator_step:
                        loss, logs = dmd2_generator_loss(net, student, teacher, fake, disc, sched, x0, text, neg_text, cond, args)  # fmt: skip
                    else:
                        loss, logs = dmd2_critic_loss(student, teacher, fake_net, disc_net, disc, sched, x0, text, cond, args)  # fmt: skip
                (loss / accum).backward()
            total += loss.detach().float() / accum
        norms = {}
        for (m, _, o), name in zip(active, ["student"] if generator_step else list(critic)):
            params = [p for p in m.parameters() if p.grad is not None]
            for p in params:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            # The student's gradient is clipped; the critic's is not (FastGen clips the student only, methods.md §6).
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if generator_step else math.inf)
            norms[f"grad_norm_{name}"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            o.step()
            o.zero_grad(set_to_none=True)
        with torch.no_grad():  # every step, critic steps included, as FastGen's EMA callback does (methods.md Q2)
            for spec, ema in emas.items():
                for p_ema, p in zip(ema.parameters(), student.parameters()):
                    p_ema.lerp_(p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach(), 1 - float(spec))
        if distributed:  # the logged loss is the global batch's
            dist.all_reduce(total)
            total /= world

        step_done = step + 1
        if master:
            clips_per_s = args.batch_size / (time.time() - tic)
            bar.set_postfix(loss=f"{total.item():.4f}", clips_s=f"{clips_per_s:.2f}")
            record = {"step": step_done, "loss": total.item(), "generator_step": generator_step, "lr": args.lr, "clips_per_s": clips_per_s, **norms, **logs}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
            if wandb:
                wandb.log(record, step=step_done)
        if eval_here and args.eval_every and (step_done % args.eval_every == 0 or step_done == args.max_steps):
            grid(step_done)
        if args.save_every and (step_done % args.save_every == 0 or step_done == args.max_steps):
            weights = {name: full_state_dict(m, args.fsdp) for name, (m, _) in trained.items()}
            weights |= {f"ema_{spec}": full_state_dict(ema, False) for spec, ema in emas.items()}
            state = {name: optimizer_state(m, o, args.fsdp) for name, (m, o) in trained.items()}
            if master:
                save_checkpoint(args, step_done, weights, state, config_json(cfg))
    if master:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return student, emas


if __name__ == "__main__":
    main(parse_args())
