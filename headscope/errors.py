"""One exception type for every user-facing failure: the CLI prints its message, no traceback."""


class HeadscopeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so runs are saved the same way; the CLI exits 143 for it."""


class Interrupted(HeadscopeError):
    """A run stopped by Ctrl-C or SIGTERM and saved ``partial``; the CLI exits with ``exit_code``
    (130 or 143, as a shell reports a process killed by SIGINT or SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ContextTooLong(HeadscopeError):
    """An input longer than the model's context. ``n_tokens`` / ``max_context`` let a caller that
    knows which option set the length (an analysis' ``length_flag``) name it instead."""

    def __init__(self, message: str, n_tokens: int, max_context: int):
        super().__init__(message)
        self.n_tokens, self.max_context = n_tokens, max_context
