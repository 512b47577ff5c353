"""The Wan DiT (Wan 2.1, Wan 2.2) as a pure function of a parameter tree in the diffusers key layout.

Latents (B, C, T, H, W), with the image-conditioning channels concatenated for image-to-video, are
cut into 1×2×2 patches by a strided 3-D convolution and run through cross-attention DiT blocks:
self-attention over all video tokens with 3-D rotary positions (frame, row, column), then
cross-attention to the umT5 text states (plus, for Wan2.1 I2V, separate keys/values over the
embedded CLIP image tokens, summed in), then an MLP. Self-attention and MLP are modulated
(shift, scale, gate) by the σ·1000 embedding plus a learned per-block table; the head is modulated
the same way. Norms and modulation run in float32, as in the reference.

:class:`TwoExpertDiT` routes each call of a Wan2.2 A14B model to its high- or low-noise expert by σ.

Example:
    >>> import torch, dsf
    >>> cfg = WanConfig(num_heads=2, head_dim=12, ffn_dim=32, num_layers=1, text_dim=8, text_len=4)
    >>> dit = WanDiT(cfg)
    >>> params = init_dit(cfg, dsf.random.key(0))
    >>> dit(params, torch.randn(1, 16, 3, 4, 4), torch.tensor([0.5]), text_embeds=torch.randn(1, 2, 8)).shape
    torch.Size([1, 16, 3, 4, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

import dsf
from dsf import ops
from dsf.model_parts.init import normal
from dsf.model_parts.input_checks import check_conditioning_shapes, fits, shape_of
from dsf.random import Key, split
from dsf.diffusion.schedules import WAN, FlowSchedule
from dsf.weight import dense
from dsf.models.wan.config import WanConfig

IMAGE_EMBEDDER_EPS = 1e-5  # the CLIP-feature embedder's LayerNorms keep torch's default eps
MODULATION_PARTS = 6  # shift, scale, gate of self-attention, then of the MLP
EXPERT_BOUNDARIES = {"text-to-video": 0.875, "image-to-video": 0.9}  # Wan2.2 A14B σ where the experts switch


def _linear_shapes(name: str, out_dim: int, in_dim: int) -> dict[str, tuple]:
    return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}


def _norm_shapes(name: str, dim: int) -> dict[str, tuple]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _attention_shapes(prefix: str, hidden: int, image_keys: bool) -> dict[str, tuple]:
    names = ("to_q", "to_k", "to_v", "to_out.0") + (("add_k_proj", "add_v_proj") if image_keys else ())
    shapes = {key: shape for name in names for key, shape in _linear_shapes(prefix + name, hidden, hidden).items()}
    norms = ("norm_q", "norm_k") + (("norm_added_k",) if image_keys else ())
    return shapes | {f"{prefix}{name}.weight": (hidden,) for name in norms}


def _block_shapes(prefix: str, config: WanConfig) -> dict[str, tuple]:
    h = config.hidden_size
    shapes = _attention_shapes(prefix + "attn1.", h, image_keys=False)
    shapes |= _attention_shapes(prefix + "attn2.", h, image_keys=config.image_dim is not None)
    shapes |= _norm_shapes(prefix + "norm2", h)
    shapes |= _linear_shapes(prefix + "ffn.net.0.proj", config.ffn_dim, h) | _linear_shapes(prefix + "ffn.net.2", h, config.ffn_dim)
    return shapes | {prefix + "scale_shift_table": (1, MODULATION_PARTS, h)}


def _image_embedder_shapes(prefix: str, image_dim: int, hidden: int) -> dict[str, tuple]:
    shapes = _norm_shapes(prefix + "norm1", image_dim) | _linear_shapes(prefix + "ff.net.0.proj", image_dim, image_dim)
    return shapes | _linear_shapes(prefix + "ff.net.2", hidden, image_dim) | _norm_shapes(prefix + "norm2", hidden)


def param_shapes(config: WanConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers layout.

    >>> param_shapes(WanConfig())["blocks.39.attn1.norm_q.weight"], param_shapes(WanConfig())["proj_out.weight"]
    ((5120,), (64, 5120))
    """
    h, (pt, ph, pw) = config.hidden_size, config.patch_size
    shapes = {"patch_embedding.weight": (h, config.in_channels, pt, ph, pw), "patch_embedding.bias": (h,)}
    shapes |= _linear_shapes("condition_embedder.time_embedder.linear_1", h, config.freq_dim)
    shapes |= _linear_shapes("condition_embedder.time_embedder.linear_2", h, h)
    shapes |= _linear_shapes("condition_embedder.time_proj", MODULATION_PARTS * h, h)
    shapes |= _linear_shapes("condition_embedder.text_embedder.linear_1", h, config.text_dim)
    shapes |= _linear_shapes("condition_embedder.text_embedder.linear_2", h, h)
    if config.image_dim is not None:
        shapes |= _image_embedder_shapes("condition_embedder.image_embedder.", config.image_dim, h)
    for i in range(config.num_layers):
        shapes |= _block_shapes(f"blocks.{i}.", config)
    shapes |= _linear_shapes("proj_out", config.out_channels * pt * ph * pw, h)
    return shapes | {"scale_shift_table": (1, 2, h)}


def dit_params_meta(config: WanConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> from dsf.models.wan.config import WAN21_T2V_1_3B
    >>> round(dsf.tree.num_params(dit_params_meta(WAN21_T2V_1_3B)) / 1e9, 2)
    1.42
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_dit(config: WanConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: weights N(0, 0.02²), modulation tables N(0, 1/hidden), zero biases, unit norm scales.

    >>> params = init_dit(WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=1, text_dim=8), dsf.random.key(0))
    >>> params["blocks"][0]["attn1"]["norm_q"]["weight"].tolist() == [1.0] * 12
    True
    """
    shapes = param_shapes(config)
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        if name.endswith("scale_shift_table"):
            flat[name] = normal(name_key, shape, std=config.hidden_size**-0.5, dtype=dtype)
        elif len(shape) > 1:
            flat[name] = normal(name_key, shape, std=0.02, dtype=dtype)
        elif name.endswith(".weight"):  # the only 1-D weights are norm scales
            flat[name] = torch.ones(shape, dtype=dtype)
        else:
            flat[name] = torch.zeros(shape, dtype=dtype)
    return dsf.tree.unflatten_dict(flat)


def position_ids(frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """RoPE positions (frames·height·width, 3) of the token grid: (frame, row, column), frame-major.

    >>> position_ids(2, 1, 2).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    """
    axes = [torch.arange(n, device=device) for n in (frames, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3).float()


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Output tokens (B, T'·H'·W', pt·ph·pw·C) -> latents (B, C, T'·pt, H'·ph, W'·pw).

    >>> unpatchify(torch.zeros(1, 2 * 3 * 4, 4 * 16), (2, 3, 4), (1, 2, 2)).shape
    torch.Size([1, 16, 2, 6, 8])
    """
    (f, h, w), (pt, ph, pw) = grid, patch_size
    return rearrange(
        tokens, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw
    )  # (B, C, T, H, W)


def _float_layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """Layer norm computed in float32 (diffusers' FP32LayerNorm); the result stays float32."""
    weight, bias = (None if t is None else dense(t).float() for t in (weight, bias))
    return ops.layer_norm(x.float(), weight, bias, eps=eps)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return (_float_layer_norm(x, eps) * (1 + scale) + shift).to(x.dtype)


def _gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.float() + update.float() * gate).to(x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b s (h d) -> b h s d", h=heads)  # (B, H, S, D)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b h s d -> b s (h d)")  # (B, S, H·D)


def _normed_projection(x: torch.Tensor, linear: dict, norm: dict, heads: int, eps: float) -> torch.Tensor:
    """Project, RMS-normalize across all heads (Wan's q/k norm), then split into heads."""
    return _split_heads(ops.rms_norm(ops.linear(x, **linear), norm["weight"], eps), heads)


def _self_attention(attn: dict, x: torch.Tensor, rope, heads: int, eps: float) -> torch.Tensor:
    cos, sin = rope
    q = ops.apply_rope(_normed_projection(x, attn["to_q"], attn["norm_q"], heads, eps), cos, sin)
    k = ops.apply_rope(_normed_projection(x, attn["to_k"], attn["norm_k"], heads, eps), cos, sin)
    v = _split_heads(ops.linear(x, **attn["to_v"]), heads)
    return ops.linear(_merge_heads(ops.attention(q, k, v, layout="b h s d")), **attn["to_out"][0])


def _cross_attention(attn: dict, x: torch.Tensor, text: torch.Tensor, image, heads: int, eps: float) -> torch.Tensor:
    """Attention from video tokens to text tokens, plus (I2V) to image tokens through their own keys and values."""
    q = _normed_projection(x, attn["to_q"], attn["norm_q"], heads, eps)
    k = _normed_projection(text, attn["to_k"], attn["norm_k"], heads, eps)
    out = ops.attention(q, k, _split_heads(ops.linear(text, **attn["to_v"]), heads), layout="b h s d")
    if image is not None:
        k_image = _normed_projection(image, attn["add_k_proj"], attn["norm_added_k"], heads, eps)
        v_image = _split_heads(ops.linear(image, **attn["add_v_proj"]), heads)
        out = out + ops.attention(q, k_image, v_image, layout="b h s d")
    return ops.linear(_merge_heads(out), **attn["to_out"][0])


def _feed_forward(ffn: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(F.gelu(ops.linear(x, **ffn["net"]["0"]["proj"]), approximate="tanh"), **ffn["net"]["2"])


def _modulation(table, time_projection: torch.Tensor) -> torch.Tensor:
    """Per-block (or head) table (1, n, D) + time modulation (n, B, S', D) -> (n, B, S', D), float32."""
    return rearrange(dense(table).float(), "1 n d -> n 1 1 d") + time_projection  # (n, 1, 1, D) broadcast


def _block(p: dict, x, text, image, time_projection, rope, *, heads: int, eps: float):
    shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = _modulation(p["scale_shift_table"], time_projection)
    x = _gated_residual(x, _self_attention(p["attn1"], _modulate(x, shift, scale, eps), rope, heads, eps), gate)
    cross_input = _float_layer_norm(x, eps, **p["norm2"]).to(x.dtype)
    x = x + _cross_attention(p["attn2"], cross_input, text, image, heads, eps)
    return _gated_residual(x, _feed_forward(p["ffn"], _modulate(x, mlp_shift, mlp_scale, eps)), mlp_gate)


def _time_embedding(p: dict, timestep: torch.Tensor, tokens_per_frame: int, freq_dim: int, dtype) -> torch.Tensor:
    """The σ·1000 embedding (B, 1, D) of one σ per sample, or (B, T'·H'·W', D) of one σ per latent frame."""
    sigma = timestep.reshape(timestep.shape[0], -1)  # (B, 1) or (B, T')
    features = ops.timestep_embedding(sigma.flatten().float() * 1000, freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    hidden = ops.linear(F.silu(ops.linear(features.to(dtype), **p["linear_1"])), **p["linear_2"])
    per_frame = rearrange(hidden, "(b f) d -> b f d", b=sigma.shape[0])  # (B, 1 or T', D)
    if sigma.shape[1] == 1:
        return per_frame
    return repeat(per_frame, "b f d -> b (f n) d", n=tokens_per_frame)  # (B, T'·H'·W', D)


def _time_projection(p: dict, time_embedding: torch.Tensor) -> torch.Tensor:
    projected = ops.linear(F.silu(time_embedding), **p)
    return rearrange(projected.float(), "b s (n d) -> n b s d", n=MODULATION_PARTS)  # (6, B, S', D)


def _text_embedding(p: dict, text_embeds: torch.Tensor, text_len: int) -> torch.Tensor:
    """Text states zero-padded to ``text_len`` tokens (as Wan pads them), then embedded."""
    padded = F.pad(text_embeds, (0, 0, 0, text_len - text_embeds.shape[1]))
    return ops.linear(F.gelu(ops.linear(padded, **p["linear_1"]), approximate="tanh"), **p["linear_2"])


def _image_embedding(p: dict, image_embeds: torch.Tensor) -> torch.Tensor:
    x = _float_layer_norm(image_embeds, IMAGE_EMBEDDER_EPS, **p["norm1"]).to(image_embeds.dtype)
    x = ops.linear(F.gelu(ops.linear(x, **p["ff"]["net"]["0"]["proj"])), **p["ff"]["net"]["2"])
    return _float_layer_norm(x, IMAGE_EMBEDDER_EPS, **p["norm2"]).to(image_embeds.dtype)


def _head(params: dict, x: torch.Tensor, time_embedding: torch.Tensor, eps: float) -> torch.Tensor:
    table = rearrange(dense(params["scale_shift_table"]).float(), "1 n d -> n 1 1 d")  # (2, 1, 1, D)
    shift, scale = table + time_embedding.float()
    return ops.linear(_modulate(x, shift, scale, eps), **params["proj_out"])


def _check_image_inputs(config: WanConfig, latents: torch.Tensor, image_embeds, image_latents) -> None:
    batch, _, frames, height, width = latents.shape
    if config.image_dim is not None and image_embeds is None:
        raise ValueError(
            f"this Wan model is image-to-video with a CLIP image embedder (image_dim {config.image_dim}): pass "
            f"image_embeds of shape ({batch}, 257, {config.image_dim}), the CLIP vision encoder's penultimate states"
        )
    if config.image_dim is None and image_embeds is not None:
        raise ValueError(
            "this Wan model has no image embedder (text-to-video, or Wan2.2, which conditions on image latents only): "
            "pass image_embeds=None"
        )
    channels = config.image_latent_channels
    if channels and image_latents is None:
        raise ValueError(
            f"this Wan model is image-to-video (in_channels {config.in_channels} = {config.out_channels} noisy latent "
            f"channels + {channels} conditioning channels): pass image_latents of shape ({batch}, {channels}, "
            f"{frames}, {height}, {width}), the 4 first-frame mask channels then the VAE latents of the conditioning video"
        )
    if not channels and image_latents is not None:
        raise ValueError(
            f"this Wan model takes no image_latents (in_channels = out_channels = {config.in_channels}): pass "
            "image_latents=None; Wan2.2 TI2V conditions on an image by writing its latent into latents[:, :, :1] "
            "and giving that frame σ 0 through a per-frame timestep (B, T)"
        )


def check_inputs(config: WanConfig, latents, timestep, text_embeds, image_embeds=None, image_latents=None) -> None:
    """Raise a ValueError naming the offending input and the fix when inputs do not fit ``config``.

    >>> latents, text = torch.zeros(1, 16, 3, 4, 5), torch.zeros(1, 2, 4096)
    >>> check_inputs(WanConfig(), latents, torch.zeros(1), text)
    Traceback (most recent call last):
    ...
    ValueError: latents frames 3, height 4 and width 5 must be multiples of the patch size (1, 2, 2): use a video size divisible by 16 (the VAE's 8 × the patch's 2)
    """
    if not fits(latents, (None, config.out_channels, None, None, None)):
        raise ValueError(
            f"latents have shape {shape_of(latents)}; this Wan model takes noisy latents (B, {config.out_channels}, T, H, W)"
            + (f" and the {config.image_latent_channels} conditioning channels separately as image_latents"
               if config.image_latent_channels else "")
        )
    batch, _, frames, height, width = latents.shape
    if any(n % p for n, p in zip((frames, height, width), config.patch_size)):
        raise ValueError(
            f"latents frames {frames}, height {height} and width {width} must be multiples of the patch size "
            f"{config.patch_size}: use a video size divisible by {8 * config.patch_size[1]} (the VAE's 8 × the patch's "
            f"{config.patch_size[1]})"
        )
    _check_image_inputs(config, latents, image_embeds, image_latents)
    per_frame = frames // config.patch_size[0]
    if not (fits(timestep, (batch,)) or fits(timestep, (batch, per_frame))):
        raise ValueError(
            f"timestep has shape {shape_of(timestep)} but latents of shape {tuple(latents.shape)} need a tensor timestep of "
            f"shape ({batch},) (one flow-matching σ in [0, 1] per sample) or ({batch}, {per_frame}) (one σ per latent frame)"
        )
    expected = {
        "text_embeds": (text_embeds, (batch, None, config.text_dim), "umT5 states"),
        "image_embeds": (image_embeds, (batch, None, config.image_dim), "CLIP vision states"),
        "image_latents": (image_latents, (batch, config.image_latent_channels, frames, height, width), "mask + image latents"),
    }
    check_conditioning_shapes(latents, expected)
    if text_embeds.shape[1] > config.text_len:
        raise ValueError(
            f"text_embeds have {text_embeds.shape[1]} tokens but this Wan model attends to at most text_len "
            f"{config.text_len}: encode the prompt with max_length={config.text_len}"
        )


def apply(params: dict, latents, timestep, text_embeds, image_embeds=None, image_latents=None, *, config: WanConfig):
    """The velocity (B, C, T, H, W) predicted for ``latents`` at flow-matching times ``timestep``.

    ``timestep``: σ in [0, 1] of shape (B,), or (B, T / patch frames) for one σ per latent frame
    (Wan2.2 TI2V gives its clean first frame σ 0). ``text_embeds`` (B, L ≤ text_len, text_dim);
    ``image_embeds`` (B, 257, image_dim) for models with an image embedder; ``image_latents``
    (B, in - out channels, T, H, W) for image-to-video models. Computes in ``latents.dtype``.

    >>> cfg = WanConfig(num_heads=1, head_dim=12, in_channels=20, out_channels=16, ffn_dim=8, num_layers=1,
    ...                 text_dim=8, text_len=3, image_dim=6)
    >>> apply(init_dit(cfg, dsf.random.key(0)), torch.randn(2, 16, 1, 2, 2), torch.rand(2), torch.randn(2, 3, 8),
    ...       torch.randn(2, 5, 6), torch.randn(2, 4, 1, 2, 2), config=cfg).shape
    torch.Size([2, 16, 1, 2, 2])
    """
    check_inputs(config, latents, timestep, text_embeds, image_embeds, image_latents)
    dtype = latents.dtype
    inputs = latents if image_latents is None else torch.cat([latents, image_latents.to(dtype)], dim=1)
    patches = ops.conv3d(inputs, **params["patch_embedding"], stride=config.patch_size)
    grid = tuple(patches.shape[2:])
    # (B, T'·H'·W', D), made contiguous once: the residual stream keeps its input's memory layout, and
    # every block's adds and norms run ~2x slower over the transposed one
    x = rearrange(patches, "b d f h w -> b (f h w) d").contiguous()
    embedders = params["condition_embedder"]
    time_embedding = _time_embedding(embedders["time_embedder"], timestep, grid[1] * grid[2], config.freq_dim, dtype)
    time_projection = _time_projection(embedders["time_proj"], time_embedding)
    text = _text_embedding(embedders["text_embedder"], text_embeds.to(dtype), config.text_len)
    image = None if image_embeds is None else _image_embedding(embedders["image_embedder"], image_embeds.to(dtype))
    rope = ops.rope_frequencies(position_ids(*grid, device=latents.device), config.rope_axes_dims, config.rope_theta)
    blocks = params.get("blocks", [])
    x = dsf.run_blocks(_block, blocks, x, text, image, time_projection, rope, heads=config.num_heads, eps=config.eps)
    return unpatchify(_head(params, x, time_embedding, config.eps), grid, config.patch_size)


@dataclass(frozen=True)
class WanDiT:
    """A Wan DiT: its config and :func:`apply` as a call, ``dit(params, latents, timestep, text_embeds=...)``.

    >>> WanDiT(WanConfig()).config.num_layers
    40
    """

    config: WanConfig

    def __call__(self, params: dict, latents, timestep, text_embeds, image_embeds=None, image_latents=None):
        return apply(params, latents, timestep, text_embeds, image_embeds, image_latents, config=self.config)


def default_boundary(config: WanConfig) -> float:
    """The σ where Wan2.2 A14B switches experts: 0.9 for image-to-video models, 0.875 for text-to-video.

    >>> default_boundary(WanConfig()), default_boundary(WanConfig(in_channels=36))
    (0.875, 0.9)
    """
    task = "image-to-video" if config.image_latent_channels else "text-to-video"
    return EXPERT_BOUNDARIES[task]


@dataclass(frozen=True)
class TwoExpertDiT:
    """Wan2.2 A14B: a high-noise expert for σ ≥ ``boundary`` and a low-noise expert below it.

    ``params`` is ``{"high_noise": tree, "low_noise": tree}``. Every σ of one call must fall on the
    same side of the boundary (a sampler step shares one σ). To train one expert, give
    :func:`dsf.diffusion.losses.flow_matching_loss` that expert's params and the index range of its σ from
    :func:`expert_timestep_ranges`, e.g. ``**expert_timestep_ranges(0.875)["high_noise"]``.

    >>> cfg = WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=1, text_dim=8, text_len=2)
    >>> experts = TwoExpertDiT(WanDiT(cfg), WanDiT(cfg), boundary=0.875)
    >>> experts.expert_for(torch.tensor([0.9, 0.95])), experts.expert_for(torch.tensor([0.5]))
    ('high_noise', 'low_noise')
    >>> params = {"high_noise": init_dit(cfg, dsf.random.key(0)), "low_noise": init_dit(cfg, dsf.random.key(1))}
    >>> experts(params, torch.randn(1, 16, 1, 2, 2), torch.tensor([0.3]), torch.randn(1, 2, 8)).shape
    torch.Size([1, 16, 1, 2, 2])
    """

    high_noise: WanDiT
    low_noise: WanDiT
    boundary: float

    def expert_for(self, timestep: torch.Tensor) -> str:
        """``"high_noise"`` when every σ ≥ boundary, ``"low_noise"`` when every σ < boundary."""
        high = timestep >= self.boundary
        if bool(high.all()):
            return "high_noise"
        if not bool(high.any()):
            return "low_noise"
        raise ValueError(
            f"timestep {timestep.tolist()} has σ on both sides of the expert boundary {self.boundary}: call the "
            "experts separately (split the batch), or keep one expert's σ range per batch when training"
        )

    def __call__(self, params: dict, latents, timestep, text_embeds, image_embeds=None, image_latents=None):
        expert = self.expert_for(timestep)
        return getattr(self, expert)(params[expert], latents, timestep, text_embeds, image_embeds, image_latents)


def expert_timestep_ranges(boundary: float, schedule: FlowSchedule = WAN) -> dict[str, dict[str, float]]:
    """``min/max_timestep_boundary`` of each Wan2.2 A14B expert for :func:`dsf.diffusion.losses.flow_matching_loss`.

    Those boundaries are fractions of the schedule's training grid (index 0 is σ = 1), not σ values:
    the high-noise expert trains on the grid's σ ≥ ``boundary``, the low-noise expert on the rest.

    >>> expert_timestep_ranges(0.875)["high_noise"]
    {'min_timestep_boundary': 0.0, 'max_timestep_boundary': 0.417}
    >>> expert_timestep_ranges(0.9)["low_noise"]
    {'min_timestep_boundary': 0.358, 'max_timestep_boundary': 1.0}
    """
    grid = schedule.training_sigmas()
    split_at = int((grid >= boundary).sum()) / len(grid)
    if split_at in (0.0, 1.0):
        raise ValueError(f"boundary σ {boundary} leaves one expert no σ of the training grid; use a σ in (0, 1)")
    return {
        "high_noise": {"min_timestep_boundary": 0.0, "max_timestep_boundary": split_at},
        "low_noise": {"min_timestep_boundary": split_at, "max_timestep_boundary": 1.0},
    }
