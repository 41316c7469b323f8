"""The binary form of the offline index (codec.py): round trips and damage."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from herd_trio.places.codec import IndexFormatError, decode_index, encode_index, index_key
from herd_trio.places.index import build_index

from .offlinekit import COUNTRIES, SMALL, US_STATES, place


def test_encoded_index_round_trips() -> None:
    index = build_index([*SMALL, place(9, 1.0, 2.0, cc="NO")], COUNTRIES, US_STATES)
    blob = encode_index(index, "some key")
    assert index_key(blob) == "some key"
    assert decode_index(blob, verify=True) == index


def test_empty_index_round_trips() -> None:
    empty = build_index([], COUNTRIES, US_STATES)
    decoded = decode_index(encode_index(empty, "k"), verify=True)
    assert decoded == empty
    assert (len(decoded), decoded.cell_starts.tolist(), decoded.vicinities) == (0, [0], ())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda blob: blob[:-1], "length"),
        (lambda blob: blob[:40], "header"),
        (lambda blob: b"NOTANIDX" + blob[8:], "magic"),
        (lambda blob: blob.replace(b'"format":1', b'"format":9'), "format 9"),
    ],
)
def test_damaged_index_is_rejected(damage: Callable[[bytes], bytes], message: str) -> None:
    blob = encode_index(build_index(SMALL, COUNTRIES, US_STATES), "k")
    with pytest.raises(IndexFormatError, match=message):
        decode_index(damage(blob))


def test_flipped_bit_fails_the_checksum_when_verifying() -> None:
    blob = encode_index(build_index(SMALL, COUNTRIES, US_STATES), "k")
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])  # a name byte: the layout still fits
    assert decode_index(flipped) != decode_index(blob)
    with pytest.raises(IndexFormatError, match="checksum"):
        decode_index(flipped, verify=True)
