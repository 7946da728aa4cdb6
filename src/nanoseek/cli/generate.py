"""`nanoseek sample` and `nanoseek chat`: text from a checkpoint on the terminal (`sample --source`: the target
of a sequence-to-sequence checkpoint)."""

from __future__ import annotations

import json
import sys

from nanoseek.analysis.poems import annotate
from nanoseek.cli.common import (
    Command,
    add_checkpoint_args,
    add_compile_args,
    add_threads_arg,
    load,
    reject_extra,
    set_threads,
)
from nanoseek.config.parse import did_you_mean
from nanoseek.errors import NanoseekError
from nanoseek.generation.chat import Chat, MessageTooLong
from nanoseek.generation.seq2seq import is_encoder_decoder, translate
from nanoseek.generation.speculative import compare_with_greedy
from nanoseek.generation.streaming import stream_past_context
from nanoseek.train.evaluate_pairs import checkpoint_task


def add_sample_arguments(s) -> None:
    add_checkpoint_args(s)
    s.add_argument("--prompt", help="the text to continue (default: a newline)")
    s.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens to generate, default 200; past the model's context, generation goes on from the context's "
        "recent half (with --source: the longest target, default 2 x the source + 10)",
    )
    s.add_argument(
        "--source", help="a sequence-to-sequence checkpoint (data.task=couplets, ...): the source to translate"
    )
    s.add_argument("--beam", type=int, default=4, help="with --source: beam size (1 = greedy)")
    s.add_argument(
        "--length-penalty",
        type=float,
        default=0.6,
        help="with --source: GNMT's alpha, score = log P / ((5 + |Y|) / 6)^alpha",
    )
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    s.add_argument("--top-p", type=float, help="sample within the smallest set of tokens whose probability reaches p")
    s.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already seen by this (1 = off)",
    )
    s.add_argument("--seed", type=int, help="seed of the sampling generator (reproducible output)")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_threads_arg(s)
    s.add_argument(
        "--format",
        choices=("text", "poem"),
        default="text",
        help="poem: after the text, each line's verse lengths and how many verses have 5 or 7 characters (on stderr)",
    )
    s.add_argument(
        "--speculative",
        action="store_true",
        help="greedy decoding with the MTP module as drafter (prints acceptance and speedup)",
    )
    add_compile_args(s)


def run_translate(args, model, tok, folder) -> int:
    """`sample --source`: the best target of the source, by beam search (greedy for --beam 1)."""
    if checkpoint_task(folder) == "lm" and not is_encoder_decoder(model):
        raise NanoseekError(
            "--source is for sequence-to-sequence checkpoints (trained with --data.task=couplets|copy|reverse|sort); "
            "this one is a language model: use --prompt"
        )
    if args.prompt is not None:
        raise NanoseekError("give --source or --prompt, not both")
    if not args.source:
        raise NanoseekError("--source is empty; give the text to translate")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise NanoseekError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    (text,) = translate(model.eval(), tok, [args.source], args.beam, args.length_penalty, args.max_new_tokens)
    print(text)
    return 0


def run_sample(args, extra) -> int:
    reject_extra(extra)
    set_threads(args.threads)
    if args.source is not None:
        return run_translate(args, *load(args, encoder_decoder=True))
    if args.speculative and (args.compile or args.compile_prefill):
        raise NanoseekError(
            "--speculative decodes eagerly (its draft-and-verify steps change shape); "
            "drop --compile / --compile-prefill"
        )
    model, tok, _ = load(args, encoder_decoder=True)
    if is_encoder_decoder(model):
        raise NanoseekError(f"{args.ckpt} is an encoder-decoder model: give the text to translate with --source")
    max_new_tokens = 200 if args.max_new_tokens is None else args.max_new_tokens
    prompt = args.prompt if args.prompt is not None else "\n"
    pieces = stream_past_context(
        model,
        tok,
        prompt,
        max_new_tokens=max_new_tokens,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop or None,
        compile=args.compile,
        compile_prefill=args.compile_prefill,
    )  # checks the prompt
    if args.speculative:
        text, report = compare_with_greedy(model, tok, prompt, max_new_tokens)
        print(prompt + text)
        print(json.dumps(report), file=sys.stderr)
        return 0
    sys.stdout.write(prompt)
    written = [prompt]
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        written.append(piece)
    sys.stdout.write("\n")
    if args.format == "poem":
        sys.stdout.flush()
        print(annotate("".join(written)), file=sys.stderr)
    return 0


def add_chat_arguments(c) -> None:
    add_checkpoint_args(c)
    c.add_argument("--system", help="a system message")
    c.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        help="longest reply, in tokens; past the context it goes on from the context's recent half",
    )
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    c.add_argument(
        "--top-p", type=float, default=0.95, help="sample within the smallest set of tokens whose probability reaches p"
    )
    c.add_argument("--seed", type=int, help="seed of the sampling generator")
    add_threads_arg(c)
    add_compile_args(c)
    c.epilog = "In the chat: " + "; ".join(f"{k} {v}" for k, v in CHAT_COMMANDS.items()) + "."


CHAT_COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/exit": "quit (so does Ctrl-D)",
    "/help": "this list",
}
USER, ASSISTANT = "you> ", "model> "


def chat_command(text: str, chat: Chat) -> bool | None:
    """Run a /command: True to go on, False to quit; None when `text` is a message for the model."""
    if not text.startswith("/"):
        return None
    word = text.split()[0]
    if word in ("/exit", "/quit"):
        return False
    if word == "/reset":
        chat.reset()
        print("(conversation forgotten)", file=sys.stderr)
    elif word == "/help":
        print("\n".join(f"{k:7s} {v}" for k, v in CHAT_COMMANDS.items()), file=sys.stderr)
    else:
        print(f"unknown command {word}{did_you_mean(word, CHAT_COMMANDS)}; /help lists them", file=sys.stderr)
    return True


def run_chat(args, extra) -> int:
    """Interactive chat on stdin/stdout; the checkpoint's chat template when it has one."""
    reject_extra(extra)
    set_threads(args.threads)
    model, tok, folder = load(args)
    chat = Chat(
        model,
        tok,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        folder=folder,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compile=args.compile,
        compile_prefill=args.compile_prefill,
    )
    template = "its chat template" if chat.template["template"] else "a plain User:/Assistant: transcript"
    print(f"chat with {folder} ({template}); /help for commands, /exit or Ctrl-D to quit", file=sys.stderr)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(USER) if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        text = line.strip()
        if not text:
            continue
        go_on = chat_command(text, chat)
        if go_on is False:
            break
        if go_on:
            continue
        reply = chat.reply(text)
        try:
            first = next(reply, "")
        except MessageTooLong:
            print("(message too long for the model's context)", file=sys.stderr)
            continue
        sys.stdout.write(ASSISTANT + first)
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


COMMANDS = [
    Command("sample", "generate text from a checkpoint", add_sample_arguments, run_sample),
    Command("chat", "chat with a checkpoint on the terminal", add_chat_arguments, run_chat),
]
