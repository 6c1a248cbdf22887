"""nanochat chat: talk to a model in the terminal.

    nanochat chat                      interactive; `clear` starts over, `quit`/`exit`/Ctrl-D leave
    nanochat chat -p "What is 12*13?"  answer once and exit (scriptable)

Replies stream token by token. The model comes from the first of sft, mid, base that has a
checkpoint unless -i names a source.
"""
import argparse
import codecs
import sys

from nanochat.flags import add_model_flags
from nanochat.models import load_chat_model
from nanochat.common import UserError
from nanochat.engine import Engine
from nanochat.quant import describe_weights


def reply(engine, tokenizer, messages, args, seed, out=sys.stdout):
    """Stream the assistant's answer to `out`; return its text (tool calls included)."""
    prompt = tokenizer.render_for_completion({"messages": messages})
    context = engine.model.config.sequence_len
    if len(prompt) >= context:
        raise UserError(f"the conversation ({len(prompt)} tokens) no longer fits the model's context "
                        f"({context}); type `clear` to start over")
    max_tokens = min(args.max_tokens, context - len(prompt))
    stop = tokenizer.stop_ids()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # never print half a character
    tokens = []
    for col, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=args.temperature,
                                  top_k=args.top_k or None, seed=seed):
        token = col[0]
        if token in stop:
            break
        tokens.append(token)
        out.write(utf8.decode(tokenizer.decode_bytes([token])))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    out.flush()
    return tokenizer.decode(tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat chat", description="Talk to a model in the terminal.")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (each reply uses seed + turn)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.temperature <= 2:
        raise UserError("-t/--temperature must be between 0 and 2")
    if args.top_k < 0:
        raise UserError("-k/--top-k must be >= 0")
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")

    model, tokenizer, meta, source = load_chat_model(args)
    engine = Engine(model, tokenizer)

    if args.prompt is not None:
        reply(engine, tokenizer, [{"role": "user", "content": args.prompt}], args, args.seed)
        return 0

    print(f"nanochat ({source}, step {meta.get('step', '?')}, {describe_weights(args.weights, model.get_device().type)}) "
          f"-- type `clear` to start over, `quit` to leave")
    messages = []
    turn = 0
    while True:
        try:
            text = input("\nYou: ")
        except EOFError:
            print()
            return 0
        text = text.strip()
        if text in ("quit", "exit"):
            return 0
        if text == "clear":
            messages = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("\nnanochat: ", end="", flush=True)
        turn += 1
        try:
            # a different draw each turn, still reproducible
            answer = reply(engine, tokenizer, messages, args, args.seed + turn)
        except UserError as e:
            messages.pop()
            print(f"\n{e}")
            continue
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    raise SystemExit(main())
