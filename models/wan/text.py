"""Wan's encoders as pure functions: the umT5-XXL text encoder (per token, 4096) and, for Wan2.1
image-to-video, the CLIP ViT-H/14 vision encoder (penultimate states, 257 × 1280).

:func:`load_umt5` returns a :class:`TextEncoder` and :func:`load_clip_vision` an
:class:`ImageEncoder`: ``params``, a tree whose keys mirror the diffusers checkpoint files
(``shared`` and ``encoder.*`` for umT5, ``vision_model.*`` for CLIP), the tokenizer or image
processor, and a pure ``encode(params, ...)``. The transformers module is built on the meta device
and only supplies the code; every tensor lives in ``params``.

As Wan and diffusers' Wan pipelines do, prompts are cleaned (HTML entities unescaped twice,
whitespace collapsed; ``ftfy.fix_text`` first when ftfy is installed), padded to 512 tokens, encoded
with the padding masked out, and the states past each prompt's length are zeroed. The image
features are the vision tower's second-to-last hidden states (``hidden_states[-2]``).

Sources: a diffusers Wan pipeline folder (``text_encoder/`` + ``tokenizer/``, ``image_encoder/`` +
``image_processor/``), an encoder folder, single or sharded safetensors files, a
:class:`dsf.files.hub.ModelSource`, or a flat state dict in memory. umT5 weights may also be in Wan's
original layout (``token_embedding.weight``, ``blocks.N.attn.q.weight``, as in DiffSynth-Studio's
``models_t5_umt5-xxl-enc-bf16.safetensors``). The config is Wan's (:data:`UMT5_XXL_CONFIG`,
:data:`CLIP_VIT_H_CONFIG`) < the ``config.json`` beside the weights < ``config=``.

Example:
    >>> from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel
    >>> tiny = {"vocab_size": 8, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
    >>> weights = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG | tiny)).state_dict()
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> t5 = load_umt5(weights, tokenizer, config=tiny, max_length=6)
    >>> states = t5.encode(t5.params, ["a a"])
    >>> states.shape, bool((states[0, 3:] == 0).all())
    (torch.Size([1, 6, 8]), True)
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

from dsf.files import loading

from dsf.model_parts import t5_encoder, text_encoder
from dsf.files.hub import ModelSource, local_source
from dsf.files.io import Source
from dsf.model_parts.modules import meta_module, module_names, pure_module, state_shapes
from dsf.tree import flatten_dict
from dsf.weight import materialize_tree

# google/umt5-xxl's encoder, as in Wan2.1 diffusers' text_encoder/config.json.
UMT5_XXL_CONFIG = {"model_type": "umt5", "vocab_size": 256384, **t5_encoder.XXL_CONFIG}

# open-clip ViT-H/14's vision tower, as in Wan2.1-I2V diffusers' image_encoder/config.json.
CLIP_VIT_H_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1024,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

UMT5_MAX_TOKENS = 512
FAMILY, UMT5_NAME, CLIP_NAME = "Wan", "umT5-XXL", "CLIP ViT-H/14"
UMT5_EMBEDDING = t5_encoder.EMBEDDING
WAN_T5_MARKER = "blocks.0.attn.q.weight"
WAN_T5_GLOBAL_NAMES = {"token_embedding.weight": UMT5_EMBEDDING, "norm.weight": "encoder.final_layer_norm.weight"}
WAN_T5_BLOCK_NAMES = {  # Wan's original T5 block -> transformers' UMT5 block
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
CLIP_TOWER = "vision_model"  # CLIPVisionModel's attribute on transformers 4; the checkpoints' key prefix
CLIP_MARKER = "embeddings.patch_embedding.weight"
CLIP_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
CLIP_POSITION_IDS = "embeddings.position_ids"  # a buffer, not a weight: rebuilt at each call
PENULTIMATE = -2
TOKENIZER_FOLDERS = "a Wan diffusers pipeline's tokenizer/, Wan-AI's google/umt5-xxl/"

ConfigLike = Any  # a dict of transformers config keys, a transformers config, or None
SourceLike = Union[ModelSource, Source]


def clean_prompt(prompt: str) -> str:
    """A prompt cleaned as Wan cleans it: ftfy (when installed), HTML entities unescaped twice, whitespace collapsed.

    >>> clean_prompt("  a &amp;amp; b \\n\\t c ")
    'a & b c'
    """
    try:
        import ftfy

        prompt = ftfy.fix_text(prompt)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(prompt)).strip()).strip()


@dataclass(frozen=True)
class TextEncoder(text_encoder.TextEncoder):
    """The umT5 encoder as data: ``params``, the tokenizer, and the pure map from token ids to states.

    ``encode_ids(params, input_ids (B, L)) -> (B, L, d_model)``, zero at padding; ``max_length``
    is the number of tokens prompts are padded to; prompts are cleaned with :func:`clean_prompt`.

    >>> from transformers import T5TokenizerFast
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> count = TextEncoder("counter", {}, tokenizer, 4, lambda params, ids: (ids > 0).sum(-1))
    >>> count.tokenize(["a  a"]).tolist(), count.encode({}, ["a", "a a"]).tolist()
    ([[3, 3, 1, 0]], [2, 3])
    """

    clean: Callable[[str], str] = field(default=clean_prompt, repr=False)


@dataclass(frozen=True)
class ImageEncoder:
    """The CLIP vision encoder as data: ``params``, the image processor, and the pure map from pixels to features.

    ``encode_pixels(params, pixel_values (B, 3, S, S)) -> (B, tokens, hidden)`` with S = ``image_size``.

    >>> from transformers import CLIPImageProcessor
    >>> mean = ImageEncoder("mean", {}, CLIPImageProcessor(), 224, lambda params, pixels: pixels.mean((1, 2, 3)))
    >>> mean.preprocess([torch.zeros(3, 300, 400, dtype=torch.uint8)]).shape
    torch.Size([1, 3, 224, 224])
    """

    name: str
    params: dict = field(repr=False)
    processor: Any = field(repr=False)
    image_size: int
    encode_pixels: Callable[[dict, torch.Tensor], torch.Tensor] = field(repr=False)

    def preprocess(self, images) -> torch.Tensor:
        """Pixel values (B, 3, S, S) of images (PIL images, or uint8 (3, H, W) tensors) through the processor."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def encode(self, params, images) -> torch.Tensor:
        """The features of images (preprocessed here) or of pixel values (B, 3, S, S) with ``params``."""
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
            if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
                raise ValueError(
                    f"{self.name} takes pixel values of shape (batch, 3, {self.image_size}, {self.image_size}), got "
                    f"{tuple(images.shape)}: pass images to encode() to resize and normalize them"
                )
            return self.encode_pixels(params, images)
        return self.encode_pixels(params, self.preprocess(images))


def load_umt5(
    source: SourceLike,
    tokenizer=None,
    *,
    config: ConfigLike = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_length: int = UMT5_MAX_TOKENS,
) -> TextEncoder:
    """Wan's umT5-XXL encoder; ``encode`` gives the last hidden state (B, max_length, d_model), zero past each prompt.

    ``tokenizer``: a local folder (the pipeline's ``tokenizer/``, or Wan-AI's ``google/umt5-xxl/``),
    a :class:`ModelSource`, or a tokenizer object; for a pipeline folder it defaults to its own.

    >>> from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel
    >>> tiny = {"vocab_size": 8, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
    >>> weights = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG | tiny)).state_dict()
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> t5 = load_umt5(weights, tokenizer, config=tiny, max_length=16)
    >>> t5.encode(t5.params, ["a"]).shape
    torch.Size([1, 16, 8])
    """
    from transformers import T5TokenizerFast

    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder", UMT5_NAME)
    tokenizer_folder = _default_tokenizer_folder(root)
    tokenizer = loading.load_tokenizer(tokenizer, tokenizer_folder, T5TokenizerFast, UMT5_NAME, TOKENIZER_FOLDERS)
    module = _umt5_module(config, loading.config_of_kind(weights, "model_type", "umt5"))
    return TextEncoder(
        name=UMT5_NAME,
        params=loading.encoder_params(FAMILY, UMT5_NAME, weights, umt5_to_ours, t5_encoder.encoder_shapes(module), dtype, device),
        tokenizer=tokenizer,
        max_length=max_length,
        encode_ids=t5_encoder.last_hidden_fn(module, module.config.pad_token_id),
    )


def load_clip_vision(
    source: SourceLike,
    image_processor=None,
    *,
    config: ConfigLike = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> ImageEncoder:
    """Wan2.1 I2V's CLIP vision encoder; ``encode`` gives the penultimate hidden states (B, 257, 1280).

    ``image_processor``: a local folder (the pipeline's ``image_processor/``), a :class:`ModelSource`,
    or a processor object; by default the pipeline's, else CLIP's standard one (shortest side to
    224, center crop, OpenAI mean and std), which is what Wan2.1 I2V's diffusers folder holds.

    >>> from transformers import CLIPVisionConfig, CLIPVisionModel
    >>> tiny = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    ...         "image_size": 28}
    >>> weights = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_CONFIG | tiny)).state_dict()
    >>> clip = load_clip_vision(weights, config=tiny)
    >>> clip.encode(clip.params, torch.randn(2, 3, 28, 28)).shape
    torch.Size([2, 5, 8])
    """
    from transformers import CLIPImageProcessor

    root = local_source(source)
    weights = loading.pipeline_component(root, "image_encoder", CLIP_NAME)
    processor = _image_processor(image_processor, loading.pipeline_part(root, "image_encoder", "image_processor"), CLIPImageProcessor)
    module = _clip_module(config, loading.config_of_kind(weights, "model_type", "clip_vision_model"))
    return ImageEncoder(
        name=CLIP_NAME,
        params=loading.encoder_params(FAMILY, CLIP_NAME, weights, clip_vision_to_ours, _clip_shapes(module), dtype, device),
        processor=processor,
        image_size=module.config.image_size,
        encode_pixels=_clip_penultimate_fn(module),
    )


def umt5_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The umT5 encoder's tensors of a flat state dict, named ``shared.weight`` and ``encoder.*`` (transformers').

    Wan's original layout is renamed; in the transformers layout the encoder is found by its first
    block wherever it sits (``encoder.``, no prefix, deeper in an all-in-one file; a decoder is left
    out), and its token embedding is ``shared.weight``, or ``encoder.embed_tokens.weight`` when a
    file only has that one.

    >>> w = torch.zeros(1)
    >>> sorted(umt5_to_ours({"blocks.0.attn.q.weight": w, "token_embedding.weight": w}))
    ['encoder.block.0.layer.0.SelfAttention.q.weight', 'shared.weight']
    >>> sorted(umt5_to_ours({"block.0.layer.0.SelfAttention.q.weight": w, "embed_tokens.weight": w}))
    ['encoder.block.0.layer.0.SelfAttention.q.weight', 'shared.weight']
    """
    if WAN_T5_MARKER in flat:
        return {_wan_t5_name(key) or key: tensor for key, tensor in flat.items()}
    return t5_encoder.encoder_to_ours(flat, UMT5_NAME)


def clip_vision_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP vision tower's tensors of a flat state dict, named ``vision_model.*``.

    The tower is found by its patch embedding wherever it sits (``vision_model.``, no prefix as
    transformers 5 saves it, deeper in an all-in-one file). Other keys (``visual_projection``, the
    legacy ``position_ids`` buffer) are left out.

    >>> w = torch.zeros(1)
    >>> sorted(clip_vision_to_ours({"embeddings.patch_embedding.weight": w, "visual_projection.weight": w}))
    ['vision_model.embeddings.patch_embedding.weight']
    """
    prefix = loading.encoder_prefix(flat, CLIP_MARKER, CLIP_NAME)
    return loading.encoder_tensors(flat, prefix, CLIP_PARTS, CLIP_TOWER + ".", {CLIP_POSITION_IDS})


def umt5_param_shapes(config: ConfigLike = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of the umT5 params tree for ``config`` (umT5-XXL by default); nothing is allocated.

    >>> shapes = umt5_param_shapes()
    >>> shapes[UMT5_EMBEDDING], round(sum(torch.Size(s).numel() for s in shapes.values()) / 1e9, 2)
    ((256384, 4096), 5.68)
    """
    return t5_encoder.encoder_shapes(_umt5_module(config))


def clip_vision_param_shapes(config: ConfigLike = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of the CLIP vision params tree for ``config`` (ViT-H/14 by default); nothing is allocated.

    >>> clip_vision_param_shapes()["vision_model.embeddings.position_embedding.weight"]
    (257, 1280)
    """
    return _clip_shapes(_clip_module(config))


def _wan_t5_name(key: str) -> str | None:
    match = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if match is None:
        return WAN_T5_GLOBAL_NAMES.get(key)
    local = WAN_T5_BLOCK_NAMES.get(match.group(2))
    return None if local is None else f"encoder.block.{match.group(1)}.{local}"


def _umt5_module(config: ConfigLike, found: dict | None = None):
    """Wan's umT5 encoder on the meta device: :data:`UMT5_XXL_CONFIG` < ``found`` < ``config``."""
    from transformers import UMT5Config, UMT5EncoderModel

    return meta_module(UMT5EncoderModel, UMT5Config.from_dict(loading.merged_config(UMT5_XXL_CONFIG, found, config)))


def _clip_module(config: ConfigLike, found: dict | None = None):
    """Wan's CLIP vision encoder on the meta device: :data:`CLIP_VIT_H_CONFIG` < ``found`` < ``config``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return meta_module(CLIPVisionModel, CLIPVisionConfig.from_dict(loading.merged_config(CLIP_VIT_H_CONFIG, found, config)))


def _clip_shapes(module) -> dict[str, tuple[int, ...]]:
    return state_shapes(module, CLIP_TOWER, skip={CLIP_POSITION_IDS})


def _clip_penultimate_fn(module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """``features(params, pixel_values) -> (B, tokens, hidden)``: the second-to-last encoder layer's output."""
    apply, _ = pure_module(module)
    positions = module.config.image_size // module.config.patch_size

    def features(params, pixel_values: torch.Tensor) -> torch.Tensor:
        ours = flatten_dict(materialize_tree(params))
        patch_weight = ours[f"{CLIP_TOWER}.{CLIP_MARKER}"]
        position_ids = torch.arange(positions**2 + 1, device=patch_weight.device).unsqueeze(0)
        tensors = module_names(ours | {f"{CLIP_TOWER}.{CLIP_POSITION_IDS}": position_ids}, module, CLIP_TOWER)
        pixels = pixel_values.to(device=patch_weight.device, dtype=patch_weight.dtype)
        return apply(tensors, pixel_values=pixels, output_hidden_states=True).hidden_states[PENULTIMATE]

    return features


def _default_tokenizer_folder(root) -> Path | None:
    """The pipeline's ``tokenizer/``, or the ``google/umt5-xxl/`` of a Wan-AI model folder."""
    if isinstance(root, Path) and (root / "google" / "umt5-xxl").is_dir():
        return root / "google" / "umt5-xxl"
    return loading.pipeline_part(root, "text_encoder", "tokenizer")


def _image_processor(processor, pipeline_folder: Path | None, processor_class):
    """A processor object as is; a local folder's processor; else the pipeline's, else CLIP's standard one."""
    if processor is None and pipeline_folder is not None and pipeline_folder.is_dir():
        processor = pipeline_folder
    if processor is None:
        return processor_class()
    if isinstance(processor, (ModelSource, str, os.PathLike)):
        folder = loading.local_folder(processor, f"{CLIP_NAME} image processor")
        return processor_class.from_pretrained(str(folder), local_files_only=True)
    return processor
