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

Outputs in --out_dir (default out/train_video/<preset, or model-method>[-tiny]): metrics.jsonl (a line per step;
`skipped` counts the updates skipped for a non-finite loss or gradient), samples/step_NNNNNNN.png (rows: samples,
columns: frames, decoded by the VAE), checkpoints ckpt_NNNNNNN/ (student.safetensors, ema_*.safetensors,
fake_score.safetensors and discriminator.safetensors for dmd2, state.pt with optimizer state, args.json). A directory
holds one run: --resume continues it exactly (the same model, method, teacher and architecture), --overwrite starts
over in it; --print_config shows the resolved flags and exits.
"""

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from encoders import TextEncoder, cached_embeddings
from models import cogvideox, cogvideox_vae, cosmos_predict2, wan, wan_vae

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
parser.add_argument("--grad_clip", type=float, default=10.0, help="max gradient norm of the student")
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
parser.add_argument("--out_dir", default=None, help="the run's directory (default out/train_video/<preset, or model-method>[-tiny])")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its newest checkpoint (same model and method)")
parser.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that holds another run, removing its files")
parser.add_argument("--max_skipped_steps", type=int, default=5, help="stop after this many consecutive steps skipped for a non-finite loss or gradient")
parser.add_argument("--print_config", action="store_true", help="print the resolved configuration (JSON, derived values included) and exit")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
parser.add_argument("--wandb", default="", help="also log to this wandb project (if wandb is installed)")
# fmt: on


DEFAULTS = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}  # not --help's
# Every numeric flag by the range it must lie in (tests/test_bad_input_video.py checks that none is missing).
FLAG_RANGES = {
    "positive": ["batch_size", "grad_clip", "shift", "p_std", "t_max", "student_steps", "teacher_steps", "student_update_freq", "num_pairs", "pairs_batch", "eval_n", "max_skipped_steps"],
    "learning_rate": ["lr"],
    "unit": ["critic_lr", "beta1", "beta2", "cond_dropout"],
    "non_negative": ["cond_frames", "micro_batch", "max_steps", "weight_decay", "t_min", "guidance", "gan_weight", "eval_every", "save_every", "seed", "num_threads"],
    "finite": ["p_mean"],
}  # fmt: skip
# What makes two runs the same run: --resume refuses a checkpoint whose args.json differs in these (--disc_blocks
# picks the blocks the GAN heads read: Wan's blocks are all as wide, so other blocks would load without an error).
RUN_IDENTITY = ["script", "model", "method", "teacher", "arch", "tiny", "disc_blocks"]


def parse_args(argv=None):
    """Flags over the preset over argparse defaults; every flag is checked here, before anything loads."""
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**DEFAULTS)  # a clean slate when called more than once in a process (tests)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    if args.tiny:  # the same code path at CPU size
        args.batch_size, args.eval_n, args.teacher_steps = min(args.batch_size, 4), min(args.eval_n, 2), min(args.teacher_steps, 8)  # fmt: skip
        args.latent_shape = "" if args.latent_shape.startswith("16,") else args.latent_shape
    args.out_dir = args.out_dir or os.path.join("out", "train_video", (args.preset or f"{args.model}-{args.method}") + "-tiny" * args.tiny)  # fmt: skip
    if args.method == "kd":
        args.pairs = args.pairs or os.path.join(args.out_dir, "pairs")
    check_flag_ranges(args, FLAG_RANGES)
    check_flag_values(args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro, accum = split_batch(args.batch_size, args.micro_batch, world)
    if args.print_config:
        emas = [dict(name=f"ema_{s}", kind="constant", value=float(s)) for s in args.ema.split(",") if s]
        derived = dict(world_size=world, micro_batch_per_process=micro, accumulation_steps=accum, emas=emas,
                       student_times=student_times(MODELS[args.model][0], args).tolist(),
                       text_cache=args.text_cache or os.path.join(args.out_dir, "text_cache"))  # fmt: skip
        print(json.dumps(vars(args) | {"derived": derived}, indent=1))
        raise SystemExit(0)
    return args


def check_flag_values(args):
    """The flags that are names or comma lists, and those that must agree with each other."""

    def numbers(flag, kind, example):
        text = getattr(args, flag)
        try:
            values = [kind(v) for v in text.split(",")] if text else []
        except ValueError:
            fail(f"--{flag} {text} is not a comma list of {'integers' if kind is int else 'numbers'}", f"--{flag}", f"give e.g. --{flag} {example}")  # fmt: skip
        if not all(math.isfinite(v) for v in values):
            fail(f"--{flag} {text} holds a number that is not finite", f"--{flag}", f"give e.g. --{flag} {example}")
        return values

    module = MODELS[args.model][0]
    if args.arch and args.arch not in module.CONFIGS:
        fail(f"--arch {args.arch} is not an architecture of models/{module.__name__.split('.')[-1]}.py", "--arch", f"give one of {', '.join(sorted(module.CONFIGS))}")  # fmt: skip
    if args.t_sampler is not None:
        try:
            bind(module.sample_t, kind=args.t_sampler, generator=torch.Generator())(1)
        except ValueError as e:
            fail(e, "--t_sampler", "give one of the time samplers it names")
    if args.t_min is not None and args.t_max is not None and args.t_min >= args.t_max:
        fail(f"--t_min {args.t_min} is not below --t_max {args.t_max}", "--t_min", "give t_min < t_max (in the model file's time units)")  # fmt: skip
    times = numbers("t_list", float, WAN_T_LIST)
    if times and (len(times) != args.student_steps + 1 or times[-1] != 0 or any(a <= b for a, b in zip(times, times[1:]))):  # fmt: skip
        fail(f"--t_list {args.t_list} is not {args.student_steps + 1} decreasing times ending in 0", "--t_list", f"give --student_steps + 1 = {args.student_steps + 1} times, the last 0, or leave it out for the model file's")  # fmt: skip
    shape = numbers("latent_shape", int, "16,21,60,104")
    if shape and (len(shape) != 4 or min(shape) <= 0):
        fail(f"--latent_shape {args.latent_shape} is not C,T,H,W", "--latent_shape", "give four positive integers, e.g. 16,21,60,104")  # fmt: skip
    if any(not 0 < rate < 1 for rate in numbers("ema", float, "0.9999")):
        fail(f"--ema {args.ema}: an EMA rate lies outside (0, 1)", "--ema", "give rates between 0 and 1, e.g. 0.9999")
    if any(i < 0 for i in numbers("disc_blocks", int, "15,22,29")):
        fail(f"--disc_blocks {args.disc_blocks} holds a negative block index", "--disc_blocks", "give teacher block indices from 0")  # fmt: skip
    if args.method == "kd" and args.teacher_steps % path_length(args):
        P = path_length(args)
        fail(f"--teacher_steps {args.teacher_steps} is not a multiple of the {P}-state path", "--teacher_steps", f"give a multiple of {P}")  # fmt: skip


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
    sched.student_times = student_times(module, args)
    return sched


def student_times(module, args):
    """The student's K + 1 times: --t_list (checked by parse_args), else the model file's t_list."""
    if args.t_list:
        return torch.tensor([float(v) for v in args.t_list.split(",")], dtype=torch.float64)
    return bind(module.t_list, shift=args.shift)(args.student_steps)


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


def scan_shards(path):
    """The clips of --data DIR, from every shard's header (the tensors are read per batch): Namespace(rows [(file,
    row)], prompts, keys, shapes {key: the shape of one clip's tensor}). Anything that is not such a folder of shards
    ends here with the file named."""
    where, fix = f"--data {path}", "`python download.py video-latents VIDEOS --out DIR` writes the shards (format: train_video.py --help)"  # fmt: skip
    if not os.path.isdir(path):
        fail(f"{path} {'is not a folder' if os.path.exists(path) else 'does not exist'}", where, f"give a folder of latent shards: {fix}")  # fmt: skip
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
        fail(f"{path} holds no .safetensors shards", where, fix)
    index = argparse.Namespace(rows=[], prompts=[], keys=None, shapes=None)
    for name in names:
        file = os.path.join(path, name)
        try:
            with safe_open(file, "pt") as f:
                meta, keys = f.metadata() or {}, sorted(f.keys())
                shapes = {k: f.get_slice(k).get_shape() for k in keys}
        except (OSError, SafetensorError) as e:
            fail(f"{file} is not a readable safetensors file ({e})", where, f"remove or rewrite it: {fix}")
        if "prompts" not in meta or len(shapes.get("latents", [])) != 5:
            fail(f"{file} is not a shard of latent clips (one file per clip with `latents` (C, T, H, W) and a metadata 'prompt' is the old format)", where,
                 f"--data takes *.safetensors shards, each with `latents` (N, C, T, H, W) and the N prompts as a JSON list in the metadata key 'prompts'; {fix}")  # fmt: skip
        try:
            prompts = json.loads(meta["prompts"])
        except ValueError:
            prompts = None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            fail(f"{file}: the metadata 'prompts' is not a JSON list of strings", where, f"rewrite the shard: {fix}")
        n = shapes["latents"][0]
        if len(prompts) != n or any(shape[:1] != [n] for shape in shapes.values()):
            fail(f"{file}: {len(prompts)} prompts and tensors {shapes}; all need N = {n} rows", where, f"rewrite the shard: {fix}")  # fmt: skip
        if "text" in keys:
            fail(f"{file}: 'text' is the prompts' embedding, made here", where, "rename that tensor")
        clip = {k: shape[1:] for k, shape in shapes.items()}
        if index.keys is not None and (keys, clip) != (index.keys, index.shapes):
            fail(f"{file} holds clips {clip}, the shards before it {index.shapes}", where, "every shard needs the same tensors of the same clip shape")  # fmt: skip
        index.keys, index.shapes = keys, clip
        index.rows += [(file, i) for i in range(n)]
        index.prompts += prompts
    if not index.rows:
        fail(f"the shards of {path} hold no clips", where, fix)
    return index


class LatentDataset:
    """DIR/*.safetensors shards of N clips each: `latents` (N, C, T, H, W), the N prompts as a JSON list in the
    metadata key "prompts", and any other tensor of leading dimension N passed to the network as a keyword. Only the
    index (shard, row) and the prompts are held (`index`: scan_shards(path), made here when not given); `load` reads
    one clip from its shard (memory-mapped) when a batch needs it. Every prompt is encoded once up front through
    `encode` (a collective under torchrun) into the text cache, which `lookup` (local) reads per clip."""

    def __init__(self, path, encode, lookup, index=None):
        index = index or scan_shards(path)
        self.path, self.rows, self.prompts, self.keys, self.lookup = path, index.rows, index.prompts, index.keys, lookup
        unique = sorted(set(self.prompts))
        for i in range(0, len(unique), 64):  # into the cache, a few at a time (the embeddings are not kept here)
            encode(unique[i : i + 64])

    def load(self, i):
        """Clip i: its tensors (latents (C, T, H, W) and the keywords) and `text`, its prompt's embedding."""
        file, row = self.rows[i]
        try:
            with safe_open(file, "pt") as f:
                clip = {k: f.get_slice(k)[row : row + 1][0] for k in self.keys}
        except (OSError, SafetensorError) as e:
            fail(f"{file} cannot be read ({e})", f"--data {self.path}", "the shard changed during the run: restore it, then --resume")  # fmt: skip
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
            fail(f"the data's latents have {x0.shape[1]} channels, the model takes {shape[0]}", f"--data {args.data}", "give latents of the network's VAE")  # fmt: skip
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


def path_length(args):
    """P, the number of teacher states kept per pair (see path_times)."""
    return 4 if 4 % args.student_steps == 0 and not args.t_list else args.student_steps


def path_times(sched, args):
    """The teacher's fine grid and the indices of the P-state path on it. P = 4 when the student's K steps divide 4
    and no --t_list is given (methods.md §7.3: the K-step grid is a subsample of the 4-step path), else P = K on the
    student's own list. The fine grid is the model file's t_list(teacher_steps) where it passes through the path's
    times, else each path interval split evenly."""
    P = path_length(args)  # parse_args checked that it divides --teacher_steps
    coarse = sched.student_times if P == args.student_steps else sched.t_list(P)
    m = args.teacher_steps // P
    fine = sched.t_list(args.teacher_steps)
    if not torch.allclose(fine[::m], coarse, rtol=0, atol=1e-9):
        fine = torch.cat([torch.linspace(float(a), float(b), m + 1, dtype=torch.float64)[:-1] for a, b in zip(coarse[:-1], coarse[1:])] + [coarse[-1:]])  # fmt: skip
    return fine, torch.arange(P) * m


def generate_pairs(args, sched, teacher, prompts, prompt_text, neg_text, shape, device, rank, world):
    """Write --num_pairs teacher trajectories to --pairs DIR as shards pairs_NNNNN.safetensors (`path` (B, P, C, T, H,
    W), `x0`, `prompt` indices into `prompts`), each written atomically from its own seed; shards already on disk are
    kept, so an interrupted run resumes. pairs.json, written first, records the settings the pairs depend on (a
    folder made with others is refused) and the shards."""
    fine, index = path_times(sched, args)
    settings = {"times": fine[index].tolist(), "model": args.model, "teacher": args.teacher, "teacher_steps": args.teacher_steps, "guidance": args.guidance, "neg_prompt": args.neg_prompt, "shape": list(shape), "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}  # fmt: skip
    shards = math.ceil(args.num_pairs / args.pairs_batch)
    names = [f"pairs_{i:05d}.safetensors" for i in range(shards)]
    meta_file = os.path.join(args.pairs, "pairs.json")
    if os.path.exists(meta_file):
        try:
            with open(meta_file) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"{meta_file} is unreadable ({e})", f"--pairs {args.pairs}", "remove the folder to generate the pairs again")  # fmt: skip
        other = [k for k in settings if k in saved and saved[k] != settings[k]]  # an older pairs.json has fewer keys
        if other:
            fail(f"{args.pairs} holds teacher pairs made with other settings ({', '.join(other)})", "--pairs", "give another --pairs folder, or remove this one to generate them again")  # fmt: skip
    for name in names:  # the shards already there: readable, and of this run's shapes
        file = os.path.join(args.pairs, name)
        if os.path.exists(file):
            try:
                with safe_open(file, "pt") as f:
                    path_shape = f.get_slice("path").get_shape()
            except (OSError, SafetensorError) as e:
                fail(f"{file} is not a readable pairs shard ({e})", f"--pairs {args.pairs}", "remove it: it is generated again")  # fmt: skip
            if path_shape[1:] != [len(index), *shape]:
                fail(f"{file} holds paths of shape {path_shape[1:]}, this run makes {[len(index), *shape]}", "--pairs", "give another --pairs folder, or remove this one to generate them again")  # fmt: skip
    if dist.is_initialized():  # every process has looked before the first one writes
        dist.barrier()
    if rank == 0:
        os.makedirs(args.pairs, exist_ok=True)
        write_atomic(meta_file, json.dumps(settings | {"shards": names}).encode())
    if dist.is_initialized():
        dist.barrier()
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
    return fine[index]


def load_pairs(args, prompt_text):
    """(step, shard, n) -> (pairs (n, P + 1, C, T, H, W), text, {}) from the --pairs shards."""
    with open(os.path.join(args.pairs, "pairs.json")) as f:
        meta = json.load(f)
    shards = []
    for name in meta["shards"]:
        try:
            shards.append(load_file(os.path.join(args.pairs, name)))
        except (OSError, SafetensorError) as e:
            fail(f"{os.path.join(args.pairs, name)} is not a readable pairs shard ({e})", f"--pairs {args.pairs}", "remove it: it is generated again")  # fmt: skip
    pairs = torch.cat([torch.cat([s["path"], s["x0"][:, None]], 1) for s in shards])
    prompts = torch.cat([s["prompt"] for s in shards])
    if int(prompts.max()) >= len(prompt_text):
        fail(f"{args.pairs} was made with more prompts than this run has", "--prompts", "give the prompts the pairs were made with")  # fmt: skip

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
# Sample grids


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
# What this script reads from the user, checked before anything is written.


def read_inputs(args):
    """What main checks before anything is written: the flags that need each other or the machine, and the user's
    files (--prompts read, --data's shard headers). Returns (prompts, the --data index or None)."""
    if args.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        fail("--fsdp shards over processes; this is one process", "--fsdp", "start it with torchrun --nproc_per_node=N (N >= 2), or drop --fsdp")  # fmt: skip
    if args.method == "sft" and not args.data:
        fail("--method sft trains on real latents", "--data", "give --data DIR (format: train_video.py --help)")
    if args.method == "dmd2" and args.gan_weight > 0 and not args.data:
        fail("the GAN heads compare with real latents", "--gan_weight", "give --data DIR, or --gan_weight 0 for data-free dmd2")  # fmt: skip
    if args.cond_frames and (args.model != "cosmos" or not args.data or args.method == "kd"):
        fail("--cond_frames is Cosmos Video2World", "--cond_frames", "use it with --model cosmos and --data (sft or dmd2), or drop it")  # fmt: skip
    if not args.teacher and not args.tiny:
        fail("no network to start from", "--teacher", "give --teacher (a CONFIGS name, Hub repo or path), or --tiny")
    module = MODELS[args.model][0]
    if args.teacher and not (args.teacher in module.CONFIGS or os.path.exists(args.teacher) or module._is_repo_id(args.teacher)):  # fmt: skip
        fail(f"{args.teacher} is no file or folder, no CONFIGS name of {module.__name__.replace('.', '/')}.py and no Hub repo id", "--teacher", "download it with download.py, or give its path")  # fmt: skip
    if args.student:
        try:
            with safe_open(args.student, "pt"):
                pass
        except (OSError, SafetensorError) as e:
            fail(f"{args.student} is not a readable .safetensors ({e})", "--student", "give a student.safetensors of a checkpoint, or leave --student out")  # fmt: skip
    for flag in ("pairs", "text_cache"):
        if getattr(args, flag) and os.path.isfile(getattr(args, flag)):
            fail(f"{getattr(args, flag)} is a file", f"--{flag}", "name a directory")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        fail("wandb is not installed", "--wandb", "pip install wandb, or leave --wandb out")
    prompts = read_prompts(args.prompts) if args.prompts else TINY_PROMPTS if args.tiny else []
    if not prompts and not args.data:
        fail("no prompts to train on", "--prompts", "give --prompts FILE (one prompt per line) or --data DIR")
    index = scan_shards(args.data) if args.data else None
    if index is not None and args.cond_frames >= index.shapes["latents"][1]:
        frames = index.shapes["latents"][1]
        fail(f"--cond_frames {args.cond_frames} leaves no frame to train on: the data's clips have {frames} latent frames", "--cond_frames", f"give fewer than {frames}")  # fmt: skip
    return prompts, index


def read_prompts(path):
    """The prompts of --prompts FILE, one per line; a file that is missing, binary or holds no prompt is refused
    (never a run on the single prompt "")."""
    where, fix = f"--prompts {path}", "give a UTF-8 text file with one prompt per line"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        fail(f"{path} does not exist", where, fix)
    except UnicodeDecodeError:
        fail(f"{path} is not text (not UTF-8)", where, fix)
    except OSError as e:
        fail(f"{path} cannot be read ({e.strerror or e})", where, fix)
    if any("\x00" in line for line in lines):
        fail(f"{path} is a binary file (it holds NUL bytes)", where, fix)
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        fail(f"{path} holds no prompt", where, f"{fix}, or leave --prompts out with --data (its captions are used)")
    return prompts


def load_or_fail(what, flag, fix, fn, *args, **kwargs):
    """fn(*args, **kwargs), with a missing or unreadable file (or weights that do not fit) reported as bad input."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        fail(f"cannot load {what}: {str(e)[:300]}", flag, fix)


# ----------------------------------------------------------------------------


def main(args):
    prompts, index = read_inputs(args)  # bad input ends here, before anything is written
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
    ckpt = prepare_run_dir(args, RUN_IDENTITY, master)  # before anything loads; nothing written yet
    if master:
        print(json.dumps(vars(args)))

    module, Net, tiny_name, family, text_repo, vae_module, vae_name, blocks = MODELS[args.model]

    # The pretrained weights, read once (on rank 0 only under FSDP); --tiny: a random network of the tiny config.
    arch = args.arch or tiny_name
    if args.tiny and not args.teacher:
        cfg = module.CONFIGS[arch]
        torch.manual_seed(args.seed)
        teacher_state = Net(cfg).state_dict() if master or not args.fsdp else {}
    elif args.teacher:
        kw = {"config": module.CONFIGS[args.arch]} if args.arch else {}
        fix = "download it with download.py, or give a .safetensors path (with --arch when it has no config.json)"
        loaded = load_or_fail(args.teacher, "--teacher", fix, module.from_pretrained, args.teacher, **kw) if master or not args.fsdp else None  # fmt: skip
        cfg = loaded.cfg if loaded is not None else None
        if args.fsdp:  # the other ranks need the config only: the same lookup without the weights
            cfg_list = [cfg]
            dist.broadcast_object_list(cfg_list, src=0)
            cfg = cfg_list[0]
        teacher_state = loaded.state_dict() if loaded is not None else {}
        del loaded
    make = functools.partial(Net, cfg)

    # Text: prompt embeddings through encoders.py, cached on disk once (rank 0 encodes, the others read the cache).
    text_dim = {"wan": "text_dim", "cogvideox": "text_embed_dim", "cosmos": "crossattn_proj_in_channels"}[args.model]
    if args.tiny:
        width = getattr(cfg, text_dim)
        name = {"wan": "umt5", "cogvideox": "t5", "cosmos": "qwen"}[args.model]
        encoder = TextEncoder(family, tiny={name: width // 2 if args.model == "cosmos" else width})  # cosmos: 2 layers concatenated  # fmt: skip
    else:
        fix = "download the text encoder (download.py), or give its folder"
        encoder = load_or_fail("the text encoder", "--text_encoder", fix, TextEncoder, family, args.text_encoder or text_repo, device=device, dtype=torch.bfloat16)  # fmt: skip
    cache = args.text_cache or os.path.join(args.out_dir, "text_cache")

    def encode(prompts):
        if master:
            out = cached_embeddings(encoder, prompts, cache)
        if distributed:
            dist.barrier()
        return out if master else cached_embeddings(encoder, prompts, cache)

    prompt_text = encode(prompts)["text"] if prompts else None
    neg_text = encode([args.neg_prompt])["text"].to(device)
    dataset = LatentDataset(args.data, encode, lambda p: cached_embeddings(encoder, p, cache)["text"], index) if args.data else None  # fmt: skip
    if args.latent_shape:
        shape = tuple(int(v) for v in args.latent_shape.split(","))
    elif dataset is not None:
        shape = tuple(index.shapes["latents"])
    else:
        shape = (cfg.out_channels, 3, 8, 8)
    if shape[0] != cfg.out_channels:
        fail(f"latents of {shape[0]} channels, the {args.model} network makes {cfg.out_channels}", "--latent_shape" if args.latent_shape else f"--data {args.data}", "give latents of the network's VAE (its channels)")  # fmt: skip
    if prompt_text is None:  # sample grids of a data-only run use the data's prompts
        prompts = dataset.prompts[: min(len(dataset), args.eval_n)]
        prompt_text = torch.stack([dataset.load(i)["text"] for i in range(len(prompts))]).float()
    sched = make_schedule(module, cfg, args)
    sched.shape = (0, *shape)  # replaced by (micro, ...) below

    # Networks: the student (trainable, from the teacher's weights or --student), its EMAs, the frozen teacher, and
    # for dmd2 the fake score (a trainable copy of the teacher) and GAN heads on the teacher's block features.
    student_state = teacher_state
    fix = "give the weights of a student of the teacher's architecture (a student.safetensors of a checkpoint)"
    if args.student and (master or not args.fsdp):
        student_state = load_or_fail(args.student, "--student", fix, load_file, args.student)
        bad = nonfinite_tensors({"student": student_state})
        if bad:
            fail(f"{args.student} holds weights that are not finite ({', '.join(bad[:3])})", "--student", "give the weights of a run that had not diverged")  # fmt: skip
    student = load_or_fail(args.student or "the student", "--student", fix, place, make, student_state, args, device, blocks, trainable=True)  # fmt: skip
    teacher = place(make, teacher_state, args, device, blocks, trainable=False) if args.method != "sft" else None
    fake = place(make, teacher_state, args, device, blocks, trainable=True) if args.method == "dmd2" else None
    disc = None
    if args.method == "dmd2" and args.gan_weight > 0:
        depth = len(getattr(teacher, blocks[0]))
        indices = [int(i) for i in args.disc_blocks.split(",")] if args.disc_blocks else [depth // 2]
        if max(indices) >= depth:
            fail(f"--disc_blocks {args.disc_blocks}: the teacher has {depth} blocks", "--disc_blocks", f"give block indices below {depth}")  # fmt: skip
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
    micro, accum = split_batch(args.batch_size, args.micro_batch, world)
    sched.shape = (micro, *shape)
    if args.method == "kd":  # the pairs are written once into --pairs (default OUT_DIR/pairs); finished shards kept
        generate_pairs(args, sched, teacher, prompts, prompt_text, neg_text, shape, device, rank, world)
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
    if ckpt:  # prepare_run_dir found it and checked that it is this run's
        try:
            state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True, map_location="cpu")
            for name, (m, o) in trained.items():
                sd = load_file(os.path.join(ckpt, f"{name}.safetensors")) if master or not args.fsdp else {}
                if args.fsdp:
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                    set_model_state_dict(m, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))  # fmt: skip
                else:
                    m.load_state_dict(sd)
                optimizer_state(m, o, args.fsdp, load=state[name])
            for spec, ema in emas.items():
                ema.load_state_dict(load_file(os.path.join(ckpt, f"ema_{spec}.safetensors")))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            fail(f"{ckpt} does not fit this run's networks: {str(e)[:300]}", "--resume", "resume with the flags the run was started with")  # fmt: skip
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
                fix = "download it with download.py, give its path, or --vae none for latent-channel grids"
                vae = load_or_fail(args.vae or vae_name, "--vae", fix, vae_module.from_pretrained, args.vae or vae_name)
            vae = vae.to(device).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(12345)  # the same noise and prompts in every grid
        grid_noise = torch.randn(args.eval_n, *shape, generator=g).to(device)
        grid_text = prompt_text[torch.arange(args.eval_n) % len(prompt_text)].to(device)
        grid_cond = {}
        if dataset is not None:
            _, _, grid_cond = make_batches(args, dataset, prompt_text, shape)(0, 10**6, args.eval_n)
            grid_cond = {k: v.to(device) for k, v in grid_cond.items()}
    claim_run_dir(args, master)  # every input has loaded: from here on the directory is this run's
    log = open_metrics(args.out_dir, start) if master else None
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
    # Updates skipped for a non-finite loss or gradient: in all, and in a row per kind of step (dmd2's generator and
    # critic steps alternate: a critic that is non-finite at every step of its own stops the run too).
    skipped, bad_steps = 0, {"generator": 0, "critic": 0}
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
        norms, grad_norms = {}, []
        for (m, _, _), name in zip(active, ["student"] if generator_step else list(critic)):
            params = [p for p in m.parameters() if p.grad is not None]
            # The student's gradient is clipped; the critic's is not (FastGen clips the student only, methods.md §6).
            # The norm is the true one: a NaN or infinity anywhere in the gradient makes it non-finite.
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if generator_step else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
            grad_norms.append(norm)
            norms[f"grad_norm_{name}"] = norm.item()
        # A non-finite loss or gradient on any process: every process skips this update, and the EMAs' with it.
        loss_finite, grad_finite = all_finite(total), all_finite(*grad_norms)
        step_taken = loss_finite and grad_finite
        kind = "generator" if generator_step else "critic"
        if step_taken:
            for _, _, o in active:
                o.step()
            bad_steps[kind] = 0
        else:
            skipped, bad_steps[kind] = skipped + 1, bad_steps[kind] + 1
            steps = f"{kind} steps" if args.method == "dmd2" else "steps"
            if master:
                bar.write(f"step {step + 1}: non-finite {'loss' if not loss_finite else 'gradient'}, update skipped ({bad_steps[kind]} {steps} in a row)")  # fmt: skip
            if bad_steps[kind] >= args.max_skipped_steps:
                bar.close()
                last = checkpoints(args.out_dir)
                fail(f"{bad_steps[kind]} consecutive {steps} had a non-finite loss or gradient (up to step {step + 1})", "--max_skipped_steps", f"the run diverged: lower --lr and --resume from {last[-1] if last else 'a new run'}", code=1)  # fmt: skip
        for _, _, o in active:
            o.zero_grad(set_to_none=True)
        with torch.no_grad():  # every step taken, critic steps included, as FastGen's EMA callback does (methods.md Q2)
            for spec, ema in emas.items() if step_taken else ():
                for p_ema, p in zip(ema.parameters(), student.parameters()):
                    p_ema.lerp_(p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach(), 1 - float(spec))
        if distributed:  # the logged loss is the global batch's
            dist.all_reduce(total)
            total /= world

        step_done = step + 1
        if master:
            clips_per_s = args.batch_size / (time.time() - tic)
            bar.set_postfix(loss=f"{total.item():.4f}", clips_s=f"{clips_per_s:.2f}")
            record = {"step": step_done, "loss": total.item(), "generator_step": generator_step, "skipped": skipped, "lr": args.lr, "clips_per_s": clips_per_s, **norms, **logs}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log(record, step=step_done)
        if eval_here and args.eval_every and (step_done % args.eval_every == 0 or step_done == args.max_steps):
            grid(step_done)
        if args.save_every and (step_done % args.save_every == 0 or step_done == args.max_steps):
            weights = {name: full_state_dict(m, args.fsdp) for name, (m, _) in trained.items()}
            weights |= {f"ema_{spec}": full_state_dict(ema, False) for spec, ema in emas.items()}
            state = {name: optimizer_state(m, o, args.fsdp) for name, (m, o) in trained.items()}
            if master:
                # the networks' Config rides in the metadata (sample.py builds them from it); the GAN heads are ours
                config = config_json(cfg)
                metadata = {name: {"step": str(step_done)} | ({"config": config} if name != "discriminator" else {}) for name in weights}  # fmt: skip
                args_json = json.dumps(vars(args) | {"script": os.path.basename(__file__), "step": step_done}, indent=1)  # fmt: skip
                save_checkpoint(args.out_dir, step_done, weights, metadata, state, args_json)
    if master:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return student, emas


if __name__ == "__main__":
    main(parse_args())
