"""Configuration of the Wan DiT (Wan 2.1 and 2.2), and how a checkpoint's shapes and config files fill it in.

Sources of a loaded model's config, each overriding the one before: the Wan2.1-T2V-14B defaults <
what the checkpoint's shapes say < the diffusers ``config.json`` beside the weights < the
``config=`` the caller passes (diffusers ``WanTransformer3DModel`` key names, or a whole
:class:`WanConfig`). The original Wan ``config.json`` (``"_class_name": "WanModel"``) is not read:
the shapes hold all it says but the number of heads, which is hidden / 128 in every Wan model.

Example:
    >>> WanConfig().hidden_size, WAN21_T2V_1_3B.hidden_size, WAN21_I2V_14B.image_latent_channels
    (5120, 1536, 20)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dsf.files import loading

DIFFUSERS_KEYS = {  # diffusers WanTransformer3DModel config key -> WanConfig field
    "patch_size": "patch_size",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "eps": "eps",
    "image_dim": "image_dim",
}
SUPPORTED_ONLY = {  # diffusers key -> (the one value implemented, why)
    "qk_norm": ("rms_norm_across_heads", "every released Wan model normalizes q and k across all heads"),
    "cross_attn_norm": (True, "every released Wan model normalizes the cross-attention input"),
    "pos_embed_seq_len": (None, "Wan2.1 FLF2V's first-and-last-frame image position embedding is not implemented"),
}
IMPLIED_KEYS = (
    "added_kv_proj_dim",  # the image key/value input width: the hidden size when image_dim is set, else None
    "rope_max_seq_len",  # the length of diffusers' precomputed RoPE table; angles are computed per call here
)
_SIZE_READINGS = {  # WanConfig field -> (key, axis) of the checkpoint shape that holds it
    "text_dim": ("condition_embedder.text_embedder.linear_1.weight", 1),
    "freq_dim": ("condition_embedder.time_embedder.linear_1.weight", 1),
    "image_dim": ("condition_embedder.image_embedder.norm1.weight", 0),
}


@dataclass(frozen=True)
class WanConfig:
    """Sizes of a Wan DiT; the defaults are Wan2.1-T2V-14B (and each Wan2.2-T2V-A14B expert).

    ``in_channels`` counts everything concatenated on the channel axis before the patch embedding:
    the noisy latents (``out_channels``), then for image-to-video the 4 mask and 16 image-latent
    channels (``image_latent_channels`` = in - out). ``image_dim`` is the CLIP feature width (1280)
    of models with an image embedder (Wan2.1 I2V), else ``None``. ``text_len`` is the number of text
    tokens the model attends to: shorter text embeddings are zero-padded to it, as Wan does.

    >>> WanConfig(num_heads=2, head_dim=12).rope_axes_dims
    (4, 4, 4)
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_heads: int = 40
    head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    eps: float = 1e-6
    image_dim: int | None = None
    text_len: int = 512
    rope_theta: float = 10000.0

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (frames, height, width), got {self.patch_size}")
        if self.in_channels < self.out_channels:
            raise ValueError(
                f"in_channels {self.in_channels} < out_channels {self.out_channels}: the input holds the "
                "noisy latents (out_channels) plus any image-conditioning channels"
            )
        if min(self.rope_axes_dims) <= 0 or self.head_dim % 2:
            raise ValueError(
                f"head_dim {self.head_dim} cannot be split into the frame/height/width RoPE axes "
                f"{self.rope_axes_dims}: use an even head_dim of at least 12"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def rope_axes_dims(self) -> tuple[int, int, int]:
        """Head dimensions rotated by frame, row and column position (44, 42, 42 for head_dim 128)."""
        spatial = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * spatial, spatial, spatial

    @property
    def image_latent_channels(self) -> int:
        """Channels of ``image_latents`` (mask + image latent) the model takes: 20 for I2V, 0 otherwise."""
        return self.in_channels - self.out_channels


WAN21_T2V_1_3B = WanConfig(num_heads=12, ffn_dim=8960, num_layers=30)
WAN21_T2V_14B = WanConfig()
WAN21_I2V_14B = WanConfig(in_channels=36, image_dim=1280)
WAN22_TI2V_5B = WanConfig(num_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30)
WAN22_T2V_A14B_EXPERT = WAN21_T2V_14B
WAN22_I2V_A14B_EXPERT = WanConfig(in_channels=36)


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """WanConfig fields from diffusers config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` and ``None`` values are skipped; keys with one supported value are checked.

    >>> fields_from_diffusers({"num_layers": 2, "image_dim": None, "_class_name": "WanTransformer3DModel"}, strict=True)
    {'num_layers': 2}
    >>> fields_from_diffusers({"cross_attn_norm": False}, strict=False)
    Traceback (most recent call last):
    ...
    ValueError: Wan config cross_attn_norm=False is not supported, only True: every released Wan model normalizes the cross-attention input
    """
    for key, (supported, reason) in SUPPORTED_ONLY.items():
        if key in config and config[key] != supported:
            raise ValueError(f"Wan config {key}={config[key]!r} is not supported, only {supported!r}: {reason}")
    if strict:
        known = {*DIFFUSERS_KEYS, *SUPPORTED_ONLY, *IMPLIED_KEYS}
        loading.check_known_config_keys(config, known, known, "Wan")
    return {DIFFUSERS_KEYS[k]: v for k, v in config.items() if k in DIFFUSERS_KEYS and v is not None}


def fields_from_shapes(shapes: Mapping[str, tuple], head_dim: int) -> dict:
    """WanConfig fields implied by the shapes of a checkpoint in our (diffusers) key layout.

    The q/k norms span all heads, so the shapes give the hidden size only: the number of heads is
    hidden / ``head_dim``. Keys that are absent are skipped (the key check reports them).

    >>> fields = fields_from_shapes({"patch_embedding.weight": (1536, 16, 1, 2, 2), "blocks.29.ffn.net.2.weight": (1536, 8960)}, 128)
    >>> fields["num_heads"], fields["patch_size"], fields["num_layers"], fields["ffn_dim"]
    (12, (1, 2, 2), 30, 8960)
    """
    fields: dict = {}
    patch = shapes.get("patch_embedding.weight")
    if patch is not None:
        fields |= {"num_heads": patch[0] // head_dim, "in_channels": patch[1], "patch_size": tuple(patch[2:])}
    fields |= loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    ffn_out = next((shapes[k] for k in shapes if k.endswith("ffn.net.2.weight")), None)
    if ffn_out is not None:
        fields["ffn_dim"] = ffn_out[1]
    if "proj_out.weight" in shapes and patch is not None:
        patch_volume = patch[2] * patch[3] * patch[4]
        fields["out_channels"] = shapes["proj_out.weight"][0] // patch_volume
    fields["num_layers"] = loading.numbered_count(shapes, "blocks.")
    return fields


def resolve_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | WanConfig | None = None
) -> WanConfig:
    """The config of a checkpoint: defaults < its shapes < its ``config.json`` < ``config``.

    A :class:`WanConfig` passed as ``config`` is taken as is. ``added_kv_proj_dim`` is checked
    against the result (diffusers' I2V models set it to the hidden size).

    >>> shapes = {"patch_embedding.weight": (32, 16, 1, 2, 2)}
    >>> resolve_config(shapes, {"attention_head_dim": 16}, {"num_layers": 0}).num_heads
    2
    """
    if isinstance(config, WanConfig):
        return config
    named = fields_from_diffusers(config_json or {}, strict=False) | fields_from_diffusers(config or {}, strict=True)
    fields = fields_from_shapes(shapes, named.get("head_dim", WanConfig.head_dim)) | named
    resolved = WanConfig(**fields)
    for source in (config_json or {}, config or {}):
        _check_added_kv_proj_dim(source.get("added_kv_proj_dim"), resolved)
    return resolved


def _check_added_kv_proj_dim(value: int | None, config: WanConfig) -> None:
    expected = None if config.image_dim is None else config.hidden_size
    if value is not None and value != expected:
        raise ValueError(
            f"added_kv_proj_dim {value} does not fit image_dim {config.image_dim} and hidden size {config.hidden_size}: "
            f"the image keys/values are projected from the embedded image tokens, so it must be {expected}"
        )
