"""Configuration of the FLUX.1 DiT, and how a checkpoint's shapes and config files fill it in.

Sources of a loaded model's config, each overriding the one before: the official FLUX.1-dev
defaults < what the checkpoint's shapes say < the diffusers ``config.json`` beside the weights <
the ``config=`` the caller passes (diffusers key names, or a whole :class:`FluxConfig`).

Example:
    >>> FluxConfig().hidden_size, FluxConfig(guidance_embeds=False).guidance_embeds
    (3072, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dsf.files import loading

TIMESTEP_FEATURES = 256  # width of the sinusoidal timestep and guidance features

DIFFUSERS_KEYS = {  # diffusers FluxTransformer2DModel config key -> FluxConfig field
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "num_double_blocks",
    "num_single_layers": "num_single_blocks",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "axes_dims_rope": "axes_dims_rope",
    "joint_attention_dim": "context_dim",
    "pooled_projection_dim": "pooled_dim",
    "guidance_embeds": "guidance_embeds",
}
_SIZE_READINGS = {  # FluxConfig field -> (key, axis) of the checkpoint shape that holds it
    "in_channels": ("x_embedder.weight", 1),
    "out_channels": ("proj_out.weight", 0),
    "context_dim": ("context_embedder.weight", 1),
    "pooled_dim": ("time_text_embed.text_embedder.linear_1.weight", 1),
}


@dataclass(frozen=True)
class FluxConfig:
    """Sizes of a FLUX.1 DiT; the defaults are FLUX.1-dev (``guidance_embeds=False`` is schnell).

    ``in_channels`` is the width of a 2×2 latent patch (16 VAE channels × 4).

    >>> FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6)).hidden_size
    32
    """

    in_channels: int = 64
    out_channels: int = 64
    num_heads: int = 24
    head_dim: int = 128
    num_double_blocks: int = 19
    num_single_blocks: int = 38
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 10000.0
    guidance_embeds: bool = True
    pooled_dim: int = 768
    context_dim: int = 4096
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} sums to {sum(self.axes_dims_rope)} but head_dim is {self.head_dim}; "
                "RoPE rotates the whole head: pass axes_dims_rope that sum to head_dim "
                "(e.g. config={'axes_dims_rope': [...]} when loading)"
            )
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % 4:
                raise ValueError(f"{name} {getattr(self, name)} is not a 2×2 patch width (a multiple of 4)")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the model takes (``in_channels`` / 4)."""
        return self.in_channels // 4


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """FluxConfig fields from diffusers config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and ``None`` values are skipped.

    >>> fields_from_diffusers({"num_layers": 2, "out_channels": None, "_class_name": "FluxTransformer2DModel"}, strict=True)
    {'num_double_blocks': 2}
    """
    if config.get("patch_size", 1) != 1:
        raise ValueError(f"FLUX.1 patchifies latents itself (2×2); patch_size must be 1, got {config['patch_size']}")
    if strict:
        loading.check_known_config_keys(config, {*DIFFUSERS_KEYS, "patch_size"}, DIFFUSERS_KEYS, "FLUX")
    return {DIFFUSERS_KEYS[k]: v for k, v in config.items() if k in DIFFUSERS_KEYS and v is not None}


def fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """FluxConfig fields implied by the shapes of a checkpoint in our (diffusers) key layout.

    The head size is the length of the per-head q/k norm scale, so heads = hidden / head size.
    Keys that are absent are skipped (the key check reports them).

    >>> fields = fields_from_shapes({"x_embedder.weight": (3072, 64), "transformer_blocks.0.attn.norm_q.weight": (128,)})
    >>> fields["num_heads"], fields["head_dim"], fields["num_double_blocks"], fields["guidance_embeds"]
    (24, 128, 1, False)
    """
    hidden = shapes.get("x_embedder.weight", (None,))[0]
    fields = loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    head_norm = next((shapes[k] for k in shapes if k.endswith("attn.norm_q.weight")), None)
    if head_norm is not None:
        fields["head_dim"] = head_norm[0]
        if hidden is not None:
            fields["num_heads"] = hidden // head_norm[0]
    mlp_in = next((shapes[k] for k in shapes if k.endswith(("ff.net.0.proj.weight", "proj_mlp.weight"))), None)
    if mlp_in is not None:
        fields["mlp_ratio"] = mlp_in[0] / mlp_in[1]
    fields["num_double_blocks"] = loading.numbered_count(shapes, "transformer_blocks.")
    fields["num_single_blocks"] = loading.numbered_count(shapes, "single_transformer_blocks.")
    fields["guidance_embeds"] = any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes)
    return fields


def resolve_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | FluxConfig | None = None
) -> FluxConfig:
    """The config of a checkpoint: defaults < its shapes < its ``config.json`` < ``config``.

    A :class:`FluxConfig` passed as ``config`` is taken as is.

    >>> shapes = {"x_embedder.weight": (32, 64), "transformer_blocks.0.attn.norm_q.weight": (16,)}
    >>> resolve_config(shapes, {"axes_dims_rope": [4, 6, 6]}, {"guidance_embeds": False}).num_heads
    2
    """
    if isinstance(config, FluxConfig):
        return config
    return FluxConfig(**loading.config_fields(fields_from_shapes(shapes), config_json, config, fields_from_diffusers))
