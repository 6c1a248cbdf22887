"""MuonAdamW: one optimizer for the whole model, distributed inside itself.

Two kinds of parameter groups:

    dict(kind="adamw", params=[...], lr=..., betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    dict(kind="muon",  params=[matrices of one shape], lr=..., momentum=0.95, weight_decay=0.0,
         ns_steps=5, beta2=0.9, row_eq=False, renorm=False)

AdamW is the textbook one (bias-corrected moments, decoupled weight decay; on the CPU it runs as
torch's fused kernel). Muon is: Nesterov momentum -> [MuonEq row equilibration] -> Polar Express
orthogonalization -> [Muon+ renormalization] -> NorMuon per-neuron variance normalization ->
cautious weight decay, with the rate scaled by sqrt(rows/cols) for tall matrices (the bracketed
steps are off unless the group asks for them: docs/optim.md says why). A Muon group's
matrices are stacked into one (K, rows, cols) tensor so the math runs batched.

Distributed (torchrun) without a DDP wrapper, with the same code for 1 and N processes:
1. start averaging every gradient across ranks (reduce-scatter: each rank receives only its share),
2. each rank updates only its share of the parameters and keeps optimizer state only for it,
3. all-gather the updated shares so every rank holds the full parameters again.
A Muon group's K matrices are split across ranks (padded with zero matrices to a multiple of the
world size); an AdamW tensor of at least SHARD_MIN_NUMEL elements whose dim 0 divides by the world
size is split along dim 0, anything else is all-reduced and updated whole on every rank.
All collectives are asynchronous: while group i is being updated, the gradients of the later
groups are still in flight, and the gathers of the earlier groups already are.
"""
import torch
import torch.distributed as dist

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): per-iteration coefficients
# (a, b, c) of the odd quintics p(x) = a x + b x^3 + c x^5, published for 5 iterations with the
# paper's 2% safety margin. Each iteration pushes every singular value of X towards 1.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# AdamW tensors smaller than this are not worth splitting: all-reduce them and update them whole.
SHARD_MIN_NUMEL = 1024

ADAMW_DEFAULTS = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
MUON_DEFAULTS = dict(momentum=0.95, weight_decay=0.0, ns_steps=5, beta2=0.9, row_eq=False, renorm=False)


def polar_express(G, steps=5):
    """Approximately orthogonalize G (..., rows, cols): the result has G's singular vectors and
    singular values near 1. Runs in bf16 on CUDA (fast tensor cores; the iteration is robust to
    it) and in fp32 elsewhere (CPUs are slow at bf16). Returns that dtype."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps must be between 1 and {len(POLAR_EXPRESS_COEFFS)}, not {steps}")
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation so X @ X^T is the small (min x min) Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]; the extra 1%
    # is a margin for bf16 rounding (upstream nanochat tuned it down from 2%: docs/optim.md)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def equilibrate_rows(X):
    """MuonEq (arXiv:2603.28254): scale every row of each matrix in X (..., rows, cols) to the
    matrix's root-mean-square row norm, ||X||_F / sqrt(rows); the Frobenius norm is unchanged and
    the spectrum that enters the orthogonalization is better conditioned. A zero row stays zero."""
    target = X.norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    return X * (target / X.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def renormalize(O):
    """Muon+ (arXiv:2602.21545): scale each matrix to Frobenius norm sqrt(min(rows, cols)), the
    norm of an exactly semi-orthogonal matrix (the iteration leaves singular values near, not
    at, 1). A zero matrix stays zero."""
    return O * (min(O.size(-2), O.size(-1)) ** 0.5 / O.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))


def muon_update(p, g, mom, var, lr, momentum, wd, beta2, ns_steps: int, row_eq: bool = False, renorm: bool = False):
    """One Muon step on a stack of matrices p (K, rows, cols) with averaged gradients g, in place.
    mom: momentum buffer like p; var: NorMuon second moments (K, rows, 1) or (K, 1, cols).
    lr (already scaled for tall matrices), momentum, wd, beta2: 0-D tensors on p's device.
    row_eq / renorm: MuonEq before and Muon+ after the orthogonalization."""
    # Nesterov momentum, EMA form: the buffer averages gradients, the update looks one step ahead.
    mom.lerp_(g, 1 - momentum)
    u = g.lerp(mom, momentum)
    if row_eq:
        u = equilibrate_rows(u)
    O = polar_express(u, ns_steps).to(p.dtype)
    if renorm:
        O = renormalize(O)
    # NorMuon (Li et al. 2025, arXiv:2510.05491): the orthogonalized update still gives some
    # neurons far bigger steps than others. Keep an EMA of the mean squared update per neuron and
    # divide by its root. Which side: O ~ U V^T has unit-norm vectors along its smaller dimension
    # already, so the imbalance is across the larger one; average over the smaller dimension
    # (columns of a tall matrix, rows of a wide one) to get one statistic per larger-side neuron.
    red_dim = -1 if p.size(-2) >= p.size(-1) else -2
    var.lerp_(O.square().mean(dim=red_dim, keepdim=True), 1 - beta2)
    N = O / (var.sqrt() + 1e-10)
    # ...then rescale each matrix back to O's Frobenius norm, so Muon's learning rates still apply
    # (and no bias correction of the EMA is needed: it would be a per-matrix constant).
    N = N * (O.norm(dim=(-2, -1), keepdim=True) / N.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    # Cautious weight decay: decay a coordinate unless the update pulls it away from zero (update
    # and parameter of opposite signs), where decay would fight the gradient. An update that is
    # exactly zero does not oppose the decay, so it is decayed (>= 0, as upstream nanochat).
    mask = (N * p) >= 0
    p.sub_(lr * (N + wd * p * mask))


def adamw_update(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, bias1, bias2_sqrt):
    """One AdamW step in place (same arithmetic as torch.optim.AdamW). Scalars: 0-D tensors."""
    # in-place ops with two temporaries: the eager CPU path otherwise allocates several
    # parameter-sized buffers per step, which costs page faults on every step
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    # (no `value=` arguments: with 0-D tensor scalars they would sync with the host on CUDA)
    step = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(eps).reciprocal_().mul_(exp_avg).mul_(lr / bias1)
    p.sub_(step)


def gpt_param_groups(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                     weight_decay=0.0):
    """A GPT's parameter groups for MuonAdamW (GPT.setup_optimizer; every parameter in exactly one
    group), with upstream nanochat's hyperparameters (docs/model.md, "Optimizer groups")."""
    scale = (model.config.n_embd / 768) ** -0.5  # the AdamW lrs of the tables were tuned at width 768

    def adamw(params, lr, betas, wd):
        return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
    groups = [
        adamw([model.lm_head.weight], unembedding_lr * scale, (0.8, 0.96), 0.01),
        adamw([model.wte.weight], embedding_lr * scale, (0.8, 0.995), 0.001),
        adamw(list(model.value_embeds.parameters()), embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
        # the residual scalars get 1% of the scalar lr: at init their true gradient is ~0 (the
        # blocks start as identities and RMSNorm ignores scale), so Adam would turn round-off
        # into full-size random steps. Scalars are not width-scaled.
        adamw([model.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
        adamw([model.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
        # a fixed lr, as upstream (not tied to scalar_lr)
        adamw([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    # Muon: every matrix inside the blocks (the value-embedding gates too), one group per shape
    matrices = {}
    for p in model.blocks.parameters():
        matrices.setdefault(tuple(p.shape), []).append(p)
    for shape in sorted(matrices):
        groups.append(dict(kind="muon", params=matrices[shape], lr=matrix_lr, momentum=0.95, ns_steps=5,
                           beta2=0.9, weight_decay=weight_decay))
    for g in groups:
        g["initial_lr"] = g["lr"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    return groups


def _world():
    """(world_size, rank, nccl?) of the default process group; (1, 0, False) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), dist.get_backend() == "nccl"
    return 1, 0, False


def _reduce_start(full, world, rank, nccl, owned):
    """Start averaging `full` across ranks; returns (work, shard) where shard (valid after
    work.wait()) is this rank's dim-0 share of the average. `owned`: full may be overwritten."""
    n = full.size(0) // world
    if world == 1:
        return None, full
    if nccl:
        shard = torch.empty_like(full[:n])
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return rs(shard, full, op=dist.ReduceOp.AVG, async_op=True), shard
    # gloo (CPU) may lack reduce_scatter and AVG: all-reduce a pre-divided copy, keep our slice.
    full = full.div_(world) if owned else full / world
    return dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True), full[rank * n:(rank + 1) * n]


def _gather_start(full, shard, world, nccl):
    """Start filling `full` with every rank's `shard` (concatenated along dim 0)."""
    if world == 1:
        return None
    if nccl:
        ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return ag(full, shard, async_op=True)
    return dist.all_gather(list(full.chunk(world)), shard, async_op=True)


class MuonAdamW(torch.optim.Optimizer):
    """See the module docstring. `compile`: torch.compile the update functions (default: when
    the parameters are on CUDA)."""

    def __init__(self, param_groups, compile=None):
        groups = []
        for group in param_groups:
            group = dict(group)
            kind = group.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"every param group needs kind='adamw' or 'muon', got {kind!r}")
            if "lr" not in group:
                raise ValueError(f"a {kind} param group needs an lr")
            group["params"] = list(group["params"])
            for k, v in (MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS).items():
                group.setdefault(k, v)
            group.setdefault("initial_lr", group["lr"])
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon group needs 2-D matrices of one shape, got shapes {sorted(shapes)}")
                if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
                    raise ValueError(f"ns_steps must be between 1 and {len(POLAR_EXPRESS_COEFFS)}")
            groups.append(group)
        super().__init__(groups, defaults={})
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if compile is None:
            compile = first is not None and first.is_cuda
        self._muon_fn, self._adamw_fn = muon_update, adamw_update
        # On the CPU, torch's fused AdamW kernel does the same arithmetic in one pass over the
        # tensors (faster than the eager ops above; same results to rounding: docs/benchmarks.md).
        self._fused_cpu = not compile and first is not None and first.device.type == "cpu"
        if compile:
            self._muon_fn = torch.compile(muon_update, dynamic=False, fullgraph=True)
            self._adamw_fn = torch.compile(adamw_update, dynamic=False, fullgraph=True)
        self._scalars = {}  # device -> 0-D tensors holding this step's hyperparameters

    def _scalar(self, device, *values):
        """Hyperparameters as 0-D fp32 tensors on `device`, refilled every step: a compiled
        update then never recompiles when the schedule changes lr or momentum, and on CUDA a
        fill_ is a kernel launch, not a host-device sync. Slots are reused in order within one
        update call (each call gets fresh slots from the start: safe, ops run in stream order)."""
        slots = self._scalars.setdefault(device, [])
        while len(slots) < len(values):
            slots.append(torch.zeros((), dtype=torch.float32, device=device))
        return [s.fill_(v) for s, v in zip(slots, values)]

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank, nccl = _world()
        # 1. start every gradient reduction, in the same order on every rank
        jobs = []
        for group in self.param_groups:
            if group["kind"] == "muon":
                jobs.append(self._muon_start(group, world, rank, nccl))
            else:
                jobs.extend(self._adamw_start(group, p, world, rank, nccl) for p in group["params"])
        # 2. as each reduction lands, update this rank's share and start its gather
        for job in jobs:
            job["finish_update"]()
        # 3. wait for the gathers, put the results in place
        for job in jobs:
            job["finish_gather"]()
        return loss

    def _muon_start(self, group, world, rank, nccl):
        params = group["params"]
        K, (rows, cols) = len(params), params[0].shape
        per_rank = -(-K // world)  # ceil
        lo, hi = rank * per_rank, min((rank + 1) * per_rank, K)
        ref = params[0]
        grads = torch.zeros((per_rank * world, rows, cols), dtype=ref.dtype, device=ref.device)
        for i, p in enumerate(params):
            if p.grad is not None:  # a missing gradient counts as zero, so all ranks stay in step
                grads[i].copy_(p.grad)
        work, g = _reduce_start(grads, world, rank, nccl, owned=True)
        job = {}  # what finish_update hands finish_gather (never the functions: no reference cycle, see below)

        def finish_update():
            if work is not None:
                work.wait()
            # this rank's matrices stacked (the padding beyond K stays zero and gets no update)
            mine = torch.zeros((per_rank, rows, cols), dtype=ref.dtype, device=ref.device)
            if hi > lo:
                torch._foreach_copy_(list(mine[:hi - lo].unbind(0)), params[lo:hi])
            state = self.state[ref]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(mine)
                var_shape = (per_rank, rows, 1) if rows >= cols else (per_rank, 1, cols)
                state["second_momentum_buffer"] = torch.zeros(var_shape, dtype=ref.dtype, device=ref.device)
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5
            scalars = self._scalar(ref.device, lr, group["momentum"], group["weight_decay"], group["beta2"])
            self._muon_fn(mine, g, state["momentum_buffer"], state["second_momentum_buffer"], *scalars,
                          group["ns_steps"], bool(group.get("row_eq")), bool(group.get("renorm")))
            if world == 1:
                job["full"] = mine
            else:
                job["full"] = torch.empty_like(grads)
                job["work"] = _gather_start(job["full"], mine, world, nccl)

        def finish_gather():
            if job.get("work") is not None:
                job["work"].wait()
            torch._foreach_copy_(params, list(job["full"][:K].unbind(0)))

        # a new dict: had `job` held the functions that close over it, each step's gradients would
        # sit in a reference cycle, freed only by the collector, which training turns off (gc_step)
        return dict(finish_update=finish_update, finish_gather=finish_gather)

    def _adamw_start(self, group, p, world, rank, nccl):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        sharded = world == 1 or (p.dim() > 0 and p.numel() >= SHARD_MIN_NUMEL and p.size(0) % world == 0)
        if sharded:
            work, g = _reduce_start(grad.contiguous(), world, rank, nccl, owned=False)
            n = p.size(0) // world
            mine = p[rank * n:(rank + 1) * n]
        else:  # small or indivisible: average the whole gradient, every rank updates all of p
            g = grad / world if world > 1 else grad
            work = dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) if world > 1 else None
            mine = p
        job = {}

        def finish_update():
            if work is not None:
                work.wait()
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(mine)
                state["exp_avg_sq"] = torch.zeros_like(mine)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            t = state["step"]
            if self._fused_cpu:  # the kernel reads the step count from a tensor (bias corrections)
                torch._fused_adamw_([mine], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [], [torch.tensor(float(t))],
                                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                    eps=group["eps"], amsgrad=False, maximize=False)
            else:
                scalars = self._scalar(p.device, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                                       1 - beta1 ** t, (1 - beta2 ** t) ** 0.5)
                self._adamw_fn(mine, g, state["exp_avg"], state["exp_avg_sq"], *scalars)
            if sharded and world > 1:
                # the shard is a view of p; gather from a copy so input and output never alias
                job["work"] = _gather_start(p, mine.clone(), world, nccl)

        def finish_gather():
            if job.get("work") is not None:
                job["work"].wait()

        # a new dict: had `job` held the functions that close over it, each step's gradients would
        # sit in a reference cycle, freed only by the collector, which training turns off (gc_step)
        return dict(finish_update=finish_update, finish_gather=finish_gather)
