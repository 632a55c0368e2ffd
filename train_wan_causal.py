"""Train and distill causal (chunk-by-chunk, KV-cached) Wan 2.1 video students: diffusion forcing, ODE
initialisation, CausVid and Self-Forcing.

    python train_wan_causal.py --method self_forcing --tiny --max_steps 10             # any method, seconds on a CPU
    python train_wan_causal.py --method kd --tiny --num_pairs 8 --max_steps 10
    python download.py wan2.1-t2v-1.3b && python download.py self-forcing-ode-init
    torchrun --nproc_per_node=8 train_wan_causal.py --preset self-forcing-wan1.3b --data latents/   # one node
    torchrun --nproc_per_node=8 train_wan_causal.py --preset causvid-wan1.3b --data latents/
    torchrun --nproc_per_node=8 train_wan_causal.py --preset self-forcing-wan1.3b --gan_weight 0 --prompts prompts.txt
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        train_wan_causal.py --preset self-forcing-wan1.3b --data latents/                       # several nodes

Methods (the loss of each is written out below, with its paper's equations):
  sft           diffusion forcing: one full-clip block-causal pass, each chunk noised to its own t, flow target
                (Chen et al. 2024; FastGen's CausalSFT)
  kd            causal ODE initialisation: the bidirectional teacher's Euler/CFG trajectories are written once to
                --pairs (resumable), then the causal student regresses the teacher's output from the trajectory state
                at a per-chunk t (CausVid Sec. 4.2, Self-Forcing's ode_init.pt)
  causvid       DMD with a diffusion-forcing student: per-chunk noised data in, VSD gradient from the CFG'd
                bidirectional teacher and a fake score (Yin et al. 2025, Sec. 4.1); critic steps between
  self_forcing  DMD on the student's own autoregressive rollout with the KV cache: gradient only at one random exit
                step per chunk, the cache written detached after each chunk, optional context noise (Huang et al. 2025,
                Sec. 3.2-3.3); critic steps between
  GAN term      causvid and self_forcing with --gan_weight > 0 (DMD2 Sec. 4.3; FastGen's Wan configs: 1e-3 / 3e-3):
                heads on the frozen teacher's block features (--disc_blocks) tell noised real latents (--data) from
                noised student clips; they learn in the critic steps with the fake score, and the generator step adds
                gan_weight times the non-saturating loss softplus(-D), whose gradient flows through the teacher

Teacher: the bidirectional Wan (models/wan.py, no chunk_size); student: the same network run block-causally
(chunk_size) and through forward_chunk with a KVCache, initialised from the teacher or --student_init (e.g.
self-forcing-ode-init). Text: UMT5 embeddings through encoders.py, computed once per prompt and cached on disk.

Data formats:
  --prompts FILE   one prompt per line (self_forcing without GAN heads and kd need nothing else)
  --data DIR       latent videos for sft and causvid, and the real clips of the GAN heads (the prompts then come from
                   the data): *.safetensors files, each with a tensor "latents" (N, 16, F, H, W), the normalised Wan
                   VAE latents (models/wan_vae.py encode(): (z - latents_mean) / latents_std), and metadata "prompts",
                   a JSON list of the N prompts. kd's --pairs directory is in the same format (the teacher's outputs as
                   "latents", plus "path" (N, K, 16, F, H, W), the trajectory at the t list), so it also serves as
                   --data.

Not here: FastGen's larger video GAN head (multiscale_down_mlp_large; the heads here are its simple dit_simple_conv3d
on the same blocks, as train_video.py's), approximate R1 (off in FastGen's causal configs), rolling KV caches for clips
longer than the cache, I2V / VACE conditioning.

Outputs in --out_dir (default out/train_wan_causal/<preset, or method>[-tiny]): metrics.jsonl (one flushed line per
step), samples/step_NNNNNNN.png (decoded frames, one row per prompt), checkpoints ckpt_NNNNNNN/ (student.safetensors,
fake_score.safetensors, discriminator.safetensors (the GAN heads), ema_*.safetensors, state.pt with optimizer state,
args.json), written only when every weight is finite. A directory holds one run: --resume continues it from its newest
checkpoint exactly (same method, teacher, tiny, chunk size and GAN blocks), --overwrite replaces it (kd's pairs and the
text cache are kept). A step whose loss or gradient is not finite on any process is skipped by all; --max_skipped_steps
in a row stop the run. --print_config shows the resolved flags and exits.
"""

import argparse
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
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import distribute_tensor
from tqdm import tqdm

import encoders
from models import wan, wan_vae

# Wan's default negative prompt (Wan2.1 shared_config.sample_neg_prompt): the unconditional branch of CFG.
WAN_NEGATIVE_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"  # fmt: skip
TINY_PROMPTS = ["a red fox in snow", "waves on a beach at dusk", "a city street in the rain", "a cat on a sofa",
                "fireworks over a harbour", "a horse running in a field", "clouds over mountains", "a bowl of fruit"]  # fmt: skip
SF_T_LIST = ",".join(str(t) for t in wan.SELF_FORCING_T_LIST)

# Named presets: FastGen's WanT2V causal experiment configs (NVlabs/FastGen fastgen/configs/experiments/WanT2V, commit
# 34f30e8; reference/methods.md §7.2, 7.4, 7.12, 7.13) as flag defaults, each a few small bases joined with `|` plus
# what it changes; tests/test_presets.py compares them with FastGen value by value and README's "Presets vs FastGen"
# lists the deliberate differences. Wan 2.1 at 480p: 81 frames -> 21 latent frames of 60 x 104, chunks of 3 latent
# frames (7 chunks). FastGen's batch here is per GPU, which is --micro_batch; --batch_size 0 keeps one micro-batch per
# process, so the global batch is micro_batch x GPUs as in FastGen.
_WAN13 = dict(
    teacher="wan2.1-t2v-1.3b",
    frames=21,
    height=60,
    width=104,
    chunk_size=3,
    precision="bf16",
    fsdp=True,
    guidance=5.0,
)
_WAN14 = _WAN13 | dict(teacher="wan2.1-t2v-14b")  # the same UMT5 text encoder as the 1.3B
# GAN heads on teacher blocks 15, 22, 29 of 30 (the 14B's 21, 30, 39 of 40), real and fake noised at the same t and
# noise; the weight is the method's (causvid 1e-3, self_forcing 3e-3)
_SFT = dict(
    method="sft",
    lr=5e-5,
    t_sampler="uniform",
    micro_batch=1,
    max_steps=5000,
)
_DMD = dict(
    t_sampler="shifted",
    student_update_freq=5,
    context_noise=0.0,
    gan_same_t_noise=True,
    disc_blocks="15,22,29",
)
_SELF_FORCING = dict(
    _DMD,
    method="self_forcing",
    lr=5e-6,
    critic_lr=5e-6,
    micro_batch=1,
    max_steps=5000,
    gan_weight=3e-3,
)
PRESETS = {
    "sft-causal-wan1.3b": _WAN13 | _SFT,
    "sft-causal-wan14b": _WAN14 | _SFT,
    # FastGen's Wan KD config (config_kd_path: lr 7e-5, batch 2, 10k steps, 4-step t list); the teacher trajectories
    # are 50 Euler steps with CFG 5 (Self-Forcing's ODE init used the teacher's own solver).
    "kd-causal-wan1.3b": dict(
        _WAN13,
        method="kd",
        lr=7e-5,
        micro_batch=2,
        max_steps=10_000,
        teacher_steps=50,
        num_pairs=10_000,
    ),
    "causvid-wan1.3b": dict(
        _WAN13 | _DMD,
        method="causvid",
        student_init="self-forcing-ode-init",
        lr=5e-5,
        critic_lr=5e-5,
        micro_batch=2,
        max_steps=1_000_000,
        gan_weight=1e-3,
    ),
    "self-forcing-wan1.3b": dict(
        _WAN13 | _SELF_FORCING,
        student_init="self-forcing-ode-init",
    ),
    "self-forcing-wan14b": _WAN14 | _SELF_FORCING | dict(disc_blocks="21,30,39"),
}

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="presets (flag defaults; explicit flags win):\n" + "\n".join(f"  {k:22s} {' '.join(f'--{a}={v}' for a, v in p.items())}" for k, p in PRESETS.items()))
parser.add_argument("--preset", choices=sorted(PRESETS), default="", help="named flag defaults (see below)")
parser.add_argument("--method", choices=["sft", "kd", "causvid", "self_forcing"], default=None, help="required unless a preset names it")
# models and data
parser.add_argument("--teacher", default="wan2.1-t2v-1.3b", help="wan.CONFIGS name, Hub repo or local file/folder: the bidirectional teacher (and fake score)")
parser.add_argument("--student_init", default="", help="the causal student's start: empty = the teacher's weights, else a CONFIGS name (self-forcing-ode-init) or file")
parser.add_argument("--text_encoder", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="Hub repo or local pipeline folder with text_encoder/ and tokenizer/ (UMT5)")
parser.add_argument("--vae", default="wan2.1", help="wan_vae.CONFIGS name or path, for the sample grids")
parser.add_argument("--prompts", default="", help="text file, one prompt per line (the tiny run has built-in prompts)")
parser.add_argument("--neg_prompt", default=WAN_NEGATIVE_PROMPT, help="negative prompt of the teacher's CFG (and of --cond_dropout)")
parser.add_argument("--data", default="", help="sft/causvid, and the GAN heads' real clips: directory of latent videos (format in the docstring)")
parser.add_argument("--pairs", default="", help="kd: directory of teacher ODE pairs, written here if incomplete (default OUT_DIR/pairs)")
parser.add_argument("--num_pairs", type=int, default=64, help="kd: teacher trajectories to write (pair k: prompt k mod #prompts, noise from seed + k)")
parser.add_argument("--teacher_steps", type=int, default=50, help="kd: Euler steps of the teacher trajectories (the t list's times are added to the grid)")
parser.add_argument("--embed_cache", default="", help="directory of cached prompt embeddings (default OUT_DIR/text_cache)")
parser.add_argument("--frames", type=int, default=21, help="latent frames per clip (21 = 81 video frames)")
parser.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
parser.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
parser.add_argument("--chunk_size", type=int, default=3, help="latent frames per causal chunk (the first absorbs the remainder)")
parser.add_argument("--tiny", action="store_true", help="tiny random Wan, UMT5 and VAE, 7 latent frames of 4 x 4 in chunks of 2: the code path in seconds")
# optimisation
parser.add_argument("--batch_size", type=int, default=0, help="global batch (all GPUs); 0 = one micro-batch per process (FastGen's per-GPU batch); accumulation makes up the rest")
parser.add_argument("--micro_batch", type=int, default=1, help="clips per process per forward")
parser.add_argument("--max_steps", type=int, default=1000)
parser.add_argument("--lr", type=float, default=5e-6)
parser.add_argument("--critic_lr", type=float, default=0.0, help="causvid/self_forcing: lr of the fake score and the GAN heads (0 = --lr)")
parser.add_argument("--beta1", type=float, default=0.9)
parser.add_argument("--beta2", type=float, default=0.999)
parser.add_argument("--adam_eps", type=float, default=1e-8)
parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW (FastGen's default optimizer)")
parser.add_argument("--warmup_steps", type=int, default=0, help="linear lr warm-up")
parser.add_argument("--grad_clip", type=float, default=10.0, help="max student gradient norm (the fake score is not clipped)")
parser.add_argument("--ema", default="", help="comma list of student EMA rates (empty = none, FastGen's causal configs)")
parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, and bf16 compute with fp32 shards under --fsdp")
parser.add_argument("--fsdp", action="store_true", help="FSDP2: shard every block (and the root), activation checkpointing per block, meta-device init")
# noise levels and method knobs
parser.add_argument("--t_sampler", choices=["shifted", "uniform", "logitnormal"], default="shifted", help="training t: sft's per-chunk t, the critic/teacher t of causvid and self_forcing")
parser.add_argument("--shift", type=float, default=5.0, help="time shift of the shifted sampler")
parser.add_argument("--t_min", type=float, default=0.001)
parser.add_argument("--t_max", type=float, default=0.999)
parser.add_argument("--t_list", default=SF_T_LIST, help="the student's few-step times, last 0 (FastGen's Wan 4-step list)")
parser.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale (kd trajectories, DMD's real score)")
parser.add_argument("--cond_dropout", type=float, default=0.0, help="sft/kd: share of clips trained on the negative prompt")
parser.add_argument("--student_update_freq", type=int, default=5, help="causvid/self_forcing: a generator step every N steps, fake-score steps between")
parser.add_argument("--context_noise", type=float, default=0.0, help="self_forcing (and sampling): t at which finished chunks are written to the cache")
parser.add_argument("--exit_per_chunk", action="store_true", help="self_forcing: draw an exit step per chunk (default: one shared by all chunks)")
parser.add_argument("--last_step_only", action="store_true", help="self_forcing: always exit at the last step (no stochastic truncation)")
parser.add_argument("--start_gradient_frame", type=int, default=0, help="self_forcing: chunks starting before this frame get no gradient")
parser.add_argument("--gan_weight", type=float, default=0.0, help="causvid/self_forcing: weight of the generator's GAN loss (0 = no GAN heads; > 0 needs --data for the real clips)")
parser.add_argument("--disc_blocks", default="", help="causvid/self_forcing: teacher blocks whose features the GAN heads read (default: the middle one)")
parser.add_argument("--gan_same_t_noise", action=argparse.BooleanOptionalAction, default=False, help="causvid/self_forcing: noise the real clips with the fake clips' t and noise")
# sampling, checkpoints, logging
parser.add_argument("--sample_every", type=int, default=500, help="sample grid every N steps (0 = never)")
parser.add_argument("--sample_n", type=int, default=4, help="prompts in the sample grid")
parser.add_argument("--save_every", type=int, default=500)
parser.add_argument("--out_dir", default=None, help="the run's directory (default out/train_wan_causal/<preset, or method>[-tiny])")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its newest checkpoint (same method, teacher and chunks)")
parser.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that holds another run, removing its files (kd's pairs and the text cache are kept)")
parser.add_argument("--max_skipped_steps", type=int, default=5, help="stop after this many consecutive steps skipped for a non-finite loss or gradient")
parser.add_argument("--print_config", action="store_true", help="print the resolved configuration (JSON, derived values included) and exit")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
parser.add_argument("--wandb", default="", help="also log to this wandb project (if wandb is installed)")
# fmt: on


DEFAULTS = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}  # not --help's
# Every numeric flag by the range it must lie in (tests/test_bad_input_wan_causal.py checks that none is missing).
FLAG_RANGES = {
    "positive": ["num_pairs", "teacher_steps", "frames", "height", "width", "chunk_size", "micro_batch", "adam_eps", "grad_clip", "shift", "student_update_freq", "sample_n", "max_skipped_steps"],
    "learning_rate": ["lr"],
    "unit": ["critic_lr", "beta1", "beta2", "t_min", "t_max", "cond_dropout", "context_noise"],
    "non_negative": ["batch_size", "max_steps", "weight_decay", "warmup_steps", "guidance", "start_gradient_frame", "gan_weight", "sample_every", "save_every", "seed", "num_threads"],
    "finite": [],
}  # fmt: skip
# What makes two runs the same run: --resume refuses a checkpoint whose args.json differs in these. The networks'
# architecture is the teacher's (or the tiny one); the chunk size fixes the student's causal attention and KV cache;
# --disc_blocks the GAN heads (one per block).
RUN_IDENTITY = ["script", "method", "teacher", "tiny", "chunk_size", "disc_blocks"]


def parse_args(argv=None):
    """Flags over the preset over argparse defaults; --tiny shrinks the clip and the networks."""
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**DEFAULTS)  # a clean slate when called more than once in a process (tests)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    if args.method is None:
        fail("no training method given", "--method", "give --method sft|kd|causvid|self_forcing, or a --preset")
    if args.tiny:  # the same code path at CPU size: 3 chunks (2 + remainder, 2, 2) of 4 x 4 latents
        for name, value in dict(frames=7, height=4, width=4, chunk_size=2, teacher_steps=8).items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    args.out_dir = args.out_dir or os.path.join("out", "train_wan_causal", (known.preset or args.method) + "-tiny" * args.tiny)  # fmt: skip
    if args.method == "kd":
        args.pairs = args.pairs or os.path.join(args.out_dir, "pairs")
    check_flag_ranges(args, FLAG_RANGES)
    try:
        args.t_list_values = [float(t) for t in args.t_list.split(",")]
    except ValueError:
        args.t_list_values = [math.nan]
    times = args.t_list_values
    if len(times) < 2 or not all(map(math.isfinite, times)) or times[0] > 1 or times[-1] != 0 or any(a <= b for a, b in zip(times, times[1:])):  # fmt: skip
        fail(f"--t_list {args.t_list} is not a list of times decreasing from at most 1 to a final 0", "--t_list", f"give comma-separated times such as {SF_T_LIST}")  # fmt: skip
    if args.t_min >= args.t_max:
        fail(f"--t_min {args.t_min} is not below --t_max {args.t_max}", "--t_min", "give t_min < t_max")
    for spec in filter(None, args.ema.split(",")):
        try:
            rate = float(spec)
        except ValueError:
            rate = math.nan
        if not 0 <= rate < 1:
            fail(f"--ema {args.ema}: {spec} is not an EMA rate", "--ema", "give comma-separated rates in [0, 1), such as 0.99,0.999")  # fmt: skip
    try:
        blocks = [int(b) for b in args.disc_blocks.split(",")] if args.disc_blocks else []
    except ValueError:
        blocks = [-1]
    if min(blocks, default=0) < 0:
        fail(f"--disc_blocks {args.disc_blocks} is not a comma list of teacher block indices", "--disc_blocks", "give indices from 0, e.g. 15,22,29")  # fmt: skip
    if args.gan_weight > 0 and args.method not in ("causvid", "self_forcing"):
        fail(f"--method {args.method} has no GAN term", "--gan_weight", "give --gan_weight 0, or --method causvid|self_forcing")  # fmt: skip
    last_chunk = args.frames - wan.chunk_frames(args.frames, args.chunk_size)[-1]
    if args.method == "self_forcing" and args.start_gradient_frame > last_chunk:
        fail(f"--start_gradient_frame {args.start_gradient_frame} leaves no chunk a gradient (the last starts at frame {last_chunk})", "--start_gradient_frame", f"give at most {last_chunk}")  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro, accum = split_batch(args.batch_size or args.micro_batch * world, args.micro_batch, world)
    if args.print_config:
        emas = [dict(name=f"ema_{s}", kind="constant", value=float(s)) for s in args.ema.split(",") if s]
        derived = dict(world_size=world, global_batch=micro * accum * world, micro_batch_per_process=micro, accumulation_steps=accum, emas=emas)  # fmt: skip
        if args.gan_weight > 0 and wan_config(args) is not None:  # the heads' blocks (the default needs the depth)
            derived["gan_blocks"] = disc_indices(args, wan_config(args))
        print(json.dumps(vars(args) | {"derived": derived}, indent=1))
        raise SystemExit(0)
    return args


# ----------------------------------------------------------------------------
# Data: prompts (their UMT5 embeddings cached once on disk), latent videos (B, 16, F, H, W) for sft/causvid, teacher
# ODE pairs for kd. Every batch is a pure function of (seed, step, shard), so --resume is exact and the global batch
# is the same however it is split over processes and accumulation rounds.


def rng_seed(*parts):
    """A seed that is a fixed function of integers (Python's hash() of strings changes from run to run)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % 2**63
    return seed


class LatentVideos:
    """A --data directory: rows of "latents" in *.safetensors files with their prompts in the metadata. Every file's
    header is read and checked here (tensors, prompts, the run's clip shape (frames, height, width)), so a bad file is
    named before anything loads; `flag` is the flag that gave the directory, for the error."""

    def __init__(self, path, keys=("latents",), clip=None, flag="--data"):
        fix = "give *.safetensors files with a 'latents' tensor and 'prompts' metadata (format in --help)"
        if not os.path.isdir(path):
            fail(f"the directory is {'a file' if os.path.exists(path) else 'missing'}", f"{flag} {path}", fix)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        self.rows, self.prompts, self.keys, self.channels = [], [], keys, None
        for name in files:
            file = os.path.join(path, name)
            try:
                with safe_open(file, "pt") as f:
                    meta, names = f.metadata() or {}, set(f.keys())
                    shape = f.get_slice("latents").get_shape() if "latents" in names else None
                    dtype = f.get_slice("latents").get_dtype() if "latents" in names else None
                prompts = json.loads(meta["prompts"]) if "prompts" in meta else None
            except (OSError, ValueError, SafetensorError) as e:
                fail(f"{file} is not a readable safetensors file ({e})", f"{flag} {path}", "replace or remove the file")  # fmt: skip
            missing = [f"{k!r} tensor" for k in keys if k not in names] + (["'prompts' metadata"] if prompts is None else [])  # fmt: skip
            if missing:
                fail(f"{file} has no {' and no '.join(missing)}", f"{flag} {path}", fix)
            if dtype not in ("F32", "F16", "BF16", "F64"):
                fail(f"{file} holds {dtype} latents", f"{flag} {path}", "give floating-point latents (the VAE's encodings)")  # fmt: skip
            if len(shape) != 5 or (clip is not None and list(shape[2:]) != list(clip)):
                want = "(N, C, " + ", ".join(map(str, clip)) + ")" if clip else "(N, C, F, H, W)"
                fix_shape = f"give --frames {shape[2]} --height {shape[3]} --width {shape[4]}, or other data" if len(shape) == 5 else fix  # fmt: skip
                fail(f"{file} holds latents of shape {tuple(shape)}, this run's clips are {want}", f"{flag} {path}", fix_shape)  # fmt: skip
            if self.channels not in (None, shape[1]):
                fail(f"{file} holds latents of {shape[1]} channels, the files before {self.channels}", f"{flag} {path}", "give one kind of latents")  # fmt: skip
            self.channels = shape[1]
            n = shape[0]
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != n:
                got = f"{len(prompts)} prompts" if isinstance(prompts, list) else f"prompts {str(prompts)[:40]!r}"
                got += "" if not isinstance(prompts, list) or all(isinstance(p, str) for p in prompts) else ", not all strings"  # fmt: skip
                fail(f"{file}: {n} latent videos but {got}", f"{flag} {path}", "give one prompt (a string) per latent video in the 'prompts' metadata")  # fmt: skip
            self.rows += [(file, i) for i in range(n)]
            self.prompts += prompts
        if not self.rows:
            fail("the directory holds no latent videos", f"{flag} {path}", fix)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, row = self.rows[i]
        with safe_open(path, "pt") as f:
            return {k: f.get_slice(k)[row : row + 1] for k in self.keys}


def toy_latents(index, args, generator):
    """The tiny run's latent videos: a drifting sinusoid per prompt, a clip the tiny student can learn."""
    C, F_, H, W = 4, args.frames, args.height, args.width
    f, h, w = torch.meshgrid(torch.arange(F_), torch.arange(H), torch.arange(W), indexing="ij")
    phase = torch.rand(1, generator=generator) * 6.28
    waves = [torch.sin(0.7 * (index + 1) * (h + w) / 4 + 0.5 * f * (c + 1) / F_ + phase + c) for c in range(C)]
    return torch.stack(waves)[None].float() + 0.1 * torch.randn(1, C, F_, H, W, generator=generator)


def read_prompts(args):
    """--prompts: one prompt per line (UTF-8 text; blank lines are skipped). The tiny run has built-in prompts."""
    fix = "give a UTF-8 text file with one prompt per line"
    if not args.prompts:
        if args.tiny:
            return list(TINY_PROMPTS)
        fail(f"--method {args.method} needs prompts", "--prompts", fix)
    try:
        with open(args.prompts, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        fail("the prompts file does not exist", f"--prompts {args.prompts}", fix)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"the prompts file is not readable text ({e})", f"--prompts {args.prompts}", fix)
    if "\x00" in text:
        fail("the prompts file is binary, not text", f"--prompts {args.prompts}", fix)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail("the prompts file holds no prompts (only blank lines)", f"--prompts {args.prompts}", fix)
    return prompts


# ----------------------------------------------------------------------------
# Networks and FSDP2. The teacher, the fake score and the student are the same WanModel; the student is run causally.


def wan_config(args):
    if args.tiny:
        return wan.CONFIGS["tiny"]
    if args.teacher in wan.CONFIGS:
        return wan.CONFIGS[args.teacher]
    return None  # from the checkpoint's config.json


def load_state(name, args, cfg, seed, flag):
    """Full state dict of a Wan checkpoint (CONFIGS name, repo or file), or of a random tiny network (seeded). A file
    that cannot be read, does not fit the architecture or holds non-finite weights is bad input named by `flag`."""
    if args.tiny and not name:
        torch.manual_seed(seed)
        return wan.WanModel(cfg).state_dict()
    try:
        state = wan.from_pretrained(name, config=cfg if args.tiny or name.endswith((".pt", ".pth")) else None).state_dict()  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        fail(f"cannot load {name}: {e}", flag, "download it with download.py, or give a Wan .safetensors file or folder")  # fmt: skip
    bad = nonfinite_tensors({os.path.basename(name): state})
    if bad:
        fail(f"{len(bad)} weight tensors are not finite ({', '.join(bad[:3])})", f"{flag} {name}", "give a checkpoint with finite weights")  # fmt: skip
    return state


def build_net(cfg, state, args, device, distributed, trainable, remat=None):
    """A WanModel on `device` holding `state` (a full state dict; only rank 0's is read under FSDP).

    FSDP2: built on the meta device; each block (with activation checkpointing if `remat`, by default when trainable:
    the frozen teacher too when the GAN loss backpropagates through it) is a unit, then the root; forward_chunk is
    registered as the root's second forward; the full weights are broadcast from rank 0."""
    if not args.fsdp:
        with torch.device("meta"):
            net = wan.WanModel(cfg)
        net.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True, strict=True)  # own copies
        return net.to(device).train(trainable).requires_grad_(trainable)
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    with torch.device("meta"):
        net = wan.WanModel(cfg)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.precision == "bf16" else None, reduce_dtype=torch.float32)  # fmt: skip
    for block in list(net.blocks) + list(getattr(net, "vace_blocks", [])):
        if trainable if remat is None else remat:
            checkpoint(block)  # recompute the block in backward (non-reentrant; keeps the parameter names)
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    register_fsdp_forward_method(net, "forward_chunk")
    net.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(
        net, dict(state) if not distributed or dist.get_rank() == 0 else {}, options=options
    )  # (it rewrites the dict)
    return net.train(trainable).requires_grad_(trainable)


def full_state_dict(net, distributed):
    """The full, unsharded state dict on the CPU (a collective under FSDP; rank 0 gets it, the others {})."""
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=distributed, cpu_offload=True))


def full_tensor(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def disc_indices(args, cfg):
    """The teacher blocks the GAN heads read, ascending (the order the network returns their features in); by
    default the middle block, as FastGen's Discriminator_VideoDiT."""
    return sorted({int(b) for b in args.disc_blocks.split(",")}) if args.disc_blocks else [cfg.num_layers // 2]


# The GAN heads: a deliberate copy of train_video.py's (tests/test_hygiene.py keeps them identical).
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
# Losses. Time math in float64 through wan.add_noise / wan.to_x0; t is Wan's flow time (1 = noise). `net` is the
# trainable network, `text` / `neg` the prompt / negative-prompt embeddings (B, L, D).


def sample_t(n, args, device):
    return wan.sample_t(n, args.t_sampler, args.shift, t_min=args.t_min, t_max=args.t_max).to(device)


def sft_loss(net, x0, text, args):
    """Diffusion forcing (FastGen's CausalSFT): each chunk's frames share a time drawn from the t sampler, and one
    block-causal pass regresses the flow eps - x0 of every frame, unweighted: E ||v(x_t, t) - (eps - x0)||^2."""
    t = wan.sample_t_chunks(len(x0), x0.shape[2], args.chunk_size, kind=args.t_sampler, shift=args.shift, t_min=args.t_min, t_max=args.t_max).to(x0.device)  # fmt: skip
    eps = torch.randn_like(x0)
    x_t = wan.add_noise(x0, eps, t)
    flow = net(x_t, t, text, chunk_size=args.chunk_size)
    return (flow.float() - (eps.float() - x0.float())).square().mean(), {"t_mean": t.mean().item()}


def kd_loss(net, path, x0_teacher, text, args):
    """Causal ODE regression (FastGen's CausalKD; CausVid Sec. 4.2): each chunk draws an index k of the t list, the
    final 0 included (a clean chunk: pure context), and takes its frames from the teacher trajectory's state at t_k
    (path[:, K] = the teacher's output); one block-causal pass predicts x0: 0.5 E ||x0(x_in, t) - x0_teacher||^2."""
    times = torch.tensor(args.t_list_values, dtype=torch.float64, device=x0_teacher.device)
    B, K = path.shape[:2]
    ids = wan.sample_t_chunks(B, x0_teacher.shape[2], args.chunk_size, grid=torch.arange(K + 1.0)).long().to(path.device)  # fmt: skip
    path_all = torch.cat([path, x0_teacher[:, None]], dim=1)  # (B, K + 1, C, F, H, W)
    index = ids[:, None, None, :, None, None].expand(B, 1, *path.shape[2:])
    x_in = torch.gather(path_all, 1, index).squeeze(1)
    t = times[ids]
    x0 = wan.to_x0(x_in, net(x_in, t, text, chunk_size=args.chunk_size), t)
    return 0.5 * (x0.float() - x0_teacher.float()).square().mean(), {}


def diffusion_forcing_sample(net, x0, text, args):
    """CausVid's generator output: the data noised per chunk to a t-list time (the final 0 included), denoised to
    x0 in one block-causal pass; every noised frame gets gradient (FastGen's CausVid)."""
    t = wan.sample_t_chunks(len(x0), x0.shape[2], args.chunk_size, grid=args.t_list_values).to(x0.device)
    x_in = wan.add_noise(x0, torch.randn_like(x0), t)
    return wan.to_x0(x_in, net(x_in, t, text, chunk_size=args.chunk_size), t)


def exit_steps(num_chunks, args, step):
    """Self-Forcing's stochastic truncation: the denoising step at which each chunk stops and keeps its gradient,
    uniform over the K steps; one draw shared by all chunks unless --exit_per_chunk. Seeded by the step alone, so
    every rank and accumulation round takes the same path (FastGen draws on rank 0 and broadcasts)."""
    K = len(args.t_list_values) - 1
    if args.last_step_only:
        return [K - 1] * num_chunks
    g = torch.Generator().manual_seed(rng_seed(args.seed, step, 3))
    draws = torch.randint(K, (num_chunks if args.exit_per_chunk else 1,), generator=g).tolist()
    return draws if args.exit_per_chunk else draws * num_chunks


def rollout(net, noise, text, times, chunk_size, exits, context_noise=0.0, grad=True, start_gradient_frame=0, generator=None):  # fmt: skip
    """Self-Forcing's training rollout (Self-Forcing Alg. 1, FastGen's rollout_with_gradient): chunk by chunk, from
    noise at times[0], the few-step sampler runs without gradient up to the chunk's exit step; the exit step's x0
    prediction is the chunk's output and the only call that carries gradient; the finished chunk is then written to
    the KV cache by one more pass at t = context_noise (re-noised if > 0), detached, so no gradient crosses chunks.
    With every exit at the last step and grad=False this is wan.causal_sample (same draws from `generator`)."""
    B, _, F, H, W = noise.shape
    times = torch.as_tensor(times, dtype=torch.float64)
    dtype = torch.bfloat16 if torch.is_autocast_enabled(noise.device.type) else noise.dtype
    cache = wan.KVCache(net, B, F, H, W, device=noise.device, dtype=dtype)

    def at(t):
        return torch.full((B,), float(t), dtype=torch.float64, device=noise.device)

    def randn(like):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    chunks, start = [], 0
    for c, n in enumerate(wan.chunk_frames(F, chunk_size)):
        x = wan.add_noise(torch.zeros_like(noise[:, :, start : start + n]), noise[:, :, start : start + n], times[0])
        with torch.no_grad():  # the steps before the exit: no graph
            for k in range(exits[c]):
                x0 = wan.to_x0(x, net.forward_chunk(x, at(times[k]), text, cache, start_frame=start), times[k])
                x = wan.add_noise(x0, randn(x), times[k + 1])
        e = exits[c]
        with torch.set_grad_enabled(grad and start >= start_gradient_frame):  # the exit step
            x0 = wan.to_x0(x, net.forward_chunk(x, at(times[e]), text, cache, start_frame=start), times[e])
        with torch.no_grad():  # commit the finished chunk as context (Self-Forcing Sec. 3.2)
            context = x0.detach()
            if context_noise > 0:
                context = wan.add_noise(context, randn(context), context_noise)
            net.forward_chunk(context, at(context_noise), text, cache, commit=True, start_frame=start)
        chunks.append(x0)
        start += n
    return torch.cat(chunks, dim=2)


def vsd_loss(g, x_teacher, x_fake):
    """The distribution-matching gradient (DMD Eq. 7) as a regression onto a fixed target: grad = w (x_fake - x_real)
    with the per-sample normaliser w = 1 / mean|g - x_real| (DMD Eq. 8); 0.5 ||g - sg(g - grad)||^2 then has gradient
    grad / numel with respect to g. Weights in float32."""
    with torch.no_grad():
        dims = tuple(range(1, g.ndim))
        w = 1 / ((g.float() - x_teacher.float()).abs().mean(dim=dims, keepdim=True) + 1e-6)
        target = g.float() - w * (x_fake.float() - x_teacher.float())
    return 0.5 * (g.float() - target).square().mean()


def gan_generator_loss(logits_fake):
    """The generator's non-saturating GAN loss (Goodfellow et al. 2014 Sec. 3; DMD2 Sec. 4.3; FastGen's
    gan_loss_generator, methods.md §4): -E log sigmoid(D(x_fake)) = E softplus(-D(x_fake)), the mean over clips and
    heads of the logits (B, heads)."""
    return nn.functional.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake, logits_real):
    """The heads' logistic loss (DMD2 Sec. 4.3; FastGen's gan_loss_discriminator, methods.md §4):
    -E log(1 - sigmoid(D(x_fake))) - E log sigmoid(D(x_real)) = E softplus(D(x_fake)) + E softplus(-D(x_real))."""
    return nn.functional.softplus(logits_fake.float()).mean() + nn.functional.softplus(-logits_real.float()).mean()


def dmd_generator_loss(g, teacher, fake, text, neg, args, disc=None):
    """DMD's generator step (DMD2 Eq. 2): noise the student's clip g to one t for the whole clip, and pull g along
    the difference of the fake score's and the CFG'd bidirectional teacher's x0 predictions. CFG in flow space,
    u + w (c - u), equals x0_c + (w - 1)(x0_c - x0_u) in x0 space at the same (x_t, t).

    With GAN heads `disc` (DMD2 Sec. 4.3, FastGen's DMD2Model._student_update_step): the teacher's conditional pass
    also returns the features of disc.indices and keeps its graph, so the loss gains gan_weight E softplus(-D(feats))
    whose gradient flows through the frozen teacher and x_t = (1 - t) g + t eps into g; the teacher's x0 itself is
    detached and the unconditional pass of CFG has no graph."""
    t = sample_t(len(g), args, g.device)
    x_t = wan.add_noise(g if disc is not None else g.detach(), torch.randn_like(g), t)
    with torch.no_grad():
        x_fake = wan.to_x0(x_t, fake(x_t, t, text), t)
    logs = {}
    if disc is None:
        with torch.no_grad():
            x_teacher = wan.to_x0(x_t, wan.guided_flow(teacher, x_t, t, text, neg, args.guidance), t)
    else:
        flow, features = teacher(x_t, t, text, feature_indices=disc.indices)
        loss_gan = gan_generator_loss(disc(features))
        logs["gan_loss_gen"] = loss_gan.item()
        with torch.no_grad():
            x_teacher = wan.to_x0(x_t.detach(), flow.detach(), t)
            if args.guidance != 1.0:
                x_uncond = wan.to_x0(x_t.detach(), teacher(x_t.detach(), t, neg), t)
                x_teacher = x_teacher + (args.guidance - 1) * (x_teacher - x_uncond)
    loss = vsd_loss(g, x_teacher, x_fake)
    logs["vsd_loss"] = loss.item()
    return (loss + args.gan_weight * loss_gan if disc is not None else loss), logs


def critic_loss(fake, g, text, args, teacher=None, disc=None, x0_real=None):
    """The critic step: the fake score learns the student's distribution by denoising score matching on student
    clips, in x0 space (FastGen's fake_score_pred_type x0): E ||x0_fake(x_t, t) - g||^2.

    With GAN heads `disc` (FastGen's DMD2Model._fake_score_discriminator_update_step): the no-grad teacher features
    of the same noised clip x_t (fake) and of the real latents noised as x_real = (1 - t') x0_real + t' eps' (real),
    with (t', eps') = (t, eps) under --gan_same_t_noise, else fresh draws; the heads' loss
    E softplus(D(fake)) + E softplus(-D(real)) is added (FastGen's causal configs: R1 off)."""
    t = sample_t(len(g), args, g.device)
    eps = torch.randn_like(g)
    x_t = wan.add_noise(g, eps, t)
    loss = (wan.to_x0(x_t, fake(x_t, t, text), t).float() - g.float()).square().mean()
    logs = {"fake_score_loss": loss.item()}
    if disc is None:
        return loss, logs
    same = args.gan_same_t_noise
    t_real, eps_real = (t, eps) if same else (sample_t(len(x0_real), args, g.device), torch.randn_like(x0_real))
    x_real = wan.add_noise(x0_real, eps_real.to(x0_real.dtype), t_real).to(x_t.dtype)
    with torch.no_grad():
        both = torch.cat([x_t, x_real]), torch.cat([t, t_real]), torch.cat([text, text])
        features = teacher(*both, feature_indices=disc.indices, features_only=True)
    logits_fake, logits_real = disc(features).chunk(2)
    loss_disc = gan_discriminator_loss(logits_fake, logits_real)
    logs["gan_loss_disc"] = loss_disc.item()
    return loss + loss_disc, logs


# ----------------------------------------------------------------------------
# kd's teacher ODE pairs, written once, shard by shard (atomic), so an interrupted run continues where it stopped.


@torch.no_grad()
def teacher_trajectory(teacher, noise, text, neg, args):
    """The teacher's Euler/CFG solution on the shifted grid of --teacher_steps, extended by the t-list times, from
    t_list[0] (x = t_0 eps) to 0. Returns the states at the K non-zero t-list times (B, K, C, F, H, W) and x0."""
    marks = torch.tensor(args.t_list_values, dtype=torch.float64)
    grid = wan.shift_time(torch.linspace(1, 0, args.teacher_steps + 1, dtype=torch.float64), args.shift)
    grid = torch.unique(torch.cat([grid[grid < marks[0]], marks])).flip(0)  # descending, t_0 ... 0
    x, path = wan.add_noise(torch.zeros_like(noise), noise, marks[0]).double(), []
    for t_from, t_to in zip(grid[:-1], grid[1:]):
        if torch.isin(t_from, marks):
            path.append(x.to(noise.dtype))
        t = t_from.expand(len(x)).to(noise.device)
        x = x + (t_to - t_from) * wan.guided_flow(teacher, x.to(noise.dtype), t, text, neg, args.guidance).double()
    return torch.stack(path, dim=1), x.to(noise.dtype)


def pairs_settings(args, prompts):
    """What the teacher pairs depend on: a --pairs directory written with other settings is not reused."""
    return dict(teacher="tiny" if args.tiny and not args.teacher.endswith(".safetensors") else args.teacher,
                steps=args.teacher_steps, guidance=args.guidance, shift=args.shift, t_list=args.t_list_values,
                seed=args.seed, shard_size=args.micro_batch, shape=[args.frames, args.height, args.width],
                neg_prompt=args.neg_prompt, prompts=prompts)  # fmt: skip


def check_pairs(args, prompts):
    """--pairs before the run starts: a directory (or nothing yet) whose pairs.json, if any, names this run's settings
    and whose finished shards are readable."""
    out, flag = args.pairs, f"--pairs {args.pairs}"
    if os.path.exists(out) and not os.path.isdir(out):
        fail("the pairs directory is a file", flag, "name a directory for kd's teacher pairs")
    index_file = os.path.join(out, "pairs.json")
    if not os.path.exists(index_file):
        return
    try:
        with open(index_file) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        fail(f"{index_file} is not a pairs index", flag, "remove the directory to write the pairs again, or choose another --pairs DIR")  # fmt: skip
    settings = pairs_settings(args, prompts)
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        fail(f"{out} holds pairs made with other settings ({', '.join(changed)})", flag, "choose another --pairs DIR, or give the flags they were made with")  # fmt: skip
    for name in sorted(f for f in os.listdir(out) if re.fullmatch(r"pairs_\d{8}\.safetensors", f)):
        try:
            with safe_open(os.path.join(out, name), "pt") as f:
                names = set(f.keys())
        except (OSError, SafetensorError):
            names = set()
        if not {"latents", "path"} <= names:
            fail(f"{os.path.join(out, name)} is not a readable shard of teacher pairs", flag, "delete the file: the run writes it again")  # fmt: skip


def write_pairs(teacher, embed, prompts, neg, args, device, rank, world, distributed):
    """Teacher pairs in shards of --micro_batch: pair k takes prompt k mod #prompts and noise seeded by (seed, k).
    Shards on disk are kept; under FSDP every rank runs each round (a rank with nothing left runs a throwaway clip),
    since the sharded teacher's forwards are collectives."""
    out = args.pairs
    check_pairs(args, prompts)
    index_file = os.path.join(out, "pairs.json")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_atomic(index_file, json.dumps(pairs_settings(args, prompts), indent=1).encode())
    starts = list(range(0, args.num_pairs, args.micro_batch))
    names = [f"pairs_{i:08d}.safetensors" for i in starts]
    C = teacher.cfg.in_channels
    rounds = range(math.ceil(len(starts) / world))
    for r in tqdm(rounds, unit="round", desc="teacher pairs", disable=rank != 0):
        j = r * world + rank
        mine = j < len(starts) and not os.path.exists(os.path.join(out, names[j]))
        busy = torch.tensor([float(mine)], device=device)
        if distributed:
            dist.all_reduce(busy)
        if not busy.item():
            continue
        ks = list(range(starts[j], min(starts[j] + args.micro_batch, args.num_pairs))) if mine else [0]
        noise = torch.stack([torch.randn(C, args.frames, args.height, args.width, generator=torch.Generator().manual_seed(rng_seed(args.seed, k, 4))) for k in ks]).to(device)  # fmt: skip
        text = embed([prompts[k % len(prompts)] for k in ks]).to(device)
        path, x0 = teacher_trajectory(teacher, noise, text, neg.expand_as(text), args)
        if mine:
            tmp = os.path.join(out, names[j] + ".tmp")
            save_file({"latents": x0.float().cpu().contiguous(), "path": path.float().cpu().contiguous()}, tmp,
                      metadata={"prompts": json.dumps([prompts[k % len(prompts)] for k in ks])})  # fmt: skip
            os.replace(tmp, os.path.join(out, names[j]))
    if distributed:
        dist.barrier()
    return LatentVideos(out, keys=("latents", "path"), clip=(args.frames, args.height, args.width), flag="--pairs")


# ----------------------------------------------------------------------------
# Sampling, checkpoints, small helpers


@torch.no_grad()
def sample_grid(student, vae, text, args, device, path):
    """The student's causal few-step samples (wan.causal_sample, the KV-cached rollout) for the first prompts, decoded;
    one row per prompt, every 4th video frame across. All ranks generate (FSDP); rank 0 decodes and writes."""
    g = torch.Generator().manual_seed(12345)  # the same noise at every evaluation
    noise = torch.randn(len(text), student.cfg.in_channels, args.frames, args.height, args.width, generator=g).to(device)  # fmt: skip
    latents = wan.causal_sample(student, noise, text.to(device), times=args.t_list_values, chunk_size=args.chunk_size,
                                context_noise=args.context_noise, generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    if vae is None:
        return latents
    video = vae.decode(latents.float())  # (B, 3, T, H, W) in [-1, 1]
    frames = video[:, :, ::4].permute(0, 2, 1, 3, 4)  # (B, T', 3, H, W)
    grid = image_grid(to_uint8(frames.flatten(0, 1)), cols=frames.shape[1])
    Image.fromarray(grid).save(path)
    return latents


def learning_rate(step, lr, args):
    return lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else lr


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


def check_sources(args):
    """A misspelt --teacher, --student_init, --vae or --text_encoder (neither a known name, an existing path nor a
    Hub repo id) is refused before the run directory is claimed; files that exist are read, and checked, later."""
    tiny_teacher = args.tiny and not args.teacher.endswith(".safetensors")  # the tiny run's teacher is random
    sources = [
        ("--teacher", "" if tiny_teacher else args.teacher, wan.CONFIGS),
        ("--student_init", args.student_init, wan.CONFIGS),
        ("--vae", "" if args.tiny or not args.sample_every else args.vae, wan_vae.CONFIGS),
        ("--text_encoder", "" if args.tiny else args.text_encoder, {}),
    ]
    for flag, name, known in sources:
        if name and name not in known and not os.path.exists(name) and not wan._is_repo_id(name):
            fail(f"{name} is neither a known name, a file or folder, nor a Hub repo id", flag, "download it with download.py, or give its path")  # fmt: skip


def check_shapes(cfg, data, args):
    """The clip shape against the network: latent channels of --data, height and width in whole patches; the GAN
    heads' blocks within the teacher's depth."""
    if args.method in ("causvid", "self_forcing") and args.gan_weight > 0 and max(disc_indices(args, cfg)) >= cfg.num_layers:  # fmt: skip
        fail(f"--disc_blocks {args.disc_blocks}: the teacher has {cfg.num_layers} blocks", "--disc_blocks", f"give block indices below {cfg.num_layers}")  # fmt: skip
    _, ph, pw = cfg.patch_size
    if args.height % ph or args.width % pw:
        fail(f"latents of {args.height} x {args.width} are not whole {ph} x {pw} patches", "--height/--width", f"give multiples of {ph} and {pw}")  # fmt: skip
    if data is not None and data.channels != cfg.in_channels:
        fail(f"the latent videos have {data.channels} channels, the network {cfg.in_channels}", f"--data {args.data}", "give latents of the teacher's VAE (Wan 2.1: 16 channels)")  # fmt: skip


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
    distill = args.method in ("causvid", "self_forcing")

    # The user's small input files (prompts, the headers of the latent videos, kd's pairs directory) are checked
    # before the run directory is claimed: bad input leaves nothing on disk. Then the run directory, then the loading.
    # Real latent videos: sft's and causvid's data, and the real clips of the GAN heads (self_forcing's only use of
    # data; the tiny run makes toy clips).
    data, gan = None, distill and args.gan_weight > 0
    if (args.method in ("sft", "causvid") or gan) and (args.data or not args.tiny):
        if not args.data and gan and args.method == "self_forcing":
            fail("the GAN heads compare the student's clips with real latent videos", "--gan_weight", "give --data DIR, or --gan_weight 0 to train from prompts alone")  # fmt: skip
        if not args.data:
            fail(f"--method {args.method} trains on latent videos", "--data", "give a directory of latent videos (format in --help)")  # fmt: skip
        data = LatentVideos(args.data, clip=(args.frames, args.height, args.width))
    prompts = data.prompts if data is not None else read_prompts(args)
    if args.method == "kd":
        check_pairs(args, prompts)
    cache_dir = args.embed_cache or os.path.join(args.out_dir, "text_cache")
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        fail(f"{cache_dir} is not a directory", "--embed_cache", "name a directory for the prompt embeddings")
    check_sources(args)
    cfg = wan_config(args)
    if cfg is not None:
        check_shapes(cfg, data, args)
    ckpt = prepare_run_dir(args, RUN_IDENTITY, master)  # before anything loads; nothing written yet
    if master:
        print(json.dumps(vars(args)))
    if cfg is None:
        try:
            cfg = wan.from_pretrained(args.teacher).cfg
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            fail(f"cannot load {args.teacher}: {e}", "--teacher", "download it with download.py, or give a Wan .safetensors file or folder")  # fmt: skip
        check_shapes(cfg, data, args)

    # Text: every prompt's UMT5 embedding computed once (rank 0) and cached on disk; batches read the cache.
    tiny_widths = {"umt5": cfg.text_dim} if args.tiny else None
    encoder = encoders.TextEncoder("wan", None if args.tiny else args.text_encoder, tiny=tiny_widths)
    if master:
        unique = sorted(set(prompts)) + [args.neg_prompt]
        try:
            for i in tqdm(range(0, len(unique), 64), unit="prompts", desc="text embeddings", disable=len(unique) < 65):
                encoders.cached_embeddings(encoder, unique[i : i + 64], cache_dir)
        except SafetensorError as e:
            fail(f"a cached prompt embedding in {cache_dir} is unreadable ({e})", "--embed_cache", f"delete {cache_dir}: the embeddings are computed again")  # fmt: skip
        except (OSError, ValueError) as e:
            fail(f"cannot encode the prompts with {args.text_encoder}: {e}", "--text_encoder", "download the pipeline's text_encoder/ and tokenizer/ (hf download REPO), or give a local pipeline folder")  # fmt: skip
        encoder.models.clear()  # the cache serves everything from here on
    if distributed:
        dist.barrier()

    def embed(batch_prompts):
        return encoders.cached_embeddings(encoder, batch_prompts, cache_dir)["text"]

    neg = embed([args.neg_prompt]).to(device)

    # Networks: the frozen bidirectional teacher; the causal student; the fake score (a trainable teacher copy).
    teacher_state = load_state(args.teacher if not args.tiny or args.teacher.endswith(".safetensors") else "", args, cfg, args.seed, "--teacher") if master or not args.fsdp else {}  # fmt: skip
    # sft has no teacher: diffusion forcing learns from the data alone (the teacher's weights only start the student).
    teacher = (
        build_net(cfg, teacher_state, args, device, distributed, trainable=False, remat=gan)
        if args.method != "sft"
        else None
    )
    if args.student_init:
        student_state = load_state(args.student_init, args, cfg, args.seed, "--student_init") if master or not args.fsdp else {}  # fmt: skip
    else:
        student_state = teacher_state
    student = build_net(cfg, student_state, args, device, distributed, trainable=True)
    fake = build_net(cfg, teacher_state, args, device, distributed, trainable=True) if distill else None
    del teacher_state, student_state
    # The GAN heads: one per teacher block of --disc_blocks, on its tokens as (B, inner_dim / patch, F, H, W) maps;
    # randomly initialised from the seed, the same on every process.
    disc = None
    if gan:
        torch.manual_seed(rng_seed(args.seed, 3))
        blocks = disc_indices(args, cfg)
        disc = Discriminator(blocks, [cfg.inner_dim // math.prod(cfg.patch_size)] * len(blocks)).to(device).train()
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(disc)
    emas = {spec: {k: p.detach().clone() for k, p in student.named_parameters()} for spec in args.ema.split(",") if spec}  # fmt: skip
    if master:
        print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters, method {args.method}")

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay)  # fmt: skip
    critic_lr = args.critic_lr or args.lr
    critic_optimizer = torch.optim.AdamW(fake.parameters(), lr=critic_lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay) if distill else None  # fmt: skip
    disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=critic_lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay) if gan else None  # fmt: skip
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    # batch_size 0: one micro-batch per process (parse_args checked the split over WORLD_SIZE; this is the same)
    micro, accum = split_batch(args.batch_size or args.micro_batch * world, args.micro_batch, world)
    batch_size = micro * world * accum
    vae = None  # loaded now, not at the first sample grid: a missing VAE must not end a run hours in
    if args.sample_every and master:
        try:
            vae = wan_vae.WanVAE(wan_vae.CONFIGS["tiny"]) if args.tiny else wan_vae.from_pretrained(args.vae)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            fail(f"cannot load the VAE {args.vae}: {e}", "--vae", "download it with download.py, give a Wan VAE file or folder, or --sample_every 0")  # fmt: skip
        vae = vae.to(device).eval()

    # kd: the teacher's ODE pairs (written now if incomplete), then the teacher is no longer needed.
    if args.method == "kd":
        data = write_pairs(teacher, embed, prompts, neg, args, device, rank, world, distributed)
        teacher = None

    def batch(step, shard):
        """(x0 or None, extra tensors, text embeddings) of micro-batch `shard` of `step`."""
        g = torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0))
        if data is None and (args.method != "self_forcing" or gan):  # the tiny run's toy clips
            index = torch.randint(len(prompts), (micro,), generator=g).tolist()
            x0 = torch.cat([toy_latents(i, args, g) for i in index])
            return x0, {}, embed([prompts[i] for i in index])
        if data is None:  # self_forcing without GAN heads: prompts only
            index = torch.randint(len(prompts), (micro,), generator=g).tolist()
            return None, {}, embed([prompts[i] for i in index])
        index = torch.randint(len(data), (micro,), generator=g).tolist()
        rows = [data[i] for i in index]
        tensors = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        return tensors.pop("latents"), tensors, embed([data.prompts[i] for i in index])

    # What a checkpoint holds, and --resume.
    start = 0
    trained = {"student": (student, optimizer)} | ({"fake_score": (fake, critic_optimizer)} if distill else {})
    trained |= {"discriminator": (disc, disc_optimizer)} if gan else {}
    if ckpt:
        options = StateDictOptions(full_state_dict=distributed, broadcast_from_rank0=distributed)
        try:
            state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True, map_location="cpu") if master or not distributed else {}  # fmt: skip
            for name, (net, opt) in trained.items():
                weights = load_file(os.path.join(ckpt, f"{name}.safetensors")) if master or not distributed else {}
                set_model_state_dict(net, weights, options=options)
                set_optimizer_state_dict(net, opt, optim_state_dict=state.get(name, {}), options=options)
            for spec, ema in emas.items():
                weights = load_file(os.path.join(ckpt, f"ema_{spec}.safetensors"))
                for k, p in ema.items():
                    p.copy_(weights[k].to(device) if not hasattr(p, "full_tensor") else distribute_like(weights[k], p))
            with open(os.path.join(ckpt, "args.json")) as f:
                start = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            fail(f"{ckpt} does not fit this run's networks: {str(e)[:300]}", "--resume", "resume with the flags the run was started with (--ema included)")  # fmt: skip
        if master:
            print(f"resumed from {ckpt} at step {start}")

    claim_run_dir(args, master)  # every input has loaded: from here on the directory is this run's
    log = open_metrics(args.out_dir, start) if master else None
    wandb = None
    if args.wandb and master:
        import wandb

        wandb.init(project=args.wandb, config=vars(args))
    sample_text = embed(prompts[: args.sample_n])

    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=not master, unit="step")
    skipped, bad_steps = 0, {"generator": 0, "critic": 0}  # updates skipped for a non-finite loss or gradient
    for step in bar:
        # causvid/self_forcing alternate: a generator step every student_update_freq steps (counting from 1), fake
        # score steps in between (DMD2 Sec. 4.2). sft and kd update the student at every step.
        generator_step = not distill or (step + 1) % args.student_update_freq == 0
        # the networks this step updates: the student, or the critic (fake score and GAN heads, one backward)
        active = [(student, optimizer)] if generator_step else [(fake, critic_optimizer)] + ([(disc, disc_optimizer)] if gan else [])  # fmt: skip
        if gan:  # frozen in generator steps: the GAN loss's gradient passes through the heads to the student only
            disc.requires_grad_(not generator_step)
        for _, opt in active:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args.lr if generator_step else critic_lr, args)
        tic = time.time()
        total, logs = torch.zeros((), device=device), {}
        for m in range(accum):
            shard = rank * accum + m  # this micro-batch's place in the global batch
            x0, extra, text = batch(step, shard)
            x0 = x0.to(device) if x0 is not None else None
            text = text.to(device)
            neg_b = neg.expand_as(text)
            torch.manual_seed(rng_seed(args.seed, step, shard, 2))  # noise and times: exact on resume
            if args.fsdp and distributed:
                for net, _ in active:
                    net.set_requires_gradient_sync(m == accum - 1)  # reduce-scatter on the last round only
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if args.method == "sft":
                    drop = torch.rand(len(text), device=device) < args.cond_dropout
                    loss, logs = sft_loss(student, x0, torch.where(drop[:, None, None], neg_b, text), args)
                elif args.method == "kd":
                    drop = torch.rand(len(text), device=device) < args.cond_dropout
                    loss, logs = kd_loss(student, extra["path"].to(device), x0, torch.where(drop[:, None, None], neg_b, text), args)  # fmt: skip
                else:
                    with torch.set_grad_enabled(generator_step):  # critic steps: the student's clip is a constant
                        if args.method == "causvid":
                            g = diffusion_forcing_sample(student, x0, text, args)
                        else:
                            shape = (micro, cfg.in_channels, args.frames, args.height, args.width)
                            exits = exit_steps(len(wan.chunk_frames(args.frames, args.chunk_size)), args, step)
                            g = rollout(student, torch.randn(shape, device=device), text, args.t_list_values, args.chunk_size, exits, args.context_noise, grad=generator_step, start_gradient_frame=args.start_gradient_frame)  # fmt: skip
                            logs = {"exit_step": exits[0]}
                    if generator_step:
                        loss, more = dmd_generator_loss(g, teacher, fake, text, neg_b, args, disc=disc)
                    else:
                        loss, more = critic_loss(fake, g.detach(), text, args, teacher=teacher, disc=disc, x0_real=x0)  # fmt: skip
                    logs = logs | more
            (loss / accum).backward()
            total += loss.detach().float() / accum
        norms = []
        for net, _ in active:
            params = [p for p in net.parameters() if p.grad is not None]
            if distributed and not args.fsdp:  # plain data parallel: average the gradients (forward_chunk bypasses DDP)
                for p in params:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            # The student's gradient is clipped; the critic's is not (FastGen clips the student only). The norm is the
            # true one: a NaN or infinity anywhere in the gradient makes it non-finite.
            norms.append(full_tensor(torch.nn.utils.clip_grad_norm_(params, args.grad_clip if generator_step else math.inf)))  # fmt: skip
        grad_norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()  # over all active
        if not generator_step and gan:
            logs["grad_norm_discriminator"] = norms[1].item()
        # A non-finite loss or gradient on any process: every process skips this update and the EMA's.
        loss_finite, grad_finite = all_finite(total), all_finite(*norms)
        step_taken = loss_finite and grad_finite
        kind = "generator" if generator_step else "critic"  # counted apart: a critic that stays NaN must stop too
        if step_taken:
            for _, opt in active:
                opt.step()
            bad_steps[kind] = 0
        else:
            skipped, bad_steps[kind] = skipped + 1, bad_steps[kind] + 1
            steps = f"{kind} steps" if distill else "steps"
            if master:
                bar.write(f"step {step + 1}: non-finite {'loss' if not loss_finite else 'gradient'}, update skipped ({bad_steps[kind]} {steps} in a row)")  # fmt: skip
            if bad_steps[kind] >= args.max_skipped_steps:
                bar.close()
                last = checkpoints(args.out_dir)
                fail(f"{bad_steps[kind]} consecutive {steps} had a non-finite loss or gradient (up to step {step + 1})", "--max_skipped_steps", f"the run diverged: lower --lr and --resume from {last[-1] if last else 'a new run'}", code=1)  # fmt: skip
        for _, opt in active:
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # every step taken, critic steps included, as FastGen's EMA callback does
            for spec, ema in emas.items() if step_taken else []:
                for k, p in student.named_parameters():
                    ema[k].lerp_(p.detach(), 1 - float(spec))
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        total = total.item()

        step_done = step + 1
        if master:
            sec = time.time() - tic
            bar.set_postfix(loss=f"{total:.4f}", s_step=f"{sec:.2f}")
            record = {"step": step_done, "loss": total, "generator_step": generator_step, "grad_norm": grad_norm.item(), "skipped": skipped, "lr": active[0][1].param_groups[0]["lr"], "clips_per_s": batch_size / sec, **logs}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log(record, step=step_done)
        if args.sample_every and (step_done % args.sample_every == 0 or step_done == args.max_steps):
            student.eval()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                sample_grid(student, vae if master else None, sample_text, args, device, os.path.join(args.out_dir, "samples", f"step_{step_done:07d}.png"))  # fmt: skip
            student.train()
        if args.save_every and (step_done % args.save_every == 0 or step_done == args.max_steps):
            options = StateDictOptions(full_state_dict=distributed, cpu_offload=True)
            weights = {name: full_state_dict(n, distributed) for name, (n, _) in trained.items()}
            weights |= {f"ema_{spec}": {k: full_tensor(v) for k, v in ema.items()} for spec, ema in emas.items()}
            state = {name: get_optimizer_state_dict(n, o, options=options) for name, (n, o) in trained.items()}
            if master:  # the full tensors, gathered above on every process, are written by rank 0
                config = json.dumps(cfg.__dict__, default=list)
                metadata = {name: {"step": str(step_done), "config": config} for name in weights}
                if gan:  # the GAN heads are ours, not a WanModel: their blocks instead
                    metadata["discriminator"] = {"step": str(step_done), "blocks": json.dumps(list(disc.indices))}
                args_json = json.dumps(vars(args) | {"script": os.path.basename(__file__), "step": step_done}, indent=1)  # fmt: skip
                save_checkpoint(args.out_dir, step_done, weights, metadata, state, args_json)
            if distributed:
                dist.barrier()
    if master:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return student


def distribute_like(full, like):
    """A full tensor placed as the shards of the DTensor `like` (rank 0's copy is scattered)."""
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)


if __name__ == "__main__":
    main(parse_args())
