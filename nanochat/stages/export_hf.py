"""nanochat export hf: write a checkpoint as a Hugging Face model folder (docs/export.md).

    nanochat export hf --out DIR [-i SOURCE] [--model-tag TAG] [--step N] [--dtype bfloat16] [--force]

DIR gets config.json, model.safetensors, the remote code (configuration_nanochat.py,
modeling_nanochat.py, copied from nanochat/hf/), tokenizer.json + tokenizer_config.json (with a
chat template that renders conversations like Tokenizer.render_conversation), generation_config.json
and a README.md model card. Load it with transformers:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); AutoTokenizer.from_pretrained(DIR)
"""
import argparse
import dataclasses
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from nanochat.checkpoint import resolve_checkpoint
from nanochat.models import load_model, pick_source
from nanochat.common import UserError, add_common_flags, atomic_write_text, print0
from nanochat.gpt import QK_SCALE, ROPE_BASE, SMEAR_CHANNELS, VE_GATE_CHANNELS, VE_GATE_RANGE
from nanochat.loss import SOFTCAP

HF_CODE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
REMOTE_CODE = ("configuration_nanochat.py", "modeling_nanochat.py")
CHAT_SOURCES = ("mid", "sft", "rl")  # trained on conversations: replies end with <|assistant_end|>
DTYPES = ("float32", "bfloat16")


# ---------------------------------------------------------------------------
# Tokenizer: tiktoken ranks -> a `tokenizers` BPE (tokenizer.json)

def bytes_to_unicode():
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the other 68 bytes for chars from U+0100 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe_vocab_and_merges(mergeable_ranks):
    """vocab {string: id} and merges [(left, right)] ordered so that a `tokenizers` BPE merges
    like tiktoken: tiktoken joins the adjacent pair whose concatenation has the lowest rank, so
    every split of a token into two tokens is a merge, ranked by the token it makes."""
    char = bytes_to_unicode()

    def s(b):
        return "".join(char[x] for x in b)
    vocab = {s(tok): rank for tok, rank in mergeable_ranks.items()}
    merges = []
    for tok, rank in mergeable_ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in mergeable_ranks and right in mergeable_ranks:
                merges.append((rank, mergeable_ranks[left], mergeable_ranks[right], s(left), s(right)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def build_hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that encodes text to the same ids as our tiktoken encoding, has
    our special tokens at the same ids, and prepends <|bos|> when asked to add special tokens."""
    vocab, merges = bpe_vocab_and_merges(tokenizer.mergeable_ranks)
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
    if hasattr(hf.model, "ignore_merges"):
        hf.model.ignore_merges = True  # like tiktoken: a pre-token that is itself a token stays whole
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = tokenizer.get_special_tokens()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for t in specials:
        if hf.token_to_id(t) != tokenizer.encode_special(t):
            raise UserError(f"cannot convert the tokenizer: special token {t} would get id {hf.token_to_id(t)} "
                            f"instead of {tokenizer.encode_special(t)}")
    bos = tokenizer.get_bos_token_id()
    # documents start with <|bos|>: tokenizer(text) gives [bos] + ids, as the base model was trained
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    return hf


# A Jinja chat template that gives exactly the ids of Tokenizer.render_conversation (without
# add_generation_prompt) and Tokenizer.render_for_completion (with it): a leading system message
# is merged into the first user message, roles must alternate user/assistant, assistant content
# may be a list of parts (text, python, python_output).
CHAT_TEMPLATE = "".join([
    "{%- set msgs = messages -%}",
    "{%- if add_generation_prompt and msgs and msgs[-1]['role'] == 'assistant' -%}{%- set msgs = msgs[:-1] -%}{%- endif -%}",
    "{%- if msgs and msgs[0]['role'] == 'system' -%}",
    "{%- if msgs|length < 2 or msgs[1]['role'] != 'user' -%}{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}",
    "{%- set msgs = [{'role': 'user', 'content': msgs[0]['content'] + '\\n\\n' + msgs[1]['content']}] + msgs[2:] -%}",
    "{%- endif -%}",
    "<|bos|>",
    "{%- for m in msgs -%}",
    "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}{{ raise_exception('roles must alternate user/assistant, starting with user') }}{%- endif -%}",
    "{%- if m['role'] == 'user' -%}",
    "<|user_start|>",
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}{{ p['text'] }}{%- endfor -%}{%- endif -%}",
    "<|user_end|>",
    "{%- else -%}",
    "<|assistant_start|>",
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}",
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}",
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>",
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>",
    "{%- else -%}{{ raise_exception('unknown assistant content part type ' + p['type']) }}{%- endif -%}",
    "{%- endfor -%}{%- endif -%}",
    "<|assistant_end|>",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}",
])


# ---------------------------------------------------------------------------
# The folder

def special_ids(tokenizer, source):
    """(bos, eos, stop ids for generate, pad). Chat models end a reply with <|assistant_end|>;
    a base model ends a document by starting the next one with <|bos|>. Padding uses <|bos|>
    (padded positions are masked out anyway)."""
    bos = tokenizer.get_bos_token_id()
    if source in CHAT_SOURCES:
        eos = tokenizer.encode_special("<|assistant_end|>")
        return bos, eos, [eos, bos], bos  # like `nanochat chat`: stop at either
    return bos, bos, bos, bos


def model_card(origin, meta, config, num_params, dtype, chat):
    """The README.md of the folder. origin: (source, model tag, step) of the checkpoint."""
    source, model_tag, step = origin
    user = meta.get("user_config") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [nanochat, text-generation, custom_code]",
        "---",
        f"# nanochat {source} model ({model_tag}, step {step})",
        "",
        "A small GPT trained from scratch with [nanochat](https://github.com/karpathy/nanochat)-style code "
        f"and exported with `nanochat export hf`. Stage: **{source}** "
        f"({'a chat model: use the chat template' if chat else 'a base model: it continues text'}).",
        "",
        "| | |", "|---|---|",
        f"| parameters | {num_params:,} |",
        f"| layers / width / heads (kv) | {config['n_layer']} / {config['n_embd']} / {config['n_head']} ({config['n_kv_head']}) |",
        f"| context | {config['sequence_len']} tokens |",
        f"| window pattern | {config['window_pattern']} (short window {config['short_window']}) |",
        f"| vocabulary | {config['vocab_size']} |",
        f"| training step | {step} |",
        f"| weights | {dtype} |",
    ]
    if meta.get("val_bpb") is not None:
        lines.append(f"| validation bits per byte | {meta['val_bpb']:.4f} |")
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "path = \"path/to/this/folder\"",
              "tok = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"]
    if chat:
        lines += ["ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}],",
                  "                              add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
                  "out = model.generate(**ids, max_new_tokens=200)",
                  "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))"]
    else:
        lines += ["ids = tok(\"The capital of France is\", return_tensors=\"pt\")  # starts with <|bos|>",
                  "out = model.generate(**ids, max_new_tokens=50)",
                  "print(tok.decode(out[0], skip_special_tokens=True))"]
    lines += ["```", "",
              "The model code (`modeling_nanochat.py`) needs only torch and transformers; "
              "`trust_remote_code=True` runs it from this folder.",
              "Sampling defaults (generation_config.json) are nanochat's: temperature 0.6, top-k 50.", ""]
    if user:
        lines += ["## Training configuration", "", "```json", json.dumps(user, indent=2, sort_keys=True, default=str),
                  "```", ""]
    return "\n".join(lines)


def check_out_dir(out, force):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"--out {out} is not empty; pass --force to overwrite the files of an export there")


def export(model, tokenizer, meta, origin, out, dtype="float32"):
    """Write the Hugging Face folder `out` (created if needed) for the checkpoint at origin =
    (source, model tag, step). Returns the list of files written."""
    source = origin[0]
    os.makedirs(out, exist_ok=True)
    config = dataclasses.asdict(model.config)  # short_window already resolved by GPTConfig
    bos, eos, stop, pad = special_ids(tokenizer, source)
    chat = source in CHAT_SOURCES
    written = []

    def write_json(name, obj):
        atomic_write_text(os.path.join(out, name), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        written.append(name)

    hf_config = dict(
        architectures=["NanochatForCausalLM"], model_type="nanochat",
        auto_map={"AutoConfig": "configuration_nanochat.NanochatConfig",
                  "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
        **config,
        softcap=SOFTCAP, rope_base=float(ROPE_BASE), ve_gate_channels=VE_GATE_CHANNELS,
        ve_gate_range=VE_GATE_RANGE, qk_scale=QK_SCALE, smear_channels=SMEAR_CHANNELS, smear=True, backout=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False, use_cache=True,
        torch_dtype=dtype, dtype=dtype,  # transformers 4 reads torch_dtype, 5 reads dtype
    )
    write_json("config.json", hf_config)
    write_json("generation_config.json", dict(
        bos_token_id=bos, eos_token_id=stop, pad_token_id=pad, do_sample=True, temperature=0.6, top_k=50,
        max_length=config["sequence_len"]))

    # weights: nanochat's names as they are (the remote code uses the same module names)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(out, f"model.safetensors.tmp.{os.getpid()}")
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out, "model.safetensors"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    written.append("model.safetensors")

    for name in REMOTE_CODE:
        shutil.copyfile(os.path.join(HF_CODE_DIR, name), os.path.join(out, name))
        written.append(name)

    hf_tok = build_hf_tokenizer(tokenizer)
    atomic_write_text(os.path.join(out, "tokenizer.json"), hf_tok.to_str(pretty=True))
    written.append("tokenizer.json")
    id_to_name = {tokenizer.encode_special(t): t for t in tokenizer.get_special_tokens()}
    write_json("tokenizer_config.json", dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<|bos|>", eos_token=id_to_name[eos],
        pad_token=id_to_name[pad], model_max_length=config["sequence_len"], clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # transformers 4 would add token_type_ids
        chat_template=CHAT_TEMPLATE))
    write_json("special_tokens_map.json", dict(bos_token="<|bos|>", eos_token=id_to_name[eos],
                                               pad_token=id_to_name[pad]))

    num_params = sum(p.numel() for p in model.parameters())
    atomic_write_text(os.path.join(out, "README.md"),
                      model_card(origin, meta, config, num_params, dtype, chat))
    written.append("README.md")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanochat export hf",
                                     description="Export a checkpoint as a Hugging Face transformers model folder.")
    parser.add_argument("-i", "--source", default=None, choices=["base", "mid", "sft", "rl"],
                        help="which checkpoints to export (default: the first of sft, mid, base that exists)")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --force)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing our files there")
    add_common_flags(parser)
    args = parser.parse_args(argv)

    check_out_dir(args.out, args.force)

    source = pick_source(args.source)
    _, model_tag, step = resolve_checkpoint(source, args.model_tag, args.step)
    print0(f"loading {source}/{model_tag} step {step}")
    model, tokenizer, meta = load_model(source, "cpu", phase="eval", model_tag=model_tag, step=step)
    written = export(model, tokenizer, meta, (source, model_tag, step), args.out, args.dtype)
    print0(f"wrote {', '.join(written)} to {args.out}")
    print0(f"load it with: AutoModelForCausalLM.from_pretrained({args.out!r}, trust_remote_code=True)")
    return 0
