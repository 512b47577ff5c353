"""shard(): FSDP-style sharding on 2 gloo ranks against one process, on the tiny FLUX.1.

A sharded training step equals the unsharded one; sharded sampling, loss and LoRA gradients under
lora, fp8, offload and checkpoint equal the unsharded stack bit for bit, in either chain order;
each block gathers the next ahead; a sharded run resumes with the same losses and refuses another
number of ranks. The ranks run in spawned processes (tests/distributed_worker.py).
"""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import distributed_worker as worker
import dsf
from dsf.training.checkpoint import restore_state
from dsf.transforms import checkpoint
from dsf.transforms.shard import Gather, shard, unshard
from dsf.weight import Weight
from updates import assert_same_updates

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")


def unsharded_training(**settings):
    """The reference: the same run in one process, where shard() has nothing to shard over."""
    stack = dsf.chain(shard(), checkpoint())
    params = stack.init(worker.base_params(), worker.K[4])
    trained = worker.train(stack(worker.flux_loss), params, worker.flux_data, worker.train_config(**settings),
                           key=worker.TRAIN_KEY)
    return dsf.tree.select(trained, None)


def test_one_process_has_nothing_to_shard():
    params = {"blocks": [{"w": torch.eye(2)} for _ in range(2)]}

    def f(params, x):
        return dsf.run_blocks(lambda block, h: h @ block["w"] + 1, params["blocks"], x)

    t = shard()
    assert t.init(params) is params
    assert torch.equal(t(f)(params, torch.ones(1, 2)), f(params, torch.ones(1, 2)))
    gathered = unshard({"w": Weight(torch.ones(3)).with_stage(Gather())})
    assert isinstance(gathered["w"], torch.Tensor)


def test_sharded_training_step_equals_the_unsharded_step(tmp_path):
    ranks = worker.launch("sharded_training", tmp_path)
    single = unsharded_training(gradient_accumulation_steps=2)
    initial = dsf.tree.select(worker.base_params(), None)
    assert max((single[path] - initial[path]).abs().max() for path in single) > 1e-3
    for rank in ranks:
        assert rank["kinds"] == ["DTensor"]
        assert rank["local_bytes"] == rank["full_bytes"] // 2
        assert sorted(rank["params"]) == sorted(single)
        assert_same_updates(rank["params"], single, initial)  # averaged by reduce-scatter, not by accumulation
    saved = load_file(tmp_path / "run" / "step-3.safetensors")
    assert all(torch.equal(saved[path.replace("/", ".") + ".data"], ranks[0]["params"][path]) for path in single)


@pytest.fixture(scope="module")
def composition(tmp_path_factory):
    return worker.launch("sharded_composition", tmp_path_factory.mktemp("composition"))


@pytest.mark.parametrize("order", ["sharded", "sharded, reversed"])
def test_sharded_sampling_equals_unsharded_sampling(composition, order):
    for rank in composition:
        assert torch.equal(rank[order]["samples"], rank["plain"]["samples"])
    assert not torch.equal(composition[0]["plain"]["samples"], composition[1]["plain"]["samples"])


@pytest.mark.parametrize("order", ["sharded", "sharded, reversed"])
def test_sharded_lora_over_fp8_offload_checkpoint_gives_the_same_loss_and_gradients(composition, order):
    for rank in composition:
        assert torch.equal(rank[order]["loss"], rank["plain"]["loss"])
        grads, plain = rank[order]["grads"], rank["plain"]["grads"]
        assert sorted(grads) == sorted(plain) and len(grads) > 0
        assert all(torch.equal(grads[path], plain[path]) for path in plain)
        assert max(g.abs().max() for g in plain.values()) > 0


def test_each_block_gathers_the_next_ahead_and_again_in_backward(composition):
    gathers = composition[0]["gathers"]
    sharded = gathers["sharded paths"]
    in_blocks = [path for path in sharded if path.startswith(("transformer_blocks/", "single_transformer_blocks/"))]
    assert len(in_blocks) > 0 and len(sharded) > len(in_blocks)
    # forward: block 1 of each list while block 0 runs; backward recomputes in reverse: block 0 while block 1 does
    assert gathers["training"].blocks == [1, 1, 0, 0]
    assert gathers["training"].tensors == len(sharded) + len(in_blocks)
    assert gathers["sampling"].blocks == [1, 1] * 3
    assert gathers["sampling"].tensors == 3 * len(sharded)


def test_a_resumed_sharded_run_continues_with_the_same_losses(tmp_path):
    runs = worker.launch("sharded_resume", tmp_path)[0]
    assert [step for step, _ in runs["resumed"]["losses"]] == [3, 4]
    assert runs["resumed"]["losses"] == runs["whole"]["losses"][2:]
    assert runs["first half"]["losses"] == runs["whole"]["losses"][:2]
    assert all(torch.equal(runs["resumed"]["params"][p], runs["whole"]["params"][p]) for p in runs["whole"]["params"])

    shards = [restore_state(tmp_path / "halves" / "checkpoints" / f"rank-{r}-of-2", 4) for r in range(2)]
    path = "transformer_blocks/0/attn/to_q/weight/data"
    assert [s["optimizer"]["exp_avg"][path].shape[0] for s in shards] == [16, 16]
    assert torch.equal(torch.cat([s["trainable"][path] for s in shards]), runs["whole"]["params"][path.removesuffix("/data")])

    with pytest.raises(ValueError, match="sharded checkpoints of a run on 2 ranks, but this run on 1"):
        unsharded_training(output_path=str(tmp_path / "halves"), checkpoint_steps=2, max_steps=6, resume=True)
