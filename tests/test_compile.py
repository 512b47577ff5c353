"""The compile transform: one compiled body per block kind, no recompilation after warm-up, and an
eager fallback with a clear warning where torch.compile cannot run. (Its composition with the other
transforms, against eager within 1e-5, is in test_composition.py.)"""

import warnings

import pytest
import torch
import torch._dynamo.testing

import dsf
from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FLUX1
from dsf.models import flux
from dsf.transforms import checkpoint, compile, lora, lora_trainable

CONFIG = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2,
                         num_single_blocks=3, context_dim=32, pooled_dim=16)
DIT = flux.FluxDiT(CONFIG)
K = dsf.random.split(dsf.random.key(1), 6)
LATENTS = dsf.random.normal(K[0], (1, 16, 4, 4))
COND = {"text_embeds": dsf.random.normal(K[1], (1, 3, 32)), "pooled_embeds": dsf.random.normal(K[2], (1, 16)),
        "guidance": torch.full((1,), 3.5)}


def loss(params, key):
    return flow_matching_loss(DIT, params, LATENTS, key, COND, schedule=FLUX1)


def sampler(params, noise):
    return sample(DIT, params, noise, FLUX1.sigmas(3), COND, progress=False)


def test_blocks_compile_once_per_kind_and_never_again_after_warm_up():
    counter = torch._dynamo.testing.CompileCounter()
    tx = dsf.chain(lora(rank=2, targets="to_q,proj_mlp"), checkpoint(), compile(backend=counter))
    params = tx.init(flux.init_dit(CONFIG, K[3]), K[4])
    with torch.no_grad():
        tx(sampler)(params, LATENTS)
    assert counter.frame_count == 2  # 3 steps × 5 blocks ran through one body per kind (double, single)
    loss_and_grads = dsf.value_and_grad(tx(loss), where=lora_trainable)
    loss_and_grads(params, K[5])
    warm = counter.frame_count
    for step in range(2):
        loss_and_grads(params, dsf.random.key(step))
        with torch.no_grad():
            tx(sampler)(params, LATENTS + step)
    assert counter.frame_count == warm


def _block(p, h):
    return torch.tanh(h @ p["w"])


def _other_block(p, h):
    return torch.sigmoid(h @ p["w"])


def _blocks_loss(params, x):
    return dsf.run_blocks(_block, params["blocks"], x).square().sum()


PARAMS = {"blocks": [{"w": torch.eye(3) * 0.5 + 0.1}, {"w": torch.eye(3) * 0.2}]}
X = torch.ones(2, 3)


def test_without_a_cpp_compiler_blocks_run_eagerly_with_a_warning():
    from torch._inductor import config

    f = lambda params, x: dsf.run_blocks(_other_block, params["blocks"], x).sum()  # noqa: E731 (a block never compiled here)
    with config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), pytest.warns(
            RuntimeWarning, match=r"C\+\+ compiler.*no-such-c\+\+-compiler.*install g\+\+.*run eagerly"):
        value = compile()(f)(PARAMS, X)
    assert torch.equal(value, f(PARAMS, X))


def test_a_failing_backend_falls_back_to_eager_with_its_reason():
    def broken(graph, example_inputs):
        raise RuntimeError("cannot build kernels")

    with pytest.warns(RuntimeWarning, match="backend failed.*cannot build kernels.*run eagerly"):
        value, grads = dsf.value_and_grad(compile(backend=broken)(_blocks_loss))(PARAMS, X)
    expected, expected_grads = dsf.value_and_grad(_blocks_loss)(PARAMS, X)
    assert torch.equal(value, expected)
    assert torch.equal(grads["blocks"][1]["w"], expected_grads["blocks"][1]["w"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is remembered: no second attempt, no second warning
        compile(backend=broken)(_blocks_loss)(PARAMS, X)
