"""Mid-training: mixture composition, the packed conversation loader, and `train mid` end to end
(a few steps from the tiny base checkpoint, saved, resumed exactly)."""
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import checkpoint as ck
from nanochat import metrics
from nanochat.chat_data import DEFAULT_MIXTURES, ConversationLoader, Mixture, default_mixture, parse_mixture
from nanochat.common import UserError


def test_offline_default_mixture_from_shared_data(data_dir):
    spec, why = default_mixture("mid", data_dir)
    assert spec == DEFAULT_MIXTURES[("mid", "offline")] and why.startswith("offline")
    mix = Mixture(spec, "train", data_dir=data_dir)
    table = {label: rows for label, rows, _ in mix.table()}
    # every file of chat/, ARC (both), GSM8K train, identity twice, both spelling tasks; 1% held out
    assert table == {"chat/dolly_hh_sample.jsonl": 990, "chat/sharegpt.jsonl.gz": 10987,
                     "ARC-Easy train": 2229, "ARC-Challenge train": 1108, "GSM8K train": 7399,
                     "Identity x2": 1980, "SimpleSpelling": 4950, "SpellingBee": 4950}
    assert len(mix) == sum(table.values())
    assert abs(sum(share for _, _, share in mix.table()) - 1.0) < 1e-9
    assert "Identity x2" in mix.describe() and "total (train)" in mix.describe()
    val = Mixture(spec, "val", data_dir=data_dir, sources=mix.sources)
    # i % 100 == 99 of each source: dolly, sharegpt, ARC-E, ARC-C, GSM8K, identity x2, spelling x2
    assert len(val) == 10 + 110 + 22 + 11 + 74 + 2 * 10 + 50 + 50
    sft_spec, _ = default_mixture("sft", data_dir)
    assert sft_spec == DEFAULT_MIXTURES[("sft", "offline")]


def test_online_default_when_smoltalk_is_in_the_data_root(tmp_path):
    for repo, subset, split in [("HuggingFaceTB/smol-smoltalk", "default", "train"), ("cais/mmlu", "auxiliary_train", "train")]:
        folder = tmp_path / "tasks" / repo / subset / split
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), folder / "0000.parquet")
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "a.jsonl").write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n')
    spec, why = default_mixture("mid", str(tmp_path))
    assert spec == DEFAULT_MIXTURES[("mid", "online")] and why.startswith("online")
    assert "smoltalk" in spec and "mmlu-aux" in spec
    # without SmolTalk, the chat/ folder decides
    os.remove(tmp_path / "tasks" / "HuggingFaceTB" / "smol-smoltalk" / "default" / "train" / "0000.parquet")
    assert default_mixture("mid", str(tmp_path))[0] == DEFAULT_MIXTURES[("mid", "offline")]


def test_mixture_override_and_parse(data_dir):
    assert parse_mixture("identity*2, spellingbee:500,gsm8k") == [("identity", None, 2), ("spellingbee", 500, 1), ("gsm8k", None, 1)]
    mix = Mixture("gsm8k:250,identity:100*3", "train", data_dir=data_dir)
    assert [(label, rows) for label, rows, _ in mix.table()] == [("GSM8K train", 248), ("Identity x3", 297)]
    val = Mixture("gsm8k:250,identity:100*3", "val", data_dir=data_dir)
    assert len(val) == 2 + 3
    # train and val never share an example
    train_keys = set(mix.index_map)
    assert not train_keys & set(val.index_map)
    # the order is a deterministic shuffle
    assert Mixture("gsm8k:250,identity:100*3", "train", data_dir=data_dir).index_map == mix.index_map
    assert mix.index_map != sorted(mix.index_map)


def test_missing_or_unknown_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    with pytest.raises(UserError, match="chat"):
        Mixture("chat")
    with pytest.raises(UserError, match="smol-smoltalk"):
        Mixture("smoltalk")
    with pytest.raises(UserError, match="unknown source 'nope'"):
        Mixture("nope")
    with pytest.raises(UserError, match="no chat data"):
        default_mixture("mid")
    with pytest.raises(UserError, match="bad repeat"):
        parse_mixture("identity*x")


def test_pack_loader_rows_and_exact_resume(tokenizer, data_dir):
    mix = Mixture("gsm8k:60,identity:60,simplespelling:60", "train", data_dir=data_dir)
    T, B = 64, 3
    loader = ConversationLoader(mix, tokenizer, B, T, mode="pack", buffer_size=20)
    bos = tokenizer.get_bos_token_id()
    stream = []
    for _ in range(4):
        x, y = next(loader)
        assert x.shape == y.shape == (B, T)
        assert (y != -1).all()  # mid-training: every token is a target
        assert loader.last_targets == B * T
        assert torch.equal(x[:, 1:], y[:, :-1])
        stream += x.flatten().tolist()
    assert stream.count(bos) >= 4  # conversations start with BOS
    # every rendered conversation is contiguous in the stream (cut ones continue in the next row)
    state = loader.state_dict()
    after = [next(loader) for _ in range(3)]
    again = ConversationLoader(mix, tokenizer, B, T, mode="pack", buffer_size=20)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, [next(again) for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_pack_loader_strides_ranks(tokenizer, data_dir):
    mix = Mixture("identity:200", "train", data_dir=data_dir)
    r0 = ConversationLoader(mix, tokenizer, 1, 32, mode="pack", rank=0, world_size=2)
    r1 = ConversationLoader(mix, tokenizer, 1, 32, mode="pack", rank=1, world_size=2)
    assert r0.positions == list(range(0, len(mix), 2)) and r1.positions == list(range(1, len(mix), 2))
    assert not torch.equal(next(r0)[0], next(r1)[0])


# ---------------------------------------------------------------------------
# End to end

TINY = ["--device-type", "cpu", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--eval-tokens", "256", "--log-every", "1"]


def metrics_by_step(d):
    return {r["step"]: r for r in metrics.read_metrics(d)}


@pytest.mark.slow
def test_train_mid_end_to_end_and_exact_resume(base_checkpoint, capsys):
    from nanochat.stages import train_mid
    tag = base_checkpoint.tag
    # default mixture (offline: chosen from the shared data), 4 steps, checkpoint at 2 and 4
    assert train_mid.main(TINY + ["--model-tag", tag, "--num-iterations", "4", "--save-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "chat/sharegpt.jsonl.gz" in out and "SpellingBee" in out and "offline" in out
    d = ck.checkpoint_dir("mid", tag)
    assert ck.complete_steps(d) == [2, 4]
    first = metrics_by_step(d)
    assert {"loss", "val_loss", "val_bpb"} <= set(first[4]) and "val_bpb" in first[0]
    weights = torch.load(os.path.join(d, "model_000004.pt"))
    meta = ck.load_meta(d, 4)
    assert meta["source"] == {"stage": "base", "model_tag": tag, "step": base_checkpoint.step}
    assert meta["lrs"]["matrix_lr"] == 0.02  # inherited from train base's defaults
    # resume from step 2: steps 3 and 4 again, identical
    assert train_mid.main(TINY + ["--model-tag", tag, "--num-iterations", "4", "--save-every", "2",
                                  "--resume-from-step", "2"]) == 0
    second = metrics_by_step(d)
    assert sorted(second) == sorted(first)
    for s in (3, 4):
        assert second[s]["loss"] == first[s]["loss"]
    assert second[4]["val_loss"] == first[4]["val_loss"]
    resumed = torch.load(os.path.join(d, "model_000004.pt"))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    # the mid model differs from the base model it started from
    base = torch.load(os.path.join(base_checkpoint.dir, f"model_{base_checkpoint.step:06d}.pt"))
    assert not torch.equal(base["lm_head.weight"], weights["lm_head.weight"])


def test_train_mid_bad_flags(base_checkpoint):
    from nanochat.stages import train_mid
    with pytest.raises(UserError, match="not a multiple"):
        train_mid.main(TINY[:-6] + ["--total-batch-size", "100", "--num-iterations", "1", "--mixture", "identity:50", "--dry-run"])
    with pytest.raises(UserError, match="unknown source"):
        train_mid.main(TINY + ["--mixture", "wikipedia", "--dry-run"])
    with pytest.raises(UserError, match="resume|complete checkpoint"):
        train_mid.main(TINY + ["--model-tag", base_checkpoint.tag, "--mixture", "identity:50",
                               "--resume-from-step", "999", "--num-iterations", "1"])


def torchrun(stage, *args):
    """`nanochat train <stage>` under a real 2-process torchrun (gloo on CPU); its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanochat",
           "train", stage, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_mid_two_processes_and_resume(base_checkpoint):
    """`train mid` under a real 2-process torchrun: each rank packs its own stride of the mixture,
    the optimizer averages the gradients, every rank saves its optimizer shard and loader state,
    rank 0 alone writes the metrics; resumed under torchrun it redoes the later steps exactly.

    (No comparison with one process and gradient accumulation, as test_train_distributed does
    for train base: here rank r packs mixture positions r, r+2, ... into its own rows, so one
    process reading every position packs different rows, and the two runs see different data.)"""
    tag = base_checkpoint.tag
    args = TINY + ["--model-tag", tag, "--mixture", "gsm8k:200,identity:200,simplespelling:100,arc-easy:200",
                   "--num-iterations", "3", "--save-every", "1", "--eval-every", "-1"]
    out = torchrun("mid", *args)
    assert "4 rows x 64 tokens x 2 procs x 1 accum" in out  # 512 tokens per step = 2 ranks' micro-batches
    d = ck.checkpoint_dir("mid", tag)
    assert ck.complete_steps(d) == [1, 2, 3]
    for s in (1, 2, 3):
        assert ck.load_meta(d, s)["world_size"] == 2
        for r in (0, 1):
            shard = ck.load_checkpoint(d, s, load_optimizer=True, rank=r)[1]
            assert shard["extra"]["loader"][0]["rank"] == r and shard["extra"]["loader"][0]["world_size"] == 2
            assert shard["optimizer"]["state"]  # a real optimizer state, not an empty shard
        assert not os.path.exists(os.path.join(d, f"optim_{s:06d}_rank2.pt"))
    shards = [ck.load_checkpoint(d, 3, load_optimizer=True, rank=r)[1] for r in (0, 1)]
    # the two ranks read different conversations (their strides of the mixture) ...
    assert shards[0]["extra"]["loader"][0]["buffer"] != shards[1]["extra"]["loader"][0]["buffer"]
    # ... and each keeps the optimizer state of its own share of the parameters
    states = [[v for st in sh["optimizer"]["state"].values() for v in st.values() if torch.is_tensor(v)] for sh in shards]
    assert len(states[0]) == len(states[1])
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(*states))
    first = metrics.read_metrics(d)
    assert [r["step"] for r in first] == [1, 2, 3]  # one record per step: rank 0 alone writes
    first = {r["step"]: r for r in first}
    assert all(first[s]["trained_tokens"] == 512 for s in (1, 2, 3))  # both ranks' targets, all-reduced
    assert "val_loss" in first[3] and "val_bpb" in first[3]
    w3 = torch.load(os.path.join(d, "model_000003.pt"))
    base = torch.load(os.path.join(base_checkpoint.dir, f"model_{base_checkpoint.step:06d}.pt"))
    assert not torch.equal(base["lm_head.weight"], w3["lm_head.weight"])  # it trained

    out = torchrun("mid", *args, "--resume-from-step", "1")
    assert "resumed from" in out
    second = metrics.read_metrics(d)
    assert [r["step"] for r in second] == [1, 2, 3]
    second = {r["step"]: r for r in second}
    for s in (2, 3):
        assert second[s]["loss"] == first[s]["loss"]
    assert second[3]["val_loss"] == first[3]["val_loss"] and second[3]["val_bpb"] == first[3]["val_bpb"]
    resumed = torch.load(os.path.join(d, "model_000003.pt"))
    assert all(torch.equal(w3[k], resumed[k]) for k in w3)
    # a 2-process checkpoint is not resumed by one process
    from nanochat.stages import train_mid
    with pytest.raises(UserError, match="2 process"):
        train_mid.main(args + ["--resume"])
