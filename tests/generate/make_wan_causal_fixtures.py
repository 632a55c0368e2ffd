"""Write the causal-Wan golden-parity fixture from the official Self-Forcing code (guandeh17/Self-Forcing).

    pip install diffusers einops                                           # with requirements-dev.txt
    git clone https://github.com/guandeh17/Self-Forcing /tmp/Self-Forcing  # checked at commit 33593df
    SF_REPO=/tmp/Self-Forcing python tests/generate/make_wan_causal_fixtures.py  # from the repository root

Output (committed; the tests need only torch and safetensors): tests/fixtures/wan_causal_tiny.safetensors, holding
  - the weights of a tiny `CausalWanModel` (wan/modules/causal_model.py) with random values, under its own key names
    (the official Wan layout that Self-Forcing's .pt files use, without their `model.` prefix);
  - inputs: `input.noise` (B, C, F, H, W) (our layout; theirs is (B, F, C, H, W)), `input.text` (B, 8, 32) with the
    last tokens zero as their umT5 encoder leaves them, and `input.x` / `input.t_frames` for one full-clip pass;
  - `output.full`: their block-causal full-clip pass (`_forward_train`, FlexAttention mask), 3 frames per block;
  - `output.inference.*`: their `CausalInferencePipeline.inference` (pipeline/causal_inference.py), 3 latent frames per
    block as configs/self_forcing_dmd.yaml, call by call: the input of each network call, its timestep (B, F) in
    their 0..1000 units, its flow output, whether it is the cache-writing pass at the context timestep (`commit`); the
    Gaussian draws with which it re-noised between steps, the generated latents, and the KV cache at the end;
  - `output.training.*`: their `SelfForcingTrainingPipeline.inference_with_trajectory` (the training rollout,
    pipeline/self_forcing_training.py) the same way, with its exit-step draw (`exit_flags`, same_step_across_blocks)
    and the timestep range it returns for the DMD loss;
  - `output.denoising_step_list`: the step list both pipelines use: configs/self_forcing_dmd.yaml's [1000, 750, 500,
    250] with warp_denoising_step, i.e. looked up in the FlowMatchScheduler table of the generator wrapper
    (shift 5 from model_kwargs.timestep_shift, sigma_min 0, extra_one_step; utils/scheduler.py).
Every float output is there from their code run in float64 (`.f64`): the module cast with .double(), float32 meaning
float64 throughout (reference_float64.py; their only float32 island is WanRMSNorm's `.float()`), and a run that stops
at the first operation that still takes or makes a float32 tensor. `output.full` and `output.inference.latents` are
also there from a float32 run, which prints the reference's own float32 error.

What is patched to run their code on a CPU, none of it changing the math:
  1. `flash_attention` (wan/modules/model.py, the cross-attention) and `attention` (wan/modules/attention.py, the
     KV-cache self-attention): flash-attn is CUDA-only and casts q, k, v to bfloat16; the CPU fallback of `attention`
     casts them to bfloat16 too. Both calls pass no lengths, no window, no causal flag and the default scale, so they
     are softmax(q k^T / sqrt(d)) v, which torch's scaled_dot_product_attention computes here in the inputs' dtype.
  2. `flex_attention` (the full-clip pass, torch.compile'd for CUDA): scaled_dot_product_attention with the dense
     boolean mask that their own mask_mod (kept on their BlockMask) gives for every (query, key) pair of the padded
     length; FlexAttention applies exactly that mask with the same default scale.
  3. The pipelines' cache allocation (`_initialize_kv_cache`, `_initialize_crossattn_cache`, `num_transformer_blocks`,
     `frame_seq_length`) hard-codes Wan-1.3B's 30 layers, 12 heads x 128, 1560 tokens a frame and a 32760-token
     cache: the same dicts are made with the tiny model's sizes. Their attention reads only the filled part.
  4. `WanDiffusionWrapper` loads `wan_models/Wan2.1-T2V-1.3B/` with CausalWanModel.from_pretrained: it is given the
     tiny model instead. Their text encoder and VAE are not built (stand-ins return the text embedding and the
     latents); the modules they import (umT5, tokenizer, VAE, demo_utils.memory, which calls CUDA at import) are
     empty stand-ins.
  5. The training rollout broadcasts its exit draw (torch.distributed, identity in one process) and looks the
     timestep range up on `.cuda()` tensors: the broadcast is a no-op and `.cuda()` returns the tensor itself.
Their code is imported from its folder (never copied here); its randomness (noise, the re-noising draws, the exit
draw) comes from torch's global generator, seeded below, and the draws are recorded as they are made.
"""

import json
import math
import os
import subprocess
import sys
import types
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from reference64 import NoFloat32
from reference_float64 import float32_is_float64, keep_committed, print_float32_error
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
SF_REPO = os.environ.get("SF_REPO", "/tmp/Self-Forcing")

# The tiny model: the sizes of models/wan.py's "tiny" config, under CausalWanModel's argument names.
TINY = dict(model_type="t2v", in_dim=4, out_dim=4, dim=24, ffn_dim=48, freq_dim=16, text_dim=32, num_heads=2,
            num_layers=2, text_len=8)  # fmt: skip
B, F_, H, W = 1, 6, 8, 4  # latent frames, rows, columns: 4 x 2 tokens a frame, two blocks of 3 frames
TOKENS_PER_FRAME = (H // 2) * (W // 2)
FRAMES_PER_BLOCK = 3  # configs/self_forcing_dmd.yaml num_frame_per_block
STEPS = [1000, 750, 500, 250]  # configs/self_forcing_dmd.yaml denoising_step_list (warp_denoising_step: true)
SHIFT = 5.0  # its model_kwargs.timestep_shift
CONTEXT_NOISE = 0  # configs/default_config.yaml context_noise
FLOAT32 = ("output.full", "output.inference.latents", "output.denoising_step_list")  # also run in float32


def import_self_forcing():
    """Their modules, imported from SF_REPO without the package __init__ files (which build the whole pipeline) and
    with empty stand-ins for what only the text encoder, the VAE and GPU memory management use."""
    sys.path.insert(0, SF_REPO)
    for name in ("wan", "wan.modules", "pipeline", "utils", "demo_utils"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(SF_REPO, *name.split("."))]
        sys.modules[name] = module
    stand_ins = {
        "wan.modules.tokenizers": ["HuggingfaceTokenizer"],
        "wan.modules.t5": ["umt5_xxl"],
        "wan.modules.vae": ["_video_vae"],
        "demo_utils.memory": ["gpu", "get_cuda_free_memory_gb", "DynamicSwapInstaller",
                              "move_model_to_device_with_memory_preservation"],
    }  # fmt: skip
    for name, attrs in stand_ins.items():
        module = types.ModuleType(name)
        for attr in attrs:
            setattr(module, attr, None)
        sys.modules[name] = module
    import pipeline.causal_inference as causal_inference
    import pipeline.self_forcing_training as self_forcing_training
    import utils.wan_wrapper as wan_wrapper
    import wan.modules.causal_model as causal_model
    import wan.modules.model as model

    # Patch 1: attention without flash-attn and without the bfloat16 casts (same softmax(q k^T / sqrt(d)) v).
    def attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
                  window_size=(-1, -1), deterministic=False, dtype=None, version=None, fa_version=None):  # fmt: skip
        assert q_lens is None and k_lens is None and dropout_p == 0 and softmax_scale is None and q_scale is None
        assert not causal and tuple(window_size) == (-1, -1)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    model.flash_attention = attention
    causal_model.attention = attention

    # Patch 2: FlexAttention as attention under the dense mask of their own mask_mod.
    def flex_attention(query, key, value, block_mask):
        from torch.nn.attention.flex_attention import create_mask

        mask = create_mask(block_mask.mask_mod, None, None, query.shape[2], key.shape[2], device=query.device)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    causal_model.flex_attention = flex_attention

    # Patch 5: one process, no CUDA.
    self_forcing_training.dist = types.SimpleNamespace(
        is_initialized=lambda: False, get_rank=lambda: 0, broadcast=lambda tensor, src: None
    )
    return causal_model, wan_wrapper, causal_inference, self_forcing_training


def randomize(net, generator):
    """Random weights of sensible scale (norms near 1, small biases and modulation tables), as make_wan_fixtures."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2 and "modulation" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def tiny_caches(pipe, model, dtype):
    """Patch 3: the pipelines' KV and cross-attention caches with the tiny model's sizes (their dicts, their keys)."""
    heads, head_dim, layers = model.num_heads, model.dim // model.num_heads, len(model.blocks)
    pipe.num_transformer_blocks, pipe.frame_seq_length = layers, TOKENS_PER_FRAME

    def kv_cache(batch_size, dtype, device):
        pipe.kv_cache1 = [
            {
                "k": torch.zeros([batch_size, F_ * TOKENS_PER_FRAME, heads, head_dim], dtype=dtype, device=device),
                "v": torch.zeros([batch_size, F_ * TOKENS_PER_FRAME, heads, head_dim], dtype=dtype, device=device),
                "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
            }
            for _ in range(layers)
        ]

    def crossattn_cache(batch_size, dtype, device):
        pipe.crossattn_cache = [
            {
                "k": torch.zeros([batch_size, model.text_len, heads, head_dim], dtype=dtype, device=device),
                "v": torch.zeros([batch_size, model.text_len, heads, head_dim], dtype=dtype, device=device),
                "is_init": False,
            }
            for _ in range(layers)
        ]

    pipe._initialize_kv_cache, pipe._initialize_crossattn_cache = kv_cache, crossattn_cache


class Recorder:
    """Wraps their WanDiffusionWrapper: records each network call (input, timestep, flow output) in our layout."""

    def __init__(self, wrapper):
        self.wrapper, self.calls = wrapper, []

    def __getattr__(self, name):
        return getattr(self.wrapper, name)

    def __call__(self, **kwargs):
        flow, x0 = self.wrapper(**kwargs)
        self.calls.append(
            {
                "x": kwargs["noisy_image_or_video"].permute(0, 2, 1, 3, 4).clone(),
                "t": kwargs["timestep"].clone(),
                "flow": flow.permute(0, 2, 1, 3, 4).clone(),
                "commit": bool((kwargs["timestep"] == CONTEXT_NOISE).all()),
                "start": kwargs["current_start"] // TOKENS_PER_FRAME,
            }
        )
        return flow, x0


@contextmanager
def recorded_draws(draws):
    """torch.randn_like as it is, each draw also kept (their re-noising), in our layout."""
    original = torch.randn_like

    def randn_like(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        draws.append(out.unflatten(0, (B, -1)).permute(0, 2, 1, 3, 4).clone())  # (B F, C, H, W) -> (B, C, F, H, W)
        return out

    torch.randn_like = randn_like
    try:
        yield
    finally:
        torch.randn_like = original


@contextmanager
def cuda_is_cpu():
    """Patch 5: `.cuda()` in the training rollout's timestep lookup returns the tensor itself."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def run(sf, weights, noise, text, x, t_frames, float64, exit_seed):
    """Everything from their code, in float32 or (float64=True) in float64; returns the outputs by fixture name."""
    causal_model, wan_wrapper, causal_inference, self_forcing_training = sf
    suffix = ".f64" if float64 else ""
    with float32_is_float64() if float64 else nullcontext():
        model = causal_model.CausalWanModel(**TINY).eval()
        model.load_state_dict(weights)
        if float64:
            model = model.double()
            assert all(v.dtype == torch.float64 for v in model.state_dict().values())
            noise, text, x = noise.double(), text.double(), x.double()
        cast = (lambda v: v.double()) if float64 else (lambda v: v)
        with NoFloat32() if float64 else nullcontext(), torch.no_grad():
            out = {}
            # The block-causal full-clip pass (their _forward_train builds the mask from num_frame_per_block).
            model.num_frame_per_block = FRAMES_PER_BLOCK
            full = model(x, t=cast(1000 * t_frames), context=text, seq_len=F_ * TOKENS_PER_FRAME)
            out["output.full" + suffix] = full
            model.block_mask = None

            # The generator wrapper with its scheduler (patch 4: the tiny model instead of from_pretrained).
            from_pretrained = causal_model.CausalWanModel.from_pretrained
            causal_model.CausalWanModel.from_pretrained = lambda *a, **k: model
            try:
                wrapper = wan_wrapper.WanDiffusionWrapper(timestep_shift=SHIFT, is_causal=True)
            finally:
                causal_model.CausalWanModel.from_pretrained = from_pretrained

            # Inference: CausalInferencePipeline.inference with the DMD config's arguments.
            args = types.SimpleNamespace(denoising_step_list=STEPS, warp_denoising_step=True,
                                         num_frame_per_block=FRAMES_PER_BLOCK, independent_first_frame=False,
                                         context_noise=CONTEXT_NOISE)  # fmt: skip
            recorder = Recorder(wrapper)
            pipe = causal_inference.CausalInferencePipeline(
                args, device="cpu", generator=recorder,
                text_encoder=lambda text_prompts: {"prompt_embeds": text},
                vae=types.SimpleNamespace(decode_to_pixel=lambda latents, use_cache=False: latents),
            )  # fmt: skip
            tiny_caches(pipe, model, noise.dtype)
            out["output.denoising_step_list" + suffix] = pipe.denoising_step_list.clone()
            draws = []
            torch.manual_seed(1)
            with recorded_draws(draws):
                _, latents = pipe.inference(noise.permute(0, 2, 1, 3, 4), ["a prompt"], return_latents=True)
            out["output.inference.latents" + suffix] = latents.permute(0, 2, 1, 3, 4)
            if float64:
                out.update(calls("output.inference", recorder.calls, draws))
                for i, layer in enumerate(pipe.kv_cache1):
                    out[f"output.inference.cache.{i}.k.f64"] = layer["k"].clone()
                    out[f"output.inference.cache.{i}.v.f64"] = layer["v"].clone()

            # Training: SelfForcingTrainingPipeline.inference_with_trajectory, its exit step drawn by its own code.
            recorder = Recorder(wrapper)
            train = self_forcing_training.SelfForcingTrainingPipeline(
                denoising_step_list=pipe.denoising_step_list, scheduler=wrapper.get_scheduler(), generator=recorder,
                num_frame_per_block=FRAMES_PER_BLOCK, independent_first_frame=False, same_step_across_blocks=True,
                last_step_only=False, num_max_frames=F_, context_noise=CONTEXT_NOISE,
            )  # fmt: skip
            tiny_caches(train, model, noise.dtype)
            draws = []
            torch.manual_seed(exit_seed)
            with recorded_draws(draws), cuda_is_cpu():
                latents, t_from, t_to, steps = train.inference_with_trajectory(
                    noise.permute(0, 2, 1, 3, 4), return_sim_step=True, prompt_embeds=text
                )
            if float64:
                out.update(calls("output.training", recorder.calls, draws))
                out["output.training.latents.f64"] = latents.permute(0, 2, 1, 3, 4)
                out["output.training.exit_step"] = torch.tensor(steps - 1)
                out["output.training.timestep_range"] = torch.tensor([t_from, t_to])
    return out


def calls(prefix, records, draws):
    """The recorded calls as fixture tensors (float64 run)."""
    out = {f"{prefix}.draws.f64": torch.stack(draws), f"{prefix}.commit": torch.tensor([c["commit"] for c in records]),
           f"{prefix}.start": torch.tensor([c["start"] for c in records])}  # fmt: skip
    for i, c in enumerate(records):
        out.update({f"{prefix}.{i}.x.f64": c["x"], f"{prefix}.{i}.t.f64": c["t"], f"{prefix}.{i}.flow.f64": c["flow"]})
    return out


def main():
    sf = import_self_forcing()
    git = subprocess.run(["git", "-C", SF_REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = os.environ.get("SF_COMMIT", git)  # SF_COMMIT for a copy that is not a git checkout

    g = torch.Generator().manual_seed(0)
    model = sf[0].CausalWanModel(**TINY).eval()
    randomize(model, g)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    noise = torch.randn(B, 4, F_, H, W, generator=g)
    text = torch.randn(B, TINY["text_len"], TINY["text_dim"], generator=g)
    text[:, 5:] = 0  # their umT5 encoder zeroes the states past each prompt
    x = torch.randn(B, 4, F_, H, W, generator=g)
    t_frames = torch.tensor([[0.9, 0.9, 0.9, 0.3, 0.3, 0.3]], dtype=torch.float64)

    # The training rollout's exit step: their own draw (torch.randint over the 4 steps, global generator); a seed whose
    # first draw is an inner step, so that the rollout stops before the last step.
    exit_seed = next(s for s in range(100) if torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(s))[0] == 1)  # fmt: skip

    out32 = run(sf, weights, noise, text, x, t_frames, float64=False, exit_seed=exit_seed)
    out64 = run(sf, weights, noise, text, x, t_frames, float64=True, exit_seed=exit_seed)
    assert set(out32) == set(FLOAT32) and all(key + ".f64" in out64 for key in FLOAT32)
    tensors = {**weights, "input.noise": noise, "input.text": text, "input.x": x, "input.t_frames": t_frames}
    tensors.update(out32)
    tensors.update(out64)

    path = os.path.join(TESTS, "fixtures", "wan_causal_tiny.safetensors")
    metadata = {"generator": "tests/generate/make_wan_causal_fixtures.py", "self_forcing_commit": commit,
                "config": json.dumps(dict(TINY, num_frame_per_block=FRAMES_PER_BLOCK, denoising_step_list=STEPS,
                                          warp_denoising_step=True, timestep_shift=SHIFT,
                                          context_noise=CONTEXT_NOISE))}  # fmt: skip
    tensors = keep_committed(path, {k: v.contiguous() for k, v in tensors.items()})
    save_file(tensors, path, metadata=metadata)
    print_float32_error(
        "wan_causal", {k: v for k, v in tensors.items() if k in FLOAT32 or k[: -len(".f64")] in FLOAT32}
    )
    print(f"their exit step {int(tensors['output.training.exit_step'])}, timestep range "
          f"{tensors['output.training.timestep_range'].tolist()}, steps {tensors['output.denoising_step_list.f64']}")  # fmt: skip
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
