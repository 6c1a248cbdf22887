"""Training and inference numerics pinned bit for bit against tests/fixtures/numerics.json,
which was produced by the code before the model and the stages were restructured (issue 25).

The values depend on the CPU's kernels, so the fixture records the machine it was made on
(torch version + CPU capability) and the test is skipped elsewhere. Regenerate it, on purpose
only, with `python -m tests.test_numerics` (from the repository root)."""
import hashlib
import json
import os
import sys

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "numerics.json")
# metrics keys that are timings or machine-dependent rates, not numerics
TIMING_KEYS = {"dt", "dt_ms", "tok_per_sec", "mfu", "time", "elapsed", "total_time", "wall", "train_time",
               "tokens_per_sec", "step_time", "sample_time", "eval_time"}


def machine():
    return f"torch {torch.__version__} / {torch.backends.cpu.get_cpu_capability()}"


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tiny_model():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern="SSL", short_window=6)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # signal through every branch (init zeroes the projections and the smear)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, 0.05)
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
    return model


def model_numerics():
    """Three optimizer steps of a tiny GPT (eager, fp32): losses, the first step's gradients and
    the final weights; then the frozen model's prefill and decode logits (CPU inference layout)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model()
        opt = model.setup_optimizer(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.02, scalar_lr=0.1,
                                    weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        losses, grads = [], None
        for step in range(3):
            x = torch.randint(0, 97, (2, 32), generator=g)
            y = torch.randint(0, 97, (2, 32), generator=g)
            loss = model(x, y)
            loss.backward()
            if grads is None:
                grads = digest([p.grad for p in model.parameters()])
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        weights = digest(model.parameters())
        model.freeze()
        with torch.no_grad():
            idx = torch.randint(0, 97, (3, 20), generator=g)
            full = model(idx)
            cache = model.new_kv_cache(3, 32)
            lengths = torch.tensor([20, 13, 7])
            first = model(idx, kv_cache=cache, kv_len=20,
                          logits_positions=(torch.arange(3), lengths - 1))
            cache.lengths.copy_(lengths)
            steps = [first]
            tok = first.argmax(-1, keepdim=True)
            for _ in range(3):
                out = model(tok, kv_cache=cache, kv_len=32, logits_positions=(torch.arange(3), torch.zeros(3, dtype=torch.long)))
                steps.append(out)
                tok = out.argmax(-1, keepdim=True)
        return dict(losses=[repr(v) for v in losses], grads=grads, weights=weights,
                    frozen_logits=digest([full]), decode_logits=digest(steps))
    finally:
        torch.set_num_threads(threads)


def numeric_records(d):
    from nanochat import metrics
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and isinstance(v, (int, float))}
            for r in metrics.read_metrics(d)]


def final_weights(d):
    from nanochat import checkpoint as ck
    step = ck.find_last_step(d)
    state = torch.load(os.path.join(d, f"model_{step:06d}.pt"), map_location="cpu")
    return digest([state[k] for k in sorted(state)])


def pipeline_numerics(tag="numerics"):
    """`train base`, `train mid`, `train sft` and `train rl` of a tiny model, a few steps each:
    every numeric metric and the final weights of each stage."""
    from nanochat import checkpoint as ck
    tiny = ["--device-type", "cpu", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
            "--model-tag", tag]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pipeline(tiny)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for stage in ("base", "mid", "sft", "rl"):
        d = ck.checkpoint_dir(stage, tag)
        out[stage] = dict(metrics=numeric_records(d), weights=final_weights(d))
    return out


def run_pipeline(tiny):
    from nanochat.stages import train_base, train_mid, train_rl, train_sft
    from tasks.gsm8k import GSM8K
    assert train_base.main(tiny + ["--depth", "2", "--num-iterations", "4", "--eval-every", "2", "--eval-tokens", "512",
                                   "--core-metric-every", "-1", "--sample-every", "-1"]) == 0
    mix = "gsm8k:200,identity:200,arc-easy:200"
    chat = tiny + ["--num-iterations", "3", "--eval-tokens", "256", "--mixture", mix]
    assert train_mid.main(chat) == 0
    assert train_sft.main(chat + ["--chatcore-every", "-1"]) == 0
    real = GSM8K.reward
    GSM8K.reward = lambda self, conv, response: float(len(response) % 2 == 0)
    try:
        assert train_rl.main(["--device-type", "cpu", "--examples-per-step", "2", "--num-samples", "4",
                              "--max-new-tokens", "12", "--device-batch-size", "3", "--max-seq-len", "256",
                              "--eval-every", "2", "--eval-problems", "2", "--eval-samples", "2",
                              "--num-iterations", "3", "--init-lr-frac", "1.0"] + tiny[-2:]) == 0
    finally:
        GSM8K.reward = real


def load_fixture():
    with open(FIXTURE) as f:
        fixture = json.load(f)
    if fixture["machine"] != machine():
        pytest.skip(f"fixture made on {fixture['machine']}, this is {machine()} (regenerate: python -m tests.test_numerics)")
    return fixture


def test_model_training_and_inference_numerics_are_pinned():
    assert model_numerics() == load_fixture()["model"]


@pytest.mark.slow
def test_pipeline_numerics_are_pinned(tokenizer):
    fixture = load_fixture()
    got = pipeline_numerics()
    for stage, want in fixture["pipeline"].items():
        assert got[stage]["metrics"] == want["metrics"], stage
        assert got[stage]["weights"] == want["weights"], stage


if __name__ == "__main__":  # regenerate the fixture (its own base dir, the shared tokenizer setup)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tests.conftest as conftest  # sets NANOCHAT_BASE_DIR, NANOCHAT_DATA, the fp32 dtype
    conftest.tokenizer.__wrapped__(conftest.data_dir.__wrapped__())
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    result = dict(machine=machine(), model=model_numerics(), pipeline=pipeline_numerics())
    with open(FIXTURE, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
