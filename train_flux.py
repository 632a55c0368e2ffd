"""Train and distill the text-to-image family (FLUX.1, SD1.5, SDXL): fine-tuning, knowledge distillation, distribution
matching and latent adversarial distillation, on latents of the family's autoencoder and embeddings of its text encoders.

    python train_flux.py --tiny --method dmd2 --max_steps 20                   # any method and --model, seconds on a CPU
    python train_flux.py --tiny --model sd15 --method dmd2 --max_steps 20
    python train_flux.py --model sd15 --method sft --data images/ --prompts prompts.txt   # one GPU
    python train_flux.py --preset kd-sdxl --prompts prompts.txt --make_pairs 20000   # teacher pairs (resumable)
    torchrun --nproc_per_node=8 train_flux.py --preset kd-sdxl                 # then kd on them
    torchrun --nproc_per_node=8 train_flux.py --preset dmd2-flux --prompts prompts.txt --data images/  # FSDP2, bf16
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        train_flux.py --preset dmd2-sdxl --data latents/                       # several nodes

Methods (the loss of each is written out below, with its paper's equations):
  sft       denoising score matching in the network's native prediction type on real latents (FastGen's SFT)
  kd        regression onto teacher ODE solutions from --make_pairs (Luhman & Luhman 2021)
  dmd2      distribution matching: VSD gradient from teacher and fake score, GAN heads on teacher features (Yin et al.
            2024); critic steps (fake score, heads) between generator steps. Flux-dev's guidance is its embedded input
            (no CFG); SD1.5/SDXL teachers use classifier-free guidance
  fdistill  DMD2 with per-sample f-divergence weights from the heads' density-ratio estimate (Xu et al. 2025)
  ladd      adversarial only: heads on teacher features of noised student and real latents (Sauer et al. 2024)

Data. --prompts FILE: one prompt per line (data-free methods: dmd2/fdistill with a 1-step student). --data DIR: real
latents for sft, ladd's real branch, the GAN heads and few-step dmd2 students, either
  * a folder of images (png/jpg/webp), each with an optional caption NAME.txt beside it: centre-cropped to
    --resolution, encoded once by the family's VAE (posterior mean) and cached in --out_dir/latents/, or
  * precomputed latents: *.safetensors shards, each with a `latents` tensor (N, C, h, w), already normalised as the
    denoiser sees them ((z - shift) * scale), and the N captions as a JSON list in the metadata key `prompts`.
--pairs DIR: teacher pairs written by --make_pairs N (shards of states, x0 and prompts; LADD's paper trains on such
teacher samples, and so does ladd here when no --data is given). Prompt embeddings are cached once per prompt
(encoders.cached_embeddings). --tiny with neither: the tiny teacher's pairs on built-in prompts, made on the fly.

Outputs in --out_dir (default out/train_flux/<preset, or model-method>[-tiny]): args.json, metrics.jsonl (a line per
step, flushed), samples/step_NNNNNNN.png (decoded through the VAE), checkpoints ckpt_NNNNNNN/ (student.safetensors,
ema_*.safetensors, fake_score.safetensors and discriminator.safetensors where the method has them, state.pt with
optimizer state, args.json), written only when every weight is finite. A directory holds one run: --resume continues
it from its newest checkpoint exactly (same model, method and teacher), --overwrite replaces it. A step whose loss or
gradient is not finite is skipped; --max_skipped_steps in a row stop the run. --print_config shows the resolved flags.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from encoders import TextEncoder, cached_embeddings
from models import autoencoder_kl, flux, sd15, sdxl

# family -> (model file, network class, pretrained name, text encoder repo, VAE preset, image side in px)
FAMILIES = {
    "flux": (flux, flux.FluxModel, "flux-dev", "black-forest-labs/FLUX.1-dev", "flux", 512),
    "sd15": (sd15, sd15.UNet, "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", 512),
    "sdxl": (sdxl, sdxl.UNet, "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024),
}
TINY_PROMPTS = ["a red disc", "an orange ring", "a yellow square", "a green triangle", "a blue plus", "a purple star",
                "a grey square on white", "a small red ring"]  # fmt: skip
TINY_TOKENS = 32

# Named presets: FastGen's Flux / SD1.5 / SDXL experiment configs (NVlabs/FastGen fastgen/configs/experiments/{Flux,
# SD15,SDXL}, commit 34f30e8; reference/methods.md §7.1, §7.3, §7.9) as flag defaults, each a few small bases joined
# with `|` plus what it changes; tests/test_presets.py compares them with FastGen value by value and README's "Presets
# vs FastGen" lists the deliberate differences. --batch_size is global; --micro_batch is FastGen's per-GPU batch.
# Where a config sets only the per-GPU batch (its global batch then depends on the GPU count), the preset's global
# batch is one node of 8 GPUs. No FastGen text-to-image config keeps an EMA.
_FLUX = dict(
    model="flux",
    resolution=512,
    guidance=3.5,
    precision="bf16",
    t_min=0.001,
    t_max=0.999,
    fsdp=True,
    grad_ckpt=True,
    ema="",
)
_SD15 = dict(
    model="sd15",
    resolution=512,
    precision="bf16",
    t_min=1.0,
    t_max=999.0,
    ema="",
)
_SDXL = dict(
    model="sdxl",
    resolution=1024,
    t_min=1.0,
    t_max=999.0,
    ema="",
)
_SFT = dict(
    method="sft",
    lr=1e-5,
    eval_steps=50,
)
_DMD2_SD15 = dict(
    _SD15,
    method="dmd2",
    lr=1e-5,
    critic_lr=1e-5,
    gan_weight=1e-3,
    guidance=1.75,
    student_steps=1,
    batch_size=2048,
    micro_batch=32,
    max_steps=100_000,
    student_update_freq=10,
)
_DMD2_SDXL = dict(
    _SDXL,
    method="dmd2",
    lr=5e-5,
    critic_lr=5e-5,
    gan_weight=5e-3,
    guidance=8.0,
    student_steps=1,
    fake_score_pred_type="native",
    micro_batch=6,
    batch_size=48,
    max_steps=25_000,
    fsdp=True,
    grad_ckpt=True,
)
PRESETS = {
    "dmd2-flux": dict(
        _FLUX,
        method="dmd2",
        lr=1e-5,
        critic_lr=1e-5,
        gan_weight=0.03,
        gan_same_t_noise=True,
        student_steps=4,
        micro_batch=2,
        batch_size=16,
        max_steps=5000,
    ),
    "sft-flux": dict(
        _FLUX | _SFT,
        micro_batch=4,
        batch_size=128,
        max_steps=10_000,
    ),
    "dmd2-sd15": _DMD2_SD15,
    "fdistill-sd15": dict(
        _DMD2_SD15,
        method="fdistill",
        f_div="js",
    ),
    "sft-sd15": dict(
        _SD15 | _SFT,
        guidance=7.5,
        micro_batch=32,
        batch_size=256,
        max_steps=100_000,
    ),
    "dmd2-sdxl": _DMD2_SDXL,
    "fdistill-sdxl": dict(
        _DMD2_SDXL,
        method="fdistill",
        lr=5e-7,
        critic_lr=5e-7,
        f_div="js",
    ),
    "kd-sdxl": dict(
        _SDXL,
        method="kd",
        lr=1e-5,
        guidance=8.0,
        student_steps=1,
        micro_batch=16,
        batch_size=128,
        max_steps=6000,
        pairs="pairs/sdxl",
    ),
    "sft-sdxl": dict(
        _SDXL | _SFT,
        guidance=7.5,
        precision="bf16",
        micro_batch=8,
        batch_size=256,
        max_steps=100_000,
        fsdp=True,
        grad_ckpt=True,
    ),
}

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="presets (flag defaults; explicit flags win):\n" + "\n".join(f"  {k:10s} {' '.join(f'--{a}={v}' for a, v in p.items())}" for k, p in PRESETS.items()))
parser.add_argument("--preset", choices=sorted(PRESETS), default="", help="named flag defaults (see below)")
parser.add_argument("--method", choices=["sft", "kd", "dmd2", "fdistill", "ladd"], default="dmd2")
# models and data
parser.add_argument("--model", choices=sorted(FAMILIES), default="flux", help="the family: FLUX.1, SD1.5 or SDXL")
parser.add_argument("--teacher", default="", help="CONFIGS name, Hub repo, local folder, or a .safetensors this script saved: the pretrained denoiser (default: the family's release)")  # fmt: skip
parser.add_argument("--text_encoder", default="", help="Hub repo or local pipeline folder of the text encoders (default: the family's release)")  # fmt: skip
parser.add_argument("--vae", default="", help="models/autoencoder_kl.py preset, Hub repo or folder (default: the family's)")
parser.add_argument("--prompts", default="", help="text file, one prompt per line (data-free methods; captions of --data otherwise)")  # fmt: skip
parser.add_argument("--data", default="", help="folder of images (+ NAME.txt captions) or of latent shards (see above)")
parser.add_argument("--pairs", default="", help="kd (and --make_pairs): directory of teacher pairs")
parser.add_argument("--make_pairs", type=int, default=0, metavar="N", help="write N teacher pairs to --pairs and exit (resumable)")  # fmt: skip
parser.add_argument("--pair_states", type=int, default=4, help="--make_pairs: trajectory states kept, at t_list(P) (4 serves 1, 2 and 4-step students)")  # fmt: skip
parser.add_argument("--teacher_steps", type=int, default=28, help="teacher sampling steps for pairs and the teacher reference")  # fmt: skip
parser.add_argument("--resolution", type=int, default=0, help="image side in pixels (default: the family's; latents are 1/8)")
parser.add_argument("--tiny", action="store_true", help="tiny random networks, encoders and VAE: checks the code path in seconds")
# optimisation and scale
parser.add_argument("--batch_size", type=int, default=8, help="global batch (all GPUs); gradient accumulation makes up the rest. FastGen's configs mostly set a per-GPU batch: the presets convert")
parser.add_argument("--micro_batch", type=int, default=0, help="per-process batch per forward (0 = batch_size / world)")
parser.add_argument("--max_steps", type=int, default=1000)
parser.add_argument("--lr", type=float, default=1e-5, help="student lr (AdamW, constant, as FastGen's configs)")
parser.add_argument("--critic_lr", type=float, default=0.0, help="lr of the fake score and the GAN heads (0 = --lr)")
parser.add_argument("--beta1", type=float, default=0.9)
parser.add_argument("--beta2", type=float, default=0.999)
parser.add_argument("--weight_decay", type=float, default=0.01)
parser.add_argument("--grad_clip", type=float, default=10.0, help="max gradient norm of the student (the critic is not clipped)")
parser.add_argument("--ema", default="0.9999", help="comma list of EMA rates of the student ('' = none)")
parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="compute dtype (weights and optimizer state stay fp32)")  # fmt: skip
parser.add_argument("--fsdp", action="store_true", help="FSDP2: shard every network per block (meta-device init, weights broadcast from rank 0)")  # fmt: skip
parser.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of every transformer / UNet block")
# noise levels and method knobs
parser.add_argument("--t_sampler", choices=["uniform", "logitnormal"], default="uniform", help="training-time t")
parser.add_argument("--t_min", type=float, default=None, help="default: flux 0.001, sd15/sdxl timestep 1")
parser.add_argument("--t_max", type=float, default=None, help="default: flux 0.999, sd15/sdxl timestep 999")
parser.add_argument("--p_mean", type=float, default=0.0, help="logitnormal location")
parser.add_argument("--p_std", type=float, default=1.0, help="logitnormal scale")
parser.add_argument("--guidance", type=float, default=None, help="flux: the embedded guidance input (default 3.5); sd15/sdxl: classifier-free guidance of the teacher (default 1 = off)")  # fmt: skip
parser.add_argument("--cond_dropout", type=float, default=0.0, help="sft: share of samples trained on the empty prompt (enables CFG)")  # fmt: skip
parser.add_argument("--student_steps", type=int, default=1, help="sampling steps of the student on t_list(K)")
parser.add_argument("--student_update_freq", type=int, default=5, help="dmd2/fdistill/ladd: a generator step every N steps, critic steps between")  # fmt: skip
parser.add_argument("--fake_score_pred_type", choices=["x0", "native"], default="x0", help="dmd2/fdistill: the space of the fake score's denoising loss: x0, or the network's own prediction type (eps for SD, flow for Flux)")  # fmt: skip
parser.add_argument("--gan_weight", type=float, default=0.03, help="dmd2/fdistill: weight of the generator's GAN loss (0 = no heads)")  # fmt: skip
parser.add_argument("--disc_features", default="", help="teacher blocks the GAN heads read, e.g. 14,28 (default: flux the middle block, sd the mid block)")  # fmt: skip
parser.add_argument("--gan_same_t_noise", action="store_true", help="noise real latents with the fake sample's t and noise")
parser.add_argument("--r1_weight", type=float, default=0.0, help="approximate R1 weight (APT; 0.1 in FastGen's Wan LADD)")
parser.add_argument("--r1_alpha", type=float, default=0.1, help="scale of the R1 perturbation")
parser.add_argument("--f_div", choices=["rkl", "kl", "js", "sf", "neyman", "sh", "jf"], default="js", help="fdistill: the f-divergence")  # fmt: skip
parser.add_argument("--ratio_lower", type=float, default=0.1, help="fdistill: density-ratio clip")
parser.add_argument("--ratio_upper", type=float, default=20.0)
parser.add_argument("--ratio_bins", type=int, default=10, help="fdistill: t-bins normalising the ratio (0 = off)")
parser.add_argument("--ratio_ema", type=float, default=0.0, help="fdistill: EMA rate of the per-bin ratio means")
# evaluation, checkpoints, logging
parser.add_argument("--eval_every", type=int, default=500, help="sample grid and distance to the teacher every N steps")
parser.add_argument("--eval_n", type=int, default=16, help="fixed noise/prompt pairs of the grid and the teacher distance")
parser.add_argument("--eval_steps", type=int, default=0, help="student sampling steps of the grid (0 = --student_steps)")
parser.add_argument("--save_every", type=int, default=1000)
parser.add_argument("--out_dir", default=None, help="the run's directory (default out/train_flux/<preset, or model-method>[-tiny])")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its newest checkpoint (same model and method)")
parser.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that holds another run, removing its files")
parser.add_argument("--max_skipped_steps", type=int, default=5, help="stop after this many consecutive steps skipped for a non-finite loss or gradient")
parser.add_argument("--print_config", action="store_true", help="print the resolved configuration (JSON, derived values included) and exit")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
parser.add_argument("--wandb", default="", help="also log to this wandb project (if wandb is installed)")
# fmt: on
DEFAULTS = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}  # not --help's
# Every numeric flag by the range it must lie in (tests/test_bad_input_flux.py checks that none is missing).
FLAG_RANGES = {
    "positive": ["pair_states", "teacher_steps", "batch_size", "grad_clip", "p_std", "student_steps", "student_update_freq", "ratio_lower", "ratio_upper", "eval_n", "max_skipped_steps"],
    "learning_rate": ["lr"],
    "unit": ["critic_lr", "beta1", "beta2", "cond_dropout", "ratio_ema"],
    "non_negative": ["make_pairs", "resolution", "micro_batch", "max_steps", "weight_decay", "t_min", "t_max", "guidance", "gan_weight", "r1_weight", "r1_alpha", "ratio_bins", "eval_every", "eval_steps", "save_every", "seed", "num_threads"],
    "finite": ["p_mean"],
}  # fmt: skip
# What makes two runs the same run: --resume refuses a checkpoint whose args.json differs in these. The networks'
# architecture is the teacher's; the GAN heads' is fixed by the blocks they read and (SD heads) the resolution.
RUN_IDENTITY = ["script", "model", "method", "teacher", "tiny", "resolution", "disc_features"]


def parse_args(argv=None):
    """Flags over the preset over argparse defaults, then the family's defaults for what is left unset. Every number
    is checked here, before anything loads: a bad one ends the run with one line and exit code 2."""
    parser.set_defaults(**DEFAULTS)  # a clean slate when called more than once in a process (tests)
    known = parser.parse_known_args(argv)[0]
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    module = FAMILIES[args.model][0]
    sd = args.model != "flux"
    args.t_min = (1.0 if sd else 0.001) if args.t_min is None else args.t_min
    args.t_max = (999.0 if sd else 0.999) if args.t_max is None else args.t_max
    args.guidance = (1.0 if sd else flux.DEFAULT_GUIDANCE) if args.guidance is None else args.guidance
    args.resolution = args.resolution or FAMILIES[args.model][5]
    if args.tiny:  # the same code path at CPU size
        args.batch_size, args.resolution = min(args.batch_size, 8), 16
    args.out_dir = args.out_dir or os.path.join("out", "train_flux", (args.preset or f"{args.model}-{args.method}") + "-tiny" * args.tiny)  # fmt: skip
    check_flag_ranges(args, FLAG_RANGES)
    if not module.T_MIN <= args.t_min < args.t_max <= module.T_MAX:
        fail(f"--t_min {args.t_min} and --t_max {args.t_max} are not an interval of {args.model}'s times", "--t_min/--t_max", f"give {module.T_MIN:g} <= t_min < t_max <= {module.T_MAX:g}")  # fmt: skip
    if args.ratio_lower > args.ratio_upper:
        fail(f"--ratio_lower {args.ratio_lower} is above --ratio_upper {args.ratio_upper}", "--ratio_lower", "give ratio_lower <= ratio_upper")  # fmt: skip
    patch = 2 if args.tiny else 16  # Flux packs 2x2 latent patches; the VAE divides by 2 (tiny) or 8
    if args.model == "flux" and args.resolution % patch:
        fail(f"--resolution {args.resolution} is not a whole number of Flux's 2x2 latent patches", "--resolution", f"give a multiple of {patch}")  # fmt: skip
    if args.model != "flux" and not args.tiny and args.resolution % 8:
        fail(f"--resolution {args.resolution} is not a whole number of latent pixels", "--resolution", "give a multiple of 8")  # fmt: skip
    for spec in (s for s in args.ema.split(",") if s):
        try:
            rate = float(spec)
        except ValueError:
            rate = math.nan
        if not 0 <= rate <= 1:
            fail(f"EMA rate {spec!r} is not a number in [0, 1]", "--ema", "give a comma list of rates such as 0.999,0.9999, or '' for none")  # fmt: skip
    if args.disc_features and not all(f.strip().isdigit() for f in args.disc_features.split(",")):
        fail(f"--disc_features {args.disc_features!r} is not a comma list of block indices", "--disc_features", "give block numbers such as 14,28")  # fmt: skip
    if args.make_pairs and args.teacher_steps % args.pair_states:
        fail(f"{args.teacher_steps} teacher steps do not split into {args.pair_states} equal segments", "--teacher_steps", f"give a multiple of --pair_states {args.pair_states}")  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro, accum = split_batch(args.batch_size, args.micro_batch, world)
    if args.print_config:
        emas = [dict(name=f"ema_{s}", kind="constant", value=float(s)) for s in args.ema.split(",") if s]
        derived = dict(world_size=world, micro_batch_per_process=micro, accumulation_steps=accum, emas=emas, fsdp=args.fsdp and world > 1, latent_side=args.resolution // (2 if args.tiny else 8))  # fmt: skip
        print(json.dumps(vars(args) | {"derived": derived}, indent=1))
        raise SystemExit(0)
    return args


# ----------------------------------------------------------------------------
# Randomness: every draw is a fixed function of (seed, step, micro-batch), so --resume is exact and the global batch
# is the same however it is split over processes and accumulation rounds.


def rng_seed(*parts):
    """A seed that is a fixed function of integers (Python's hash() of strings changes from run to run)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % 2**63
    return seed


def bcast(t, x):
    """(B,) -> (B, 1, 1, 1) in float64."""
    return t.double().reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------
# The family's networks behind one call: x0 predictions from the native output (flow for Flux, eps for SD), and the
# forward process x_t = alpha(t) x0 + sigma(t) eps, time math in float64 (the conversions divide by alpha and sigma).


def denoise(module, net, x, t, cond, feature_indices=()):
    """The network's x0 prediction at (x, t) under conditioning `cond` (its keyword arguments); with
    `feature_indices` also the teacher features for GAN heads."""
    out = net(x, t, **cond, feature_indices=feature_indices)
    out, features = out if len(feature_indices) else (out, None)
    x0 = module.to_x0(x, out, t, module.PRED_TYPE)
    return (x0, features) if len(feature_indices) else x0


def features(net, x, t, cond, indices):
    """The teacher's feature maps at blocks `indices`, without running the blocks after the last of them."""
    return net(x, t, **cond, feature_indices=indices, features_only=True)


def noised(module, x0, eps, t):
    """alpha(t) x0 + sigma(t) eps, in float64, cast back."""
    tb = bcast(t, x0)
    return (module.alpha(tb) * x0.double() + module.sigma(tb) * eps.double()).to(x0.dtype)


def sample_t(n, args, module, device):
    return module.sample_t(n, kind=args.t_sampler, p_mean=args.p_mean, p_std=args.p_std, t_min=args.t_min, t_max=args.t_max).to(device)  # fmt: skip


def teacher_x0(module, teacher, x, t, cond, uncond, args):
    """The teacher's x0 with classifier-free guidance cond + (w - 1)(cond - uncond) in x0 space (SD1.5/SDXL; Flux-dev's
    guidance is its embedded input instead, as in FastGen's Flux config)."""
    x0 = denoise(module, teacher, x, t, cond)
    if args.model != "flux" and args.guidance != 1.0 and uncond is not None:
        x0 = x0 + (args.guidance - 1) * (x0 - denoise(module, teacher, x, t, uncond))
    return x0


# ----------------------------------------------------------------------------
# Losses. Each takes the trainable network `net` (DDP- or FSDP-wrapped when distributed), real latents x0 (or None
# for data-free methods), the conditioning dicts of the batch and of the empty prompt, and returns (loss, logs).


def sft_loss(net, x0, cond, uncond, args, module):
    """Denoising score matching in the network's native prediction type, unweighted (reference/methods.md §4):
    E ||F(x_t, t) - target||^2 with target = flow eps - x0 (Flux) or eps (SD), x_t = alpha x0 + sigma eps. With
    --cond_dropout a share of the samples sees the empty prompt, which makes classifier-free guidance possible."""
    t = sample_t(len(x0), args, module, x0.device)
    eps = torch.randn_like(x0)
    x_t = noised(module, x0, eps, t)
    if args.cond_dropout > 0 and uncond is not None:
        drop = torch.rand(len(x0), device=x0.device) < args.cond_dropout
        cond = {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), uncond[k].expand_as(v), v) for k, v in cond.items()}  # fmt: skip
    target = module.from_x0(x_t.double(), x0.double(), t, module.PRED_TYPE)
    return (net(x_t, t, **cond).float() - target.float()).square().mean(), {}


def kd_loss(net, pairs, cond, args, module):
    """Knowledge distillation from teacher trajectories: 0.5 ||G(x_k, t_k) - x0_teacher||^2 (Luhman & Luhman 2021).
    `pairs` (B, P + 1, C, h, w) holds P states of the teacher trajectory at t_list(P) and the teacher's output last;
    a K-step student starts from the state at one of its own K times, drawn uniformly."""
    states, target = pairs[:, :-1], pairs[:, -1]
    K, P = args.student_steps, states.shape[1]
    times = module.t_list(P).to(pairs.device)
    pick = torch.randint(K, (len(pairs),), device=pairs.device) * (P // K)
    x_in = states[torch.arange(len(pairs), device=pairs.device), pick]
    x0_student = denoise(module, net, x_in, times[pick], cond)
    return 0.5 * (x0_student.float() - target.float()).square().mean(), {}


def student_input(x0, shape, args, module, device):
    """The generator's input and time: pure noise sigma(t_0) eps at the first t_list time for a one-step student; for
    K steps a time drawn uniformly from the K non-zero t_list entries and the real batch noised to it (FastGen's
    few-step DMD2/LADD: students learn on forward-noised data, not on their own trajectories)."""
    times = module.t_list(args.student_steps).to(device)
    t_s = times[torch.randint(args.student_steps, (shape[0],), device=device)]
    eps = torch.randn(shape, device=device)
    if args.student_steps == 1:
        return (module.sigma(bcast(t_s, eps)) * eps.double()).float(), t_s
    return noised(module, x0, eps, t_s), t_s


def vsd_loss(g, x_teacher, x_fake, scale=None):
    """The distribution-matching gradient (DMD Eq. 7) as a regression onto a fixed target: grad = w (D_fake - D_real)
    with the per-sample normaliser w = 1 / mean|g - D_real| (DMD Eq. 8), times `scale` (f-distill's h); then
    0.5 ||g - sg(g - grad)||^2 has gradient grad / numel with respect to g. Weights in float32."""
    with torch.no_grad():
        w = 1 / ((g.float() - x_teacher.float()).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
        if scale is not None:
            w = w * scale.float().reshape(-1, 1, 1, 1)
        target = g.float() - w * (x_fake.float() - x_teacher.float())
    return 0.5 * (g.float() - target).square().mean()


# f-distill's weight h(r) of the density ratio r = p_data / p_student for each f-divergence (f-distill Table 1).
F_WEIGHTS = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / r.clamp(min=1e-8),
    "sh": lambda r: r.sqrt(),
    "jf": lambda r: 1 + r,
}


def all_reduce_sum(x):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def f_weights(logits, t, bins, args):
    """f-distill (Xu et al. 2025, Sec. 4): the density ratio from the discriminator, r = exp(logit) clipped to
    [ratio_lower, ratio_upper]; divided by its running mean in linear t-bins over [t_min, t_max]; h = f_weight(r),
    normalised to mean one over the global batch. `bins` (ratio_bins,) is updated in place."""
    with torch.no_grad():
        r = logits.float().mean(dim=1).clamp(-10, 10).exp().clamp(args.ratio_lower, args.ratio_upper)
        if args.ratio_bins:
            index = ((t.float() - args.t_min) / (args.t_max - args.t_min) * args.ratio_bins).long().clamp(0, args.ratio_bins - 1)  # fmt: skip
            counts = all_reduce_sum(torch.zeros(args.ratio_bins, device=r.device).index_add_(0, index, torch.ones_like(r)))  # fmt: skip
            sums = all_reduce_sum(torch.zeros(args.ratio_bins, device=r.device).index_add_(0, index, r))
            seen = counts > 0
            bins[seen] = args.ratio_ema * bins[seen] + (1 - args.ratio_ema) * sums[seen] / counts[seen]
            r = r / (bins[index] + 1e-6)
        h = F_WEIGHTS[args.f_div](r)
        total = all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(len(h)), device=h.device)]))
        return h / (total[0] / total[1] + 1e-6), r


def dmd2_generator_loss(net, teacher, fake, disc, x0, shape, cond, uncond, args, module, bins=None):
    """DMD2's generator step (DMD2 Eq. 2 + Sec. 4.3): the VSD loss between the (guided) teacher's and the fake score's
    x0 predictions at a noised student sample, plus the non-saturating GAN loss softplus(-D) on teacher features;
    f-distill scales the per-sample VSD weight by h(r) (f-distill Eq. 9)."""
    device = next(iter(cond.values())).device
    x_in, t_s = student_input(x0, shape, args, module, device)
    g = denoise(module, net, x_in, t_s, cond)
    t = sample_t(shape[0], args, module, device)
    x_t = noised(module, g, torch.randn_like(g), t)
    with torch.no_grad():
        x_fake = denoise(module, fake, x_t, t, cond)
    logs, loss_gan, logits = {}, g.new_zeros(()), None
    if disc is not None:  # the GAN gradient flows through the frozen teacher into x_t and g
        x_teacher, maps = denoise(module, teacher, x_t, t, cond, feature_indices=disc_indices(disc))
        logits = disc(maps)
        loss_gan = F.softplus(-logits.float()).mean()
        logs["gan_loss_gen"] = loss_gan.item()
    else:
        with torch.no_grad():
            x_teacher = denoise(module, teacher, x_t, t, cond)
    x_teacher = x_teacher.detach()
    if args.model != "flux" and args.guidance != 1.0:  # classifier-free guidance on the teacher's x0
        with torch.no_grad():
            x_teacher = x_teacher + (args.guidance - 1) * (x_teacher - denoise(module, teacher, x_t, t, uncond))
    scale = None
    if args.method == "fdistill":
        scale, ratio = f_weights(logits, t, bins, args)
        logs |= {"h_min": scale.min().item(), "h_mean": scale.mean().item(), "h_max": scale.max().item(), "ratio_mean": ratio.mean().item()}  # fmt: skip
    loss_vsd = vsd_loss(g, x_teacher, x_fake, scale)
    logs["vsd_loss"] = loss_vsd.item()
    return loss_vsd + args.gan_weight * loss_gan, logs


def ladd_generator_loss(net, teacher, disc, x0, shape, cond, args, module):
    """LADD's generator step (Sauer et al. 2024, Eq. 2): the non-saturating GAN loss softplus(-D) on the frozen
    teacher's features of the noised student sample; no score terms, no guidance."""
    device = next(iter(cond.values())).device
    x_in, t_s = student_input(x0, shape, args, module, device)
    g = denoise(module, net, x_in, t_s, cond)
    t = sample_t(shape[0], args, module, device)
    x_t = noised(module, g, torch.randn_like(g), t)
    loss = F.softplus(-disc(features(teacher, x_t, t, cond, disc_indices(disc))).float()).mean()
    return loss, {"gan_loss_gen": loss.item()}


def fake_score_loss(fake_net, x_t, g, t, cond, args, module):
    """The fake score's denoising score matching on student samples g noised to x_t at t, unweighted, in the space
    of --fake_score_pred_type (FastGen's fake_score_pred_type): x0, ||D_fake - g||^2 (FastGen's SD1.5 and Flux), or the
    network's native prediction, e.g. ||eps_fake - eps||^2 for SDXL, whose configs leave the type unset."""
    if args.fake_score_pred_type == "x0":
        return (denoise(module, fake_net, x_t, t, cond).float() - g.float()).square().mean()
    target = module.from_x0(x_t.double(), g.double(), t, module.PRED_TYPE)
    return (fake_net(x_t, t, **cond).float() - target.float()).square().mean()


def critic_loss(student, teacher, fake_net, disc_net, x0, shape, cond, args, module):
    """The critic step of DMD2 / f-distill / LADD. The fake score (absent in LADD) learns the student's distribution by
    denoising score matching on student samples (fake_score_loss), and the GAN heads
    learn to tell noised real latents from noised student samples, softplus(D(fake)) + softplus(-D(real)); optional
    approximate R1: the heads' logits should not change when the clean real latents move by r1_alpha n (APT)."""
    device = next(iter(cond.values())).device
    with torch.no_grad():
        x_in, t_s = student_input(x0, shape, args, module, device)
        g = denoise(module, student, x_in, t_s, cond)
    t = sample_t(shape[0], args, module, device)
    eps = torch.randn_like(g)
    x_t = noised(module, g, eps, t)
    logs, loss = {}, g.new_zeros((), dtype=torch.float32)
    if fake_net is not None:
        loss_fake = fake_score_loss(fake_net, x_t, g, t, cond, args, module)
        logs["fake_score_loss"] = loss_fake.item()
        loss = loss + loss_fake
    if disc_net is None:
        return loss, logs
    if args.gan_same_t_noise:
        t_real, eps_real = t, eps
    else:
        t_real, eps_real = sample_t(shape[0], args, module, device), torch.randn_like(x0)
    x_real = noised(module, x0, eps_real, t_real)
    indices = disc_indices(disc_net)
    with torch.no_grad():
        maps = [features(teacher, x_t, t, cond, indices), features(teacher, x_real, t_real, cond, indices)]  # fmt: skip
        if args.r1_weight > 0:
            # FastGen's form (dmd2.py): the clean real moved by r1_alpha n, seen by the teacher at t_real.
            x_perturbed = x0 + args.r1_alpha * torch.randn_like(x0)
            maps.append(features(teacher, x_perturbed, t_real, cond, indices))
    # One pass of the heads over [fake; real; perturbed real], so that DDP sees a single forward per step.
    logits = disc_net([torch.cat(m) for m in zip(*maps)]).float().chunk(len(maps))
    loss_disc = F.softplus(logits[0]).mean() + F.softplus(-logits[1]).mean()
    logs["gan_loss_disc"] = loss_disc.item()
    loss = loss + loss_disc
    if args.r1_weight > 0:
        loss_r1 = (logits[1] - logits[2]).square().mean()
        logs["gan_loss_r1"] = loss_r1.item()
        loss = loss + args.r1_weight * loss_r1
    return loss, logs


# ----------------------------------------------------------------------------
# GAN heads on frozen teacher features (reference/methods.md §3). Flux taps are a block's image tokens as a 2-D map
# (B, width, h / 2, w / 2); SD taps are UNet block outputs (B, C, h', w').


def group_norm(channels):
    """GroupNorm with the largest divisor of C that is at most 32 groups (C // 4 groups for narrow maps)."""
    if channels <= 32:
        return nn.GroupNorm(max(channels // 4, 1), channels)
    return nn.GroupNorm(max(g for g in range(1, 33) if channels % g == 0), channels)


class Discriminator(nn.Module):
    """One head per feature map, logits (B, heads).

    'dit' (FastGen's Discriminator_ImageDiT, for Flux): 4x4 stride-2 conv C -> C/2, GroupNorm, LeakyReLU(0.2), 1x1 conv
    to one channel, global average pool. 'unet' (Discriminator_SD15/SDXL, the EDM heads): 4x4 stride-2 convs down to
    4x4, a 4x4 stride-4 conv to 1x1, GroupNorm + SiLU after each, then a 1x1 conv to one logit."""

    def __init__(self, indices, shapes, kind):
        super().__init__()
        self.indices = tuple(indices)  # which teacher blocks the heads read, in order
        self.heads = nn.ModuleList()
        for channels, size in shapes:
            if kind == "dit":
                layers = [nn.Conv2d(channels, channels // 2, 4, 2, 1), group_norm(channels // 2), nn.LeakyReLU(0.2),
                          nn.Conv2d(channels // 2, 1, 1), nn.AdaptiveAvgPool2d(1)]  # fmt: skip
            else:
                layers = []
                while size > 4:
                    layers += [nn.Conv2d(channels, channels, 4, 2, 1), group_norm(channels), nn.SiLU()]
                    size //= 2
                layers += [nn.Conv2d(channels, channels, size, size), group_norm(channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]  # fmt: skip
            self.heads.append(nn.Sequential(*layers))

    def forward(self, maps):
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, maps)], dim=1)


def disc_indices(disc):
    return disc.module.indices if isinstance(disc, DDP) else disc.indices


# ----------------------------------------------------------------------------
# Data: prompt embeddings, real latents, teacher pairs.


def text_encoder(args, cfg):
    """The family's text encoders; --tiny: random ones whose widths match the tiny denoiser."""
    if not args.tiny:
        return TextEncoder(args.model, args.text_encoder or FAMILIES[args.model][3], device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    if args.model == "flux":
        widths = {"clip": cfg.pooled_projection_dim, "t5": cfg.joint_attention_dim}
    elif args.model == "sd15":
        widths = {"clip": cfg.cross_attention_dim}
    else:  # SDXL's text is [CLIP-L; bigG] states, its pooled input bigG's projection beside 6 micro-conditions
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        widths = {"clip": cfg.cross_attention_dim - pooled, "clip2": pooled}
    return TextEncoder(args.model, tiny=widths)


# What a file that does not load raises (missing, unreadable, corrupt, another network's): reported as bad input.
BAD_FILE = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


def make_vae(args, latent_channels):
    if args.tiny:
        torch.manual_seed(rng_seed(args.seed, 5))
        return autoencoder_kl.AutoencoderKL(replace(autoencoder_kl.CONFIGS["tiny"], latent_channels=latent_channels)).eval()  # fmt: skip
    name = args.vae or FAMILIES[args.model][4]
    try:
        return autoencoder_kl.from_pretrained(name)
    except BAD_FILE as e:
        fail(f"cannot load the autoencoder {name}: {e}", "--vae", "download it with download.py, or give a preset of models/autoencoder_kl.py, a Hub repo or a local folder")  # fmt: skip


def read_prompts(path):
    """The prompts of a text file, one per non-blank line. A file that is missing, not text or without a single prompt
    stops the run (an empty file would otherwise train on the empty prompt alone)."""
    fix = "give a UTF-8 text file with one prompt per line"
    if not os.path.isfile(path):
        fail(f"{path} {'is a folder' if os.path.isdir(path) else 'does not exist'}", "--prompts", fix)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path} is not readable text ({e})", "--prompts", fix)
    if "\x00" in text:
        fail(f"{path} is a binary file, not text", "--prompts", fix)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"{path} holds no prompt (every line is blank)", "--prompts", fix)
    return prompts


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DATA_FIX = "give a folder of images (png/jpg/webp, captions in NAME.txt) or of latent shards (*.safetensors)"


def data_kind(folder):
    """'shards' or 'images': what --data holds, checked before anything loads."""
    if not os.path.isdir(folder):
        fail(f"{folder} {'is a file' if os.path.exists(folder) else 'does not exist'}", "--data", DATA_FIX)
    names = os.listdir(folder)
    if any(f.endswith(".safetensors") for f in names):
        return "shards"
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in names):
        fail(f"{folder} holds no images and no latent shards", "--data", DATA_FIX)
    return "images"


def read_latent_shards(folder, where=None):
    """Latent shards (*.safetensors with `latents` (N, C, h, w) and metadata `prompts`): (latents, prompts). A file
    that is not such a shard stops the run, naming it."""
    where = where or f"--data {folder}"
    latents, prompts = [], []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                meta = f.metadata() or {}
                if "latents" not in f.keys() or "prompts" not in meta:
                    fail(f"{name} is not a latent shard: it needs a `latents` tensor and `prompts` metadata", where, "write shards as download.py or the image encoding of this script does")  # fmt: skip
                x = f.get_tensor("latents").float()
            captions = json.loads(meta["prompts"])
        except (OSError, ValueError, SafetensorError) as e:
            fail(f"{name} is not a readable latent shard ({e})", where, "replace or remove the file")
        if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
            fail(f"{name}: the `prompts` metadata is not a JSON list of strings", where, "give one caption per latent")
        if x.ndim != 4 or len(x) != len(captions) or (latents and x.shape[1:] != latents[0].shape[1:]):
            fail(f"{name}: {len(captions)} prompts for latents of shape {tuple(x.shape)}{f', the other shards hold {tuple(latents[0].shape[1:])}' if latents else ''}", where, "give (N, C, h, w) latents of one shape and N prompts per shard")  # fmt: skip
        if not torch.isfinite(x).all():
            fail(f"{name} holds non-finite latents", where, "re-encode the images, or remove the shard")
        latents.append(x)
        prompts += captions
    return torch.cat(latents), prompts


def encode_images(args, folder, cache, vae, master):
    """Encode a folder of images once (centre crop, resize to --resolution, the VAE's posterior mean) into latent
    shards in `cache`; captions from NAME.txt beside each image (empty if absent). The cache holds what it was made
    from (folder, image names, resolution, autoencoder): other data or settings encode anew."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    made_from = json.dumps({"data": os.path.abspath(folder), "images": hashlib.sha256("\n".join(names).encode()).hexdigest(), "resolution": args.resolution, "model": args.model, "vae": args.vae, "tiny": args.tiny, "seed": args.seed if args.tiny else None})  # fmt: skip
    done = os.path.join(cache, "done")
    cached = ""
    if os.path.exists(done):
        with open(done) as f:
            cached = f.read()
    if master and cached != made_from:
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache)
        for start in tqdm(range(0, len(names), 1000), desc="encoding images", unit="shard"):
            images, prompts = [], []
            for name in names[start : start + 1000]:
                try:
                    img = Image.open(os.path.join(folder, name)).convert("RGB")
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    fail(f"{name} is not a readable image ({e})", f"--data {folder}", "replace or remove the file")
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize((args.resolution,) * 2, Image.BICUBIC)
                images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
                caption = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
                try:
                    prompts.append(open(caption, encoding="utf-8-sig").read().strip() if os.path.exists(caption) else "")  # fmt: skip
                except (OSError, UnicodeDecodeError) as e:
                    fail(f"the caption {os.path.basename(caption)} is not readable text ({e})", f"--data {folder}", "write the caption as UTF-8 text, or remove the file")  # fmt: skip
            with torch.no_grad():
                device = next(vae.parameters()).device
                latents = torch.cat(
                    [vae.encode(x.to(device), sample=False).cpu() for x in torch.stack(images).split(16)]
                )
            path = os.path.join(cache, f"shard_{start // 1000:05d}.safetensors")
            save_file({"latents": latents.contiguous()}, path + ".tmp", metadata={"prompts": json.dumps(prompts)})
            os.replace(path + ".tmp", path)
        write_atomic(done, made_from.encode())
    if dist.is_initialized():
        dist.barrier()
    return read_latent_shards(cache, f"the cache of --data {folder} in {cache}")


def read_pairs(folder, student_steps):
    """Teacher pairs written by --make_pairs: (B, P + 1, C, h, w) with the P stored states and the output, and prompts."""
    index_file = os.path.join(folder, "pairs.json")
    if not folder or not os.path.exists(index_file):
        fail(f"{index_file if folder else 'no pairs folder'}: no teacher pairs", "--pairs", "write them first with --make_pairs N --pairs DIR --prompts FILE")  # fmt: skip
    try:
        with open(index_file) as f:
            meta = json.load(f)
        shards = [load_file(os.path.join(folder, name)) for name in meta["shards"]]
        if shards:
            states = torch.cat([s["states"] for s in shards])
            pairs = torch.cat([states, torch.cat([s["x0"] for s in shards]).unsqueeze(1)], dim=1)
            names = [p for name in meta["shards"] for p in meta["prompts"][name]]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        fail(f"{folder} holds unreadable teacher pairs ({type(e).__name__}: {e})", f"--pairs {folder}", "write them anew with --make_pairs N into an empty --pairs DIR")  # fmt: skip
    if not shards:
        fail(f"{folder} holds no pairs yet", f"--pairs {folder}", "rerun the --make_pairs command to finish it")
    if len(names) != len(pairs) or not all(isinstance(p, str) for p in names):
        fail(f"{folder} lists {len(names)} prompts for {len(pairs)} pairs", f"--pairs {folder}", "write them anew with --make_pairs N into an empty --pairs DIR")  # fmt: skip
    if states.shape[1] % student_steps:
        fail(f"the pairs hold {states.shape[1]} trajectory states, which a {student_steps}-step student cannot divide", "--student_steps", f"give a divisor of {states.shape[1]}, or make pairs with another --pair_states")  # fmt: skip
    return pairs, names


@torch.no_grad()
def teacher_sample(module, teacher, noise, cond, uncond, args, steps, keep_states=0):
    """The teacher's sampler: DDIM from sigma(t_0) noise over t_list(P) with each of the P segments cut into
    steps / P equal parts (on the rectified flow of Flux this is exactly Euler on the flow); x_next = alpha' x0 +
    sigma' eps_hat with eps_hat = (x - alpha x0) / sigma. Returns the output and the states at t_list(P)."""
    P = max(keep_states, 1)
    knots = module.t_list(P)
    times = torch.cat([torch.linspace(float(a), float(b), steps // P + 1, dtype=torch.float64)[:-1] for a, b in zip(knots[:-1], knots[1:])] + [knots[-1:]])  # fmt: skip
    x = (module.sigma(times[0]) * noise.double()).to(noise.dtype)
    states = []
    for i in range(len(times) - 1):
        if keep_states and i % (steps // P) == 0:
            states.append(x)
        t = times[i].expand(len(x)).to(x.device)
        x0 = teacher_x0(module, teacher, x, t, cond, uncond, args).double()
        if times[i + 1] > 0:
            eps_hat = (x.double() - module.alpha(times[i]) * x0) / module.sigma(times[i])
            x = (module.alpha(times[i + 1]) * x0 + module.sigma(times[i + 1]) * eps_hat).to(noise.dtype)
        else:
            x = x0.to(noise.dtype)
    return x, states


def make_pairs(args, folder, own, module, teacher, embed, prompts, latent_shape, device, rank, world, n, shard_size=64):
    """Write n teacher pairs to `folder` as shards of shard_size (states at t_list(P), outputs, prompts). Shard k uses
    noise seeded by k and the prompts k * shard_size + i (cycling through `prompts`), so an interrupted run resumes
    where it stopped and any number of processes produce the same pairs. The folder's pairs.json records the settings
    from the start: pairs made with others are refused, or made anew where the folder is the run's `own`."""
    settings = {"model": args.model, "teacher": args.teacher, "guidance": args.guidance, "steps": args.teacher_steps, "states": args.pair_states, "shape": list(latent_shape), "seed": args.seed}  # fmt: skip
    index_file = os.path.join(folder, "pairs.json")
    if rank == 0 and os.path.exists(index_file):
        try:
            with open(index_file) as f:
                old = json.load(f)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            old = f"an unreadable pairs.json ({e})"
        if old != settings and own:  # the run's own pairs (--tiny): made again with this run's settings
            shutil.rmtree(folder)
        elif old != settings:
            fail(f"{folder} holds pairs made with other settings ({old})", f"--pairs {folder}", "choose another --pairs DIR, or the settings the pairs were made with")  # fmt: skip
    if rank == 0 and not os.path.exists(index_file):
        os.makedirs(folder, exist_ok=True)
        write_atomic(index_file, json.dumps({"settings": settings, "shards": [], "prompts": {}}).encode())
    if dist.is_initialized():
        dist.barrier()
    shards = [f"shard_{k:05d}.safetensors" for k in range(math.ceil(n / shard_size))]
    shard_prompts = {name: [prompts[i % len(prompts)] for i in range(k * shard_size, min(n, (k + 1) * shard_size))] for k, name in enumerate(shards)}  # fmt: skip
    # Every process works on every shard, on its share of the rows (padded to equal shares): under FSDP each teacher
    # forward is a collective, so all processes must run the same number of them.
    for k in tqdm(range(len(shards)), disable=rank != 0, desc="teacher pairs", unit="shard"):
        path = os.path.join(folder, shards[k])
        done = torch.tensor(float(rank == 0 and os.path.exists(path)), device=device)
        if all_reduce_sum(done) > 0:
            continue
        ids = embed.ids(shard_prompts[shards[k]])
        noise = torch.randn(len(ids), *latent_shape, generator=torch.Generator().manual_seed(rng_seed(args.seed, 7, k)))
        share = math.ceil(len(ids) / world)
        rows = torch.arange(rank * share, (rank + 1) * share).clamp(max=len(ids) - 1)
        x0s, states = [], []
        for chunk in rows.split(8):
            uncond = embed(embed.ids([""] * len(chunk)), device)
            x0, s = teacher_sample(module, teacher, noise[chunk].to(device), embed(ids[chunk], device), uncond, args, args.teacher_steps, args.pair_states)  # fmt: skip
            x0s.append(x0.float())
            states.append(torch.stack(s, dim=1).float())
        x0, states = torch.cat(x0s), torch.cat(states)
        if world > 1:
            x0s, all_states = [torch.empty_like(x0) for _ in range(world)], [torch.empty_like(states) for _ in range(world)]  # fmt: skip
            dist.all_gather(x0s, x0)
            dist.all_gather(all_states, states)
            x0, states = torch.cat(x0s)[: len(ids)], torch.cat(all_states)[: len(ids)]
        if rank == 0:
            save_file({"x0": x0.cpu().contiguous(), "states": states.cpu().contiguous()}, path + ".tmp")
            os.replace(path + ".tmp", path)
    if rank == 0:
        index = {"settings": settings, "shards": shards, "prompts": shard_prompts}
        write_atomic(index_file, json.dumps(index).encode())
    if dist.is_initialized():
        dist.barrier()


class Embeddings:
    """The prompt table: every prompt the run uses, embedded once (and cached on disk); embed(ids) -> conditioning."""

    def __init__(self, args, cfg, prompts, cache_dir, master):
        self.args, self.cfg, self.prompts = args, cfg, list(dict.fromkeys(prompts + [""]))  # "" = the unconditional
        self.index = {p: i for i, p in enumerate(self.prompts)}
        try:
            if master:
                cached_embeddings(text_encoder(args, cfg), self.prompts, cache_dir)
            if dist.is_initialized():
                dist.barrier()
            self.table = cached_embeddings(text_encoder(args, cfg), self.prompts, cache_dir)  # read back from the cache
        except (*BAD_FILE, ImportError) as e:
            fail(f"cannot load the {args.model} text encoders or their cache in {cache_dir}: {str(e)[:300]}", "--text_encoder", "download the family's pipeline (download.py) or give its local folder; remove a damaged cache")  # fmt: skip
        if args.tiny:  # the built-in prompts are short: keep their first tokens, not 512 (T5) or 77 (CLIP) of padding
            self.table = {k: v[:, :TINY_TOKENS] if k.startswith("text") else v for k, v in self.table.items()}

    def ids(self, prompts):
        return torch.tensor([self.index[p] for p in prompts])

    def __call__(self, ids, device):
        """The network's keyword arguments for the prompts `ids` (B,): text (+ pooled, text_mask, guidance, time_ids)."""
        cond = {k: v[ids].to(device) for k, v in self.table.items()}
        B = len(ids)
        if self.args.model == "flux" and self.cfg.guidance_embeds:
            cond["guidance"] = torch.full((B,), self.args.guidance, device=device)
        if self.args.model == "sdxl":  # FastGen fixes SDXL's micro-conditioning at 1024 px, uncropped
            cond["time_ids"] = sdxl.add_time_ids(batch=B, device=device)
        return cond


def make_data(args, embed_prompts, latents, prompts, pairs, pair_prompts):
    """A function (step, shard, n) -> (x0 or pairs or None, prompt ids), a pure function of its arguments."""

    def batch(step, shard, n):
        g = torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0))
        if args.method == "kd":
            index = torch.randint(len(pairs), (n,), generator=g)
            return pairs[index], pair_prompts[index]
        if latents is not None:
            index = torch.randint(len(latents), (n,), generator=g)
            return latents[index], prompts[index]
        return None, torch.randint(len(embed_prompts), (n,), generator=g)

    return batch


# ----------------------------------------------------------------------------
# Scale: FSDP2 per block (meta-device init, one full state dict broadcast from rank 0), activation checkpointing,
# bf16 compute.


def blocks(net):
    """The units FSDP2 shards and activation checkpointing recomputes: Flux's transformer blocks, the UNet's blocks."""
    if isinstance(net, flux.FluxModel):
        return list(net.transformer_blocks) + list(net.single_transformer_blocks)
    return list(net.down_blocks) + [net.mid_block] + list(net.up_blocks)


def checkpointed(forward):
    """forward under activation checkpointing. The recomputation gets fresh copies of list arguments: the UNet's up
    blocks pop their skip tensors off the list they are given."""

    def fresh(*args):
        return forward(*[list(a) if isinstance(a, list) else a for a in args])

    return functools.partial(torch.utils.checkpoint.checkpoint, fresh, use_reentrant=False)


def build_network(Net, cfg, state, args, device, fsdp_policy):
    """A network holding `state` (the full state dict on rank 0; {} elsewhere under FSDP). Under FSDP it is built on
    the meta device, sharded per block then at the root, materialised empty and filled by a broadcast from rank 0, so
    no process but rank 0 ever holds the full weights."""
    if fsdp_policy is None:
        net = Net(cfg)
        net.load_state_dict(state)
        net = net.to(device)
    else:
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            net = Net(cfg)
        for block in blocks(net):
            fully_shard(block, mp_policy=fsdp_policy)
        # The root reshards after forward too: the teacher (and the student in critic steps) run without a backward,
        # which is where FSDP2 would otherwise reshard the root's parameters.
        fully_shard(net, mp_policy=fsdp_policy, reshard_after_forward=True)
        net.to_empty(device=device)
        set_model_state_dict(
            net, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )  # it rewrites the dict
    if args.grad_ckpt:  # recompute each block's activations in the backward pass instead of keeping them
        for block in blocks(net):
            block.forward = checkpointed(block.forward)
    return net


def full_state(net, fsdp):
    """The full state dict on the CPU (gathered from the shards under FSDP: every rank must call it)."""
    if fsdp:
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in (net.module if isinstance(net, DDP) else net).state_dict().items()}


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------
# Sampling, evaluation and checkpoints


@torch.no_grad()
def generate(module, net, noise, cond, steps):
    """FastGen's student sampler (reference/methods.md §5.2): predict x0 from sigma(t_0) noise, re-noise it to the
    next t_list time with fresh noise ('sde'), return the last x0."""
    times = module.t_list(steps)
    x = (module.sigma(times[0]) * noise.double()).to(noise.dtype)
    for i in range(steps):
        t = times[i].expand(len(x)).to(x.device)
        x0 = denoise(module, net, x, t, cond)
        if times[i + 1] > 0:
            x = noised(module, x0, torch.randn_like(x0), times[i + 1].expand(len(x)).to(x.device))
    return x0.float()


def moment_distance(a, b):
    """Distance between two sets of latents (N, C, h, w) as distributions: squared differences of the per-channel,
    per-position mean and standard deviation over the set, averaged."""
    return ((a.mean(0) - b.mean(0)).square().mean() + (a.std(0) - b.std(0)).square().mean()).item()


# Sample grids: copies of sample.py's (tests/test_hygiene.py keeps them identical), so that a script imports no
# other family's model files.


def image_grid(images, cols=None):
    """uint8 [N, H, W, C] -> one uint8 image with the samples on a grid (near-square unless `cols` is given)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img
    return grid


def to_uint8(x):
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------
# Runs that can be trusted for a week: bad input ends with one line and exit code 2 before anything loads; a run
# directory holds one run; a step with a non-finite loss or gradient is skipped on every process, and a checkpoint
# is written only when every weight is finite, fsynced, then renamed into place. The functions of this section are
# the same, word for word, in every training script (tests/test_hygiene.py keeps them so); what differs per script
# is its FLAG_RANGES and RUN_IDENTITY.


def fail(what, where, fix, code=2):
    """Stop with `error: <what> (<where>): <fix>` on stderr: exit code 2 for bad input, 1 for a run that cannot go
    on. No traceback: the line says everything the user needs."""
    if int(os.environ.get("RANK", "0")) == 0:
        what = " ".join(str(what).split())  # one line, whatever the message it quotes
        tqdm.write(f"error: {what} ({where}): {fix}", file=sys.stderr)  # on its own line, below a progress bar
    raise SystemExit(code)


def check_flag_ranges(args, ranges):
    """Every numeric flag against its range, before anything loads; `ranges`: kind -> flag names."""
    tests = {
        "positive": (lambda v: v > 0, "a number > 0"),
        "non_negative": (lambda v: v >= 0, "a number >= 0"),
        "unit": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "learning_rate": (lambda v: 0 < v <= 1, "a learning rate in (0, 1]: Adam's lr is a step in weight units"),
        "finite": (lambda v: True, "a finite number"),
    }
    for kind, names in ranges.items():
        accept, wanted = tests[kind]
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and accept(value)):
                fail(f"--{name} {value} is out of range", f"--{name}", f"give {wanted}")


def split_batch(batch_size, micro_batch, world):
    """(per-process micro-batch, accumulation rounds) that make up exactly `batch_size` over `world` processes."""
    if batch_size % world:
        fail(f"the global batch {batch_size} does not split over {world} processes", "--batch_size", f"give a multiple of {world}")  # fmt: skip
    micro = micro_batch or batch_size // world
    if (batch_size // world) % micro:
        fail(f"{batch_size // world} samples per process are not a whole number of micro-batches of {micro}", "--micro_batch", f"give a divisor of {batch_size // world}")  # fmt: skip
    return micro, batch_size // (world * micro)


def checkpoints(out_dir):
    """The finished checkpoints ckpt_NNNNNNN of a run directory, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, d) for d in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d{7}", d))


def run_files(out_dir):
    """The files that make a directory a run's: its flags, metrics, samples, reports and checkpoints."""
    names = ["args.json", "metrics.jsonl", "samples", "quality.md", "quality.png", "metrics.png"]
    return [p for p in (os.path.join(out_dir, n) for n in names) if os.path.exists(p)] + checkpoints(out_dir)


def prepare_run_dir(args, identity, master):
    """Check --out_dir before anything loads; nothing is written here (claim_run_dir does that once every input has
    loaded). Returns the checkpoint to resume or None. A directory that holds another run's files is refused unless
    --resume (continue it: the saved args.json must name the same `identity` flags) or --overwrite (start over)."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"{out} is a file", "--out_dir", "name a directory for the run")
    held = run_files(out)
    ckpt = None
    if args.resume:
        for ckpt in reversed(checkpoints(out)):  # the newest complete one (a checkpoint always holds these two)
            if all(os.path.isfile(os.path.join(ckpt, n)) for n in ("args.json", "state.pt")):
                break
        else:
            fail(f"no checkpoint ckpt_NNNNNNN to resume in {out}", "--resume", "name the run's --out_dir, or drop --resume to start a new run")  # fmt: skip
        with open(os.path.join(ckpt, "args.json")) as f:
            saved = json.load(f)
        mine = vars(args) | {"script": os.path.basename(__file__)}
        mismatch = [k for k in identity if saved.get(k) != mine.get(k)]
        if mismatch:
            detail = ", ".join(f"--{k} {saved.get(k)!r} there, {mine.get(k)!r} here" for k in mismatch)
            fail(f"{ckpt} is another run ({detail})", "--resume", "resume with the run's own flags, or choose another --out_dir")  # fmt: skip
        changed = {k: (saved[k], v) for k, v in vars(args).items() if k in saved and saved[k] != v and k != "resume"}
        if master and changed:
            print("resuming with changed flags: " + ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))  # fmt: skip
    elif held and not args.overwrite:
        fail(f"{out} holds another run ({os.path.basename(held[0])})", "--out_dir", "continue it with --resume, replace it with --overwrite, or choose another --out_dir")  # fmt: skip
    return ckpt


def claim_run_dir(args, master):
    """Make --out_dir this run's once every input has loaded, so that bad input never leaves a half-claimed
    directory: --overwrite removes the earlier run's files only now, a checkpoint left half-written by a crash goes,
    and a new run records its flags in args.json (each checkpoint also holds the flags it was written with)."""
    if dist.is_initialized():  # every process has checked the directory before the first one writes
        dist.barrier()
    out = args.out_dir
    if not master:
        return
    held = run_files(out)
    if held and not args.resume:
        for path in held:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"--overwrite: removed the earlier run in {out}")
    for stale in (d for d in os.listdir(out) if d.endswith(".tmp")) if os.path.isdir(out) else []:
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        print(f"removed {stale}, a checkpoint left unfinished by a crash")
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    if not args.resume:
        write_atomic(os.path.join(out, "args.json"), json.dumps(vars(args) | {"script": os.path.basename(__file__)}, indent=1).encode())  # fmt: skip


def write_atomic(path, data):
    """Bytes to a file that either holds all of them or keeps its old content (temp file, fsync, rename)."""
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def open_metrics(out_dir, start):
    """metrics.jsonl for appending, one flushed line per record. On resume the lines past the resumed step (written
    after the checkpoint, before the crash) are dropped, so the log reads as one run."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start]
        write_atomic(path, "".join(lines).encode())
    return open(path, "a", buffering=1)  # line-buffered: every record reaches the file as it is written


def all_finite(*values):
    """Whether every tensor is finite on every process: all processes take the same decision."""
    flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def nonfinite_tensors(state_dicts):
    """Names of the floating tensors holding a NaN or an infinity: `state_dicts` is name -> state dict."""
    return [f"{name}.{k}" for name, sd in state_dicts.items() for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]  # fmt: skip


def save_checkpoint(out_dir, step, tensors, metadata, state, args_json):
    """ckpt_NNNNNNN/: NAME.safetensors per entry of `tensors` (name -> state dict, with `metadata[name]`), state.pt,
    args.json. Refused when a weight is not finite; written to ckpt_NNNNNNN.tmp, fsynced, then renamed, so a crash
    or a full disk never leaves a half checkpoint nor touches an earlier one."""
    bad = nonfinite_tensors(tensors)
    if bad:
        fail(f"step {step}: {len(bad)} weight tensors are not finite ({', '.join(bad[:3])}, ...)", out_dir, "the run diverged; nothing was saved: lower --lr and --resume from the last checkpoint", code=1)  # fmt: skip
    final = os.path.join(out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, sd in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.path.join(tmp, f"{name}.safetensors"), metadata=metadata[name])  # fmt: skip
        torch.save(state | {"step": step}, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            f.write(args_json)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again in this run (a resumed run ending where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        dir_fd = os.open(out_dir, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"could not write checkpoint step {step}: {e.strerror or e}", final, "free disk space or fix permissions, then --resume from the last checkpoint", code=1)  # fmt: skip
    return final


# ----------------------------------------------------------------------------


def load_teacher(args, module, Net, pretrained, load_weights):
    """(Config, full state dict) of the pretrained denoiser: a .safetensors this script saved (its Config in the
    metadata), the tiny random network, or the family's release, a CONFIGS name, Hub repo or folder. The weights only
    where `load_weights` ({} elsewhere: under FSDP they arrive by broadcast from the first process)."""
    if args.teacher.endswith(".safetensors"):  # a network this script saved (its config in the metadata)
        fix = "give a student.safetensors that this script saved, or a CONFIGS name, Hub repo or folder"
        if not os.path.isfile(args.teacher):
            fail(f"{args.teacher} does not exist", "--teacher", fix)
        try:
            with safe_open(args.teacher, framework="pt") as f:
                fields = json.loads((f.metadata() or {}).get("config", "null"))
            if fields is None:
                fail(f"{args.teacher} has no config metadata (not a network this script saved)", "--teacher", fix)
            cfg = module.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
            weights = load_file(args.teacher) if load_weights else {}
            if weights:
                with torch.device("meta"):
                    module.check_keys(Net(cfg), weights)
        except (*BAD_FILE, AttributeError) as e:
            fail(f"{args.teacher} is not a {args.model} network: {str(e)[:300]}", "--teacher", fix)
        if bad := nonfinite_tensors({"teacher": weights}):
            fail(f"{args.teacher} holds non-finite weights ({', '.join(bad[:3])})", "--teacher", "give a checkpoint of a run that had not diverged")  # fmt: skip
        return cfg, weights
    if args.tiny:  # a random tiny network stands in
        torch.manual_seed(rng_seed(args.seed, 4))
        return module.CONFIGS["tiny"], Net(module.CONFIGS["tiny"]).state_dict()
    if not load_weights:  # the other processes under FSDP: the architecture comes by broadcast
        return None, {}
    try:
        loaded = module.from_pretrained(args.teacher or pretrained)
    except BAD_FILE as e:
        fail(f"cannot load {args.teacher or pretrained}: {str(e)[:300]}", "--teacher", "download it with download.py, or give a local folder or a .safetensors path")  # fmt: skip
    return loaded.cfg, loaded.state_dict()


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
    if args.fsdp and not distributed:
        args.fsdp = False  # one process: nothing to shard (args.json records it so)
    module, Net, pretrained, _, _, _ = FAMILIES[args.model]
    distribution_matching = args.method in ("dmd2", "fdistill")

    # What the flags point at, checked before anything loads or is written: prompts, data, pairs.
    if args.make_pairs and not args.pairs:
        fail("--make_pairs N writes teacher pairs to a folder", "--pairs", "give --pairs DIR")
    file_prompts = read_prompts(args.prompts) if args.prompts else TINY_PROMPTS if args.tiny and not args.data else []
    if args.make_pairs and not file_prompts:
        fail("--make_pairs needs prompts", "--prompts", "give a text file with one prompt per line")
    if args.method == "fdistill" and args.gan_weight <= 0:
        fail("--method fdistill reads the density ratio off the GAN heads", "--gan_weight", "give --gan_weight > 0")
    kind = data_kind(args.data) if args.data else None
    needs_real = args.method in ("sft", "ladd") or (distribution_matching and (args.gan_weight > 0 or args.student_steps > 1))  # fmt: skip
    # --tiny without data or pairs: the tiny teacher's pairs, made on the fly in the run directory, stand in.
    auto_pairs = args.tiny and not args.pairs and (args.method == "kd" or (needs_real and not args.data))
    pairs_dir = os.path.join(args.out_dir, "pairs") if auto_pairs else args.pairs
    if needs_real and not args.data and not auto_pairs and not args.make_pairs:
        fail(f"--method {args.method} needs real latents", "--data", DATA_FIX)
    if args.method == "kd" and not auto_pairs and not args.make_pairs and not (args.pairs and os.path.isfile(os.path.join(args.pairs, "pairs.json"))):  # fmt: skip
        fail(f"{args.pairs or 'no folder'} holds no teacher pairs (pairs.json)", "--pairs", "write them first with --make_pairs N --pairs DIR --prompts FILE")  # fmt: skip
    if auto_pairs and args.teacher_steps % args.pair_states:
        fail(f"{args.teacher_steps} teacher steps do not split into {args.pair_states} equal segments", "--teacher_steps", f"give a multiple of --pair_states {args.pair_states}")  # fmt: skip
    if auto_pairs and args.method == "kd" and args.pair_states % args.student_steps:
        fail(f"{args.pair_states} trajectory states cannot start a {args.student_steps}-step student", "--student_steps", f"give a divisor of --pair_states {args.pair_states}")  # fmt: skip

    # The run directory: this run's alone (--make_pairs writes to --pairs and keeps its text cache in --out_dir).
    if args.make_pairs:
        ckpt = None
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            fail(f"{args.out_dir} is a file", "--out_dir", "name a directory for the text cache")
    else:
        ckpt = prepare_run_dir(args, RUN_IDENTITY, master)  # before anything loads; nothing written yet
    if master:
        print(json.dumps(vars(args)))

    # The pretrained denoiser, loaded once (on rank 0 only under FSDP): teacher, student and fake score all start
    # from it. --tiny: a random tiny network stands in.
    cfg, weights = load_teacher(args, module, Net, pretrained, master or not args.fsdp)
    if args.fsdp:
        box = [cfg]
        dist.broadcast_object_list(box, src=0)
        cfg = box[0]
    latent_channels = cfg.in_channels // 4 if args.model == "flux" else cfg.in_channels
    vae_factor = 2 if args.tiny else 8  # the tiny VAE has two levels, the released ones four
    side = args.resolution // vae_factor
    latent_shape = (latent_channels, side, side)

    fsdp_policy = None
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        compute = torch.bfloat16 if args.precision == "bf16" else torch.float32
        fsdp_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    teacher = build_network(Net, cfg, weights, args, device, fsdp_policy).eval().requires_grad_(False)

    # Prompts and data. The prompt table holds every prompt: --prompts, the captions of --data, those of the pairs.
    latents = real_prompts = pair_prompts = None
    vae = None
    if args.data:
        if kind == "shards":
            latents, real_prompts = read_latent_shards(args.data)
        else:
            vae = make_vae(args, latent_channels).to(device)
            latents, real_prompts = encode_images(args, args.data, os.path.join(args.out_dir, "latents"), vae, master)
        if tuple(latents.shape[1:]) != latent_shape:
            fail(f"the latents are {tuple(latents.shape[1:])}; the {args.model} student at --resolution {args.resolution} needs {latent_shape}", f"--data {args.data}", "give latents of the family's autoencoder at --resolution, or the --resolution they were made at")  # fmt: skip
    pair_prompt_list = TINY_PROMPTS if auto_pairs else file_prompts
    pairs = names = None
    if args.method == "kd" and not auto_pairs and not args.make_pairs:  # existing pairs bring their own prompts
        pairs, names = read_pairs(pairs_dir, args.student_steps)
    embed = Embeddings(args, cfg, file_prompts + (real_prompts or []) + pair_prompt_list + (names or []), os.path.join(args.out_dir, "cache", "text"), master)  # fmt: skip
    if args.make_pairs or auto_pairs:  # pairs (and LADD-style synthetic real data) from the teacher's sampler
        make_pairs(args, pairs_dir, auto_pairs, module, teacher, embed, pair_prompt_list, latent_shape, device, rank, world, args.make_pairs or 32)  # fmt: skip
        if args.make_pairs:
            if distributed:
                dist.destroy_process_group()
            return None
    if args.method == "kd" or (auto_pairs and latents is None):
        if pairs is None:
            pairs, names = read_pairs(pairs_dir, args.student_steps)
        pair_prompts = embed.ids(names)
        if args.method != "kd":  # the teacher's outputs serve as the real data
            latents, real_prompts = pairs[:, -1], names
    real_ids = embed.ids(real_prompts) if latents is not None else None
    prompt_ids = embed.ids(file_prompts or real_prompts or [""])
    batch_fn = make_data(args, prompt_ids, latents, real_ids, pairs, pair_prompts)

    # Networks: the student (trainable, from the teacher), the fake score (dmd2/fdistill) and the GAN heads.
    student = build_network(Net, cfg, weights, args, device, fsdp_policy).train()
    fake = disc = None
    if distribution_matching:
        fake = build_network(Net, cfg, weights, args, device, fsdp_policy).train()
    del weights
    if args.method == "ladd" or (distribution_matching and args.gan_weight > 0):
        n_blocks = cfg.num_layers + cfg.num_single_layers if args.model == "flux" else len(cfg.block_out_channels) + 1
        default = n_blocks // 2 if args.model == "flux" else n_blocks - 1  # Flux: the middle block; SD: the mid block
        indices = [int(i) for i in args.disc_features.split(",")] if args.disc_features else [default]
        if not all(0 <= i < n_blocks for i in indices):
            fail(f"--disc_features {args.disc_features} names blocks outside the teacher's {n_blocks}", "--disc_features", f"give block numbers from 0 to {n_blocks - 1}")  # fmt: skip
        with torch.no_grad():
            probe = torch.zeros(1, *latent_shape, device=device)
            maps = features(teacher, probe, torch.full((1,), args.t_max, device=device), embed(embed.ids([""]), device), indices)  # fmt: skip
        torch.manual_seed(rng_seed(args.seed, 3))
        disc = Discriminator(indices, [(m.shape[1], m.shape[-1]) for m in maps], "dit" if args.model == "flux" else "unet").to(device).train()  # fmt: skip
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(disc)
    alternating = args.method == "ladd" or distribution_matching  # generator and critic steps take turns
    emas = {spec: [p.detach().clone() for p in student.parameters()] for spec in args.ema.split(",") if spec}
    if distributed and not args.fsdp:
        net = DDP(student, find_unused_parameters=True)
        fake_net = DDP(fake) if fake is not None else None
        disc_net = DDP(disc) if disc is not None else None
    else:
        net, fake_net, disc_net = student, fake, disc
    bins = torch.ones(args.ratio_bins, device=device)  # f-distill's per-t-bin density-ratio means
    if master:
        print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters ({world} processes), method {args.method}")  # fmt: skip

    def adamw(m, lr):
        return torch.optim.AdamW(m.parameters(), lr=lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)

    critic_lr = args.critic_lr or args.lr
    optimizers = {"optimizer": (student, adamw(student, args.lr))}
    optimizers |= {f"{name}_optimizer": (m, adamw(m, critic_lr)) for name, m in (("fake_score", fake), ("discriminator", disc)) if m is not None}  # fmt: skip
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    micro, accum = split_batch(args.batch_size, args.micro_batch, world)

    # What a checkpoint holds: every trained network and the state to continue exactly (the teacher is never saved).
    trained = {"student": student} | {name: m for name, m in (("fake_score", fake), ("discriminator", disc)) if m is not None}  # fmt: skip
    names = [name for name, _ in student.named_parameters()]
    start = 0
    full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=args.fsdp)
    if ckpt:
        try:
            for name, m in trained.items():
                sd = load_file(os.path.join(ckpt, f"{name}.safetensors")) if master or not args.fsdp else {}
                if args.fsdp:
                    set_model_state_dict(m, sd, options=full)
                else:
                    m.load_state_dict(sd)
            state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True, map_location="cpu")
            for name, (m, opt) in optimizers.items():
                set_optimizer_state_dict(m, opt, state[name], options=StateDictOptions(full_state_dict=True))
            for spec, params in emas.items():
                sd = load_file(os.path.join(ckpt, f"ema_{spec}.safetensors"))
                for p, key in zip(params, names):
                    value = sd[key].to(device)
                    if hasattr(p, "device_mesh"):  # an FSDP2 shard: keep this process's part
                        from torch.distributed.tensor import distribute_tensor

                        value = distribute_tensor(value, p.device_mesh, p.placements)
                    p.copy_(value)
            bins.copy_(state["ratio_bins"])
        except (*BAD_FILE, pickle.UnpicklingError) as e:
            fail(f"{ckpt} does not fit this run's networks: {str(e)[:300]}", "--resume", "resume with the flags the run was started with")  # fmt: skip
        start = state["step"]
        if master:
            print(f"resumed from {ckpt} at step {start}")

    # The fixed evaluation set: noise, prompts, the teacher's many-step outputs on them, and a VAE for the grid.
    g = torch.Generator().manual_seed(12345)
    eval_noise = torch.randn(args.eval_n, *latent_shape, generator=g).to(device)
    eval_prompts = torch.arange(args.eval_n) % len(prompt_ids)
    eval_cond = embed(prompt_ids[eval_prompts], device)
    eval_uncond = embed(embed.ids([""] * args.eval_n), device)
    reference = None
    if args.eval_every:
        reference = teacher_sample(module, teacher, eval_noise, eval_cond, eval_uncond, args, args.teacher_steps)[0].float()  # fmt: skip
        vae = vae or make_vae(args, latent_channels)
        vae = vae.to(device)
    claim_run_dir(args, master)  # every input has loaded: from here on the directory is this run's
    log = open_metrics(args.out_dir, start) if master else None
    wandb = None
    if args.wandb and master:
        import wandb

        wandb.init(project=args.wandb, config=vars(args))

    def eval_and_log(step):
        """Every process runs the student (its shards are needed); rank 0 decodes, saves the grid and logs."""
        torch.manual_seed(rng_seed(args.seed, step, 9))
        student.eval()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            x = generate(module, student, eval_noise, eval_cond, args.eval_steps or args.student_steps)
        student.train()
        if master:
            with torch.no_grad():
                images = vae.decode(x.to(next(vae.parameters()).dtype)).float()
            Image.fromarray(image_grid(to_uint8(images))).save(os.path.join(args.out_dir, "samples", f"step_{step:07d}.png"))  # fmt: skip
            record = {"step": step, "eval_mse_to_teacher": (x - reference).square().mean().item(), "eval_moments_to_teacher": moment_distance(x, reference)}  # fmt: skip
            log.write(json.dumps(record) + "\n")

    if args.eval_every and start == 0:  # the first evaluation: the student as initialised
        eval_and_log(0)
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=not master, unit="step")
    skipped, bad_steps = 0, {"generator": 0, "critic": 0}  # updates skipped for a non-finite loss or gradient
    for step in bar:
        # dmd2/fdistill/ladd alternate: a generator step every student_update_freq steps (counting from 1), critic
        # steps (fake score and GAN heads) in between. sft and kd update the student at every step.
        generator_step = not alternating or (step + 1) % args.student_update_freq == 0
        for critic in (fake, disc):
            if critic is not None:
                critic.train(not generator_step).requires_grad_(not generator_step)
        active = ["optimizer"] if generator_step else [n for n in optimizers if n != "optimizer"]
        tic, total = time.time(), torch.zeros((), device=device)
        bins_before = bins.clone()  # f-distill's running ratio means, restored if this step is skipped
        for m in range(accum):
            shard = rank * accum + m  # this micro-batch's place in the global batch
            x0, ids = batch_fn(step, shard, micro)
            x0 = x0.to(device) if x0 is not None else None
            cond, uncond = embed(ids, device), embed(embed.ids([""] * micro), device)
            shape = (micro, *latent_shape)
            torch.manual_seed(rng_seed(args.seed, step, shard, 2))  # noise and dropout: exact on resume
            last = m == accum - 1
            with contextlib.ExitStack() as sync:  # all-reduce gradients on the last accumulation round only
                for name in active:
                    wrapped = {"optimizer": net, "fake_score_optimizer": fake_net, "discriminator_optimizer": disc_net}[name]  # fmt: skip
                    if args.fsdp:
                        wrapped.set_requires_gradient_sync(last)
                    elif distributed and not last:
                        sync.enter_context(wrapped.no_sync())
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if args.method == "sft":
                        loss, logs = sft_loss(net, x0, cond, uncond, args, module)
                    elif args.method == "kd":
                        loss, logs = kd_loss(net, x0, cond, args, module)
                    elif generator_step and args.method == "ladd":
                        loss, logs = ladd_generator_loss(net, teacher, disc, x0, shape, cond, args, module)
                    elif generator_step:
                        loss, logs = dmd2_generator_loss(net, teacher, fake, disc, x0, shape, cond, uncond, args, module, bins)  # fmt: skip
                    else:
                        loss, logs = critic_loss(student, teacher, fake_net, disc_net, x0, shape, cond, args, module)
                (loss / accum).backward()
            total += loss.detach().float() / accum
        # The student's gradient is clipped; the critic's is not (FastGen clips the student only). The norms are the
        # true ones: a NaN or infinity anywhere in a gradient makes its norm non-finite. grad_norm is that of all the
        # networks this step updates (under FSDP2 each norm is a DTensor: its full value).
        norms = []
        for name in active:
            m, _ = optimizers[name]
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip if name == "optimizer" else math.inf)
            norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float())
        grad_norm = torch.stack(norms).square().sum().sqrt()
        # A non-finite loss or gradient on any process: every process skips this update and the EMAs'.
        loss_finite, grad_finite = all_finite(total), all_finite(grad_norm)
        step_taken = loss_finite and grad_finite
        for name in active:
            if step_taken:
                optimizers[name][1].step()
            optimizers[name][1].zero_grad(set_to_none=True)
        kind = "generator" if generator_step else "critic"  # counted apart: a critic that stays NaN must stop too
        if step_taken:
            bad_steps[kind] = 0
        else:
            bins.copy_(bins_before)
            skipped, bad_steps[kind] = skipped + 1, bad_steps[kind] + 1
            steps = f"{kind} steps" if alternating else "steps"
            if master:
                bar.write(f"step {step + 1}: non-finite {'loss' if not loss_finite else 'gradient'}, update skipped ({bad_steps[kind]} {steps} in a row)")  # fmt: skip
            if bad_steps[kind] >= args.max_skipped_steps:
                bar.close()
                last = checkpoints(args.out_dir)
                fail(f"{bad_steps[kind]} consecutive {steps} had a non-finite loss or gradient (up to step {step + 1})", "--max_skipped_steps", f"the run diverged: lower --lr and --resume from {last[-1] if last else 'a new run'}", code=1)  # fmt: skip
        with torch.no_grad():  # every step taken, critic steps included, as FastGen's EMA callback does
            for spec, params in emas.items() if step_taken else []:
                for p_ema, p in zip(params, student.parameters()):
                    local(p_ema).lerp_(local(p.detach()), 1 - float(spec))
        loss_mean = all_reduce_sum(total) / world  # the loss of the global batch

        step_done = step + 1
        if master:
            images_per_s = args.batch_size / (time.time() - tic)
            bar.set_postfix(loss=f"{loss_mean.item():.4f}", img_s=f"{images_per_s:.1f}")
            record = {"step": step_done, "loss": loss_mean.item(), "generator_step": generator_step, "grad_norm": grad_norm.item(), "skipped": skipped, "images_per_s": images_per_s, **logs}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log(record, step=step_done)
        if args.eval_every and (step_done % args.eval_every == 0 or step_done == args.max_steps):
            eval_and_log(step_done)
        if args.save_every and (step_done % args.save_every == 0 or step_done == args.max_steps):
            weights = {name: full_state(m, args.fsdp) for name, m in trained.items()}
            for spec, params in emas.items():
                weights[f"ema_{spec}"] = {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for k, p in zip(names, params)}  # fmt: skip
            state = {name: get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) for name, (m, opt) in optimizers.items()}  # fmt: skip
            state["ratio_bins"] = bins.cpu()
            if master:
                # the networks' Config rides in the metadata (sample.py builds them from it); the GAN heads are ours
                config = json.dumps(asdict(cfg))
                metadata = {name: {"step": str(step_done)} | ({"config": config} if name != "discriminator" else {}) for name in weights}  # fmt: skip
                args_json = json.dumps(vars(args) | {"script": os.path.basename(__file__), "step": step_done}, indent=1)  # fmt: skip
                save_checkpoint(args.out_dir, step_done, weights, metadata, state, args_json)
    if master:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return student


if __name__ == "__main__":
    main(parse_args())
