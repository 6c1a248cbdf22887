"""The pictures of a scaling sweep (PNG beside its CSV) and its section of the report card.

matplotlib is imported inside the drawing functions: it takes seconds, and only a finished sweep
or `scaling fit` draws.
"""
import json
import math
import os

import numpy as np

from nanochat import scaling
from nanochat.metrics import read_metrics
from nanochat.common import UserError, atomic_write_text
from nanochat.report import get_report, png_markdown, report_exists


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    _pyplot().close(fig)
    return path


def plot_grid(res, C, N, L, out, params="scaling"):
    """isoflop.png (bpb against N per budget, the parabolas and their optima) and optima.png
    (N_opt and D_opt against C, log-log, the fitted laws and their bootstrap intervals)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(res["per_budget"])))
    for color, p in zip(colors, res["per_budget"]):
        idx = C == p["flops"]
        x, y = np.log(N[idx]), L[idx]
        ax.scatter(N[idx], y, color=color, s=18, label=f"C = {p['flops']:.3g}")
        coef = np.polyfit(x, y, 2)
        xs = np.linspace(x.min() - 0.2, x.max() + 0.2, 100)
        ax.plot(np.exp(xs), np.polyval(coef, xs), color=color, lw=1)
        ax.scatter([p["n_opt"]], [p["loss_min"]], color=color, marker="x" if p["at_edge"] else "*", s=120)
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({params} parameters)")
    ax.set_ylabel("val bpb")
    ax.set_title("isoFLOP curves (star: optimum; x: at the grid's edge)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    pictures = [("isoFLOP curves", _save(fig, os.path.join(out, "isoflop.png")))]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    cs = np.array([p["flops"] for p in res["per_budget"]])
    grid_c = np.exp(np.linspace(np.log(cs.min()) - 0.3, np.log(cs.max()) + 0.3, 50))
    for ax, key, exp_key, ci_key, name in [(axes[0], "n_opt", "a", "a_ci", "N_opt"), (axes[1], "d_opt", "b", "b_ci", "D_opt")]:
        e, k = res["laws"][key]
        ys = np.array([p[key] for p in res["per_budget"]])
        ax.scatter(cs, ys, color="black", zorder=3, label=f"approach 2 optima ({name})")
        ax.plot(grid_c, np.exp(k + e * np.log(grid_c)), color="C0", label=f"{name} ~ C^{e:.3f}")
        lo, hi = res[ci_key]
        if all(map(math.isfinite, (lo, hi))):  # the CI's slopes through the middle budget
            c0 = math.exp(np.mean(np.log(cs)))
            y0 = math.exp(k + e * math.log(c0))
            band = [y0 * (grid_c / c0) ** s for s in (lo, hi)]
            ax.fill_between(grid_c, np.minimum(*band), np.maximum(*band), color="C0", alpha=0.15,
                            label=f"95% CI of the exponent [{lo:.3f}, {hi:.3f}]")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (training FLOPs)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"compute-optimal size and tokens; tokens/param {res['ratio']:.3g} at C = {res['ratio_at_flops']:.3g}")
    pictures.append(("compute-optimal N and D", _save(fig, os.path.join(out, "optima.png"))))
    return pictures


def run_dir(out, name):
    return os.path.join(out, "runs", name, "checkpoints", "base", name)


def plot_losses(rows, out, key="flops_budget"):
    """losses.png: each finished run's training loss (smoothed) against the FLOPs it had spent,
    from its metrics.jsonl; one panel per budget (the grid) or one for all (the series)."""
    runs = [r for r in rows if scaling.is_ok(r) and r.get("run")]
    if not runs:
        return []
    plt = _pyplot()
    groups = sorted({r.get(key, "") for r in runs}, key=lambda g: float(g) if g else 0)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], groups):
        for r in sorted((r for r in runs if r.get(key, "") == g), key=lambda r: int(r["depth"])):
            records = read_metrics(run_dir(out, r["run"]))
            per_token = float(r["flops"]) / float(r["tokens_trained"]) if r.get("flops") else 0
            pts = [(rec["tokens"] * per_token, rec["smooth_loss"]) for rec in records
                   if rec.get("smooth_loss") is not None and rec.get("tokens")]
            if pts and per_token:
                ax.plot(*zip(*pts), label=f"d{r['depth']}", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(f"C = {g}" if g else "all runs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (smoothed)")
    return [("training loss against FLOPs", _save(fig, os.path.join(out, "losses.png")))]


def plot_series(rows, out):
    """series.png: val bpb and CORE against the number of parameters."""
    runs = [r for r in rows if scaling.is_ok(r)]
    if not runs:
        return []
    plt = _pyplot()
    n = [float(r["num_params"]) for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in [(axes[0], "val_bpb", "val bpb"), (axes[1], "core_score", "CORE")]:
        pts = sorted((x, float(r[key]), r["depth"]) for x, r in zip(n, runs) if r.get(key) not in (None, ""))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            for x, y, depth in pts:
                ax.annotate(f"d{depth}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, f"no {name} in these runs", ha="center", transform=ax.transAxes)
        ax.set_xlabel("parameters")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle("miniseries")
    return [("miniseries", _save(fig, os.path.join(out, "series.png")))]


def log_section(section, numbers, lines, pictures):
    """The sweep's section of the report card, when a report has been started (report reset)."""
    if report_exists():
        get_report().log(section, [numbers, "```\n" + "\n".join(lines) + "\n```"]
                         + [png_markdown(title, path) for title, path in pictures])


def analyze(csv_path, out=None, params="scaling", target_flops=None, as_json=False, quiet_errors=True):
    """Fit a grid CSV, print the summary (and with as_json one JSON line last), draw the pictures
    beside the CSV (or in `out`), write fit.json and the report section. A grid too small to fit
    prints why (quiet_errors) or raises."""
    out = out or os.path.dirname(os.path.abspath(csv_path))
    try:
        C, N, D, L, depth = scaling.grid_points(csv_path, params)
        res = scaling.fit(C, N, D, L, depth, target_flops=target_flops)
    except UserError as e:
        if not quiet_errors:
            raise
        print(f"fit: {e}")
        return None
    lines = scaling.summary_lines(res, params)
    print("\n".join(lines))
    pictures = plot_grid(res, C, N, L, out, params)
    pictures += plot_losses(scaling.read_csv(csv_path, scaling.GRID_COLUMNS), out)
    atomic_write_text(os.path.join(out, "fit.json"), json.dumps(res, indent=1) + "\n")
    print("pictures: " + ", ".join(path for _, path in pictures))
    log_section("Scaling laws", dict(csv=csv_path, a=res["a"], b=res["b"], tokens_per_param=res["ratio"],
                                     alpha=res["approach3"]["alpha"], beta=res["approach3"]["beta"]), lines, pictures)
    if as_json:
        print(json.dumps(res))
    return res
