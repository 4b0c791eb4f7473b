"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (missing file, unsupported option, ...). Message is shown as is."""
