"""The two C libraries the in-process restore pipeline calls through ctypes: libgcrypt (AES
in CFB mode, as OpenPGP uses it: gpg's own library, whose CFB decryption runs the AES
blocks in parallel -- OpenSSL 3.0's does one block after the other, at a third of the
speed here) and libzstd (streaming decompression). Both are in the backup image already
(with gnupg and zstd). ctypes releases the GIL during each call, so the pipeline's threads
run on both cores.

Nothing here is required: ``available()`` says whether both libraries loaded, and the
caller falls back to the gpg and zstd commands when they did not. Also libc's
sync_file_range, to start the write-back of what a restore staged (best effort)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache

# AES key sizes by OpenPGP symmetric algorithm id (RFC 4880 9.2): 7, 8, 9 = AES-128/192/256.
AES_KEY_BYTES = {7: 16, 8: 24, 9: 32}
AES_BLOCK = 16


def _load(names: tuple[str, ...], short: str) -> ctypes.CDLL | None:
    for name in (*names, ctypes.util.find_library(short)):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class _InBuffer(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _OutBuffer(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


# libgcrypt's constants (gcrypt.h).
GCRYCTL_DISABLE_SECMEM = 37
GCRYCTL_INITIALIZATION_FINISHED = 38
GCRY_CIPHER_MODE_CFB = 2
# Its AES algorithm ids are OpenPGP's (7, 8, 9).


@cache
def _libgcrypt() -> ctypes.CDLL | None:
    lib = _load(("libgcrypt.so.20",), "gcrypt")
    if lib is None:
        return None
    try:
        lib.gcry_check_version.restype = ctypes.c_char_p
        lib.gcry_check_version.argtypes = [ctypes.c_char_p]
        lib.gcry_cipher_open.restype = ctypes.c_uint
        lib.gcry_cipher_open.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_uint,
        ]
        lib.gcry_cipher_close.restype = None
        lib.gcry_cipher_close.argtypes = [ctypes.c_void_p]
        for name in ("gcry_cipher_setkey", "gcry_cipher_setiv"):
            function = getattr(lib, name)
            function.restype = ctypes.c_uint
            function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.gcry_cipher_decrypt.restype = ctypes.c_uint
        lib.gcry_cipher_decrypt.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
    except AttributeError:
        return None
    # Initialisation as the library asks of an application: no secure memory (the key is
    # in Python objects anyway; secure memory needs a locked-memory limit).
    if lib.gcry_check_version(None) is None:
        return None
    lib.gcry_control(GCRYCTL_DISABLE_SECMEM, 0)
    lib.gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0)
    return lib


@cache
def _libzstd() -> ctypes.CDLL | None:
    lib = _load(("libzstd.so.1",), "zstd")
    if lib is None:
        return None
    try:
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_createDCtx.argtypes = []
        lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_decompressStream.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(_OutBuffer),
            ctypes.POINTER(_InBuffer),
        ]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
    except AttributeError:
        return None
    return lib


SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-back of dirty pages, do not wait


@cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> bool:
    """Start writing ``fd``'s dirty pages in [offset, offset + length) (0: to the end) to
    disk without waiting, so a later fsync or syncfs has little left to wait for. False
    where sync_file_range is missing."""
    call = _sync_file_range()
    if call is None:
        return False
    call(fd, offset, length, SYNC_FILE_RANGE_WRITE)
    return True


def available() -> bool:
    return _libgcrypt() is not None and _libzstd() is not None


class AesCfbDecryptor:
    """AES in CFB mode with a 128-bit feedback (OpenPGP's, without its resync variant),
    decrypting a stream piece by piece, in place."""

    def __init__(self, algo: int, key: bytes, iv: bytes = bytes(AES_BLOCK)) -> None:
        lib = _libgcrypt()
        if lib is None or AES_KEY_BYTES.get(algo) != len(key) or len(iv) != AES_BLOCK:
            raise ValueError("AES-CFB: libgcrypt missing, or a bad algorithm, key or iv")
        self._lib = lib
        handle = ctypes.c_void_p()
        if lib.gcry_cipher_open(ctypes.byref(handle), algo, GCRY_CIPHER_MODE_CFB, 0):
            raise ValueError("gcry_cipher_open failed")
        self._handle: ctypes.c_void_p | None = handle
        if lib.gcry_cipher_setkey(handle, key, len(key)) or lib.gcry_cipher_setiv(
            handle, iv, len(iv)
        ):
            self.close()
            raise ValueError("gcry_cipher_setkey/setiv failed")

    def decrypt_in_place(self, data: bytearray) -> None:
        if not data:
            return
        buffer = (ctypes.c_char * len(data)).from_buffer(data)
        try:
            if self._lib.gcry_cipher_decrypt(
                self._handle, ctypes.addressof(buffer), len(data), None, 0
            ):
                raise ValueError("gcry_cipher_decrypt failed")
        finally:
            del buffer  # releases the export: the bytearray is usable again

    def close(self) -> None:
        if self._handle is not None:
            self._lib.gcry_cipher_close(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


class ZstdError(Exception):
    """The compressed data is damaged (the library's own message)."""


class ZstdDecompressor:
    """Streaming zstd decompression: ``feed`` calls ``sink`` with each filled part of the
    output buffer. By default one buffer is reused (a part is valid only during the call);
    with ``buffers``, every call fills a buffer taken from it and the sink owns that buffer
    (``part.obj``) from then on, so another thread can consume it without a copy. Frame
    checksums are verified by the library, and its default window limit (128 MiB) is the
    zstd command's."""

    def __init__(self, out_size: int, buffers: Callable[[], bytearray] | None = None) -> None:
        lib = _libzstd()
        if lib is None:
            raise ValueError("libzstd missing")
        self._lib = lib
        self._ctx = lib.ZSTD_createDCtx()
        if not self._ctx:
            raise MemoryError("ZSTD_createDCtx")
        self._buffers = buffers
        self._out = bytearray(0 if buffers else out_size)
        self._frame_open = False  # inside a frame that has not been completely decoded
        self._fed = False

    def feed(self, data: bytes, sink: Callable[[memoryview], None]) -> None:
        self._fed = self._fed or bool(data)
        source = ctypes.c_char_p(data)  # points into ``data``, which outlives the calls
        inb = _InBuffer(ctypes.cast(source, ctypes.c_void_p), len(data), 0)
        while True:
            produced, size = self._step(inb, sink)
            # Done with this input once it is all read and the output was not full (a full
            # output buffer may mean more is waiting inside the decoder).
            if inb.pos >= inb.size and produced < size:
                return

    def _step(self, inb: _InBuffer, sink: Callable[[memoryview], None]) -> tuple[int, int]:
        out = self._buffers() if self._buffers else self._out
        target = (ctypes.c_char * len(out)).from_buffer(out)
        outb = _OutBuffer(ctypes.addressof(target), len(out), 0)
        read_before = inb.pos
        result = self._lib.ZSTD_decompressStream(self._ctx, ctypes.byref(outb), ctypes.byref(inb))
        del target  # the buffer's export: it may be handed on now
        if self._lib.ZSTD_isError(result):
            raise ZstdError(self._lib.ZSTD_getErrorName(result).decode(errors="replace"))
        if outb.pos or inb.pos != read_before:
            # 0: a frame ended here. A call that did nothing answers with the size of the
            # next frame's header instead, which says nothing about the last one.
            self._frame_open = result != 0
        if outb.pos or self._buffers:
            sink(memoryview(out)[: outb.pos])  # an empty part gives a taken buffer back
        return int(outb.pos), len(out)

    def finish(self, sink: Callable[[memoryview], None]) -> None:
        """After the last input: lets the decoder finish (it may end a frame only when
        called again); the stream must not end inside a frame."""
        if not self._fed:
            raise ZstdError("no compressed data")
        empty = _InBuffer(None, 0, 0)
        while self._frame_open:
            if not self._step(empty, sink)[0]:
                raise ZstdError("the compressed data ends inside a frame (truncated)")

    def close(self) -> None:
        if self._ctx:
            self._lib.ZSTD_freeDCtx(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
