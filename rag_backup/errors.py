"""The exception type the CLI turns into ``rag-backup: error: ...`` and exit code 1 (2 for
``BadArgument``, as argparse does for a bad argument)."""


class BackupError(Exception):
    """A failure with a message meant for the operator (no secrets in it)."""


class BadArgument(BackupError):
    """An argument that cannot be served (e.g. a recovery target outside the WAL archive),
    refused before anything is touched: exit code 2."""


class Interrupted(BackupError):
    """SIGTERM or SIGINT (``docker stop``, Ctrl-C): not a failure of the step it interrupted,
    so parallel steps stop with it instead of being waited for."""
