"""look_ahead: the neighbor rule, and the opt-in preparation of each block list's first block."""

import torch

import dsf
from dsf.lookahead import look_ahead


class Recorded:
    """A preparer that prepares nothing and logs what the look-ahead asks of it."""

    def __init__(self, log):
        self.log, self.ahead = log, set()

    def start(self, blocks, index):
        self.ahead.add((id(blocks), index))
        self.log.append(("start", blocks[index]["name"]))

    def take(self, blocks, index, block):
        ready = (id(blocks), index) in self.ahead
        self.ahead.discard((id(blocks), index))
        self.log.append(("ready" if ready else "in line", blocks[index]["name"]))
        return block

    def drop(self, blocks, index):
        self.ahead.discard((id(blocks), index))
        self.log.append(("drop", blocks[index]["name"]))


def recorded(across_lists):
    log = []
    hook, wrap = look_ahead("recorded", rank=10, make=lambda: Recorded(log), across_lists=across_lists)
    return dsf.Transform("recorded", hooks=(hook,), wraps=(wrap,)), log


def lists(**lengths):
    return {name: [{"name": f"{name}{i}", "w": torch.ones(())} for i in range(n)] for name, n in lengths.items()}


def run_lists(params, names):
    """Runs the named block lists in order (each a step of a sampler, say)."""
    h = torch.zeros(())
    for name in names:
        h = dsf.run_blocks(lambda block, h: h + block["w"] ** 2, params[name], h)
    return h


def test_without_opting_in_each_call_prepares_only_the_next_block_of_the_same_list():
    t, log = recorded(across_lists=False)
    f, params = t(run_lists), lists(a=2, b=2)
    for _ in range(2):
        assert f(params, "ab") == 4
    one_call = [("in line", "a0"), ("start", "a1"), ("ready", "a1"), ("in line", "b0"), ("start", "b1"), ("ready", "b1")]
    assert log == one_call + one_call  # the shard look-ahead's order of gathers, the same on every call


def test_opting_in_prepares_each_lists_first_block_from_the_second_call_on():
    t, log = recorded(across_lists=True)
    f = t(run_lists)
    assert f(lists(a=2, b=2), "ab") == 4
    assert log == [("in line", "a0"), ("start", "a1"), ("ready", "a1"), ("in line", "b0"), ("start", "b1"), ("ready", "b1")]
    log.clear()
    assert f(lists(a=2, b=2), "ab") == 4  # a new tree (as training builds each step): lists found by path
    assert log == [("start", "a0"), ("ready", "a0"), ("start", "a1"), ("ready", "a1"), ("start", "b0"),
                   ("ready", "b0"), ("start", "b1"), ("ready", "b1")]


def test_a_call_learns_the_order_of_its_lists_as_it_runs_them():
    t, log = recorded(across_lists=True)
    assert t(run_lists)(lists(a=2, b=1), "ababab") == 9  # three steps of a sampler in one call
    steps = [log[i : i + 5] for i in range(0, 15, 5)]
    assert steps[0] == [("in line", "a0"), ("start", "a1"), ("ready", "a1"), ("in line", "b0"), ("in line", "a0")]
    assert steps[1] == [("start", "a1"), ("ready", "a1"), ("start", "b0"), ("ready", "b0"), ("start", "a0")]
    assert steps[2] == [("ready", "a0"), ("start", "a1"), ("ready", "a1"), ("start", "b0"), ("ready", "b0")]
    assert log[15:] == [("start", "a0")]  # after the last step nothing comes: dropped with the call's preparer


def test_a_list_predicts_the_list_that_first_followed_it_as_a_sampler_loop_does():
    t, log = recorded(across_lists=True)
    f, params = t(run_lists), lists(a=1, b=1, c=1)
    f(params, "ababc")  # two sampler steps, then a decoder: b is followed by a, and once by c
    log.clear()
    assert f(params, "ababc") == 5
    step = [("ready", "a0"), ("start", "b0"), ("ready", "b0"), ("start", "a0")]
    assert log == [("start", "a0")] + step + step + [("in line", "c0"), ("drop", "a0")]


def test_a_block_prepared_for_another_list_is_dropped_when_a_different_block_runs():
    t, log = recorded(across_lists=True)
    f, params = t(run_lists), lists(a=2, b=2)
    f(params, "ab")
    log.clear()
    assert f(params, "b") == 2
    assert log == [("start", "a0"), ("in line", "b0"), ("drop", "a0"), ("start", "b1"), ("ready", "b1")]


def test_paths_the_params_do_not_hold_start_nothing():
    t, log = recorded(across_lists=True)
    f = t(run_lists)
    f(lists(a=2, b=2), "ab")
    log.clear()
    assert f(lists(c=2), "c") == 2
    assert log == [("in line", "c0"), ("start", "c1"), ("ready", "c1")]


def test_checkpointed_backward_prepares_only_the_previous_block_of_the_same_list():
    from dsf.transforms import checkpoint

    t, log = recorded(across_lists=True)
    g = dsf.grad(dsf.chain(checkpoint(), t)(lambda p, names: run_lists(p, names) ** 2), where="w")
    for _ in range(2):
        log.clear()
        grads = g(lists(a=2, b=2), "ab")
    assert [float(block["w"]) for name in "ab" for block in grads[name]] == [16.0] * 4
    forward, backward = log[:8], log[8:]
    assert forward[:2] == [("start", "a0"), ("ready", "a0")] and ("start", "b0") in forward
    assert backward == [("in line", "b1"), ("start", "b0"), ("ready", "b0"), ("in line", "a1"), ("start", "a0"), ("ready", "a0")]
