"""`nanochat train sft`: supervised fine-tuning on a conversation mixture, loss on the
assistant's tokens only.

    nanochat train sft                                   # from the latest mid checkpoint
    nanochat train sft -i base                           # straight from the base model
    torchrun --nproc_per_node=8 -m nanochat train sft
    nanochat train sft --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 \\
        --num-iterations 10 --eval-tokens 2048 --chatcore-every -1   # tiny, CPU, seconds

Whole conversations are packed best-fit into rows of max-seq-len + 1 tokens; the rest of a row
is padding, never half an answer (a conversation longer than a row is truncated to it). The loss
is the mean over the step's assistant tokens. Steps of 32,768 tokens (16 rows of 2,048, ~45
conversations: near the step count of upstream's classic 32 conversations per step). Learning rates:
the source checkpoint's, times --init-lr-frac (0.02), decaying linearly to 0; both chosen from a
measured comparison (docs/chat_training.md). Output: checkpoints/sft/<tag>.
The training loop, shared with `train mid`, is nanochat/chat_train.py.
"""
import argparse

from nanochat.chat_train import ChatStage, add_chat_train_flags, train
from nanochat.flags import add_lr_flags, add_schedule_flags, add_training_flags

# whole conversations padded into rows, the assistant's tokens only; the optimizer's own momentum
SFT = ChatStage("sft", "Chat SFT", mode="pad", val_bpb=False)


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat train sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(p, "sft", ["mid", "base"], device_batch_size=2, total_batch_size=32768, eval_every=100, save_every=-1)
    g = add_lr_flags(p, init_lr_frac=0.02)
    add_schedule_flags(g, warmdown_ratio=1.0)
    g = add_chat_train_flags(p, "sft")
    g.add_argument("--chatcore-every", type=int, default=200, help="small ChatCORE every N steps and at the end, -1 = never (default 200)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return train(args, SFT)


if __name__ == "__main__":
    raise SystemExit(main())
