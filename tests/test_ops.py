"""dsf.ops against torch modules and the diffusers reference helpers."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed, get_timestep_embedding

from dsf import ops
from dsf.weight import Cast, Weight

torch.manual_seed(0)


def test_linear_accepts_tensors_and_weight_records():
    x, w, b = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    record = Weight(w.double()).with_stage(Cast(torch.float32))
    assert torch.allclose(ops.linear(x, w, b), F.linear(x, w, b))
    assert torch.allclose(ops.linear(x, record, b), F.linear(x, w, b), atol=1e-6)


def test_norms_match_torch_modules():
    x = torch.randn(2, 6, 5, 5)
    gn = torch.nn.GroupNorm(3, 6, eps=1e-6)
    torch.nn.init.normal_(gn.weight), torch.nn.init.normal_(gn.bias)
    assert torch.allclose(ops.group_norm(x, 3, gn.weight, gn.bias), gn(x), atol=1e-6)
    y = torch.randn(3, 7)
    ln = torch.nn.LayerNorm(7, eps=1e-6)
    torch.nn.init.normal_(ln.weight)
    assert torch.allclose(ops.layer_norm(y, ln.weight, ln.bias), ln(y), atol=1e-6)
    rms = torch.nn.RMSNorm(7, eps=1e-6)
    torch.nn.init.normal_(rms.weight)
    assert torch.allclose(ops.rms_norm(y, rms.weight), rms(y), atol=1e-6)


def test_rms_norm_keeps_low_precision_input_dtype():
    assert ops.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("flip,shift,scale", [(True, 0, 1), (False, 1, 1), (True, 1, 1000)])
def test_timestep_embedding_matches_diffusers(flip, shift, scale):
    t = torch.tensor([0.0, 0.5, 999.0])
    ours = ops.timestep_embedding(t, 64, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_attention_matches_explicit_softmax():
    q, k, v = torch.randn(3, 2, 5, 12)
    out = ops.attention(q, k, v, heads=3)
    qh, kh, vh = (t.reshape(2, 5, 3, 4).transpose(1, 2) for t in (q, k, v))
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, dim=-1) @ vh
    assert torch.allclose(out, ref.transpose(1, 2).reshape(2, 5, 12), atol=1e-6)


def test_attention_errors_name_the_fix():
    with pytest.raises(ValueError, match="needs heads="):
        ops.attention(*torch.randn(3, 1, 2, 4))
    with pytest.raises(ValueError, match="layout"):
        ops.attention(*torch.randn(3, 1, 2, 4), heads=2, layout="bshd")


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_matches_diffusers(interleaved):
    positions = torch.arange(6, dtype=torch.float32)
    cos, sin = ops.rope_frequencies(positions[:, None], (8,), theta=10000.0, interleaved=interleaved)
    x = torch.randn(1, 2, 6, 8)
    ref_cos, ref_sin = get_1d_rotary_pos_embed(8, positions, theta=10000.0, use_real=True, repeat_interleave_real=interleaved)
    ref = apply_rotary_emb(x, (ref_cos, ref_sin), use_real=True, use_real_unbind_dim=-1 if interleaved else -2)
    assert torch.allclose(ops.apply_rope(x, cos, sin, interleaved=interleaved), ref, atol=1e-5)


def test_rope_axes_must_match_positions():
    with pytest.raises(ValueError, match="axes"):
        ops.rope_frequencies(torch.zeros(4, 2), (4, 4, 4))
