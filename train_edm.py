"""Train and distill the class-conditional image family (EDM, EDM2, DiT/SiT): fine-tuning, the consistency family and
distribution matching.

    python train_edm.py                                                    # embedded default: toy teacher -> 1 step
    python train_edm.py --method sft --data toy --tiny --max_steps 20      # any method, seconds on a CPU
    python download.py cifar10 && python download.py edm-cifar10-32x32-uncond-vp
    python train_edm.py --preset sct-cifar10                               # one GPU (accumulates to the global batch)
    torchrun --nproc_per_node=8 train_edm.py --preset cm-cifar10           # one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        train_edm.py --preset scd-cifar10                                  # several nodes
    python train_edm.py --model sit --method meanflow --tiny --max_steps 20   # DiT/SiT: the same methods, on latents
    torchrun --nproc_per_node=8 train_edm.py --preset sft-sit-xl --data datasets/imagenet256-latents --vae sd-vae-ft-mse

Methods (the loss of each is written out below, with its paper's equations):
  sft       denoising score matching, fine-tuning a teacher or training from scratch (EDM Eq. 2)
  cm        consistency training / distillation with ECT's shrinking t-r gap (Geng et al. 2024)
  scm       continuous-time consistency (sCT, or sCD with --cd) in TrigFlow (Lu & Song 2024)
  tcm       truncated consistency, stage two against a frozen stage-one CM (Lee et al. 2025)
  meanflow  average-velocity model u(z, r, t) trained with the MeanFlow identity (Geng et al. 2025)
  dmd2      distribution matching: VSD gradient from teacher and fake score, GAN heads on teacher features (Yin et al.
            2024); critic steps (fake score, heads) between generator steps
  fdistill  DMD2 with per-sample f-divergence weights from the heads' density-ratio estimate (Xu et al. 2025)
  kd        regression onto teacher ODE solutions from `sample.py --save_pairs` (Luhman & Luhman 2021)

DiT and SiT (--model dit|sit, models/dit.py) train with the same losses: they are called as EDM denoisers through an
exact change of variables (see EDMDiT below), and times on the command line are EDM noise levels sigma (SiT's rf time
t = sigma / (1 + sigma)). They train on latents: --data toy uses the toy images as 3-channel "latents" (no VAE); real
runs read a folder of precomputed latents:
  latents.json   {"shards": ["shard_00000.safetensors", ...], "scaling_factor": 0.18215, "shift_factor": 0.0,
                  "num_classes": 1000, "vae": "sd-vae-ft-mse", "image_size": 256}   (vae, image_size: informative)
  shard_*.safetensors  "labels" (N,) int64, and either "latents" (N, C, h, w) float16/32, already normalised
                 ((z - shift) * scale), or "mean" and "std" (N, C, h, w) of the VAE posterior (FastGen's 8-channel
                 mean||std form, split in two), from which every batch draws z = mean + std n and normalises it.
`download.encode_latents` writes this format from an ImageNet-style folder. --vae decodes samples for the grids only.
--model edm_rf: EDM's raw networks in rectified-flow time, the same way (EDMRF below; FastGen's MeanFlow CIFAR-10).

Outputs in --out_dir: metrics.jsonl, samples/step_NNNNNNN.png, checkpoints ckpt_NNNNNNN/ (student.safetensors,
ema_*.safetensors, fake_score.safetensors and discriminator.safetensors for dmd2/fdistill, state.pt with optimizer
state, args.json). --resume continues from the newest checkpoint exactly.
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models import dit, edm, edm2

# ----------------------------------------------------------------------------
# DiT and SiT as EDM denoisers. Every loss below works in EDM's noise levels, x = x0 + sigma eps, with a denoiser
# D(x; sigma) -> x0. A DiT/SiT runs in its native time and prediction type (models/dit.py), so it is presented here
# through an exact change of variables: the same point scaled, x_t = alpha(t) x, at the native time t with the same
# signal-to-noise ratio, sigma(t) / alpha(t) = sigma:
#   SiT (rf):    t = sigma / (1 + sigma),         x_t = x / (1 + sigma)
#   DiT (ddpm):  abar(t) = 1 / (1 + sigma^2),     x_t = x / sqrt(1 + sigma^2)     (the abar table inverted)
# and the native output becomes x0 by dit.to_x0. The losses are then the same functions of x0 predictions; their
# per-sample weights are EDM-space ones (e.g. sft's ||D - x0||^2 is rf's flow loss times t^2). MeanFlow's end time r
# maps the same way: the jump x_r = x_t - (t - r) u lands on the same point in both parameterisations when u comes from
# the same x0-like output D(x; t, r) (both are the DDIM step (r / t) x_t + (1 - r / t) D in their own variables).


def native_time(sigma, schedule):
    """The DiT/SiT time with the signal-to-noise ratio of the EDM noise level sigma, float64, differentiable in sigma
    (scm and meanflow take JVPs through it)."""
    if schedule == "rf":
        return sigma / (1 + sigma)
    # ddpm: log abar(t) is linear between integer timesteps (dit._log_abar); find the segment holding
    # -log(1 + sigma^2) and solve on it, extrapolating past the ends as dit._log_abar does.
    table = dit.alphas_cumprod().log().to(sigma.device)  # decreasing
    log_abar = -torch.log1p(sigma.square())
    i = (torch.searchsorted(-table, -log_abar.detach()) - 1).clamp(0, len(table) - 2)
    return i + (log_abar - table[i]) / (table[i + 1] - table[i])


def noise_level(t, schedule):
    """Inverse of native_time: sigma = sigma(t) / alpha(t)."""
    return dit.sigma(t, schedule) / dit.alpha(t, schedule)


class EDMDiT(dit.DiT):
    """A DiT/SiT (same modules, same checkpoint keys) called as an EDM denoiser: forward(x, sigma, labels, r) -> x0,
    with the EDMPrecond signature; `r` is MeanFlow's end noise level (models need `r_timestep`)."""

    def time(self, sigma, x):
        """The native time (B,) of a noise level given as a scalar or (B,)."""
        return native_time(torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0]), self.cfg.schedule)  # fmt: skip

    def native(self, x, sigma):
        """(x_t, t): the native input and time of the EDM point x at noise level sigma."""
        t = self.time(sigma, x)
        return (dit.alpha(t, self.cfg.schedule).reshape(-1, 1, 1, 1) * x.double()).to(x.dtype), t

    def forward(self, x, t, class_labels=None, r=None, feature_indices=(), return_logvar=False):
        x_t, t_native = self.native(x, t)
        r_native = None if r is None else self.time(r, x)
        out = super().forward(x_t, t_native, class_labels, r_native, feature_indices, return_logvar=return_logvar)
        out, *extras = out if isinstance(out, tuple) else (out,)
        x0 = dit.to_x0(x_t, out, t_native, dit.PRED_TYPES[self.cfg.schedule], self.cfg.schedule)
        return (x0, *extras) if extras else x0

    def features(self, x, t, class_labels=None, indices=(0,), r=None):
        """Token maps (B, D, H / p, W / p) after the given blocks, for the GAN heads."""
        x_t, t_native = self.native(x, t)
        r_native = None if r is None else self.time(r, x)
        return super().forward(x_t, t_native, class_labels, r_native, set(indices), features_only=True)


class DiTSchedule:
    """models/dit.py as this script uses edm.py: the schedule functions, samplers and loaders under the same names, in
    EDM noise levels, for EDMDiT networks. Times span FastGen's native range: rf t in [0.001, 0.999] (sigma 0.001 to
    999), ddpm timesteps [0, 999] (sigma 0.01 to 158)."""

    NATIVE_RANGE = {"rf": (0.001, 0.999), "ddpm": (0.0, 999.0)}

    def __init__(self, schedule):
        self.schedule, self.CONFIGS, self.config_to_json = schedule, dit.CONFIGS, dit.config_to_json
        self.tiny = dit.CONFIGS["tiny-sit" if schedule == "rf" else "tiny"]
        lo, hi = self.NATIVE_RANGE[schedule]
        self.T_MIN, self.T_MAX = (noise_level(torch.tensor(v, dtype=torch.float64), schedule).item() for v in (lo, hi))

    def sample_t(self, n, kind="lognormal", p_mean=-1.2, p_std=1.2, t_min=None, t_max=None):
        """lognormal, polynomial, log_t: drawn in sigma as for EDM (lognormal in sigma is logit-normal in rf time with
        the same mean and std); logitnormal, uniform, shifted: drawn in the native time by dit.sample_t."""
        t_min, t_max = t_min or self.T_MIN, t_max or self.T_MAX
        if kind in ("lognormal", "polynomial", "log_t"):
            return edm.sample_t(n, kind, p_mean, p_std, t_min, t_max)
        lo, hi = (native_time(torch.tensor(v, dtype=torch.float64), self.schedule).item() for v in (t_min, t_max))
        return noise_level(dit.sample_t(n, self.schedule, kind, p_mean, p_std, lo, hi), self.schedule)

    def native_weight(self, sigma):
        """The weight that turns ||D - x0||^2 into the loss on the native output: eps_hat - eps = -(D - x0) / sigma
        (ddpm: x_t = alpha x, eps = (x_t - alpha x0) / (alpha sigma)); flow_hat - flow = -(D - x0) / t (rf)."""
        return 1 / sigma**2 if self.schedule == "ddpm" else 1 / native_time(sigma, "rf") ** 2

    def t_list(self, steps):
        """dit.t_list in noise levels, ending at exactly 0: rf 1 step [999, 0], ddpm 1 step [157.9, 0]."""
        times = noise_level(dit.t_list(steps, self.schedule), self.schedule)
        times[-1] = 0.0
        return times

    def sample_heun(self, model, noise, class_labels=None, steps=18):
        return edm.sample_heun(model, noise, class_labels, steps=steps, sigma_min=self.T_MIN, sigma_max=self.T_MAX)

    def sample_student(self, model, noise, class_labels=None, steps=1):
        return edm.sample_student(model, noise, class_labels, times=self.t_list(steps))

    def from_pretrained(self, name_or_path, **overrides):
        native = dit.from_pretrained(name_or_path, **overrides)
        if native.cfg.schedule != self.schedule:
            model = "sit" if native.cfg.schedule == "rf" else "dit"
            fail(f"{name_or_path} is a {native.cfg.schedule} network", "--model", f"train it with --model {model}")
        with torch.device("meta"):
            model = EDMDiT(native.cfg)
        model.load_state_dict(native.state_dict(), assign=True)
        return model.eval()

    def load_checkpoint(self, model, path, adapt=False):
        return dit.load_checkpoint(model, path, adapt)


# ----------------------------------------------------------------------------
# EDM's raw network in rectified-flow time (--model edm_rf): FastGen's MeanFlow on CIFAR-10 (EDM/config_mf_cifar10.py)
# builds EDMPrecond with drop_precond="both", schedule_type "rf", net_pred_type "flow": the SongUNet sees
# x_t = (1 - t) x0 + t eps and the times t, r in [0, 1) unscaled (that wrapper applies neither EDM's ln(sigma) / 4 nor
# the rf schedule's 1000 t), and its output is the average velocity u(x_t, t, r) (r = t: the flow eps - x0). The same
# network (models/edm.py, Config(precond=False), checkpoint keys unchanged) is presented to the losses as an EDM
# denoiser by the change of variables of SiT above:
#   t = sigma / (1 + sigma),   x_t = x / (1 + sigma),   r_t = r / (1 + r),   D(x; sigma, r) = x_t - t u(x_t, t, r_t).


class EDMRF(edm.EDMPrecond):
    """A raw EDM network (SongUNet/ADM without preconditioning) that predicts the rectified-flow (average) velocity,
    called as an EDM denoiser: forward(x, sigma, labels, r) -> x0, with the EDMPrecond signature."""

    def __init__(self, cfg):
        if cfg.precond:
            raise ValueError("edm_rf runs the raw network: build it with Config(precond=False)")
        super().__init__(cfg)

    def native(self, x, sigma):
        """(x_t, t): the rectified-flow input and time (B,) of the EDM point x at noise level sigma, t in float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        return (x.double() / (1 + sigma).reshape(-1, 1, 1, 1)).to(x.dtype), native_time(sigma, "rf")

    def r_time(self, r, x):
        return None if r is None else native_time(torch.as_tensor(r, dtype=torch.float64, device=x.device).expand(x.shape[0]), "rf")  # fmt: skip

    def forward(self, x, t, class_labels=None, r=None, augment_labels=None, feature_indices=(), return_logvar=False):
        x_t, t_rf = self.native(x, t)
        out = super().forward(x_t, t_rf, class_labels, self.r_time(r, x), augment_labels, feature_indices, return_logvar)  # fmt: skip
        u, *extras = out if isinstance(out, tuple) else (out,)
        x0 = (x_t.double() - t_rf.reshape(-1, 1, 1, 1) * u.double()).to(x.dtype)  # flow -> x0: x_t - t u
        return (x0, *extras) if extras else x0

    def features(self, x, t, class_labels=None, indices=(0,), r=None, augment_labels=None):
        x_t, t_rf = self.native(x, t)
        return super().features(x_t, t_rf, class_labels, indices, self.r_time(r, x), augment_labels)


class EDMRFSchedule(DiTSchedule):
    """models/edm.py in rectified-flow time, for EDMRF networks: DiTSchedule("rf")'s times, samplers and t lists (in
    EDM noise levels, sigma = t / (1 - t)), edm.py's CONFIGS, checkpoints marked "schedule": "rf" in their config.
    Times span FastGen's rf range t in [0, 0.999] (sigma 0 to 999); logitnormal draws t = 0.999 sigmoid(p_mean +
    p_std n), FastGen's sampler."""

    NATIVE_RANGE = {"rf": (0.0, 0.999)}
    SIGMA_FLOOR = 1e-6  # lower truncation of the sigma-space samplers (ln 0 is not a truncation point)

    def __init__(self):
        super().__init__("rf")
        self.CONFIGS, self.tiny, self.config_to_json = edm.CONFIGS, edm.CONFIGS["tiny"], self._config_to_json

    @staticmethod
    def _config_to_json(cfg):
        """edm.py's config plus the parameterisation: edm.from_pretrained refuses it (an unknown field), so an rf
        network is never run as an EDM-preconditioned one."""
        return json.dumps(json.loads(edm.config_to_json(cfg)) | {"schedule": "rf"})

    def sample_t(self, n, kind="lognormal", p_mean=-1.2, p_std=1.2, t_min=None, t_max=None):
        if kind in ("lognormal", "log_t"):
            t_min = max(t_min or 0.0, self.SIGMA_FLOOR)
        return super().sample_t(n, kind, p_mean, p_std, t_min, t_max)

    def sample_heun(self, model, noise, class_labels=None, steps=18):
        """EDM's Heun sampler on the Karras grid from sigma 999 down to EDM's 0.002 (the grids of non-MeanFlow runs)."""
        return edm.sample_heun(model, noise, class_labels, steps=steps, sigma_min=edm.T_MIN, sigma_max=self.T_MAX)

    def from_pretrained(self, name_or_path, **overrides):
        """An EDMRF from a checkpoint that train_edm.py --model edm_rf wrote; the released EDM networks are trained
        with EDM's preconditioning and are refused."""
        if name_or_path in edm.CONFIGS or not os.path.exists(name_or_path):
            fail(f"{name_or_path} is not an edm_rf checkpoint", "--teacher", "give a .safetensors written by train_edm.py --model edm_rf, or train from scratch with --arch NAME")  # fmt: skip
        from safetensors import safe_open

        with safe_open(name_or_path, framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
        if config.pop("schedule", None) != "rf":
            fail(f"{name_or_path} is not a rectified-flow EDM network", "--teacher", "train it with --model edm")
        cfg = replace(edm.config_from_json(json.dumps(config)), **overrides)
        with torch.device("meta"):
            model = EDMRF(cfg)
        edm.load_checkpoint(model, name_or_path, adapt=True)
        return model.eval()

    def load_checkpoint(self, model, path, adapt=False):
        return edm.load_checkpoint(model, path, adapt)


MODELS = {"edm": (edm, edm.EDMPrecond), "edm_rf": (EDMRFSchedule(), EDMRF), "edm2": (edm2, edm2.EDM2Precond), "dit": (DiTSchedule("ddpm"), EDMDiT), "sit": (DiTSchedule("rf"), EDMDiT)}  # fmt: skip


def net_shape(cfg):
    """(channels, side, classes) of a network config of any of the model files."""
    if isinstance(cfg, dit.Config):
        return cfg.in_channels, cfg.input_size, cfg.num_classes
    return cfg.img_channels, cfg.img_resolution, cfg.label_dim


# Named presets: FastGen's experiment configs (NVlabs/FastGen fastgen/configs/experiments/{EDM,EDM2,DiT}, commit
# 34f30e8; reference/methods.md §7.0-7.8) as flag defaults. Each preset is a few small bases joined with `|` plus what
# it changes; tests/test_presets.py compares every one with its FastGen config value by value, and README's "Presets vs
# FastGen" lists the deliberate differences. --batch_size is the global batch: FastGen's batch_size_global, or where a
# config sets only a per-GPU batch (its global batch then depends on the GPU count), that batch on one node of 8 GPUs
# with --micro_batch the per-GPU one. The data paths of ImageNet are placeholders for an EDM-style zip.
_CONST_EMAS = dict(ema="0.9999,0.99995,0.9996")  # FastGen's EMA_CONST_CALLBACKS
_POWER_EMAS = dict(ema="power:96.99,power:16.97,power:6.94")  # ema_1, ema_5, ema_10; the first one samples
_CIFAR = dict(
    data="cifar10",
    teacher="edm-cifar10-32x32-uncond-vp",
)
_CIFAR_COND = _CIFAR | dict(teacher="edm-cifar10-32x32-cond-vp")
_IN64 = dict(
    data="datasets/imagenet-64x64.zip",
    teacher="edm-imagenet-64x64-cond-adm",
)
_EDM2_S = dict(
    model="edm2",
    data="datasets/imagenet-64x64-edmv2.zip",
    teacher="edm2-img64-s-fid",
)
_EDM2_XL = _EDM2_S | dict(teacher="edm2-img64-xl-fid")
_SFT = dict(
    method="sft",
    optimizer="adam",
    grad_clip=10.0,
)
# ECT on CIFAR-10 (methods/config_cm.py, EDM/config_cm_cifar10.py).
_CM = dict(
    _CONST_EMAS,
    method="cm",
    optimizer="radam",
    lr=1e-4,
    p_mean=-1.1,
    p_std=2.0,
    ct_q=2.0,
    ct_kimg_per_stage=6400,
    dropout=0.2,
)
# ECT on ImageNet-64 (EDM/config_cm_in64.py, EDM2/config_cm_s.py): Adam, inverse-sqrt decay, Huber, c_out^2 weights.
_CM_IN64 = dict(
    _POWER_EMAS,
    method="cm",
    optimizer="adam",
    lr=1e-3,
    beta2=0.99,
    lr_decay_steps=2000,
    p_mean=-0.8,
    p_std=1.6,
    ct_q=4.0,
    ct_kimg_per_stage=3200,
    ct_ratio_limit=0.9961,
    huber_c=0.06,
    cm_weighting="c_out_sq",
)
_TCM = dict(
    method="tcm",
    t_sampler="log_t",
    p_mean=0.0,
    p_std=0.2,
    ct_kimg_per_stage=1000,
)
_EDM2_DROPOUT = dict(dropout_resolutions="16,8")  # FastGen's CM/sCM/TCM dropout acts at 16x16 and 8x8 only
_SCM = dict(
    _CONST_EMAS,
    method="scm",
    optimizer="radam",
    lr=1e-4,
    beta2=0.99,
    p_mean=-1.0,
    p_std=1.4,
    batch_size=512,
    tangent_warmup_steps=10_000,
)
_SCM_IN64 = dict(
    optimizer="adam",
    lr=7e-5,
    adam_eps=1e-11,
    lr_decay_steps=35_000,
    p_std=1.6,
)
_DMD2 = dict(
    _CONST_EMAS,
    method="dmd2",
    optimizer="adamw",
    lr=1e-4,
    weight_decay=0.01,
    t_sampler="polynomial",
    dropout=0.0,
    student_update_freq=5,
    gan_weight=1e-3,
    grad_clip=10.0,
)
_DMD2_CIFAR = dict(
    _DMD2 | _CIFAR_COND,
    batch_size=2048,
    max_steps=100_000,
    disc_features="0,1,2",
)
_DMD2_IN64 = dict(
    _DMD2 | _IN64,
    lr=2e-6,
    batch_size=512,
    max_steps=600_000,
    gan_weight=3e-3,
)
# DiT/SiT on ImageNet-256 latents (DiT/config_*.py): the data path is a placeholder for the folder
# `download.encode_latents` writes; the grids' --vae is DiT's sd-vae-ft-mse.
_LATENTS = dict(
    data="datasets/imagenet256-latents",
    precision="bf16",
)
_SFT_DIT = dict(
    _SFT | _LATENTS,
    optimizer="adamw",
    lr=1e-5,
    beta2=0.95,
    native_weighting=True,
    label_dropout=0.1,
    batch_size=256,
    max_steps=400_000,
    ema="0.9999,0.99995",
    student_steps=50,
    save_every=10_000,
)
# MeanFlow from scratch (DiT/config_mf_b.py, config_mf_xl.py) with MeanFlow's training-time guidance (Eq. 19).
_MEANFLOW_SIT = dict(
    _CONST_EMAS | _LATENTS,
    method="meanflow",
    model="sit",
    teacher="",
    optimizer="adam",
    beta2=0.95,
    p_mean=-0.4,
    p_std=1.0,
    r_p_mean=-0.4,
    r_p_std=1.0,
    r_ratio=0.25,
    mf_norm_p=1.0,
    mf_norm_c=1.0,
    mf_cond_dropout=0.1,
    batch_size=1024,
    max_steps=1_200_000,
    save_every=50_000,
)
_TOY = dict(
    teacher="assets/toy_teacher.safetensors",
    data="toy",
    batch_size=32,
    ema="0.95",
    eval_n=500,
    num_threads=2,
    quality_report=True,
)
# EDM2's SFT recipe, shared by its S and XL configs (EDM2/config_sft_s.py, config_sft_xl.py); they differ in size and batch.
_SFT_EDM2 = (
    _SFT
    | _POWER_EMAS
    | dict(
        lr=1e-4,
        beta2=0.99,
        p_mean=-0.8,
        p_std=1.6,
        max_steps=150_000,
        dropout=0.0,
        precision="fp16",
        student_steps=32,
    )
)

PRESETS = {
    # EDM CIFAR-10 and ImageNet-64 (EDM/config_*.py)
    "sft-cifar10": dict(
        _SFT | _POWER_EMAS | _CIFAR_COND,
        lr=2e-5,
        batch_size=512,
        max_steps=100_000,
        dropout=0.13,
        student_steps=18,
        xflip=True,
        augment="scale,rotate_frac,brightness,contrast,lumaflip,hue,saturation",
        augment_p=0.12,
    ),
    "sft-imagenet64": dict(
        _SFT | _POWER_EMAS | _IN64,
        lr=2e-5,
        batch_size=512,
        max_steps=200_000,
        dropout=0.1,
        precision="fp16",
        student_steps=18,
    ),
    "cm-cifar10": dict(
        _CM | _CIFAR,
        batch_size=512,
        max_steps=350_000,
    ),
    "cm-cifar10-fast": dict(
        _CM | _CIFAR,
        ema="0.9993",
        batch_size=1024,
        micro_batch=128,
        max_steps=8000,
        ct_q=256.0,
        ct_kimg_per_stage=512_000,
    ),
    "cm-imagenet64": dict(
        _CM_IN64 | _IN64,
        dropout=0.2,
        precision="fp16",
        batch_size=256,
        micro_batch=32,
        max_steps=1_000_000,
    ),
    "sct-cifar10": dict(
        _SCM | _CIFAR,
        t_max=800.0,
        max_steps=350_000,
        dropout=0.2,
    ),
    "scd-cifar10": dict(
        _SCM | _CIFAR,
        cd=True,
        max_steps=500_000,
        dropout=0.0,
    ),
    "scd-imagenet64": dict(
        _SCM | _SCM_IN64 | _IN64,
        cd=True,
        batch_size=1024,
        max_steps=600_000,
        grad_clip=10.0,
        precision="bf16",
        dropout=0.0,
    ),
    "tcm-cifar10": dict(
        _CM | _TCM | _CIFAR,
        lr=5e-5,
        batch_size=1024,
        max_steps=300_000,
    ),
    # MeanFlow from scratch in rectified-flow time on the raw DDPM++ (EDM/config_mf_cifar10.py): t, r logit-normal in
    # rf time on [0, 0.999] (r_p_mean -4, r_p_std 1.6, 25% r = t: the defaults), FastGen's rf loss (native_weighting).
    "meanflow-cifar10": dict(
        _CONST_EMAS,
        method="meanflow",
        model="edm_rf",
        teacher="",
        arch="edm-cifar10-32x32-uncond-vp",
        data="cifar10",
        optimizer="adam",
        lr=6e-4,
        warmup_steps=9765,
        t_sampler="logitnormal",
        p_mean=-0.6,
        p_std=1.6,
        native_weighting=True,
        batch_size=1024,
        max_steps=1_000_000,
        dropout=0.2,
        xflip=True,
        augment="xflip,scale,aniso,translate_frac",
        augment_p=0.12,
    ),
    "dmd2-cifar10": _DMD2_CIFAR,
    "fdistill-cifar10": dict(
        _DMD2_CIFAR,
        method="fdistill",
        f_div="kl",
    ),
    "dmd2-imagenet64": _DMD2_IN64,
    "fdistill-imagenet64": dict(
        _DMD2_IN64,
        method="fdistill",
        f_div="js",
        ratio_ema=0.5,
    ),
    # EDM2 ImageNet-64 S and XL (EDM2/config_*.py)
    "sft-imagenet64-edm2": _SFT_EDM2 | _EDM2_S | dict(batch_size=1024),
    "sft-imagenet64-edm2-xl": _SFT_EDM2 | _EDM2_XL | dict(batch_size=512),
    "cm-imagenet64-edm2": dict(
        _CM_IN64 | _EDM2_DROPOUT | _EDM2_S,
        dropout=0.4,
        batch_size=1024,
        max_steps=150_000,
    ),
    "cm-imagenet64-edm2-xl": dict(
        _CM_IN64 | _EDM2_DROPOUT | _EDM2_XL,
        lr=7e-4,
        dropout=0.5,
        batch_size=1024,
        max_steps=150_000,
    ),
    "scm-imagenet64-edm2-xl": dict(
        _SCM | _SCM_IN64 | _POWER_EMAS | _EDM2_DROPOUT | _EDM2_XL,
        dropout=0.45,
        precision="fp16",
        batch_size=256,
        micro_batch=32,
        max_steps=1_000_000,
    ),
    "tcm-imagenet64-edm2": dict(
        _CM_IN64 | _TCM | _EDM2_DROPOUT | _EDM2_S,
        lr=5e-4,
        lr_decay_steps=8000,
        dropout=0.4,
        precision="fp16",
        batch_size=1024,
        max_steps=400_000,
    ),
    "tcm-imagenet64-edm2-xl": dict(
        _CM_IN64 | _TCM | _EDM2_DROPOUT | _EDM2_XL,
        lr=1e-4,
        lr_decay_steps=8000,
        dropout=0.5,
        precision="fp16",
        batch_size=1024,
        max_steps=400_000,
    ),
    # DiT/SiT ImageNet-256 (DiT/config_*.py)
    "sft-dit-xl": dict(
        _SFT_DIT,
        model="dit",
        teacher="DiT-XL-2-256x256",
        t_sampler="logitnormal",
        p_mean=-0.4,
        p_std=1.0,
    ),
    "sft-sit-xl": dict(
        _SFT_DIT,
        model="sit",
        teacher="SiT-XL-2-256x256",
        t_sampler="uniform",
    ),
    "meanflow-sit-b": dict(
        _MEANFLOW_SIT,
        arch="SiT-B/2",
        lr=1e-4,
        mf_kappa=0.5,
    ),
    "meanflow-sit-xl": dict(
        _MEANFLOW_SIT,
        arch="SiT-XL/2",
        lr=1e-4,
        mf_guidance=0.2,
        mf_kappa=0.92,
        mf_t_end=0.75,
    ),
    # The project's own: CPU-sized runs on the toy data and the shipped toy teacher (no FastGen counterpart).
    "cm-toy": dict(
        _TOY,
        method="cm",
        cd=True,
        optimizer="radam",
        lr=1e-3,
        p_mean=-1.1,
        p_std=2.0,
        ct_q=2.0,
        ct_kimg_per_stage=4,
        max_steps=300,
        eval_every=100,
        save_every=300,
    ),
    "fdistill-toy": dict(
        _TOY,
        method="fdistill",
        optimizer="adamw",
        lr=2e-4,
        critic_lr=1e-3,
        t_sampler="polynomial",
        max_steps=100,
        eval_every=50,
        save_every=100,
    ),
    # The embedded default: DMD2 from the shipped toy teacher. The critic learns five times faster than the student;
    # on this small teacher the one-step FID is best after about 100 steps and drifts up after that.
    "toy": dict(
        _TOY,
        method="dmd2",
        optimizer="adamw",
        lr=2e-4,
        critic_lr=1e-3,
        t_sampler="polynomial",
        max_steps=100,
        eval_every=50,
        save_every=100,
    ),
}

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="presets (flag defaults; explicit flags win):\n" + "\n".join(f"  {k:20s} {' '.join(f'--{a}={v}' for a, v in p.items())}" for k, p in PRESETS.items()))
parser.add_argument("--preset", choices=sorted(PRESETS), default="", help="named flag defaults (see below); without --preset and --method: toy")
parser.add_argument("--method", choices=["sft", "cm", "scm", "tcm", "meanflow", "dmd2", "fdistill", "kd"], default=None, help="default sft")
# models and data
parser.add_argument("--model", choices=sorted(MODELS), default="edm", help="model file: edm (SongUNet/ADM), edm_rf (the same networks raw, in rectified-flow time: FastGen's MeanFlow CIFAR-10), edm2, dit (DiT, ddpm) or sit (SiT, rf)")
parser.add_argument("--teacher", default="", help="CONFIGS name or .safetensors: the pretrained net (student init, and teacher with --cd)")
parser.add_argument("--arch", default="", help="CONFIGS name whose architecture a from-scratch student uses (when --teacher is empty)")
parser.add_argument("--stage1", default="", help="tcm: the stage-one CM student (.safetensors written by --method cm)")
parser.add_argument("--data", default="toy", help="toy | cifar10 (download.py cifar10) | PATH to an EDM-style zip or folder of PNGs, or a folder of latents (see above; kd reads --pairs)")
parser.add_argument("--vae", default="", help="autoencoder_kl name or path (e.g. sd-vae-ft-mse): decodes latent samples for the sample grids (else they show 3 latent channels)")
parser.add_argument("--data_root", default=None, help="where 'cifar10' is looked up (default $CKPT_ROOT_DIR or ./checkpoints)")
parser.add_argument("--uncond", action="store_true", help="ignore class labels (forced when the network has label_dim 0)")
parser.add_argument("--xflip", action="store_true", help="random horizontal flips of the data")
parser.add_argument("--augment", default="", help="EDM's non-leaking augmentation (Karras et al. 2022, App. F.2): comma list of xflip, yflip, scale, rotate_frac, aniso, translate_frac, brightness, contrast, lumaflip, hue, saturation; the network sees their labels (augment_dim)")
parser.add_argument("--augment_p", type=float, default=0.0, help="probability of each --augment transform per image (EDM: 0.12 on CIFAR-10; xflip is labelled on every image)")
parser.add_argument("--tiny", action="store_true", help="tiny random networks and batches: checks the code path in seconds")
parser.add_argument("--dropout", type=float, default=None, help="student dropout (default: the architecture's)")
parser.add_argument("--dropout_resolutions", default="", help="edm2: the resolutions where --dropout acts, e.g. 16,8 (default: all)")
parser.add_argument("--label_dropout", type=float, default=0.0, help="student class-label dropout (enables guidance)")
# optimisation
parser.add_argument("--batch_size", type=int, default=64, help="global batch (all GPUs); gradient accumulation makes up the rest. FastGen's configs mostly set a per-GPU batch: the presets convert")
parser.add_argument("--micro_batch", type=int, default=0, help="per-process batch per forward (0 = batch_size / world)")
parser.add_argument("--max_steps", type=int, default=1000)
parser.add_argument("--optimizer", choices=["adam", "adamw", "radam"], default="radam")
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--beta1", type=float, default=0.9)
parser.add_argument("--beta2", type=float, default=0.999)
parser.add_argument("--adam_eps", type=float, default=1e-8)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--warmup_steps", type=int, default=0, help="linear lr warm-up")
parser.add_argument("--lr_decay_steps", type=int, default=0, help="inverse-sqrt decay after this many steps (EDM2), 0 = constant")
parser.add_argument("--grad_clip", type=float, default=1e6, help="max gradient norm (non-finite entries are zeroed first)")
parser.add_argument("--ema", default="0.9999", help="comma list of EMA rates: a constant beta, or power:GAMMA (EDM2's power EMA)")
parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (JVPs stay fp32)")
# noise levels and method knobs
parser.add_argument("--t_sampler", choices=["polynomial", "lognormal", "log_t", "uniform", "logitnormal", "shifted"], default="lognormal",
                    help="noise levels: polynomial, lognormal, log_t in sigma; uniform in sigma for edm/edm2 but in the native time for dit/sit, as logitnormal and shifted (dit/sit only)")
parser.add_argument("--p_mean", type=float, default=-1.2)
parser.add_argument("--p_std", type=float, default=1.2)
parser.add_argument("--t_max", type=float, default=None, help="largest training noise level (default: the model's, 80 for edm/edm2, 999 for sit, 158 for dit; sCT uses 800)")
parser.add_argument("--edm_weighting", action="store_true", help="sft: EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2")
parser.add_argument("--native_weighting", action="store_true", help="sft on dit/sit/edm_rf: weights that make the x0 loss the native one, ||eps_hat - eps||^2 (DiT) or ||flow_hat - flow||^2 (rf), as FastGen; meanflow on sit/edm_rf: the MeanFlow residual in rectified-flow time, FastGen's loss")
parser.add_argument("--cd", action="store_true", help="cm/scm/tcm/meanflow: distil from the teacher instead of the data alone")
parser.add_argument("--guidance", type=float, default=1.0, help="teacher classifier-free guidance in --cd targets")
parser.add_argument("--ct_q", type=float, default=2.0, help="cm/tcm: ECT gap schedule, ratio = 1 - q^-(stage+1)")
parser.add_argument("--ct_kimg_per_stage", type=float, default=6400, help="cm/tcm: thousands of images per stage")
parser.add_argument("--ct_ratio_limit", type=float, default=0.999)
parser.add_argument("--ct_start_step", type=int, default=None, help="tcm: the step ECT's gap schedule continues from (default: the --stage1 checkpoint's step, as FastGen resumes it)")
parser.add_argument("--huber_c", type=float, default=1e-8, help="cm/tcm: pseudo-Huber constant of the distance")
parser.add_argument("--cm_weighting", choices=["default", "c_out", "c_out_sq", "sigma_sq", "sqrt", "one"], default="default")
parser.add_argument("--tangent_warmup_steps", type=int, default=10_000, help="scm: ramp of the tangent's second term")
parser.add_argument("--jvp", choices=["exact", "fd"], default="exact", help="scm/meanflow: torch.func.jvp or finite differences")
parser.add_argument("--fd_eps", type=float, default=1e-3, help="relative step of the finite-difference JVP")
parser.add_argument("--transition_t", type=float, default=1.0, help="tcm: noise level where stage two takes over")
parser.add_argument("--boundary_prob", type=float, default=0.25, help="tcm: share of samples placed at the boundary")
parser.add_argument("--w_boundary", type=float, default=0.1, help="tcm: weight of the boundary loss")
parser.add_argument("--r_p_mean", type=float, default=-4.0, help="meanflow: ln r ~ N(r_p_mean, r_p_std^2)")
parser.add_argument("--r_p_std", type=float, default=1.6)
parser.add_argument("--r_ratio", type=float, default=0.75, help="meanflow: share of samples with r < t (the rest r = t)")
parser.add_argument("--mf_norm_p", type=float, default=0.75, help="meanflow: adaptive weight 1 / (err + c)^p")
parser.add_argument("--mf_norm_c", type=float, default=1e-3)
parser.add_argument("--mf_cond_dropout", type=float, default=0.0, help="meanflow: share of samples trained unconditionally (with guidance: on the unguided target)")
parser.add_argument("--mf_guidance", type=float, default=None, help="meanflow: training-time guidance scale w of MeanFlow Eq. 19 (the student's own unconditional velocity); default none, 1 with --mf_kappa")
parser.add_argument("--mf_kappa", type=float, default=None, help="meanflow: mixture kappa of Eq. 19 (the student's conditional velocity); effective guidance w / (1 - kappa)")
parser.add_argument("--mf_t_start", type=float, default=0.0, help="meanflow: guidance acts for rectified-flow times t = sigma / (1 + sigma) in [mf_t_start, mf_t_end]")
parser.add_argument("--mf_t_end", type=float, default=1.0)
# distribution matching (dmd2, fdistill) and knowledge distillation (kd)
parser.add_argument("--student_update_freq", type=int, default=5, help="dmd2/fdistill: a generator step every N steps, critic steps between")  # fmt: skip
parser.add_argument("--critic_lr", type=float, default=0.0, help="dmd2/fdistill: lr of the fake score and the GAN heads (0 = --lr)")  # fmt: skip
parser.add_argument("--gan_weight", type=float, default=1e-3, help="dmd2/fdistill: weight of the generator's GAN loss (0 = no GAN heads)")  # fmt: skip
parser.add_argument("--disc_features", default="", help="dmd2/fdistill: teacher feature levels for GAN heads, e.g. 0,1,2 (default: the lowest resolution)")  # fmt: skip
parser.add_argument("--gan_same_t_noise", action="store_true", help="dmd2/fdistill: noise real data with the fake sample's t and noise")  # fmt: skip
parser.add_argument("--r1_weight", type=float, default=0.0, help="dmd2/fdistill: approximate R1 weight (100-1000 when used)")
parser.add_argument("--r1_alpha", type=float, default=0.1, help="dmd2/fdistill: scale of the R1 perturbation")
parser.add_argument("--f_div", choices=["rkl", "kl", "js", "sf", "neyman", "sh", "jf"], default="js", help="fdistill: the f-divergence")  # fmt: skip
parser.add_argument("--ratio_lower", type=float, default=0.1, help="fdistill: density-ratio clip")
parser.add_argument("--ratio_upper", type=float, default=20.0)
parser.add_argument("--ratio_bins", type=int, default=10, help="fdistill: t-bins normalising the ratio (0 = off)")
parser.add_argument("--ratio_ema", type=float, default=0.0, help="fdistill: EMA rate of the per-bin ratio means")
parser.add_argument("--pairs", default="", help="kd: directory of teacher pairs written by sample.py --save_pairs")
# evaluation, checkpoints, logging
parser.add_argument("--student_steps", type=int, default=1, help="sampling steps of the student (dmd2/fdistill/kd train for it)")
parser.add_argument("--eval_every", type=int, default=500, help="sample grid (and toy FID on toy data) every N steps")
parser.add_argument("--eval_n", type=int, default=1000, help="samples per toy-FID evaluation (0 = no toy FID)")
parser.add_argument("--quality_report", action=argparse.BooleanOptionalAction, default=False, help="at the end, teacher 35 / teacher 1 / student 1 table (toy data)")
parser.add_argument("--save_every", type=int, default=1000)
parser.add_argument("--out_dir", default=None, help="the run's directory (default out/train_edm/<preset, or model-method>[-tiny])")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its newest checkpoint (same model and method)")
parser.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that holds another run, removing its files")
parser.add_argument("--max_skipped_steps", type=int, default=5, help="stop after this many consecutive steps skipped for a non-finite loss or gradient")
parser.add_argument("--print_config", action="store_true", help="print the resolved configuration (JSON, derived values included) and exit")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
parser.add_argument("--wandb", default="", help="also log to this wandb project (if wandb is installed)")
# fmt: on


DEFAULTS = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}  # not --help's
# Every numeric flag by the range it must lie in (tests/test_bad_input.py checks that none is missing).
FLAG_RANGES = {
    "positive": ["batch_size", "p_std", "t_max", "ct_q", "ct_kimg_per_stage", "fd_eps", "transition_t", "r_p_std", "student_update_freq", "student_steps", "ratio_lower", "ratio_upper", "huber_c", "adam_eps", "grad_clip", "max_skipped_steps"],
    "learning_rate": ["lr"],
    "unit": ["augment_p", "mf_cond_dropout", "mf_kappa", "mf_t_start", "mf_t_end", "dropout", "label_dropout", "beta1", "beta2", "critic_lr", "ct_ratio_limit", "boundary_prob", "r_ratio", "ratio_ema"],
    "non_negative": ["ct_start_step", "mf_guidance", "micro_batch", "max_steps", "weight_decay", "warmup_steps", "lr_decay_steps", "tangent_warmup_steps", "w_boundary", "mf_norm_p", "mf_norm_c", "gan_weight", "r1_weight", "r1_alpha", "ratio_bins", "eval_every", "eval_n", "save_every", "num_threads", "guidance", "seed"],
    "finite": ["p_mean", "r_p_mean"],
}  # fmt: skip
# What makes two runs the same run: --resume refuses a checkpoint whose args.json differs in these.
RUN_IDENTITY = ["script", "model", "method", "teacher", "arch", "tiny"]


def parse_args(argv=None):
    """Flags over the preset over argparse defaults. With neither --preset nor --method, the 'toy' preset applies."""
    known = parser.parse_known_args(argv)[0]
    preset = known.preset or ("" if known.method else "toy")
    parser.set_defaults(**DEFAULTS)  # a clean slate when called more than once in a process (tests)
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.preset = preset
    args.t_max = args.t_max or MODELS[args.model][0].T_MAX
    if args.native_weighting and args.model not in ("dit", "sit", "edm_rf"):
        fail("--native_weighting is for DiT/SiT/edm_rf", "--native_weighting", "drop it: edm/edm2 predict x0 natively")
    if args.native_weighting and args.method == "meanflow" and args.model == "dit":
        fail("MeanFlow's native loss is defined here in rectified-flow time", "--native_weighting", "use it with --model sit or edm_rf")  # fmt: skip
    if args.dropout is not None and args.model in ("dit", "sit"):
        fail("DiT/SiT have no dropout", "--dropout", "drop --dropout")
    if args.method == "fdistill" and args.gan_weight <= 0:
        fail("--method fdistill reads the density ratio off the GAN heads", "--gan_weight", "give --gan_weight > 0")
    augment_dim(args.augment)  # the transforms exist
    if args.dropout_resolutions and args.model != "edm2":
        fail("--dropout_resolutions is for --model edm2", "--dropout_resolutions", "drop it: EDM's networks drop out at every resolution")  # fmt: skip
    if args.method == "kd" and args.xflip:
        fail("--xflip would flip the teacher's outputs but not its inputs", "--xflip", "drop it for --method kd")
    if args.tiny:  # the same code path at CPU size
        args.batch_size, args.eval_n = min(args.batch_size, 8), min(args.eval_n, 16)
    args.out_dir = args.out_dir or os.path.join("out", "train_edm", (preset or f"{args.model}-{args.method}") + "-tiny" * args.tiny)  # fmt: skip
    check_flag_ranges(args, FLAG_RANGES)
    micro, accum = split_batch(args.batch_size, args.micro_batch, int(os.environ.get("WORLD_SIZE", 1)))
    if args.print_config:
        emas = [dict(name=f"ema_{s.replace('power:', 'p')}", kind="power" if s.startswith("power:") else "constant", value=float(s.split(":")[-1])) for s in args.ema.split(",") if s]  # fmt: skip
        derived = dict(world_size=int(os.environ.get("WORLD_SIZE", 1)), micro_batch_per_process=micro, accumulation_steps=accum, emas=emas)  # fmt: skip
        print(json.dumps(vars(args) | {"derived": derived}, indent=1))
        raise SystemExit(0)
    return args


# ----------------------------------------------------------------------------
# Data: images in [-1, 1] as (B, C, H, W), labels as int64 (B,) or None.


class ImageDataset:
    """An EDM-style dataset: a zip or folder of PNGs with optional `dataset.json` {"labels": [[name, class], ...]}."""

    def __init__(self, path):
        self.zip = zipfile.ZipFile(path) if os.path.isfile(path) else None
        names = self.zip.namelist() if self.zip else [os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/") for d, _, fs in os.walk(path) for f in fs]  # fmt: skip
        self.path, self.names = path, sorted(n for n in names if n.lower().endswith(".png"))
        if not self.names:
            raise ValueError(f"{path} holds no PNG images; expected an EDM-style zip or folder (see download.py)")
        self.labels = None
        if "dataset.json" in names:
            meta = json.loads(self._read("dataset.json"))
            if meta.get("labels"):
                table = dict(meta["labels"])
                missing = [n for n in self.names if n not in table]
                if missing:
                    fail(f"{len(missing)} images have no label in dataset.json (first: {missing[0]})", f"--data {path}", "label every image, or remove dataset.json's labels for unconditional data")  # fmt: skip
                self.labels = torch.tensor([table[n] for n in self.names])

    def _read(self, name):
        if self.zip:
            return self.zip.read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def __getitem__(self, i):
        import io

        try:
            img = np.array(Image.open(io.BytesIO(self._read(self.names[i]))).convert("RGB"))
        except (OSError, ValueError, zipfile.BadZipFile):
            fail(f"{self.names[i]} is not a readable PNG image", f"--data {self.path}", "replace or remove the file")
        return torch.from_numpy(img).permute(2, 0, 1)

    def __len__(self):
        return len(self.names)


def rng_seed(*parts):
    """A seed that is a fixed function of integers (Python's hash() of strings changes from run to run)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % 2**63
    return seed


def get_rng(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng(state, device):
    """Rewind the random generators, so that a second pass draws the same dropout masks as the first."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class LatentDataset:
    """Precomputed latents (the format in the docstring above): labels in memory, latents read row by row from the
    memory-mapped shards. `batch(index, generator)` -> normalised latents (B, C, h, w) float32; the posterior form is
    sampled with `generator`, so a batch is a pure function of its seed."""

    def __init__(self, path):
        from safetensors import safe_open

        with open(os.path.join(path, "latents.json")) as f:
            self.meta = json.load(f)
        self.shards, labels, shape = [], [], None
        for name in self.meta["shards"]:
            f = safe_open(os.path.join(path, name), framework="pt")
            keys = set(f.keys())
            if keys not in ({"latents", "labels"}, {"mean", "std", "labels"}):
                raise ValueError(f"{path}/{name} holds {sorted(keys)}; expected labels with latents, or labels with mean and std")  # fmt: skip
            self.posterior = "mean" in keys
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            n = shapes.pop("labels")
            shape = shape or next(iter(shapes.values()))[1:]
            if len(n) != 1 or len(shape) != 3 or any(v != (n[0], *shape) for v in shapes.values()):
                raise ValueError(f"{path}/{name}: shapes {shapes}; expected labels (N,) and latents (N, C, h, w) of {shape}, as in the first shard")  # fmt: skip
            self.shards.append(f)
            labels.append(f.get_tensor("labels").long())
        if not self.shards:
            raise ValueError(f"{path}/latents.json lists no shards")
        self.labels, self.shape = torch.cat(labels), shape
        self.starts = torch.tensor([0] + [len(x) for x in labels]).cumsum(0)
        self.scale, self.shift = self.meta.get("scaling_factor", 1.0), self.meta.get("shift_factor", 0.0)

    def __len__(self):
        return len(self.labels)

    def batch(self, index, generator):
        rows = []
        for i in index.tolist():
            s = int(torch.searchsorted(self.starts, i, right=True)) - 1
            j, f = i - int(self.starts[s]), self.shards[s]
            rows.append([f.get_slice(k)[j : j + 1].float() for k in (("mean", "std") if self.posterior else ("latents",))])  # fmt: skip
        if not self.posterior:
            return torch.cat([r[0] for r in rows])
        mean, std = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        z = mean + std * torch.randn(mean.shape, generator=generator)  # a fresh draw of the VAE posterior
        return (z - self.shift) * self.scale


def make_data(args):
    """A function (step, shard, n) -> (x0, labels), a pure function of its arguments so that --resume is exact and
    the global batch is the same however it is split over processes and accumulation rounds; the data's (channels,
    side); the number of classes."""
    if args.method == "kd":
        return make_pairs(args)
    if args.data == "toy":
        import toy

        def batch(step, shard, n):
            return toy.toy_batch(n, generator=torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0)))

        return batch, (3, 32), 10
    path = args.data
    if args.data == "cifar10":
        path = os.path.join(args.data_root or os.environ.get("CKPT_ROOT_DIR", "checkpoints"), "cifar10", "cifar10-32x32.zip")  # fmt: skip
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; run `python download.py cifar10`")
    if os.path.isfile(os.path.join(path, "latents.json")):
        latents = LatentDataset(path)

        def batch(step, shard, n):
            g = torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0))
            index = torch.randint(len(latents), (n,), generator=g)
            return latents.batch(index, g), latents.labels[index]

        return batch, (latents.shape[0], latents.shape[-1]), latents.meta.get("num_classes", int(latents.labels.max()) + 1)  # fmt: skip
    dataset = ImageDataset(path)

    def batch(step, shard, n):
        g = torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0))
        index = torch.randint(len(dataset), (n,), generator=g)
        x = torch.stack([dataset[int(i)] for i in index]).float() / 127.5 - 1
        return x, None if dataset.labels is None else dataset.labels[index]

    num_classes = 0 if dataset.labels is None else int(dataset.labels.max()) + 1
    return batch, (dataset[0].shape[0], dataset[0].shape[-1]), num_classes


def make_pairs(args):
    """Teacher pairs for kd (written by `sample.py --save_pairs DIR`): batches of (B, P + 1, C, H, W), the P stored
    states of each teacher trajectory then its output, with labels."""
    index_file = os.path.join(args.pairs, "pairs.json")
    if not args.pairs or not os.path.exists(index_file):
        fail(f"{index_file if args.pairs else 'no --pairs'} not found", "--pairs", "--method kd reads teacher pairs: write them with `sample.py --save_pairs DIR`")  # fmt: skip
    with open(index_file) as f:
        meta = json.load(f)
    if not meta["shards"]:
        fail(
            f"{args.pairs} holds no finished shard", "--pairs", "rerun the sample.py --save_pairs command to finish it"
        )
    shards = [load_file(os.path.join(args.pairs, name)) for name in meta["shards"]]
    states = torch.cat([s["states"] for s in shards])
    pairs = torch.cat([states, torch.cat([s["x0"] for s in shards]).unsqueeze(1)], dim=1)
    labels = torch.cat([s["labels"] for s in shards])
    P = states.shape[1]
    if P % args.student_steps:
        fail(f"the pairs hold {P} trajectory states", "--student_steps", f"give a divisor of {P}")

    def batch(step, shard, n):
        index = torch.randint(len(pairs), (n,), generator=torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 0)))  # fmt: skip
        return pairs[index], labels[index] if meta["label_dim"] else None

    return batch, (pairs.shape[2], pairs.shape[-1]), meta["label_dim"]


# ----------------------------------------------------------------------------
# EDM's non-leaking augmentation (Karras et al. 2022, App. F.2; NVlabs/edm training/augment.py): each named transform
# acts on an image with probability p and a random strength, and the strengths are written into an augmentation label
# that conditions the network (SongUNet/DhariwalUNet's map_augment); sampling with zero labels then gives un-augmented
# images, so the augmentation does not leak into the samples. FastGen passes the labels with the class condition to
# every network call of a step; AugmentLabels does the same here.

# Label width of each transform, in EDM's order (the order of the label's columns).
AUGMENTS = {"xflip": 1, "yflip": 1, "scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2, "brightness": 1,
            "contrast": 1, "lumaflip": 1, "hue": 2, "saturation": 1}  # fmt: skip
# EDM's strengths: log2 std of scaling, fraction of a full turn, log2 std of anisotropy, translation std (of the
# image side), brightness std, log2 std of contrast, fraction of a full hue turn, log2 std of saturation.
AUGMENT_STD = dict(scale=0.2, rotate_frac=1.0, aniso=0.2, translate_frac=0.125, brightness=0.2, contrast=0.5, hue=1.0, saturation=1.0)  # fmt: skip


def augment_dim(names):
    """Width of the augmentation label of a comma list of transforms."""
    names = [n for n in names.split(",") if n]
    unknown = sorted(set(names) - set(AUGMENTS))
    if unknown:
        fail(f"unknown transform(s) {', '.join(unknown)}", "--augment", f"choose from {', '.join(AUGMENTS)}")
    return sum(AUGMENTS[n] for n in AUGMENTS if n in names)


def _rotation(theta):
    """(B,) angles -> (B, 3, 3) homogeneous 2-D rotations."""
    c, s, z, o = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=1).reshape(-1, 3, 3)


def _diag(sx, sy):
    return torch.diag_embed(torch.stack([sx, sy, torch.ones_like(sx)], dim=1))


def augment_pipe(x, names, p, generator):
    """Augment images x (B, C, H, W) in [-1, 1] with the transforms in the comma list `names`, each with probability
    p per image (xflip on every image, EDM's xflip=1e8), drawing from the CPU `generator`. Returns the images and the
    labels (B, augment_dim(names)) float32: x/y flip 0 or 1, the normal draws w of scale (s = 2^(0.2 w)), aniso
    (w cos r, w sin r) and translation (w_x, w_y), (cos a - 1, sin a) of rotation and hue angles, brightness and
    contrast draws, the luma flip. Geometric transforms are one bilinear resampling with reflected borders (EDM
    resamples at twice the resolution with a wavelet filter); colour transforms act on RGB."""
    B, C, H, W = x.shape
    enabled = [n for n in AUGMENTS if n in names.split(",")]
    std = AUGMENT_STD

    def draw(kind, *shape):
        fn = torch.rand if kind == "rand" else torch.randn
        return fn(*shape, generator=generator, dtype=torch.float64)

    def gated(w, always=False):  # zero strength (the identity) unless the transform acts on this image
        return w if always else torch.where(draw("rand", B) < p, w, torch.zeros_like(w))

    labels, G, M = [], torch.eye(3, dtype=torch.float64).repeat(B, 1, 1), torch.eye(4, dtype=torch.float64).repeat(B, 1, 1)  # fmt: skip
    flips = {}
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(3)  # the luma axis
    vv = torch.outer(v, v)
    for name in enabled:
        if name in ("xflip", "yflip"):
            w = gated(torch.randint(2, (B,), generator=generator).double(), always=name == "xflip")
            flips[name] = w
            labels.append(w[:, None])
        elif name == "scale":  # G maps output pixel coordinates to input ones: the inverse of each transform
            w = gated(draw("randn", B))
            s = torch.exp2(w * std["scale"])
            G = G @ _diag(1 / s, 1 / s)
            labels.append(w[:, None])
        elif name == "rotate_frac":
            w = gated((draw("rand", B) * 2 - 1) * math.pi * std["rotate_frac"])
            G = G @ _rotation(w)
            labels.append(torch.stack([w.cos() - 1, w.sin()], dim=1))
        elif name == "aniso":
            w = gated(draw("randn", B))
            r = (draw("rand", B) * 2 - 1) * math.pi
            r = torch.where(draw("rand", B) < 0.5, r, torch.zeros_like(r))  # EDM's aniso_rotate_prob 0.5
            s = torch.exp2(w * std["aniso"])
            G = G @ _rotation(r) @ _diag(1 / s, s) @ _rotation(-r)
            labels.append(torch.stack([w * r.cos(), w * r.sin()], dim=1))
        elif name == "translate_frac":
            w = torch.where(draw("rand", B)[:, None] < p, draw("randn", B, 2), torch.zeros(B, 2, dtype=torch.float64))
            shift = torch.eye(3, dtype=torch.float64).repeat(B, 1, 1)
            shift[:, 0, 2], shift[:, 1, 2] = -w[:, 0] * W * std["translate_frac"], -w[:, 1] * H * std["translate_frac"]
            G = G @ shift
            labels.append(w)
        elif name == "brightness":  # M acts on homogeneous RGB; each colour transform multiplies from the left
            w = gated(draw("randn", B))
            step = torch.eye(4, dtype=torch.float64).repeat(B, 1, 1)
            step[:, :3, 3] = (w * std["brightness"])[:, None]
            M = step @ M
            labels.append(w[:, None])
        elif name == "contrast":
            w = gated(draw("randn", B))
            c = torch.exp2(w * std["contrast"])
            M = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], dim=1)) @ M
            labels.append(w[:, None])
        elif name == "lumaflip":  # mirror the colour along the luma axis
            w = gated(torch.randint(2, (B,), generator=generator).double())
            M = (torch.eye(4, dtype=torch.float64) - 2 * vv * w.reshape(-1, 1, 1)) @ M
            labels.append(w[:, None])
        elif name == "hue":  # rotate the colour about the luma axis (Rodrigues)
            w = gated((draw("rand", B) * 2 - 1) * math.pi * std["hue"])
            a = v[:3]
            cross = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
            c, s = w.cos().reshape(-1, 1, 1), w.sin().reshape(-1, 1, 1)
            step = torch.eye(4, dtype=torch.float64).repeat(B, 1, 1)
            step[:, :3, :3] = c * torch.eye(3, dtype=torch.float64) + s * cross + (1 - c) * torch.outer(a, a)
            M = step @ M
            labels.append(torch.stack([w.cos() - 1, w.sin()], dim=1))
        elif name == "saturation":  # scale the colour's distance from the luma axis
            w = gated(draw("randn", B))
            s = torch.exp2(w * std["saturation"]).reshape(-1, 1, 1)
            step = torch.eye(4, dtype=torch.float64).repeat(B, 1, 1)
            step[:, :3, :3] = vv[:3, :3] + (torch.eye(3, dtype=torch.float64) - vv[:3, :3]) * s
            M = step @ M
            labels.append(w[:, None])
    dev = x.device
    for name, dim in (("xflip", 3), ("yflip", 2)):
        if name in flips:
            x = torch.where(flips[name].to(dev).reshape(-1, 1, 1, 1) == 1, x.flip(dim), x)
    if any(n in enabled for n in ("scale", "rotate_frac", "aniso", "translate_frac")):
        # Output pixel centres in coordinates about the image centre, mapped by G; grid_sample with
        # align_corners=False reads x at 2 u / W, 2 v / H.
        ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) - (H - 1) / 2, torch.arange(W, dtype=torch.float64) - (W - 1) / 2, indexing="ij")  # fmt: skip
        points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # (HW, 3)
        src = points @ G.transpose(1, 2)  # (B, HW, 3)
        grid = torch.stack([src[..., 0] * 2 / W, src[..., 1] * 2 / H], dim=-1).reshape(B, H, W, 2)
        x = F.grid_sample(x, grid.to(dev, x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    if any(n in enabled for n in ("brightness", "contrast", "lumaflip", "hue", "saturation")):
        if C != 3:
            raise ValueError(f"colour augmentations need RGB images, got {C} channels")
        M = M.to(dev, x.dtype)
        x = (M[:, :3, :3] @ x.reshape(B, 3, H * W) + M[:, :3, 3:]).reshape(B, C, H, W)
    labels = torch.cat(labels, dim=1) if labels else torch.zeros(B, 0, dtype=torch.float64)
    return x, labels.float().to(dev)


def augment_batch(x0, args, step, shard):
    """--augment on a training micro-batch: (images, labels), labels None without --augment; the draws are a fixed
    function of (seed, step, shard), so --resume is exact."""
    if not args.augment:
        return x0, None
    return augment_pipe(x0, args.augment, args.augment_p, torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 4)))  # fmt: skip


class AugmentLabels:
    """The step's augmentation labels as a condition of every network call, as FastGen passes them with the class
    condition: a forward pre-hook on each network adds augment_labels (zero-padded to the network's augment_dim, which
    is the same function as a narrower map_augment) to calls whose batch is the step's, inside `given(labels)` only."""

    def __init__(self):
        self.labels = None

    def attach(self, *models):
        for model in models:
            if model is not None and getattr(model.cfg, "augment_dim", 0):
                model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, model, args, kwargs):
        if self.labels is None or "augment_labels" in kwargs or args[0].shape[0] != len(self.labels):
            return None
        width = model.cfg.augment_dim
        if self.labels.shape[1] > width:
            fail(f"the augment labels have {self.labels.shape[1]} columns, the network takes {width}", "--augment", "choose transforms that fit the network's augment_dim")  # fmt: skip
        return args, kwargs | {"augment_labels": F.pad(self.labels, (0, width - self.labels.shape[1])).to(args[0].dtype)}  # fmt: skip

    @contextlib.contextmanager
    def given(self, labels):
        self.labels = labels
        try:
            yield
        finally:
            self.labels = None


# ----------------------------------------------------------------------------
# Losses. Each takes the trainable network `net` (DDP-wrapped when distributed), the bare `student` for passes that
# need no gradient (JVPs, stop-gradient targets), a clean batch x0 and its labels, and returns (loss, logs).
# Time math is float64; t is the noise level sigma of the EDM-family schedule (alpha = 1, sigma = t).


def sample_t(n, args, module, device, t_min=None):
    return module.sample_t(n, args.t_sampler, args.p_mean, args.p_std, t_min or module.T_MIN, args.t_max).to(device)


def bcast(t, x):
    """(B,) -> (B, 1, 1, 1) in float64."""
    return t.double().reshape(-1, *([1] * (x.ndim - 1)))


def teacher_x0(teacher, x, t, labels, guidance):
    """The teacher's x0 prediction with classifier-free guidance (unconditional = the all-zero label)."""
    x0 = teacher(x, t, labels)
    if guidance != 1.0 and labels is not None:
        x0 = x0 + (guidance - 1) * (x0 - teacher(x, t, None))
    return x0


def sft_loss(net, x0, labels, args, module):
    """Denoising score matching in the native x0 prediction: E ||D(x0 + sigma eps; sigma) - x0||^2 (EDM Eq. 2)."""
    t = sample_t(len(x0), args, module, x0.device)
    x_t = x0 + (bcast(t, x0) * torch.randn_like(x0, dtype=torch.float64)).to(x0.dtype)
    err = (net(x_t, t, labels) - x0).float().square().mean(dim=(1, 2, 3))
    if args.edm_weighting:  # lambda(sigma) = 1 / c_out^2 makes the effective target unit-variance (EDM Sec. 5)
        sd = 0.5
        err = err * ((t**2 + sd**2) / (t * sd) ** 2).float()
    if args.native_weighting:  # DiT/SiT: the loss on their own output type, 1 / (d x0 / d output)^2 (DiTSchedule)
        err = err * module.native_weight(t).float()
    return err.mean(), {}


def ct_ratio(step, args):
    """ECT's gap schedule: stage = images seen / images per stage, r/t ratio = 1 - q^-(stage + 1) (ECT Sec. 3.3)."""
    stage = math.floor(step * args.batch_size / (args.ct_kimg_per_stage * 1000))
    return min(1 - args.ct_q ** -(stage + 1), args.ct_ratio_limit)


def ct_r(t, ratio, t_min):
    """r = t - t (1 - ratio)(1 + 8 sigmoid(-t)): the earlier point of a consistency pair (ECT Eq. 9, FastGen's form)."""
    return (t - t * (1 - ratio) * (1 + 8 * torch.sigmoid(-t))).clamp(min=t_min)


def consistency_distance(d_t, d_r, t, r, args):
    """Per-sample (pseudo-Huber) L2 norm sqrt(||a - b||^2 + c^2) - c, weighted by 1 / (t - r) (ECT Eq. 6), float64."""
    d = (d_t.double() - d_r.double()).flatten(1).norm(dim=1)
    u = (d.square() + args.huber_c**2).sqrt() - args.huber_c if args.huber_c > 0 else d
    sd = 0.5
    c_out = t * sd / (t**2 + sd**2).sqrt()
    weight = {"default": 1 / (t - r), "c_out": 1 / c_out, "c_out_sq": 1 / c_out**2, "sigma_sq": 1 / t**2,
              "sqrt": 1 / (t - r).sqrt(), "one": torch.ones_like(t)}[args.cm_weighting]  # fmt: skip
    return u * weight, u


def consistency_pair(x0, t, r, teacher, labels, args):
    """Points y_t and y_r of one trajectory: shared noise (CT), or one teacher Euler step of the PF-ODE (CD)."""
    eps = torch.randn_like(x0, dtype=torch.float64)
    y_t = (x0 + bcast(t, x0) * eps).to(x0.dtype)
    if args.cd:  # y_r = y_t - (t - r) dx/dt, with dx/dt = (y_t - D_T(y_t)) / t (EDM Eq. 3)
        with torch.no_grad():
            d_teacher = teacher_x0(teacher, y_t, t, labels, args.guidance).double()
        y_r = (y_t - bcast(t - r, x0) * (y_t - d_teacher) / bcast(t, x0)).to(x0.dtype)
    else:
        y_r = (x0 + bcast(r, x0) * eps).to(x0.dtype)
    return y_t, y_r


def cm_loss(net, student, teacher, x0, labels, step, args, module):
    """Consistency training/tuning: ||f(y_t, t) - sg(f(y_r, r))|| / (t - r), both passes with the same dropout."""
    ratio = ct_ratio(step, args)
    t = sample_t(len(x0), args, module, x0.device)
    r = ct_r(t, ratio, module.T_MIN)
    t = torch.maximum(t, r + 1e-6)
    y_t, y_r = consistency_pair(x0, t, r, teacher, labels, args)
    rng = get_rng(x0.device)
    d_t = net(y_t, t, labels)
    set_rng(rng, x0.device)  # the target pass draws the same dropout masks (ECT)
    with torch.no_grad():
        d_r = torch.nan_to_num(student(y_r, r, labels))
    loss, unweighted = consistency_distance(d_t, d_r, t, r, args)
    return loss.mean(), {"unweighted": unweighted.mean().item(), "ratio": ratio}


def tcm_loss(net, student, stage1, teacher, x0, labels, step, args, module):
    """Truncated CM, stage two: t >= transition; targets below the transition come from the frozen stage-one model,
    and a share of samples sits on the boundary with its own weight (TCM Eq. 8). ECT's gap schedule continues from
    stage one's last step (args.ct_start_step, see stage_one_step), as FastGen resumes the stage-one iteration."""
    B, ratio = len(x0), ct_ratio(step + (args.ct_start_step or 0), args)  # continues stage one's schedule
    t = sample_t(B, args, module, x0.device, t_min=args.transition_t)
    boundary = torch.zeros(B, dtype=torch.bool, device=x0.device)
    boundary[torch.randperm(B)[: int(B * args.boundary_prob)]] = True
    t = torch.where(boundary, torch.full_like(t, args.transition_t + 1e-8), t)
    r = ct_r(t, ratio, module.T_MIN)
    t = torch.maximum(t, r + 1e-6)
    y_t, y_r = consistency_pair(x0, t, r, teacher, labels, args)
    rng = get_rng(x0.device)
    d_t = net(y_t, t, labels)
    with torch.no_grad():
        set_rng(rng, x0.device)
        d_student = student(y_r, r, labels)
        set_rng(rng, x0.device)
        d_stage1 = stage1(y_r, r, labels)
        d_r = torch.nan_to_num(torch.where((r >= args.transition_t).reshape(-1, 1, 1, 1), d_student, d_stage1))
    loss, unweighted = consistency_distance(d_t, d_r, t, r, args)
    interior = loss[~boundary].mean() if (~boundary).any() else loss.new_zeros(())
    edge = loss[boundary].mean() if boundary.any() else loss.new_zeros(())
    return interior + args.w_boundary * edge, {"unweighted": unweighted.mean().item(), "boundary": edge.item(), "ratio": ratio}  # fmt: skip


def stage_one_step(args):
    """tcm: the step ECT's gap schedule continues from: --ct_start_step, else the step recorded in the --stage1
    checkpoint's metadata (what save_checkpoint writes), else 0 (no stage-one file: --tiny runs)."""
    if args.ct_start_step is not None:
        return args.ct_start_step
    if not args.stage1:
        return 0
    from safetensors import safe_open

    with safe_open(args.stage1, framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    if step is None:
        fail(f"{args.stage1} records no training step", "--stage1", "give --ct_start_step, stage one's last step")
    return int(step)


def dropout_resolutions(args):
    """The network override of --dropout_resolutions (EDM2's Config.dropout_resolutions), {} when not given."""
    if not args.dropout_resolutions:
        return {}
    if args.model != "edm2":
        fail("--dropout_resolutions is for --model edm2", "--dropout_resolutions", "drop it: EDM's networks drop out at every resolution")  # fmt: skip
    return {"dropout_resolutions": tuple(int(r) for r in args.dropout_resolutions.split(","))}


def trigflow(model, x_hat, t_hat, labels, return_logvar=False, sd=0.5):
    """An x0 denoiser seen as TrigFlow's F(x_hat, t_hat) (sCM Sec. 2): sigma = sd tan t_hat, x = x_hat / cos t_hat,
    F = (cos t_hat x_hat - x0) / (sd sin t_hat). Time math in float64."""
    cos, sin = bcast(torch.cos(t_hat), x_hat), bcast(torch.sin(t_hat), x_hat)
    out = model(x_hat / cos.to(x_hat.dtype), sd * torch.tan(t_hat), labels, return_logvar=return_logvar)
    x0, logvar = out if return_logvar else (out, None)
    F_out = ((cos * x_hat.double() - x0.double()) / (sd * sin)).to(x_hat.dtype)
    return (F_out, logvar) if return_logvar else F_out


def scm_loss(net, student, teacher, x0, labels, step, args, module):
    """sCT / sCD (sCM Alg. 1): tangent from a JVP of F along the trajectory, normalised, and adaptive weighting
    through the logvar head: loss = w(t) / (e^logvar D) ||F - sg(F) - g||^2 + logvar (sCM Eq. 8 with Sec. 4)."""
    sd = 0.5
    t = sample_t(len(x0), args, module, x0.device)
    t_hat = torch.atan2(t, torch.full_like(t, sd))  # the TrigFlow time with the same SNR: tan t_hat = sigma / sd
    cos, sin = bcast(torch.cos(t_hat), x0), bcast(torch.sin(t_hat), x0)
    z = sd * torch.randn_like(x0, dtype=torch.float64)
    x_hat = (cos * x0.double() + sin * z).to(x0.dtype)
    if args.cd:  # teacher tangent dx_hat/dt_hat = sd F_teacher, with guidance in F space
        with torch.no_grad():
            dxdt = sd * trigflow(teacher, x_hat, t_hat, labels).double()
            if args.guidance != 1.0 and labels is not None:
                dxdt = dxdt + (args.guidance - 1) * (dxdt - sd * trigflow(teacher, x_hat, t_hat, None).double())
    else:  # the data trajectory's tangent
        dxdt = -sin * x0.double() + cos * z

    F_theta, logvar = trigflow(net, x_hat, t_hat, labels, return_logvar=True)

    # J = cos sin dF/dt_hat along the trajectory: one JVP through the network, no backward graph (sCM Eq. 7).
    c = torch.cos(t_hat) * torch.sin(t_hat)
    clamp = (-math.pi / 2 + 1e-4, math.pi / 2 - 1e-4)
    with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
        if args.jvp == "exact":
            fn = lambda x, th: trigflow(student, x, th.clamp(*clamp), labels).double()
            J = torch.func.jvp(fn, (x_hat.float(), t_hat), ((bcast(c, x0) * dxdt).float(), c))[1]
        else:  # finite differences along the same (x0, z) trajectory, each side with the same dropout masks
            delta = (args.fd_eps * t_hat.abs()).clamp(min=1e-6)
            sides = []
            for th in ((t_hat + delta).clamp(max=clamp[1]), (t_hat - delta).clamp(min=clamp[0])):
                with torch.random.fork_rng():
                    x_side = (bcast(torch.cos(th), x0) * x0.double() + bcast(torch.sin(th), x0) * z).float()
                    sides.append(trigflow(student, x_side, th, labels).double())
            J = bcast(c / (2 * delta), x0) * (sides[0] - sides[1])

    F_sg = F_theta.double().detach()
    warmup = min(1.0, step / args.tangent_warmup_steps) if args.tangent_warmup_steps > 0 else 1.0
    g = -(cos**2) * (sd * F_sg - dxdt) - warmup * (cos * sin * x_hat.double() + sd * J)
    D = x0[0].numel()
    g_norm = g.flatten(1).norm(dim=1) / math.sqrt(D)  # RMS: invariant to the image size
    g = g / bcast(g_norm + 0.1, g)
    unweighted = (F_theta.double() - F_sg - g).square().mean(dim=(1, 2, 3))
    logvar = logvar.double().reshape(-1)
    loss = (1 / t) / (logvar.exp() * D) * unweighted + logvar  # prior weight 1/sigma, uncertainty weighting
    return loss.mean(), {"unweighted": unweighted.mean().item(), "logvar": logvar.mean().item(), "warmup": warmup}


def average_velocity(model, x, t, r, labels):
    """u(x, r, t) in the flow parameterisation of the EDM schedule: u = (x - D(x; t, r)) / t, so that a jump
    x_r = x_t - (t - r) u; with r = 0 it lands on D, the network's x0 output."""
    return ((x.double() - model(x, t, labels, r=r).double()) / bcast(t, x)).to(x.dtype)


def meanflow_guidance(student, x_t, t, v, labels, args):
    """MeanFlow's classifier-free guidance at training time (Geng et al. 2025, Eq. 19-21, FastGen's form): the target
    velocity of conditional samples becomes
        v~ = w v + (1 - w - kappa) u(x_t, t, t | none) + kappa u(x_t, t, t | c)      (without kappa: u_none + w (v - u_none))
    with the student's own instantaneous velocities (eval mode, no gradient), w and kappa only for rectified-flow times
    t / (1 + t) inside [mf_t_start, mf_t_end] (else 1 and 0); the effective scale is w / (1 - kappa). Then the first
    Binomial(B, mf_cond_dropout) samples (where the flow-matching samples r = t sit) train unconditionally on the
    unguided v. Velocities are combined with weights that sum to one, so this equals FastGen's rectified-flow target
    mapped to EDM's noise levels. Returns (target (B, C, H, W) float32, one-hot labels (B, classes), zero rows = none)."""
    B, classes = len(x_t), net_shape(student.cfg)[2]
    onehot = F.one_hot(labels.long(), classes).to(x_t.dtype)
    guided = v.double()
    if args.mf_guidance is not None or args.mf_kappa is not None:
        t_rf = t / (1 + t)  # the guidance window is given in rectified-flow time, as FastGen's configs
        inside = (t_rf >= args.mf_t_start) & (t_rf <= args.mf_t_end)
        w = bcast(torch.where(inside, 1.0 if args.mf_guidance is None else args.mf_guidance, 1.0), x_t)
        was_training = student.training
        student.eval()  # no dropout in the guidance passes
        with torch.no_grad():
            u_none = average_velocity(student, x_t, t, t, None).double()
            if args.mf_kappa is None:
                guided = u_none + w * (v.double() - u_none)
            else:
                kappa = bcast(torch.where(inside, args.mf_kappa, 0.0), x_t)
                u_cond = average_velocity(student, x_t, t, t, labels).double()
                guided = w * v.double() + (1 - w - kappa) * u_none + kappa * u_cond
        student.train(was_training)
    keep = torch.arange(B, device=x_t.device) >= int((torch.rand(B) < args.mf_cond_dropout).sum())
    target = torch.where(keep.reshape(-1, 1, 1, 1), guided, v.double())
    return target.to(x_t.dtype), onehot * keep.reshape(-1, 1).to(onehot.dtype)


def meanflow_loss(net, student, teacher, x0, labels, step, args, module):
    """MeanFlow (Geng et al. 2025, Eq. 6-10): u(z_t, r, t) = v - (t - r) du/dt, du/dt the JVP along (v, 1, 0).

    t and r come from --t_sampler with (p_mean, p_std) and (r_p_mean, r_p_std). FastGen draws both logit-normal in
    rectified-flow time: --t_sampler logitnormal on sit/edm_rf does exactly that; the default lognormal in sigma is its
    SNR-equivalent (sigma = t_rf / (1 - t_rf) = e^n), truncated to [T_MIN, t_max] instead of scaled into [0, 0.999].

    The residual R = u - v + (t - r) du/dt is taken in EDM's noise levels. In rectified-flow time (t_rf = sigma /
    (1 + sigma), the same points scaled by 1 - t_rf, the same x0-like output D) it is R_rf = R (1 + sigma)^2 / (1 + r):
    both are -d/dt of the predicted point at r, x_r = x_t - (t - r) u, which is the same point up to the constant
    factor 1 + r, and dt_rf / dsigma = 1 / (1 + sigma)^2. --native_weighting (sit, edm_rf) trains on R_rf: FastGen's
    loss, adaptive weight included."""
    B = len(x0)
    t = module.sample_t(B, args.t_sampler, args.p_mean, args.p_std, module.T_MIN, args.t_max).to(x0.device)
    r = module.sample_t(B, args.t_sampler, args.r_p_mean, args.r_p_std, module.T_MIN, args.t_max).to(x0.device)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    n_flow = int((torch.rand(B) >= args.r_ratio).sum())  # the first n_flow samples are plain flow matching: r = t
    r = torch.cat([t[:n_flow], r[n_flow:]])
    eps = torch.randn_like(x0, dtype=torch.float64)
    x_t = (x0 + bcast(t, x0) * eps).to(x0.dtype)
    if args.cd:  # teacher velocity dx/dt = (x_t - D_T) / t
        with torch.no_grad():
            d_teacher = teacher_x0(teacher, x_t, t, labels, args.guidance).double()
            v = ((x_t.double() - d_teacher) / bcast(t, x0)).to(x0.dtype)
    else:  # the conditional velocity of alpha = 1, sigma = t: dx_t/dt = eps
        v = eps.to(x0.dtype)  # float32 data in training; a float64 batch (tests) stays float64
        if labels is not None and (args.mf_guidance is not None or args.mf_kappa is not None or args.mf_cond_dropout):
            v, labels = meanflow_guidance(student, x_t, t, v, labels, args)

    rng = get_rng(x0.device)
    with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
        if args.jvp == "exact":
            fn = lambda x, tt, rr: average_velocity(student, x, tt, rr, labels)
            du_dt = torch.func.jvp(fn, (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))[1].double()
        else:
            h = args.fd_eps * t
            sides = []
            for sign in (1, -1):
                set_rng(rng, x0.device)
                th = t + sign * h
                sides.append(average_velocity(student, (x_t.double() + bcast(th - t, x0) * v.double()).to(x0.dtype), th, r, labels).double())  # fmt: skip
            du_dt = (sides[0] - sides[1]) / bcast(2 * h, x0)
    set_rng(rng, x0.device)  # the gradient pass draws the same dropout masks as the JVP pass
    u = average_velocity(net, x_t, t, r, labels)
    target = v.double() - bcast(t - r, x0) * du_dt
    residual = u.double() - target
    if args.native_weighting:  # the residual in rectified-flow time (see above)
        residual = residual * bcast((1 + t) ** 2 / (1 + r), x0)
    err = residual.square().sum(dim=(1, 2, 3))
    weight = 1 / (err.detach() + args.mf_norm_c) ** args.mf_norm_p  # adaptive loss weighting (MeanFlow Sec. 4.3)
    return (weight * err).mean(), {"unweighted": err.mean().item()}


# ----------------------------------------------------------------------------
# Distribution matching (DMD2, f-distill) and knowledge distillation. The generator and the critic (a fake score, a
# trainable copy of the teacher, and GAN heads on frozen teacher features) take turns: one generator step every
# --student_update_freq steps (DMD2 Sec. 4.2).


def group_norm(channels):
    """GroupNorm with the largest divisor of C that is at most 32 groups (C // 4 groups for narrow maps)."""
    if channels <= 32:
        return nn.GroupNorm(max(channels // 4, 1), channels)
    return nn.GroupNorm(max(g for g in range(1, 33) if channels % g == 0), channels)


class Discriminator(nn.Module):
    """GAN heads on frozen teacher features (DMD2 Sec. 4.3), one per feature map: 4x4 stride-2 convolutions down to
    4x4, a 4x4 stride-4 convolution to 1x1, then a 1x1 convolution to one logit. Input: a list of (B, C_i, H_i, W_i)
    maps; output: logits (B, heads)."""

    def __init__(self, indices, shapes):
        super().__init__()
        self.indices = tuple(indices)  # which teacher feature levels the heads read, in order
        self.heads = nn.ModuleList()
        for channels, size in shapes:
            layers = []
            while size > 4:
                layers += [nn.Conv2d(channels, channels, 4, 2, 1), group_norm(channels), nn.SiLU()]
                size //= 2
            layers += [nn.Conv2d(channels, channels, size, size), group_norm(channels), nn.SiLU()]
            layers += [nn.Conv2d(channels, 1, 1)]
            self.heads.append(nn.Sequential(*layers))

    def forward(self, features):
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features)], dim=1)


def student_input(x0, args, module):
    """The generator's input and time: pure noise at the first t_list time for a one-step student; for K steps a
    time drawn uniformly from the K non-zero t_list entries and the real batch noised to it (FastGen's few-step
    DMD2: students learn on forward-noised data, not on their own trajectories)."""
    times = module.t_list(args.student_steps).to(x0.device)
    t_s = times[torch.randint(args.student_steps, (len(x0),), device=x0.device)]
    eps = torch.randn_like(x0)
    x_in = eps * bcast(t_s, x0).to(x0.dtype) if args.student_steps == 1 else x0 + eps * bcast(t_s, x0).to(x0.dtype)
    return x_in, t_s


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


def f_weights(logits, t, bins, args, t_min):
    """f-distill (Xu et al. 2025, Sec. 4): the density ratio from the discriminator, r = exp(logit) clipped to
    [ratio_lower, ratio_upper]; divided by its running mean in linear t-bins (the ratio drifts with the noise
    level); h = f_weight(r), normalised to mean one over the global batch. `bins` (ratio_bins,) is updated in place."""
    with torch.no_grad():
        r = logits.float().mean(dim=1).clamp(-10, 10).exp().clamp(args.ratio_lower, args.ratio_upper)
        if args.ratio_bins:
            # Linear bins over [t_min, t_max]: with EDM's Karras-spaced t most samples land in the first bin, as in
            # FastGen (kept for parity).
            index = ((t.float() - t_min) / (args.t_max - t_min) * args.ratio_bins).long().clamp(0, args.ratio_bins - 1)  # fmt: skip
            counts = all_reduce_sum(torch.zeros(args.ratio_bins, device=r.device).index_add_(0, index, torch.ones_like(r)))  # fmt: skip
            sums = all_reduce_sum(torch.zeros(args.ratio_bins, device=r.device).index_add_(0, index, r))
            seen = counts > 0
            bins[seen] = args.ratio_ema * bins[seen] + (1 - args.ratio_ema) * sums[seen] / counts[seen]
            r = r / (bins[index] + 1e-6)
        h = F_WEIGHTS[args.f_div](r)
        total = all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(len(h)), device=h.device)]))
        return h / (total[0] / total[1] + 1e-6), r


def dmd2_generator_loss(net, teacher, fake, disc, x0, labels, args, module, bins=None):
    """DMD2's generator step (DMD2 Eq. 2 + Sec. 4.3): the VSD loss between the teacher's and the fake score's x0
    predictions at a noised student sample, plus the non-saturating GAN loss softplus(-D) on teacher features;
    f-distill scales the per-sample VSD weight by h(r) (f-distill Eq. 9)."""
    x_in, t_s = student_input(x0, args, module)
    g = net(x_in, t_s, labels)
    t = sample_t(len(x0), args, module, x0.device)
    x_t = g + bcast(t, g).to(g.dtype) * torch.randn_like(g)
    with torch.no_grad():
        x_fake = fake(x_t, t, labels)
    logs, loss_gan, logits = {}, g.new_zeros(()), None
    if disc is not None:  # the GAN gradient flows through the frozen teacher into x_t and g
        x_teacher, features = teacher(x_t, t, labels, feature_indices=disc.indices)
        logits = disc(features)
        loss_gan = F.softplus(-logits.float()).mean()
        logs["gan_loss_gen"] = loss_gan.item()
    else:
        with torch.no_grad():
            x_teacher = teacher(x_t, t, labels)
    x_teacher = x_teacher.detach()
    if args.guidance != 1.0 and labels is not None:  # classifier-free guidance on the teacher's x0
        with torch.no_grad():
            x_teacher = x_teacher + (args.guidance - 1) * (x_teacher - teacher(x_t, t, None))
    scale = None
    if args.method == "fdistill":
        scale, ratio = f_weights(logits, t, bins, args, module.T_MIN)
        logs |= {"h_min": scale.min().item(), "h_mean": scale.mean().item(), "h_max": scale.max().item(), "ratio_mean": ratio.mean().item()}  # fmt: skip
    loss_vsd = vsd_loss(g, x_teacher, x_fake, scale)
    logs["vsd_loss"] = loss_vsd.item()
    return loss_vsd + args.gan_weight * loss_gan, logs


def dmd2_critic_loss(student, teacher, fake_net, disc_net, x0, labels, args, module):
    """DMD2's critic step: the fake score learns the student's distribution by denoising score matching on student
    samples (x0 target, FastGen's unweighted DSM), and the GAN heads learn to tell noised real data from noised
    student samples, softplus(D(fake)) + softplus(-D(real)); optional approximate R1: the heads' logits should not
    change when the clean real sample moves by r1_alpha n (APT, in FastGen's form: x0 + r1_alpha n at t_real)."""
    with torch.no_grad():
        x_in, t_s = student_input(x0, args, module)
        g = student(x_in, t_s, labels)
    t = sample_t(len(x0), args, module, x0.device)
    eps = torch.randn_like(g)
    x_t = g + bcast(t, g).to(g.dtype) * eps
    loss_fake = (fake_net(x_t, t, labels).float() - g.float()).square().mean()
    logs = {"fake_score_loss": loss_fake.item()}
    if disc_net is None:
        return loss_fake, logs
    if args.gan_same_t_noise:
        t_real, eps_real = t, eps
    else:
        t_real, eps_real = sample_t(len(x0), args, module, x0.device), torch.randn_like(x0)
    x_real = x0 + bcast(t_real, x0).to(x0.dtype) * eps_real
    indices = disc_net.module.indices if isinstance(disc_net, DDP) else disc_net.indices
    with torch.no_grad():
        features = [teacher.features(x_t, t, labels, indices), teacher.features(x_real, t_real, labels, indices)]
        if args.r1_weight > 0:
            # FastGen's form (dmd2.py): the clean real moved by r1_alpha n, seen by the teacher at t_real.
            x_perturbed = x0 + args.r1_alpha * torch.randn_like(x0)
            features.append(teacher.features(x_perturbed, t_real, labels, indices))
    # One pass of the heads over [fake; real; perturbed real], so that DDP sees a single forward per step.
    logits = disc_net([torch.cat(maps) for maps in zip(*features)]).float().chunk(len(features))
    loss_disc = F.softplus(logits[0]).mean() + F.softplus(-logits[1]).mean()
    logs["gan_loss_disc"] = loss_disc.item()
    loss = loss_fake + loss_disc
    if args.r1_weight > 0:
        loss_r1 = (logits[1] - logits[2]).square().mean()
        logs["gan_loss_r1"] = loss_r1.item()
        loss = loss + args.r1_weight * loss_r1
    return loss, logs


def kd_loss(net, pairs, labels, args, module):
    """Knowledge distillation from teacher trajectories: regress the student's x0 onto the teacher's ODE solution
    from the same starting point, 0.5 ||G(x_k, t_k) - x0_teacher||^2 (Luhman & Luhman 2021). `pairs` (B, P + 1, C,
    H, W) holds P states of the teacher trajectory at t_list(P) and the teacher's output last; a K-step student
    starts from the state at one of its own K times, drawn uniformly."""
    states, target = pairs[:, :-1], pairs[:, -1]
    K, P = args.student_steps, states.shape[1]
    times = module.t_list(P).to(pairs.device)
    pick = torch.randint(K, (len(pairs),), device=pairs.device) * (P // K)
    x_in = states[torch.arange(len(pairs), device=pairs.device), pick]
    x0_student = net(x_in, times[pick], labels)
    return 0.5 * (x0_student.float() - target.float()).square().mean(), {}


# ----------------------------------------------------------------------------
# Sampling, evaluation and checkpoints


@torch.no_grad()
def generate(model, module, noise, labels, steps, method):
    """Few-step samples of a student: MeanFlow jumps with its average velocity, the rest predict x0 and re-noise."""
    if method != "meanflow":
        return module.sample_student(model, noise, labels, steps=steps)
    times = module.t_list(steps).to(noise.device)
    x = noise * times[0]
    for t, r in zip(times[:-1], times[1:]):
        tb, rb = t.expand(len(x)), r.clamp(min=module.T_MIN).expand(len(x))
        x = (x.double() - (t - r) * average_velocity(model, x, tb, rb, labels).double()).float()
    return x


def to_grid(x, cols=8):
    """(B, C, H, W) in [-1, 1] -> a uint8 image grid (H', W', C)."""
    return image_grid(to_uint8(x), cols)


@torch.no_grad()
def evaluate(model, module, cfg, args, sampler, steps, n, device, classifier=None):
    """Samples from `sampler` ("student" or "teacher") and, on toy data, their toy FID and class accuracy."""
    g = torch.Generator().manual_seed(12345)  # the same noise and classes in every evaluation
    images, labels = [], []
    for i in range(0, n, 250):
        b = min(250, n - i)
        channels, side, classes = net_shape(cfg)
        noise = torch.randn(b, channels, side, side, generator=g).to(device)
        y = (torch.arange(i, i + b) % classes).to(device) if classes else None  # classes in equal numbers
        if sampler == "teacher":
            x = module.sample_heun(model, noise, y, steps=steps) if steps > 1 else module.sample_student(model, noise, y, steps=1)  # fmt: skip
        else:
            x = generate(model, module, noise, y, steps, args.method)
        images.append(x.float().cpu())  # images in [-1, 1], or latents
        labels.append(y.cpu() if y is not None else torch.zeros(b, dtype=torch.long))
    images, labels = torch.cat(images), torch.cat(labels)
    metrics = {}
    if classifier is not None:
        import toy

        metrics = toy.evaluate(classifier, images.clamp(-1, 1), labels)
        if not net_shape(cfg)[2]:  # an unconditional model was asked for no class
            metrics.pop("accuracy")
    return images, metrics


def quality_report(args, student, teacher, module, cfg, device, classifier):
    """The embedded default's figure and table: teacher 35 evaluations (Heun, 18 steps), teacher 1 step, student
    1 step, on the same noise and classes; toy FID and class accuracy of each."""
    rows, lines = [], ["| sampler | evaluations | toy FID | class accuracy |", "|---|---|---|---|"]
    for name, model, sampler, steps, nfe in (
        ("teacher", teacher, "teacher", 18, 35),
        ("teacher", teacher, "teacher", 1, 1),
        ("student", student, "student", args.student_steps, args.student_steps),
    ):
        print(f"quality report: {name}, {nfe} evaluations, {args.eval_n} samples ...", flush=True)
        images, m = evaluate(model, module, cfg, args, sampler, steps, args.eval_n, device, classifier)
        rows.append(images[: 2 * net_shape(cfg)[2] or 16])
        lines.append(f"| {name} | {nfe} | {m['fid']:.2f} | {m.get('accuracy', float('nan')):.3f} |")
    table = (
        "\n".join(lines) + f"\n\n({args.eval_n} samples each, classes in equal numbers, the same noise for all three)\n"
    )
    with open(os.path.join(args.out_dir, "quality.md"), "w") as f:
        f.write(table)
    Image.fromarray(to_grid(torch.cat(rows), cols=len(rows[0]))).save(os.path.join(args.out_dir, "quality.png"))
    print(table)


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


def summary(args, emas):
    """Where the run's results are and the command that samples the student."""
    last = checkpoints(args.out_dir)
    print(
        f"\nrun finished: {args.out_dir} (metrics.jsonl, samples/{', quality.md, quality.png' * args.quality_report})"
    )
    if last:
        weights = os.path.join(last[-1], f"ema_{next(iter(emas))}.safetensors" if emas else "student.safetensors")
        print(f"student: {weights}")
        if args.model != "edm_rf":  # sample.py has no rectified-flow view of the EDM networks; the run's grids do
            print(f"sample it: python sample.py --model {args.model} --ckpt {weights} --sampler student --steps {args.student_steps}" + " --tiny" * args.tiny)  # fmt: skip


def load_pretrained(module, name, **switches):
    """module.from_pretrained, with a missing or unreadable file reported as bad input."""
    try:
        return module.from_pretrained(name, **switches)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        fail(f"cannot load {name}: {e}", "--teacher", "download it with download.py, or give a .safetensors path")


def ema_beta(spec, step):
    """A constant beta, or EDM2's power EMA beta = (1 - 1/k)^(gamma + 1) for spec 'power:gamma' (EDM2 Eq. 4)."""
    if spec.startswith("power:"):
        return (1 - 1 / max(step, 1)) ** (float(spec.split(":")[1]) + 1)
    return float(spec)


def learning_rate(step, args):
    """Linear warm-up, then constant or inverse-square-root decay (EDM2 Eq. 67)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
    return lr / math.sqrt(max(step / args.lr_decay_steps, 1)) if args.lr_decay_steps else lr


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
    ckpt = prepare_run_dir(args, RUN_IDENTITY, master)  # before anything loads; nothing written yet
    if master:
        print(json.dumps(vars(args)))

    module, Precond = MODELS[args.model]
    try:
        batch_fn, (channels, resolution), num_classes = make_data(args)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        fail(f"cannot read the data: {e}", f"--data {args.data}", "give an EDM-style zip or folder of PNGs, a latent folder, or toy")  # fmt: skip
    is_dit = args.model in ("dit", "sit")

    # Networks: the student (trainable), its EMAs, and frozen teacher / stage-one models where the method needs them.
    switches = dict(logvar_head=True) if args.method == "scm" and args.model in ("edm", "edm_rf", "dit", "sit") else {}
    if args.model == "edm_rf":  # the raw network (FastGen's drop_precond="both"); EDMRF changes the variables
        switches["precond"] = False
    if args.method == "meanflow":
        switches["r_timestep"] = True
        if is_dit:  # r enters as the interval t - r (FastGen's DiT MeanFlow configs)
            switches["time_cond_type"] = "diff"
    if args.dropout is not None:
        switches["dropout"] = args.dropout
    switches["label_dropout"] = args.label_dropout
    switches |= dropout_resolutions(args)  # EDM2: dropout at these resolutions only (FastGen's CM/sCM/TCM)
    if args.teacher and not args.tiny:
        student = load_pretrained(module, args.teacher, **switches)
        cfg = student.cfg
    elif is_dit:  # from scratch: --arch's size (the schedule is --model's), or the tiny config at the data's shape
        base = replace(module.CONFIGS[args.arch], schedule=module.schedule) if args.arch else replace(module.tiny, input_size=resolution, patch_size=max(resolution // 8, 1))  # fmt: skip
        if args.tiny or not args.arch:
            base = replace(base, in_channels=channels, num_classes=num_classes)
        # learn_sigma off: no loss here trains DiT's variance channels (FastGen's DiT configs have it off too).
        cfg = replace(base, learn_sigma=False, url="", file="", **switches)
        torch.manual_seed(args.seed)
        student = Precond(cfg)
    else:  # from scratch: the architecture of --arch, or the tiny config at the data's resolution
        base = module.CONFIGS[args.arch] if args.arch else replace(module.CONFIGS["tiny"], img_resolution=resolution, attn_resolutions=(resolution // 2,))  # fmt: skip
        if args.tiny or not args.arch:
            base = replace(base, img_channels=channels, label_dim=num_classes, augment_dim=0) if args.model in ("edm", "edm_rf") else replace(base, img_channels=channels, label_dim=num_classes)  # fmt: skip
        cfg = replace(base, **switches)
        torch.manual_seed(args.seed)
        student = Precond(cfg)
    use_labels = net_shape(cfg)[2] > 0 and not args.uncond and num_classes > 0
    distribution_matching = args.method in ("dmd2", "fdistill")
    # What a frozen copy switches off: method heads, dropout, label dropout (DiT/SiT have no dropout).
    frozen = dict(logvar_head=False, r_timestep=False, label_dropout=0.0) | ({} if is_dit else dict(dropout=0.0))
    teacher = None
    if args.cd or distribution_matching:
        if args.tiny or not args.teacher:
            teacher = Precond(replace(cfg, **frozen))
            # No pretrained teacher: a frozen copy of the initial student stands in (smoke tests and benchmarks).
            ref = teacher.state_dict()
            teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k in ref and v.shape == ref[k].shape}, strict=False)  # fmt: skip
        else:
            teacher = load_pretrained(module, args.teacher)
        teacher = teacher.to(device).eval().requires_grad_(False)
    stage1 = None
    if args.method == "tcm":
        args.ct_start_step = stage_one_step(args)  # ECT's gap schedule continues from stage one's last step
        if args.stage1:
            try:
                module.load_checkpoint(student, args.stage1, adapt=False)
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
                fail(f"cannot load the stage-one student: {e}", f"--stage1 {args.stage1}", "give the student.safetensors of a --method cm run on the same architecture")  # fmt: skip
        elif not args.tiny:
            fail("--method tcm trains stage two", "--stage1", "give --stage1 CKPT, a student trained with --method cm")
        stage1 = Precond(cfg)
        stage1.load_state_dict(student.state_dict())
        stage1 = stage1.to(device).train().requires_grad_(False)  # train mode: its dropout matches the student's
    student = student.to(device).train()
    if args.model == "edm2":
        edm2.forced_weight_normalization(student)
    # DMD2's critic: the fake score starts as a copy of the teacher; the GAN heads read the frozen teacher's features.
    fake = disc = None
    critic_params = []
    if distribution_matching:
        fake = Precond(replace(teacher.cfg, label_dropout=0.0, **({} if is_dit else dict(dropout=cfg.dropout))))
        fake.load_state_dict(teacher.state_dict())
        fake = fake.to(device).train()
        if args.model == "edm2":
            edm2.forced_weight_normalization(fake)
        critic_params = list(fake.parameters())
        if args.gan_weight > 0:
            # Default taps: EDM/EDM2's last encoder block of the lowest level; DiT/SiT's middle block (a guess, after
            # FastGen's Flux heads on the middle block).
            lowest = teacher.cfg.depth // 2 if is_dit else len(teacher.cfg.channel_mult) - 1
            indices = [int(i) for i in args.disc_features.split(",")] if args.disc_features else [lowest]
            with torch.no_grad():
                probe = torch.zeros(1, channels, resolution, resolution, device=device)
                maps = teacher.features(probe, torch.ones(1, device=device), None, indices)
            torch.manual_seed(rng_seed(args.seed, 3))
            disc = Discriminator(indices, [(m.shape[1], m.shape[-1]) for m in maps]).to(device).train()
            critic_params += list(disc.parameters())
    emas = {spec.replace("power:", "p"): Precond(cfg).to(device).eval().requires_grad_(False) for spec in args.ema.split(",") if spec}  # fmt: skip
    for ema in emas.values():
        ema.load_state_dict(student.state_dict())
    augment_labels = AugmentLabels()  # --augment: the labels ride with every network call of a step
    augment_labels.attach(student, teacher, stage1, fake)
    net = DDP(student, find_unused_parameters=True) if distributed else student
    fake_net = DDP(fake) if distributed and fake is not None else fake
    disc_net = DDP(disc) if distributed and disc is not None else disc
    bins = torch.ones(args.ratio_bins, device=device)  # f-distill's per-t-bin density-ratio means
    if master:
        print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters, method {args.method}")

    opt_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[args.optimizer]
    optimizer = opt_class(student.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay)  # fmt: skip
    critic_lr = args.critic_lr or args.lr
    critic_optimizer = opt_class(critic_params, lr=critic_lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=args.weight_decay) if critic_params else None  # fmt: skip
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    micro, accum = split_batch(args.batch_size, args.micro_batch, world)

    # What a checkpoint holds: every trained network and the state to continue exactly.
    networks = {"student": student, **{f"ema_{name}": ema for name, ema in emas.items()}}
    networks |= {name: m for name, m in (("fake_score", fake), ("discriminator", disc)) if m is not None}
    optimizers = {"optimizer": optimizer, "critic_optimizer": critic_optimizer, "scaler": scaler}
    optimizers = {name: o for name, o in optimizers.items() if o is not None}
    start = 0
    if ckpt:
        try:
            for name, network in networks.items():
                network.load_state_dict(load_file(os.path.join(ckpt, f"{name}.safetensors")))
            state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True, map_location=device)
            for name, o in optimizers.items():
                o.load_state_dict(state[name])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            fail(f"{ckpt} does not fit this run's networks: {str(e)[:300]}", "--resume", "resume with the flags the run was started with")  # fmt: skip
        bins.copy_(state["ratio_bins"])
        start = state["step"]
        if master:
            print(f"resumed from {ckpt} at step {start}")

    classifier = None
    if args.data == "toy" and master and args.eval_n and (args.eval_every or args.quality_report):
        import toy

        classifier = toy.load_classifier().to(device)
    claim_run_dir(args, master)  # every input has loaded: from here on the directory is this run's
    log = open_metrics(args.out_dir, start) if master else None
    wandb = None
    if args.wandb and master:
        import wandb

        wandb.init(project=args.wandb, config=vars(args))

    vae = None

    def viewable(x):
        """Samples as images for a grid: decoded by --vae (loaded at the first grid), else the first 3 channels."""
        nonlocal vae
        if not args.vae:
            return x[:, :3]
        if vae is None:
            from models import autoencoder_kl

            vae = autoencoder_kl.from_pretrained(args.vae, device=device)
        return torch.cat([vae.decode(chunk.to(device)).cpu() for chunk in x.split(16)])

    def eval_and_log(step):
        ema = next(iter(emas.values()), student)
        images, metrics = evaluate(ema, module, cfg, args, "student", args.student_steps, args.eval_n, device, classifier)  # fmt: skip
        Image.fromarray(to_grid(viewable(images[:64]))).save(
            os.path.join(args.out_dir, "samples", f"step_{step:07d}.png")
        )
        record = {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
        log.write(json.dumps(record) + "\n")
        return metrics

    if master and args.eval_every and start == 0:  # the first evaluation: the student as initialised
        eval_and_log(0)
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=not master, unit="step")
    skipped, bad_steps = 0, {"generator": 0, "critic": 0}  # updates skipped for a non-finite loss or gradient
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        # dmd2/fdistill alternate: a generator step every student_update_freq steps (counting from 1), critic steps
        # (fake score and GAN heads) in between. Every other method updates the student at every step.
        generator_step = not distribution_matching or (step + 1) % args.student_update_freq == 0
        for critic in (fake, disc):
            if critic is not None:
                critic.train(not generator_step).requires_grad_(not generator_step)
        trained = [net] if generator_step else [m for m in (fake_net, disc_net) if m is not None]
        tic = time.time()
        for m in range(accum):
            shard = rank * accum + m  # this micro-batch's place in the global batch
            x0, labels = batch_fn(step, shard, micro)
            x0 = x0.to(device)
            labels = labels.to(device) if use_labels and labels is not None else None
            if args.xflip:
                flip = torch.rand(len(x0), generator=torch.Generator().manual_seed(rng_seed(args.seed, step, shard, 1))) < 0.5  # fmt: skip
                x0 = torch.where(flip.to(device).reshape(-1, 1, 1, 1), x0.flip(3), x0)
            x0, augment = augment_batch(x0, args, step, shard)  # EDM's augmentation (--augment), labels or None
            torch.manual_seed(rng_seed(args.seed, step, shard, 2))  # noise and dropout: exact on resume
            with contextlib.ExitStack() as sync:  # all-reduce gradients on the last accumulation round only
                sync.enter_context(augment_labels.given(augment))
                if distributed and m < accum - 1:
                    for module_ddp in trained:
                        sync.enter_context(module_ddp.no_sync())
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if args.method == "sft":
                        loss, logs = sft_loss(net, x0, labels, args, module)
                    elif args.method == "cm":
                        loss, logs = cm_loss(net, student, teacher, x0, labels, step, args, module)
                    elif args.method == "tcm":
                        loss, logs = tcm_loss(net, student, stage1, teacher, x0, labels, step, args, module)
                    elif args.method == "scm":
                        loss, logs = scm_loss(net, student, teacher, x0, labels, step, args, module)
                    elif args.method == "meanflow":
                        loss, logs = meanflow_loss(net, student, teacher, x0, labels, step, args, module)
                    elif args.method == "kd":
                        loss, logs = kd_loss(net, x0, labels, args, module)
                    elif generator_step:
                        loss, logs = dmd2_generator_loss(net, teacher, fake, disc, x0, labels, args, module, bins)
                    else:
                        loss, logs = dmd2_critic_loss(student, teacher, fake_net, disc_net, x0, labels, args, module)
                scaler.scale(loss / accum).backward()
        active, params = (
            (optimizer, list(student.parameters())) if generator_step else (critic_optimizer, critic_params)
        )
        scaler.unscale_(active)
        # The student's gradient is clipped; the critic's is not (FastGen clips the student only). The norm is the
        # true one: a NaN or infinity anywhere in the gradient makes it non-finite.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if generator_step else math.inf)
        # A non-finite loss or gradient on any process: every process skips this update (under fp16 an overflowing
        # gradient with a finite loss is the scaler's to skip, and it lowers its scale).
        loss_finite, grad_finite = all_finite(loss), all_finite(grad_norm)
        step_taken = loss_finite and (grad_finite or scaler.is_enabled())
        kind = "generator" if generator_step else "critic"  # counted apart: a critic that stays NaN must stop too
        if step_taken:
            scaler.step(active)
            bad_steps[kind] = 0
        else:
            skipped, bad_steps[kind] = skipped + 1, bad_steps[kind] + 1
            steps = f"{kind} steps" if distribution_matching else "steps"
            if master:
                bar.write(f"step {step + 1}: non-finite {'loss' if not loss_finite else 'gradient'}, update skipped ({bad_steps[kind]} {steps} in a row)")  # fmt: skip
            if bad_steps[kind] >= args.max_skipped_steps:
                bar.close()
                last = checkpoints(args.out_dir)
                fail(f"{bad_steps[kind]} consecutive {steps} had a non-finite loss or gradient (up to step {step + 1})", "--max_skipped_steps", f"the run diverged: lower --lr and --resume from {last[-1] if last else 'a new run'}", code=1)  # fmt: skip
        scaler.update()
        active.zero_grad(set_to_none=True)
        if args.model == "edm2":  # keep every weight row at unit norm (EDM2 Eq. 66)
            edm2.forced_weight_normalization(student if generator_step else fake)
        with torch.no_grad():  # every step taken, critic steps included, as FastGen's EMA callback does
            for spec, ema in zip(args.ema.split(",") if step_taken else [], emas.values()):
                beta = ema_beta(
                    spec, step + 1 + (args.ct_start_step or 0)
                )  # tcm: power EMAs continue stage one's count
                for p_ema, p in zip(ema.parameters(), student.parameters()):
                    p_ema.lerp_(p.detach(), 1 - beta)
                for b_ema, b in zip(ema.buffers(), student.buffers()):
                    b_ema.copy_(b)

        step_done = step + 1
        if master:
            images_per_s = args.batch_size / (time.time() - tic)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_s:.0f}")
            record = {"step": step_done, "loss": loss.item(), "grad_norm": grad_norm.item(), "skipped": skipped, "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_per_s, **logs}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log(record, step=step_done)
            if args.eval_every and (step_done % args.eval_every == 0 or step_done == args.max_steps):
                metrics = eval_and_log(step_done)
                if metrics:
                    bar.write(f"step {step_done}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if args.save_every and (step_done % args.save_every == 0 or step_done == args.max_steps):
                state = {name: o.state_dict() for name, o in optimizers.items()} | {"ratio_bins": bins}
                tensors = {name: network.state_dict() for name, network in networks.items()}
                # the networks' Config rides in the metadata (sample.py builds them from it); the GAN heads are ours
                config = module.config_to_json(cfg)
                metadata = {name: {"step": str(step_done)} | ({"config": config} if name != "discriminator" else {}) for name in tensors}  # fmt: skip
                args_json = json.dumps(vars(args) | {"script": os.path.basename(__file__), "step": step_done}, indent=1)  # fmt: skip
                save_checkpoint(args.out_dir, step_done, tensors, metadata, state, args_json)
    if master:
        log.close()
        if args.quality_report and classifier is not None and teacher is not None:
            quality_report(args, next(iter(emas.values()), student), teacher, module, cfg, device, classifier)
        summary(args, emas)
    if distributed:
        dist.destroy_process_group()
    return student, emas


if __name__ == "__main__":
    main(parse_args())
