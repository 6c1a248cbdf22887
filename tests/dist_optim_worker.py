"""A small problem trained with MuonAdamW, for tests/test_optim.py.

Run by torchrun (gloo, CPU): each rank trains on its own contiguous slice of the batch, and the
optimizer averages the gradients itself. Called in-process with no torchrun it is the 1-process
reference on the full batch. Writes to --out:
  history_rank<r>.pt   the parameters after every step run here ({step: {name: tensor}})
  params_step<k>.pt    the parameters after step --save-at (rank 0)
  optim_step<k>_rank<r>.pt   each rank's optimizer state_dict after step --save-at
With --resume-from DIR --resume-step K it loads those from DIR and continues from step K + 1.
"""
import argparse
import os

import torch
import torch.distributed as dist

from nanochat.optim import MuonAdamW

BATCH = 16


def make_problem():
    """Parameters and a full batch, identical on every rank (fixed generator)."""
    g = torch.Generator().manual_seed(1234)
    shapes = {
        "w_in": (32, 24),                                  # muon, tall, alone in its group (padded)
        "w_h0": (32, 32), "w_h1": (32, 32), "w_h2": (32, 32),  # muon, 3 matrices (padded to 4)
        "w_o0": (5, 32), "w_o1": (5, 32),                  # muon, wide, 2 matrices
        "emb": (32, 300),                                  # adamw, split along dim 0 on 2 ranks
        "side": (5, 300),                                  # adamw, large but 5 rows: replicated
        "bias": (32,),                                     # adamw, small: replicated
        "scal": (3,),                                      # adamw, small: replicated
    }
    params = {k: (torch.randn(s, generator=g) / s[-1] ** 0.5).requires_grad_() for k, s in shapes.items()}
    x = torch.randn(BATCH, 24, generator=g)
    x2 = torch.randn(BATCH, 300, generator=g)
    y = torch.randn(BATCH, 5, generator=g)
    return params, (x, x2, y)


def loss_fn(P, x, x2, y):
    h = x @ P["w_in"].T + x2 @ P["emb"].T + P["bias"]
    for k in ("w_h0", "w_h1", "w_h2"):
        h = h + P["scal"][0] * torch.tanh(h @ P[k].T)
    out = h @ P["w_o0"].T + P["scal"][1] * torch.tanh(h @ P["w_o1"].T) + P["scal"][2] * (x2 @ P["side"].T)
    return ((out - y) ** 2).mean()


def make_optimizer(P):
    return MuonAdamW([
        dict(kind="adamw", params=[P["emb"], P["side"], P["bias"], P["scal"]], lr=0.01, weight_decay=0.05),
        dict(kind="muon", params=[P["w_in"]], lr=0.02, weight_decay=0.1),
        dict(kind="muon", params=[P["w_h0"], P["w_h1"], P["w_h2"]], lr=0.02, weight_decay=0.1),
        dict(kind="muon", params=[P["w_o0"], P["w_o1"]], lr=0.02, weight_decay=0.1),
    ])


def schedule(opt, step, total):
    """Change lr and momentum every step, as the training loop does."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * (1.0 - 0.5 * step / total)
        if group["kind"] == "muon":
            group["momentum"] = 0.85 + 0.1 * min(1.0, step / 3)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=-1)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--resume-step", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    P, (x, x2, y) = make_problem()
    n = BATCH // world  # this rank's slice of the batch
    x, x2, y = x[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    opt = make_optimizer(P)
    start = 0
    if args.resume_from:
        start = args.resume_step
        saved = torch.load(os.path.join(args.resume_from, f"params_step{start}.pt"))
        with torch.no_grad():
            for k, p in P.items():
                p.copy_(saved[k])
        opt.load_state_dict(torch.load(os.path.join(args.resume_from, f"optim_step{start}_rank{rank}.pt")))

    history = {}
    for step in range(start + 1, args.steps + 1):
        schedule(opt, step, args.steps)
        loss = loss_fn(P, x, x2, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history[step] = {k: p.detach().clone() for k, p in P.items()}
        if step == args.save_at:
            torch.save(opt.state_dict(), os.path.join(args.out, f"optim_step{step}_rank{rank}.pt"))
            if rank == 0:
                torch.save(history[step], os.path.join(args.out, f"params_step{step}.pt"))
    torch.save(history, os.path.join(args.out, f"history_rank{rank}.pt"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
