"""encoders.py on tiny random encoders: the conditioning each family's network expects, and the prompt cache."""

import torch

import encoders
from encoders import ImageEncoder, TextEncoder, cached_embeddings

PROMPTS = ["a red fox in snow", "two cats"]


def test_each_family_gives_its_networks_conditioning():
    sdxl = TextEncoder("sdxl", tiny={"clip": 32, "clip2": 24})
    cond = sdxl(PROMPTS)
    ids, _ = encoders.byte_tokens(PROMPTS, 77)
    second = sdxl.models["clip2"](ids, output_hidden_states=True)
    assert cond["text"].shape == (2, 77, 56) and torch.equal(cond["text"][..., 32:], second.hidden_states[-2])
    assert torch.equal(cond["pooled"], second.text_embeds)  # the projected pooled output of the second encoder

    flux = TextEncoder("flux", tiny={"clip": 16, "t5": 32})(PROMPTS)
    assert flux["text"].shape == (2, 512, 32) and flux["pooled"].shape == (2, 16)

    sd15 = TextEncoder("sd15", tiny={"clip": 32})(PROMPTS)
    assert sd15["text"].shape == (2, 77, 32) and sd15["text_mask"].sum(1).tolist() == [18, 9]  # bytes + end token


def test_wan_states_are_zero_beyond_each_prompt():
    cond = TextEncoder("wan", tiny={"umt5": 32})(PROMPTS)["text"]
    lengths = [len(p.encode()) + 1 for p in PROMPTS]
    for row, n in zip(cond, lengths):
        assert row[:n].abs().sum(-1).min() > 0 and row[n:].abs().max() == 0


def test_cosmos_concatenates_standardised_layers():
    cond = TextEncoder("cosmos", tiny={"qwen": 20})(PROMPTS)["text"]
    assert cond.shape == (2, 512, 40)  # 2 layers x 20 channels
    for layer in cond.split(20, dim=-1):
        assert layer.mean(-1).abs().max() < 1e-5 and (layer.std(-1) - 1).abs().max() < 1e-3


def test_prompts_are_encoded_once(tmp_path, monkeypatch):
    encoder = TextEncoder("cogvideox", tiny={"t5": 32})
    first = cached_embeddings(encoder, ["b", "a", "b"], tmp_path)
    assert first["text"].shape == (3, 226, 32) and torch.equal(first["text"][0], first["text"][2])
    assert len(list(tmp_path.iterdir())) == 2
    monkeypatch.setattr(TextEncoder, "__call__", lambda self, prompts: (_ for _ in ()).throw(AssertionError(prompts)))
    again = cached_embeddings(encoder, ["a", "b"], tmp_path)  # from disk: the encoder is not called
    assert torch.equal(again["text"], first["text"][[1, 0]])


def test_image_encoder_penultimate_state():
    encoder = ImageEncoder(tiny=32)
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, 5, 32)  # 28 px / 14 = 2 x 2 patches + the class token
    assert not torch.equal(tokens[0], tokens[1])
