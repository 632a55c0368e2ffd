"""Write the Cosmos Predict 2.5 key manifests and golden-parity fixture from FastGen's port of the official network.

    git clone https://github.com/NVlabs/FastGen /tmp/fastgen      # checked at 34f30e8
    pip install --target /tmp/oracle-extra einops omegaconf loguru attrs ftfy && pip install --target /tmp/oracle-extra --no-deps imageio
    PYTHONPATH=/tmp/oracle-extra python tests/generate/make_cosmos_predict2_fixtures.py --fastgen_repo /tmp/fastgen

(needs torch, diffusers, transformers and scipy as FastGen imports them at module level; a torchvision that does not
load is replaced by empty modules, since nothing here uses it.)

FastGen's `CosmosPredict2DiT` re-implements the official `MiniTrainDIT` (cosmos-predict2.5, networks/minimal_v4_dit.py)
with the same module names, so its state dict, less FastGen's `transformer.` prefix, is the official checkpoint's
(which prefixes `net.` and adds training counters and Transformer Engine `_extra_state` entries; see the model file).

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/cosmos-predict2.5-2b.json, cosmos-predict2.5-14b.json
                                  keys and shapes of the full-size networks, built on the meta device with the
                                  configs of fastgen/configs/net.py (logvar head off, as there)
  tests/fixtures/cosmos_predict2_tiny.safetensors
                                  a tiny network with random weights (real key names), fixed inputs, and FastGen's
                                  outputs: text2world flow, video2world flow (condition mask, replaced frames, per-frame
                                  times) and x0 (per-sample times), a given padding mask, and block features. Each
                                  output `output.X` is there twice: FastGen in float32, and as `output.X.f64` FastGen
                                  in float64 on the same weights and inputs (cast exactly; its RoPE buffers computed
                                  in float64), float32 meaning float64 throughout (reference_float64.py: the time
                                  embedding, RoPE and the use_wan_fp32_strategy casts too)
"""

import argparse
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
FULL = {  # fastgen/configs/net.py: CosmosPredict2_2B_Config and its 14B override
    "cosmos-predict2.5-2b": dict(model_channels=2048, num_blocks=28, num_heads=16),
    "cosmos-predict2.5-14b": dict(model_channels=5120, num_blocks=36, num_heads=40),
}
TINY = dict(
    model_channels=32,
    num_blocks=2,
    num_heads=2,
    max_img_h=16,
    max_img_w=16,
    max_frames=8,
    in_channels=4,
    out_channels=4,
    crossattn_emb_channels=16,
    crossattn_proj_in_channels=40,
    adaln_lora_dim=8,
)


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """transformers and diffusers probe torchvision at import; where the installed one does not load (a build for
    another torch), stand in for it with empty modules. Nothing used here needs it."""

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


def strip(key):
    assert key.startswith("transformer."), key
    return key[len("transformer.") :]


def randomize(net, generator):
    """Random weights of sensible scale everywhere (FastGen zero-initialises the adaLN up-projections); norm gains
    near 1. The RoPE buffers keep their values."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[1]))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


DIFFUSERS_NAMES = [  # official -> diffusers, in this order (diffusers' convert_cosmos_transformer_checkpoint_to_diffusers)
    ("t_embedder.1", "time_embed.t_embedder"), ("t_embedding_norm", "time_embed.norm"), ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"), ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"), ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"), ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"), ("cross_attn", "attn2"), ("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"),
    ("output_proj", "to_out.0"), ("q_norm", "norm_q"), ("k_norm", "norm_k"), ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"), ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"), ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
]  # fmt: skip


def check_diffusers(tensors):
    """Relative errors of diffusers' CosmosTransformer3DModel against FastGen's outputs (text2world, Video2World)."""
    import torch.nn.functional as F
    from diffusers import CosmosTransformer3DModel
    from diffusers.models.transformers import transformer_cosmos

    class NearestResize:  # diffusers resizes the padding mask with torchvision; the same nearest resize in torch
        class InterpolationMode:
            NEAREST = "nearest"

        class functional:
            @staticmethod
            def resize(x, size, interpolation=None):
                return F.interpolate(x, size=size, mode="nearest")

    transformer_cosmos.transforms = NearestResize
    weights = {}
    for key, value in tensors.items():
        if not key.startswith(("input.", "output.", "pos_embedder.")):  # diffusers recomputes the RoPE tables
            for official, theirs in DIFFUSERS_NAMES:
                key = key.replace(official, theirs)
            weights[key] = value
    net = CosmosTransformer3DModel(
        in_channels=TINY["in_channels"] + 1,  # the condition mask; diffusers adds the padding mask itself
        out_channels=TINY["out_channels"],
        num_attention_heads=TINY["num_heads"],
        attention_head_dim=TINY["model_channels"] // TINY["num_heads"],
        num_layers=TINY["num_blocks"],
        mlp_ratio=4.0,
        text_embed_dim=TINY["crossattn_emb_channels"],
        adaln_lora_dim=TINY["adaln_lora_dim"],
        max_size=(TINY["max_frames"], TINY["max_img_h"], TINY["max_img_w"]),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
        use_crossattn_projection=True,
        crossattn_proj_in_channels=TINY["crossattn_proj_in_channels"],
        encoder_hidden_states_channels=TINY["crossattn_emb_channels"],
    ).eval()
    net.load_state_dict(weights, strict=True)
    x, text, mask = tensors["input.x"], tensors["input.text"], tensors["input.condition_mask"]
    replaced = torch.cat([tensors["input.cond_latents"], x[:, :, 1:]], dim=2)
    no_padding = torch.zeros(1, 1, *x.shape[-2:])
    with torch.no_grad():
        t2w = net(torch.cat([x, torch.zeros_like(mask)], 1), tensors["input.t"], text, fps=24, padding_mask=no_padding)
        v2w = net(torch.cat([replaced, mask], 1), tensors["input.t_frames"][:, None, :, None, None], text, fps=24, padding_mask=no_padding)  # fmt: skip
    for name, out in (("t2w", t2w.sample), ("v2w", v2w.sample)):
        ref = tensors[f"output.{name}"]
        print(f"diffusers {name}: relative error {((out - ref).abs().max() / ref.abs().max()).item():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fastgen_repo", default="/tmp/fastgen")
    args = parser.parse_args()
    sys.meta_path.insert(0, _TorchvisionPlaceholder())
    sys.path.insert(0, args.fastgen_repo)
    from fastgen.networks.cosmos_predict2.network import CosmosPredict2

    for name, sizes in FULL.items():
        with torch.device("meta"):
            net = CosmosPredict2(**sizes, enable_logvar_linear=False)
        manifest = {strip(k): list(v.shape) for k, v in net.state_dict().items()}
        with open(os.path.join(TESTS, "manifests", f"{name}.json"), "w") as f:
            json.dump(manifest, f, indent=0)
        print(name, len(manifest), "keys", sum(math.prod(s) for s in manifest.values()), "numbers")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = CosmosPredict2(**TINY, enable_logvar_linear=False).eval()
    randomize(net, g)
    B, C, T, H, W = 2, 4, 3, 8, 8
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.tensor([0.3, 0.8])
    text = torch.randn(B, 6, 40, generator=g)
    cond_latents = torch.randn(B, C, 1, H, W, generator=g)
    mask = torch.zeros(B, 1, T, H, W)
    mask[:, :, :1] = 1.0
    t_frames = t[:, None] * (1 - mask[:, 0, :, 0, 0])  # conditioned frames at time 0, as FastGen's sampler
    padding = (torch.rand(B, 1, 2 * H, 2 * W, generator=g) > 0.5).float()  # pixel-sized: resized to the latent
    inputs = {
        "input.x": x,
        "input.t": t,
        "input.t_frames": t_frames,
        "input.text": text,
        "input.cond_latents": cond_latents,
        "input.condition_mask": mask,
        "input.padding_mask": padding,
    }
    with torch.no_grad():
        out = outputs(net, inputs)
    with torch.no_grad(), float32_is_float64():
        # Built in float64, so that its RoPE buffers (positions and exponents, not learned) are computed in float64
        # rather than loaded float32-rounded; every learned weight is the float32 one.
        net64 = CosmosPredict2(**TINY, enable_logvar_linear=False).eval()
        missing, unexpected = net64.load_state_dict(
            {k: v for k, v in net.state_dict().items() if ".pos_embedder." not in k}, strict=False
        )
        assert not unexpected and missing and all(".pos_embedder." in k for k in missing), (missing, unexpected)
        assert all(v.dtype == torch.float64 for v in net64.state_dict().values())
        out64 = outputs(net64, {k: v.double() for k, v in inputs.items()})
    tensors = {strip(k): v.contiguous() for k, v in net.state_dict().items()}
    tensors.update({**inputs, **out, **{f"{k}.f64": v for k, v in out64.items()}})
    path = os.path.join(TESTS, "fixtures", "cosmos_predict2_tiny.safetensors")
    tensors = keep_committed(path, {k: v.contiguous() for k, v in tensors.items()})
    save_file(tensors, path, metadata={"config": json.dumps(TINY)})
    print(path, os.path.getsize(path), "bytes")
    print_float32_error("cosmos_predict2_tiny", tensors)
    check_diffusers(tensors)


def outputs(net, inputs):
    """FastGen's outputs on the fixture's inputs."""
    x, t, t_frames, text = (inputs[f"input.{k}"] for k in ("x", "t", "t_frames", "text"))
    v2w = {"text_embeds": text, "conditioning_latents": inputs["input.cond_latents"]}
    v2w["condition_mask"] = inputs["input.condition_mask"]
    out = {
        "output.t2w": net(x, t, text),
        "output.v2w": net(x, t_frames, v2w),
        # x0 with per-sample times: FastGen's conversion does not broadcast per-frame times (B, T) over (B, C, T, H, W)
        "output.v2w_x0": net(x, t, v2w, fwd_pred_type="x0"),
        "output.padding": net(x, t, text, padding_mask=inputs["input.padding_mask"]),
    }
    flow, features = net(x, t, text, feature_indices={0, 1})
    assert torch.equal(flow, out["output.t2w"])
    out["output.features0"], out["output.features1"] = features
    return out


if __name__ == "__main__":
    main()
