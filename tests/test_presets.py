"""Every preset of the four training scripts against the FastGen experiment config it reproduces, value by value.

The FastGen values come from tests/fixtures/fastgen_configs.json (NVlabs/FastGen commit 34f30e8, written by
tests/generate/make_fastgen_configs.py). Each preset is resolved by its script's parse_args, without loading anything,
and mapped to the same fields in the same units. A field may differ only where the row gives a reason (README's
"Presets vs FastGen" lists them); a reason on a field that agrees fails too, so the table cannot go stale.

Batch: FastGen's global batch where its config fixes one; where it sets only a per-GPU batch, --micro_batch is that
batch and --batch_size that batch on 8 GPUs (train_wan_causal: --batch_size 0, one micro-batch per process).
"""

import inspect
import json
import math
import os

import pytest
import torch

import train_edm
import train_flux
import train_video
import train_wan_causal
from models import cogvideox, cosmos_predict2, dit, edm, edm2, wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "fixtures", "fastgen_configs.json")) as f:
    FASTGEN = json.load(f)
MODULES = {"wan": wan, "cogvideox": cogvideox, "cosmos": cosmos_predict2}
GPUS = 8  # the node a per-GPU-only FastGen batch is converted for

# ----------------------------------------------------------------------------
# Our resolved values, in FastGen's field names and units.


def resolve(script, name):
    """The preset's flags through the script's parse_args, from a clean slate of argparse defaults (parse_args sets
    the preset as parser defaults, which would otherwise leak into the next preset)."""
    parser = script.parser
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    try:
        return script.parse_args(["--preset", name])
    finally:
        parser.set_defaults(**defaults)


def common(args):
    return {
        "method": args.method,
        "lr": args.lr,
        "beta1": args.beta1,
        "beta2": args.beta2,
        "weight_decay": args.weight_decay,
        "max_steps": args.max_steps,
        "grad_clip": args.grad_clip,
        "ema": ",".join(s if s.startswith("power:") else str(float(s)) for s in args.ema.split(",") if s),
        "precision": args.precision,
        "batch": (args.batch_size, args.micro_batch),
    }


def distill(args, critic_lr, disc, pred_type="x0"):
    return {
        "gan_weight": args.gan_weight,
        "disc_features": disc,
        "gan_same_t_noise": args.gan_same_t_noise,
        "student_update_freq": args.student_update_freq,
        "critic_lr": critic_lr,
        "fake_score_pred_type": pred_type,
    }


def ours_edm(args):
    out = common(args) | {
        "optimizer": args.optimizer,
        "adam_eps": args.adam_eps,
        "warmup_steps": args.warmup_steps,
        "lr_decay_steps": args.lr_decay_steps,
        "t_sampler": args.t_sampler,
        "p_mean": args.p_mean,
        "p_std": args.p_std,
        "student_steps": args.student_steps,
        "student_sample_type": "ode" if args.method == "meanflow" else "sde",
        "xflip": args.xflip,
        "cd": args.cd,
        "r1_weight": args.r1_weight,
        "r1_alpha": args.r1_alpha,
        "f_div": args.f_div,
        "ratio_ema": args.ratio_ema,
        "ratio_lower": args.ratio_lower,
        "ratio_upper": args.ratio_upper,
        "ratio_bins": args.ratio_bins,
        "ct_q": args.ct_q,
        "ct_kimg_per_stage": args.ct_kimg_per_stage,
        "ct_ratio_limit": args.ct_ratio_limit,
        "huber_c": args.huber_c,
        "cm_weighting": args.cm_weighting,
        "transition_t": args.transition_t,
        "boundary_prob": args.boundary_prob,
        "w_boundary": args.w_boundary,
        "tangent_warmup_steps": args.tangent_warmup_steps,
        "r_p_mean": args.r_p_mean,
        "r_p_std": args.r_p_std,
        "r_ratio": args.r_ratio,
        "mf_norm_p": args.mf_norm_p,
        "mf_norm_c": args.mf_norm_c,
        "mf_cond_dropout": args.mf_cond_dropout,
        "mf_guidance": args.mf_guidance,
        "mf_kappa": args.mf_kappa,
        "mf_t_start": args.mf_t_start,
        "mf_t_end": args.mf_t_end,
        "augment": args.augment or None,
        "augment_p": args.augment_p if args.augment else None,
    }
    if args.model in ("edm", "edm_rf", "edm2"):
        out["t_max"] = args.t_max
        module = edm2 if args.model == "edm2" else edm
        cfg = module.CONFIGS[args.teacher or args.arch]
        out["dropout"] = cfg.dropout if args.dropout is None else args.dropout
        res = [int(r) for r in args.dropout_resolutions.split(",")] if args.dropout_resolutions else None
        out["dropout_resolutions"] = res
        if args.model == "edm":
            out["t_list"] = [round(float(t), 4) for t in edm.t_list(args.student_steps)]
        out["schedule"], out["precond"] = "edm", True
        if args.model == "edm_rf":  # the raw network in rectified-flow time; times on the command line are sigmas
            out["t_min"] = train_edm.native_time(torch.tensor(train_edm.MODELS["edm_rf"][0].T_MIN), "rf").item()
            out["t_max"] = train_edm.native_time(torch.tensor(args.t_max), "rf").item()
            # MeanFlow's loss is FastGen's rectified-flow one only with --native_weighting (train_edm.meanflow_loss)
            native = args.method != "meanflow" or args.native_weighting
            out["schedule"], out["precond"] = ("rf" if native else "rf, loss in EDM noise levels"), False
        lowest = len(cfg.channel_mult) - 1
    else:
        cfg = dit.CONFIGS[args.teacher or args.arch]
        out["schedule"], out["precond"] = ("rf" if args.model == "sit" else "sd"), True
        lowest = cfg.depth // 2
    if args.method == "sft":
        out["cond_dropout"] = args.label_dropout or None
    out["guidance"] = args.guidance  # teacher CFG of --cd targets and dmd2; the grids sample unguided
    if args.method == "meanflow" and args.t_sampler == "lognormal":  # in sigma: logit-normal in rf time (meanflow_loss)
        out["t_sampler"] = "logitnormal"
        out["guidance"] = args.mf_guidance
    if args.method in ("dmd2", "fdistill"):
        disc = [int(i) for i in args.disc_features.split(",")] if args.disc_features else [lowest]
        out |= distill(args, args.critic_lr or args.lr, disc)
    return out


def ours_flux(args):
    sd = args.model != "flux"
    scale = 1000.0 if sd else 1.0  # SD timesteps [1, 999] are FastGen's [0.001, 0.999]
    out = common(args) | {
        "optimizer": "adamw",
        "adam_eps": 1e-8,
        "warmup_steps": 0,
        "lr_decay_steps": 0,
        "t_sampler": args.t_sampler,
        "t_min": args.t_min / scale,
        "t_max": args.t_max / scale,
        "student_steps": args.eval_steps or args.student_steps,
        "student_sample_type": "sde",
        "guidance": args.guidance,
        "cond_dropout": args.cond_dropout or None,
        "r1_weight": args.r1_weight,
        "r1_alpha": args.r1_alpha,
        "f_div": args.f_div,
        "ratio_ema": args.ratio_ema,
        "ratio_lower": args.ratio_lower,
        "ratio_upper": args.ratio_upper,
        "ratio_bins": args.ratio_bins,
    }
    if args.t_sampler == "logitnormal":
        out |= {"p_mean": args.p_mean, "p_std": args.p_std}
    if args.method in ("dmd2", "fdistill", "ladd"):
        n_blocks = 19 + 38 if not sd else (5 if args.model == "sd15" else 4)
        default = n_blocks // 2 if not sd else n_blocks - 1  # train_flux's default head: Flux's middle, SD's mid block
        disc = [int(i) for i in args.disc_features.split(",")] if args.disc_features else [default]
        pred = "x0" if args.fake_score_pred_type == "x0" else {"flux": "flow"}.get(args.model, "eps")
        out |= distill(args, args.critic_lr or args.lr, disc, pred)
    return out


def ours_video(args):
    scale = 1000.0 if args.model == "cogvideox" else 1.0
    out = common(args) | {
        "optimizer": "adamw",
        "adam_eps": 1e-8,
        "warmup_steps": 0,
        "lr_decay_steps": 0,
        "t_sampler": args.t_sampler,
        "shift": args.shift if args.t_sampler == "shifted" else None,
        "student_steps": args.student_steps,
        "student_sample_type": args.student_sample_type,
        "guidance": args.guidance,
        "cond_dropout": args.cond_dropout or None,
        "cond_frames": args.cond_frames or None,
    }
    if args.t_list:
        out["t_list"] = [float(t) / scale for t in args.t_list.split(",")]
    sample_t = inspect.signature(MODULES[args.model].sample_t).parameters  # the model file's default range
    out["t_min"] = (sample_t["t_min"].default if args.t_min is None else args.t_min) / scale
    out["t_max"] = (sample_t["t_max"].default if args.t_max is None else args.t_max) / scale
    if args.method == "dmd2":
        disc = [int(i) for i in args.disc_blocks.split(",")] if args.disc_blocks else None
        out |= distill(args, args.critic_lr or args.lr, disc)
    return out


def ours_causal(args):
    out = common(args) | {
        "optimizer": "adamw",
        "adam_eps": args.adam_eps,
        "warmup_steps": args.warmup_steps,
        "lr_decay_steps": 0,
        "t_sampler": args.t_sampler,
        "t_min": args.t_min,
        "t_max": args.t_max,
        "shift": args.shift if args.t_sampler == "shifted" else None,
        "t_list": args.t_list_values,
        "student_steps": len(args.t_list_values) - 1,
        "student_sample_type": "sde",
        "guidance": args.guidance,
        "cond_dropout": args.cond_dropout or None,
    }
    if args.method in ("causvid", "self_forcing"):
        disc = [int(i) for i in args.disc_blocks.split(",")] if args.disc_blocks else None
        out |= distill(args, args.critic_lr or args.lr, disc)
    return out


def theirs(key):
    v = dict(FASTGEN[key])
    v["batch"] = (v.pop("batch_global"), v.pop("batch_per_gpu"))
    v.pop("guidance_applies_to", None)
    return v


# ----------------------------------------------------------------------------
# The table: script, preset, FastGen config, and the reason of each field that deliberately differs.

EDM_T_LIST = "1-step student at t_list(1) = [79.56, 0] (FastGen's default Karras grid, methods.md Q8), not [80, 0]"
SIT_SAMPLING_CFG = "FastGen's CFG here is sampling-time only (grids); the training loss is unguided in both"
CAUSAL_STEPS = "FastGen's grids sample with 50 steps; the causal student here always samples on its 4-step t_list"

# fmt: off
ROWS = [
    # train_edm.py: EDM
    (train_edm, "sft-cifar10", "EDM/config_sft_edm_cifar10", {}),
    (train_edm, "sft-imagenet64", "EDM/config_sft_edm_in64", {}),
    (train_edm, "cm-cifar10", "EDM/config_cm_cifar10", {}),
    (train_edm, "cm-cifar10-fast", "EDM/config_cm_cifar10_fast", {}),
    (train_edm, "cm-imagenet64", "EDM/config_cm_in64", {}),
    (train_edm, "sct-cifar10", "EDM/config_sct_cifar10", {"t_list": EDM_T_LIST}),
    (train_edm, "scd-cifar10", "EDM/config_scd_cifar10", {}),
    (train_edm, "scd-imagenet64", "EDM/config_scd_in64", {}),
    (train_edm, "tcm-cifar10", "EDM/config_tcm_cifar10", {}),
    (train_edm, "meanflow-cifar10", "EDM/config_mf_cifar10", {}),
    (train_edm, "dmd2-cifar10", "EDM/config_dmd2_cifar10", {}),
    (train_edm, "fdistill-cifar10", "EDM/config_f_distill_cifar10", {}),
    (train_edm, "dmd2-imagenet64", "EDM/config_dmd2_in64", {}),
    (train_edm, "fdistill-imagenet64", "EDM/config_f_distill_in64", {}),
    # train_edm.py: EDM2
    (train_edm, "sft-imagenet64-edm2", "EDM2/config_sft_s", {}),
    (train_edm, "sft-imagenet64-edm2-xl", "EDM2/config_sft_xl", {}),
    (train_edm, "cm-imagenet64-edm2", "EDM2/config_cm_s", {}),
    (train_edm, "cm-imagenet64-edm2-xl", "EDM2/config_cm_xl", {}),
    (train_edm, "scm-imagenet64-edm2-xl", "EDM2/config_scm_xl", {}),
    (train_edm, "tcm-imagenet64-edm2", "EDM2/config_tcm_s", {}),
    (train_edm, "tcm-imagenet64-edm2-xl", "EDM2/config_tcm_xl", {}),
    # train_edm.py: DiT / SiT
    (train_edm, "sft-dit-xl", "DiT/config_sft_dit_xl", {}),
    (train_edm, "sft-sit-xl", "DiT/config_sft_sit_xl", {"guidance": SIT_SAMPLING_CFG}),
    (train_edm, "meanflow-sit-b", "DiT/config_mf_b", {}),
    (train_edm, "meanflow-sit-xl", "DiT/config_mf_xl", {}),
    # train_flux.py
    (train_flux, "dmd2-flux", "Flux/config_dmd2", {}),
    (train_flux, "sft-flux", "Flux/config_sft", {}),
    (train_flux, "dmd2-sd15", "SD15/config_dmd2", {}),
    (train_flux, "fdistill-sd15", "SD15/config_f_distill", {}),
    (train_flux, "sft-sd15", "SD15/config_sft", {}),
    (train_flux, "dmd2-sdxl", "SDXL/config_dmd2", {}),
    (train_flux, "fdistill-sdxl", "SDXL/config_f_distill", {}),
    (train_flux, "kd-sdxl", "SDXL/config_kd", {}),
    (train_flux, "sft-sdxl", "SDXL/config_sft", {}),
    # train_video.py
    (train_video, "sft-wan-t2v-1.3b", "WanT2V/config_sft", {}),
    (train_video, "sft-wan-t2v-14b", "WanT2V/config_sft_14b", {}),
    (train_video, "kd-wan-t2v-1.3b", "WanT2V/config_kd", {}),
    (train_video, "kd-wan-t2v-1.3b-4step", "WanT2V/config_kd_path", {}),
    (train_video, "dmd2-wan-t2v-1.3b", "WanT2V/config_dmd2", {}),
    (train_video, "dmd2-wan-t2v-14b", "WanT2V/config_dmd2_14b", {}),
    (train_video, "sft-wan-i2v-14b", "WanI2V/config_sft_14b", {}),
    (train_video, "dmd2-wan-i2v-14b", "WanI2V/config_dmd2_14b", {}),
    (train_video, "sft-wan-vace-1.3b", "WanV2V/config_sft", {}),
    (train_video, "sft-wan-vace-14b", "WanV2V/config_sft_14b", {}),
    (train_video, "dmd2-wan-vace-1.3b", "WanV2V/config_dmd2", {}),
    (train_video, "sft-cogvideox-5b", "CogVideoX/config_sft", {}),
    (train_video, "kd-cogvideox-2b", "CogVideoX/config_kd", {}),
    (train_video, "dmd2-cogvideox-5b", "CogVideoX/config_dmd2", {}),
    (train_video, "sft-cosmos-2b", "CosmosPredict2/config_sft", {}),
    (train_video, "sft-cosmos-14b", "CosmosPredict2/config_sft_14b", {}),
    (train_video, "sft-cosmos-2b-v2w", "CosmosPredict2/config_sft_v2w", {}),
    (train_video, "dmd2-cosmos-2b", "CosmosPredict2/config_dmd2", {}),
    (train_video, "dmd2-cosmos-14b", "CosmosPredict2/config_dmd2_14b", {}),
    (train_video, "dmd2-cosmos-2b-v2w", "CosmosPredict2/config_dmd2_v2w", {}),
    # train_wan_causal.py
    (train_wan_causal, "sft-causal-wan1.3b", "WanT2V/config_sft_causal", {"student_steps": CAUSAL_STEPS}),
    (train_wan_causal, "sft-causal-wan14b", "WanT2V/config_sft_causal_14b", {"student_steps": CAUSAL_STEPS}),
    # A causal student on teacher ODE pairs: FastGen's CausalKD is broken (methods.md Q9) and its README points to
    # config_kd_path, whose student is bidirectional; the recipe's values are that config's.
    (train_wan_causal, "kd-causal-wan1.3b", "WanT2V/config_kd_path", {}),
    (train_wan_causal, "causvid-wan1.3b", "WanT2V/config_causvid", {}),
    (train_wan_causal, "self-forcing-wan1.3b", "WanT2V/config_sf", {}),
    (train_wan_causal, "self-forcing-wan14b", "WanT2V/config_sf_14b", {}),
]
# fmt: on
OURS = {train_edm: ours_edm, train_flux: ours_flux, train_video: ours_video, train_wan_causal: ours_causal}
# The project's own presets, with no FastGen counterpart.
OWN = {train_edm: {"toy", "cm-toy", "fdistill-toy"}}
# FastGen configs without a preset, and why.
WITHOUT_PRESET = {
    "QwenImage/*": "no Qwen-Image model file (and FastGen's two configs do not build)",
    "WanT2V/config_dmd2_wan22_5b": "no Wan 2.2 model file",
    "WanI2V/config_dmd2_wan22_5b": "no Wan 2.2 model file",
    "WanI2V/config_sft_wan22_5b": "no Wan 2.2 model file",
    "WanI2V/config_sft_causal_wan22_5b": "no Wan 2.2 model file",
    "WanI2V/config_sft_causal_14b": "train_wan_causal has no I2V conditioning",
    "WanV2V/config_sf": "train_wan_causal has no VACE conditioning",
    "WanV2V/config_sft_causal": "train_wan_causal has no VACE conditioning",
    "WanT2V/config_fdistill": "train_video has no fdistill method",
    "WanT2V/config_ladd": "train_video has no ladd method",
    "WanT2V/config_mf": "train_video has no meanflow method",
    "CogVideoX/config_sft_5b": "the same recipe as config_sft (5B) with 1 clip per GPU: sft-cogvideox-5b --micro_batch 1",
    "EDM/config_dmd2_test": "FastGen's smoke test",
}


def same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) or (math.isinf(a) and math.isinf(b))
    return a == b


def batch_matches(script, ours, fastgen):
    (size, micro), (global_batch, per_gpu) = ours, fastgen
    if global_batch is not None:  # FastGen fixes the global batch; a micro-batch, if given, is its per-GPU one
        return size == global_batch and micro in (0, per_gpu)
    if script is train_wan_causal:  # --batch_size 0: one micro-batch per process, global = micro x GPUs
        return size == 0 and micro == per_gpu
    return micro == per_gpu and size == per_gpu * GPUS


@pytest.mark.parametrize("script, preset, config, reasons", ROWS, ids=[f"{s.__name__}:{p}" for s, p, _, _ in ROWS])
def test_preset_matches_its_fastgen_config(script, preset, config, reasons):
    ours, fastgen = OURS[script](resolve(script, preset)), theirs(config)
    if ours["method"] == "kd":  # kd draws no training t
        for key in ("t_sampler", "t_min", "t_max", "p_mean", "p_std", "shift"):
            fastgen.pop(key, None)
    compared, wrong, stale = [], [], []
    for key, value in fastgen.items():
        if key not in ours or ours[key] is None and value is None:
            continue
        if key == "batch":
            ok = batch_matches(script, ours[key], value)
        else:
            ok = same(ours[key], value)
        compared.append(key)
        if not ok and key not in reasons:
            wrong.append(f"{key}: ours {ours[key]!r}, FastGen {value!r}")
        if ok and key in reasons:
            stale.append(key)
    assert not wrong, f"{preset} vs {config}:\n  " + "\n  ".join(wrong)
    assert not stale, f"{preset}: reasons given for fields that agree with FastGen: {stale}"
    assert set(reasons) <= set(compared), f"{preset}: reasons for fields not compared: {set(reasons) - set(compared)}"
    for key in ("method", "lr", "max_steps", "batch", "ema", "precision"):
        assert key in compared


def test_every_preset_has_a_row():
    rows = {(s, p) for s, p, _, _ in ROWS}
    for script in OURS:
        for name in script.PRESETS:
            assert (script, name) in rows or name in OWN.get(script, set()), (
                f"{script.__name__} preset {name} has no row"
            )


def test_every_fastgen_config_has_a_preset_or_a_reason():
    covered = {c for _, _, c, _ in ROWS}
    for name in FASTGEN:
        if name.startswith("_"):
            continue
        assert name in covered or name in WITHOUT_PRESET or name.split("/")[0] + "/*" in WITHOUT_PRESET, name


def test_presets_name_only_known_flags():
    for script in OURS:
        dests = {a.dest for a in script.parser._actions}
        for name, preset in script.PRESETS.items():
            assert set(preset) <= dests, f"{script.__name__} {name}: {set(preset) - dests}"
