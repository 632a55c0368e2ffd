"""Sample from a teacher or a student: a PNG grid (and an .npz of uint8 images on request), and FID.

    python sample.py --model edm --tiny                                       # random tiny network, seconds on a CPU
    python download.py edm-cifar10-32x32-cond-vp
    python sample.py --model edm --ckpt edm-cifar10-32x32-cond-vp --steps 18  # EDM's Heun sampler, 35 evaluations
    python sample.py --model edm2 --ckpt edm2-img64-s-fid --class 88 --guidance 1.4 --n 16
    python sample.py --model edm --ckpt runs/dmd2/student.safetensors --sampler student --steps 1
    python download.py DiT-XL-2-256x256 && python download.py sd-vae-ft-mse
    python sample.py --model dit --ckpt DiT-XL-2-256x256 --steps 250 --guidance 4.0 --n 16   # DiT's ancestral sampler
    python sample.py --model sit --ckpt SiT-XL-2-256x256 --sampler heun --steps 50 --guidance 4.0
    python download.py inception && python download.py cifar10 && python download.py fid-ref cifar10
    torchrun --nproc_per_node=8 sample.py --model edm --ckpt edm-cifar10-32x32-cond-vp --fid 50000 --fid_ref cifar10

`--ckpt` is a name from the model file's CONFIGS (looked up under --root, where download.py writes it) or a
.safetensors file that carries its config in the metadata (what train_edm.py writes). A checkpoint that cannot be used
(damaged, of another family, weights with NaN or Inf) and any other bad input end with one line on stderr,
`error: <what> (<file or flag>): <fix>`, and exit code 2, before anything is written.

FID (`--fid N`): the N images are judged as they would be saved (uint8), by the FID Inception network
(models/inception.py), against reference statistics from `download.py fid-ref` (--fid_ref: a dataset name or an .npz with
`mu` and `sigma`). Image k uses seed --seed + k, as in EDM's generate.py; EDM's protocol is `--fid 50000` (its paper
reports the best of three such runs with different seeds). Under torchrun each process generates a contiguous share of the images and the
feature statistics are summed over processes; fid.json in --out_dir records the result.

Latent models (dit, sit) sample ImageNet SD-VAE latents; --vae (default sd-vae-ft-mse, DiT's choice; a Hub repo of
models/autoencoder_kl.py or a local folder) decodes them to images. DiT's ancestral `ddpm` sampler draws fresh noise at
every step from a generator seeded per batch, so its images also depend on --batch; every other sampler is
deterministic given the noise.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models import (  # fmt: skip
    autoencoder_kl,
    cogvideox,
    cogvideox_vae,
    cosmos_predict2,
    dit,
    edm,
    edm2,
    flux,
    inception,
    sd15,
    sdxl,
    wan,
    wan_vae,
)

# model name -> (model file, model class, its tiny config, samplers with the first as default)
MODELS = {
    "edm": (edm, edm.EDMPrecond, "tiny", ("heun", "euler", "student")),
    "edm2": (edm2, edm2.EDM2Precond, "tiny", ("heun", "euler", "student")),
    "dit": (dit, dit.DiT, "tiny", ("ddpm", "ddim", "student")),
    "sit": (dit, dit.DiT, "tiny-sit", ("heun", "euler", "student")),
}
LATENT = {"dit", "sit"}  # models of VAE latents, decoded with --vae


@dataclass(frozen=True)
class TextModel:
    """A text-conditioned family: its model file and class, autoencoder, encoders (encoders.py) and defaults."""

    module: object
    model_class: type
    vae: object  # the autoencoder's model file
    vae_class: type  # its network, for --tiny
    pipeline: str  # default Hub repo of the encoders and autoencoder (the teacher's)
    teacher: str  # the teacher's sampler
    steps: int
    guidance: float
    size: tuple  # default (height, width, frames); frames 0 for images
    tiny: dict  # tiny encoder widths, matching CONFIGS["tiny"]


TEXT_MODELS = {
    "flux": TextModel(flux, flux.FluxModel, autoencoder_kl, autoencoder_kl.AutoencoderKL, "black-forest-labs/FLUX.1-dev", "euler", 28, 3.5, (1024, 1024, 0), {"clip": 16, "t5": 32}),  # guidance: the distilled embedding
    "sd15": TextModel(sd15, sd15.UNet, autoencoder_kl, autoencoder_kl.AutoencoderKL, "stable-diffusion-v1-5/stable-diffusion-v1-5", "ddim", 50, 7.5, (512, 512, 0), {"clip": 32}),
    "sdxl": TextModel(sdxl, sdxl.UNet, autoencoder_kl, autoencoder_kl.AutoencoderKL, "stabilityai/stable-diffusion-xl-base-1.0", "euler", 50, 5.0, (1024, 1024, 0), {"clip": 32, "clip2": 32}),
    "wan": TextModel(wan, wan.WanModel, wan_vae, wan_vae.WanVAE, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "euler", 50, 5.0, (480, 832, 81), {"umt5": 32}),
    "cogvideox": TextModel(cogvideox, cogvideox.CogVideoXTransformer, cogvideox_vae, cogvideox_vae.AutoencoderKLCogVideoX, "THUDM/CogVideoX-2b", "ddim", 50, 6.0, (480, 720, 49), {"t5": 32}),
    "cosmos_predict2": TextModel(cosmos_predict2, cosmos_predict2.CosmosPredict2, wan_vae, wan_vae.WanVAE, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "euler", 35, 8.0, (704, 1280, 93), {"qwen": 20}),
}  # fmt: skip
TINY_TEXT = {
    "flux": "tiny",
    "sd15": "tiny",
    "sdxl": "tiny",
    "wan": "tiny",
    "cogvideox": "tiny-2b",
    "cosmos_predict2": "tiny",
}
DEFAULT_STEPS = {"heun": 18, "euler": 18, "student": 1, "ddpm": 250, "ddim": 50}  # EDM's 18, DiT's 250
# What a checkpoint that cannot be used raises from the model files: a missing or unreadable file, keys, shapes or
# values that do not fit, a Hub repo that cannot be fetched. `main` prints it as one line, without a traceback.
LOAD_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)


class InputError(Exception):
    """Bad input (a flag, a file): `main` prints `error: <message>` on stderr and exits with code 2."""


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=sorted(MODELS) + sorted(TEXT_MODELS), default="edm", help="model family")
parser.add_argument("--ckpt", default=None, help="CONFIGS name or checkpoint path (.safetensors; DiT/SiT also .pt); required unless --tiny")  # fmt: skip
parser.add_argument("--arch", default=None, help="dit/sit: the CONFIGS name of a checkpoint file that does not say (e.g. SiT-XL/2)")  # fmt: skip
parser.add_argument("--vae", default="sd-vae-ft-mse", help="dit/sit: the autoencoder that decodes latents (models/autoencoder_kl.py name, Hub repo or folder)")  # fmt: skip
parser.add_argument("--tiny", action="store_true", help="a tiny randomly initialised network: checks the code path (text models: with --ckpt, a tiny trained student and the tiny encoders)")  # fmt: skip
parser.add_argument("--root", default=None, help="checkpoint root for CONFIGS names (default $CKPT_ROOT_DIR or ./checkpoints)")  # fmt: skip
parser.add_argument("--sampler", choices=sorted(DEFAULT_STEPS) + ["teacher"], default=None,
                    help="heun: EDM Alg. 1 (teachers; default for edm, edm2, sit); euler: first-order ODE; student: x0 then re-noise (distilled students); dit: ddpm (ancestral, learned variance; its default) or ddim")  # fmt: skip
parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 18 for heun/euler, 250 for ddpm, 50 for ddim, 1 for student)")  # fmt: skip
parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = off (default 1; text models: the teacher's, e.g. 3.5 for Flux's guidance embedding, 7.5 SD1.5, 5 Wan; students: 1)")  # fmt: skip
parser.add_argument("--guided_channels", type=int, default=None,
                    help="dit/sit: guide only the first K latent channels; 3 reproduces the official samplers and their FIDs (default: all)")  # fmt: skip
parser.add_argument("--class", dest="class_label", type=int, default=None,
                    help="class index for every sample (default: random classes; ignored by unconditional models)")  # fmt: skip
parser.add_argument("--n", type=int, default=None, help="number of images (default 64); with --fid, how many of them the grid shows; text models: samples per prompt (default 1)")  # fmt: skip
parser.add_argument("--batch", type=int, default=64, help="images per network call")
parser.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k for its noise and class")
parser.add_argument(
    "--npz", action="store_true", help="also write samples.npz with uint8 images [N, H, W, C] and labels"
)
parser.add_argument("--fid", type=int, default=0, metavar="N",
                    help="generate N images (instead of --n) and report their FID against --fid_ref")  # fmt: skip
parser.add_argument("--fid_ref", default=None, metavar="NAME_OR_NPZ",
                    help=f"FID reference statistics: {', '.join(inception.REFS)} (written by `download.py fid-ref NAME` under --root) or an .npz with mu and sigma")  # fmt: skip
parser.add_argument("--inception", default=None, metavar="WEIGHTS",
                    help=f"FID Inception .safetensors (default: {inception.FILE} under --root, from `download.py inception`)")  # fmt: skip
parser.add_argument("--save_pairs", default=None, metavar="DIR",
                    help="instead of images, write --n (noise, teacher output) pairs for `train_edm.py --method kd --pairs DIR`: the Heun ODE solution of each noise, --batch pairs per shard; rerunning resumes")  # fmt: skip
parser.add_argument("--pair_states", type=int, default=1, metavar="P",
                    help="with --save_pairs: states of each trajectory kept, at the student times t_list(P) (1 = the noise; 4 for 2- and 4-step students)")  # fmt: skip
text = parser.add_argument_group("text-to-image and video models (flux, sd15, sdxl, wan, cogvideox, cosmos_predict2)")
text.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
text.add_argument("--prompt_file", default=None, help="prompts, one per line")
text.add_argument("--negative_prompt", default="", help="the unconditional prompt of classifier-free guidance")
text.add_argument("--pipeline", default=None, help="Hub repo or local folder of the text encoders and autoencoder (default: the teacher's repo)")  # fmt: skip
text.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
text.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
text.add_argument("--image", default=None, help="wan (an I2V checkpoint): the first frame to animate; cosmos_predict2: the frame Video2World continues")  # fmt: skip
text.add_argument("--video", default=None, help="wan (a VACE checkpoint): the source video to edit: a GIF, an MP4 (with imageio) or a folder of frames")  # fmt: skip
text.add_argument("--mask", default=None, help="wan VACE: where to regenerate (white) in --video, same format; default everywhere")  # fmt: skip
text.add_argument("--frames", type=int, default=None, help="video frames, 1 + 4k (default: the model's native length)")
text.add_argument(
    "--causal", action="store_true", help="wan: a causal student, generated chunk by chunk with a KV cache"
)
text.add_argument("--chunk_size", type=int, default=3, help="wan --causal: latent frames per chunk")
text.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights and activations of the denoiser and encoders")  # fmt: skip
parser.add_argument("--out_dir", default="out/samples", help="where samples.png (samples.npz, fid.json) are written")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


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


def load_fid_ref(name_or_path, root=None):
    """Reference mean (2048,) and covariance (2048, 2048), float64, from a REFS name or an .npz with mu and sigma."""
    path = name_or_path
    if name_or_path in inception.REFS:
        root = root or os.environ.get("CKPT_ROOT_DIR", "checkpoints")
        path = os.path.join(root, inception.REFS[name_or_path])
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found; compute it with `python download.py fid-ref {name_or_path} --root {root}` "
                f"(it needs `python download.py {name_or_path}` and `python download.py inception` first)"
            )
    elif not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found; --fid_ref takes {', '.join(inception.REFS)} or an .npz with mu and sigma, such as "
            f"`python download.py fid-ref DATASET --out {path}` writes"
        )
    with np.load(path) as ref:  # allow_pickle stays False: arrays only
        if "mu" not in ref or "sigma" not in ref:
            raise ValueError(f"{path} has {', '.join(ref.files)}; FID reference statistics have mu and sigma")
        mu, sigma = torch.from_numpy(ref["mu"]).double(), torch.from_numpy(ref["sigma"]).double()
    dim = inception.FEATURE_DIM
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}; expected ({dim},), ({dim}, {dim})")
    return mu, sigma, path


def teacher_trajectory(module, model, noise, labels, steps, guidance, states):
    """The teacher's Heun solution (EDM Alg. 1) from t_list(states)[0] down to 0, on a Karras grid of `steps` levels
    that also passes through every t_list(states) time. Returns the states there (B, states, C, H, W), the first
    being the scaled noise, and the output (B, C, H, W)."""
    marks = module.t_list(states)  # t_0 > ... > t_{P-1} > 0
    grid = module.karras_sigmas(steps, module.T_MIN, float(marks[0]))
    grid = torch.unique(torch.cat([grid, marks])).flip(0)  # descending, through every mark, ending at 0
    x, path = noise.double() * marks[0], []
    for t_from, t_to in zip(marks[:-1], marks[1:]):
        path.append(x.float())
        segment = grid[(grid <= t_from) & (grid >= t_to)]
        x = module.sample_heun(model, (x / t_from).float(), labels, guidance=guidance, times=segment).double()
    return torch.stack(path, dim=1), x.float()


def save_pairs(args, module, model, steps, device, rank, world):
    """Teacher pairs for knowledge distillation, in shards of --batch written atomically; shards already on disk are
    kept, so an interrupted run continues where it stopped. Pair k uses seed --seed + k, as the image samples do."""
    from safetensors.torch import save_file

    cfg, out = model.cfg, args.save_pairs
    settings = dict(model=args.model, ckpt="tiny" if args.tiny else args.ckpt, steps=steps, guidance=args.guidance,
                    seed=args.seed, n=args.n, shard_size=args.batch, states=args.pair_states,
                    times=module.t_list(args.pair_states)[:-1].tolist(), label_dim=cfg.label_dim,
                    class_label=args.class_label)  # fmt: skip
    index_file = os.path.join(out, "pairs.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            old = {k: v for k, v in json.load(f).items() if k != "shards"}
        if old != settings:
            raise InputError(f"{out} holds pairs made with other settings ({old}); choose another --save_pairs DIR")
    os.makedirs(out, exist_ok=True)
    if rank == 0 and not os.path.exists(index_file):  # the settings first, so that a resumed run can be checked
        with open(index_file + ".tmp", "w") as f:
            json.dump(settings | {"shards": []}, f, indent=1)
        os.replace(index_file + ".tmp", index_file)
    starts = list(range(0, args.n, args.batch))
    names = [f"pairs_{i:08d}.safetensors" for i in starts]
    mine = [(i, name) for j, (i, name) in enumerate(zip(starts, names)) if j % world == rank]
    todo = [(i, name) for i, name in mine if not os.path.exists(os.path.join(out, name))]
    for i, name in tqdm(todo, unit="shard", desc=f"teacher pairs ({len(mine) - len(todo)} of {len(mine)} on disk)", disable=rank != 0):  # fmt: skip
        gens = [torch.Generator().manual_seed(args.seed + k) for k in range(i, min(i + args.batch, args.n))]
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        labels = torch.zeros(len(gens), dtype=torch.long)
        if cfg.label_dim:
            labels = torch.full((len(gens),), args.class_label) if args.class_label is not None else torch.cat([torch.randint(cfg.label_dim, (1,), generator=g) for g in gens])  # fmt: skip
        states, x0 = teacher_trajectory(module, model, noise, labels.to(device) if cfg.label_dim else None, steps, args.guidance, args.pair_states)  # fmt: skip
        tmp = os.path.join(out, name + ".tmp")
        save_file({"states": states.cpu().contiguous(), "x0": x0.cpu().contiguous(), "labels": labels}, tmp)
        os.replace(tmp, os.path.join(out, name))
    if world > 1:
        dist.barrier()
    if rank == 0:
        with open(index_file + ".tmp", "w") as f:
            json.dump(settings | {"shards": names}, f, indent=1)
        os.replace(index_file + ".tmp", index_file)
        print(f"wrote {args.n} teacher pairs ({args.pair_states} states each) to {out}")


def generate(args, module, model, noise, y, steps, device, seed):
    """One batch from --sampler: images for pixel models, latents for dit/sit."""
    guide = dict(guidance=args.guidance)
    if args.guided_channels is not None:
        guide["guided_channels"] = args.guided_channels
    if args.sampler == "ddpm":
        generator = torch.Generator(device).manual_seed(seed)
        return module.sample_ddpm(model, noise, y, steps=steps, generator=generator, **guide)
    if args.sampler == "ddim":
        return module.sample_ddim(model, noise, y, steps=steps, **guide)
    if args.sampler == "heun":
        return module.sample_heun(model, noise, y, steps=steps, **guide)
    if args.sampler == "euler":
        return module.sample_euler(model, noise, y, steps=steps, **guide)
    return module.sample_student(model, noise, y, steps=steps, **guide)


def main(argv=None):
    """Parse `argv` (a list, or an already parsed Namespace) and sample; bad input ends with one line on stderr,
    `error: <what>`, and exit code 2, before anything is written."""
    args = argv if isinstance(argv, argparse.Namespace) else parser.parse_args(argv)
    try:
        if args.model in TEXT_MODELS:
            return main_text(args)
        return main_image(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def safetensors_metadata(path):
    """The metadata of a .safetensors file ({} without any); a file that is not readable safetensors is an InputError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e}) (--ckpt): it is truncated or damaged; write or download it again") from e  # fmt: skip


def checkpoint_families(path):
    """The --model names a .safetensors checkpoint belongs to, read from its metadata: the Config a training script
    recorded (`config`), or the CONFIGS name download.py recorded (`name`). Empty when the metadata says neither."""
    meta = safetensors_metadata(path)
    modules = {m: spec[0] for m, spec in MODELS.items()} | {m: spec.module for m, spec in TEXT_MODELS.items()}
    if "name" in meta:
        found = [m for m, module in modules.items() if meta["name"] in module.CONFIGS]
        schedule = getattr(dit.CONFIGS.get(meta["name"]), "schedule", None)
    elif "config" in meta:
        try:
            fields = json.loads(meta["config"])
        except ValueError as e:
            raise InputError(f"{path} has a config in its metadata that is not JSON ({e}) (--ckpt): the file is damaged") from e  # fmt: skip
        if not isinstance(fields, dict):
            return []
        names = {m: {f.name for f in dataclasses.fields(module.Config)} for m, module in modules.items()}
        found = [m for m in modules if set(fields) == names[m]] or [m for m in modules if set(fields) <= names[m]]
        schedule = fields.get("schedule")
    else:
        return []
    if "dit" in found:  # DiT and SiT share a file: the schedule tells them apart
        found = [m for m in found if m not in ("dit", "sit")] + ["sit" if schedule == "rf" else "dit"]
    return found


def check_family(args):
    """A .safetensors --ckpt of another model family is an InputError that names the family and its --model."""
    if not (args.ckpt and args.ckpt.endswith(".safetensors") and os.path.isfile(args.ckpt)):
        return
    found = checkpoint_families(args.ckpt)
    if set(found) <= LATENT and args.model in LATENT:  # DiT for SiT or the reverse: told apart once it is built
        return
    if found and args.model not in found:
        raise InputError(
            f"{args.ckpt} holds a checkpoint of {' or '.join(found)}, not {args.model} (--model): "
            f"sample it with --model {found[0]}"
        )


def main_image(args):
    args.guidance = 1.0 if args.guidance is None else args.guidance
    args.n = 64 if args.n is None else args.n
    # Distributed setup: torchrun sets these; a plain `python` run is one process.
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    master = rank == 0

    module, model_class, tiny, samplers = MODELS[args.model]
    args.sampler = args.sampler or samplers[0]
    if args.sampler not in samplers:
        raise InputError(f"--model {args.model} samples with {', '.join(samplers)}, not {args.sampler}")
    if args.fid and args.fid_ref is None:
        raise InputError(f"--fid needs --fid_ref: {', '.join(inception.REFS)} or an .npz with mu and sigma")
    if args.guided_channels is not None and args.sampler not in ("ddpm", "ddim"):
        raise InputError("--guided_channels applies to DiT's ddpm and ddim samplers (the others guide every channel)")
    if args.save_pairs and args.model in LATENT:
        raise InputError("--save_pairs writes teacher pairs for train_edm.py's EDM models (edm, edm2)")
    vae = None
    if not args.tiny:
        check_family(args)
    try:
        if args.tiny:
            torch.manual_seed(args.seed)
            model = model_class(module.CONFIGS[tiny]).eval()
            if args.model in LATENT:  # a random tiny autoencoder: checks the decode path
                vae = autoencoder_kl.AutoencoderKL(autoencoder_kl.CONFIGS["tiny"]).eval().to(device)
        elif args.ckpt is None:
            raise InputError("give --ckpt NAME_OR_PATH (a CONFIGS name or a checkpoint file), or --tiny")
        elif args.model in LATENT:
            model = module.from_pretrained(args.ckpt, config=args.arch, root=args.root)
            want = "rf" if args.model == "sit" else "ddpm"
            if model.cfg.schedule != want:
                raise InputError(f"{args.ckpt} is a {'SiT' if want == 'ddpm' else 'DiT'} checkpoint; use --model {'sit' if want == 'ddpm' else 'dit'}")  # fmt: skip
            vae = autoencoder_kl.from_pretrained(args.vae, device=device)
        else:
            model = module.from_pretrained(args.ckpt, root=args.root)
        if args.fid:  # before sampling: a missing file should not cost a sampling run
            ref_mu, ref_sigma, ref_path = load_fid_ref(args.fid_ref, args.root)
            detector = inception.from_pretrained(args.inception, root=args.root, device=device)
            stats = inception.FeatureStats(device=device)
    except LOAD_ERRORS as e:
        raise InputError(str(e)) from e
    model = model.to(device)
    cfg = model.cfg
    steps = args.steps or DEFAULT_STEPS[args.sampler]
    if args.model in LATENT:
        shape, classes = (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.num_classes
    else:
        shape, classes = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution), cfg.label_dim
    if args.class_label is not None and not 0 <= args.class_label < max(classes, 1):
        raise InputError(f"--class {args.class_label} is out of range; this model has {classes} classes")

    if args.save_pairs:
        if args.sampler != "heun" or args.fid:
            raise InputError("--save_pairs solves the teacher's ODE with Heun; drop --sampler/--fid")
        save_pairs(args, module, model, steps, device, rank, world)
        if distributed:
            dist.destroy_process_group()
        return

    # This process's images: a contiguous share of 0..n-1, so that rank 0 holds the first ones (the grid).
    n = args.fid or args.n
    first, last = rank * n // world, (rank + 1) * n // world
    images, labels = [], []
    start = time.time()
    bar = tqdm(range(first, last, args.batch), unit="batch", desc=f"{args.model} {args.sampler} x{steps}", disable=not master)  # fmt: skip
    for i in bar:
        # Image k draws its noise (and class) from seed `--seed + k`, as EDM's generate.py: results do not depend on
        # --batch or the number of processes, and any subset of images can be regenerated alone.
        gens = [torch.Generator().manual_seed(args.seed + k) for k in range(i, min(i + args.batch, last))]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        y = None
        if classes:
            if args.class_label is not None:
                y = torch.full((len(gens),), args.class_label)
            else:
                y = torch.cat([torch.randint(classes, (1,), generator=g) for g in gens])
            labels.append(y)
            y = y.to(device)
        x = generate(args, module, model, noise, y, steps, device, seed=args.seed + i)
        if vae is not None:
            with torch.no_grad():
                x = vae.decode(x.to(next(vae.parameters()).dtype))  # latents -> images in [-1, 1]
        batch = to_uint8(x)  # (B, H, W, C): what a saved PNG would hold
        if args.fid:
            with torch.no_grad():
                stats.update(detector(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)))
        images.append(batch if args.npz else batch[: max(args.n - (i - first), 0)])  # the grid needs the first --n
    images = np.concatenate(images) if images else None  # None: this process had no images (n < processes)
    labels = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)

    if distributed:
        shares = [None] * world if master else None
        dist.gather_object((images, labels), shares, dst=0)
        if master:
            images, labels = (np.concatenate([p for p in parts if p is not None]) for parts in zip(*shares))
        if args.fid:
            for total in (stats.n, stats.total, stats.gram):
                dist.all_reduce(total)
    elapsed = time.time() - start

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        grid = image_grid(images[: args.n])
        png = os.path.join(args.out_dir, "samples.png")
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(png)
        print(f"wrote {png}: {n} images in {elapsed:.1f} s ({n / elapsed:.1f} images/s)")
        if args.npz:
            npz = os.path.join(args.out_dir, "samples.npz")
            np.savez(npz, images=images, labels=labels)
            print(f"wrote {npz}")
        if args.fid:
            mu, sigma = stats.mean_cov()
            fid = inception.frechet_distance(mu.cpu(), sigma.cpu(), ref_mu, ref_sigma)
            print(f"FID {fid:.4f} ({n} images against {ref_path})")
            record = dict(fid=fid, n=n, ref=ref_path, model=args.model, ckpt="tiny" if args.tiny else args.ckpt,
                          sampler=args.sampler, steps=steps, guidance=args.guidance, seed=args.seed,
                          class_label=args.class_label)  # fmt: skip
            path = os.path.join(args.out_dir, "fid.json")
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file
            print(f"wrote {path}")
    if distributed:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Text-to-image and text-to-video models


def load_text_model(args, spec, device, dtype):
    """(denoiser, autoencoder, text encoder) of --model: tiny random ones, or --ckpt with --pipeline's encoders."""
    from encoders import TextEncoder

    module = spec.module
    if args.tiny:
        torch.manual_seed(args.seed)
        tiny = "tiny-i2v" if args.model == "wan" and args.image else TINY_TEXT[args.model]
        cfg = module.CONFIGS[tiny]
        if args.model == "wan" and args.video:  # VACE control: 2 x 4 latent channels of the tiny VAE + 8 x 8 mask
            cfg = replace(module.CONFIGS["tiny-vace"], vace_in_channels=2 * wan_vae.CONFIGS["tiny"].z_dim + 64)
        model = spec.model_class(cfg).eval()
        if args.ckpt:  # a tiny network a training script wrote (--tiny runs): its weights, the tiny encoders
            model = module.from_pretrained(args.ckpt, config=trained_config(module, args.ckpt)).eval()
        vae_cfg = spec.vae.CONFIGS["tiny"]
        if args.model == "flux":  # Flux's autoencoder has 16 latent channels
            vae_cfg = replace(vae_cfg, latent_channels=flux.LATENT_CHANNELS)
        vae = spec.vae_class(vae_cfg).eval()
        encoder = TextEncoder(encoder_family(args.model), tiny=spec.tiny, device=device)
        return model.to(device, dtype), vae.to(device), encoder
    if args.ckpt is None:
        raise InputError("give --ckpt (a CONFIGS name, Hub repo, folder or trained .safetensors), or --tiny")
    config = (
        trained_config(module, args.ckpt) if args.ckpt.endswith(".safetensors") and os.path.isfile(args.ckpt) else None
    )
    model = module.from_pretrained(args.ckpt, config=config, device=device, dtype=dtype)
    pipeline = args.pipeline or getattr(module.CONFIGS.get(args.ckpt), "repo", None) or spec.pipeline
    if args.model == "cosmos_predict2":  # the Wan 2.1 autoencoder and Cosmos-Reason1 from their own repos
        vae, encoder = wan_vae.from_pretrained(args.pipeline or "wan2.1", device=device), TextEncoder("cosmos", None, device=device, dtype=dtype)  # fmt: skip
    else:
        vae = spec.vae.from_pretrained(pipeline, device=device)
        encoder = TextEncoder(args.model, pipeline, device=device, dtype=dtype)
    return model, vae, encoder


def encoder_family(model):
    """encoders.py's name for a --model's text encoders."""
    return "cosmos" if model == "cosmos_predict2" else model


def trained_config(module, path):
    """The architecture a training script recorded in a checkpoint's metadata (its Config as JSON), or None."""
    text = safetensors_metadata(path).get("config")
    if text is None:
        return None
    try:
        fields = json.loads(text)
        return module.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{path} records a config this model file cannot build ({e}) (--ckpt): check --model") from e  # fmt: skip


def vae_factors(vae):
    """(time, space) downsampling of an autoencoder: space 2 per level after the first, time 4 for the video ones."""
    levels = len(getattr(vae.cfg, "block_out_channels", None) or vae.cfg.dim_mult)
    return (1 if isinstance(vae, autoencoder_kl.AutoencoderKL) else 4), 2 ** (levels - 1)


def image_condition(args, model, vae, image, frames, device):
    """--image as the network's extra inputs: Wan I2V's CLIP image tokens and mask + first-frame latents (the VAE
    latents of the clip [image, zeros, ...]), or Cosmos' given first latent frame."""
    from encoders import ImageEncoder

    if args.model == "cosmos_predict2":
        return {"cond_latents": vae.encode(image[:, :, None], sample=False)}
    if not model.cfg.image_dim:
        raise InputError("--image needs a Wan I2V checkpoint (wan2.1-i2v-14b-480p or -720p)")
    clip = torch.cat([image[:, :, None], torch.zeros_like(image)[:, :, None].expand(-1, -1, frames - 1, -1, -1)], 2)
    if args.tiny:
        encoder = ImageEncoder(tiny=model.cfg.image_dim, device=device)
    else:
        encoder = ImageEncoder(args.pipeline or getattr(wan.CONFIGS.get(args.ckpt), "repo", None), device=device)
    return {"image_latents": wan.i2v_latents(vae.encode(clip, sample=False)), "image_tokens": encoder(image)}


def read_frames(path, count, height, width, grey=False):
    """Frames of a GIF, an MP4 (through imageio, if installed), a folder of images or (a mask) one image, resized: (1, 3, count, H, W)
    in [-1, 1], or with `grey` a binary mask (1, 1, count, H, W), 1 where the pixel is brighter than mid-grey."""
    mode = "L" if grey else "RGB"
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        frames = [Image.open(os.path.join(path, f)).convert(mode) for f in names]
    elif path.lower().endswith(".gif"):
        from PIL import ImageSequence

        frames = [f.convert(mode) for f in ImageSequence.Iterator(Image.open(path))]
    elif path.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):  # one still image
        frames = [Image.open(path).convert(mode)]
    else:
        try:
            import imageio.v3 as iio  # MP4 and other containers
        except ImportError:
            raise InputError(f"reading {path} needs imageio (pip install imageio imageio-ffmpeg); or pass a GIF or a folder of frames") from None  # fmt: skip
        frames = [Image.fromarray(f).convert(mode) for f in iio.imread(path)]
    if grey and len(frames) == 1:  # a still mask holds for every frame (GIF writers also merge identical frames)
        frames = frames * count
    if len(frames) < count:
        raise InputError(f"{path} has {len(frames)} frames; the video needs {count} (set --frames)")
    arrays = [np.asarray(f.resize((width, height), Image.BICUBIC)) for f in frames[:count]]
    x = torch.from_numpy(np.stack(arrays)).float()
    if grey:
        return (x > 127).float()[None, None]
    return x.permute(3, 0, 1, 2)[None].div(127.5).sub(1)


def generate_text(args, spec, model, noise, cond, uncond, steps, generator, pixels, extra, on_chunk=None):
    """One batch of latents from --model's teacher sampler or its few-step student sampler; `pixels`: (height, width)
    of the images, SDXL's micro-conditioning; `extra`: image conditioning (Wan I2V, Cosmos Video2World); `on_chunk`:
    called with each finished chunk of a causal rollout."""
    m, g, student = args.model, args.guidance, args.sampler == "student"
    if m == "flux":
        if student:
            return flux.sample_student(model, noise, cond["text"], cond["pooled"], steps=steps, guidance=g, generator=generator)  # fmt: skip
        return flux.sample_euler(model, noise, cond["text"], cond["pooled"], steps=steps, guidance=g)
    if m in ("sd15", "sdxl"):
        module = spec.module
        if m == "sdxl":
            time_ids = sdxl.add_time_ids(pixels, (0, 0), pixels, batch=len(noise), device=noise.device)
            cond, uncond = dict(cond, time_ids=time_ids), dict(uncond, time_ids=time_ids)
        if student:
            return module.sample_student(model, noise, cond, uncond, steps=steps, guidance=g, generator=generator)
        sampler = module.sample_ddim if spec.teacher == "ddim" else module.sample_euler
        return sampler(model, noise, cond, uncond, steps=steps, guidance=g)
    if m == "wan":
        if args.causal:
            return wan.causal_sample(model, noise, cond["text"], times=wan.t_list(steps), chunk_size=args.chunk_size,
                                     neg_text=uncond["text"], guidance=g, generator=generator, on_chunk=on_chunk, **extra)  # fmt: skip
        if student:
            return wan.sample_student(model, noise, cond["text"], times=wan.t_list(steps), neg_text=uncond["text"], guidance=g, generator=generator, **extra)  # fmt: skip
        return wan.sample_euler(model, noise, cond["text"], uncond["text"], steps=steps, guidance=g, **extra)
    if m == "cogvideox":
        if student:
            return cogvideox.sample_student(model, noise, cond["text"], steps=steps, negative_text=uncond["text"], guidance=g, generator=generator)  # fmt: skip
        return cogvideox.sample_ddim(model, noise, cond["text"], uncond["text"], steps=steps, guidance=g)
    if student:
        return cosmos_predict2.sample_student(model, noise, cond["text"], steps=steps, neg_text_embeds=uncond["text"], guidance=g, generator=generator)  # fmt: skip
    return cosmos_predict2.sample_euler(model, noise, cond["text"], uncond["text"], steps=steps, guidance=g, **extra)


def write_video(frames, path_stem, fps=16):
    """uint8 frames (T, H, W, C): MP4 through imageio (with its ffmpeg plugin) when installed, else an animated GIF
    and one PNG per frame in <stem>_frames/. Returns the path written."""
    try:
        import imageio.v3 as iio

        iio.imwrite(path_stem + ".mp4", frames, fps=fps, codec="libx264")
        return path_stem + ".mp4"
    except Exception:  # imageio or its ffmpeg backend missing: an animated GIF (PIL always writes it) and the frames
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path_stem + ".gif", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        os.makedirs(path_stem + "_frames", exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(path_stem + "_frames", f"{i:04d}.png"))
        return path_stem + ".gif"


def main_text(args):
    spec = TEXT_MODELS[args.model]
    if args.sampler not in (None, "teacher", "student"):
        raise InputError(f"--model {args.model} samples with teacher (its {spec.teacher}) or student")
    if args.fid or args.save_pairs or args.npz:
        raise InputError("--fid, --save_pairs and --npz are for the class-conditional models")
    if args.mask and not args.video:
        raise InputError("--mask marks the part of --video to regenerate; give --video too")
    if args.image and (args.model not in ("wan", "cosmos_predict2") or (args.model == "cosmos_predict2" and args.sampler == "student")):  # fmt: skip
        raise InputError("--image conditions Wan I2V models and the Cosmos teacher (Video2World)")
    if args.causal and (args.model != "wan" or args.sampler == "teacher"):
        raise InputError("--causal samples a causal Wan student: --model wan --sampler student")
    args.sampler = "student" if args.causal else args.sampler or "teacher"
    student = args.sampler == "student"
    args.guidance = (1.0 if student else spec.guidance) if args.guidance is None else args.guidance
    steps = args.steps or (4 if student else spec.steps)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {args.prompt_file} as text ({e}) (--prompt_file): give a UTF-8 file of prompts, one per line") from e  # fmt: skip
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompt_file FILE")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    check_family(args)
    try:
        model, vae, encoder = load_text_model(args, spec, device, dtype)
    except LOAD_ERRORS as e:
        raise InputError(str(e)) from e

    height, width, frames = spec.size
    if args.tiny:
        height = width = 8 * vae_factors(vae)[1]
        frames = 1 + 4 * 2 if frames else 0
    height, width = args.height or height, args.width or width
    frames = args.frames or frames
    t_factor, s_factor = vae_factors(vae)
    if height % (2 * s_factor) or width % (2 * s_factor):
        raise InputError(f"--height and --width must be multiples of {2 * s_factor} for this model")
    if frames and (frames - 1) % 4:
        raise InputError("--frames must be 1 + 4k (1, 5, 9, ..., 81)")
    channels = flux.LATENT_CHANNELS if args.model == "flux" else model.cfg.out_channels  # I2V inputs carry more
    shape = (channels, height // s_factor, width // s_factor)
    if frames:
        shape = (channels, 1 + (frames - 1) // t_factor) + shape[1:]

    extra = {}
    if args.video:
        if args.model != "wan" or not model.cfg.vace_layers:
            raise InputError("--video needs a Wan VACE checkpoint (wan2.1-vace-1.3b or -14b)")
        video = read_frames(args.video, frames, height, width)
        mask = read_frames(args.mask, frames, height, width, grey=True) if args.mask else torch.ones_like(video[:, :1])
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():  # the kept part and the part to regenerate, each through the VAE
            kept, redo = (vae.encode((v * m).to(device, vae_dtype), sample=False) for v, m in ((video, 1 - mask), (video, mask)))  # fmt: skip
        extra = {"control": wan.vace_control(kept, redo, mask.to(device, kept.dtype))}
    if args.image:
        if not frames:
            raise InputError("--image needs a video model")
        picture = Image.open(args.image).convert("RGB").resize((width, height), Image.BICUBIC)
        image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1)
        with torch.no_grad():
            extra = image_condition(args, model, vae, image.to(device, next(vae.parameters()).dtype), frames, device)

    os.makedirs(args.out_dir, exist_ok=True)
    start, began, chunk_times, images = time.time(), None, [], []  # when the first rollout began, its chunks ended
    per_prompt = args.n or 1
    with torch.no_grad():
        for k, prompt in enumerate(tqdm(prompts, unit="prompt", desc=f"{args.model} {args.sampler} x{steps}")):
            cond = {key: v.to(device, dtype) for key, v in encoder([prompt] * per_prompt).items()}
            uncond = {key: v.to(device, dtype) for key, v in encoder([args.negative_prompt] * per_prompt).items()}
            gens = [torch.Generator().manual_seed(args.seed + k * per_prompt + j) for j in range(per_prompt)]
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
            generator = torch.Generator(device).manual_seed(args.seed + k)
            batch_extra = {k: v.to(device, dtype).expand(per_prompt, *v.shape[1:]) for k, v in extra.items()}
            began = began or time.time()
            latents = generate_text(args, spec, model, noise, cond, uncond, steps, generator, (height, width), batch_extra, lambda *_: chunk_times.append(time.time()))  # fmt: skip
            decoded = vae.decode(latents.to(next(vae.parameters()).dtype))  # [-1, 1]
            images.append(decoded.float().cpu())
    elapsed = time.time() - start
    x = torch.cat(images)
    if frames:  # (N, C, T, H, W): one grid per frame
        video = np.stack([image_grid(to_uint8(x[:, :, i])) for i in range(x.shape[2])])
        path = write_video(video, os.path.join(args.out_dir, "samples"))
        Image.fromarray(video[0]).save(os.path.join(args.out_dir, "samples.png"))
        latency = f"; first chunk's latents after {chunk_times[0] - began:.2f} s" if chunk_times else ""
        print(f"wrote {path} and samples.png: {len(x)} videos of {x.shape[2]} frames in {elapsed:.1f} s "
              f"({len(x) * x.shape[2] / elapsed:.2f} frames/s{latency})")  # fmt: skip
    else:
        png = os.path.join(args.out_dir, "samples.png")
        Image.fromarray(image_grid(to_uint8(x))).save(png)
        print(f"wrote {png}: {len(x)} images in {elapsed:.1f} s")
    with open(os.path.join(args.out_dir, "prompts.json"), "w") as f:
        json.dump(dict(prompts=prompts, model=args.model, ckpt="tiny" if args.tiny else args.ckpt, sampler=args.sampler,
                       steps=steps, guidance=args.guidance, seed=args.seed, height=height, width=width, frames=frames), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
