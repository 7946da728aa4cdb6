"""The one exception type for bad user input, and the argument parser that raises it."""

import argparse


class NanoseekError(ValueError):
    """Bad user input; the CLI prints it as one line and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a `NanoseekError` (one line, exit status 2), not usage text and exit."""

    def error(self, message: str):
        raise NanoseekError(f"{message} (see {self.prog} --help)")
