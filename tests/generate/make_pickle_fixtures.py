"""Build the tiny EDM / EDM2 network pickles that tests/test_download.py converts.

The pickles are written exactly the way the official training loops write theirs (a dict holding
the EMA network and friends, dumped with plain `pickle.dump`, so `torch_utils.persistence` embeds
each module's source and reduces every network to `_reconstruct_persistent_obj(meta)`). Next to
each pickle goes the `state_dict()` of the same network as safetensors: the answer the converter
in download.py must reproduce without importing or executing any of this code.

    python tests/generate/make_pickle_fixtures.py --edm_repo /tmp/src_edm --edm2_repo /tmp/src_edm2

Needs clones of NVlabs/edm and NVlabs/edm2 (the official code is imported from them, here only).
Writes tests/fixtures/pickle_{edm,edm2}_tiny{.pkl,_expected.safetensors}.
"""

import argparse
import copy
import json
import os
import pickle
import sys
import types

import torch
from safetensors.torch import save_file

OFFICIAL_PACKAGES = ("dnnlib", "torch_utils", "training")


def import_official(repo):
    """Put an official repo first on sys.path; both repos use the same package names, hence the purge."""
    for name in list(sys.modules):
        if name.split(".")[0] in OFFICIAL_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, os.path.abspath(repo))
    # dnnlib imports `requests` and EDM2's training loop `psutil` at module level; neither is used for
    # building or pickling a network, so an empty stand-in does when one is not installed.
    for missing in ("requests", "psutil"):
        try:
            __import__(missing)
        except ImportError:
            sys.modules[missing] = types.ModuleType(missing)


def randomize_(net):
    """Random values everywhere, so that a key mapped to the wrong tensor cannot go unnoticed."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))


def write(out_dir, name, data, net):
    with open(os.path.join(out_dir, f"{name}.pkl"), "wb") as f:
        pickle.dump(data, f)
    # FastGen's convention: 0-dim tensors (EDM2 gains) become shape [1].
    state = {k: (v.reshape(1) if v.ndim == 0 else v).detach().clone().contiguous() for k, v in net.state_dict().items()}
    # safetensors does not keep insertion order, so the expected order travels in the metadata.
    save_file(
        state, os.path.join(out_dir, f"{name}_expected.safetensors"), metadata={"key_order": json.dumps(list(state))}
    )
    sizes = [os.path.getsize(os.path.join(out_dir, f"{name}{s}")) for s in (".pkl", "_expected.safetensors")]
    print(f"{name}: {len(state)} tensors, pickle {sizes[0] / 1e3:.0f} kB, expected {sizes[1] / 1e3:.0f} kB")


def make_edm(repo, out_dir):
    import_official(repo)
    from training.augment import AugmentPipe
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    torch.manual_seed(0)
    # model_channels=4 (not 16) keeps the fixture at tens of kB; the layout is the same at any width.
    net = EDMPrecond(
        img_resolution=8,
        img_channels=3,
        label_dim=10,
        model_type="SongUNet",
        augment_dim=9,
        model_channels=4,
        channel_mult=[1, 2],
        num_blocks=2,
        attn_resolutions=[4],
    )
    randomize_(net)
    # As in NVlabs/edm training/training_loop.py: modules are deep-copied, frozen and moved to CPU.
    augment_pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    data = dict(
        ema=copy.deepcopy(net).eval().requires_grad_(False).cpu(),
        loss_fn=EDMLoss(),
        augment_pipe=augment_pipe,
        dataset_kwargs=dict(
            class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip", use_labels=True
        ),
    )
    write(out_dir, "pickle_edm_tiny", data, data["ema"])


def make_edm2(repo, out_dir):
    import_official(repo)
    import dnnlib
    from training.encoders import StandardRGBEncoder
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss

    torch.manual_seed(0)
    # model_channels=4 keeps the fixture small; channels_per_head=4 (official default 64) so that
    # these narrow blocks still get attention layers.
    net = Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=10,
        model_channels=4,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=4,
    )
    randomize_(net)
    # As in NVlabs/edm2 training/training_loop.py: an EasyDict, and the EMA network stored in fp16.
    data = dnnlib.EasyDict(
        encoder=StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(path="img64.zip"), loss_fn=EDM2Loss()
    )
    data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    write(out_dir, "pickle_edm2_tiny", data, data.ema)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edm_repo", required=True, help="clone of https://github.com/NVlabs/edm")
    parser.add_argument("--edm2_repo", required=True, help="clone of https://github.com/NVlabs/edm2")
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    make_edm(args.edm_repo, args.out_dir)
    make_edm2(args.edm2_repo, args.out_dir)
