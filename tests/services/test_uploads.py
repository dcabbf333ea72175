"""Reading uploads as they stream: every limit is refused after reading at most a few chunks
past it, and the records of a JSON list are json's own, however the text arrives."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from continual.errors import NESTED, InvalidDataset
from services.uploads import CHUNK, decode_utf8, json_records, read_chunks, split_lines


class Endless(io.RawIOBase):
    """A file of `head` then `fill` repeated forever; `served` counts the bytes read from it."""

    def __init__(self, head: bytes, fill: bytes) -> None:
        self.head, self.fill, self.served = head, fill, 0

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        assert (offset, whence) == (0, 0) and self.served == 0
        return 0

    def read(self, size: int = -1) -> bytes:
        assert size > 0
        data = (self.head + self.fill * (size // max(1, len(self.fill)) + 1))[:size]
        self.head = self.head[size:]
        self.served += len(data)
        return data


def _gzip_stream(fill: bytes, *, repeat: int) -> bytes:
    """A gzip member of `fill` repeated, built without holding the expansion."""
    packer = zlib.compressobj(9, wbits=31)
    return b"".join([*(packer.compress(fill) for _ in range(repeat)), packer.flush()])


def _content(data: bytes, *, limit: int = 2**30) -> bytes:
    return b"".join(read_chunks(io.BytesIO(data), max_expanded_bytes=limit))


def _refusal(call: Any) -> InvalidDataset:
    with pytest.raises(InvalidDataset) as info:
        call()
    return info.value


def test_gzip_members_are_read_in_turn_and_zero_padding_ignored() -> None:
    text = b"".join(b"line %d\n" % i for i in range(40_000))  # several chunks
    assert len(text) > 3 * CHUNK
    assert _content(text) == text  # not gzip: as it is
    members = gzip.compress(text[:1000]) + gzip.compress(text[1000:]) + gzip.compress(b"")
    assert _content(members) == text
    assert _content(members + b"\0" * (3 * CHUNK)) == text
    cases = [
        (members + b"\0" * (3 * CHUNK) + gzip.compress(b"x"), "bytes after its zero padding"),
        (members + b"not gzip", "not a valid gzip file"),
        (members[:-25], "the gzip file is truncated"),  # (the last member is 20 bytes)
        (gzip.compress(text)[:-3], "the gzip file is truncated"),
    ]
    for data, reason in cases:
        error = _refusal(lambda data=data: _content(data))
        assert error.field == "data" and reason in error.reason, (reason, error)
    assert _content(members, limit=len(text)) == text
    error = _refusal(lambda: _content(members, limit=len(text) - 1))  # the members together
    assert error.reason == f"expands to more than {len(text) - 1} bytes"


def test_a_compression_bomb_is_refused_after_reading_a_few_chunks_of_it() -> None:
    bomb = _gzip_stream(b"\n" * 2**20, repeat=16)  # 16 MiB from about 16 KiB
    file = Endless(bomb, b"\0")
    expanded = 0
    with pytest.raises(InvalidDataset, match="expands to more than 1000000 bytes"):
        for chunk in read_chunks(file, max_expanded_bytes=1_000_000):
            assert len(chunk) <= CHUNK
            expanded += len(chunk)
    assert expanded <= 1_000_000 and file.served < 2 * CHUNK


def test_lines_are_refused_as_soon_as_they_pass_the_limit() -> None:
    file = Endless(b'{"prompt": "a", "completion": "b"}\r\n\n' + b"x" * 10, b"x")
    with pytest.raises(InvalidDataset) as info:
        for _ in split_lines(read_chunks(file, max_expanded_bytes=1), max_line_bytes=100_000):
            pass
    assert (info.value.line, info.value.reason) == (3, "longer than 100000 bytes")
    assert file.served <= 100_000 + 2 * CHUNK  # the endless line was never held whole
    bomb = Endless(_gzip_stream(b"{" * 2**20, repeat=32), b"")  # 32 MiB on one line
    chunks = read_chunks(bomb, max_expanded_bytes=2**40)
    with pytest.raises(InvalidDataset, match="longer than 100000 bytes"):
        list(split_lines(chunks, max_line_bytes=100_000))
    assert bomb.served < 2 * CHUNK


def test_lines_split_at_newlines_keep_their_numbers_and_name_bad_bytes() -> None:
    text = "a\r\n\nb\u2028c\r\u00e9" + "z" * (2 * CHUNK) + "\nlast"  # U+2028 and \r stay in
    lines = list(split_lines(read_chunks(io.BytesIO(text.encode()), max_expanded_bytes=1),
                             max_line_bytes=3 * CHUNK))  # fmt: skip
    assert lines == [(1, "a"), (2, ""), (3, "b\u2028c\r\u00e9" + "z" * (2 * CHUNK)), (4, "last")]
    exact = b"x" * 10 + b"\r\n" + b"y" * 10  # the limit, without the line's end
    for pieces in ([exact], [exact[:11], exact[11:]], [exact[:10], exact[10:]]):
        assert list(split_lines(iter(pieces), max_line_bytes=10)) == [(1, "x" * 10), (2, "y" * 10)]
    assert _refusal(lambda: list(split_lines(iter([exact + b"y"]), max_line_bytes=10))).line == 2
    assert _refusal(lambda: list(split_lines(iter([b"z" + exact]), max_line_bytes=10))).line == 1
    bad = b"ok\n" + "\u00e9".encode()[:1] + b"x\n"
    error = _refusal(lambda: list(split_lines(iter([bad[:4], bad[4:]]), max_line_bytes=10)))
    assert (error.line, error.reason) == (2, "not UTF-8 (byte 3)")
    error = _refusal(lambda: list(decode_utf8(iter([b"ab\xc3", b"\xa9cd\xff"]))))
    assert error.reason == "not UTF-8 (byte 6)"
    assert list(decode_utf8(iter([b"ab\xc3", b"\xa9"]))) == ["ab", "\u00e9"]
    assert _refusal(lambda: list(decode_utf8(iter([b"ab\xc3"])))).reason == "not UTF-8 (byte 2)"


def _pieces(text: str, size: int) -> Iterator[str]:
    return (text[i : i + size] for i in range(0, len(text), size))


def _records(text: str, size: int, limit: int = 10_000) -> list[Any]:
    return [record for _, record in json_records(_pieces(text, size), max_record_bytes=limit)]


VALUES = [
    {"sentence": 'caf\u00e9 \\ " \U0001f600 \u2028', "label": "a"},
    12345,
    -4.5e-3,
    True,
    None,
    "text",
    [1, [2, {"x": [None]}]],
    {},
    [],
]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_list_gives_json_records_however_its_text_arrives(indent: int | None) -> None:
    text = json.dumps(VALUES, indent=indent, ensure_ascii=False)
    escaped = json.dumps(VALUES, indent=indent)  # \uXXXX escapes (a surrogate pair among them)
    for document in (text, escaped, f" \n{text}\n\n", text.replace(", ", ",\t\r\n ")):
        for size in (1, 2, 3, 5, 7, 64, len(document)):
            assert _records(document, size) == VALUES, (document, size)
    assert _records("[]", 1) == [] and _records(" [ \n ] ", 2) == []


@pytest.mark.parametrize(
    ("document", "field", "record", "reason"),
    [
        ("", "data", None, "the file is empty"),
        (" \n ", "data", None, "the file is empty"),
        ('{"sentence": "s"}', "records", None, "must be a JSON list"),
        ("[1, 2,]", "json", 3, "invalid JSON: Expecting value"),
        ("[1 2]", "json", 1, "invalid JSON: expected ',' or ']' after the record"),
        ('[1, {"a": 1}', "json", 2, "invalid JSON: expected ',' or ']' after the record"),
        ('[1, {"a": tru}]', "json", 2, "invalid JSON: Expecting value"),
        ('[1, {"a": "b\nc"}]', "json", 2, "invalid JSON: Invalid control character at"),
        ('[1, {"a": "bc}]', "json", 2, "invalid JSON: Unterminated string starting at"),
        ("[1] x", "json", None, "invalid JSON: extra data after the list"),
        ("[1, " + "[" * 5000 + "]" * 5000 + "]", "json", 2, NESTED),
        ('[1, "' + "x" * 10_000 + '"]', "data", 2, "longer than 10000 bytes"),
        ('[1, "' + "\u00e9" * 5000 + '"]', "data", 2, "longer than 10000 bytes"),  # 10002 bytes
    ],
)
def test_json_list_errors_name_the_record_however_the_text_arrives(
    document: str, field: str, record: int | None, reason: str
) -> None:
    for size in (1, 3, 64, max(1, len(document))):
        error = _refusal(lambda size=size: _records(document, size, limit=10_000))
        assert (error.field, error.record, error.line) == (field, record, None), size
        assert error.reason.startswith(reason), (size, error.reason)


def test_a_json_record_is_refused_as_soon_as_it_passes_the_limit() -> None:
    file = Endless(b'[{"sentence": "', b"a")  # a record that never ends
    chunks = read_chunks(file, max_expanded_bytes=1)
    with pytest.raises(InvalidDataset) as info:
        list(json_records(decode_utf8(chunks), max_record_bytes=100_000))
    assert (info.value.record, info.value.reason) == (1, "longer than 100000 bytes")
    assert file.served <= 100_000 + 2 * CHUNK
    bomb = gzip.compress(b"[") + _gzip_stream(b" " * 2**20, repeat=8)  # then 8 MiB of spaces
    chunks = read_chunks(io.BytesIO(bomb), max_expanded_bytes=10**6)
    with pytest.raises(InvalidDataset, match="expands to more than 1000000 bytes"):
        list(json_records(decode_utf8(chunks), max_record_bytes=100))
