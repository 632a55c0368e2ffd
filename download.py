"""Fetch checkpoints and data for nanofastgen, and turn NVIDIA's EDM/EDM2 pickles into safetensors safely.

The official EDM (NVlabs/edm) and EDM2 (NVlabs/edm2) networks are published as Python pickles that carry
their own source code: unpickling them the usual way imports `torch_utils`/`dnnlib` and `exec`s that code.
Here they are read by a restricted unpickler that knows a short list of globals (tensor rebuilding,
OrderedDict, a stub for `torch_utils.persistence`), refuses every other one, and never executes anything
from the file. The network's parameters and persistent buffers are written out as a flat safetensors
state dict with exactly the keys `state_dict()` of the real network would give (FastGen's layout:
`model.*` for EDM, `unet.*` / `logvar_*` for EDM2, 0-dim gains as shape [1]).

    python download.py --list                                   # every known name, size, source, destination
    python download.py edm-cifar10-32x32-cond-vp                # -> $CKPT_ROOT_DIR/cifar10/edm-cifar10-32x32-cond-vp.safetensors
    python download.py edm2-img64-s-fid --root /data/ckpt       # -> /data/ckpt/imagenet-64/edm2-img64-s-fid.safetensors
    python download.py cifar10                                  # -> cifar10/cifar10-32x32.zip (EDM dataset_tool layout)
    python download.py inception                                # -> inception/pt_inception-2015-12-05.safetensors (FID)
    python download.py fid-ref cifar10                          # -> fid-refs/cifar10-32x32.npz, FID reference statistics
    python download.py fid-ref datasets/img64.zip --out refs/img64.npz   # any EDM-style zip or folder of PNGs
    python download.py convert network-snapshot.pkl out.safetensors   # convert a local pickle, no network
    python download.py DiT-XL-2-256x256                         # -> imagenet-256/DiT-XL-2-256x256.pt, keys checked
    python download.py sd-vae-ft-mse                            # a Hub repo, into the Hugging Face cache
    python download.py imagenet-latents /data/imagenet/train    # -> datasets/imagenet256-latents, DiT's VAE latents
    python download.py video-latents videos/ --model wan --out latents/   # latent shards for train_video.py --data
    HF_TOKEN=hf_... python download.py flux-dev                 # gated: accept the licence on the model page first

Downloads resume (HTTP Range) into `<source file name>.part` next to the destination (`.part.json` records the size
and ETag it started from: a file changed on the server starts over), are checked against the sha256 in the table below
when one is known (otherwise the digest is printed and recorded in `<destination>.sha256`, and used to check later
downloads), EDM/EDM2 networks also against the keys and shapes of their name's architecture before anything is written
or recorded, and every output is written atomically. Pickles are read without running their code and may not declare
more tensor bytes than they hold. Bad input ends with one line, `error: ...`, and exit code 2.
`fid-ref` runs the FID Inception network (models/inception.py) over every image of a dataset and writes the mean and
covariance of its features as an .npz with `mu` and `sigma`, the format of EDM's fid-refs.
`video-latents` encodes a folder of videos (GIFs, MP4s through imageio, sub-folders of frame images; captions in
NAME.txt) with the family's VAE into the latent shards train_video.py and train_wan_causal.py read (`latents` (N, C, T,
H, W), metadata `prompts`); shards are written atomically and skipped on a rerun, which must use the same settings.
`--root` defaults to $CKPT_ROOT_DIR, else ./checkpoints. Hugging Face Hub repos (the `hub` names of --list) go
through `hub_download`, which honours HF_HOME, HF_HUB_OFFLINE=1, LOCAL_FILES_ONLY=true and HF_TOKEN; only the files the
models read are fetched (full-precision safetensors and configs, not the fp16/.bin/.ckpt copies), into the Hugging Face
cache where the model files' `from_pretrained(NAME)` look, except the seed's Cosmos and Self-Forcing folders.
"""

import argparse
import collections
import contextlib
import hashlib
import http.client
import io
import json
import os
import pickle
import re
import socket
import struct
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from models import cogvideox_vae, cosmos_predict2, dit, edm, edm2, inception, wan, wan_vae

# -----------------------------------------------------------------------------
# What can be fetched. Sizes are approximate: the pickles' from parameter counts (EDM fp32, EDM2 fp16).


@dataclass(frozen=True)
class Entry:
    url: str
    dest: str  # relative to --root
    sha256: str | None  # of the downloaded file; None = not published anywhere we could find
    size: str  # approximate download size, for --list
    kind: str  # "edm-pickle" | "state-dict" (the FID Inception .pth) | "dit" (a DiT/SiT .pt, kept as is) | "dataset"
    sha256_prefix: str = ""  # the digest's first hex digits, where only those are published


EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"

# Digests: NVIDIA publishes no sha256 or md5 for the EDM/EDM2 pickles. The two in the table were recorded
# by independent users of the files in public GitHub notes (found by searching for the file names):
# uncond-vp in two unrelated projects (an ECT reproduction's launch scripts and a CIFAR-10 "steering"
# notebook's README), edm2-img64-s in one (the same ECT reproduction's ImageNet-64 provenance note).
# The CIFAR-10 digest is the one Keras verifies (keras-team/keras, keras/src/datasets/cifar10.py);
# the page https://www.cs.toronto.edu/~kriz/cifar.html publishes md5 c58f30108f718f92721af3b95e74349a.
# The FID Inception weights follow torch.hub's naming, `<name>-<first 8 hex digits of the sha256>.pth`: those 8 digits
# are checked, and the full digest of the first download is recorded like an unknown one.
# fmt: off
CHECKPOINTS = {
    "edm-cifar10-32x32-cond-vp":   Entry(url=EDM_URL + "edm-cifar10-32x32-cond-vp.pkl",      dest="cifar10/edm-cifar10-32x32-cond-vp.safetensors",       sha256=None, size="~225 MB", kind="edm-pickle"),
    "edm-cifar10-32x32-uncond-vp": Entry(url=EDM_URL + "edm-cifar10-32x32-uncond-vp.pkl",    dest="cifar10/edm-cifar10-32x32-uncond-vp.safetensors",     sha256="4d5dcc1f1d0d41c8934ad21626eeddbdc0460182becf9fc059a0631b1eedb4da", size="~225 MB", kind="edm-pickle"),
    "edm-cifar10-32x32-cond-ve":   Entry(url=EDM_URL + "edm-cifar10-32x32-cond-ve.pkl",      dest="cifar10/edm-cifar10-32x32-cond-ve.safetensors",       sha256=None, size="~225 MB", kind="edm-pickle"),
    "edm-cifar10-32x32-uncond-ve": Entry(url=EDM_URL + "edm-cifar10-32x32-uncond-ve.pkl",    dest="cifar10/edm-cifar10-32x32-uncond-ve.safetensors",     sha256=None, size="~225 MB", kind="edm-pickle"),
    "edm-imagenet-64x64-cond-adm": Entry(url=EDM_URL + "edm-imagenet-64x64-cond-adm.pkl",    dest="imagenet-64/edm-imagenet-64x64-cond-adm.safetensors", sha256=None, size="~1.2 GB", kind="edm-pickle"),
    "edm2-img64-s-fid":            Entry(url=EDM2_URL + "edm2-img64-s-1073741-0.075.pkl",    dest="imagenet-64/edm2-img64-s-fid.safetensors",            sha256="044f4aeb819b2a4164b796a5f4944c4fadca5d789a13b7a72ddc079a7c7fc434", size="~560 MB", kind="edm-pickle"),
    "edm2-img64-m-fid":            Entry(url=EDM2_URL + "edm2-img64-m-2147483-0.060.pkl",    dest="imagenet-64/edm2-img64-m-fid.safetensors",            sha256=None, size="~1.0 GB", kind="edm-pickle"),
    "edm2-img64-l-fid":            Entry(url=EDM2_URL + "edm2-img64-l-1073741-0.040.pkl",    dest="imagenet-64/edm2-img64-l-fid.safetensors",            sha256=None, size="~1.6 GB", kind="edm-pickle"),
    "edm2-img64-xl-fid":           Entry(url=EDM2_URL + "edm2-img64-xl-0671088-0.040.pkl",   dest="imagenet-64/edm2-img64-xl-fid.safetensors",           sha256=None, size="~2.2 GB", kind="edm-pickle"),
    "cifar10":                     Entry(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", dest="cifar10/cifar10-32x32.zip", sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", size="170 MB", kind="dataset"),
    "inception":                   Entry(url=inception.URL, dest=inception.FILE, sha256=None, sha256_prefix="6726825d", size="~95 MB", kind="state-dict"),
    # DiT and SiT: plain state dicts, kept as released at the seed's paths (checked on arrival, loaded weights_only).
    "DiT-XL-2-256x256":            Entry(url=dit.CONFIGS["DiT-XL-2-256x256"].url, dest=dit.CONFIGS["DiT-XL-2-256x256"].file, sha256=None, size="~2.7 GB", kind="dit"),
    "DiT-XL-2-512x512":            Entry(url=dit.CONFIGS["DiT-XL-2-512x512"].url, dest=dit.CONFIGS["DiT-XL-2-512x512"].file, sha256=None, size="~2.7 GB", kind="dit"),
    "SiT-XL-2-256x256":            Entry(url=dit.CONFIGS["SiT-XL-2-256x256"].url, dest=dit.CONFIGS["SiT-XL-2-256x256"].file, sha256=None, size="~2.7 GB", kind="dit"),
}
# fmt: on


@dataclass(frozen=True)
class HubEntry:
    repo: str
    patterns: tuple  # the files of the repo that the models need (snapshot_download allow_patterns)
    size: str  # approximate, for --list
    local_dir: str = ""  # relative to --root; "" = the Hugging Face cache, where from_pretrained finds Hub repos
    gated: bool = False  # accept the licence on the model page and set HF_TOKEN


def diffusers_folder(folder):
    """A diffusers model folder: config.json and the fp32/bf16 weights (one file or sharded), no fp16/.bin variants."""
    prefix = f"{folder}/" if folder else ""
    weights = "diffusion_pytorch_model"
    return (prefix + "config.json", f"{prefix}{weights}.safetensors", f"{prefix}{weights}.safetensors.index.json", f"{prefix}{weights}-*.safetensors")  # fmt: skip


def transformers_folder(folder):
    """A transformers model folder (text or image encoder), or a tokenizer / processor folder (every file)."""
    if folder.startswith(("tokenizer", "image_processor", "scheduler")):
        return (f"{folder}/*",)
    return (f"{folder}/config.json", f"{folder}/model.safetensors", f"{folder}/model.safetensors.index.json", f"{folder}/model-*.safetensors")  # fmt: skip


def pipeline(*folders):
    return sum((diffusers_folder(f) if f in ("unet", "vae", "transformer") else transformers_folder(f) for f in folders), ())  # fmt: skip


TEXT_TO_IMAGE = ("scheduler", "text_encoder", "tokenizer")
SDXL_LIKE = TEXT_TO_IMAGE + ("text_encoder_2", "tokenizer_2")
WAN = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
# Hub repos (the seed's ids), fetched into the Hugging Face cache with only the files the models read. Sizes are
# approximate totals of those files from their parameter counts and stored precision; "?" where the precision of the
# stored files is not known here.
# fmt: off
HUB = {
    "sd15":                 HubEntry("stable-diffusion-v1-5/stable-diffusion-v1-5", pipeline("unet", "vae", *TEXT_TO_IMAGE), "~4.3 GB"),  # runwayml/stable-diffusion-v1-5's copy
    "sdxl":                 HubEntry("stabilityai/stable-diffusion-xl-base-1.0", pipeline("unet", "vae", *SDXL_LIKE), "~14 GB"),
    "sd-vae-ft-mse":        HubEntry("stabilityai/sd-vae-ft-mse", diffusers_folder(""), "~335 MB"),  # DiT's and SiT's autoencoder
    "sd-vae-ft-ema":        HubEntry("stabilityai/sd-vae-ft-ema", diffusers_folder(""), "~335 MB"),
    "flux-dev":             HubEntry("black-forest-labs/FLUX.1-dev", pipeline("transformer", "vae", *SDXL_LIKE), "~34 GB", gated=True),
    "flux-schnell":         HubEntry("black-forest-labs/FLUX.1-schnell", pipeline("transformer", "vae", *SDXL_LIKE), "~34 GB"),
    "wan2.1-t2v-1.3b":      HubEntry("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pipeline(*WAN), "?"),
    "wan2.1-t2v-14b":       HubEntry("Wan-AI/Wan2.1-T2V-14B-Diffusers", pipeline(*WAN), "?"),
    "wan2.1-i2v-14b-480p":  HubEntry("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", pipeline(*WAN, "image_encoder", "image_processor"), "?"),
    "wan2.1-i2v-14b-720p":  HubEntry("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", pipeline(*WAN, "image_encoder", "image_processor"), "?"),
    "wan2.1-vace-1.3b":     HubEntry("Wan-AI/Wan2.1-VACE-1.3B-diffusers", pipeline(*WAN), "?"),
    "cogvideox-2b":         HubEntry("THUDM/CogVideoX-2b", pipeline("transformer", "vae", *TEXT_TO_IMAGE), "?"),
    "cogvideox-5b":         HubEntry("THUDM/CogVideoX-5b", pipeline("transformer", "vae", *TEXT_TO_IMAGE), "?"),
    # Kept under --root in the seed's `huggingface-cli download REPO --local-dir $CKPT_ROOT_DIR/...` folders.
    # Cosmos: the seed fetches whole repos (several checkpoints); here only the post-trained EMA weights the preset loads.
    "cosmos-predict2.5-2b":  HubEntry("nvidia/Cosmos-Predict2.5-2B", (cosmos_predict2.CONFIGS["cosmos-predict2.5-2b"].file,), "~4.1 GB", local_dir="cosmos_predict2/Cosmos-Predict2.5-2B", gated=True),
    "cosmos-predict2.5-14b": HubEntry("nvidia/Cosmos-Predict2.5-14B", (cosmos_predict2.CONFIGS["cosmos-predict2.5-14b"].file,), "~29 GB", local_dir="cosmos_predict2/Cosmos-Predict2.5-14B", gated=True),
    "self-forcing-ode-init": HubEntry("gdhe17/Self-Forcing", (wan.CONFIGS["self-forcing-ode-init"].file,), "?", local_dir="Self-Forcing"),
    "self-forcing-dmd":      HubEntry("gdhe17/Self-Forcing", (wan.CONFIGS["self-forcing-dmd"].file,), "?", local_dir="Self-Forcing"),
    "wan2.1-vace-14b":      HubEntry("Wan-AI/Wan2.1-VACE-14B-diffusers", pipeline(*WAN), "?"),
}
# fmt: on

TIMEOUT_S = 60  # per socket operation, not per download
RETRIES = 5  # reconnections (each resuming where the last one stopped) before giving up
RETRY_WAIT_S = 2  # seconds before the first reconnection, one more for each later one
MAX_MODULE_DEPTH = 64  # nesting of pickled modules; EDM/EDM2 networks go 4 deep, a self-referencing pickle forever


class DownloadError(Exception):
    """A failure the user can act on; `main` prints its message without a traceback."""


class ChecksumError(DownloadError):
    pass


class UnsafePickleError(DownloadError, pickle.UnpicklingError):
    pass


class WrongContentError(DownloadError):
    """A complete download that is not what its name says (other keys or shapes); `fetch` deletes it."""


class HubError(DownloadError):
    pass


# -----------------------------------------------------------------------------
# Restricted unpickling. `find_class` is the only way a pickle can reach code: every global it names
# is looked up in an explicit table, so nothing outside the table can be called or constructed.


class PickledModule:
    """A pickled torch module as plain data: its `__dict__` (`_parameters`, `_buffers`, `_modules`, ...)."""

    def __setstate__(self, state):  # the pickle's BUILD step, for torch.nn.ModuleDict (not a persistent class)
        self.state = state


def reconstruct_persistent_obj(meta):
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj, which would `exec(meta['module_src'])`.

    `meta` is {type, version, module_src, class_name, state}; only the state (the object's `__dict__`) is kept.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise DownloadError("a persistent object without a state dict; not an EDM/EDM2 network")
    module = PickledModule()
    module.state = meta["state"]
    return module


class EasyDict(dict):
    """dnnlib.util.EasyDict read as a plain dict (a subclass only because the pickle may BUILD it with a `__dict__`)."""


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 without the autograd extras: a strided view of the flat storage, which must lie
    inside it (what the view declares is checked against what the file holds by `pickle_to_state_dict`)."""
    numbers = (storage_offset, *size, *stride)
    if not (isinstance(storage, torch.Tensor) and all(isinstance(n, int) and n >= 0 for n in numbers)):
        raise UnsafePickleError("a tensor with a malformed storage, size or stride; not an EDM/EDM2 checkpoint")
    if all(size):  # a non-empty view: its last element must be inside the storage
        if storage_offset + sum((n - 1) * st for n, st in zip(size, stride)) >= storage.numel():
            raise UnsafePickleError(
                f"a tensor of size {tuple(size)} reaches past its storage of {storage.numel()} elements; "
                "the file is damaged or crafted"
            )
    return storage.as_strided(size, stride, storage_offset)


def rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """torch._utils._rebuild_parameter(_with_state): a state dict wants the tensor, not the Parameter."""
    return data


# Legacy (non-zip) torch.save format, which `torch.storage._load_from_bytes` reads: five pickles in a row
# (magic number, protocol version, sys info, the object, the list of storage keys), then for each key an
# int64 element count and the raw little-endian bytes. In a plain pickle every storage is such a blob.
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def load_storage_blob(blob, source):
    """torch.storage._load_from_bytes without torch.load: one storage as a flat 1-D tensor."""
    f = io.BytesIO(blob)
    allowed = {("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()}
    magic, protocol, sys_info = (RestrictedUnpickler(f, {}, source).load() for _ in range(3))
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
        raise UnsafePickleError(f"a tensor storage in {source} is not in torch's legacy format")
    if not sys_info.get("little_endian", False):
        raise DownloadError(f"{source} was saved on a big-endian machine; not supported")
    storages = {}  # key -> (dtype, element count)

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in {source}")
        _, dtype, key, _location, numel, view = pid
        if view is not None:  # storage views: only written by torch < 0.4
            raise UnsafePickleError(f"a storage view in {source}; not supported")
        storages[key] = (dtype, numel)
        return key

    unpickler = RestrictedUnpickler(f, allowed, source)
    unpickler.persistent_load = persistent_load
    root = unpickler.load()
    data = {}
    for key in RestrictedUnpickler(f, {}, source).load():
        dtype, numel = storages[key]
        (count,) = struct.unpack("<q", f.read(8))
        nbytes = count * dtype.itemsize
        raw = f.read(nbytes)
        if count != numel or len(raw) != nbytes:
            raise DownloadError(f"a tensor storage in {source} is truncated or inconsistent; the file is damaged")
        # bytearray: a writable copy, so that the tensor owns its memory.
        data[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
    return data[root]


# numpy scalars appear in EDM pickles because init kwargs like `init_weight=np.sqrt(0.2)` are recorded;
# their reconstructor is numpy.core.multiarray.scalar (numpy 1) or numpy._core.multiarray.scalar (numpy 2).
# Reading the functions off live objects avoids importing either (deprecated) module path.
NUMPY_SCALAR = np.float64(0).__reduce__()[0]
NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]
NUMPY_SCALAR_GLOBALS = {
    ("numpy.core.multiarray", "scalar"): NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): NUMPY_SCALAR,
    ("numpy", "dtype"): np.dtype,
}
NUMPY_ARRAY_GLOBALS = {
    **NUMPY_SCALAR_GLOBALS,
    ("numpy.core.multiarray", "_reconstruct"): NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed, source, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.source = allowed, source

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise UnsafePickleError(
            f"refusing global '{module}.{name}' in {self.source}; this file is not a plain EDM/EDM2 checkpoint"
        )


def load_checkpoint_pickle(path):
    """Unpickle an EDM/EDM2 network pickle into plain data: dicts, tensors and `PickledModule` records. Returns the
    object and the bytes of tensor storage the file holds."""
    source = Path(path).name
    storage_bytes = 0

    def load_blob(blob):
        nonlocal storage_bytes
        storage = load_storage_blob(blob, source)
        storage_bytes += storage.numel() * storage.element_size()
        return storage

    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): load_blob,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("torch.nn.modules.container", "ModuleDict"): PickledModule,
        **NUMPY_SCALAR_GLOBALS,
    }
    if os.path.isdir(path):
        raise DownloadError(f"{path} is a folder, not a pickle: give the .pkl file")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, allowed, source).load(), storage_bytes
        except UnsafePickleError:
            raise
        except RecursionError:
            raise UnsafePickleError(f"{path} nests objects too deeply to read; not an EDM/EDM2 checkpoint") from None
        except Exception as e:  # truncated file, wrong format, a call with the wrong arguments, ...
            raise DownloadError(f"could not read {path} as an EDM/EDM2 pickle: {type(e).__name__}: {e}") from e


def module_state_dict(module, prefix="", depth=0):
    """What `module.state_dict()` returns, from the pickled `__dict__`s: own parameters, then persistent
    buffers, then each child in insertion order; None entries are skipped, as torch does."""
    if not (isinstance(module, PickledModule) and isinstance(getattr(module, "state", None), dict)):
        raise DownloadError(f"'{prefix.rstrip('.')}' is a {type(module).__name__}, not a pickled torch module")
    if depth > MAX_MODULE_DEPTH:  # a module that contains itself would recurse forever
        raise UnsafePickleError(
            f"modules nested more than {MAX_MODULE_DEPTH} deep (at '{prefix[:80]}...'): a self-referencing or "
            "crafted pickle, not an EDM/EDM2 network"
        )
    state, out = module.state, {}
    for name, t in state.get("_parameters", {}).items():
        if t is not None:
            out[prefix + name] = t
    non_persistent = state.get("_non_persistent_buffers_set", set())
    for name, t in state.get("_buffers", {}).items():
        if t is not None and name not in non_persistent:
            out[prefix + name] = t
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(module_state_dict(child, prefix + name + ".", depth + 1))
    return out


def pickle_to_state_dict(path):
    """Flat {name: tensor} of the network in an EDM/EDM2 pickle: its `ema` entry, else `model`
    (a dict of tensors is taken as a state dict as it is). 0-dim tensors become shape [1] (FastGen's layout).
    The tensors may not declare more bytes than the file's storages hold: a view with stride 0, or many views of one
    storage, would expand a small file into gigabytes when written out."""
    net, storage_bytes = load_checkpoint_pickle(path)
    if isinstance(net, dict) and ("ema" in net or "model" in net):
        net = net["ema"] if "ema" in net else net["model"]
    if isinstance(net, PickledModule):
        try:
            state = module_state_dict(net)
        except DownloadError as e:  # name the file
            raise type(e)(f"{path}: {e}") from None
    elif isinstance(net, dict) and net and all(isinstance(t, torch.Tensor) for t in net.values()):
        state = net
    else:
        keys = f" (keys: {', '.join(map(str, net))})" if isinstance(net, dict) else ""
        raise DownloadError(f"{path} holds no 'ema' or 'model' network and is not a state dict{keys}")
    if not state or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise DownloadError(f"{path}: the network's parameters and buffers are missing or are not tensors")
    declared = sum(t.numel() * t.element_size() for t in state.values())
    if declared > storage_bytes:
        raise UnsafePickleError(
            f"{path} declares {declared:,} bytes of tensors but holds only {storage_bytes:,} bytes of storage "
            "(views that repeat their data, e.g. stride 0): not an EDM/EDM2 checkpoint; refusing to expand it"
        )
    return {k: t.reshape(1) if t.ndim == 0 else t for k, t in state.items()}


@contextlib.contextmanager
def atomic_output(dest):
    """Yield a temporary path next to `dest`; on success fsync it and rename it onto `dest`, on failure delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; outputs are ordinary shared files
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_edm_keys(state, name, path):
    """`state` has exactly the keys and shapes of `name`'s network (models/edm.py or edm2.py CONFIGS, built on the
    meta device), else a WrongContentError; names of neither file are not checked."""
    module = edm if name in edm.CONFIGS else edm2 if name in edm2.CONFIGS else None
    if module is None:
        return
    with torch.device("meta"):
        model = (edm.EDMPrecond if module is edm else edm2.EDM2Precond)(module.CONFIGS[name])
    try:
        module.check_keys(model, state, str(path))
    except ValueError as e:
        raise WrongContentError(f"{path} is not the {name} network: {e}") from None


def convert_pickle(path, dest, source=None, name=None):
    """EDM/EDM2 pickle -> safetensors at `dest` (atomic). Returns the state dict that was written.

    `name` (a CONFIGS name of models/edm.py or models/edm2.py) goes into the metadata, so that the model file's
    `from_pretrained(path)` knows the architecture without being told; the keys and shapes are checked against that
    architecture before anything is written."""
    state = pickle_to_state_dict(path)
    if name:
        check_edm_keys(state, name, path)
    # Own, contiguous memory per tensor: safetensors refuses views and shared storage.
    tensors = {k: t.contiguous().clone() for k, t in state.items()}
    with atomic_output(dest) as tmp:
        metadata = {"source": source or Path(path).name, "format": "pt", **({"name": name} if name else {})}
        save_file(tensors, str(tmp), metadata=metadata)
    return state


def convert_inception(path, dest, source=None):
    """pytorch-fid's Inception .pth -> safetensors at `dest` (atomic), after checking every key and shape against
    models/inception.py. `torch.load(weights_only=True)` builds tensors and containers only, never other objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused global, a truncated file, not a torch file at all
        raise DownloadError(f"could not read {path} as a torch state dict: {type(e).__name__}: {e}") from e
    if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
        raise DownloadError(f"{path} is not a state dict of tensors")
    with torch.device("meta"):
        model = inception.InceptionV3()
    try:
        inception.check_keys(model, state)
    except ValueError as e:
        raise WrongContentError(f"{path} is not the FID Inception network: {e}") from None
    tensors = {k: t.contiguous().clone() for k, t in state.items()}
    with atomic_output(dest) as tmp:
        save_file(tensors, str(tmp), metadata={"source": source or Path(path).name, "format": "pt"})
    return state


# -----------------------------------------------------------------------------
# HTTP download with resume, and checksums.


def part_record(part):
    """Where a partial download keeps the URL, size and ETag it was started from: `<name>.part.json` beside it."""
    return Path(f"{part}.json")


def discard_part(part):
    """Delete a partial download and its record."""
    Path(part).unlink(missing_ok=True)
    part_record(part).unlink(missing_ok=True)


def _total_size(content_range):
    """N of a Content-Range header `bytes A-B/N` or `bytes */N`; None when absent or unknown."""
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def network_reason(e, url):
    """What went wrong with a connection, in a few words that name the host."""
    host = urlparse(url).hostname or url
    reason = getattr(e, "reason", e)  # URLError wraps the socket error
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve {host} (no network, or no DNS)"
    if isinstance(reason, ConnectionRefusedError):
        return f"{host} refused the connection"
    if isinstance(reason, TimeoutError):
        return f"no answer from {host} within {TIMEOUT_S} s"
    return f"{type(reason).__name__}: {reason}"


def http_download(url, part):
    """Download `url` into `part`, continuing a partial file; reconnects (resuming) up to RETRIES times, saying so
    once. A partial file that its record shows was started from another version of the remote file (its size or
    ETag changed) is started over rather than continued."""
    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(RETRIES + 1):
        try:
            return _http_download_once(url, part)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"HTTP {e.code} {e.reason} ({url}): check the URL, or download from a mirror with --url URL") from e  # fmt: skip
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            if attempt == RETRIES:
                kept = part.stat().st_size if part.exists() else 0
                if not kept:
                    discard_part(part)  # an empty file resumes nothing
                note = f"; the partial download {part} ({kept:,} bytes) is kept and a rerun resumes it" if kept else ""
                raise DownloadError(
                    f"network failure, {network_reason(e, url)}, after {RETRIES + 1} attempts ({url}): check the "
                    f"network and run again, or download from a mirror with --url URL{note}"
                ) from e
            if attempt == 0:
                print(f"connection failed ({network_reason(e, url)}); retrying up to {RETRIES} times", file=sys.stderr)
            time.sleep(RETRY_WAIT_S * attempt)


def _http_download_once(url, part):
    have = part.stat().st_size if part.exists() else 0
    started = None  # the record of what `part` was started from; None for a part without one (then trusted)
    if have and part_record(part).exists():
        try:
            started = json.loads(part_record(part).read_text())
        except ValueError:
            started = None
        if not (isinstance(started, dict) and started.get("url") == url):  # a damaged record, or another URL's
            discard_part(part)
            have, started = 0, None
    headers = {"User-Agent": "nanofastgen-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if started and started.get("etag"):
            headers["If-Range"] = started["etag"]  # a server that knows the file changed sends all of it (200)
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is complete, unless the file changed
            total = _total_size(e.headers.get("Content-Range"))
            if total is None or (total == have and (started or {}).get("size") in (None, have)):
                return
            print(f"{url} changed on the server since {part.name} was started; downloading it afresh", file=sys.stderr)
            discard_part(part)
            return _http_download_once(url, part)
        raise
    with response:
        etag, length = response.headers.get("ETag"), response.headers.get("Content-Length")
        length = int(length) if length else None
        if have and response.status != 206:  # the server ignored Range (or If-Range: the file changed): start over
            have = 0
        elif have:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: asked for bytes {have}- but got {content_range or 'no Content-Range'}")
            total, size = _total_size(content_range), (started or {}).get("size")
            changed = (size is not None and total is not None and total != size) or (
                bool(started and started.get("etag")) and etag is not None and etag != started["etag"]
            )
            if changed:
                print(f"{url} changed on the server since {part.name} was started (size or ETag); downloading it afresh", file=sys.stderr)  # fmt: skip
                response.close()
                discard_part(part)
                return _http_download_once(url, part)
        if not have:  # a fresh start: record what it starts from, so that a later resume can tell a changed file
            part_record(part).write_text(json.dumps({"url": url, "size": length, "etag": etag}))
        got = 0
        with open(part, "ab" if have else "wb") as f, tqdm(total=length and have + length, initial=have, unit="B", unit_scale=True, desc=part.name) as bar:  # fmt: skip
            while chunk := response.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    # http.client ends a body that stops short of its Content-Length as if it were complete; catch that here.
    if length is not None and got < length:
        raise ConnectionError(f"connection closed after {have + got:,} of {have + length:,} bytes")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_download(part, expected, url, prefix=""):
    """sha256 of the finished download; on a mismatch with `expected` (the full digest) or `prefix` (its first hex
    digits) the file is deleted and a ChecksumError raised."""
    actual = file_sha256(part)
    if (expected and actual != expected.lower()) or not actual.startswith(prefix.lower()):
        discard_part(part)
        raise ChecksumError(
            f"sha256 mismatch for {url}\n  expected {expected or prefix + '...'}\n  actual   {actual}\n"
            f"The damaged download {part} was deleted; run the command again to fetch it afresh "
            f"(--force also replaces an existing output). If the publisher replaced the file and you trust "
            f"the new one, pin its digest with --sha256 {actual}."
        )
    return actual


# -----------------------------------------------------------------------------
# CIFAR-10 -> EDM dataset zip, laid out as NVlabs/edm dataset_tool.py writes it.


def cifar10_to_zip(tarball, dest):
    """Training batches of cifar-10-python.tar.gz -> `dest` zip: 00000/img00000000.png ... + dataset.json labels."""
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for i in range(1, 6):
            member = f"cifar-10-batches-py/data_batch_{i}"
            try:
                f = tar.extractfile(member)
            except KeyError:
                raise DownloadError(f"{tarball} has no {member}; not the CIFAR-10 python archive") from None
            # Python-2 pickles of numpy arrays: allow exactly numpy's array reconstruction. latin1 is numpy's
            # documented way to read Python-2 strings back as the bytes they were (as dataset_tool.py does).
            batch = RestrictedUnpickler(f, NUMPY_ARRAY_GLOBALS, member, encoding="latin1").load()
            data, batch_labels = np.asarray(batch["data"]), [int(y) for y in batch["labels"]]
            if (
                data.dtype != np.uint8
                or data.shape != (len(batch_labels), 3 * 32 * 32)
                or not all(0 <= y < 10 for y in batch_labels)
            ):
                raise DownloadError(f"{member} in {tarball} does not look like a CIFAR-10 batch")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
            labels += batch_labels
    images = np.concatenate(images)
    entries = []
    with atomic_output(dest) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for idx, (img, label) in enumerate(zip(tqdm(images, desc=Path(dest).name, unit="img"), labels)):
            idx_str = f"{idx:08d}"
            name = f"{idx_str[:5]}/img{idx_str}.png"
            png = io.BytesIO()
            Image.fromarray(img, "RGB").save(png, format="png", compress_level=0, optimize=False)
            zf.writestr(name, png.getvalue())
            entries.append([name, label])
        zf.writestr("dataset.json", json.dumps({"labels": entries}))
    return len(entries)


# -----------------------------------------------------------------------------
# FID reference statistics of a dataset.


def dataset_images(path, batch_size):
    """(number of images, iterator over uint8 batches (B, 3, H, W)) of an EDM-style dataset: a zip or folder of PNGs
    (what `download.py cifar10` and EDM's dataset_tool.py write), in file-name order. Grey images become RGB."""
    if not os.path.exists(path):
        raise DownloadError(f"{path} not found")
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names, read = archive.namelist(), archive.read
    elif os.path.isdir(path):
        names = [os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files]
        read = lambda name: Path(path, name).read_bytes()
    else:
        raise DownloadError(f"{path} is neither a zip file nor a folder")
    names = sorted(n for n in names if n.lower().endswith(".png"))
    if len(names) < 2:
        raise DownloadError(f"{path} holds {len(names)} PNG images; reference statistics need at least 2")

    def batches():
        for i in range(0, len(names), batch_size):
            images = [np.asarray(Image.open(io.BytesIO(read(n))).convert("RGB")) for n in names[i : i + batch_size]]
            yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)

    return len(names), batches()


def fid_ref(data, out, weights=None, root=None, batch_size=64, device="cpu"):
    """Inception feature statistics of every image in `data`, written to `out` as .npz (mu, sigma) atomically."""
    model = inception.from_pretrained(weights, root=root, device=device)
    count, batches = dataset_images(data, batch_size)
    stats = inception.FeatureStats(device=device)
    with torch.no_grad():
        for images in tqdm(batches, total=-(-count // batch_size), unit="batch", desc=f"{Path(data).name} features"):
            stats.update(model(images.to(device)))
    mu, sigma = stats.mean_cov()
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare path
            np.savez(f, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy())
    return count


# -----------------------------------------------------------------------------
# Latents of an image folder, for `train_edm.py --model dit|sit --data DIR` (its docstring describes the format).


def center_crop_arr(image, size):
    """ADM's (and DiT's) preprocessing: halve with a box filter while the short side is at least 2 * size, resize the
    short side to `size` (bicubic), then cut the central size x size square. PIL RGB image -> uint8 (size, size, 3)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def encode_latents(image_folder, out_dir, vae, vae_name="", image_size=256, shard_size=10_000, batch_size=64, device="cpu"):  # fmt: skip
    """Encode an ImageNet-style folder (one sub-folder per class; classes numbered in sorted folder order, images in
    sorted name order) with `vae` (a models/autoencoder_kl.py AutoencoderKL): center crop as ADM, [-1, 1], the VAE
    posterior's mean and std (un-normalised, float16) with the labels, `shard_size` images per shard. Each shard is
    written atomically and skipped when it exists, so a rerun resumes; latents.json (with the VAE's scaling) last."""
    classes = sorted(d.name for d in os.scandir(image_folder) if d.is_dir())
    files = [(os.path.join(image_folder, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(image_folder, c)))]  # fmt: skip
    if not files:
        raise DownloadError(f"{image_folder} holds no class folders with images")
    shards = []
    for start in tqdm(range(0, len(files), shard_size), unit="shard", desc="latents"):
        name = f"shard_{start // shard_size:05d}.safetensors"
        shards.append(name)
        if os.path.exists(os.path.join(out_dir, name)):
            continue
        chunk, means, stds = files[start : start + shard_size], [], []
        for i in range(0, len(chunk), batch_size):
            images = [center_crop_arr(Image.open(path).convert("RGB"), image_size) for path, _ in chunk[i : i + batch_size]]  # fmt: skip
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
            with torch.no_grad():
                posterior = vae.posterior(x)
            means.append(posterior.mean.half().cpu())
            stds.append(posterior.std.half().cpu())
        tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "labels": torch.tensor([c for _, c in chunk])}  # fmt: skip
        with atomic_output(os.path.join(out_dir, name)) as tmp:
            save_file(tensors, str(tmp))
    meta = {"shards": shards, "scaling_factor": vae.cfg.scaling_factor, "shift_factor": vae.cfg.shift_factor,
            "num_classes": len(classes), "classes": classes, "vae": vae_name, "image_size": image_size}  # fmt: skip
    with atomic_output(os.path.join(out_dir, "latents.json")) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    return len(files)


# -----------------------------------------------------------------------------
# Latent shards of a folder of videos, for `train_video.py --data DIR` and `train_wan_causal.py --data DIR`: shards
# of N clips, `latents` (N, C, T, H, W) as the denoiser sees them, the N captions as a JSON list in metadata `prompts`.

# --model -> (VAE file, its default weights, frames, height, width); the Wan VAE encodes 1 + 4k frames, CogVideoX's
# 1 + 8k (models/cogvideox_vae.py). The sizes are each family's training size (Cosmos Predict 2.5: 93 frames of 720p).
# fmt: off
VIDEO_FAMILIES = {
    "wan":             (wan_vae, "wan2.1", 81, 480, 832),
    "cosmos_predict2": (wan_vae, "wan2.1", 93, 704, 1280),
    "cogvideox-2b":    (cogvideox_vae, "cogvideox-2b", 49, 480, 720),
    "cogvideox-5b":    (cogvideox_vae, "cogvideox-5b", 49, 480, 720),
}
# fmt: on
FRAME_IMAGES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_FILES = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")


def resize_crop(image, height, width):
    """Scale a PIL image to cover height x width (bicubic), then cut the centre: uint8 (height, width, 3)."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.convert("RGB").resize(size, resample=Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def video_items(folder, out_dir=None):
    """The videos of `folder` in name order (GIFs, MP4s and other containers, sub-folders of frame images, but not
    `out_dir`), each with its caption from NAME.txt beside it ("" without one): [(path, caption)]."""
    if not os.path.isdir(folder):
        raise DownloadError(f"{folder} is not a folder of videos")
    items = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem = entry.name if entry.is_dir() else os.path.splitext(entry.name)[0]
        if entry.name.startswith(".") or (out_dir and os.path.abspath(entry.path) == os.path.abspath(out_dir)):
            continue
        if entry.is_dir() or entry.name.lower().endswith(VIDEO_FILES):
            caption = os.path.join(folder, stem + ".txt")
            items.append((entry.path, Path(caption).read_text().strip() if os.path.exists(caption) else ""))
    if not items:
        raise DownloadError(f"{folder} holds no videos (GIFs, MP4s or sub-folders of frame images)")
    return items


def read_video(path, frames, height, width):
    """The first `frames` frames of a GIF, an MP4 (through imageio, if installed) or a folder of frame images (in name
    order), each scaled to cover height x width and centre-cropped: (3, frames, height, width) in [-1, 1]."""
    from PIL import ImageSequence

    if os.path.isdir(path):
        source = (Image.open(os.path.join(path, f)) for f in sorted(os.listdir(path)) if f.lower().endswith(FRAME_IMAGES))  # fmt: skip
    elif path.lower().endswith(".gif"):
        source = ImageSequence.Iterator(Image.open(path))
    else:
        try:
            import imageio.v3 as iio  # MP4 and other containers, through its ffmpeg plugin
        except ImportError:
            raise DownloadError(f"reading {path} needs imageio (pip install imageio imageio-ffmpeg); or give GIFs or folders of frames") from None  # fmt: skip
        source = (Image.fromarray(f) for f in iio.imiter(path))
    arrays = [resize_crop(frame, height, width) for frame, _ in zip(source, range(frames))]
    if len(arrays) < frames:
        raise DownloadError(f"{path} has {len(arrays)} frames; --frames {frames} needs that many (lower --frames, or leave the clip out)")  # fmt: skip
    return torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2).float().div(127.5).sub(1)


def write_latent_shards(items, out_dir, settings, encode, shard_size):
    """Encode `items` [(path, caption)] with `encode(path) -> latents` into out_dir/shard_NNNNN.safetensors, shard k
    holding items k * shard_size onwards: `latents` (N, ...) and the N captions as a JSON list in the metadata key
    `prompts`. settings.json (the settings and a digest of the item names) comes first, and a rerun with other
    settings or other items is refused; each shard is written atomically and skipped when it exists, so a rerun
    resumes. Returns the number of shards."""
    names = "\n".join(os.path.basename(path) for path, _ in items)
    settings = settings | {"shard_size": shard_size, "items": len(items), "names_sha256": hashlib.sha256(names.encode()).hexdigest()}  # fmt: skip
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        old = json.loads(Path(path).read_text())
        if old != settings:
            diff = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in sorted(old.keys() | settings.keys()) if old.get(k) != settings.get(k))  # fmt: skip
            raise DownloadError(f"{out_dir} holds shards of other settings ({diff}); give another --out, or the same settings to resume")  # fmt: skip
    else:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=1))
    starts = range(0, len(items), shard_size)
    for k, start in enumerate(tqdm(starts, unit="shard", desc="latents")):
        dest = os.path.join(out_dir, f"shard_{k:05d}.safetensors")
        if os.path.exists(dest):
            continue
        chunk = items[start : start + shard_size]
        latents = torch.stack([encode(p) for p, _ in tqdm(chunk, unit="clip", leave=False)])
        with atomic_output(dest) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp), metadata={"prompts": json.dumps([c for _, c in chunk])})  # fmt: skip
    return len(starts)


def video_latents(folder, out_dir, model, vae_name=None, frames=None, height=None, width=None, shard_size=64, device="cpu"):  # fmt: skip
    """Latent shards of a folder of videos for train_video.py / train_wan_causal.py: the first `frames` frames of each
    video, centre-cropped to height x width, encoded by the family's VAE to its posterior mean, normalised as the
    denoiser sees it (Wan / Cosmos: per channel (z - mean) / std; CogVideoX: z * scaling_factor). Returns the shard
    count."""
    vae_module, default_vae, *size = VIDEO_FAMILIES[model]
    frames, height, width = (value or default for value, default in zip((frames, height, width), size))
    step = 4 if vae_module is wan_vae else 8
    if frames < 1 or (frames - 1) % step:
        below = (frames - 1) // step * step + 1
        raise DownloadError(f"--frames {frames}: the {model} VAE encodes 1 + {step}k frames, e.g. {below} or {below + step}")  # fmt: skip
    if height % 16 or width % 16:
        raise DownloadError(f"--height and --width must be multiples of 16 (8 per latent, 2 x 2 latents per token), got {height} x {width}")  # fmt: skip
    settings = {"command": "video-latents", "model": model, "vae": vae_name or default_vae, "frames": frames, "height": height, "width": width}  # fmt: skip
    vae = None

    def encode(path):
        nonlocal vae
        video = read_video(path, frames, height, width)
        if vae is None:  # loaded only when there is a shard to write
            vae = vae_module.from_pretrained(vae_name or default_vae, device=device)
        with torch.no_grad():
            return vae.encode(video[None].to(device), sample=False)[0].float().cpu()

    return write_latent_shards(video_items(folder, out_dir), out_dir, settings, encode, shard_size)


# -----------------------------------------------------------------------------
# Hugging Face Hub.


def hub_download(repo_id, allow_patterns, local_dir=None, revision=None, command=None, gated=False):
    """snapshot_download with readable errors; returns the local folder.

    huggingface_hub itself honours HF_HOME (cache location), HF_HUB_OFFLINE=1 and HF_TOKEN; FastGen's
    LOCAL_FILES_ONLY=true is honoured here by passing local_files_only. `command` is what fetches the files when they
    cannot be fetched now (default: the `hf download` command line); `gated` says the repo needs HF_TOKEN.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    local_only = os.environ.get("LOCAL_FILES_ONLY", "").lower() in ("1", "true", "yes")
    licence = f"accept its licence on https://huggingface.co/{repo_id} (logged in), then set HF_TOKEN to a token of that account"
    try:
        return snapshot_download(
            repo_id, allow_patterns=allow_patterns, local_dir=local_dir, revision=revision, local_files_only=local_only
        )
    except GatedRepoError as e:
        raise HubError(f"{repo_id} is gated: {licence}") from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{repo_id} was not found or is not accessible: check the name; if it is private or gated, {licence}"
        ) from e
    except LocalEntryNotFoundError as e:  # not cached, and not downloaded: say why, as it is
        from huggingface_hub import get_token

        patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns or [])
        command = command or " ".join(
            ["hf download", repo_id, *(f"--include '{p}'" for p in patterns)]
            + ([f"--revision {revision}"] if revision else [])
            + ([f"--local-dir {local_dir}"] if local_dir else [])
        )
        off = [name for name, on in (("HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE), ("LOCAL_FILES_ONLY", local_only)) if on]  # fmt: skip
        if off:
            why = f"downloads are off ({' and '.join(off)} set)"
            fix = f"run once with network access and without {' and '.join(off)}: {command}"
        else:
            cause = f"{type(e.__cause__).__name__}: " if e.__cause__ else ""
            why = f"the Hugging Face Hub could not be reached ({cause}no network?)"
            fix = f"check the network and run again: {command}"
        if gated and not get_token():
            fix += f"; it is gated: {licence}"
        raise HubError(f"{repo_id} is not downloaded and {why} ({local_dir or constants.HF_HUB_CACHE}): {fix}") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubError(f"{repo_id}: access denied (HTTP {status}); {licence}") from e
        raise HubError(f"the Hugging Face Hub answered HTTP {status} ({repo_id}): try again later") from e


# -----------------------------------------------------------------------------
# Orchestration and CLI.


def recorded_digest(recorded):
    """The sha256 an earlier download recorded in `recorded` (`<destination>.sha256`), or None without that file."""
    if not recorded.exists():
        return None
    try:
        words = recorded.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise DownloadError(f"cannot read the recorded digest {recorded} ({e}): delete it, or pass --sha256 HEX") from e
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        what = "is empty" if not words else f"starts with {words[0][:20]!r}, not a sha256 digest"
        raise DownloadError(
            f"the recorded digest {what} ({recorded}): delete the file (the next download records a new one), "
            "or pass --sha256 HEX"
        )
    return words[0]


def missing_folders(folder):
    """`folder` and those of its parents that do not exist yet, deepest first."""
    folder, missing = Path(folder).absolute(), []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def check_root(root):
    """--root: a folder that exists or can be created, and can be written to."""
    existing = Path(root).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DownloadError(f"{existing} is a file, not a folder (--root {root}): give a folder (it is created if missing)")  # fmt: skip
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DownloadError(f"{existing} is not writable (--root {root}): give a folder you can write to")


def fetch(name, root, url=None, sha256=None, force=False):
    """Download, verify and convert one CHECKPOINTS entry; returns the destination path. A failure leaves no folder
    it created empty; refused content (code in a pickle, the wrong network) is deleted; a connection that fails
    keeps a partial download to resume."""
    entry = CHECKPOINTS[name]
    dest = Path(root) / entry.dest
    if dest.exists() and not force:
        print(f"{dest} is already there; skipping (use --force to download it again)")
        return dest
    url = url or entry.url
    part = dest.parent / ((PurePosixPath(urlparse(url).path).name or dest.name) + ".part")
    recorded = Path(f"{dest}.sha256")
    expected = sha256 or entry.sha256 or recorded_digest(recorded)
    created = missing_folders(dest.parent)
    try:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DownloadError(f"cannot create {dest.parent} ({e.strerror}) (--root {root}): give a folder you can write to") from e  # fmt: skip
        if force:
            discard_part(part)
        print(f"downloading {url}")
        http_download(url, part)
        prefix = "" if sha256 else entry.sha256_prefix  # a digest given on the command line replaces the table's
        actual = verify_download(part, expected, url, prefix=prefix)
        checked = "matches" if expected else f"starts with {prefix} as published" if prefix else ""
        print(f"sha256 {actual} " + (checked or "(no published digest to compare with)"))
        try:
            if entry.kind == "dataset":
                print(f"wrote {dest} ({cifar10_to_zip(part, dest)} images)")
            elif entry.kind == "state-dict":
                state = convert_inception(part, dest, source=url)
                print(f"wrote {dest} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} values)")
            elif entry.kind == "dit":
                state = check_dit(part, name)
                os.replace(part, dest)
                print(f"wrote {dest} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} values)")
            else:
                state = convert_pickle(part, dest, source=url, name=name)  # checks the keys against `name` first
                prefixes = ", ".join(sorted({k.split(".")[0] for k in state}))
                print(
                    f"wrote {dest} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} values; top level: {prefixes})"
                )
        except (UnsafePickleError, WrongContentError) as e:
            discard_part(part)  # refused content will never be converted; do not keep it around
            raise type(e)(f"{e}\nThe download was deleted; check --url, or report the file if it is the official one") from None  # fmt: skip
        if not expected:  # only for a file that was checked and written: the digest belongs to the file at `dest`
            # Record the digest so that later downloads (and other users) can be checked against it.
            recorded.write_text(f"{actual}  {PurePosixPath(urlparse(url).path).name}\n")
            print(f"recorded the sha256 in {recorded}")
        discard_part(part)  # a kept-as-is download was moved onto `dest`
        return dest
    except BaseException:
        for folder in created:  # deepest first; a folder that holds a partial download stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def check_dit(path, name):
    """A downloaded DiT/SiT .pt: a plain state dict of tensors (read with weights_only=True, so nothing in it runs)
    with exactly the keys and shapes of models/dit.py's CONFIGS[name]. Returns the state dict."""
    try:
        state = dit.read_state_dict(str(path))
    except ValueError as e:
        raise UnsafePickleError(str(e)) from None  # refused content is deleted by `fetch`
    with torch.device("meta"):
        model = dit.DiT(dit.CONFIGS[name])
    try:
        dit.check_keys(model, state)
    except ValueError as e:
        raise WrongContentError(f"{path} is not {name}: {e}") from None
    return state


def fetch_hub(name, root):
    """Download a HUB entry's files (resumable, by huggingface_hub); returns the local folder."""
    entry = HUB[name]
    local_dir = os.path.join(root, entry.local_dir) if entry.local_dir else None
    if entry.gated and not (os.environ.get("HF_TOKEN") or _hub_token()):
        print(f"note: {entry.repo} is gated; without HF_TOKEN (or `hf auth login`) the download will be refused")
    folders = sorted({p.split("/")[0] for p in entry.patterns if "/" in p})
    what = ", ".join(entry.patterns) if len(entry.patterns) <= 3 else f"configs and weights of {', '.join(folders)}"
    print(f"downloading {entry.repo} ({what})")
    command = f"python download.py {name}" + (f" --root {root}" if entry.local_dir else "")
    folder = hub_download(entry.repo, list(entry.patterns), local_dir=local_dir, command=command, gated=entry.gated)
    print(f"{name}: {folder}" + ("" if local_dir else " (the Hugging Face cache; from_pretrained finds it there)"))
    return folder


def _hub_token():
    from huggingface_hub import get_token

    return get_token()


def print_list():
    print(f"{'name':30} {'kind':11} {'size':9} {'sha256':8} source -> destination (under --root)")
    for name, e in CHECKPOINTS.items():
        digest = "known" if e.sha256 else "prefix" if e.sha256_prefix else "unknown"
        print(f"{name:30} {e.kind:11} {e.size:9} {digest:8} {e.url} -> {e.dest}")
    for name, e in HUB.items():
        where = e.local_dir or "the Hugging Face cache (HF_HOME)"
        print(f"{name:30} {'hub':11} {e.size:9} {'gated' if e.gated else '':8} huggingface.co/{e.repo} -> {where}")
    print(
        "\nSizes are approximate. 'unknown' sha256: the digest of your download is printed and kept in <destination>.sha256."
    )
    print(f"\nfid-ref NAME_OR_PATH: FID reference statistics; named datasets: {', '.join(inception.REFS)}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        usage="%(prog)s NAME [--root DIR] [--url URL] [--sha256 HEX] [--force]\n"
        "       %(prog)s convert PICKLE OUT.safetensors [--as NAME]\n"
        "       %(prog)s fid-ref DATASET [--data PATH] [--out REF.npz] [--inception WEIGHTS] [--batch N] [--device DEV]\n"
        "       %(prog)s imagenet-latents IMAGE_FOLDER [--out DIR] [--vae NAME] [--image_size PX] [--batch N] [--device DEV]\n"
        "       %(prog)s video-latents VIDEO_FOLDER --model MODEL --out DIR [--frames N --height PX --width PX] [--vae NAME]\n"
        "                [--shard_size N] [--device DEV]\n"
        "       %(prog)s --list",
        description="Download checkpoints and data for nanofastgen; convert EDM/EDM2 pickles to safetensors without "
        "running their code; compute FID reference statistics.",
        epilog="examples:\n"
        "  python download.py --list\n"
        "  python download.py edm2-img64-s-fid --root /data/ckpt\n"
        "  python download.py cifar10\n"
        "  python download.py convert network-snapshot.pkl net.safetensors\n"
        "  python download.py inception && python download.py fid-ref cifar10\n"
        "  python download.py video-latents videos/ --model wan --out latents/ && python train_video.py --data latents/ ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="a name from --list, 'convert' or 'fid-ref'")
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="for 'convert': the local pickle, then the .safetensors to write; for 'fid-ref': the dataset, a name "
        f"({', '.join(inception.REFS)}) or an EDM-style zip or folder of PNGs",
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("CKPT_ROOT_DIR", "checkpoints"),
        metavar="DIR",
        help="where outputs go (default: $CKPT_ROOT_DIR, else ./checkpoints)",
    )
    parser.add_argument("--url", help="download from this URL instead of the official one (a mirror)")
    parser.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="for 'convert': the architecture's name in --list, recorded so `from_pretrained(OUT)` can build it",
    )
    parser.add_argument(
        "--sha256",
        metavar="HEX",
        help="expected sha256 of the download; overrides the table and any recorded <destination>.sha256",
    )
    parser.add_argument(
        "--force", action="store_true", help="download again even if the output exists; discards a partial download"
    )
    parser.add_argument(
        "--list", action="store_true", help="list every known name with its size, source and destination"
    )
    fid = parser.add_argument_group("fid-ref and imagenet-latents")
    fid.add_argument("--data", metavar="PATH", help="where a named dataset is read (default: its place under --root)")
    fid.add_argument(
        "--out", metavar="REF.npz", help="statistics file (default: fid-refs/<dataset>.npz under --root, where "
        "`sample.py --fid_ref NAME` looks); for imagenet-latents the folder (default: datasets/imagenet256-latents, the train_edm.py presets' --data)",
    )  # fmt: skip
    fid.add_argument("--inception", metavar="WEIGHTS", help=f"Inception .safetensors (default: {inception.FILE} under --root)")  # fmt: skip
    fid.add_argument("--batch", type=int, default=64, help="images per Inception (or, for imagenet-latents, VAE) call")
    fid.add_argument("--image_size", type=int, default=256, help="imagenet-latents: side of the center crop (256: DiT's ImageNet-256)")  # fmt: skip
    fid.add_argument("--vae", help="imagenet-latents: the autoencoder (models/autoencoder_kl.py name, Hub repo or folder; default sd-vae-ft-mse); video-latents: the family's VAE (name, Hub repo or folder; default its release)")  # fmt: skip
    fid.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    video = parser.add_argument_group("video-latents (a folder of GIFs, MP4s or sub-folders of frames; captions in NAME.txt)")  # fmt: skip
    video.add_argument("--model", choices=sorted(VIDEO_FAMILIES), help="the family whose VAE encodes the clips")
    video.add_argument("--frames", type=int, help="first frames of each clip: 1 + 4k for wan and cosmos_predict2, 1 + 8k for cogvideox (default 81, 93, 49)")  # fmt: skip
    video.add_argument(
        "--height", type=int, help="frame height after the centre crop (default 480; cosmos_predict2 704)"
    )
    video.add_argument("--width", type=int, help="frame width (default 832; cogvideox 720, cosmos_predict2 1280)")
    video.add_argument("--shard_size", type=int, default=64, help="clips per shard")
    args = parser.parse_args(argv)

    if args.list:
        print_list()
        return
    if args.name is None:
        parser.error("give a NAME (see --list), 'convert PICKLE OUT' or 'fid-ref DATASET'")
    if args.name == "convert" and len(args.paths) != 2:
        parser.error("convert takes two paths: PICKLE OUT.safetensors")
    if args.name == "fid-ref" and len(args.paths) != 1:
        parser.error(f"fid-ref takes one dataset: a name ({', '.join(inception.REFS)}) or a zip or folder of PNGs")
    if args.name == "video-latents" and (len(args.paths) != 1 or not args.model or not args.out):
        parser.error("video-latents takes one folder of videos, --model and --out DIR")
    if args.name == "imagenet-latents" and len(args.paths) != 1:
        parser.error("imagenet-latents takes one ImageNet-style folder (a sub-folder of images per class)")
    if (
        args.name not in ("convert", "fid-ref", "imagenet-latents", "video-latents")
        and args.name not in CHECKPOINTS
        and args.name not in HUB
    ):
        parser.error(f"unknown name {args.name!r}; see --list")
    if args.name not in ("convert", "fid-ref", "imagenet-latents", "video-latents") and args.paths:
        parser.error(f"unexpected arguments after {args.name}: {' '.join(args.paths)}")
    if args.sha256 and args.name not in HUB and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        parser.error(f"--sha256 {args.sha256!r}: a sha256 digest is 64 hex digits")
    if args.as_name and args.as_name not in edm.CONFIGS and args.as_name not in edm2.CONFIGS:
        parser.error(f"--as {args.as_name!r}: not an EDM/EDM2 name; one of {', '.join([*edm.CONFIGS, *edm2.CONFIGS])}")
    try:
        if args.name in CHECKPOINTS or (args.name in HUB and HUB[args.name].local_dir):
            check_root(args.root)
        if args.name == "convert":
            pickle_path, out = args.paths
            if not os.path.isfile(pickle_path):
                what = "is a folder" if os.path.isdir(pickle_path) else "not found"
                raise DownloadError(f"{pickle_path} {what} (convert PICKLE): give the EDM/EDM2 network pickle file")
            if os.path.isdir(out):
                raise DownloadError(f"{out} is a folder (convert PICKLE OUT.safetensors): give the file to write")
            state = convert_pickle(args.paths[0], args.paths[1], name=args.as_name)
            print(f"wrote {args.paths[1]} ({len(state)} tensors)")
        elif args.name == "fid-ref":
            dataset = args.paths[0]
            if dataset in inception.REFS:  # a named dataset: where `download.py NAME` writes it
                data = args.data or os.path.join(args.root, CHECKPOINTS[dataset].dest)
                out = args.out or os.path.join(args.root, inception.REFS[dataset])
                if not os.path.exists(data):
                    raise DownloadError(f"{data} not found; fetch it with `python download.py {dataset} --root {args.root}`")  # fmt: skip
            else:
                data = dataset
                out = args.out or os.path.join(args.root, "fid-refs", Path(dataset).stem + ".npz")
            count = fid_ref(data, out, args.inception, root=args.root, batch_size=args.batch, device=args.device)
            print(f"wrote {out} (Inception feature statistics of {count} images in {data})")
        elif args.name == "imagenet-latents":
            from models import autoencoder_kl

            out = args.out or "datasets/imagenet256-latents"  # where the dit/sit presets of train_edm.py read
            vae = autoencoder_kl.from_pretrained(args.vae or "sd-vae-ft-mse", device=args.device)
            encode_latents(args.paths[0], out, vae, args.vae or "sd-vae-ft-mse", image_size=args.image_size, batch_size=args.batch, device=args.device)  # fmt: skip
            print(f"wrote {out} (train with `train_edm.py --model dit|sit --data {out}`)")
        elif args.name == "video-latents":
            n = video_latents(args.paths[0], args.out, args.model, args.vae, args.frames, args.height, args.width, args.shard_size, args.device)  # fmt: skip
            script = "train_video.py --model " + {"wan": "wan", "cosmos_predict2": "cosmos"}.get(
                args.model, "cogvideox"
            )
            print(f"wrote {n} shards to {args.out} (train with `{script} --data {args.out}`)")
        elif args.name in HUB:
            if args.url or args.sha256 or args.force:
                parser.error(f"{args.name} comes from the Hugging Face Hub, which checks and resumes its own files; "
                             "--url, --sha256 and --force apply to direct downloads")  # fmt: skip
            fetch_hub(args.name, args.root)
        else:
            fetch(args.name, args.root, url=args.url, sha256=args.sha256, force=args.force)
    except (DownloadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a folder that cannot be written, a full disk: the system's words, and the file
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"error: {e.strerror or e}{where}: check the path and its permissions, and the free space", file=sys.stderr
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
