"""One exception type for every user-facing failure: the CLI prints its message, no traceback."""


class HeadscopeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so runs are saved the same way; the CLI exits 143 for it."""
