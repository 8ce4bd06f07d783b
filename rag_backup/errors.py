"""The one exception type the CLI turns into ``rag-backup: error: ...`` and exit code 1."""


class BackupError(Exception):
    """A failure with a message meant for the operator (no secrets in it)."""
