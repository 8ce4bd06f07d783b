"""rag-backup: encrypted, verified, restorable backups of the RAG system's data."""

__version__ = "0.1.0"
