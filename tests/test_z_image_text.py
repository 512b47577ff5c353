"""Z-Image's Qwen3 text encoder: parity with diffusers' ZImagePipeline.encode_prompt (tiny random Qwen3, a small
tokenizer with Qwen3's chat template), loading from a pipeline folder and from ComfyUI's single file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dsf.models import z_image
from dsf.models.z_image.text import QWEN3_4B_CONFIG, load_text_encoder, tiny_tokenizer

diffusers = pytest.importorskip("diffusers")
from diffusers import ZImagePipeline  # noqa: E402
from tiny_flux import randomize  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model  # noqa: E402

TINY = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
PROMPTS = ["a cat", "a dog on a mat under a tree", ""]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def reference():
    model = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG | TINY)).eval()
    randomize(model, seed=2)
    return model


def _diffusers_states(model, prompts, max_length=MAX_LENGTH):
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tiny_tokenizer(), transformer=None)
    with torch.no_grad():
        states, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=max_length)
    return states


def _assert_parity(encoder, model, prompts=PROMPTS, max_length=MAX_LENGTH):
    with torch.no_grad():
        embeds, mask = encoder.encode(encoder.params, prompts, max_length)
    reference = _diffusers_states(model, prompts, max_length)
    assert mask.sum(dim=1).tolist() == [len(r) for r in reference]
    for ours, ref, valid in zip(embeds, reference, mask):
        assert float((ours[valid] - ref).abs().max() / ref.abs().max()) <= 1e-4
        assert not ours[~valid].any()  # zero padding


def test_parity_with_encode_prompt(reference):
    encoder = load_text_encoder(reference.state_dict(), tiny_tokenizer(), config=TINY)
    _assert_parity(encoder, reference)


def test_parity_from_pipeline_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "text_encoder")
    tiny_tokenizer().save_pretrained(tmp_path / "pipe" / "tokenizer")
    encoder = load_text_encoder(tmp_path / "pipe")
    assert len(encoder.params["layers"]) == 3  # config.json beside the weights
    _assert_parity(encoder, reference)


def test_parity_from_comfyui_single_file(reference, tmp_path):
    """ComfyUI's qwen_3_4b.safetensors: a causal LM's state dict (``model.`` prefix, lm_head left out)."""
    causal = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B_CONFIG | TINY))
    causal.model.load_state_dict(reference.state_dict())
    save_file({k: v.clone() for k, v in causal.state_dict().items()}, tmp_path / "qwen_3_4b.safetensors")
    encoder = load_text_encoder(tmp_path / "qwen_3_4b.safetensors", tiny_tokenizer(), config=TINY)
    _assert_parity(encoder, reference)


def test_parity_detects_the_wrong_hidden_state(reference, monkeypatch):
    """The check is sharp: the last hidden state instead of the second-to-last fails it."""
    encoder = load_text_encoder(reference.state_dict(), tiny_tokenizer(), config=TINY)
    monkeypatch.setattr(z_image.text, "HIDDEN_STATE", -1)
    with pytest.raises(AssertionError):
        _assert_parity(encoder, reference)


def test_long_prompts_are_cut_with_a_warning(reference):
    encoder = load_text_encoder(reference.state_dict(), tiny_tokenizer(), config=TINY, max_length=20)
    with pytest.warns(UserWarning, match=r"tokens; the encoder takes 20"):
        _, mask = encoder.encode(encoder.params, ["a very long prompt about cats"])
    assert mask.shape == (1, 20)


def test_full_size_shapes_are_qwen3_4b():
    shapes = z_image.text.decoder_lm.lm_shapes(z_image.text.text_encoder_stack())
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 4_022_468_096
    assert shapes["layers.35.self_attn.k_proj.weight"] == (1024, 2560)
