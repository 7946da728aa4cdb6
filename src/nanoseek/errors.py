"""The one exception type for bad user input, the one warning type for notes to the user, and the
argument parser whose mistakes are that exception."""

import argparse


class NanoseekError(ValueError):
    """Bad user input; the CLI prints it as one line and exits with status 2."""


class NanoseekWarning(UserWarning):
    """A note for the user (an old preset name, a setting that has no effect); the CLI prints it as
    one line on stderr, Python shows it as a warning."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a `NanoseekError` (one line, exit status 2), not usage text and exit."""

    def error(self, message: str):
        raise NanoseekError(f"{message} (see {self.prog} --help)")
