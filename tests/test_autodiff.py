import pytest
import torch

import dsf
from dsf.weight import Cast, Weight


def loss(params, x):
    h = torch.tanh(x @ params["a"]["w"].T)
    return (h @ dsf.materialize(params["b"]["w"]).T).square().sum() + 0 * params["unused"].sum()


def make_params():
    g = torch.Generator().manual_seed(0)
    return {
        "a": {"w": torch.randn(3, 2, generator=g)},
        "b": {"w": Weight(torch.randn(1, 3, generator=g).double()).with_stage(Cast(torch.float32))},
        "unused": torch.ones(2),
        "step": torch.tensor(3),
    }


def test_gradients_match_torch_autograd_and_keep_structure():
    params, x = make_params(), torch.randn(4, 2)
    value, grads = dsf.value_and_grad(loss, where=r"^(a|b)/")(params, x)
    wa = params["a"]["w"].clone().requires_grad_()
    wb = params["b"]["w"].data.clone().requires_grad_()
    ref = (torch.tanh(x @ wa.T) @ wb.float().T).square().sum()
    ref.backward()
    assert torch.allclose(value, ref.detach())
    assert torch.allclose(grads["a"]["w"], wa.grad)
    assert isinstance(grads["b"]["w"], Weight) and grads["b"]["w"].data.dtype == torch.float64
    assert torch.allclose(grads["b"]["w"].data, wb.grad)
    assert grads["unused"] is None and grads["step"] is None


def test_selected_but_unused_leaf_gets_zeros():
    _, grads = dsf.value_and_grad(loss, where="unused")(make_params(), torch.randn(1, 2))
    assert torch.equal(grads["unused"], torch.zeros(2))


def test_grad_with_aux():
    grads, aux = dsf.grad(lambda p: ((p["a"]["w"] ** 2).sum(), "hello"), where="a", has_aux=True)(make_params())
    assert aux == "hello" and torch.allclose(grads["a"]["w"], 2 * make_params()["a"]["w"])


def test_params_are_not_modified():
    params = make_params()
    dsf.grad(loss, where="a")(params, torch.randn(1, 2))
    assert not params["a"]["w"].requires_grad and params["a"]["w"].grad is None


def test_only_selected_leaves_get_gradients_and_no_tensor_keeps_a_grad():
    params = make_params()
    params["a"]["w"].requires_grad_(True)  # requires grad but not selected
    outside = torch.ones(2, requires_grad=True)  # captured by the loss
    grads = dsf.grad(lambda p, x: loss(p, x * outside), where="^b/")(params, torch.randn(1, 2))
    assert grads["a"]["w"] is None and params["a"]["w"].grad is None and outside.grad is None
    assert grads["b"]["w"].data.grad is None and grads["b"]["w"].data.abs().sum() > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="selects no tensor"):
        dsf.grad(loss, where="nothing")(make_params(), torch.randn(1, 2))
    with pytest.raises(ValueError, match="cannot differentiate 'step'"):
        dsf.grad(loss, where="step")(make_params(), torch.randn(1, 2))
    with pytest.raises(ValueError, match="scalar"):
        dsf.grad(lambda p: p["a"]["w"], where="a")(make_params())
