"""UserError: the one exception type whose message is shown to the user as it is.

Library errors are translated into it where they are understood (with the file, key or row
at fault); the CLI prints it without a traceback and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input or setup, worded so the user can fix it."""
