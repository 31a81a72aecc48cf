"""Where the raw values of one tensor stored in a ``.distcp`` file are, so they can be read in place.

PyTorch's distributed-checkpoint writer stores every tensor chunk as a small ``torch.save``
archive (an uncompressed zip: a pickle that names one storage, and that storage's bytes) at
an offset of a ``.distcp`` file. ``torch.load`` of such a chunk needs the whole archive in
memory *and* copies the storage out of it, so reading one chunk costs twice its size and a
memcpy. The archive's zip directory says exactly where the storage's bytes are, so they can
go straight from the file into their destination (or into one buffer that is then viewed
as the tensor): one copy, at most one chunk of temporary memory.

Only archives of the expected shape are read this way (one uncompressed storage of exactly
the chunk's size, little-endian); anything else returns None and the caller falls back to
``torch.load``.
"""
from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass
from typing import BinaryIO, Optional

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


class _Window(io.RawIOBase):
    """The bytes ``[start, start + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, handle: BinaryIO, start: int, length: int):
        self._handle, self._start, self._length, self._pos = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._handle.seek(self._start + self._pos)
        got = self._handle.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


@dataclass(frozen=True)
class StoredPayload:
    """The storage bytes of one stored chunk: absolute file offset and length."""

    offset: int
    length: int


def locate_payload(handle: BinaryIO, start: int, length: int, expected_bytes: int) -> Optional[StoredPayload]:
    """The storage bytes of the ``torch.save`` archive at ``[start, start + length)``, or None.

    Reads only the zip directory (a few hundred bytes at the archive's end) and one local
    header. None when the archive is not one uncompressed little-endian storage of
    ``expected_bytes`` bytes (e.g. a view of a larger storage was saved).
    """
    try:
        archive = zipfile.ZipFile(_Window(handle, start, length))
    except zipfile.BadZipFile:
        return None
    with archive:
        infos = archive.infolist()
        data = [i for i in infos if "/data/" in i.filename and not i.filename.rsplit("/", 1)[-1].startswith(".")]
        order = [i for i in infos if i.filename.endswith("/byteorder")]
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != expected_bytes:
            return None
        if order and archive.read(order[0]).strip() != b"little":
            return None
        header_offset = data[0].header_offset
    handle.seek(start + header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_MAGIC:
        return None
    name_len, extra_len = fields[-2], fields[-1]
    payload = start + header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if payload + expected_bytes > start + length:
        return None
    return StoredPayload(payload, expected_bytes)
