"""The `nanoseek` command: a table of verbs, each a `Command` of one module here that parses its
arguments and calls one library function.

    nanoseek train [CONFIG.toml] [--preset NAME] [--data PATH ...] [--out DIR] [--resume | --overwrite]
                   [--max-steps N --max-tokens N --max-seconds S] [--nproc N] [--section.field=VALUE ...]
    nanoseek ablate --variant [NAME:]SPEC ... [--preset NAME] [--out DIR] [--section.field=VALUE ...]
    nanoseek tokenizer train FILE... [--vocab-size N] [--kind bpe|char] [--out FILE]
    nanoseek sample CKPT [--prompt TEXT --max-new-tokens N --temperature T --top-k K --top-p P --seed S ...]
    nanoseek sample CKPT --source TEXT [--beam K --length-penalty A]
    nanoseek chat CKPT [--system TEXT ...]
    nanoseek eval CKPT [--data PATH --seq-len N --batch-size B --max-batches M]
                       [--beam K --length-penalty A --max-sentences N --samples N]
    nanoseek info (CKPT | --preset NAME) [--seq-len N]
    nanoseek presets [--json]
    nanoseek config [RUN | CONFIG.toml] [--preset NAME] [--section.field=VALUE ...] [--json]
    nanoseek convert SRC DST --to {hf,nanoseek} [--dtype float32|bfloat16]
    nanoseek average RUN [--last K --out DIR]
    nanoseek serve CKPT [--host H --port P --api-key KEY ...]
    nanoseek embed CKPT (--text TEXT ... | --file FILE)
    nanoseek inspect {fusion,attention} CKPT --prompt TEXT [--layer L --out PNG]
    nanoseek bench WHAT ...

Shared options are spelled the same everywhere (--threads, --device, --compile, --json; train and
ablate also --dtype and the budgets). Output is for people; --json prints JSON lines for programs.
Bad input (NanoseekError) prints one line on stderr and exits with status 2; an unknown command or
option names the closest one; a note (NanoseekWarning, e.g. an old preset name) is one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from nanoseek.cli import analysis, bench, configs, generate, models, serve, train
from nanoseek.cli.common import OVERRIDE, Command, check_flags, describe_os_error, split_argv
from nanoseek.config.parse import did_you_mean
from nanoseek.errors import ArgumentParser, NanoseekError, NanoseekWarning

ORDER = (
    "train",
    "sample",
    "eval",
    "info",
    "presets",
    "config",
    "chat",
    "serve",
    "convert",
    "average",
    "embed",
    "inspect",
    "ablate",
    "tokenizer",
    "bench",
)
_ALL = {c.name: c for module in (train, generate, models, configs, serve, analysis, bench) for c in module.COMMANDS}
assert set(_ALL) == set(ORDER), f"ORDER must list every command: {sorted(set(_ALL) ^ set(ORDER))}"
COMMANDS: dict[str, Command] = {name: _ALL[name] for name in ORDER}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already says it or there is none to show
    (an unset option, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="nanoseek", description="Train, evaluate and run DeepSeek-style models.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}  # name -> its parser, for the options an unknown flag is compared with
    for command in COMMANDS.values():
        p = parser.commands[command.name] = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            add_help=command.add_help,
            formatter_class=HelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def check_command(argv: list[str]) -> None:
    """An unknown command is one line with the closest command (argparse would list them all)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS and argv and argv[0] == first:
        raise NanoseekError(f"unknown command {first!r}{did_you_mean(first, COMMANDS)}; commands: {', '.join(ORDER)}")


def check_options(command: argparse.ArgumentParser, extra: list[str]) -> None:
    """An unknown --flag is one line with the command's closest option (bench parses its own)."""
    if command.add_help is False:
        return
    for arg in extra:
        if arg.startswith("--") and not OVERRIDE.match(arg):
            flag = arg.split("=", 1)[0]
            options = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
            raise NanoseekError(f"unrecognized option {flag!r}{did_you_mean(flag, options)}; see --help")


def show_note(message, category, filename, lineno, file=None, line=None) -> None:
    """Notes (`NanoseekWarning`) as one line on stderr; other warnings as Python shows them."""
    if issubclass(category, NanoseekWarning):
        print(f"nanoseek: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once", NanoseekWarning)
            warnings.showwarning = show_note
            check_command(argv)
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            check_options(parser.commands[args.command], extra)
            check_flags(args)
            return args.run(args, extra + overrides)
    except NanoseekError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`nanoseek presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the file system refused (disk full, read-only, not a folder): one line naming the file
        return fail(describe_os_error(e))


def fail(message: str) -> int:
    """Bad input: one line on stderr (a message holding newlines is folded), exit status 2."""
    print("nanoseek: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
