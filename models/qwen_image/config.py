"""Configuration of the Qwen-Image DiT, and how a checkpoint's shapes and config files fill it in.

Sources of a loaded model's config, each overriding the one before: the official Qwen-Image
defaults < what the checkpoint's shapes say < the diffusers ``config.json`` beside the weights <
the ``config=`` the caller passes (diffusers key names, or a whole :class:`QwenImageConfig`).

Example:
    >>> QwenImageConfig().hidden_size, QwenImageConfig(zero_cond_t=True).zero_cond_t
    (3072, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dsf.files import loading

TIMESTEP_FEATURES = 256  # width of the sinusoidal timestep features
ROPE_THETA = 10000.0  # fixed in diffusers' QwenEmbedRope (not a config key)

DIFFUSERS_KEYS = {  # diffusers QwenImageTransformer2DModel config key -> QwenImageConfig field
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "joint_attention_dim": "context_dim",
    "axes_dims_rope": "axes_dims_rope",
    "zero_cond_t": "zero_cond_t",
}
# keys current diffusers writes whose other values build a network dsf does not implement: {key: (supported, what)}
UNIMPLEMENTED_VALUES = {
    "patch_size": (lambda v: v == 2, "2 (the DiT cuts 2×2 latent patches)"),
    "guidance_embeds": (lambda v: not v, "false (diffusers' Qwen-Image DiT has no guidance embedder)"),
    "use_additional_t_cond": (lambda v: not v, "false (the Layered model's extra time embedding is not implemented)"),
    "use_layer3d_rope": (lambda v: not v, "false (the Layered model's 3-D layer RoPE is not implemented)"),
}
_SIZE_READINGS = {  # QwenImageConfig field -> (key, axis) of the checkpoint shape that holds it
    "in_channels": ("img_in.weight", 1),
    "context_dim": ("txt_in.weight", 1),
}


@dataclass(frozen=True)
class QwenImageConfig:
    """Sizes of a Qwen-Image DiT; the defaults are Qwen/Qwen-Image (Edit-2511 adds ``zero_cond_t=True``).

    ``in_channels`` is the width of a 2×2 latent patch (16 VAE channels × 4); ``out_channels`` the latent channels
    of the predicted velocity (diffusers' convention: ``proj_out`` is ``4 · out_channels`` wide). ``zero_cond_t``:
    reference-image tokens are modulated at t = 0 (Edit-2511).

    >>> QwenImageConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6)).hidden_size
    32
    """

    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    context_dim: int = 3584
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be 3 axes (frame, row, column) summing to head_dim "
                f"{self.head_dim}: pass axes_dims_rope that do (e.g. config={{'axes_dims_rope': [...]}} when loading)"
            )
        if self.in_channels % 4:
            raise ValueError(f"in_channels {self.in_channels} is not a 2×2 patch width (a multiple of 4)")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the model takes (``in_channels`` / 4)."""
        return self.in_channels // 4


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """QwenImageConfig fields from diffusers config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` and ``None`` values are skipped; ``patch_size``, ``guidance_embeds``,
    ``use_additional_t_cond`` and ``use_layer3d_rope`` are read and must have the values dsf implements.

    >>> fields_from_diffusers({"num_layers": 2, "zero_cond_t": True, "use_layer3d_rope": False}, strict=True)
    {'num_layers': 2, 'zero_cond_t': True}
    >>> fields_from_diffusers({"use_layer3d_rope": True}, strict=False)
    Traceback (most recent call last):
    ...
    ValueError: Qwen-Image config use_layer3d_rope=True is not supported by the Qwen-Image DiT: it must be false (the Layered model's 3-D layer RoPE is not implemented)
    """
    loading.check_supported_values(config, UNIMPLEMENTED_VALUES, "Qwen-Image", "Qwen-Image DiT")
    if strict:
        loading.check_known_config_keys(config, {*DIFFUSERS_KEYS, *UNIMPLEMENTED_VALUES}, DIFFUSERS_KEYS, "Qwen-Image")
    return {DIFFUSERS_KEYS[k]: v for k, v in config.items() if k in DIFFUSERS_KEYS and v is not None}


def fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """QwenImageConfig fields implied by the shapes of a checkpoint in our (diffusers) key layout.

    The head size is the length of the per-head q norm scale, so heads = hidden / head size. Keys
    that are absent are skipped (the key check reports them).

    >>> fields = fields_from_shapes({"img_in.weight": (3072, 64), "proj_out.weight": (64, 3072),
    ...                              "transformer_blocks.0.attn.norm_q.weight": (128,)})
    >>> fields["num_heads"], fields["head_dim"], fields["out_channels"], fields["num_layers"]
    (24, 128, 16, 1)
    """
    fields = loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    hidden = shapes.get("img_in.weight", (None,))[0]
    head_norm = shapes.get("transformer_blocks.0.attn.norm_q.weight")
    if head_norm is not None:
        fields["head_dim"] = head_norm[0]
        if hidden is not None:
            fields["num_heads"] = hidden // head_norm[0]
    if "proj_out.weight" in shapes:
        fields["out_channels"] = shapes["proj_out.weight"][0] // 4
    fields["num_layers"] = loading.numbered_count(shapes, "transformer_blocks.")
    return fields


def resolve_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | QwenImageConfig | None = None
) -> QwenImageConfig:
    """The config of a checkpoint: defaults < its shapes < its ``config.json`` < ``config``.

    A :class:`QwenImageConfig` passed as ``config`` is taken as is.

    >>> shapes = {"img_in.weight": (32, 64), "transformer_blocks.0.attn.norm_q.weight": (16,)}
    >>> cfg = resolve_config(shapes, {"axes_dims_rope": [4, 6, 6], "zero_cond_t": True}, {"num_layers": 0})
    >>> cfg.num_heads, cfg.zero_cond_t, cfg.num_layers
    (2, True, 0)
    """
    if isinstance(config, QwenImageConfig):
        return config
    return QwenImageConfig(**loading.config_fields(fields_from_shapes(shapes), config_json, config, fields_from_diffusers))
