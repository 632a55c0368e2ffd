"""Write the Wan 2.1 key manifests and golden-parity fixtures from diffusers and the official Wan code.

    pip install diffusers                                        # with requirements-dev.txt
    git clone https://github.com/Wan-Video/Wan2.1 /tmp/Wan2.1    # the official model code, for its key layout
    WAN_REPO=/tmp/Wan2.1 python tests/generate/make_wan_fixtures.py

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/wan-{t2v-1.3b,t2v-14b,i2v-14b,vace-1.3b}.json
        state_dict keys and shapes of diffusers' WanTransformer3DModel / WanVACETransformer3DModel with the released
        configs (built on the meta device); I2V-14B-480P and -720P share one layout
  tests/manifests/wan-official-{t2v-1.3b,i2v-14b,vace-1.3b,tiny,tiny-i2v,tiny-vace}.json
        the same for the official WanModel / VaceWanModel (the layout of Self-Forcing's .pt files); on the way,
        models/wan.py's OFFICIAL_KEYS table is checked to rename every key as diffusers' single-file converter does
  tests/fixtures/wan_{t2v,i2v,vace}.safetensors
        a tiny diffusers model with random weights (real key names), inputs and diffusers' outputs; T2V also with
        per-frame times (given to diffusers as per-token times); metadata holds the config.json. Each output
        `output.X` is there twice: diffusers in float32, and as `output.X.f64` diffusers in float64 on the same
        weights and inputs (cast exactly), float32 meaning float64 throughout (reference_float64.py)
"""

import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types

import torch
from reference_float64 import float32_is_float64, keep_committed, print_float32_error
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # fmt: skip
T2V_1_3B = dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30)
T2V_14B = dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)
I2V_14B = dict(T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
VACE_1_3B = dict(T2V_1_3B, vace_layers=list(range(0, 30, 2)), vace_in_channels=96)
REAL = {"t2v-1.3b": T2V_1_3B, "t2v-14b": T2V_14B, "i2v-14b": I2V_14B, "vace-1.3b": VACE_1_3B}
PARAMS = {"t2v-1.3b": 1_418_996_800, "t2v-14b": 14_288_491_584, "i2v-14b": 16_394_878_784, "vace-1.3b": 2_153_972_032}

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=64)  # fmt: skip
TINY_I2V = dict(TINY, in_channels=12, image_dim=20, added_kv_proj_dim=24)
TINY_VACE = dict(TINY, vace_layers=[0, 1], vace_in_channels=12)

# Official WanModel arguments of the same models (and of the tiny ones).
OFFICIAL = {
    "t2v-1.3b": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "i2v-14b": dict(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "vace-1.3b": dict(
        dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, vace_layers=list(range(0, 30, 2)), vace_in_dim=96
    ),  # fmt: skip
    "tiny": dict(
        model_type="t2v", in_dim=4, out_dim=4, dim=24, ffn_dim=48, freq_dim=16, text_dim=32, num_heads=2, num_layers=2
    ),  # fmt: skip
}
OFFICIAL["tiny-i2v"] = dict(OFFICIAL["tiny"], model_type="i2v", in_dim=12)
OFFICIAL["tiny-vace"] = dict({k: v for k, v in OFFICIAL["tiny"].items() if k != "model_type"}, vace_layers=[0, 1],
                             vace_in_dim=12)  # fmt: skip


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """transformers (imported by diffusers' loaders) imports torchvision, which Wan does not use. Where the installed
    torchvision does not load (a build for another torch), stand in for it with empty modules."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        from unittest import mock

        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: mock.MagicMock(name=f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


def keys(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def write_manifest(name, manifest):
    path = os.path.join(TESTS, "manifests", f"wan-{name}.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=0)
    print(f"{path}: {len(manifest)} keys, {sum(math.prod(s) for s in manifest.values()):,} numbers")
    return manifest


def official_classes():
    """The official WanModel and VaceWanModel, imported from a checkout of Wan-Video/Wan2.1 without its package
    __init__ (which pulls in the whole pipeline) and without flash-attention (only the key layout is needed)."""
    root = os.environ.get("WAN_REPO", "/tmp/Wan2.1")
    for name in ("wan", "wan.modules"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = module
    from wan.modules.model import WanModel
    from wan.modules.vace_model import VaceWanModel

    return WanModel, VaceWanModel


def check_against_diffusers_converter(official):
    """Our OFFICIAL_KEYS table renames each official key as diffusers' own single-file converter does."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sys.path.insert(0, os.path.dirname(TESTS))
    from models.wan import rename_official_key

    markers = {k: torch.full([1], float(i)) for i, k in enumerate(official)}  # one distinct value per key
    converted = convert_wan_transformer_to_diffusers(dict(markers))
    ours = {rename_official_key(k): v for k, v in markers.items()}
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)


def randomize(net, generator):
    """Replace every weight by a random value of sensible scale, so that norms and biases are exercised too."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2 and "scale_shift_table" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def float64_outputs(model, run):
    """run(model64, f): model64 the same diffusers model built in float64 (its RoPE tables too, which a cast copy
    would keep float32-rounded) with the same weights, f casting a float32 input to float64 (exactly)."""
    with torch.no_grad(), float32_is_float64():
        model64 = type(model).from_config(model.config).eval()
        model64.load_state_dict(model.state_dict())
        assert all(v.dtype == torch.float64 for v in model64.state_dict().values())
        return run(model64, lambda v: v.double())


def save_fixture(name, model, tensors):
    path = os.path.join(TESTS, "fixtures", f"wan_{name}.safetensors")
    tensors = {**model.state_dict(), **tensors}
    metadata = {"generator": "tests/generate/make_wan_fixtures.py", "config": model.to_json_string()}
    tensors = keep_committed(path, {k: v.contiguous() for k, v in tensors.items()})
    save_file(tensors, path, metadata=metadata)
    print_float32_error(name, tensors)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB")


def main():
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.modules.pop("torchvision", None)
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    global WanTransformer3DModel, WanVACETransformer3DModel
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    for name, config in REAL.items():
        cls = WanVACETransformer3DModel if "vace_layers" in config else WanTransformer3DModel
        with torch.device("meta"):
            manifest = write_manifest(name, keys(cls(**config)))
        assert sum(math.prod(s) for s in manifest.values()) == PARAMS[name], name

    WanModel, VaceWanModel = official_classes()
    for name, config in OFFICIAL.items():
        with torch.device("meta"):
            model = VaceWanModel(**config) if "vace_layers" in config else WanModel(**config)
        official = write_manifest(f"official-{name}", keys(model))
        check_against_diffusers_converter(official)

    g = torch.Generator().manual_seed(0)
    B, T, H, W = 2, 3, 8, 8
    x = torch.randn(B, 4, T, H, W, generator=g)
    t = torch.tensor([0.1, 0.9], dtype=torch.float64)  # flow times; diffusers takes 1000 t
    t_frames = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.3, 0.999]], dtype=torch.float64)
    text = torch.randn(B, 6, 32, generator=g)

    model = WanTransformer3DModel(**TINY).eval()
    randomize(model, g)
    with torch.no_grad():
        out = model(x, (1000 * t).float(), text).sample
        per_token = (1000 * t_frames).float().repeat_interleave((H // 2) * (W // 2), dim=1)  # (B, F H' W')
        out_frames = model(x, per_token, text).sample
    out64, out_frames64 = float64_outputs(model, lambda m, f: (
        m(f(x), 1000 * t, f(text)).sample,
        m(f(x), (1000 * t_frames).repeat_interleave((H // 2) * (W // 2), dim=1), f(text)).sample,
    ))  # fmt: skip
    save_fixture("t2v", model, {"input.x": x, "input.t": t, "input.t_frames": t_frames, "input.text": text,
                                "output.flow": out, "output.flow_frames": out_frames,
                                "output.flow.f64": out64, "output.flow_frames.f64": out_frames64})  # fmt: skip

    # diffusers splits the image tokens off the front of a 512-token text context: the text must be 512 tokens long
    model = WanTransformer3DModel(**TINY_I2V).eval()
    randomize(model, g)
    long_text = torch.randn(B, 512, 32, generator=g)
    image_tokens = torch.randn(B, 5, 20, generator=g)
    image_latents = torch.randn(B, 8, T, H, W, generator=g)
    with torch.no_grad():
        out = model(torch.cat([x, image_latents], 1), (1000 * t).float(), long_text, image_tokens).sample
    out64 = float64_outputs(
        model, lambda m, f: m(f(torch.cat([x, image_latents], 1)), 1000 * t, f(long_text), f(image_tokens)).sample
    )
    save_fixture("i2v", model, {"input.x": x, "input.t": t, "input.text": long_text, "input.image_tokens": image_tokens,
                                "input.image_latents": image_latents, "output.flow": out,
                                "output.flow.f64": out64})  # fmt: skip

    model = WanVACETransformer3DModel(**TINY_VACE).eval()
    randomize(model, g)
    control = torch.randn(B, 12, T, H, W, generator=g)
    scale = torch.tensor([0.7, 1.3])
    with torch.no_grad():
        out = model(x, (1000 * t).float(), text, control_hidden_states=control, control_hidden_states_scale=scale)
    out64 = float64_outputs(model, lambda m, f: m(
        f(x), 1000 * t, f(text), control_hidden_states=f(control), control_hidden_states_scale=f(scale)
    ).sample)  # fmt: skip
    save_fixture("vace", model, {"input.x": x, "input.t": t, "input.text": text, "input.control": control,
                                 "input.control_scale": scale, "output.flow": out.sample,
                                 "output.flow.f64": out64})  # fmt: skip


if __name__ == "__main__":
    main()
