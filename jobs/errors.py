"""Errors shared by the CLI and the runtime (kept apart so that neither imports the other)."""


class CliError(Exception):
    """Bad input that the user can fix; `moesafe` prints it on one line and exits 2."""

