"""nanochat/autobatch.py: the optimizer state one rank holds (checked against a real step, alone
and as rank 3 of 8 under torch's fake process group), the estimate of a step's memory at the
speedrun's d24 shape (a batch that fits and one that does not), and which batches get measured."""
import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from nanochat.autobatch import (ACT_BYTES, HEADROOM, estimated_batch, estimated_bytes, fixed_bytes, optimizer_state_bytes,
                                probe_order)
from nanochat.gpt import GPT, GPTConfig

CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
H100_BYTES = 81559 * 2**20  # an H100 80GB HBM3 as torch reports it


def d24():
    with torch.device("meta"):
        return GPT(GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=24, n_head=12, n_kv_head=12, n_embd=1536))


def held_state(model, world):
    """Bytes of state a real optimizer step leaves on this rank (rank 3, or the last, of `world`)."""
    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=min(3, world - 1), world_size=world)
    try:
        opt = model.setup_optimizer(compile=False)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 8])
def test_optimizer_state_bytes_is_what_a_step_allocates(world):
    cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=3, n_head=2, n_kv_head=1, n_embd=128)
    model = GPT(cfg)
    model.init_weights()
    assert optimizer_state_bytes(model, world) == held_state(model, world)


def test_d24_state_is_sharded_eight_ways_and_auto_batch_is_upstreams_16():
    model = d24()
    one, eight = optimizer_state_bytes(model, 1), optimizer_state_bytes(model, 8)
    assert eight == held_state(model, 8)  # meta tensors: the shapes of a real step
    assert 7.5 < one / eight <= 8  # nearly all of it is split (the small tensors are not)
    # 8 ranks: 16 fits in 90% of an H100 and 32 does not (upstream's speedrun passes 16)
    assert estimated_batch(model, 2048, H100_BYTES, CANDIDATES, world_size=8) == 16
    assert estimated_bytes(model, 16, 2048, 8) <= HEADROOM * H100_BYTES < estimated_bytes(model, 32, 2048, 8)
    # one GPU holds the whole state: the estimate is 8, and the measurement tries 16 first
    assert estimated_batch(model, 2048, H100_BYTES, CANDIDATES, world_size=1) == 8
    assert probe_order(CANDIDATES, 8) == [16, 8, 4, 2, 1]
    assert fixed_bytes(model, 1) - fixed_bytes(model, 8) == one - eight


def test_estimate_grows_with_the_batch_and_nothing_fits_a_tiny_gpu():
    model = d24()
    per_seq = 2048 * 24 * 1536 * ACT_BYTES
    assert estimated_bytes(model, 3, 2048) - estimated_bytes(model, 2, 2048) == per_seq
    assert estimated_batch(model, 2048, 8 * 2**30, CANDIDATES) is None  # the parameters alone need more
    assert probe_order(CANDIDATES, None) == list(CANDIDATES)
    assert probe_order(CANDIDATES, 256) == list(CANDIDATES)
