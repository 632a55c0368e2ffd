"""Text and image encoders of the text-to-image and video families (from `transformers`), and a prompt cache.

The networks in models/ take their conditioning as tensors; this file turns prompts (and, for Wan I2V, images) into
those tensors the way FastGen and the reference pipelines do:

    family     encoders (Hub subfolders)                        conditioning
    sd15       CLIP-L (text_encoder)                            text: last hidden state (B, 77, 768); text_mask (B, 77)
    sdxl       CLIP-L + OpenCLIP bigG (text_encoder, _2)        text: both penultimate states (B, 77, 2048);
                                                                pooled: bigG's projected output (B, 1280)
    flux       CLIP-L + T5-XXL (text_encoder, _2)               text: T5 last hidden state (B, 512, 4096);
                                                                pooled: CLIP pooled output (B, 768)
    wan        UMT5-XXL (text_encoder)                          text: last hidden state (B, 512, 4096), zero beyond
                                                                each prompt's length
    cogvideox  T5-XXL (text_encoder)                            text: last hidden state (B, 226, 4096)
    cosmos     Cosmos-Reason1-7B (Qwen2.5-VL, its own repo)     text: the chat-templated prompt's 28 decoder-layer
                                                                states, each standardised, concatenated (B, 512, 100352)
    Wan I2V    CLIP ViT-H/14 (image_encoder)                    image_tokens: penultimate state (B, 257, 1280)

Left out: FastGen's "any empty prompt empties the batch" quirk of its SD/CogVideoX encoders, and Wan's ftfy prompt
cleaning (whitespace is normalised here; fix mis-encoded text in the prompts themselves).

`tiny=` builds random encoders of the same classes with the given widths (to match a tiny denoiser) and tokenises a
prompt by its UTF-8 bytes, so the whole code path runs offline in seconds; such embeddings carry no meaning.

    encoder = TextEncoder("flux", "black-forest-labs/FLUX.1-dev", device="cuda", dtype=torch.bfloat16)
    cond = cached_embeddings(encoder, ["a red fox in snow"], "cache/flux")   # {"text": (1, 512, 4096), "pooled": (1, 768)}
"""

import hashlib
import os

import torch
from safetensors.torch import load_file, save_file

# family -> its text encoders: (name, transformers class, model subfolder, tokenizer subfolder, tokens)
ENCODERS = {
    "sd15": (("clip", "CLIPTextModel", "text_encoder", "tokenizer", 77),),
    "sdxl": (
        ("clip", "CLIPTextModel", "text_encoder", "tokenizer", 77),
        ("clip2", "CLIPTextModelWithProjection", "text_encoder_2", "tokenizer_2", 77),
    ),
    "flux": (
        ("clip", "CLIPTextModel", "text_encoder", "tokenizer", 77),
        ("t5", "T5EncoderModel", "text_encoder_2", "tokenizer_2", 512),
    ),
    "wan": (("umt5", "UMT5EncoderModel", "text_encoder", "tokenizer", 512),),
    "cogvideox": (("t5", "T5EncoderModel", "text_encoder", "tokenizer", 226),),
    "cosmos": (("qwen", "Qwen2_5_VLForConditionalGeneration", "", "", 512),),
}
COSMOS_TEXT_REPO = "nvidia/Cosmos-Reason1-7B"
COSMOS_SYSTEM = "You are a helpful assistant who will provide prompts to an image generator."
TINY_VOCAB = 1000
TINY_EOS = 1  # tiny prompts end with this id (CLIP pools at the end-of-text token); 0 pads


def tiny_config(cls_name, width):
    """A random, tiny transformers config of the class `cls_name` with hidden width `width`."""
    import transformers

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=TINY_EOS, eos_token_id=TINY_EOS, pad_token_id=0)
    if cls_name.startswith("CLIPText"):
        return transformers.CLIPTextConfig(**common, hidden_size=width, intermediate_size=2 * width,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           projection_dim=width)  # fmt: skip
    if cls_name in ("T5EncoderModel", "UMT5EncoderModel"):
        config_cls = transformers.T5Config if cls_name == "T5EncoderModel" else transformers.UMT5Config
        return config_cls(**common, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                          relative_attention_max_distance=16)  # fmt: skip
    if cls_name == "Qwen2_5_VLForConditionalGeneration":
        heads = 2
        half_head = width // heads // 2  # M-RoPE splits half the head dim over (time, height, width)
        sections = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
        text = dict(vocab_size=TINY_VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                    num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=1024,
                    rope_scaling={"type": "mrope", "mrope_section": sections}, pad_token_id=0, bos_token_id=TINY_EOS,
                    eos_token_id=TINY_EOS)  # fmt: skip
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                      window_size=56)  # fmt: skip
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    if cls_name == "CLIPVisionModel":
        return transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    raise ValueError(f"no tiny config for {cls_name}")


def byte_tokens(prompts, length):
    """The tiny stand-in for a tokenizer: UTF-8 bytes shifted past the special ids, the end id, zero padding."""
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        row = [2 + b % (TINY_VOCAB - 2) for b in prompt.encode()][: length - 1] + [TINY_EOS]
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long()


class TextEncoder:
    """The text encoders of one family, loaded lazily from `source` (a Hub repo id or a local pipeline folder).

    Calling it with a list of prompts returns the family's conditioning dict (see the module docstring), float32 on
    `device`. `tiny`: {encoder name: width} builds random tiny encoders instead (no download)."""

    def __init__(self, family, source=None, tiny=None, device="cpu", dtype=torch.float32):
        if family not in ENCODERS:
            raise ValueError(f"unknown family {family!r}; expected one of {', '.join(ENCODERS)}")
        if family == "cosmos" and source is None:
            source = COSMOS_TEXT_REPO
        if source is None and tiny is None:
            raise ValueError(f"give the {family} pipeline's Hub repo or local folder, or tiny widths")
        self.family, self.source, self.tiny, self.device, self.dtype = family, source, tiny, device, dtype
        self.models, self.tokenizers = {}, {}

    def _load(self, name, cls_name, subfolder, tokenizer_folder):
        import transformers

        cls = getattr(transformers, cls_name)
        if self.tiny is not None:
            torch.manual_seed(0)  # the same tiny encoder in every process and run
            model = cls(tiny_config(cls_name, self.tiny[name]))
        else:
            where = dict(subfolder=subfolder) if subfolder else {}
            model = cls.from_pretrained(self.source, dtype=self.dtype, **where)
            folder = dict(subfolder=tokenizer_folder) if tokenizer_folder else {}
            self.tokenizers[name] = transformers.AutoTokenizer.from_pretrained(self.source, **folder)
        self.models[name] = model.to(self.device, self.dtype).eval().requires_grad_(False)

    def _tokens(self, name, prompts, length):
        if self.tiny is not None:
            ids, mask = byte_tokens(prompts, length)
        else:
            batch = self.tokenizers[name](prompts, padding="max_length", max_length=length, truncation=True,
                                          return_tensors="pt")  # fmt: skip
            ids, mask = batch.input_ids, batch.attention_mask
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def __call__(self, prompts):
        prompts = [" ".join(p.split()) for p in prompts]  # whitespace normalised, as the Wan and Cosmos pipelines do
        states = {}
        for name, cls_name, subfolder, tokenizer_folder, length in ENCODERS[self.family]:
            if name not in self.models:
                self._load(name, cls_name, subfolder, tokenizer_folder)
            model = self.models[name]
            if name == "qwen":
                states[name] = self._cosmos(model, prompts, length)
                continue
            ids, mask = self._tokens(name, prompts, length)
            takes_mask = name == "umt5"  # UMT5 attends with the mask; CLIP (causal) and T5 as their pipelines: none
            out = model(ids, attention_mask=mask if takes_mask else None, output_hidden_states=True)
            states[name] = (out, mask)
        return {k: v.float() for k, v in self._conditioning(states).items()}

    def _cosmos(self, model, prompts, length):
        """Cosmos-Reason1: chat template, padded to `length`, no attention mask; every decoder layer's output
        standardised over channels ((h - mean) / (std + 1e-8)) and concatenated."""
        if self.tiny is not None:
            ids, _ = byte_tokens(prompts, length)
        else:
            tokenizer = self.tokenizers.setdefault("qwen", self._cosmos_tokenizer())
            texts = [tokenizer.apply_chat_template([{"role": "system", "content": COSMOS_SYSTEM},
                                                    {"role": "user", "content": p}],
                                                   tokenize=False, add_generation_prompt=False) for p in prompts]  # fmt: skip
            ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids  # fmt: skip
        hidden = model(ids.to(self.device), output_hidden_states=True).hidden_states[1:]
        return torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hidden], dim=-1)

    def _cosmos_tokenizer(self):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.source)

    def _conditioning(self, states):
        f = self.family
        if f == "sd15":
            out, mask = states["clip"]
            return {"text": out.last_hidden_state, "text_mask": mask}
        if f == "sdxl":
            (one, _), (two, _) = states["clip"], states["clip2"]
            return {
                "text": torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1),
                "pooled": two.text_embeds,
            }
        if f == "flux":
            return {"text": states["t5"][0].last_hidden_state, "pooled": states["clip"][0].pooler_output}
        if f == "wan":
            out, mask = states["umt5"]
            return {"text": out.last_hidden_state * mask[..., None]}  # zero beyond each prompt's length
        if f == "cogvideox":
            return {"text": states["t5"][0].last_hidden_state}
        return {"text": states["qwen"]}


class ImageEncoder:
    """Wan I2V's CLIP ViT-H/14 (`image_encoder/`): images in [-1, 1] (B, 3, H, W) -> penultimate hidden state
    (B, 257, 1280). The images are resized (bicubic) to the tower's input size and normalised with CLIP's mean and
    standard deviation, as its image processor does for square inputs."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, source=None, tiny=None, device="cpu", dtype=torch.float32):
        import transformers

        if tiny is not None:
            torch.manual_seed(0)
            model = transformers.CLIPVisionModel(tiny_config("CLIPVisionModel", tiny))
        else:
            model = transformers.CLIPVisionModel.from_pretrained(source, subfolder="image_encoder", dtype=dtype)
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images):
        size = self.model.config.image_size
        x = torch.nn.functional.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic").clamp(0, 1)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.MEAN, self.STD))
        pixels = ((x.to(self.device) - mean.to(self.device)) / std.to(self.device)).to(self.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].float()


def prompt_key(encoder, prompt):
    tag = f"{encoder.family}|{encoder.source}|{sorted(encoder.tiny.items()) if encoder.tiny else ''}|{prompt}"
    return hashlib.sha256(tag.encode()).hexdigest()[:24]


def cached_embeddings(encoder, prompts, cache_dir, batch_size=8):
    """The conditioning of `prompts`, each encoded once and kept in `cache_dir` (one safetensors file per prompt and
    encoder, written atomically), so that training never holds the text encoders after its first pass. Returns the
    stacked dict, on the CPU."""
    os.makedirs(cache_dir, exist_ok=True)
    paths = [os.path.join(cache_dir, prompt_key(encoder, p) + ".safetensors") for p in prompts]
    missing = sorted({p for p, path in zip(prompts, paths) if not os.path.exists(path)})
    for i in range(0, len(missing), batch_size):
        chunk = missing[i : i + batch_size]
        cond = encoder(chunk)
        for j, prompt in enumerate(chunk):
            path = os.path.join(cache_dir, prompt_key(encoder, prompt) + ".safetensors")
            save_file({k: v[j : j + 1].contiguous().cpu() for k, v in cond.items()}, path + ".tmp", metadata={"prompt": prompt})  # fmt: skip
            os.replace(path + ".tmp", path)
    loaded = [load_file(path) for path in paths]
    return {k: torch.cat([d[k] for d in loaded]) for k in loaded[0]} if loaded else {}
