"""The one exception type that the command-line tools turn into a one-line message."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""
