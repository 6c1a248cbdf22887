"""The lifecycle of a training run, shared by `train base`, `mid`, `sft` and `rl`: which step it
resumes from, the state a resume restores (declared once, in ResumeState), the step boundary in
its one correct order, metrics.jsonl, wandb and the summary. A stage plans, builds, then loops:

    run = Run(ckpt_dir, args, world_size, rank)         # resolves --resume / --resume-from-step
    ... build the model, optimizer, loaders ...
    run.begin(ResumeState(model, optimizer, loaders, log), num_iterations, project, meta)
    step, record = run.start_step, None
    while not run.boundary(step, record, evaluate):   # save -> evaluate -> record -> annotate
        ... one optimizer step, written out in the stage ...
        step += 1
        record = log.line(...) if log.due(step, args.log_every) else None
    run.finish(section, summary)

Every step appears once in metrics.jsonl, also across a kill and a resume: a checkpoint keeps
its step's train record until the record is written (docs/training.md, "Exact resume").
"""
from dataclasses import dataclass, field

import torch

from nanochat import checkpoint as ck
from nanochat import metrics
from nanochat.common import UserError, init_wandb, print0
from nanochat.metrics import read_metrics, trim_metrics
from nanochat.report import get_report
from nanochat.training import StepLog, is_due


# ---------------------------------------------------------------------------
# Resume resolution


def resolve_resume(ckpt_dir, args, world_size):
    """(resume_step, meta) for --resume / --resume-from-step in `ckpt_dir`, or (None, None) for a
    fresh run. UserError when there is nothing to resume or it was saved by another number of
    processes."""
    if not (args.resume or args.resume_from_step is not None):
        return None, None
    steps = ck.complete_steps(ckpt_dir)
    if not steps:
        raise UserError(f"nothing to resume: no complete checkpoint in {ckpt_dir} "
                        f"(train without --resume first, or check --model-tag)")
    step = steps[-1] if args.resume else args.resume_from_step
    if step not in steps:
        raise UserError(f"no complete checkpoint for step {step} in {ckpt_dir}; "
                        f"complete steps: {', '.join(map(str, steps))}")
    meta = ck.load_meta(ckpt_dir, step, require=("model_config", "loop"))
    if meta.get("world_size", 1) != world_size:
        raise UserError(f"the checkpoint was saved by {meta.get('world_size')} process(es); "
                        f"resume with the same number (now {world_size})")
    saved = meta.get("threads")
    if saved and saved != torch.get_num_threads():
        # CPU kernels split their sums by thread: another count rounds otherwise and would drift
        print0(f"resume: {saved} CPU threads per process, as the checkpointed run (not {torch.get_num_threads()})")
        torch.set_num_threads(saved)
    return step, meta


def evaluated_before(ckpt_dir, resume_step) -> bool:
    """Did the interrupted run finish the evaluations at the step it is resumed from? (Their
    record is in metrics.jsonl.) A checkpoint is saved before its step's evaluations, so a run
    stopped while they ran resumes at that step with them still to do."""
    return resume_step is not None and any(r.get("step") == resume_step for r in read_metrics(ckpt_dir))


def check_horizon(resume_step, num_iterations):
    if resume_step is not None and resume_step > num_iterations:
        raise UserError(f"the checkpoint is at step {resume_step}, past --num-iterations {num_iterations}")


def saved_architecture(model_config, meta):
    """The model config to resume with: the checkpoint's, once the flags' config agrees with it
    (it may hold more, e.g. a short window given then and not now)."""
    saved = meta["model_config"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in model_config.items() if saved.get(k) != v]
    if diffs:
        raise UserError("the architecture flags differ from the checkpoint's: " + "; ".join(diffs))
    return dict(saved)


def resolve_source(args, stage):
    """Where a mid/sft/rl run starts: (source dir, source step, model tag, this stage's dir for the
    same tag)."""
    src_dir, model_tag, src_step = ck.resolve_checkpoint(args.source, args.model_tag, args.step)
    return src_dir, src_step, model_tag, ck.checkpoint_dir(stage, model_tag)


def begin_run(ckpt_dir, resume_step, master=True):
    """The last thing a training stage does before its loop, once the resumed state has loaded
    and been checked (so that a refused resume changes nothing on disk): a resumed run cuts
    metrics.jsonl back to its step, a fresh one clears the tag. Only the master touches files."""
    if resume_step is None:
        if master:
            ck.clear_tag(ckpt_dir)
        return
    if master:
        trim_metrics(ckpt_dir, resume_step)
        ck.remove_temp_files(ckpt_dir)  # torn files of the killed run's last, unfinished save
    print0(f"resumed from {ckpt_dir} step {resume_step}")


# ---------------------------------------------------------------------------
# The run


@dataclass
class ResumeState:
    """Everything a checkpoint restores besides the weights' meta: the (uncompiled) model, the
    optimizer (its shard on each rank), this rank's data loaders (none where the data position is
    a function of the step), the step log; the RNG states come with every shard. A stage whose
    loop prefetches the next batch marks the data position a save should record (mark_data)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loaders: list
    log: StepLog
    marked: list | None = field(default=None)

    def mark_data(self):
        self.marked = [ld.state_dict() for ld in self.loaders]

    def data_position(self):
        return self.marked if self.marked is not None else [ld.state_dict() for ld in self.loaders]

    def load(self, model_state, shard, meta):
        self.model.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(shard["optimizer"])
        saved = shard["extra"]["loader"] if shard.get("extra") else []
        saved = [saved] if isinstance(saved, dict) else saved  # one loader, as older checkpoints kept it
        if len(saved) != len(self.loaders):
            raise UserError(f"the checkpoint was saved with {len(saved)} data loader(s) (accumulation steps) per "
                            f"process, now {len(self.loaders)}: resume with the same --total-batch-size and "
                            f"--device-batch-size")
        for ld, st in zip(self.loaders, saved):
            ld.load_state_dict(st)
        ck.set_rng_state(shard["rng"])
        self.log.load_state(meta["loop"])


class Run:
    """One run's checkpoint folder, resume, step boundaries, metrics and wandb."""

    def __init__(self, ckpt_dir, args, world_size, rank):
        self.dir, self.args, self.world_size, self.rank = ckpt_dir, args, world_size, rank
        self.master = rank == 0
        self.resume_step, self.resumed_meta = resolve_resume(ckpt_dir, args, world_size)
        self.start_step = self.resume_step or 0

    def begin(self, state, num_iterations, project, meta):
        """Restore `state` when resuming, then prepare the folder (after a refused resume nothing
        on disk has changed) and wandb. meta: what every checkpoint's meta holds (model_config,
        user_config, derived and the stage's own fields); wandb gets user_config + derived."""
        check_horizon(self.resume_step, num_iterations)
        self.state, self.num_iterations, self.meta = state, num_iterations, meta
        self.pending = None  # the train record of the resumed step, if it never reached metrics.jsonl
        if self.resume_step is not None:
            model_state, shard, saved = ck.load_checkpoint(self.dir, self.resume_step, state.model.get_device(),
                                                           load_optimizer=True, rank=self.rank, require=("loop",))
            state.load(model_state, shard, saved)
            self.pending = saved.get("record")
            del model_state, shard
        self.done_at_start = evaluated_before(self.dir, self.resume_step)  # before begin_run trims the metrics
        begin_run(self.dir, self.resume_step, self.master)
        self.wandb = init_wandb(self.args.run, project, {**meta["user_config"], **meta["derived"]}, self.master)

    def save_due(self, step):
        return is_due(step, self.args.save_every, step == self.num_iterations)

    def save(self, step, record):
        meta = dict(self.meta, step=step, world_size=self.world_size, loop=self.state.log.state(), record=record)
        ck.save_checkpoint(self.dir, step, self.state.model.state_dict(), self.state.optimizer.state_dict(), meta,
                           rank=self.rank, extra={"loader": self.state.data_position()})
        print0(f"saved {self.dir} step {step}")

    def boundary(self, step, record, evaluate):
        """Step boundary `step` (before training step step + 1), in its one order: save when due
        (first, so that an evaluation that fails never costs the step; with it the step's train
        `record`), the evaluations evaluate(step, last) -> {metric: value} (not again for a
        resumed step whose record was written), the record (train line + evaluations) to
        metrics.jsonl and wandb, the evaluations into the checkpoint's meta. True at the end."""
        last = step == self.num_iterations
        fresh = step == self.start_step and self.resume_step is not None  # handled before the stop
        if fresh and self.done_at_start:
            return last
        saved = not fresh and self.save_due(step)
        if saved:
            self.save(step, record)
        if fresh:
            record = self.pending
        results = evaluate(step, last)
        if results:
            record = {**(record or {"step": step}), **results}
        if record is not None and self.master:
            metrics.append_metrics(self.dir, record)
            self.wandb.log(record, step=record["step"])
        if (saved or fresh) and self.master and results:  # a checkpoint step: its evaluations go into its meta
            ck.annotate_meta(self.dir, step, **results)
        return last

    def finish(self, section, summary):
        """The summary line, the report card's section (master) and the end of wandb."""
        print0("summary: " + " | ".join(f"{k} {v}" for k, v in summary.items() if v is not None))
        if self.master:
            get_report().log(section=section, data=[self.meta["user_config"], summary])
        self.wandb.finish()
