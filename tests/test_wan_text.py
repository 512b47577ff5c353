"""Wan encoders: umT5 and CLIP vision parity with transformers and diffusers' Wan pipelines, layouts, errors.

Tiny random encoders, a tiny umT5 tokenizer and a tiny CLIP image processor are saved into a folder
laid out like a diffusers Wan2.1 I2V pipeline; nothing is downloaded.
"""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models.wan import text as wan_text
from dsf.models.wan.text import CLIP_VIT_H_CONFIG, UMT5_XXL_CONFIG, load_clip_vision, load_umt5

diffusers = pytest.importorskip("diffusers")
from diffusers import WanImageToVideoPipeline, WanPipeline  # noqa: E402

UMT5_TINY = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2}
CLIP_TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28}
PROMPTS = ["a cat  sat &amp; on\tthe mat", "dog"]
MAX_TOKENS = 512

# Wan's original T5 names (wan/modules/t5.py), written here independently of text.py's table.
WAN_T5_NAMES = {
    "shared.weight": "token_embedding.weight",
    "encoder.final_layer_norm.weight": "norm.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name and p.ndim == 1 else noise / max(p[0].numel(), 1) ** 0.5)


@pytest.fixture(scope="module")
def reference():
    """The transformers modules our encoders must reproduce, and the image processor of the pipeline."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    umt5 = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG | UMT5_TINY)).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_CONFIG | CLIP_TINY)).eval()
    _randomize(umt5, 0)
    _randomize(clip, 1)
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return umt5, clip, processor


def _write_umt5_tokenizer(folder) -> None:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    pieces += [("&", -1.0), ("▁&", -1.0)]
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(folder)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, reference):
    """A diffusers Wan I2V pipeline folder: text_encoder/ (sharded), tokenizer/, image_encoder/, image_processor/."""
    umt5, clip, processor = reference
    root = tmp_path_factory.mktemp("Wan2.1-I2V-tiny")
    (root / "model_index.json").write_text("{}")
    umt5.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    clip.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "image_processor")
    _write_umt5_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def encoders(pipeline):
    return load_umt5(pipeline), load_clip_vision(pipeline)


def _diffusers_prompt_embeds(pipeline, umt5, prompts, max_length=MAX_TOKENS):
    """diffusers' own Wan prompt encoding (clean, tokenize, mask, zero past each length) on our tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline / "tokenizer")
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=umt5, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(pipe, prompts, max_sequence_length=max_length, dtype=torch.float32)


def test_the_pipeline_fixture_is_sharded_like_wan(pipeline):
    assert len(list((pipeline / "text_encoder").glob("*.safetensors"))) > 1


def test_umt5_states_equal_the_diffusers_wan_pipeline(pipeline, reference, encoders):
    t5, _ = encoders
    expected = _diffusers_prompt_embeds(pipeline, reference[0], PROMPTS)
    with torch.no_grad():
        ours = t5.encode(t5.params, PROMPTS)
    assert ours.shape == (2, MAX_TOKENS, UMT5_TINY["d_model"])
    assert torch.equal(ours, expected)


def test_umt5_states_are_zero_exactly_past_each_prompt(encoders):
    t5, _ = encoders
    ids = t5.tokenize(PROMPTS)
    lengths = ids.ne(0).sum(1).tolist()
    with torch.no_grad():
        states = t5.encode(t5.params, ids)
    for row, length in zip(states, lengths):
        assert bool((row[length:] == 0).all()) and bool((row[:length].abs().sum(-1) > 0).all())
    assert lengths[1] < lengths[0] < MAX_TOKENS


def test_prompts_are_cleaned_as_wan_cleans_them(encoders):
    t5, _ = encoders
    assert torch.equal(t5.tokenize(["a   b &amp;amp; c "]), t5.tokenize(["a b & c"]))
    assert wan_text.clean_prompt(" x\n\ny ") == "x y"


def test_umt5_from_the_wan_original_layout(pipeline, reference, encoders, tmp_path):
    """DiffSynth-Studio's converted Wan T5 file: the original names, one safetensors file."""
    umt5 = reference[0]
    original = {}
    for key, tensor in umt5.state_dict().items():
        block = key.split(".")
        if key in WAN_T5_NAMES:
            original[WAN_T5_NAMES[key]] = tensor
        elif key.startswith("encoder.block."):
            original[f"blocks.{block[2]}." + WAN_T5_NAMES[".".join(block[3:])]] = tensor
    assert "blocks.1.pos_embedding.embedding.weight" in original and "token_embedding.weight" in original
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "models_t5_umt5-xxl-enc-bf16.safetensors")
    t5 = load_umt5(tmp_path / "models_t5_umt5-xxl-enc-bf16.safetensors", pipeline / "tokenizer", config=UMT5_TINY)
    with torch.no_grad():
        assert torch.equal(t5.encode(t5.params, PROMPTS), encoders[0].encode(encoders[0].params, PROMPTS))


def test_umt5_from_a_single_file_with_config(pipeline, reference, tmp_path):
    state = {k: v.contiguous() for k, v in reference[0].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, tmp_path / "umt5.safetensors")
    t5 = load_umt5(tmp_path / "umt5.safetensors", pipeline / "tokenizer", config=UMT5_TINY, max_length=32)
    expected = _diffusers_prompt_embeds(pipeline, reference[0], PROMPTS, max_length=32)
    with torch.no_grad():
        assert torch.equal(t5.encode(t5.params, PROMPTS), expected)


def test_long_prompts_warn_and_are_cut(encoders):
    t5, _ = encoders
    with pytest.warns(UserWarning, match=r"prompt 'abcabc.*' has \d+ umT5-XXL tokens; the encoder takes 8"):
        ids = t5.tokenize(["abc" * 20], max_length=8)
    assert ids.shape == (1, 8)


def test_umt5_gradients_reach_the_params(encoders):
    t5, _ = encoders
    params = dsf.tree.flatten_dict(t5.params)
    weight = params["encoder.block.1.layer.1.DenseReluDense.wo.weight"].clone().requires_grad_(True)
    tree = dsf.tree.unflatten_dict(params | {"encoder.block.1.layer.1.DenseReluDense.wo.weight": weight})
    (grad,) = torch.autograd.grad(t5.encode(tree, PROMPTS, max_length=32).square().sum(), weight)
    assert grad.shape == weight.shape and bool(grad.abs().sum() > 0)


def test_clip_features_equal_the_diffusers_wan_i2v_pipeline(pipeline, reference, encoders):
    from PIL import Image

    _, clip_module, _ = reference
    _, clip = encoders
    images = [Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()) for _ in range(2)]
    processor = type(reference[2]).from_pretrained(pipeline / "image_processor")
    pipe = SimpleNamespace(image_processor=processor, image_encoder=clip_module)
    with torch.no_grad():
        expected = WanImageToVideoPipeline.encode_image(pipe, images, device=torch.device("cpu"))
        ours = clip.encode(clip.params, images)
    assert ours.shape == (2, (28 // 14) ** 2 + 1, CLIP_TINY["hidden_size"])
    assert torch.equal(ours, expected)


def test_clip_penultimate_states_equal_transformers(reference, encoders):
    _, clip_module, _ = reference
    _, clip = encoders
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        states = clip_module(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = clip.encode(clip.params, pixels)
    assert torch.equal(ours, states[-2])
    assert not torch.equal(ours, states[-1])


def test_clip_from_transformers_4_names_and_default_processor(reference, encoders):
    """Wan2.1 I2V diffusers files say ``vision_model.*`` and carry the projection; the defaults need no processor folder."""
    _, clip_module, _ = reference
    legacy = {"vision_model." + k: v for k, v in clip_module.state_dict().items()}
    legacy |= {"visual_projection.weight": torch.zeros(4, 16), "vision_model.embeddings.position_ids": torch.arange(5)[None]}
    clip = load_clip_vision(legacy, config=CLIP_TINY)
    assert clip.processor.crop_size == {"height": 224, "width": 224}
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(clip.encode(clip.params, pixels), encoders[1].encode(encoders[1].params, pixels))


def test_wrong_pixel_size_is_an_error(encoders):
    _, clip = encoders
    with pytest.raises(ValueError, match=r"pixel values of shape \(batch, 3, 28, 28\), got \(1, 3, 32, 32\)"):
        clip.encode(clip.params, torch.zeros(1, 3, 32, 32))


def test_missing_tokenizer_is_an_error(reference):
    with pytest.raises(ValueError, match=r"pass tokenizer= for the umT5-XXL encoder"):
        load_umt5(dict(reference[0].state_dict()), config=UMT5_TINY)


@pytest.mark.parametrize("encoder", ["umt5", "clip"])
def test_unknown_keys_are_listed(pipeline, reference, encoder):
    umt5, clip_module, _ = reference
    if encoder == "umt5":
        state = dict(umt5.state_dict())
        state.pop("encoder.block.1.layer.1.layer_norm.weight")
        state["encoder.block.0.layer.0.SelfAttention.mystery.weight"] = torch.zeros(2)
        with pytest.raises(ValueError, match=r"1 missing keys.*block\.1\.layer\.1\.layer_norm.*1 unexpected keys.*mystery"):
            load_umt5(state, pipeline / "tokenizer", config=UMT5_TINY)
    else:
        state = dict(clip_module.state_dict())
        state.pop("post_layernorm.bias")
        with pytest.raises(ValueError, match=r"1 missing keys.*vision_model\.post_layernorm\.bias"):
            load_clip_vision(state, config=CLIP_TINY)
