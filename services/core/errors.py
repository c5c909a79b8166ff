"""User-facing errors: the CLI prints them without a traceback and exits with status 2."""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). The message names the culprit."""

    exit_code = 2
