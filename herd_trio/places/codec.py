"""The binary form of a PlacesIndex: what the index child writes and its cache keeps.

MAGIC, a 4-byte little-endian header length, a JSON header, then the array columns in
COLUMNS order (native byte order), then the names. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import array
import zlib
from typing import Any

import msgspec

from herd_trio.places.index import COLUMNS, PlacesIndex

MAGIC = b"HTPLACES"
FORMAT_VERSION = 1  # bump whenever the layout below changes; old caches are then rebuilt
_LENGTH = 4  # bytes of the little-endian header length after MAGIC


class IndexFormatError(ValueError):
    """Bytes that are not an index this version can read (truncated, stale, foreign)."""


class _Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What precedes the columns of an encoded index."""

    format: int
    key: str  # where the data came from; a cached index is valid only for the same key
    count: int
    cells: int
    names_bytes: int
    body_crc32: int
    vicinities: list[str]


def encode_index(index: PlacesIndex, key: str) -> bytes:
    """The index as bytes: MAGIC, header length, JSON header, then the raw columns.

    Columns are in native byte order, in COLUMNS order, then the names. The byte order
    is part of `key`'s world (the cache key includes it), and the pipe never leaves the
    machine.
    """
    body = b"".join(getattr(index, name).tobytes() for name, _ in COLUMNS) + index.names
    header = msgspec.json.encode(
        _Header(
            format=FORMAT_VERSION,
            key=key,
            count=len(index),
            cells=len(index.cell_keys),
            names_bytes=len(index.names),
            body_crc32=zlib.crc32(body),
            vicinities=list(index.vicinities),
        )
    )
    return MAGIC + len(header).to_bytes(_LENGTH, "little") + header + body


def _split(blob: bytes | memoryview) -> tuple[_Header, memoryview]:
    """The header and the body of an encoded index; IndexFormatError if it is not one."""
    view = memoryview(blob)
    prefix = len(MAGIC) + _LENGTH
    if len(view) < prefix or view[: len(MAGIC)] != MAGIC:
        raise IndexFormatError("not a places index (bad magic)")
    size = int.from_bytes(view[len(MAGIC) : prefix], "little")
    try:
        header = msgspec.json.decode(view[prefix : prefix + size], type=_Header)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise IndexFormatError(f"bad index header: {exc}") from exc
    if header.format != FORMAT_VERSION:
        raise IndexFormatError(f"index format {header.format}, expected {FORMAT_VERSION}")
    return header, view[prefix + size :]


def index_key(blob: bytes | memoryview) -> str:
    """The data key an encoded index was built for; IndexFormatError if it is not one."""
    return _split(blob)[0].key


def _read_columns(header: _Header, body: memoryview) -> tuple[dict[str, Any], int]:
    """Every column copied out of `body` (memcpy speed), and the offset just past them."""
    columns: dict[str, Any] = {}
    offset = 0
    for name, column in COLUMNS:
        values = array.array(column.typecode)
        size = values.itemsize * column.length(header.cells, header.count)
        if offset + size > len(body):
            raise IndexFormatError("index is truncated")
        values.frombytes(body[offset : offset + size])
        columns[name] = values
        offset += size
    return columns, offset


def decode_index(blob: bytes | memoryview, *, verify: bool = False) -> PlacesIndex:
    """Rebuild a PlacesIndex from `encode_index` bytes; IndexFormatError if they don't fit.

    Copies the columns out, so `blob` can be dropped afterwards. `verify` also checks
    the body's CRC: worth it for a file, not for the child's pipe.
    """
    header, body = _split(blob)
    if verify and zlib.crc32(body) != header.body_crc32:
        raise IndexFormatError("index body fails its checksum")
    columns, offset = _read_columns(header, body)
    if offset + header.names_bytes != len(body):
        raise IndexFormatError("index length does not match its header")
    index = PlacesIndex(names=bytes(body[offset:]), vicinities=tuple(header.vicinities), **columns)
    if (
        index.cell_starts[-1] != header.count
        or index.name_offsets[-1] != header.names_bytes
        or max(index.vicinity, default=0) >= max(1, len(header.vicinities))
    ):
        raise IndexFormatError("index columns are inconsistent")
    return index
