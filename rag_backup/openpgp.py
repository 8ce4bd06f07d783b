"""In-process decryption of the OpenPGP messages rag-backup's ``gpg --symmetric`` writes
(crypto.Cipher.encrypt_argv; RFC 4880): a Symmetric-Key Encrypted Session Key packet with
an iterated and salted S2K and no encrypted session key, then one Symmetrically Encrypted
Integrity Protected Data packet (AES in CFB mode) holding one binary Literal Data packet and
the Modification Detection Code (SHA-1 over everything decrypted).

Why not gpg: at a base backup's size the restore's decryption is a process of its own with
a pipe in and a pipe out, and every WAL segment of a point-in-time restore starts one; in
process the plaintext goes straight to the decompressor (docs/backup.md, benchmark).

Anything else -- another S2K, an encrypted session key, a compressed or text packet, a
passphrase that does not pass the quick check (possibly a key file gpg reads differently)
-- raises ``Unsupported`` from ``probe`` before any plaintext exists, and the caller uses
gpg, which then gives its own answer (and its own wrong-key message). Like gpg, plaintext is
released before the MDC at the end is checked: whoever writes it somewhere treats it as
unchecked until ``finish`` has returned.

The input is untrusted: every length is bounded by what is there, and a message that is cut
short, has bytes after it, or fails the MDC raises ``Damaged`` with the reason."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rag_backup import clibs

TAG_SKESK = 3
TAG_SEIPD = 18
TAG_LITERAL = 11
MDC_HEADER = b"\xd3\x14"  # new-format packet 19, 20 bytes long
MDC_PACKET_BYTES = len(MDC_HEADER) + 20
S2K_ITERATED_SALTED = 3
S2K_HASHES = {2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
# How much of a file ``probe`` reads: the session key packet, the data packet's header and
# the first decrypted bytes (prefix and literal header) are far inside it.
HEAD_BYTES = 4096
# A key file is a line of text; gpg's --passphrase-file reads its first line.
KEY_FILE_MAX_BYTES = 64 * 1024


class Unsupported(Exception):
    """Not a message this module decrypts; use gpg."""


class Damaged(Exception):
    """The message is damaged; ``reason`` starts with truncated: or corrupted:."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Session:
    algo: int  # OpenPGP's (and libgcrypt's) AES algorithm id
    key: bytes  # the S2K output: there is no encrypted session key


def passphrase_of(key_file: Path) -> bytes:
    """The passphrase gpg --passphrase-file uses: the file's first line."""
    with open(key_file, "rb") as handle:
        return handle.read(KEY_FILE_MAX_BYTES).split(b"\n", 1)[0]


def _header(data: bytes | bytearray, pos: int) -> tuple[int, int, int, bool] | None:
    """(tag, header length, body length or first chunk length, partial) of the packet at
    ``pos``; None when the header is not complete in ``data``."""
    if pos >= len(data):
        return None
    ctb = data[pos]
    if not ctb & 0x80:
        raise Damaged("corrupted: not an OpenPGP packet")
    if ctb & 0x40:
        length = _new_length(data, pos + 1)
        if length is None:
            return None
        size, used, partial = length
        return ctb & 0x3F, 1 + used, size, partial
    kind = ctb & 3
    if kind == 3:
        raise Unsupported("an old-format packet of indeterminate length")
    width = (1, 2, 4)[kind]
    if pos + 1 + width > len(data):
        return None
    return (ctb >> 2) & 0xF, 1 + width, int.from_bytes(data[pos + 1 : pos + 1 + width]), False


def _new_length(data: bytes | bytearray, pos: int) -> tuple[int, int, bool] | None:
    """(length, octets used, partial) of a new-format length at ``pos``, or None if cut."""
    if pos >= len(data):
        return None
    first = data[pos]
    if first < 192:
        return first, 1, False
    if first < 224:
        if pos + 2 > len(data):
            return None
        return ((first - 192) << 8) + data[pos + 1] + 192, 2, False
    if first == 255:
        if pos + 5 > len(data):
            return None
        return int.from_bytes(data[pos + 1 : pos + 5]), 5, False
    return 1 << (first & 0x1F), 1, True


class _Body:
    """The body of one packet, read from a stream across its partial-length chunks."""

    def __init__(self, first: int, partial: bool) -> None:
        self._left = first
        self._partial = partial
        self._length = bytearray()  # a chunk length cut by the end of a feed
        self.ended = first == 0 and not partial

    def feed(self, data: memoryview) -> tuple[list[memoryview], memoryview]:
        """The body bytes in ``data``, and what follows the packet's end (if it ended).
        Called for every 8 KiB chunk gpg writes, twice (outer and inner packet): kept to
        local variables and a one-octet fast path for the usual partial length."""
        pieces: list[memoryview] = []
        append = pieces.append
        pos = 0
        size = len(data)
        left = self._left
        partial = self._partial
        while not self.ended and pos < size:
            if left:
                end = pos + left
                if end > size:
                    append(data[pos:])
                    left = end - size
                    pos = size
                    break
                append(data[pos:end])
                pos = end
                left = 0
                if not partial:
                    self.ended = True
                continue
            first = data[pos]
            if not self._length and 224 <= first < 255:
                left = 1 << (first & 0x1F)  # another partial chunk: one octet
                pos += 1
                continue
            self._length.append(first)
            pos += 1
            length = _new_length(self._length, 0)
            if length is None:
                continue
            self._length.clear()
            left, _, partial = length
            if not left and not partial:
                self.ended = True
        self._left = left
        self._partial = partial
        return pieces, data[pos:]


def _s2k_key(passphrase: bytes, algo: int, salt: bytes, count: int, key_bytes: int) -> bytes:
    """RFC 4880 3.7.1.3: the salt and passphrase hashed over and over up to ``count`` bytes;
    more hash contexts (preloaded with zero bytes) when one digest is shorter than the key."""
    data = salt + passphrase
    total = max(count, len(data))
    repeated = data * max(1, (1 << 16) // len(data))
    key = b""
    contexts = 0
    while len(key) < key_bytes:
        digest = hashlib.new(S2K_HASHES[algo], bytes(contexts))
        left = total
        while left:
            piece = repeated[: min(left, len(repeated))]
            digest.update(piece)
            left -= len(piece)
        key += digest.digest()
        contexts += 1
    return key[:key_bytes]


def _session_packet(head: bytes, passphrase: bytes) -> tuple[Session, int]:
    """The session key from the first packet, and where the next packet starts."""
    header = _header(head, 0)
    if header is None:
        raise Unsupported("too short")
    tag, used, length, partial = header
    body = head[used : used + length]
    if tag != TAG_SKESK or partial or len(body) != length:
        raise Unsupported("no symmetric-key session packet first")
    # version 4, cipher, S2K type 3, hash, 8-byte salt, coded count; nothing after (no
    # encrypted session key: the S2K output is the key).
    if len(body) != 13 or body[0] != 4 or body[2] != S2K_ITERATED_SALTED:
        raise Unsupported("not a version 4 iterated-salted session packet")
    cipher, hash_algo, salt, coded = body[1], body[3], body[4:12], body[12]
    if cipher not in clibs.AES_KEY_BYTES or hash_algo not in S2K_HASHES:
        raise Unsupported(f"cipher {cipher} / hash {hash_algo}")
    count = (16 + (coded & 15)) << ((coded >> 4) + 6)
    key = _s2k_key(passphrase, hash_algo, salt, count, clibs.AES_KEY_BYTES[cipher])
    return Session(cipher, key), used + length


def probe(path: Path, passphrase: bytes) -> Session:
    """The session key for ``path`` if this module can decrypt it (see the module doc);
    raises Unsupported otherwise. Reads only the file's head."""
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    session, _ = _session_packet(head, passphrase)
    reader = MessageReader(session)
    try:
        reader.feed(head, probing=True)
    except (Damaged, Unsupported) as error:
        raise Unsupported(str(error)) from error
    finally:
        reader.close()
    if not reader.literal_started:
        raise Unsupported("no literal data in the first bytes")
    return session


class MessageReader:
    """Decrypts one message fed in pieces; ``feed`` returns the literal data decrypted so
    far, ``finish`` checks the end and the MDC. The key is ``session``'s (``probe``): the
    session packet is skipped, its S2K not run again."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._head = bytearray()  # the outer packets' headers, until the data packet's body
        self._outer: _Body | None = None
        self._version_seen = False
        self._aes: clibs.AesCfbDecryptor | None = None
        self._mdc = hashlib.sha1(usedforsecurity=False)
        self._prefix = bytearray()  # the random prefix: one block and two check bytes
        self._tail = b""  # the last MDC_PACKET_BYTES decrypted, held back
        self._inner_head = bytearray()  # the literal packet's header
        self._literal: _Body | None = None
        self._literal_prefix = bytearray()  # format octet, file name length
        self._literal_skip: int | None = None  # name and date bytes still to skip
        self._after_literal = 0
        self._trailing = 0

    @property
    def literal_started(self) -> bool:
        return self._literal_skip == 0

    def feed(self, data: bytes | bytearray, probing: bool = False) -> bytes:
        view = memoryview(data)
        if self._outer is None:
            view = self._outer_head(view)
            if self._outer is None:
                return b""
        pieces, rest = self._outer.feed(view)
        self._trailing += len(rest)
        if not self._version_seen and pieces and pieces[0]:
            if pieces[0][0] != 1:
                raise Unsupported(f"data packet version {pieces[0][0]}")
            self._version_seen = True
            pieces[0] = pieces[0][1:]
        data_bytes = bytearray().join(pieces)
        if not data_bytes:
            return b""
        assert self._aes is not None
        self._aes.decrypt_in_place(data_bytes)
        return self._plaintext(data_bytes, probing)

    def _outer_head(self, view: memoryview) -> memoryview:
        """Collects the session packet and the data packet's header; returns the rest."""
        start = len(self._head)
        self._head += view
        session = _header(self._head, 0)
        if session is None:
            return view[len(view) :]
        tag, used, length, partial = session
        if tag != TAG_SKESK or partial:
            raise Unsupported("no symmetric-key session packet first")
        header = _header(self._head, used + length)
        if header is None:
            if len(self._head) > HEAD_BYTES:
                raise Damaged("corrupted: no encrypted data packet")
            return view[len(view) :]
        tag, width, first, partial = header
        if tag != TAG_SEIPD:
            raise Unsupported(f"packet {tag} instead of an integrity-protected data packet")
        self._outer = _Body(first, partial)
        self._aes = clibs.AesCfbDecryptor(self._session.algo, self._session.key)
        self._head = bytearray()
        return view[used + length + width - start :]

    def _plaintext(self, plain: bytearray, probing: bool) -> bytes:
        view = memoryview(plain)
        prefix_size = clibs.AES_BLOCK + 2
        if len(self._prefix) < prefix_size:
            take = prefix_size - len(self._prefix)
            self._prefix += view[:take]
            self._mdc.update(view[:take])
            view = view[take:]
            if len(self._prefix) == prefix_size and self._prefix[-4:-2] != self._prefix[-2:]:
                # gpg's quick check: a wrong key (or a key file gpg reads otherwise).
                raise Unsupported("quick check failed")
        if not view:
            return b""
        # The last bytes are held back: they are the MDC packet once the stream ends.
        if probing:
            parts, self._tail = [memoryview(self._tail), view], b""
        elif len(view) >= MDC_PACKET_BYTES:
            parts = [memoryview(self._tail), view[:-MDC_PACKET_BYTES]]
            self._tail = view[-MDC_PACKET_BYTES:].tobytes()
        else:
            joined = self._tail + view.tobytes()
            cut = max(0, len(joined) - MDC_PACKET_BYTES)
            parts, self._tail = [memoryview(joined)[:cut]], joined[cut:]
        literal: list[memoryview] = []
        for part in parts:
            if part:
                self._mdc.update(part)
                literal += self._inner(part)
        return b"".join(literal)

    def _inner(self, body: memoryview) -> list[memoryview]:
        if self._literal is None:
            start = len(self._inner_head)
            self._inner_head += body
            header = _header(self._inner_head, 0)
            if header is None:
                return []
            tag, width, first, partial = header
            if tag != TAG_LITERAL:
                raise Unsupported(f"packet {tag} instead of literal data (compressed?)")
            self._literal = _Body(first, partial)
            body = body[width - start :]
            self._inner_head = bytearray()
        pieces, rest = self._literal.feed(body)
        self._after_literal += len(rest)
        if self._literal_skip != 0:
            pieces = [piece for piece in map(self._literal_header, pieces) if piece]
        return pieces

    def _literal_header(self, piece: memoryview) -> memoryview:
        """Consumes the literal body's format octet, file name and date."""
        if self._literal_skip == 0:
            return piece
        if self._literal_skip is None:
            need = 2 - len(self._literal_prefix)
            self._literal_prefix += piece[:need]
            piece = piece[need:]
            if len(self._literal_prefix) < 2:
                return piece
            if self._literal_prefix[0] != ord("b"):
                raise Unsupported(f"literal data format {chr(self._literal_prefix[0])!r}")
            self._literal_skip = self._literal_prefix[1] + 4
        skip = min(self._literal_skip, len(piece))
        self._literal_skip -= skip
        return piece[skip:]

    def finish(self) -> None:
        """The message must have ended, with nothing after it, and its MDC must match."""
        if self._outer is None or not self._outer.ended:
            raise Damaged("truncated: the encrypted data ends early")
        if self._trailing:
            raise Damaged(f"corrupted: {self._trailing} bytes after the encrypted data")
        if self._literal is None or not self._literal.ended or self._literal_skip != 0:
            raise Damaged("truncated: the encrypted data ends early")
        if self._after_literal:
            raise Damaged("corrupted: data after the literal data inside the message")
        if len(self._tail) != MDC_PACKET_BYTES or self._tail[:2] != MDC_HEADER:
            raise Damaged("corrupted: the integrity check (MDC) of the encrypted data is missing")
        self._mdc.update(MDC_HEADER)
        if self._mdc.digest() != self._tail[2:]:
            raise Damaged("corrupted: the integrity check (MDC) of the encrypted data failed")
        self.close()

    def close(self) -> None:
        if self._aes is not None:
            self._aes.close()
