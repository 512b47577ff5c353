"""FLUX.1 text encoders: parity with transformers, checkpoint layouts, gradients, truncation, clear errors.

Tiny random CLIP and T5 encoders and tiny tokenizers are saved into a folder laid out like a
diffusers FLUX.1 pipeline; nothing is downloaded.
"""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.files.hub import ModelSource
from dsf.models.flux import text as flux_text
from dsf.models.flux.text import CLIP_L_CONFIG, T5_XXL_CONFIG, encode_prompt, load_clip, load_t5

from comfy_fp8 import comfy_fp8
from tiny_flux import CLIP_TINY, T5_TINY, write_clip_tokenizer, write_t5_tokenizer

PROMPTS = ["a cat sat on the mat", "dog"]


@pytest.fixture(scope="module")
def reference():
    """The transformers modules our encoders must reproduce."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG | CLIP_TINY)).eval()
    t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG | T5_TINY)).eval()
    return clip, t5


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, reference):
    """A diffusers FLUX.1 pipeline folder: text_encoder/, text_encoder_2/ (sharded), tokenizer/, tokenizer_2/."""
    clip, t5 = reference
    root = tmp_path_factory.mktemp("FLUX.1-tiny")
    (root / "model_index.json").write_text("{}")
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="20KB")
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    return root


@pytest.fixture(scope="module")
def encoders(pipeline):
    return load_clip(pipeline), load_t5(pipeline)


def _flat(params):
    return dsf.tree.flatten_dict(params)


def _same_params(a, b) -> bool:
    a, b = _flat(a), _flat(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_pipeline_fixture_is_sharded_like_flux(pipeline):
    assert len(list((pipeline / "text_encoder_2").glob("*.safetensors"))) > 1
    assert (pipeline / "text_encoder_2" / "model.safetensors.index.json").is_file()


def test_clip_pooled_output_equals_transformers(pipeline, reference, encoders):
    from transformers import CLIPTokenizer

    clip, _ = encoders
    ids = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )["input_ids"]
    assert torch.equal(clip.tokenize(PROMPTS), ids)
    with torch.no_grad():
        expected = reference[0](ids).pooler_output
        assert torch.equal(clip.encode(clip.params, PROMPTS), expected)
    assert expected.shape == (2, 16)


def test_t5_last_hidden_state_equals_transformers(pipeline, reference, encoders):
    from transformers import T5TokenizerFast

    _, t5 = encoders
    ids = T5TokenizerFast.from_pretrained(pipeline / "tokenizer_2")(
        PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt"
    )["input_ids"]
    assert torch.equal(t5.tokenize(PROMPTS), ids)
    with torch.no_grad():
        expected = reference[1](ids).last_hidden_state
        assert torch.equal(t5.encode(t5.params, PROMPTS), expected)
    assert expected.shape == (2, 512, 16)


def test_encode_prompt_gives_t5_tokens_and_clip_pooled(encoders):
    clip, t5 = encoders
    text_embeds, pooled_embeds = encode_prompt(clip, t5, PROMPTS, max_sequence_length=24)
    assert text_embeds.shape == (2, 24, 16) and pooled_embeds.shape == (2, 16)
    assert torch.equal(text_embeds, t5.encode(t5.params, PROMPTS, max_length=24))
    assert torch.equal(pooled_embeds, clip.encode(clip.params, PROMPTS))


def test_token_ids_and_prompts_give_the_same_embeddings(encoders):
    clip, t5 = encoders
    assert torch.equal(clip.encode(clip.params, clip.tokenize(PROMPTS)), clip.encode(clip.params, PROMPTS))
    assert torch.equal(t5.encode(t5.params, t5.tokenize("dog", 8)), t5.encode(t5.params, ["dog"], 8))
    with pytest.raises(ValueError, match="at most 77"):
        clip.encode(clip.params, torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="1 to 512 tokens, got max_length=600"):
        t5.encode(t5.params, PROMPTS, max_length=600)


def test_params_are_the_only_tensors_the_encoders_read(encoders):
    clip, t5 = encoders
    clip_zeroed = dsf.tree.unflatten_dict(
        {k: torch.zeros_like(v) if "final_layer_norm" in k else v for k, v in _flat(clip.params).items()}
    )
    t5_zeroed = dsf.tree.unflatten_dict(
        {k: torch.zeros_like(v) if "final_layer_norm" in k else v for k, v in _flat(t5.params).items()}
    )
    assert not clip.encode(clip_zeroed, PROMPTS).any()
    assert not t5.encode(t5_zeroed, PROMPTS, 16).any()
    assert clip.encode(clip.params, PROMPTS).abs().sum() > 0
    assert t5.encode(t5.params, PROMPTS, 16).abs().sum() > 0


def test_gradients_reach_every_param(encoders):
    clip, t5 = encoders
    clip_ids, t5_ids = clip.tokenize(PROMPTS), t5.tokenize(PROMPTS, 16)
    _, clip_grads = dsf.value_and_grad(lambda p: clip.encode(p, clip_ids).square().sum())(clip.params)
    _, t5_grads = dsf.value_and_grad(lambda p: t5.encode(p, t5_ids).square().sum())(t5.params)
    assert _flat(clip_grads).keys() == _flat(clip.params).keys()
    assert _flat(t5_grads).keys() == _flat(t5.params).keys()
    assert clip_grads["text_model"]["encoder"]["layers"][0]["self_attn"]["q_proj"]["weight"].abs().sum() > 0
    assert clip_grads["text_model"]["embeddings"]["token_embedding"]["weight"][clip_ids.unique()].abs().sum() > 0
    used = torch.zeros(T5_TINY["vocab_size"], dtype=torch.bool)
    used[t5_ids.unique()] = True
    embedding_grad = t5_grads["shared"]["weight"]
    assert embedding_grad[used].abs().sum(-1).gt(0).all() and not embedding_grad[~used].any()


def test_truncation_warns_naming_the_prompt_and_the_token_counts(encoders):
    clip, t5 = encoders
    with pytest.warns(UserWarning, match=r"prompt 'a a a .*\.\.\. has 102 CLIP-L tokens; the encoder takes 77"):
        pooled = clip.encode(clip.params, ["a " * 100])
    assert pooled.shape == (1, 16)
    with pytest.warns(UserWarning, match=r"prompt 'a cat' has 5 T5-XXL tokens; the encoder takes 4"):
        assert t5.encode(t5.params, ["a cat"], max_length=4).shape == (1, 4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5.encode(t5.params, ["a cat"], max_length=5)


def test_dtype_is_cast_while_loading(pipeline):
    clip = load_clip(pipeline, dtype=torch.bfloat16)
    assert {t.dtype for t in _flat(clip.params).values()} == {torch.bfloat16}
    assert clip.encode(clip.params, PROMPTS).dtype == torch.bfloat16


def _clip_tensors(reference, prefix):
    return {prefix + k: v.detach().clone() for k, v in reference[0].state_dict().items()}


def _t5_tensors(reference, prefix="", shared=True, stack_embedding=False):
    tensors = {k: v.detach().clone() for k, v in reference[1].state_dict().items()}
    embedding = tensors.pop("encoder.embed_tokens.weight")
    if not shared:
        del tensors["shared.weight"]
    if stack_embedding:
        tensors["encoder.embed_tokens.weight"] = embedding.clone()
    return {prefix + k: v for k, v in tensors.items()}


def test_clip_single_file_with_text_model_prefix_and_config_beside(tmp_path, pipeline, reference, encoders):
    tensors = _clip_tensors(reference, "text_model.")
    tensors |= {"text_model.embeddings.position_ids": torch.arange(77)[None], "text_projection.weight": torch.zeros(16, 16)}
    save_file(tensors, tmp_path / "clip_l.safetensors")
    shutil.copy(pipeline / "text_encoder" / "config.json", tmp_path / "config.json")
    clip = load_clip(tmp_path / "clip_l.safetensors", tokenizer=pipeline / "tokenizer")
    assert _same_params(clip.params, encoders[0].params)


@pytest.mark.parametrize(
    "shared, stack_embedding",
    [(True, False), (False, True), (True, True)],
    ids=["shared-only (transformers, ComfyUI)", "embed_tokens-only", "both"],
)
def test_t5_single_file_embedding_layouts(tmp_path, pipeline, reference, encoders, shared, stack_embedding):
    save_file(_t5_tensors(reference, shared=shared, stack_embedding=stack_embedding), tmp_path / "t5.safetensors")
    t5 = load_t5(tmp_path / "t5.safetensors", tokenizer=pipeline / "tokenizer_2", config=T5_TINY)
    assert _same_params(t5.params, encoders[1].params)


def test_t5_from_a_comfyui_scaled_fp8_file(tmp_path, pipeline, reference):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled: the blocks' matrices in fp8 with a scale each (the older scaled_fp8 marker);
    they load as fp8 storage and encode as transformers does with the dequantized weights."""
    from transformers import T5Config, T5EncoderModel

    tensors, metadata, dequantized = comfy_fp8(_t5_tensors(reference), lambda key, t: ".block." in key and t.ndim == 2,
                                               "scaled_fp8")
    save_file(tensors, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", metadata=metadata)
    t5 = load_t5(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", tokenizer=pipeline / "tokenizer_2", config=T5_TINY,
                 dtype=torch.float32)
    assert t5.params["encoder"]["block"][0]["layer"][1]["DenseReluDense"]["wo"]["weight"].data.dtype == torch.float8_e4m3fn
    expected = T5EncoderModel(T5Config(**T5_XXL_CONFIG | T5_TINY)).eval()
    expected.load_state_dict(dequantized | {"encoder.embed_tokens.weight": dequantized["shared.weight"]})
    ids = t5.tokenize(PROMPTS)
    with torch.no_grad():
        ours, theirs = t5.encode(t5.params, PROMPTS), expected(ids).last_hidden_state
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-4


def test_t5_without_the_encoder_prefix(reference, pipeline, encoders):
    tensors = {k.removeprefix("encoder."): v for k, v in _t5_tensors(reference, shared=False, stack_embedding=True).items()}
    assert "embed_tokens.weight" in tensors and "block.0.layer.0.SelfAttention.q.weight" in tensors
    t5 = load_t5(tensors, tokenizer=pipeline / "tokenizer_2", config=T5_TINY)
    assert _same_params(t5.params, encoders[1].params)


def test_both_encoders_from_one_all_in_one_file(tmp_path, pipeline, reference, encoders):
    tensors = _clip_tensors(reference, "text_encoders.clip_l.transformer.text_model.")
    tensors |= _t5_tensors(reference, prefix="text_encoders.t5xxl.transformer.")
    tensors |= {"model.diffusion_model.img_in.weight": torch.zeros(2, 2)}
    save_file(tensors, tmp_path / "flux1-all-in-one.safetensors")
    file = tmp_path / "flux1-all-in-one.safetensors"
    clip = load_clip(file, tokenizer=pipeline / "tokenizer", config=CLIP_TINY)
    t5 = load_t5(file, tokenizer=pipeline / "tokenizer_2", config=T5_TINY)
    assert _same_params(clip.params, encoders[0].params)
    assert _same_params(t5.params, encoders[1].params)


def test_a_file_without_its_config_is_a_clear_error(tmp_path, pipeline, reference):
    save_file(_t5_tensors(reference, prefix=""), tmp_path / "t5.safetensors")
    with pytest.raises(ValueError, match=r"t5.safetensors does not fit FLUX.1's T5-XXL .*shape mismatches.*config="):
        load_t5(tmp_path / "t5.safetensors", tokenizer=pipeline / "tokenizer_2")


def test_a_checkpoint_without_the_encoder_is_a_clear_error(pipeline):
    with pytest.raises(ValueError, match=r"no CLIP-L weights in the checkpoint.*'img_in.weight'"):
        load_clip({"img_in.weight": torch.zeros(1)}, tokenizer=pipeline / "tokenizer")


def test_missing_encoder_folder_names_the_path(tmp_path, pipeline):
    copy = shutil.copytree(pipeline, tmp_path / "pipeline")
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=rf"{copy}.*no text_encoder_2/"):
        load_t5(copy)


def test_missing_tokenizer_folder_names_the_path(tmp_path, pipeline):
    copy = shutil.copytree(pipeline, tmp_path / "pipeline")
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=rf"no T5-XXL tokenizer folder at {copy / 'tokenizer_2'}"):
        load_t5(copy)
    (copy / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds none of the CLIP-L tokenizer files"):
        load_clip(copy, tokenizer=copy / "empty")


def test_a_single_file_needs_a_tokenizer(pipeline):
    with pytest.raises(ValueError, match="pass tokenizer= for the CLIP-L encoder"):
        load_clip(pipeline / "text_encoder" / "model.safetensors")


def test_a_hub_source_loads_offline_from_the_model_folder(tmp_path, pipeline, encoders, monkeypatch):
    shutil.copytree(pipeline, tmp_path / "models" / "org" / "FLUX.1-tiny")
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    clip = load_clip(ModelSource(model_id="org/FLUX.1-tiny"))
    t5 = load_t5(
        ModelSource(model_id="org/FLUX.1-tiny", pattern="text_encoder_2/"),
        tokenizer=ModelSource(model_id="org/FLUX.1-tiny", pattern="tokenizer_2/"),
    )
    assert _same_params(clip.params, encoders[0].params)
    assert _same_params(t5.params, encoders[1].params)


def test_full_size_configs_have_flux_parameter_counts():
    assert sum(math.prod(s) for s in flux_text.clip_param_shapes().values()) == 123_060_480
    assert sum(math.prod(s) for s in flux_text.t5_param_shapes().values()) == 4_762_310_656
