"""RL: advantages, the policy-gradient loss and its masks on a constructed batch, and `train rl`
end to end from the sft checkpoint with exact resume."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat import checkpoint as ck
from nanochat import metrics
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages.train_rl import pg_loss, rl_advantages, rl_batch


def test_advantages():
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    adv = rl_advantages(rewards)
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0.25, 0.25, 0.25, -0.75]]))
    adv = rl_advantages(rewards, std_normalize=True)
    # population std: 0.5, 0 (all equal: advantage stays 0, no division by zero), sqrt(3)/4
    s3 = 3 ** 0.5 / 4
    want = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0, 0, 0, 0], [0.25 / s3, 0.25 / s3, 0.25 / s3, -0.75 / s3]])
    assert torch.allclose(adv, want, atol=1e-5)


def test_rl_batch_masks_prompt_and_forced_tokens():
    seqs = [[5, 6, 7, 8, 9], [5, 6, 10]]
    masks = [[0, 0, 1, 0, 1], [0, 0, 1]]  # prompt 5 6; token 8 forced by the tool
    x, y = rl_batch(seqs, masks, pad_id=99)
    assert x.tolist() == [[5, 6, 7, 8], [5, 6, 99, 99]]
    assert y.tolist() == [[-1, 7, -1, 9], [-1, 10, -1, -1]]


def test_pg_loss_on_a_constructed_batch():
    torch.manual_seed(0)
    V = 50
    model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt = [1, 2, 3]
    seqs = [prompt + [4, 5, 6, 7], prompt + [8, 9], prompt + [10, 11, 12], prompt + [13]]
    masks = [[0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 1], [0, 0, 0, 1]]
    rewards = [[1.0, 0.0], [0.0, 0.0]]
    adv = rl_advantages(rewards).reshape(-1)  # 0.5, -0.5, 0, 0
    x, y = rl_batch(seqs, masks, pad_id=0)
    n = int((y != -1).sum())
    assert n == 3 + 2 + 2 + 1
    logprobs = -model(x, y, loss_reduction="none")
    loss = pg_loss(logprobs, y, adv, n)
    # by hand: log-softmax of the logits of each sequence alone, at the sampled positions only
    want = 0.0
    for seq, mk, a in zip(seqs, masks, adv.tolist()):
        logp = F.log_softmax(model(torch.tensor([seq]))[0].double(), dim=-1)
        for t in range(1, len(seq)):
            if mk[t]:
                want += -a * float(logp[t - 1, seq[t]])
    want /= n
    assert abs(float(loss) - want) < 1e-5
    # the zero-advantage group contributes no gradient; a sampled token of sequence 0 does
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    # split into micro-batches, the same total (the count is the whole step's)
    halves = sum(pg_loss(-model(x[i:i + 2], y[i:i + 2], loss_reduction="none"), y[i:i + 2], adv[i:i + 2], n)
                 for i in (0, 2))
    assert abs(float(halves) - float(loss)) < 1e-6


# ---------------------------------------------------------------------------
# End to end

def ensure_sft(tag):
    from nanochat.stages import train_mid, train_sft
    mix = "gsm8k:200,identity:200,arc-easy:200"
    tiny = ["--device-type", "cpu", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
            "--num-iterations", "2", "--eval-tokens", "256", "--mixture", mix, "--model-tag", tag]
    if not ck.complete_steps(ck.checkpoint_dir("mid", tag)):
        assert train_mid.main(tiny) == 0
    if not ck.complete_steps(ck.checkpoint_dir("sft", tag)):
        assert train_sft.main(tiny + ["--chatcore-every", "-1"]) == 0


TINY = ["--device-type", "cpu", "--examples-per-step", "2", "--num-samples", "4", "--max-new-tokens", "12",
        "--device-batch-size", "3", "--max-seq-len", "256", "--eval-every", "-1", "--eval-problems", "2",
        "--eval-samples", "2", "--num-iterations", "4", "--save-every", "2", "--init-lr-frac", "1.0"]


@pytest.mark.slow
def test_train_rl_end_to_end_and_exact_resume(base_checkpoint, monkeypatch, capsys):
    from nanochat.stages import train_rl
    from tasks.gsm8k import GSM8K
    tag = base_checkpoint.tag
    ensure_sft(tag)
    d = ck.checkpoint_dir("rl", tag)
    # 1) the real GSM8K reward (a tiny model scores 0: nothing to learn, but it all runs)
    assert train_rl.main(TINY + ["--model-tag", tag, "--num-iterations", "1", "--eval-every", "1"]) == 0
    rec = {r["step"]: r for r in metrics.read_metrics(d)}
    assert {"reward", "loss", "seq_len", "sampled_tokens"} <= set(rec[1]) and "pass@1" in rec[0] and "pass@2" in rec[1]
    assert ck.load_meta(d, 1)["source"]["stage"] == "sft"
    # 2) a reward the tiny model can earn (even-length answers), so that the steps change the weights;
    # the checker itself is tested with the tasks
    monkeypatch.setattr(GSM8K, "reward", lambda self, conv, response: float(len(response) % 2 == 0))
    assert train_rl.main(TINY + ["--model-tag", tag]) == 0
    assert ck.complete_steps(d) == [2, 4]
    first = {r["step"]: r for r in metrics.read_metrics(d)}
    assert any(0 < first[s]["reward"] < 1 for s in (1, 2, 3, 4))
    assert any(first[s]["loss"] != 0 for s in (1, 2, 3, 4))
    w2 = torch.load(os.path.join(d, "model_000002.pt"))
    w4 = torch.load(os.path.join(d, "model_000004.pt"))
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)
    assert train_rl.main(TINY + ["--model-tag", tag, "--resume-from-step", "2"]) == 0
    second = {r["step"]: r for r in metrics.read_metrics(d)}
    assert sorted(second) == sorted(first)
    for s in (3, 4):
        for k in ("reward", "loss", "seq_len", "sampled_tokens"):
            assert second[s][k] == first[s][k], (s, k)
    resumed = torch.load(os.path.join(d, "model_000004.pt"))
    assert all(torch.equal(w4[k], resumed[k]) for k in w4)
    # the chat evaluation runs on the RL model
    r = subprocess.run([sys.executable, "-m", "nanochat", "eval", "chat", "-i", "rl", "--max-problems", "2",
                        "--max-new-tokens", "8", "--device-type", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ChatCORE" in r.stdout


def test_long_questions_are_swapped_deterministically(tokenizer):
    from nanochat.common import UserError
    from nanochat.stages.train_rl import pick_question
    from tasks.gsm8k import GSM8K
    task = GSM8K(split="train", stop=200)
    order = list(range(len(task)))
    lengths = [len(tokenizer.render_for_completion(task[i])) for i in order]
    T = sorted(lengths)[len(lengths) // 2] + 8  # about half the prompts leave fewer than 8 tokens
    for g in range(40):
        conv, prompt = pick_question(task, order, g, tokenizer, T, 8)
        assert T - len(prompt) >= 8
        assert pick_question(task, order, g, tokenizer, T, 8)[1] == prompt  # same choice every time
        if lengths[g] + 8 <= T:
            assert conv == task[g]  # a question that fits is kept
    with pytest.raises(UserError, match="no GSM8K question"):
        pick_question(task, order, 0, tokenizer, min(lengths) + 3, 8)


def run_rl(*args, procs=2):
    """`nanochat train rl` in a subprocess: a real 2-process torchrun (gloo on CPU), or 1 process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    cmd = [sys.executable, *launch, "-m", "nanochat", "train", "rl", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


ROLLOUT_KEYS = ("reward", "seq_len", "max_seq_len", "sampled_tokens")


@pytest.mark.slow
def test_train_rl_two_processes_and_resume(base_checkpoint):
    """`train rl` under a real 2-process torchrun (gloo on CPU): each rank rolls out its half of
    the step's questions; rewards, lengths and token counts are reduced over the ranks; rank 0
    alone writes the metrics; every rank saves its optimizer shard; resumed exactly under torchrun.

    The tiny model earns no reward on GSM8K (no right `#### N`), so every advantage and gradient
    is 0 and the weights stay the sft ones (a subprocess cannot be given the monkeypatched reward
    of the test above). That makes the rollouts comparable with a 1-process run at every step: the
    sampling seed of a question depends only on its global number, so the two processes together
    must sample exactly what one process samples alone."""
    tag = base_checkpoint.tag
    ensure_sft(tag)
    d = ck.checkpoint_dir("rl", tag)
    # 2 questions x 2 samples per step, up to 48 tokens: completions of different lengths
    args = TINY + ["--model-tag", tag, "--num-samples", "2", "--max-new-tokens", "48"]
    out1 = run_rl(*args, procs=1)
    assert "1 process(es)" in out1
    one = {r["step"]: r for r in metrics.read_metrics(d)}

    out = run_rl(*args)
    assert "2 process(es)" in out and "processes 2" in out
    assert ck.complete_steps(d) == [2, 4]
    for s in (2, 4):
        assert ck.load_meta(d, s)["world_size"] == 2
        for r in (0, 1):
            assert ck.load_checkpoint(d, s, load_optimizer=True, rank=r)[1]["optimizer"]["state"]
        assert not os.path.exists(os.path.join(d, f"optim_{s:06d}_rank2.pt"))
    first = metrics.read_metrics(d)
    assert [r["step"] for r in first] == [1, 2, 3, 4]  # one record per step: rank 0 alone writes
    first = {r["step"]: r for r in first}
    assert "pass@1" in first[4] and "pass@2" in first[4]
    for s in (1, 2, 3, 4):
        assert first[s]["reward"] == 0.0 and first[s]["loss"] == 0.0  # see the docstring
        # both ranks rolled out their question: together exactly the one process's rollouts
        # (sampled tokens, mean and longest completion are reduced over the ranks)
        for k in ROLLOUT_KEYS:
            assert first[s][k] == one[s][k], (s, k)
    sft = ck.checkpoint_dir("sft", tag)
    w_sft = torch.load(os.path.join(sft, f"model_{ck.find_last_step(sft):06d}.pt"))
    w4 = torch.load(os.path.join(d, "model_000004.pt"))
    # no gradient step: each weight is the sft one, or (the AdamW groups with weight decay) the sft
    # one times a factor in (0, 1) that is the same for the whole tensor
    for k in w4:
        a, b = w4[k].double(), w_sft[k].double()
        nz = b != 0
        ratio = a[nz] / b[nz]
        assert (a[~nz] == 0).all() and 0 < ratio.min() <= ratio.max() <= 1, k
        assert ratio.max() - ratio.min() < 1e-5, k
    assert any(torch.equal(w4[k], w_sft[k]) for k in w4)

    out = run_rl(*args, "--resume-from-step", "2")
    assert "resumed from" in out
    second = metrics.read_metrics(d)
    assert [r["step"] for r in second] == [1, 2, 3, 4]
    second = {r["step"]: r for r in second}
    for s in (3, 4):
        for k in ("loss",) + ROLLOUT_KEYS:
            assert second[s][k] == first[s][k], (s, k)
    assert second[4]["pass@1"] == first[4]["pass@1"] and second[4]["pass@2"] == first[4]["pass@2"]
    resumed = torch.load(os.path.join(d, "model_000004.pt"))
    assert all(torch.equal(w4[k], resumed[k]) for k in w4)
    # a 2-process checkpoint is not resumed by one process
    from nanochat.common import UserError
    from nanochat.stages import train_rl
    with pytest.raises(UserError, match="2 process"):
        train_rl.main(args + ["--resume"])
