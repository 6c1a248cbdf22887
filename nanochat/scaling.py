"""Scaling laws from a sweep's CSV: the columns, reading them, and the fits (docs/scaling.md).

An isoFLOP grid (`nanochat scaling run`, or upstream's runs/scaling_laws.sh) trains several model
sizes N at each compute budget C. From its rows:
- approach 2 (Hoffmann et al. 2022): per budget, a parabola of val bpb in log N; its vertex is
  that budget's optimum (N_opt, and D_opt from the budget's tokens at that N), flagged `at_edge`
  when the grid does not bracket it;
- the power laws N_opt ~ C^a and D_opt ~ C^b, with 95% bootstrap intervals (runs resampled within
  each budget: Besiroglu et al. 2024 point out that the original fits came without them);
- approach 3: L = E + A/N^alpha + B/D^beta fitted to all runs with a Huber loss on log L from a
  grid of starts (Hoffmann et al.; Besiroglu et al.), whose a = beta/(alpha+beta) and
  b = alpha/(alpha+beta) do not suffer approach 2's bias on off-centre or narrow grids;
- tokens:params ratios, and a recommendation for a target budget.
"""
import csv
import math
import os

import numpy as np
from scipy.optimize import minimize, nnls

from nanochat.common import UserError, atomic_write_text

# upstream's columns, in upstream's order (runs/scaling_laws.sh and runs/miniseries.sh), so CSVs
# are interchangeable; ours follow them
GRID_COLUMNS = ["flops_budget", "depth", "model_dim", "params_wte", "params_value_embeds", "params_lm_head",
                "params_transformer", "params_scalars", "params_total", "num_iterations", "tokens_trained",
                "val_bpb", "core_score", "train_time_sec"]
SERIES_COLUMNS = ["depth", "model_dim", "num_params", "num_scaling_params", "num_iterations", "tokens_trained",
                  "param_data_ratio", "val_bpb", "core_score", "train_time_sec"]
# status: ok | failed; run: its folder under runs/; flops: what it trained (FLOPs/token x tokens);
# wall_time_sec and cpu_time_sec: the whole subprocess; error: a failed run's last line of output
EXTRA_COLUMNS = ["status", "run", "flops", "wall_time_sec", "cpu_time_sec", "error"]

# which parameters N counts: upstream's "scaling params" (transformer matrices + lm_head) by default
PARAM_CONVENTIONS = {
    "scaling": ("params_transformer", "params_lm_head"),
    "total": ("params_total",),
    "transformer": ("params_transformer",),
}
HUBER_DELTA = 1e-3  # Hoffmann et al.'s delta, on log loss
MIN_SIZES = 3  # a parabola needs three distinct sizes


# ---------------------------------------------------------------------------
# CSV

def read_csv(path, columns):
    """The rows (dicts of strings) of a grid or series CSV whose header is `columns` (upstream's)
    followed by any of ours. UserError for a missing or empty file or an unknown column."""
    if not os.path.isfile(path):
        raise UserError(f"no such CSV: {path}")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise UserError(f"{path} is empty: no header and no runs")
        header = [h.strip() for h in header]
        unknown = [h for h in header if h not in columns and h not in EXTRA_COLUMNS]
        if unknown:
            hint = " (a miniseries CSV: `scaling fit` needs an isoFLOP grid from `scaling run`)" \
                if header[:len(SERIES_COLUMNS)] == SERIES_COLUMNS and columns is GRID_COLUMNS else ""
            raise UserError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}{hint}; "
                            f"expected {','.join(columns)} and optionally {','.join(EXTRA_COLUMNS)}")
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise UserError(f"{path} line {line_no}: {len(cells)} cells for {len(header)} columns")
            rows.append(dict(zip(header, (c.strip() for c in cells)), _line=line_no))
    return rows


def write_csv(path, columns, rows):
    """All rows, rewritten atomically (a kill never leaves a torn line); missing cells empty."""
    lines = [",".join(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            v = "" if v is None else (repr(v) if isinstance(v, float) else str(v))
            cells.append('"' + v.replace('"', '""') + '"' if any(ch in v for ch in ',"\n') else v)
        lines.append(",".join(cells))
    atomic_write_text(path, "\n".join(lines) + "\n")


def is_ok(row):
    """A finished run: ours say status ok; upstream's rows have no status (every row finished)."""
    return row.get("status", "ok") in ("", "ok")


def number(row, column, path):
    """float of a cell; UserError naming the line for an empty, non-numeric or non-finite one."""
    text = row.get(column, "")
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UserError(f"{path} line {row['_line']}: {column} is {text!r}, not a finite number "
                        f"(mark a failed run with status=failed, or remove the line)")
    return v


def grid_points(path, params="scaling"):
    """(C, N, D, L, depth) arrays of the finished runs of a grid CSV, N by the `params` convention."""
    if params not in PARAM_CONVENTIONS:
        raise UserError(f"--params must be one of {', '.join(PARAM_CONVENTIONS)}, not {params!r}")
    rows = [r for r in read_csv(path, GRID_COLUMNS) if is_ok(r)]
    if not rows:
        raise UserError(f"{path} has no finished runs to fit")
    C = np.array([number(r, "flops_budget", path) for r in rows])
    N = np.array([sum(number(r, c, path) for c in PARAM_CONVENTIONS[params]) for r in rows])
    D = np.array([number(r, "tokens_trained", path) for r in rows])
    L = np.array([number(r, "val_bpb", path) for r in rows])
    depth = np.array([number(r, "depth", path) for r in rows])
    bad = [r["_line"] for r, *v in zip(rows, C, N, D, L) if min(v) <= 0]
    if bad:
        raise UserError(f"{path} line {bad[0]}: flops_budget, parameters, tokens_trained and val_bpb must be > 0")
    return C, N, D, L, depth


# ---------------------------------------------------------------------------
# Approach 2: a parabola per budget

def parabola_optimum(x, y):
    """(x at the vertex, y there, curvature) of the least-squares parabola y(x); the curvature is
    <= 0 when the points have no minimum."""
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return None, None, c2
    xv = -c1 / (2 * c2)
    return xv, c0 - c1 * c1 / (4 * c2), c2


def fit_budget(N, D, L):
    """Approach 2 at one budget: {n_opt, d_opt, loss_min, at_edge, extend}. x = ln N. D_opt comes
    from a line of ln D against ln N through the budget's runs (D ~ C/(6N) whatever convention
    counts N). at_edge: the lowest loss is at the smallest or largest N, or the vertex falls
    outside the sizes (then `extend` says which way to grow the grid)."""
    x, y = np.log(N), np.asarray(L, dtype=float)
    xv, yv, _ = parabola_optimum(x, y)
    order = np.argsort(x)
    best = int(np.argmin(y[order]))
    ys = y[order]
    if xv is None:  # no minimum at all: grow towards the lower end
        extend = "smaller" if ys[0] < ys[-1] else "larger"
    elif xv <= x.min() or best == 0:
        extend = "smaller"
    elif xv >= x.max() or best == len(x) - 1:
        extend = "larger"
    else:
        extend = None
    if xv is None:  # no minimum: report the best run
        xv, yv = x[order][best], y[order][best]
    slope, icept = np.polyfit(x, np.log(D), 1)
    return dict(n_opt=float(math.exp(xv)), d_opt=float(math.exp(slope * xv + icept)), loss_min=float(yv),
                at_edge=extend is not None, extend=extend)


def budgets(C, N, min_sizes=MIN_SIZES):
    """{budget: indices of its runs} for the budgets with >= min_sizes distinct sizes, and the
    budgets left out."""
    used, skipped = {}, []
    for c in sorted(set(C.tolist())):
        idx = np.flatnonzero(C == c)
        if len(set(N[idx].tolist())) >= min_sizes:
            used[c] = idx
        else:
            skipped.append(c)
    return used, skipped


def power_law(C, Y):
    """(exponent, ln prefactor) of Y = exp(k) C^e, least squares in log-log."""
    e, k = np.polyfit(np.log(C), np.log(Y), 1)
    return float(e), float(k)


def approach2(C, N, D, L, groups):
    per = []
    for c, idx in groups.items():
        per.append(dict(flops=float(c), **fit_budget(N[idx], D[idx], L[idx])))
    cs = np.array([p["flops"] for p in per])
    a, ka = power_law(cs, [p["n_opt"] for p in per])
    b, kb = power_law(cs, [p["d_opt"] for p in per])
    return per, (a, ka), (b, kb)


def bootstrap_approach2(C, N, D, L, groups, n_boot, rng):
    """(a, b, ratio at c_mid) per resample: runs drawn with replacement within each budget; a draw
    with fewer than 3 sizes or no minimum in some budget is drawn again."""
    c_mid = math.exp(np.mean(np.log(list(groups))))
    out = []
    for _ in range(n_boot):
        opt = []
        for c, idx in groups.items():
            for _try in range(100):
                pick = rng.choice(idx, size=len(idx), replace=True)
                if len(set(N[pick].tolist())) >= MIN_SIZES and parabola_optimum(np.log(N[pick]), L[pick])[0] is not None:
                    break
            else:
                continue
            f = fit_budget(N[pick], D[pick], L[pick])
            opt.append((c, f["n_opt"], f["d_opt"]))
        if len(opt) < 2:
            continue
        cs, ns, ds = map(np.array, zip(*opt))
        a, ka = power_law(cs, ns)
        b, kb = power_law(cs, ds)
        out.append((a, b, math.exp(kb - ka + (b - a) * math.log(c_mid))))
    return np.array(out)


# ---------------------------------------------------------------------------
# Approach 3: L = E + A/N^alpha + B/D^beta

def _huber_objective(theta, lnN, lnD, lnL, delta=HUBER_DELTA):
    """Sum of Huber(ln L_pred - ln L) / delta^2 and its gradient; theta = (e, a, b, alpha, beta) with
    E = exp(e), A = exp(a), B = exp(b). (Divided by delta^2 so that the optimizer's tolerances,
    made for values of order 1, do not stop it at the start.)"""
    e, a, b, alpha, beta = theta
    terms = np.stack([a - alpha * lnN, b - beta * lnD, np.full_like(lnN, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    pred = top + np.log(s)
    w /= s
    r = (pred - lnL) / delta
    small = np.abs(r) <= 1
    loss = np.where(small, 0.5 * r * r, np.abs(r) - 0.5).sum()
    g = np.where(small, r, np.sign(r)) / delta
    grad = np.array([(g * w[2]).sum(), (g * w[0]).sum(), (g * w[1]).sum(),
                     -(g * w[0] * lnN).sum(), -(g * w[1] * lnD).sum()])
    return loss, grad


BOUNDS = [(-5, 5), (-10, 40), (-10, 40), (0.01, 3), (0.01, 3)]
EXPONENT_STARTS = np.linspace(0.05, 1.5, 16)
E_FRACTIONS = (0.0, 0.5, 0.8, 0.9, 0.97)


def starts(N, D, L, keep=8):
    """The best `keep` of a grid of starting points: for each (alpha, beta) on a grid and E a
    fraction of the lowest loss, L - E = A N^-alpha + B D^-beta is linear in A and B (solved
    with non-negative least squares), so each grid point costs one small solve."""
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    scored = []
    for frac in E_FRACTIONS:
        E = frac * L.min()
        for al in EXPONENT_STARTS:
            for be in EXPONENT_STARTS:
                X = np.stack([N ** -al, D ** -be], axis=1)
                scale = X.max(axis=0)
                coef, _ = nnls(X / scale, L - E)
                A, B = np.maximum(coef / scale, 1e-30)
                theta = (math.log(max(E, 1e-3)), math.log(A), math.log(B), al, be)
                theta = tuple(min(max(t, lo), hi) for t, (lo, hi) in zip(theta, BOUNDS))
                scored.append((_huber_objective(theta, lnN, lnD, lnL)[0], theta))
    scored.sort(key=lambda s: s[0])
    return [t for _, t in scored[:keep]]


def _minimize(lnN, lnD, lnL, x0s):
    best = None
    for x0 in x0s:
        res = minimize(_huber_objective, np.array(x0, dtype=float), args=(lnN, lnD, lnL), jac=True,
                       method="L-BFGS-B", bounds=BOUNDS, options=dict(maxiter=2000))
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def approach3_params(theta):
    e, a, b, alpha, beta = (float(t) for t in theta)
    return dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                a=beta / (alpha + beta), b=alpha / (alpha + beta))


def approach3_optimum(p, C, k):
    """(N_opt, D_opt) minimizing E + A/N^alpha + B/D^beta at compute C = k N D."""
    al, be = p["alpha"], p["beta"]
    G = (al * p["A"] / (be * p["B"])) ** (1 / (al + be))
    n = G * (C / k) ** (be / (al + be))
    return n, C / (k * n)


def predict(p, N, D):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


# ---------------------------------------------------------------------------
# Everything together

def _ci(values, q=(2.5, 97.5)):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(values, q)] if len(values) else [math.nan, math.nan]


def fit(C, N, D, L, depth=None, target_flops=None, n_boot=1000, n_boot3=100, seed=0):
    """The whole analysis of one grid, as a JSON-able dict (keys in docs/scaling.md)."""
    groups, skipped = budgets(C, N)
    if not groups:
        raise UserError(f"every budget has fewer than {MIN_SIZES} model sizes (one depth per budget?): "
                        f"approach 2 fits a parabola per budget")
    if len(groups) < 2:
        raise UserError(f"only one budget ({next(iter(groups)):.3g} FLOPs) has {MIN_SIZES}+ model sizes: "
                        f"the power laws need at least two budgets")
    rng = np.random.default_rng(seed)
    per, (a, ka), (b, kb) = approach2(C, N, D, L, groups)
    boot = bootstrap_approach2(C, N, D, L, groups, n_boot, rng)
    c_mid = math.exp(np.mean(np.log(list(groups))))
    ratio = math.exp(kb - ka + (b - a) * math.log(c_mid))
    for p in per:
        p["ratio"] = p["d_opt"] / p["n_opt"]
    k = float(np.exp(np.mean(np.log(C / (N * D)))))  # FLOPs per (param x token): ~6 by the usual rule

    used = np.concatenate(list(groups.values()))
    lnN, lnD, lnL = np.log(N[used]), np.log(D[used]), np.log(L[used])
    theta = _minimize(lnN, lnD, lnL, starts(N[used], D[used], L[used]))
    p3 = approach3_params(theta)
    boot3 = []
    for _ in range(n_boot3):
        pick = rng.choice(len(used), size=len(used), replace=True)
        boot3.append(approach3_params(_minimize(lnN[pick], lnD[pick], lnL[pick], [theta])))
    p3["ci"] = {key: _ci([q[key] for q in boot3]) for key in ("E", "A", "B", "alpha", "beta", "a", "b")}
    n3, d3 = approach3_optimum(p3, c_mid, k)
    p3["ratio"] = d3 / n3

    out = dict(a=a, b=b, a_ci=_ci(boot[:, 0]) if len(boot) else [math.nan] * 2,
               b_ci=_ci(boot[:, 1]) if len(boot) else [math.nan] * 2,
               ratio=ratio, ratio_ci=_ci(boot[:, 2]) if len(boot) else [math.nan] * 2, ratio_at_flops=c_mid,
               per_budget=per, approach3=p3, flops_per_param_token=k, n_runs=int(len(used)),
               skipped_budgets=[float(c) for c in skipped], n_boot=int(len(boot)),
               laws=dict(n_opt=[a, ka], d_opt=[b, kb]))
    if target_flops:
        out["recommendation"] = recommend(out, target_flops, N, depth)
    return out


def recommend(res, target, N=None, depth=None):
    """N, tokens, ratio and predicted bpb at `target` FLOPs from approach 2's power laws (bpb from
    approach 3), and the nearest depth by a power law of N in depth through the grid's models."""
    a, ka = res["laws"]["n_opt"]
    b, kb = res["laws"]["d_opt"]
    n = math.exp(ka + a * math.log(target))
    d = math.exp(kb + b * math.log(target))
    rec = dict(flops=float(target), n_opt=n, d_opt=d, ratio=d / n, bpb=predict(res["approach3"], n, d))
    if N is not None and depth is not None and len(set(depth.tolist())) >= 2:
        p, q = np.polyfit(np.log(depth), np.log(N), 1)
        dep = max(1, int(round(math.exp((math.log(n) - q) / p))))
        n_dep = float(np.median(N[depth == dep])) if (depth == dep).any() else math.exp(q + p * math.log(dep))
        d_dep = target / (res["flops_per_param_token"] * n_dep)
        rec.update(depth=dep, depth_params=n_dep, depth_tokens=d_dep, depth_ratio=d_dep / n_dep,
                   depth_bpb=predict(res["approach3"], n_dep, d_dep))
    return rec


def summary_lines(res, params="scaling"):
    """The fit as text: one line per budget, then the laws, approach 3 and the recommendation."""
    lines = [f"approach 2 (parabola of val bpb in ln N per budget; N = {params} parameters):"]
    for p in res["per_budget"]:
        edge = f"  AT EDGE: the minimum is not inside the grid, extend it to {p['extend']} models" if p["at_edge"] else ""
        lines.append(f"  C {p['flops']:.3g}: N_opt {p['n_opt']:.4g}, D_opt {p['d_opt']:.4g}, "
                     f"tokens/param {p['ratio']:.3g}, bpb {p['loss_min']:.4f}{edge}")
    for c in res["skipped_budgets"]:
        lines.append(f"  C {c:.3g}: left out (fewer than {MIN_SIZES} model sizes)")
    lines.append(f"N_opt ~ C^a: a = {res['a']:.3f} (95% CI {res['a_ci'][0]:.3f} .. {res['a_ci'][1]:.3f}); "
                 f"D_opt ~ C^b: b = {res['b']:.3f} (95% CI {res['b_ci'][0]:.3f} .. {res['b_ci'][1]:.3f}); "
                 f"{res['n_boot']} bootstrap resamples"
                 + (" (no spread: a budget with 3 sizes has nothing to resample; use 4 or more)"
                    if res["a_ci"][0] == res["a_ci"][1] else ""))
    lines.append(f"tokens per parameter at C = {res['ratio_at_flops']:.3g}: {res['ratio']:.3g} "
                 f"(95% CI {res['ratio_ci'][0]:.3g} .. {res['ratio_ci'][1]:.3g})")
    p3 = res["approach3"]
    ci = p3["ci"]
    lines.append(f"approach 3 (Huber on ln L, {res['n_runs']} runs): L = {p3['E']:.4g} + {p3['A']:.4g}/N^{p3['alpha']:.3f} "
                 f"+ {p3['B']:.4g}/D^{p3['beta']:.3f}; alpha CI {ci['alpha'][0]:.3f} .. {ci['alpha'][1]:.3f}, "
                 f"beta CI {ci['beta'][0]:.3f} .. {ci['beta'][1]:.3f}")
    lines.append(f"  implies a = {p3['a']:.3f} (CI {ci['a'][0]:.3f} .. {ci['a'][1]:.3f}), b = {p3['b']:.3f} "
                 f"(CI {ci['b'][0]:.3f} .. {ci['b'][1]:.3f}), tokens/param {p3['ratio']:.3g} at C = {res['ratio_at_flops']:.3g}")
    rec = res.get("recommendation")
    if rec:
        lines.append(f"at C = {rec['flops']:.3g}: N {rec['n_opt']:.4g}, tokens {rec['d_opt']:.4g}, "
                     f"tokens/param {rec['ratio']:.3g}, predicted bpb {rec['bpb']:.4f}")
        if "depth" in rec:
            lines.append(f"  nearest depth {rec['depth']} (N {rec['depth_params']:.4g}): train {rec['depth_tokens']:.4g} tokens "
                         f"(tokens/param {rec['depth_ratio']:.3g}), predicted bpb {rec['depth_bpb']:.4f}")
    return lines
