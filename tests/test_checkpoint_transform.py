"""The checkpoint transform: recompute counts, exact gradients, one object for sampler and loss."""

import torch

import dsf
from dsf.diffusion.losses import flow_matching_loss
from dsf.models.digits import DigitsConfig, dit_apply, init_dit
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FLUX1
from dsf.transforms import checkpoint
from dsf.weight import Cast, Weight, count_materializations, map_weights

CFG = DigitsConfig(dim=32, depth=3, heads=2, text_dim=8)


def stored_in_bf16(params):
    """Block weights stored in bf16 and decoded to fp32 at use: each use is one materialization."""
    return map_weights(lambda _, w: Weight(w.to(torch.bfloat16)).with_stage(Cast(torch.float32)), params, r"^blocks/")


def model(params, x, sigma, text):
    return dit_apply(params, x, sigma, text, config=CFG)


def setup():
    params = stored_in_bf16(init_dit(CFG, dsf.random.key(0)))
    zero_init = ("modulation", "proj_out")
    params = dsf.tree.map_with_path(lambda p, x: x + 0.01 if any(z in p for z in zero_init) else x, params)
    x0 = torch.randn(2, 3, 16, 16)
    text = torch.randn(2, 6, 8)
    return params, x0, text


def loss(params, x0, text, key):
    return flow_matching_loss(model, params, x0, key, {"text": text}, schedule=FLUX1)


def records_per_pass(params):
    return sum(isinstance(w, Weight) for blk in params["blocks"] for layer in blk.values() for w in layer.values())


def materializations(fn, *args):
    with count_materializations() as counter:
        fn(*args)
    return counter[0]


def test_checkpoint_recomputes_materialization_in_backward():
    params, x0, text = setup()
    records = records_per_pass(params)
    assert records == CFG.depth * 10
    where = r"^blocks/.*/data$"
    key = dsf.random.key(1)
    plain = materializations(lambda: dsf.grad(loss, where=where)(params, x0, text, key))
    ckpt = materializations(lambda: dsf.grad(checkpoint()(loss), where=where)(params, x0, text, key))
    assert plain == records
    assert ckpt == 2 * records


def test_checkpoint_gives_the_same_loss_and_gradients():
    params, x0, text = setup()
    key = dsf.random.key(2)
    for transform in (checkpoint(), checkpoint(offload_activations=True)):
        v1, g1 = dsf.value_and_grad(loss, where=r"^blocks/")(params, x0, text, key)
        v2, g2 = dsf.value_and_grad(transform(loss), where=r"^blocks/")(params, x0, text, key)
        assert torch.equal(v1, v2)
        for a, b in zip(dsf.tree.tensors(g1), dsf.tree.tensors(g2)):
            assert torch.equal(a, b)


def test_one_transform_object_wraps_sampler_and_loss():
    params, x0, text = setup()
    t = checkpoint()
    sampler = t(lambda p, noise: sample(model, p, noise, FLUX1.sigmas(3), {"text": text}, progress=False))
    noise = dsf.random.normal(dsf.random.key(3), x0.shape)
    with torch.no_grad():
        with count_materializations() as counter:
            images = sampler(params, noise)
        plain = sample(model, params, noise, FLUX1.sigmas(3), {"text": text}, progress=False)
    assert torch.equal(images, plain)
    assert counter[0] == 3 * records_per_pass(params)  # three steps, no recompute when gradients are off
    value, grads = dsf.value_and_grad(t(loss), where=r"^blocks/")(params, x0, text, dsf.random.key(4))
    assert torch.isfinite(value) and grads["blocks"][0]["qkv"]["weight"].data.abs().sum() > 0


def test_offload_activations_packs_every_tensor_of_a_tuple_carry(monkeypatch):
    packed = []

    class RecordingPacker(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda t: packed.append(t.data_ptr()) or t, lambda t: t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingPacker)
    carried = []

    def double_stream(p, carry, scale):
        img, txt = carry
        carried.append({img.data_ptr(), txt.data_ptr()})
        return torch.tanh(img @ p["w"]) * scale, torch.tanh(txt @ p["w"])

    blocks = [{"w": torch.randn(4, 4, requires_grad=True)} for _ in range(3)]
    f = lambda p, x: sum(t.sum() for t in dsf.run_blocks(double_stream, p, (x, x + 1), torch.tensor(2.0)))
    dsf.grad(checkpoint(offload_activations=True)(f))(blocks, torch.randn(2, 4))
    assert all(inputs <= set(packed) for inputs in carried[:3])  # (img, txt) of each block went through the packer
