"""SFT: padded best-fit packing (masks, whole answers, padding), the NaN guard and token-count
gradient accumulation, and `train sft` end to end from the mid checkpoint with exact resume."""
import os
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint as ck
from nanochat import metrics
from nanochat.chat_data import ConversationLoader, Mixture
from nanochat.chat_train import token_normalized_loss
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig

MIX = "gsm8k:40,identity:40,simplespelling:40,spellingbee:40,arc-easy:40"
TRAIN_MIX = "gsm8k:200,identity:200,simplespelling:100,spellingbee:100,arc-easy:200"  # 200 -> 2 held out each


def test_pad_packing_whole_conversations_masks_and_padding(tokenizer, data_dir):
    mix = Mixture(MIX, "train", data_dir=data_dir)
    T = 160
    bos = tokenizer.get_bos_token_id()
    user_start = tokenizer.encode_special("<|user_start|>")
    rendered = [tokenizer.render_conversation(mix[i], max_tokens=T + 1) for i in range(len(mix))]
    unseen = {}
    for ids, mask in rendered:
        unseen.setdefault(tuple(ids[:12]), []).append((ids, mask))
    never_targets = {tokenizer.encode_special(n) for n in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                              "<|assistant_start|>", "<|output_start|>", "<|output_end|>")}
    loader = ConversationLoader(mix, tokenizer, 1, T, mode="pad", loop=False, buffer_size=16)
    rows = padded_rows = truncated = 0
    for x, y in loader:
        assert loader.last_targets == int((y != -1).sum())  # counted on the host, for the training loop
        x, y = x[0].tolist(), y[0].tolist()
        rows += 1
        assert not never_targets & set(t for t in y if t != -1)
        p = 0
        while p < T and x[p] == bos and p + 1 < T and x[p + 1] == user_start:
            # a conversation starts here: find which one, check it is whole and its targets
            cands = unseen.get(tuple((x + [None])[p:p + 12]), [])
            match = None
            for k, (ids, mask) in enumerate(cands):
                n = min(len(ids), T - p)
                if x[p:p + n] == ids[:n] and p + len(ids) <= T + 1:
                    match = cands.pop(k)
                    break
            assert match is not None, f"row {rows}: tokens at {p} are not a whole conversation of the mixture"
            ids, mask = match
            truncated += len(ids) == T + 1
            for j in range(1, len(ids)):
                assert y[p + j - 1] == (ids[j] if mask[j] else -1)
            p += len(ids)
        # the rest of the row is padding: BOS in, -1 out
        assert all(t == bos for t in x[p:]) and all(t == -1 for t in y[p:])
        padded_rows += p < T
    assert rows > 0 and padded_rows > 0
    assert sum(len(v) for v in unseen.values()) == 0, "every conversation of the pass lands in exactly one row"
    assert rows < len(mix)  # several conversations share a row


def test_pad_loader_exact_resume(tokenizer, data_dir):
    mix = Mixture(MIX, "train", data_dir=data_dir)
    a = ConversationLoader(mix, tokenizer, 2, 96, mode="pad", buffer_size=10)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(4)]
    b = ConversationLoader(mix, tokenizer, 2, 96, mode="pad", buffer_size=10)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, [next(b) for _ in range(4)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def tiny_model(vocab):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # the output projections start at 0; give them weights so every grad is non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_nan_guard_all_masked_micro_batch(tokenizer):
    V = tokenizer.get_vocab_size()
    model = tiny_model(V)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2, 16), generator=g)
    masked = torch.full((2, 16), -1)
    loss, loss_sum = token_normalized_loss(model, x, masked, num_tokens=0)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0 and float(loss_sum) == 0.0
    loss.backward()
    assert all(float(v.abs().max()) == 0.0 for v in grads(model).values())
    # accumulated with a real micro-batch, it contributes nothing
    y = torch.randint(0, V, (2, 16), generator=g)
    y[:, :5] = -1
    n = int((y != -1).sum())
    model.zero_grad()
    token_normalized_loss(model, x, y, n)[0].backward()
    alone = grads(model)
    model.zero_grad()
    token_normalized_loss(model, x, y, n)[0].backward()
    token_normalized_loss(model, x, masked, n)[0].backward()
    for k, v in grads(model).items():
        assert torch.equal(v, alone[k]), k


def test_accumulation_counts_tokens_across_micro_batches(tokenizer):
    """Two micro-batches with 3 and 25 targets give the gradient of the mean over all 28 targets
    (not the mean of the two means)."""
    V = tokenizer.get_vocab_size()
    model = tiny_model(V)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (2, 16), generator=g)
    y = torch.randint(0, V, (2, 16), generator=g)
    y1, y2 = y.clone(), y.clone()
    y1[1:] = -1
    y1[0, 3:] = -1   # 3 targets in micro-batch 1 (row 0)
    y2[0] = -1
    y2[1, :7] = -1   # 9 targets in micro-batch 2 (row 1)
    both = torch.where(y1 != -1, y1, y2)
    n = int((both != -1).sum())
    assert n == 3 + 9
    model.zero_grad()
    model(x, both).backward()  # mean over the 12 targets in one batch
    want = grads(model)
    model.zero_grad()
    for yy in (y1, y2):
        token_normalized_loss(model, x, yy, n)[0].backward()
    for k, v in grads(model).items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=1e-4), k


# ---------------------------------------------------------------------------
# End to end

TINY = ["--device-type", "cpu", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--eval-tokens", "256", "--mixture", TRAIN_MIX]


def ensure_mid(tag):
    """A mid checkpoint for the tiny base model (test_train_mid's run, or a 2-step one)."""
    from nanochat.stages import train_mid
    if not ck.complete_steps(ck.checkpoint_dir("mid", tag)):
        assert train_mid.main(["--device-type", "cpu", "--max-seq-len", "64", "--device-batch-size", "4",
                               "--total-batch-size", "256", "--num-iterations", "2", "--eval-tokens", "256",
                               "--mixture", TRAIN_MIX, "--model-tag", tag]) == 0


@pytest.mark.slow
def test_train_sft_end_to_end_exact_resume_and_eval_chat(base_checkpoint, capsys):
    from nanochat.stages import train_sft
    tag = base_checkpoint.tag
    ensure_mid(tag)
    args = TINY + ["--model-tag", tag, "--num-iterations", "4", "--save-every", "2", "--chatcore-every", "2",
                   "--chatcore-tasks", "ARC-Easy,SpellingBee", "--chatcore-max-problems", "2", "--chatcore-max-new-tokens", "8"]
    assert train_sft.main(args) == 0
    out = capsys.readouterr().out
    assert "from mid/" in out and "ChatCORE" in out
    d = ck.checkpoint_dir("sft", tag)
    assert ck.complete_steps(d) == [2, 4]
    first = {r["step"]: r for r in metrics.read_metrics(d)}
    assert "val_loss" in first[0] and "chatcore" in first[2] and "acc_ARC-Easy" in first[4]
    assert all(0 < first[s]["trained_tokens"] < 512 for s in (1, 2, 3, 4))  # user turns and padding masked
    meta = ck.load_meta(d, 4)
    mid_meta = ck.load_meta(ck.checkpoint_dir("mid", tag), ck.find_last_step(ck.checkpoint_dir("mid", tag)))
    assert meta["source"]["stage"] == "mid"
    assert meta["derived"]["lrs"]["matrix_lr"] == pytest.approx(0.02 * mid_meta["lrs"]["matrix_lr"])
    weights = torch.load(os.path.join(d, "model_000004.pt"))
    assert train_sft.main(args + ["--resume"]) == 0  # already at the end: nothing to do
    assert train_sft.main(args + ["--resume-from-step", "2"]) == 0
    second = {r["step"]: r for r in metrics.read_metrics(d)}
    assert sorted(second) == sorted(first)
    for s in (3, 4):
        assert second[s]["loss"] == first[s]["loss"]
    assert second[4]["val_loss"] == first[4]["val_loss"]
    resumed = torch.load(os.path.join(d, "model_000004.pt"))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    # the chat evaluation runs on the result (all six tasks, 2 problems each)
    r = subprocess.run([sys.executable, "-m", "nanochat", "eval", "chat", "-i", "sft", "--max-problems", "2",
                        "--max-new-tokens", "8", "--device-type", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ChatCORE" in r.stdout and "GSM8K" in r.stdout


def test_train_sft_from_base_dry_run(base_checkpoint, capsys):
    from nanochat.stages import train_sft
    assert train_sft.main(TINY + ["-i", "base", "--model-tag", base_checkpoint.tag, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "from base/" in out and "inherited x 0.02" in out
    with pytest.raises(UserError, match="init-lr-frac"):
        train_sft.main(TINY + ["-i", "base", "--init-lr-frac", "0", "--dry-run"])


def _torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanochat",
           "train", "sft", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_sft_two_processes_and_resume(base_checkpoint):
    """A real 2-process torchrun (gloo): data strided by rank, token counts summed over ranks,
    gradients averaged by the optimizer; resumed exactly under torchrun too."""
    tag = base_checkpoint.tag
    ensure_mid(tag)
    args = TINY + ["--model-tag", tag, "--num-iterations", "3", "--save-every", "1", "--chatcore-every", "-1",
                   "--eval-every", "-1"]
    out = _torchrun(*args)
    assert "x 2 procs" in out
    d = ck.checkpoint_dir("sft", tag)
    assert ck.complete_steps(d) == [1, 2, 3] and ck.load_meta(d, 3)["world_size"] == 2
    first = {r["step"]: r for r in metrics.read_metrics(d)}
    w3 = torch.load(os.path.join(d, "model_000003.pt"))
    _torchrun(*args, "--resume-from-step", "1")
    second = {r["step"]: r for r in metrics.read_metrics(d)}
    for s in (2, 3):
        assert second[s]["loss"] == first[s]["loss"]
    resumed = torch.load(os.path.join(d, "model_000003.pt"))
    assert all(torch.equal(w3[k], resumed[k]) for k in w3)
    with pytest.raises(UserError, match="2 process"):
        from nanochat.stages import train_sft
        train_sft.main(args + ["--resume"])


def test_sft_default_batch_and_schedule():
    """The defaults measured in docs/chat_training.md: 32,768 tokens per step, init-lr-frac 0.02,
    linear decay over the whole run; and they fit 1 and 8 processes at T = 2,048 (whole steps)."""
    from nanochat.stages import train_sft
    args = train_sft.build_parser().parse_args([])
    assert (args.total_batch_size, args.device_batch_size) == (32768, 2)
    assert (args.init_lr_frac, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac) == (0.02, 0.0, 1.0, 0.0)
    for procs in (1, 2, 4, 8):
        per_fwdbwd = args.device_batch_size * 2048 * procs
        assert args.total_batch_size % per_fwdbwd == 0, procs
    assert args.total_batch_size // (args.device_batch_size * 2048) == 8  # 8 micro-batches on one GPU
