"""The one exception type for bad user input, and the one warning type for notes to the user."""


class NanoseekError(ValueError):
    """Bad user input; the CLI prints it as one line and exits with status 2."""


class NanoseekWarning(UserWarning):
    """A note for the user (an old preset name, a setting that has no effect); the CLI prints it as
    one line on stderr, Python shows it as a warning."""
