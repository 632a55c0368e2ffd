"""Write tests/fixtures/fastgen_configs.json, the FastGen experiment-config values that tests/test_presets.py compares the
presets with, from a flattened dump of FastGen's configs.

    python tests/generate/make_fastgen_configs.py PATH/fastgen_presets.json

The input is every `fastgen/configs/experiments/<Family>/config_*.py` of NVlabs/FastGen at commit 34f30e8, each built
by FastGen's own create_config() in a fresh process and flattened (the project's reference/fastgen_presets.json). The
output keeps, per config, only the fields the presets set, in the scripts' units and names: the method as this
project names it, lr and Adam settings, lr schedule, global and per-GPU batch, iterations, gradient clip, the EMAs a
callback really updates (a constant beta as "0.9999", a power EMA as "power:GAMMA"), the autocast dtype, dropout,
the training-time t sampler, student steps and t list, guidance, GAN, critic, R1, f-divergence, fake score,
consistency, TCM and MeanFlow settings, augmentation.
"""

import json
import sys

METHODS = {"SFTModel": "sft", "CausalSFTModel": "sft", "CMModel": "cm", "SCMModel": "scm", "TCMModel": "tcm",
           "MeanFlowModel": "meanflow", "DMD2Model": "dmd2", "FdistillModel": "fdistill", "KDModel": "kd",
           "CausVidModel": "causvid", "SelfForcingModel": "self_forcing", "LADDModel": "ladd"}  # fmt: skip
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def ema_specs(entry):
    specs = []
    for e in entry.get("ema") or []:
        if not e.get("updated_by_callback"):
            continue
        specs.append(f"power:{e['gamma']}" if e["type"] == "power" else str(e["beta"]))
    return ",".join(specs)


def values(entry):
    out = {
        "method": METHODS[entry["method"]],
        "optimizer": entry["optimizer"],
        "lr": entry["lr"],
        "beta1": entry["betas"][0],
        "beta2": entry["betas"][1],
        "weight_decay": entry["weight_decay"],
        "adam_eps": entry["eps"],
        "warmup_steps": entry.get("lr_warmup_steps") or 0,
        "lr_decay_steps": entry.get("lr_decay_steps") or 0,
        "batch_global": entry.get("batch_size_global"),
        "batch_per_gpu": entry["batch_size_per_gpu"],
        "max_steps": entry["max_iter"],
        "grad_clip": float(entry.get("grad_clip_norm", float("inf"))),  # absent: no clipping
        "ema": ema_specs(entry),
        "precision": PRECISION[entry.get("precision_amp") or entry["precision"]],
        "t_sampler": entry["t_sampler"]["type"],
        "t_min": entry["t_sampler"]["min_t"],
        "t_max": entry["t_sampler"]["max_t"],
        "student_steps": entry["student_sample_steps"],
        "student_sample_type": entry["student_sample_type"],
    }
    if out["t_sampler"] in ("lognormal", "logitnormal", "log_t"):
        out |= {"p_mean": entry["t_sampler"]["P_mean"], "p_std": entry["t_sampler"]["P_std"]}
    if out["t_sampler"] == "shifted":
        out["shift"] = entry["t_sampler"]["shift"]
    if entry.get("t_list"):
        out["t_list"] = entry["t_list"]
    if "dropout" in entry:
        out["dropout"] = entry["dropout"]
    if entry.get("dropout_resolutions"):
        out["dropout_resolutions"] = entry["dropout_resolutions"]
    if out["method"] == "sft" and entry.get("cond_dropout_prob"):
        out["cond_dropout"] = entry["cond_dropout_prob"]
    guidance = entry.get("guidance_scale") or entry.get("net_guidance_scale")
    if guidance is not None:
        out["guidance"] = guidance
    if entry.get("guidance_applies_to"):
        out["guidance_applies_to"] = entry["guidance_applies_to"]
    if out["method"] in ("dmd2", "fdistill", "causvid", "self_forcing", "ladd"):
        out |= {
            "gan_weight": entry.get("gan_loss_weight_gen") or 0.0,
            "disc_features": entry.get("discriminator_feature_indices_effective"),
            "gan_same_t_noise": entry.get("gan_use_same_t_noise"),
            "student_update_freq": entry["student_update_freq"],
            "r1_weight": entry["r1_weight"],
            "r1_alpha": entry["r1_alpha"],
            "critic_lr": entry.get("fake_score_lr") or entry.get("discriminator_lr"),
            "fake_score_pred_type": entry.get("fake_score_pred_type") or entry["net_pred_type"],  # unset: native
        }
    if out["method"] == "fdistill":
        f = entry["f_distill"]
        out |= {"f_div": f["f_div"], "ratio_ema": f["ratio_ema_rate"], "ratio_lower": f["ratio_lower"],
                "ratio_upper": f["ratio_upper"], "ratio_bins": f["bin_num"] if f["ratio_normalization"] else 0}  # fmt: skip
    if entry.get("ct_schedule"):
        ct = entry["ct_schedule"]
        out |= {"ct_q": float(ct["q"]), "ct_kimg_per_stage": ct["kimg_per_stage"], "ct_ratio_limit": ct["ratio_limit"]}
    if out["method"] in ("cm", "tcm", "scm", "meanflow"):
        out["cd"] = entry["loss_config"]["use_cd"]
    if out["method"] in ("cm", "tcm"):
        out |= {"huber_c": entry["huber_const"], "cm_weighting": entry["weighting_ct_loss"]}
    if entry.get("tcm"):
        out |= {k: entry["tcm"][k] for k in ("transition_t", "boundary_prob", "w_boundary")}
    if out["method"] == "scm":
        out["tangent_warmup_steps"] = entry["tangent_warmup_steps"]
    if out["method"] == "meanflow":
        mf, r = entry["meanflow"], entry["r_sampler"]
        r = r if r.get("enabled") else entry["t_sampler"]
        p = float(entry["norm_method"].split("_")[1])
        out |= {"r_p_mean": r["P_mean"], "r_p_std": r["P_std"], "r_ratio": mf["r_sample_ratio"], "mf_norm_p": p,
                "mf_norm_c": entry["norm_const"], "mf_cond_dropout": mf["cond_dropout_prob"] or 0.0,
                "mf_guidance": mf["guidance_scale_w"], "mf_kappa": mf["guidance_mixture_ratio_kappa"],
                "mf_t_start": mf["guidance_t_start"], "mf_t_end": mf["guidance_t_end"],
                "schedule": entry["schedule_type"], "precond": entry.get("drop_precond") is None}  # fmt: skip
    if entry.get("augment_pipe"):
        pipe = entry["augment_pipe"]
        names = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac", "brightness", "contrast",
                 "lumaflip", "hue", "saturation")  # fmt: skip
        out |= {"augment": ",".join(n for n in names if pipe.get(n)), "augment_p": pipe["p"]}
    out["xflip"] = bool(entry["raw"].get("dataloader_train.xflip", False))
    if entry.get("is_video2world"):
        out["cond_frames"] = entry["num_conditioning_frames"]
    return out


def main(path):
    with open(path) as f:
        configs = json.load(f)
    table = {"_source": "NVlabs/FastGen commit 34f30e8, fastgen/configs/experiments (built by create_config)"}
    table |= {name: values(entry) for name, entry in configs.items() if not name.startswith("QwenImage/")}
    with open("tests/fixtures/fastgen_configs.json", "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
