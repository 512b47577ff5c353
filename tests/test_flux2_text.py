"""FLUX.2 text encoding against the diffusers pipelines' own ``encode_prompt``: dev's Mistral3 (system message, layers
10/20/30) and klein's Qwen3 (user turn, thinking off, layers 9/18/27), tiny random models with tokenizers carrying the
chat templates, batched prompts of different lengths; loading from pipeline folders and files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dsf.files import loading
from dsf.models.flux2 import text
from dsf.models.flux2.tiny import random_lm_weights, tiny_lm_config, tiny_tokenizer

diffusers = pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline, Flux2Pipeline  # noqa: E402
from transformers import AutoConfig, Mistral3ForConditionalGeneration, Qwen3ForCausalLM  # noqa: E402

import comfy_fp8  # noqa: E402

PROMPTS = ["a red cat on a mat", "dog"]
LENGTH = 256  # the character tokenizer spends about 190 tokens on the system message
KINDS = {  # kind: (pipeline class, transformers class, layers of the real model, how many layers the tiny one has)
    "mistral": (Flux2Pipeline, Mistral3ForConditionalGeneration, text.DEV_LAYERS, 30),
    "qwen3": (Flux2KleinPipeline, Qwen3ForCausalLM, text.KLEIN_LAYERS, 27),
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def reference(kind):
    pipeline_class, model_class, _, layers = KINDS[kind]
    model = model_class(AutoConfig.for_model(**tiny_lm_config(kind, layers))).eval()
    model.load_state_dict(random_lm_weights(kind, seed=1, layers=layers))
    return pipeline_class(scheduler=None, vae=None, text_encoder=model, tokenizer=tiny_tokenizer(kind), transformer=None)


def _diffusers_embeds(pipe, prompts):
    layers = KINDS["qwen3" if isinstance(pipe, Flux2KleinPipeline) else "mistral"][2]
    with torch.no_grad():
        embeds, ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=LENGTH, text_encoder_out_layers=layers)
    return embeds


def _relative_error(ours, ref) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def test_parity_with_the_pipelines_encode_prompt(kind, reference):
    encoder = text.load_text_encoder(reference.text_encoder.state_dict(), reference.tokenizer,
                                     config=tiny_lm_config(kind, KINDS[kind][3]))
    assert encoder.chat == kind
    with torch.no_grad():
        ours = encoder.encode(encoder.params, PROMPTS, max_length=LENGTH)
    ref = _diffusers_embeds(reference, PROMPTS)
    assert ours.shape == ref.shape == (2, LENGTH, 3 * 8)
    assert _relative_error(ours, ref) <= 1e-4


def test_parity_detects_a_wrong_layer(kind, reference):
    encoder = text.load_text_encoder(reference.text_encoder.state_dict(), reference.tokenizer,
                                     config=tiny_lm_config(kind, KINDS[kind][3]), layers=(1, 2, 3))
    with torch.no_grad():
        ours = encoder.encode(encoder.params, PROMPTS, max_length=LENGTH)
    assert _relative_error(ours, _diffusers_embeds(reference, PROMPTS)) > 1e-2


def test_the_chat_puts_the_prompt_in_its_template(kind):
    encoder = text.Flux2TextEncoder(kind, {}, tiny_tokenizer(kind), None, kind)
    ids, mask = encoder.tokenize(["a cat"], max_length=LENGTH)
    rendered = encoder.tokenizer.decode(ids[0][mask[0].bool()])
    expected = {"mistral": f"<s>[SYSTEM_PROMPT]{text.SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]",
                "qwen3": "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"}[kind]
    assert rendered.replace(" ", "") == expected.replace(" ", "")  # the character tokenizer decodes with spaces between
    assert ids.shape == (1, LENGTH) and int(mask.sum()) < LENGTH


def test_loads_from_a_pipeline_folder_and_a_comfyui_file(kind, reference, tmp_path):
    reference.text_encoder.save_pretrained(tmp_path / "pipe" / "text_encoder")
    reference.tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    from_folder = text.load_text_encoder(tmp_path / "pipe")
    lm_only = {f"model.{k}": v for k, v in text.decoder_lm.lm_to_ours(reference.text_encoder.state_dict(), kind).items()}
    save_file({k: v.contiguous() for k, v in lm_only.items()}, tmp_path / "comfy.safetensors")
    from_file = text.load_text_encoder(tmp_path / "comfy.safetensors", tmp_path / "pipe" / "tokenizer",
                                       config=tiny_lm_config(kind, KINDS[kind][3]))
    ref = _diffusers_embeds(reference, PROMPTS)
    for encoder in (from_folder, from_file):
        with torch.no_grad():
            assert _relative_error(encoder.encode(encoder.params, PROMPTS, max_length=LENGTH), ref) <= 1e-4


@pytest.mark.parametrize("style", comfy_fp8.STYLES)
def test_parity_from_a_comfyui_scaled_fp8_file(kind, reference, tmp_path, style):
    """ComfyUI's fp8 text-encoder files (mistral_3_small_flux2_fp8): the decoder layers' matrices in fp8 at their own
    scales; they load as fp8 storage and encode as the pipeline does with the dequantized weights."""
    pipeline_class, model_class, _, layers = KINDS[kind]
    whole = reference.text_encoder.state_dict()
    prefix = loading.encoder_prefix(whole, text.decoder_lm.MARKER, kind)
    lm_only = {f"model.{k}": v.contiguous() for k, v in text.decoder_lm.lm_to_ours(whole, kind).items()}
    tensors, metadata, dequantized = comfy_fp8.comfy_fp8(lm_only, lambda key, t: t.ndim == 2 and ".layers." in key, style)
    save_file(tensors, tmp_path / "text_fp8.safetensors", metadata=metadata)
    encoder = text.load_text_encoder(tmp_path / "text_fp8.safetensors", reference.tokenizer,
                                     config=tiny_lm_config(kind, layers), dtype=torch.float32)
    assert encoder.params["layers"][3]["mlp"]["down_proj"]["weight"].data.dtype == torch.float8_e4m3fn
    assert encoder.params["embed_tokens"]["weight"].dtype == torch.float32

    model = model_class(AutoConfig.for_model(**tiny_lm_config(kind, layers))).eval()
    model.load_state_dict(whole | {prefix + k.removeprefix("model."): v for k, v in dequantized.items()})
    expected = pipeline_class(scheduler=None, vae=None, text_encoder=model, tokenizer=reference.tokenizer, transformer=None)
    with torch.no_grad():
        ours = encoder.encode(encoder.params, PROMPTS, max_length=LENGTH)
    assert _relative_error(ours, _diffusers_embeds(expected, PROMPTS)) <= 1e-4


def test_a_width_without_config_is_an_error(kind, reference):
    with pytest.raises(ValueError, match="no config for a 8-wide FLUX.2 text encoder: pass config="):
        text.load_text_encoder(reference.text_encoder.state_dict(), reference.tokenizer)


def test_a_long_prompt_is_cut_with_a_warning(kind):
    encoder = text.Flux2TextEncoder(kind, {}, tiny_tokenizer(kind), None, kind)
    with pytest.warns(UserWarning, match="the rest is dropped"):
        ids, mask = encoder.tokenize(["a cat " * 100], max_length=LENGTH)
    assert ids.shape == (1, LENGTH) and bool(mask.all())
