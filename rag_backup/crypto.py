"""Encryption with GnuPG (symmetric AES-256, passphrase from a file) or age (recipients /
identity files). Only file paths go on argv; the secrets stay in their files."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rag_backup.errors import BackupError

GPG_CIPHER = "AES256"
# An OpenPGP message from `gpg --symmetric` starts with a Symmetric-Key Encrypted Session Key
# packet (tag 3): old format 0x8c/0x8d/0x8e, new format 0xc3.
GPG_FIRST_BYTES = frozenset({0x8C, 0x8D, 0x8E, 0xC3})
AGE_MAGIC = b"age-encryption.org/v1\n"
# gpg's passphrase stretching (S2K iterations). The maximum makes each guess at a short,
# human-chosen passphrase expensive; a long random one (the program's is 64 characters from
# pulumi-random, ~380 bits) gains nothing from it, while every file pays it on decrypt:
# ~0.25-0.5 CPU-s each, which dominated point-in-time restores of dozens of WAL segments.
GPG_S2K_COUNT_STRETCHED = 65011712
GPG_S2K_COUNT_LONG_KEY = 1048576
# A passphrase of at least this many characters counts as a generated key. Length is not
# entropy: a long key that a person chose is still stretched less -- docs/backup.md says so.
LONG_KEY_MIN_CHARS = 40


@dataclass(frozen=True)
class CipherSettings:
    method: str  # "gpg" or "age"
    key_file: Path | None = None  # gpg passphrase file
    age_recipients_file: Path | None = None
    age_identity_file: Path | None = None

    def validate(self, *, need_encrypt: bool, need_decrypt: bool) -> None:
        if self.method == "gpg":
            _check_secret_file("--key-file / RAG_BACKUP_KEY_FILE", self.key_file)
        elif self.method == "age":
            if need_encrypt:
                _check_secret_file(
                    "--age-recipients-file / RAG_BACKUP_AGE_RECIPIENTS_FILE",
                    self.age_recipients_file,
                )
            if need_decrypt:
                _check_secret_file(
                    "--age-identity-file / RAG_BACKUP_AGE_IDENTITY_FILE", self.age_identity_file
                )
        else:
            raise BackupError(
                f"--encryption: unknown method {self.method!r}; expected 'gpg' or 'age'"
            )


def _check_secret_file(option: str, path: Path | None) -> None:
    if path is None:
        raise BackupError(f"{option} is required: a file holding the encryption key")
    if not path.is_file():
        raise BackupError(f"{option}: {path} is not a readable file")
    try:
        with open(path, "rb") as handle:
            if not handle.read(1):
                raise BackupError(f"{option}: {path} is empty; expected a key")
    except PermissionError as error:
        raise BackupError(f"{option}: {path} is not readable") from error


class Cipher:
    """Builds encrypt/decrypt commands. A context manager: gpg gets a private, throwaway
    home directory (no keyring or agent of the operator is touched) that is removed after."""

    def __init__(self, settings: CipherSettings) -> None:
        self.settings = settings
        self._home: Path | None = None

    def __enter__(self) -> Cipher:
        if self.settings.method == "gpg":
            self._home = Path(tempfile.mkdtemp(prefix="rag-backup-gnupg-"))
            self._home.chmod(0o700)
            # Create the keyring files now, so parallel gpg runs do not wait on each other's
            # lock while creating them.
            subprocess.run(
                ["gpg", "--homedir", str(self._home), "--batch", "--quiet", "--list-keys"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._home is not None:
            gpgconf = shutil.which("gpgconf")
            if gpgconf:
                subprocess.run(
                    [gpgconf, "--homedir", str(self._home), "--kill", "gpg-agent"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def _gpg_base(self) -> list[str]:
        assert self._home is not None, "Cipher used outside its with-block"
        return [
            "gpg",
            "--homedir",
            str(self._home),
            "--batch",
            "--quiet",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(self.settings.key_file),
            # Without this the agent would cache the passphrase and a wrong key file could
            # still decrypt within the same run.
            "--no-symkey-cache",
        ]

    def encrypt_argv(self) -> list[str]:
        if self.settings.method == "gpg":
            return [
                *self._gpg_base(),
                "--symmetric",
                "--cipher-algo",
                GPG_CIPHER,
                "--compress-algo",
                "none",  # zstd already compressed the stream
                # Fixed S2K parameters: otherwise the agent spends seconds calibrating them.
                "--s2k-cipher-algo",
                GPG_CIPHER,
                "--s2k-digest-algo",
                "SHA512",
                "--s2k-count",
                str(self.s2k_count()),
                "--output",
                "-",
            ]
        return ["age", "--encrypt", "-R", str(self.settings.age_recipients_file)]

    def s2k_count(self) -> int:
        """The stretching for new files; decryption reads each file's own count."""
        assert self.settings.key_file is not None
        key = self.settings.key_file.read_bytes().strip()
        if len(key) >= LONG_KEY_MIN_CHARS:
            return GPG_S2K_COUNT_LONG_KEY
        return GPG_S2K_COUNT_STRETCHED

    def decrypt_argv(self, path: Path | None) -> list[str]:
        """Decrypt ``path``, or stdin when it is None."""
        source = [str(path)] if path is not None else []
        if self.settings.method == "gpg":
            return [*self._gpg_base(), "--decrypt", "--output", "-", *source]
        return ["age", "--decrypt", "-i", str(self.settings.age_identity_file), *source]

    def describe(self) -> dict[str, str]:
        if self.settings.method == "gpg":
            return {"method": "gpg", "cipher": GPG_CIPHER, "mode": "symmetric"}
        return {"method": "age", "mode": "recipients"}

    def looks_encrypted(self, head: bytes) -> bool:
        if self.settings.method == "gpg":
            return bool(head) and head[0] in GPG_FIRST_BYTES
        return head.startswith(AGE_MAGIC)

    def explain_decrypt_failure(self, stderr: str) -> str:
        """One operator-readable reason for a failed decryption."""
        text = stderr.lower()
        if self.settings.method == "gpg":
            if "bad session key" in text or "bad passphrase" in text:
                return "wrong key: the passphrase in the key file does not decrypt this backup"
            if "no valid openpgp data" in text or "invalid packet" in text:
                return "corrupted: not a valid OpenPGP message"
            if "unexpected eof" in text or "premature" in text or "truncated" in text:
                return "truncated: the encrypted data ends early"
            if "manipulated" in text or "mdc" in text or "integrity" in text:
                return "corrupted: the integrity check (MDC) of the encrypted data failed"
        else:
            if "no identity matched" in text:
                return "wrong key: the age identity does not match this backup's recipients"
            if "unexpected eof" in text or "truncated" in text:
                return "truncated: the encrypted data ends early"
            if "failed to decrypt" in text or "header" in text:
                return "corrupted: age could not authenticate the data"
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        return "decryption failed: " + (lines[-1].strip() if lines else "(no message)")
