"""`nanochat train rl`: on-policy reinforcement learning on GSM8K train.

    nanochat train rl                                    # from the latest sft checkpoint
    torchrun --nproc_per_node=8 -m nanochat train rl
    nanochat train rl --examples-per-step 2 --num-samples 4 --max-new-tokens 32 \\
        --num-iterations 4 --eval-every -1 --eval-problems 4   # tiny, CPU, seconds

Each step takes --examples-per-step questions (split over the processes); for each one the
Engine samples --num-samples completions (calculator calls are executed, their outputs forced
into the text). Reward = 1 if the completion's `#### N` is right, else 0. Advantage = reward -
the mean reward of the question's group (divided by the group's std + 1e-6 with
--std-normalize). Loss = -sum(advantage x log-prob) over the SAMPLED tokens only (prompt and
tool-output tokens are masked), divided by the number of sampled tokens in the step. So a group
whose samples all score the same teaches nothing. Learning rates: the source's x --init-lr-frac
(0.05), decaying linearly to 0. pass@1 / pass@k on GSM8K test every --eval-every steps.
Output: checkpoints/rl/<tag> (docs/chat_training.md).
"""
import argparse
import random

import torch

from nanochat import checkpoint as ck
from nanochat import models
from nanochat.chat_eval import generative_outcomes, pick_problems
from nanochat.common import (UserError, autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             gc_step, print0)
from nanochat.engine import Engine
from nanochat.run import ResumeState, Run, check_horizon, resolve_source
from nanochat.flags import add_lr_flags, add_training_flags, check_common_args
from nanochat.hparams import inherited_lrs, set_lrs
from nanochat.training import StepLog, announce_start, clear_grads, format_time, global_max, global_sum, is_due
from tasks.gsm8k import GSM8K


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat train rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(p, "rl", ["sft", "mid", "base"], device_batch_size=8, total_batch_size=None,
                       eval_every=60, save_every=60)
    add_lr_flags(p, init_lr_frac=0.05)
    g = p.add_argument_group("rollouts")
    g.add_argument("--examples-per-step", type=int, default=16, help="questions per step over all processes (default 16)")
    g.add_argument("--num-samples", type=int, default=16, help="completions sampled per question (default 16)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest completion (default 256)")
    g.add_argument("--max-seq-len", type=int, default=-1, help="longest prompt + completion (default -1: the model's context)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (default 50; 0 = all)")
    g.add_argument("--std-normalize", action="store_true", help="divide advantages by the group's reward std + eps")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-problems", type=int, default=400, help="GSM8K test problems per evaluation (default 400)")
    g.add_argument("--eval-samples", type=int, default=8, help="k of pass@k: samples per test problem (default 8)")
    return p


# ---------------------------------------------------------------------------
# The policy-gradient objective


def rl_advantages(rewards, std_normalize=False, eps=1e-6):
    """rewards (G, K) for G questions x K samples -> advantages: reward - the group's mean,
    divided by the group's (population) std + eps when std_normalize."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    adv = rewards - rewards.mean(dim=-1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return adv


def pg_loss(logprobs, targets, advantages, num_tokens, world_size=1):
    """Policy-gradient loss of a micro-batch: -(advantage x logprob) summed over the sampled tokens
    (targets != -1: prompt and forced tool-output tokens are -1), divided by the number of sampled
    tokens of the whole step (all micro-batches and ranks; times world_size as the optimizer
    averages over ranks). logprobs, targets (B, T); advantages (B,)."""
    valid = (targets != -1).to(logprobs.dtype)
    objective = (logprobs * valid * advantages.to(logprobs.dtype)[:, None]).sum()
    return -objective * (world_size / max(1, num_tokens))


def rl_batch(sequences, masks, pad_id):
    """Token lists (prompt + completion) and their masks (1 = sampled) -> (inputs, targets) (N, L-1)
    right-padded: inputs padded with pad_id, targets -1 wherever the next token was not sampled."""
    L = max(len(s) for s in sequences)
    inputs = torch.full((len(sequences), L - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), L - 1), -1, dtype=torch.long)
    for i, (seq, m) in enumerate(zip(sequences, masks)):
        ids = torch.tensor(seq, dtype=torch.long)
        mk = torch.tensor(m, dtype=torch.bool)
        n = len(seq) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = torch.where(mk[1:], ids[1:], torch.full_like(ids[1:], -1))
    return inputs, targets


# ---------------------------------------------------------------------------
# Rollouts and evaluation


def pick_question(task, order, g, tokenizer, max_seq_len, need):
    """(conversation, prompt ids) of global example g. A question whose prompt leaves fewer than
    `need` tokens to answer in the context is swapped for another, chosen deterministically from g
    (so resume stays exact)."""
    for k in range(len(order)):
        conv = task[order[(g + k * 7919) % len(order)]]
        prompt = tokenizer.render_for_completion(conv)
        if max_seq_len - len(prompt) >= need:
            return conv, prompt
    raise UserError(f"no GSM8K question leaves {need} tokens to answer in --max-seq-len {max_seq_len}")


def sample_group(engine, prompt, num_samples, max_tokens, args, seed):
    """num_samples completions of one prompt (Engine.generate_batch): (sequences, masks,
    completions), the sequences being prompt + completion (+ the stop token when the model
    sampled one: it is trained on like any other), masks 1 exactly on the sampled tokens (0 on
    the prompt and on forced tool-output tokens), completions without the stop token."""
    seqs, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                        temperature=args.temperature, top_k=top_k_arg(args), seed=seed, keep_stop=True)
    stop = engine.tokenizer.stop_ids()
    completions = [s[len(prompt):-1] if len(s) > len(prompt) and s[-1] in stop and m[-1] else s[len(prompt):]
                   for s, m in zip(seqs, masks)]
    return seqs, masks, completions


def pass_at_k(engine, task, problems, args, max_seq_len, device):
    """(pass@1, pass@k) of eval chat's generative runner over task[problems] (this rank's share;
    counts summed over ranks): pass@1 = mean fraction of right samples, pass@k = fraction of
    problems with a right sample."""
    outcomes = generative_outcomes(engine, task, problems, args.eval_samples, args.max_new_tokens, args.temperature,
                                   top_k_arg(args), seed=args.seed, chunk=max(1, len(problems)), max_len=max_seq_len)
    n = global_sum(len(outcomes), device)
    right = global_sum(sum(sum(o) / len(o) for o in outcomes), device)
    return right / max(1, n), global_sum(sum(any(o) for o in outcomes), device) / max(1, n)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_common_args(args)
    for name in ("examples_per_step", "num_samples", "max_new_tokens", "eval_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    device_type = args.device_type or autodetect_device_type()
    is_dist, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    try:
        return train(args, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, rank, world_size, device):
    """Plan, build (the model from the source or the resumed checkpoint), loop."""
    if args.examples_per_step % world_size:
        raise UserError(f"--examples-per-step {args.examples_per_step} must be a multiple of the number of "
                        f"processes ({world_size})")
    src_dir, src_step, model_tag, out_dir = resolve_source(args, "rl")
    run = Run(out_dir, args, world_size, rank)
    load_dir, load_step = (out_dir, run.resume_step) if run.resume_step is not None else (src_dir, src_step)
    model, tokenizer, load_meta = models.build_model(load_dir, load_step, device, phase="train")
    model_config = load_meta["model_config"]
    max_seq_len = args.max_seq_len if args.max_seq_len > 0 else model_config["sequence_len"]
    train_task = GSM8K("main", "train")
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, int(args.num_epochs * len(train_task)) // args.examples_per_step)
    check_horizon(run.resume_step, num_iterations)
    lrs = inherited_lrs(ck.load_meta(src_dir, src_step), args)
    plan = (f"{num_iterations} steps x {args.examples_per_step} GSM8K questions x {args.num_samples} samples "
            f"(of {len(train_task):,} questions); {world_size} process(es)")
    derived = announce_start(args, model_tag, src_step, out_dir, lrs, world_size, plan, num_iterations=num_iterations,
                             max_seq_len=max_seq_len, train_questions=len(train_task))
    if args.dry_run:
        return 0
    meta = dict(model_config=model_config, user_config=dict(vars(args)), derived=derived, lrs=lrs,
                source=dict(stage=args.source, model_tag=model_tag, step=src_step))
    return loop(args, run, model, tokenizer, train_task, meta)


def top_k_arg(args):
    return args.top_k if args.top_k > 0 else None


def rollouts(args, engine, task, order, step, run):
    """This rank's questions of `step` (a fixed slice of the shuffled order), --num-samples
    completions each: (sequences, masks, rewards (questions x samples), completion lengths)."""
    tokenizer = engine.tokenizer
    max_seq_len = args.max_seq_len if args.max_seq_len > 0 else engine.model.config.sequence_len
    per_rank = args.examples_per_step // run.world_size
    sequences, masks, rewards, gen_lens = [], [], [], []
    for j in range(per_rank):
        g = step * args.examples_per_step + run.rank * per_rank + j  # global example number
        conv, prompt = pick_question(task, order, g, tokenizer, max_seq_len, min(args.max_new_tokens, 32))
        max_tokens = min(args.max_new_tokens, max_seq_len - len(prompt))
        seqs, mks, comps = sample_group(engine, prompt, args.num_samples, max_tokens, args, seed=args.seed * 1_000_003 + g)
        sequences += seqs
        masks += mks
        rewards.append([task.reward(conv, tokenizer.decode(c)) for c in comps])
        gen_lens += [len(s) - len(prompt) for s in seqs]
    return sequences, masks, rewards, gen_lens


def loop(args, run, model, tokenizer, train_task, meta):
    derived, device, world_size = meta["derived"], model.get_device(), run.world_size
    n, max_seq_len = derived["num_iterations"], derived["max_seq_len"]
    optimizer = model.setup_optimizer(weight_decay=args.weight_decay, **derived["lrs"])
    log = StepLog(device, 1, n)
    # the data position and the sampling seeds are functions of the step: no loader to restore
    run.begin(ResumeState(model, optimizer, [], log), n, "nanochat-rl", meta)
    engine = Engine(model, tokenizer)
    val_task = GSM8K("main", "test")
    order = list(range(len(train_task)))
    random.Random(args.seed).shuffle(order)  # the same order every epoch; step s uses a fixed slice of it
    eval_problems = pick_problems(len(val_task), args.eval_problems)[run.rank::world_size]
    last_pass = None

    def evaluate(step, last):
        nonlocal last_pass
        if not is_due(step, args.eval_every, last, at_start=True):
            return {}
        model.eval()
        with autocast_ctx(device):
            last_pass = pass_at_k(engine, val_task, eval_problems, args, max_seq_len, device)
        model.train()
        print0(f"step {step:05d}/{n:05d} | GSM8K test pass@1 {last_pass[0]:.4f} | pass@{args.eval_samples} {last_pass[1]:.4f}")
        return {"pass@1": last_pass[0], f"pass@{args.eval_samples}": last_pass[1]}

    step, record = run.start_step, None
    while not run.boundary(step, record, evaluate):
        log.begin_step()
        model.eval()
        with autocast_ctx(device):
            sequences, masks, rewards, gen_lens = rollouts(args, engine, train_task, order, step, run)
        model.train()
        adv = rl_advantages(rewards, args.std_normalize).reshape(-1)  # (questions * num_samples,)
        # --- policy gradient, micro-batches of --device-batch-size sequences
        lrm = 1.0 - step / n
        set_lrs(optimizer, lrm)
        inputs, targets = rl_batch(sequences, masks, tokenizer.get_bos_token_id())
        num_tokens = int(global_sum(int((targets != -1).sum()), device))
        loss_total = 0.0
        for s in range(0, len(sequences), args.device_batch_size):
            x = inputs[s:s + args.device_batch_size].to(device)
            y = targets[s:s + args.device_batch_size].to(device)
            with autocast_ctx(device):
                logprobs = -model(x, y, loss_reduction="none")
            loss = pg_loss(logprobs.float(), y, adv[s:s + args.device_batch_size].to(device), num_tokens, world_size)
            loss.backward()
            loss_total += float(loss.detach()) / world_size
        if num_tokens > 0:
            optimizer.step()
        clear_grads(model)
        step += 1
        gc_step(step - run.start_step)  # after the first step: the collector frozen and off (upstream)
        n_all = global_sum(len(gen_lens), device)
        reward = global_sum(sum(map(sum, rewards)), device) / max(1, n_all)
        mean_len = global_sum(sum(gen_lens), device) / max(1, n_all)
        max_len = global_max(max(gen_lens), device)  # the longest completion of the step over all ranks
        loss_total = global_sum(loss_total, device)
        log.end_step(loss_total)
        record = None
        if log.due(step, args.log_every):
            dt = log.lap()
            print0(f"step {step:05d}/{n:05d} | reward {reward:.4f} | loss {loss_total:+.5f} | "
                   f"completion len {mean_len:.1f} (max {max_len}) | sampled tokens {num_tokens:,} | lrm {lrm:.3f} | "
                   f"dt {dt:.2f}s | eta {format_time(dt * (n - step))}")
            record = dict(step=step, reward=reward, loss=loss_total, seq_len=mean_len, max_seq_len=max_len,
                          sampled_tokens=num_tokens, lrm=lrm, dt=dt, total_time=log.total_time)
    summary = {"model tag": derived["model_tag"], "source": derived["source"], "steps": n,
               "questions per step": args.examples_per_step, "samples per question": args.num_samples,
               "training time (min)": round(log.total_time / 60, 2), "processes": world_size}
    if last_pass is not None:
        summary["GSM8K pass@1"], summary[f"GSM8K pass@{args.eval_samples}"] = last_pass
    run.finish("Chat RL", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
