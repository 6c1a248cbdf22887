"""MuonAdamW: Polar Express, AdamW equivalence, NorMuon, cautious weight decay, exact resume,
and a real 2-process torchrun (gloo, CPU) against the 1-process run."""
import io
import os
import subprocess
import sys

import dist_optim_worker as worker
import pytest
import torch

from nanochat.optim import POLAR_EXPRESS_COEFFS, MuonAdamW, equilibrate_rows, polar_express, renormalize

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_optim_worker.py")


# ---------------------------------------------------------------------------------------------
# Polar Express

@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 48, 160), (3, 96, 40)])
def test_polar_express_rectangular_singular_values_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = polar_express(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    # measured: all singular values in [0.85, 1.15] for these shapes
    assert s.min() > 0.8 and s.max() < 1.2, (s.min(), s.max())
    # orthogonal-ish: X X^T ~ I on the small side (wide: rows orthonormal; tall: columns)
    gram = X @ X.mT if G.size(-2) <= G.size(-1) else X.mT @ X
    eye = torch.eye(gram.size(-1)).expand_as(gram)
    assert (gram - eye).abs().max() < 0.25
    # and it is the polar factor U V^T of G, not just any orthogonal matrix
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.98).all(), cos
    # batched equals one matrix at a time
    if G.dim() == 3:
        torch.testing.assert_close(X[1], polar_express(G[1]), atol=1e-5, rtol=1e-5)


def test_polar_express_square():
    torch.manual_seed(0)
    G = torch.randn(128, 128)
    s = torch.linalg.svdvals(polar_express(G))
    # a random square matrix has a few singular values ~1e-4 of its norm, below the range five
    # iterations are designed for (1e-3): those stay small. Everything else lands in [0.7, 1.2].
    assert s.max() < 1.2
    assert ((s > 0.7) & (s < 1.2)).float().mean() >= 0.95
    # zero in, zero out (padding matrices in the distributed stack rely on it)
    assert torch.equal(polar_express(torch.zeros(3, 8, 16)), torch.zeros(3, 8, 16))


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_polar_express_normalizes_by_frobenius_times_1_01(shape):
    """One iteration by hand: X = G / (1.01 ||G||_F + 1e-6), then a X + (b A + c A^2) X with
    A = X X^T on the wide orientation (a tall G is transposed, iterated, transposed back)."""
    torch.manual_seed(0)
    G = torch.randn(shape, dtype=torch.float64).float()
    W = G.double() if shape[0] <= shape[1] else G.double().T
    X = W / (torch.linalg.matrix_norm(W) * 1.01 + 1e-6)
    a, b, c = POLAR_EXPRESS_COEFFS[0]
    A = X @ X.T
    ref = a * X + (b * A + c * A @ A) @ X
    ref = ref if shape[0] <= shape[1] else ref.T
    torch.testing.assert_close(polar_express(G, steps=1).double(), ref, atol=1e-5, rtol=0)


def test_polar_express_rejects_bad_steps():
    with pytest.raises(ValueError):
        polar_express(torch.randn(4, 4), steps=6)


# ---------------------------------------------------------------------------------------------
# AdamW groups

def _regression(seed=1):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(64, 16, generator=g), torch.randn(64, 8, generator=g)
    W = torch.randn(16, 8, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    return X, Y, W, b


def _eager_muonadamw(ps):
    opt = MuonAdamW([dict(kind="adamw", params=ps, lr=0.01, weight_decay=0.1)])
    opt._fused_cpu = False  # the update function (the one CUDA compiles) instead of the CPU kernel
    return opt


def test_adamw_group_matches_torch_adamw():
    """Both AdamW paths of MuonAdamW (torch's fused kernel, used on the CPU, and our update
    function, compiled on CUDA) follow torch.optim.AdamW through an lr schedule."""
    assert MuonAdamW([dict(kind="adamw", params=[torch.zeros(2, requires_grad=True)], lr=0.1)])._fused_cpu
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
                 lambda ps: MuonAdamW([dict(kind="adamw", params=ps, lr=0.01, weight_decay=0.1)]),
                 _eager_muonadamw):
        X, Y, W, b = _regression()
        opt = make([W, b])
        for step in range(25):
            for group in opt.param_groups:  # a schedule, as in training
                group["lr"] = 0.01 * (1 - step / 50)
            loss = ((torch.tanh(X @ W) + b - Y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append((W.detach(), b.detach()))
    (W1, b1), *ours = results
    assert not torch.equal(W1, _regression()[2])  # it did move
    for W2, b2 in ours:
        torch.testing.assert_close(W2, W1, atol=1e-6, rtol=0)
        torch.testing.assert_close(b2, b1, atol=1e-6, rtol=0)


def test_groups_get_initial_lr_and_defaults():
    p, q = torch.zeros(4, 4, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.02), dict(kind="adamw", params=[q], lr=0.1, initial_lr=0.3)])
    muon, adamw = opt.param_groups
    assert muon["initial_lr"] == 0.02 and muon["momentum"] == 0.95 and muon["ns_steps"] == 5 and muon["beta2"] == 0.9
    assert muon["row_eq"] is False and muon["renorm"] is False
    assert adamw["initial_lr"] == 0.3 and adamw["betas"] == (0.8, 0.95) and adamw["eps"] == 1e-10


@pytest.mark.parametrize("groups", [
    [dict(params=[torch.zeros(2, 2)], lr=0.1)],                                   # no kind
    [dict(kind="sgd", params=[torch.zeros(2, 2)], lr=0.1)],                       # unknown kind
    [dict(kind="muon", params=[torch.zeros(2, 2), torch.zeros(2, 3)], lr=0.1)],   # mixed shapes
    [dict(kind="muon", params=[torch.zeros(4)], lr=0.1)],                         # not a matrix
    [dict(kind="muon", params=[torch.zeros(2, 2)], lr=0.1, ns_steps=9)],          # no such schedule
    [dict(kind="adamw", params=[torch.zeros(2)])],                                # no lr
])
def test_bad_groups_are_rejected(groups):
    with pytest.raises(ValueError):
        MuonAdamW(groups)


# ---------------------------------------------------------------------------------------------
# Muon

def _muon_step(p0, grad, **group):
    p = p0.clone().requires_grad_()
    opt = MuonAdamW([dict(kind="muon", params=[p], **group)])
    p.grad = grad.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_muon_first_step_normuon_and_tall_scaling(shape):
    """From fresh state, NorMuon divides each larger-side neuron by its own RMS, so all rows
    (tall) or columns (wide) of the step get the same norm; the step keeps the orthogonalized
    update's norm (~sqrt(min dim)) times lr * max(1, rows/cols) ** 0.5."""
    torch.manual_seed(0)
    rows, cols = shape
    p0 = torch.randn(shape) * 0.02
    grad = torch.randn(shape) * torch.linspace(0.1, 3.0, rows)[:, None]  # very unequal rows
    lr = 0.01
    delta = (p0 - _muon_step(p0, grad, lr=lr, momentum=0.0)) / (lr * max(1.0, rows / cols) ** 0.5)
    neuron_norms = delta.norm(dim=1) if rows >= cols else delta.norm(dim=0)
    assert neuron_norms.std() / neuron_norms.mean() < 1e-3
    assert 0.8 < delta.norm() / min(rows, cols) ** 0.5 < 1.2


def test_cautious_weight_decay_only_same_sign():
    torch.manual_seed(0)
    shape = (48, 24)  # tall: the decay uses the scaled rate too
    p0, grad = torch.randn(shape), torch.randn(shape)
    lr, wd = 0.05, 0.5
    lr_eff = lr * (48 / 24) ** 0.5
    plain = _muon_step(p0, grad, lr=lr, weight_decay=0.0)
    decayed = _muon_step(p0, grad, lr=lr, weight_decay=wd)
    update = p0 - plain  # lr_eff * the normalized update
    same = (update * p0) > 0
    assert 0.2 < same.float().mean() < 0.8  # both kinds of coordinates are present
    assert torch.equal(decayed[~same], plain[~same])  # opposite sign: untouched by the decay
    torch.testing.assert_close(decayed[same], plain[same] - lr_eff * wd * p0[same], atol=1e-6, rtol=0)


def test_cautious_weight_decay_decays_where_the_update_is_zero():
    """mask = update * p >= 0: a matrix whose gradient (and momentum) is zero gets a zero update,
    which does not oppose the decay, so it is decayed by lr * wd (with > 0 it would not move)."""
    p0 = torch.randn(8, 16)
    lr, wd = 0.1, 0.5
    out = _muon_step(p0, torch.zeros(8, 16), lr=lr, weight_decay=wd)
    torch.testing.assert_close(out, p0 - lr * wd * p0, atol=1e-6, rtol=0)
    assert (out - p0).abs().max() > 0.01


def test_equilibrate_rows_and_renormalize_match_their_definitions():
    torch.manual_seed(0)
    X = torch.randn(2, 5, 7) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0])[:, None]
    X[1, 2] = 0.0  # a zero row stays zero
    eq = equilibrate_rows(X)
    for k in range(2):
        target = (X[k] ** 2).sum().sqrt() / 5 ** 0.5  # the root-mean-square row norm
        for r in range(5):
            norm = (X[k, r] ** 2).sum().sqrt()
            expected = X[k, r] * target / norm if norm > 0 else torch.zeros(7)
            torch.testing.assert_close(eq[k, r], expected, atol=1e-6, rtol=1e-6)
    rn = renormalize(X)
    for k in range(2):
        torch.testing.assert_close(rn[k], X[k] * 5 ** 0.5 / (X[k] ** 2).sum().sqrt(), atol=1e-6, rtol=1e-6)
    assert torch.equal(renormalize(torch.zeros(3, 4)), torch.zeros(3, 4))


def _reference_muon(p, grads, lr, momentum, wd, beta2, row_eq, renorm):
    """Muon written out for one matrix in float64, step by step, with the same Polar Express."""
    p = p.double().clone()
    rows, cols = p.shape
    mom = torch.zeros_like(p)
    var = None
    for g in grads:
        g = g.double()
        mom = momentum * mom + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * mom                     # Nesterov look-ahead
        if row_eq:
            rms_row = u.norm() / rows ** 0.5
            u = torch.stack([row * rms_row / row.norm() for row in u])
        O = polar_express(u.float()).double()
        if renorm:
            O = O * min(rows, cols) ** 0.5 / O.norm()
        per_neuron = (O ** 2).mean(dim=1, keepdim=True) if rows >= cols else (O ** 2).mean(dim=0, keepdim=True)
        var = (1 - beta2) * per_neuron if var is None else beta2 * var + (1 - beta2) * per_neuron
        N = O / (var.sqrt() + 1e-10)
        N = N * O.norm() / N.norm()
        lr_eff = lr * max(1.0, rows / cols) ** 0.5
        decay = torch.where(N * p >= 0, wd * p, torch.zeros_like(p))
        p = p - lr_eff * (N + decay)
    return p


@pytest.mark.parametrize("row_eq,renorm", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_three_steps_match_a_reference(shape, row_eq, renorm):
    """The whole Muon step (momentum, MuonEq, Polar Express, Muon+, NorMuon, cautious decay, tall
    rate) against the straightforward float64 computation above, over 3 steps of state."""
    torch.manual_seed(1)
    p0 = torch.randn(shape) * 0.1
    grads = [torch.randn(shape) * torch.linspace(0.2, 2.0, shape[0])[:, None] for _ in range(3)]
    hp = dict(lr=0.03, momentum=0.9, weight_decay=0.2, beta2=0.9)
    p = p0.clone().requires_grad_()
    opt = MuonAdamW([dict(kind="muon", params=[p], row_eq=row_eq, renorm=renorm, **hp)])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = _reference_muon(p0, grads, hp["lr"], hp["momentum"], hp["weight_decay"], hp["beta2"], row_eq, renorm)
    torch.testing.assert_close(p.detach().double(), ref, atol=2e-5, rtol=0)
    if row_eq or renorm:  # the option changed the result
        plain = _reference_muon(p0, grads, hp["lr"], hp["momentum"], hp["weight_decay"], hp["beta2"], False, False)
        assert (plain - ref).abs().max() > 1e-4


def test_muon_reduces_regression_loss():
    torch.manual_seed(0)
    X = torch.randn(256, 32)
    A = torch.randn(32, 64) / 32 ** 0.5
    Y = X @ A + 0.3
    W = torch.zeros(64, 32, requires_grad=True)  # tall: y = x @ W^T
    b = torch.zeros(64, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[W], lr=0.05), dict(kind="adamw", params=[b], lr=0.02)])
    losses = []
    for step in range(60):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / 60)
        loss = ((X @ W.T + b - Y) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_a_step_leaves_no_reference_cycle():
    """Training turns the garbage collector off after its first step (common.gc_step), so
    anything a step leaves in a reference cycle lives until the next full collection (every
    5,000 steps): gradients held that way grew a CPU run's memory by ~35 MB a step (d4). With
    the collector off, each step's gradients must be freed as soon as nothing refers to them."""
    import gc
    import weakref
    torch.manual_seed(0)
    W, E = torch.randn(64, 32, requires_grad=True), torch.randn(100, 32, requires_grad=True)
    opt = MuonAdamW([dict(kind="muon", params=[W], lr=0.05), dict(kind="adamw", params=[E], lr=0.02)])
    grads = []
    gc.disable()
    try:
        for _ in range(3):
            loss = (E[:10] @ W.T).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            grads += [weakref.ref(W.grad), weakref.ref(E.grad)]
        opt.zero_grad(set_to_none=True)
        alive = [tuple(r().shape) for r in grads if r() is not None]
    finally:
        gc.enable()
    assert alive == [], alive


# ---------------------------------------------------------------------------------------------
# Exact resume (1 process)

def _run_steps(P, opt, x, x2, y, steps, total=8):
    for step in steps:
        worker.schedule(opt, step, total)
        loss = worker.loss_fn(P, x, x2, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_resume_is_bitwise():
    P, data = worker.make_problem()
    opt = worker.make_optimizer(P)
    _run_steps(P, opt, *data, range(1, 4))
    buf = io.BytesIO()
    torch.save({"optim": opt.state_dict(), "params": {k: p.detach().clone() for k, p in P.items()}}, buf)
    _run_steps(P, opt, *data, range(4, 9))
    reference = {k: p.detach().clone() for k, p in P.items()}

    buf.seek(0)
    saved = torch.load(buf)
    P2, data2 = worker.make_problem()
    with torch.no_grad():
        for k, p in P2.items():
            p.copy_(saved["params"][k])
    opt2 = worker.make_optimizer(P2)
    opt2.load_state_dict(saved["optim"])
    _run_steps(P2, opt2, *data2, range(4, 9))
    for k in reference:
        assert torch.equal(P2[k].detach(), reference[k]), k


# ---------------------------------------------------------------------------------------------
# Distributed: a real 2-process torchrun on CPU (gloo)

def _torchrun(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           WORKER, "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    _torchrun(out, "--steps", "6", "--save-at", "3")
    return out


def test_two_processes_match_one_process(two_process_run, tmp_path):
    one = worker.main(["--out", str(tmp_path), "--steps", "6"])  # full batch, no process group
    two = [torch.load(two_process_run / f"history_rank{r}.pt") for r in (0, 1)]
    assert sorted(one) == sorted(two[0]) == list(range(1, 7))
    for step in one:
        for k in one[step]:
            assert torch.equal(two[0][step][k], two[1][step][k]), (step, k)  # ranks agree exactly
            torch.testing.assert_close(two[0][step][k], one[step][k], atol=1e-6, rtol=0, msg=f"step {step} {k}")
    start = worker.make_problem()[0]
    assert all(not torch.allclose(one[6][k], start[k].detach(), atol=1e-3) for k in start)  # all moved

    # each rank holds optimizer state only for its share
    sd = torch.load(two_process_run / "optim_step3_rank0.pt")
    (emb_state, side_state, bias_state, _), w_in, w_h, w_o = [
        [sd["state"][i] for i in g["params"] if i in sd["state"]] or [None] for g in sd["param_groups"]]
    assert emb_state["exp_avg"].shape == (16, 300)     # split along dim 0
    assert side_state["exp_avg"].shape == (5, 300)     # 5 rows do not split in 2: whole
    assert bias_state["exp_avg"].shape == (32,)        # small: whole
    assert w_in[0]["momentum_buffer"].shape == (1, 32, 24)
    assert w_h[0]["momentum_buffer"].shape == (2, 32, 32)  # 3 matrices padded to 4, 2 per rank
    assert w_h[0]["second_momentum_buffer"].shape == (2, 32, 1)
    assert w_o[0]["momentum_buffer"].shape == (1, 5, 32)
    assert w_o[0]["second_momentum_buffer"].shape == (1, 1, 32)


def test_two_process_resume_from_shards_is_exact(two_process_run, tmp_path):
    _torchrun(tmp_path, "--steps", "6", "--resume-from", str(two_process_run), "--resume-step", "3")
    full = torch.load(two_process_run / "history_rank0.pt")
    for r in (0, 1):
        resumed = torch.load(tmp_path / f"history_rank{r}.pt")
        assert sorted(resumed) == [4, 5, 6]
        for step in resumed:
            for k in resumed[step]:
                assert torch.equal(resumed[step][k], full[step][k]), (r, step, k)


# ---------------------------------------------------------------------------------------------
# torch.compile'd update functions (the default on CUDA)

@pytest.mark.slow
def test_compiled_updates_match_eager_without_recompiling():
    import torch._dynamo
    results = []
    for compile in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        W = (torch.randn(16, 32) * 0.1).requires_grad_()
        b = torch.zeros(16, requires_grad=True)
        x, y = torch.randn(8, 32), torch.randn(8, 16)
        opt = MuonAdamW([dict(kind="muon", params=[W], lr=0.02, weight_decay=0.1),
                         dict(kind="adamw", params=[b], lr=0.01, weight_decay=0.1)], compile=compile)
        for step in range(4):
            for group in opt.param_groups:  # lr and momentum change every step...
                group["lr"] = group["initial_lr"] * (1 - step / 8)
            opt.param_groups[0]["momentum"] = 0.85 + 0.03 * step
            loss = ((x @ W.T + b - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            # ...which must not recompile: hyperparameters go in as 0-D tensors
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                opt.step()
        results.append((W.detach().clone(), b.detach().clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=0)
