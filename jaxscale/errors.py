"""Errors a user can cause and fix: the CLI prints them as one paragraph, exit code 2."""


class UserError(Exception):
    """A mistake in config, data or command line, with a message that says what to change."""
