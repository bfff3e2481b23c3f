"""Errors shared across the package."""


class UserError(Exception):
    """A problem with the user's input (file, folder, config, checkpoint).

    The message names the file and the problem; the CLI prints it as one line and exits with code 2.
    """
