"""The `nanochat` command: reads the verb, hands the rest of the arguments to the stage.

Rule for finding code: `nanochat <verb> <sub>` runs `nanochat/stages/<verb>_<sub>.py`,
and a verb without sub-verbs (`chat`, `serve`) runs `nanochat/stages/<verb>.py`. Each stage
module has `main(argv) -> int | None` with its own argparse parser, so `--help` works per stage.
"""
import importlib
import sys

from nanochat import __version__

# verb -> {sub-verb: one-line description}; None means the verb takes no sub-verb
VERBS = {
    "data": {
        "download": "fetch pretraining shards from the hub into $NANOCHAT_DATA/pretrain",
        "build": "turn your own .txt/.md/.jsonl/.parquet files into pretraining shards",
    },
    "tokenizer": {
        "train": "train the BPE tokenizer on the pretraining shards",
        "eval": "compare bytes per token with GPT-2 / GPT-4 on several kinds of text",
    },
    "train": {
        "base": "pretrain a GPT from scratch (--depth sets everything)",
        "mid": "mid-train a base model on conversations, tool use and identity",
        "sft": "supervised fine-tuning on a conversation mixture",
        "rl": "reinforcement learning on GSM8K",
    },
    "eval": {
        "base": "bits per byte, CORE and samples of a base model",
        "chat": "ARC, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE of a chat model",
    },
    "chat": None,
    "serve": None,
    "report": {
        "reset": "start a new report card",
        "generate": "assemble report.md from the stages' sections",
    },
    "scaling": {
        "run": "an isoFLOP grid of train base runs, its scaling-law fit and pictures",
        "series": "the miniseries: depths at one tokens:params ratio, bpb and CORE",
        "fit": "scaling laws (optimal N, D, ratio, intervals) from a grid's CSV",
    },
    "export": {
        "hf": "export a checkpoint in Hugging Face format",
    },
}
VERB_HELP = {
    "chat": "talk to a model in the terminal",
    "serve": "web UI and OpenAI-compatible HTTP API",
}


def usage() -> str:
    lines = ["usage: nanochat <verb> [<sub-verb>] [flags]   (nanochat <verb> <sub-verb> --help for flags)", ""]
    for verb, subs in VERBS.items():
        if subs is None:
            lines.append(f"  {verb:<20} {VERB_HELP[verb]}")
        else:
            for sub, text in subs.items():
                lines.append(f"  {verb + ' ' + sub:<20} {text}")
    lines += ["", "Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat), NANOCHAT_DATA (default $NANOCHAT_BASE_DIR/data)"]
    return "\n".join(lines)


def resolve(argv):
    """Return (module name, program name, remaining argv) or raise SystemExit with a message."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0)
    if argv[0] in ("-V", "--version"):
        print(f"nanochat {__version__}")
        raise SystemExit(0)
    verb = argv[0]
    if verb not in VERBS:
        print(f"nanochat: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    subs = VERBS[verb]
    if subs is None:
        return f"nanochat.stages.{verb}", f"nanochat {verb}", argv[1:]
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        choices = "\n".join(f"  {verb} {s:<12} {t}" for s, t in subs.items())
        stream = sys.stdout if len(argv) >= 2 else sys.stderr
        print(f"usage: nanochat {verb} {{{','.join(subs)}}} [flags]\n\n{choices}", file=stream)
        raise SystemExit(0 if len(argv) >= 2 else 2)
    sub = argv[1]
    if sub not in subs:
        print(f"nanochat: unknown command '{verb} {sub}' (choose from: {', '.join(subs)})", file=sys.stderr)
        raise SystemExit(2)
    return f"nanochat.stages.{verb}_{sub}", f"nanochat {verb} {sub}", argv[2:]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    module_name, prog, rest = resolve(argv)
    # imported only now, with the stage (and torch): `nanochat --help` stays instant
    from nanochat.common import UserError, absolute_env_paths
    absolute_env_paths()  # a relative data root means the one beside where the command was typed
    module = importlib.import_module(module_name)
    sys.argv = [prog] + rest  # so argparse in the stage prints the right program name
    try:
        rc = module.main(rest)
    except UserError as e:
        # bad input from the user: one clear line, no traceback, non-zero exit
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
