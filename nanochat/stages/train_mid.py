"""`nanochat train mid`: mid-training. Continue the base model's training on conversations
rendered in the chat format, packed like pretraining, so that it learns the special tokens,
multiple-choice answers, calculator calls, spelling and who it is.

    nanochat train mid                                   # latest base checkpoint, default mixture
    nanochat train mid --mixture "chat,gsm8k,identity*2" --num-iterations 500
    torchrun --nproc_per_node=8 -m nanochat train mid
    nanochat train mid --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 \\
        --num-iterations 10 --eval-tokens 2048           # tiny, CPU, seconds

The default mixture depends on the data root (online: SmolTalk, MMLU auxiliary_train, GSM8K,
identity x2, spelling; offline: $NANOCHAT_DATA/chat/*, ARC, GSM8K, identity x2, spelling) and is
printed at start. Every token of the rendered conversations is trained on, as in pretraining.
Learning rates are inherited from the base checkpoint; the schedule is constant then a linear
warmdown over the last 20%. Output: $NANOCHAT_BASE_DIR/checkpoints/mid/<tag> (docs/chat_training.md).
The training loop, shared with `train sft`, is nanochat/chat_train.py.
"""
import argparse

from nanochat.chat_train import ChatStage, add_chat_train_flags, train
from nanochat.flags import add_lr_flags, add_schedule_flags, add_training_flags
from nanochat.hparams import muon_momentum

# packed like pretraining, every token a target; val bpb; Muon momentum 0.85 -> 0.95 over 300 steps
MID = ChatStage("mid", "Midtraining", mode="pack", val_bpb=True, momentum=muon_momentum)


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat train mid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(p, "mid", ["base"], device_batch_size=32, total_batch_size=524288, eval_every=150, save_every=-1)
    g = add_lr_flags(p, init_lr_frac=1.0)
    add_schedule_flags(g, warmdown_ratio=0.2)
    g = add_chat_train_flags(p, "mid")
    g.add_argument("--chatcore-every", type=int, default=-1, help="small ChatCORE every N steps and at the end, -1 = never (default -1)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return train(args, MID)


if __name__ == "__main__":
    raise SystemExit(main())
