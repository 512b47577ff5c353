"""Qwen-Image's text encoder against diffusers' QwenImagePipeline.encode_prompt: a tiny random Qwen2.5-VL
(language model and vision tower, as the pipeline folder holds it) and a Qwen2 tokenizer with the chat special
tokens, loaded from a pipeline folder, a single file and a state dict; batched prompts of different lengths,
the template's system part dropped, long prompts cut with a warning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dsf.models.qwen_image import text as qwen_text
from dsf.models.qwen_image.tiny import TEXT_TINY, tiny_tokenizer

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImagePipeline  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

VISION_TINY = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
               "fullatt_block_indexes": [0]}
PROMPTS = ["a red cat on the wall", "a dog", "a blue sign that says hello"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reference(tokenizer):
    text = qwen_text.QWEN25_VL_7B_CONFIG | TEXT_TINY | {"vocab_size": len(tokenizer)}  # Qwen-Image's, made tiny
    config = Qwen2_5_VLConfig(text_config=text, vision_config=VISION_TINY)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norm scales off 1 too
    return model


def _diffusers_embeds(model, tokenizer, prompts, max_sequence_length=512):
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_sequence_length)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


def _assert_parity(encoder, reference, tokenizer, prompts=PROMPTS):
    expected, expected_mask = _diffusers_embeds(reference, tokenizer, prompts, encoder.max_sequence_length)
    with torch.no_grad():
        embeds, mask = encoder.encode(encoder.params, prompts)
    assert torch.equal(mask, expected_mask)
    assert embeds.shape == expected.shape
    assert float((embeds - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert not embeds[~mask].any()  # zero-padded


def test_parity_from_pipeline_folder(reference, tokenizer, tmp_path):
    reference.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "model_index.json").write_text("{}")
    encoder = qwen_text.load_text_encoder(tmp_path)
    assert encoder.tokenizer.tokenize("<|im_start|>user") == ["<|im_start|>", "user"]
    _assert_parity(encoder, reference, tokenizer)


def test_parity_from_a_comfyui_style_single_file(reference, tokenizer, tmp_path):
    """ComfyUI's qwen_2.5_vl_7b.safetensors holds the whole model (vision tower too) under its own names."""
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "qwen_2.5_vl_7b.safetensors")
    config = {"text_config": TEXT_TINY | {"vocab_size": len(tokenizer)}}
    encoder = qwen_text.load_text_encoder(tmp_path / "qwen_2.5_vl_7b.safetensors", tokenizer, config=config)
    _assert_parity(encoder, reference, tokenizer)
    _assert_parity(encoder, reference, tokenizer, prompts=["hello"])  # one prompt: diffusers gives no mask


def test_the_system_part_of_the_template_is_dropped(reference, tokenizer):
    """The embeddings start at the prompt's first token: 'a dog' gives 2 + 5 states ('<|im_end|>', '\\n',
    '<|im_start|>', 'assistant', '\\n' follow it)."""
    encoder = qwen_text.load_text_encoder(dict(reference.state_dict()), tokenizer, config=TEXT_TINY | {"vocab_size": len(tokenizer)})
    _, mask = encoder.encode(encoder.params, ["a dog"])
    assert mask.shape == (1, 7)


def test_a_long_prompt_is_cut_with_a_warning(reference, tokenizer):
    config = TEXT_TINY | {"vocab_size": len(tokenizer)}
    encoder = qwen_text.load_text_encoder(dict(reference.state_dict()), tokenizer, config=config, max_sequence_length=8)
    prompts = ["a red cat on the wall that says hello", "a dog"]
    with pytest.warns(UserWarning, match=r"prompt 'a red cat on the wall that says hello' has 14 Qwen2.5-VL tokens.*takes 8"):
        _assert_parity(encoder, reference, tokenizer, prompts)
    with pytest.raises(ValueError, match="max_sequence_length must be 1 to 1024"):
        qwen_text.load_text_encoder(dict(reference.state_dict()), tokenizer, config=config, max_sequence_length=2048)


def test_full_size_language_model_matches_transformers():
    with torch.device("meta"):
        reference = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**qwen_text.QWEN25_VL_7B_CONFIG))
    ours = qwen_text.lm_shapes(qwen_text.language_model())
    theirs = {k.removeprefix("model.language_model."): tuple(v.shape) for k, v in reference.state_dict().items()
              if k.startswith("model.language_model.")}
    assert ours == theirs
    assert sum(torch.Size(s).numel() for s in ours.values()) == 7_070_619_136
