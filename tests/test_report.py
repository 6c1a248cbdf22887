import json
import os
import re

from nanochat.report import Report


def test_report_card(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    rep = Report(str(base / "report"))
    rep.reset()
    header = (base / "report" / "header.md").read_text()
    for key in ["git commit", "CPU cores", "RAM (GiB)", "torch", "GPUs", "estimated cost per hour", "lines", "dependencies"]:
        assert key in header
    rep.log("Base model training", [{"depth": 4, "final val bpb": 1.234}])
    rep.log("Base model evaluation", {"CORE": 0.0123})
    rep.log("Chat evaluation sft", {"ARC-Easy": 0.31, "GSM8K": 0.02, "ChatCORE": 0.05})
    rep.log("Chat evaluation rl", {"GSM8K": 0.04})
    ckpt = base / "checkpoints" / "base" / "d4"
    ckpt.mkdir(parents=True)
    with open(ckpt / "metrics.jsonl", "w") as f:
        for s in range(10):
            f.write(json.dumps({"step": s, "loss": 5 - s * 0.1, **({"val_bpb": 2 - s * 0.05} if s % 3 == 0 else {})}) + "\n")
        f.write('{"step": 10, "lo')  # a torn last line is ignored
    out = tmp_path / "cwd"
    out.mkdir()
    path = rep.generate(copy_to=str(out))
    text = open(path).read()
    assert (out / "report.md").read_text() == text
    # sections in pipeline order, then the summary table
    assert text.index("## Base model training") < text.index("## Base model evaluation") < text.index("## Summary")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert rows["CORE"] == ["0.0123", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.3100", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.0200", "0.0400"]
    assert rows["ChatCORE"] == ["-", "-", "0.0500", "-"]
    assert rows["HumanEval"] == ["-"] * 4
    assert re.search(r"Total wall clock time: \d+h\d\dm \(\d[\d,]*s\)", text)
    assert re.search(r"!\[Training loss\]\(data:image/png;base64,[A-Za-z0-9+/=]{100,}\)", text)
    assert "Validation bits per byte" in text
    assert os.path.exists(base / "report" / "loss.png")


def test_report_cli(tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "b"))
    r = subprocess.run([sys.executable, "-m", "nanochat", "report", "reset"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "nanochat", "report", "generate"], env=env, capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "## Summary" in (tmp_path / "report.md").read_text()
