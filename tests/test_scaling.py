"""The scaling-law fits (nanochat/scaling.py) on synthetic grids from known laws, the CSV formats,
and `nanochat scaling fit`'s answers to bad input. docs/scaling.md states the tolerances."""
import json
import math

import numpy as np
import pytest

from nanochat import cli
from nanochat import scaling as sc

BUDGETS = (1e18, 2.15e18, 4.64e18, 1e19)


def law_grid(alpha, beta, shift=0.0, noise=0.0, n=9, E=0.8, A=400.0, B=2000.0, seed=0, span=0.5):
    """An upstream-style grid from L = E + A/N^alpha + B/D^beta with D = C/(6N): the same sizes at
    every budget, log-spaced from `span` decades below the smallest budget's optimum to `span`
    above the largest's, all moved by `shift` decades; losses x (1 + noise * standard normal)."""
    rng = np.random.default_rng(seed)
    a = beta / (alpha + beta)
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    lo = math.log10(G * (BUDGETS[0] / 6) ** a) - span
    hi = math.log10(G * (BUDGETS[-1] / 6) ** a) + span
    sizes = 10 ** (np.linspace(lo, hi, n) + shift)
    C, N = np.meshgrid(BUDGETS, sizes, indexing="ij")
    C, N = C.ravel(), N.ravel()
    D = C / (6 * N)
    L = (E + A / N ** alpha + B / D ** beta) * (1 + noise * rng.standard_normal(len(C)))
    return C, N, D, L


LAWS = [(0.34, 0.28), (0.5, 0.5), (0.3, 0.6)]  # Chinchilla's, symmetric, data-hungry


@pytest.mark.parametrize("alpha,beta", LAWS)
def test_centred_grid_recovers_the_exponents(alpha, beta):
    C, N, D, L = law_grid(alpha, beta)
    res = sc.fit(C, N, D, L, n_boot=200, n_boot3=10)
    a = beta / (alpha + beta)
    # approach 3 fits the generating law itself: exact up to the optimizer
    p3 = res["approach3"]
    assert abs(p3["alpha"] - alpha) < 0.005 and abs(p3["beta"] - beta) < 0.005
    assert abs(p3["a"] - a) < 0.005 and abs(p3["b"] - (1 - a)) < 0.005
    # approach 2 approximates each isoFLOP curve by a parabola in ln N: biased by <= 0.02 here
    assert abs(res["a"] - a) < 0.03 and abs(res["b"] - (1 - a)) < 0.03
    assert res["a_ci"][0] <= res["a"] <= res["a_ci"][1]
    assert not any(p["at_edge"] for p in res["per_budget"])
    # tokens per parameter at the middle compute, from the exact optimum of the law
    k = 6.0
    G = (alpha * 400.0 / (beta * 2000.0)) ** (1 / (alpha + beta))
    n_true = G * (res["ratio_at_flops"] / k) ** a
    ratio_true = res["ratio_at_flops"] / (k * n_true) / n_true
    assert abs(math.log(p3["ratio"] / ratio_true)) < 0.01
    assert abs(math.log(res["ratio"] / ratio_true)) < 0.25  # its a is off by <= 0.02: the ratio by <= 18%


@pytest.mark.parametrize("alpha,beta", LAWS)
def test_off_centre_noisy_grid(alpha, beta):
    """Sizes moved 0.3 decades up and 0.2% noise on the losses: approach 3 stays within 0.07 of a
    (bench/scaling_fit.py: at most 0.064 over 5 noise draws of each law) with a inside its 95%
    interval; approach 2's bias (Czech et al.) shows where the law is asymmetric."""
    C, N, D, L = law_grid(alpha, beta, shift=0.3, noise=0.002, seed=1)
    res = sc.fit(C, N, D, L, n_boot=200, n_boot3=30)
    a = beta / (alpha + beta)
    p3 = res["approach3"]
    assert abs(p3["a"] - a) < 0.07
    assert p3["ci"]["a"][0] - 0.01 <= a <= p3["ci"]["a"][1] + 0.01
    assert abs(p3["alpha"] - alpha) < 0.05 and abs(p3["beta"] - beta) < 0.1
    if (alpha, beta) == (0.3, 0.6):
        assert res["a"] < a - 0.1  # approach 2 off by > 0.1 (-0.18 measured): why approach 3 is reported too


def test_at_edge_fires_and_says_which_way():
    C, N, D, L = law_grid(0.34, 0.28, n=15)  # sizes 0.1 decade apart
    sizes = np.unique(N)
    small = N <= sizes[3]  # the 4 smallest sizes, 0.3 decades: every budget's optimum lies above them
    res = sc.fit(C[small], N[small], D[small], L[small], n_boot=20, n_boot3=2)
    assert all(p["at_edge"] and p["extend"] == "larger" for p in res["per_budget"])
    text = "\n".join(sc.summary_lines(res))
    assert "AT EDGE" in text and "larger models" in text
    big = N >= sizes[-4]
    res = sc.fit(C[big], N[big], D[big], L[big], n_boot=20, n_boot3=2)
    assert all(p["at_edge"] and p["extend"] == "smaller" for p in res["per_budget"])


def test_recommendation():
    C, N, D, L = law_grid(0.34, 0.28)
    depth = np.round((N / N.min()) ** (1 / 3) * 4)  # a made-up depth ladder, N ~ depth^3
    res = sc.fit(C, N, D, L, depth, target_flops=1e20, n_boot=50, n_boot3=5)
    rec = res["recommendation"]
    a = 0.28 / 0.62
    G = (0.34 * 400 / (0.28 * 2000)) ** (1 / 0.62)
    assert abs(math.log(rec["n_opt"] / (G * (1e20 / 6) ** a))) < 0.15
    assert rec["ratio"] == pytest.approx(rec["d_opt"] / rec["n_opt"])
    law = lambda n, d: 0.8 + 400 / n ** 0.34 + 2000 / d ** 0.28
    assert rec["bpb"] == pytest.approx(law(rec["n_opt"], rec["d_opt"]), rel=0.01)  # approach 3 is the law here
    assert rec["depth"] >= 1 and rec["depth_tokens"] * rec["depth_params"] == pytest.approx(rec["n_opt"] * rec["d_opt"], rel=0.05)


# ---------------------------------------------------------------------------
# CSV formats

def write_grid(path, C, N, D, L, columns=sc.GRID_COLUMNS, extra=None):
    rows = []
    for c, n, d, l in zip(C, N, D, L):
        row = dict(flops_budget=f"{c:g}", depth=int(round(n ** (1 / 3))), model_dim=64, params_wte=1000,
                   params_value_embeds=1000, params_lm_head=int(n * 0.2), params_transformer=int(n * 0.8),
                   params_scalars=10, params_total=int(n) + 2010, num_iterations=100, tokens_trained=int(d),
                   val_bpb=float(l), core_score="", train_time_sec=1.0)
        rows.append(dict(row, **(extra or {})))
    sc.write_csv(str(path), columns, rows)


UPSTREAM_HEADER = ("flops_budget,depth,model_dim,params_wte,params_value_embeds,params_lm_head,params_transformer,"
                   "params_scalars,params_total,num_iterations,tokens_trained,val_bpb,core_score,train_time_sec")


def test_upstream_header_is_read_and_written(tmp_path):
    assert ",".join(sc.GRID_COLUMNS) == UPSTREAM_HEADER
    assert ",".join(sc.SERIES_COLUMNS) == ("depth,model_dim,num_params,num_scaling_params,num_iterations,"
                                           "tokens_trained,param_data_ratio,val_bpb,core_score,train_time_sec")
    C, N, D, L = law_grid(0.34, 0.28, n=5)
    upstream = tmp_path / "upstream.csv"
    write_grid(upstream, C, N, D, L)  # exactly upstream's header, no columns of ours
    assert upstream.read_text().splitlines()[0] == UPSTREAM_HEADER
    ours = tmp_path / "ours.csv"
    write_grid(ours, C, N, D, L, sc.GRID_COLUMNS + sc.EXTRA_COLUMNS, dict(status="ok", run="x", flops=1.0))
    assert ours.read_text().splitlines()[0].startswith(UPSTREAM_HEADER + ",status,run")
    a = sc.grid_points(str(upstream))
    b = sc.grid_points(str(ours))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y)
    np.testing.assert_allclose(a[1], np.floor(N * 0.8) + np.floor(N * 0.2), rtol=1e-6)  # scaling = matrices + lm_head
    assert np.all(sc.grid_points(str(upstream), "total")[1] > a[1])


def test_failed_rows_are_left_out(tmp_path):
    C, N, D, L = law_grid(0.34, 0.28, n=5)
    path = tmp_path / "g.csv"
    write_grid(path, C, N, D, L, sc.GRID_COLUMNS + sc.EXTRA_COLUMNS, dict(status="ok"))
    failed = dict.fromkeys(sc.GRID_COLUMNS + sc.EXTRA_COLUMNS, "")
    failed.update(flops_budget="1e18", depth="9", status="failed", run="C1e18-d9", error="boom, NaN")
    path.write_text(path.read_text() + ",".join(f'"{v}"' if "," in v else v for v in failed.values()) + "\n")
    assert len(sc.grid_points(str(path))[0]) == len(C)


def fit_cli(capsys, *argv):
    rc = cli.main(["scaling", "fit", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fit_command_json_and_pictures(tmp_path, capsys):
    C, N, D, L = law_grid(0.34, 0.28, n=6, noise=0.001)
    path = tmp_path / "g.csv"
    write_grid(path, C, N, D, L)
    rc, out, err = fit_cli(capsys, "--csv", str(path), "--json", "--target-flops", "1e20")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("a", "b", "a_ci", "b_ci", "ratio", "per_budget", "approach3", "recommendation"):
        assert key in res
    assert set(res["per_budget"][0]) >= {"flops", "n_opt", "d_opt", "loss_min", "at_edge"}
    assert set(res["approach3"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert abs(res["a"] - 0.28 / 0.62) < 0.05
    for name in ("isoflop.png", "optima.png", "fit.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("case,message", [
    ("empty", "is empty"),
    ("header_only", "no finished runs"),
    ("one_depth", "fewer than 3 model sizes"),
    ("nan", "val_bpb is 'nan'"),
    ("unknown_column", "unknown column(s) 'lr'"),
    ("series", "a miniseries CSV"),
    ("missing", "no such CSV"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    path = tmp_path / "g.csv"
    C, N, D, L = law_grid(0.34, 0.28, n=5)
    if case == "empty":
        path.write_text("")
    elif case == "header_only":
        path.write_text(UPSTREAM_HEADER + "\n")
    elif case == "one_depth":
        keep = N == N[2]
        write_grid(path, C[keep], N[keep], D[keep], L[keep])
    elif case == "nan":
        L[3] = math.nan
        write_grid(path, C, N, D, L)
    elif case == "unknown_column":
        path.write_text(UPSTREAM_HEADER + ",lr\n")
    elif case == "series":
        path.write_text(",".join(sc.SERIES_COLUMNS) + "\n1,16,100,50,10,1000,20,3.0,,1.0\n")
    rc, out, err = fit_cli(capsys, "--csv", str(path))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanochat scaling fit: error:") and message in lines[0], err


def test_report_section_when_a_report_exists(tmp_path, monkeypatch, capsys):
    from nanochat import report
    from nanochat.scaling_report import analyze
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    C, N, D, L = law_grid(0.34, 0.28, n=5)
    path = tmp_path / "g.csv"
    write_grid(path, C, N, D, L)
    analyze(str(path))
    assert not (tmp_path / "base" / "report" / "scaling-laws.md").exists()  # no report started: none written
    report.get_report().reset()
    analyze(str(path))
    text = (tmp_path / "base" / "report" / "scaling-laws.md").read_text()
    assert text.startswith("## Scaling laws") and "N_opt ~ C^a" in text
    assert text.count("data:image/png;base64,") == 2  # isoFLOP curves and optima (no run folders: no loss curves)
    assert "## Scaling laws" in open(report.get_report().generate(copy_to=None)).read()
