"""UserError: the one exception type whose message is shown to the user as it is.

Library errors are translated into it where they are understood (with the file, key or row
at fault); the `u-mask` CLI (trainer/cli.py) prints it without a traceback and exits with
status 2. It lives in umask/, the bottom layer (torch only, and meant to be installable on its
own), so that umask/, embeddings/ and trainer/ can all raise it without importing a layer above
their own.
"""


class UserError(Exception):
    """A problem with the user's input or setup, worded so the user can fix it."""
