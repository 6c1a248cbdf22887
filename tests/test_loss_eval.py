"""Bits per byte against a hand computation, with special tokens and ignored targets in the mix;
and the cross-rank sum under a real 2-process torchrun."""
import math
import os
import subprocess
import sys
import textwrap

import torch

from helpers import BigramStub
from nanochat.loss_eval import evaluate_bpb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_batches(tokenizer, n, B=2, T=16, seed=0):
    """Batches of real text tokens, with some targets set to <|bos|> (0 bytes) and some to -1."""
    from nanochat.dataset import iter_texts
    bos = tokenizer.get_bos_token_id()
    texts = iter_texts("val")
    ids = []
    while len(ids) < n * B * (T + 1):
        ids += tokenizer.encode(next(texts), prepend=bos)
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        chunk = torch.tensor(ids[k * B * (T + 1):(k + 1) * B * (T + 1)]).view(B, T + 1)
        x, y = chunk[:, :-1].clone(), chunk[:, 1:].clone()
        y[torch.rand(B, T, generator=g) < 0.2] = -1
        y[torch.rand(B, T, generator=g) < 0.1] = bos
        out.append((x, y))
    return out


def hand_bpb(model, batches, token_bytes):
    nats, nbytes = 0.0, 0
    table = model.table.detach().double()
    for x, y in batches:
        for b in range(x.size(0)):
            for t in range(x.size(1)):
                target = int(y[b, t])
                if target < 0 or int(token_bytes[target]) == 0:
                    continue
                row = table[int(x[b, t])]
                nats += -(row[target] - torch.logsumexp(row, 0)).item()
                nbytes += int(token_bytes[target])
    return nats / (math.log(2) * nbytes)


def test_bpb_matches_hand_computation(tokenizer):
    from nanochat.tokenizer import get_token_bytes
    token_bytes = get_token_bytes("cpu")
    bos = tokenizer.get_bos_token_id()
    assert int(token_bytes[bos]) == 0
    model = BigramStub(tokenizer.get_vocab_size())
    batches = make_batches(tokenizer, 3)
    # the fixture really has both kinds of skipped targets
    assert any((y == -1).any() for _, y in batches) and any((y == bos).any() for _, y in batches)
    got = evaluate_bpb(model, batches, steps=3, token_bytes=token_bytes)
    want = hand_bpb(model, batches, token_bytes)
    assert abs(got - want) < 1e-5 * want
    # steps limits how many batches are read; an exhausted iterator just stops
    assert abs(evaluate_bpb(model, batches, 1, token_bytes) - hand_bpb(model, batches[:1], token_bytes)) < 1e-4
    assert abs(evaluate_bpb(model, iter(batches), 10, token_bytes) - want) < 1e-5 * want


def test_bpb_nothing_to_score_is_inf(tokenizer):
    from nanochat.tokenizer import get_token_bytes
    token_bytes = get_token_bytes("cpu")
    model = BigramStub(tokenizer.get_vocab_size())
    x = torch.zeros(1, 4, dtype=torch.long)
    y = torch.tensor([[-1, tokenizer.get_bos_token_id(), -1, -1]])
    assert evaluate_bpb(model, [(x, y)], 1, token_bytes) == float("inf")


def test_bpb_distributed_sums_over_ranks(tokenizer, tmp_path):
    """Each of 2 ranks scores different batches; both must return the bpb of all batches."""
    from nanochat.tokenizer import get_token_bytes
    token_bytes = get_token_bytes("cpu")
    model = BigramStub(tokenizer.get_vocab_size())
    batches = make_batches(tokenizer, 4)
    torch.save({"batches": batches, "state": model.state_dict(), "vocab": tokenizer.get_vocab_size()},
               tmp_path / "in.pt")
    want = hand_bpb(model, batches, token_bytes)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch, torch.distributed as dist
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from helpers import BigramStub
        from nanochat.loss_eval import evaluate_bpb
        from nanochat.tokenizer import get_token_bytes
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        d = torch.load({str(tmp_path / 'in.pt')!r}, weights_only=False)
        model = BigramStub(d["vocab"]); model.load_state_dict(d["state"])
        mine = d["batches"][rank::2]
        bpb = evaluate_bpb(model, mine, 2, get_token_bytes("cpu"))
        with open({str(tmp_path)!r} + f"/out{{rank}}.txt", "w") as f:
            f.write(repr(bpb))
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        got = float((tmp_path / f"out{rank}.txt").read_text())
        assert abs(got - want) < 1e-5 * want
