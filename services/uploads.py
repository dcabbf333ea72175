"""Reading an uploaded file in bounded memory, as it streams from the upload's (spooled) file:
its bytes in chunks (a gzip file's content decompressed as it is read), then its JSONL lines or
the records of its JSON list. Nothing holds more than a chunk and one line or record, and a
limit is refused as soon as it is passed: a compression bomb or a 200 MB line costs a few chunks
of memory, not their size (`tests/api/test_upload_memory.py` measures the server's).

Errors are `InvalidDataset` whose field is `data` (the file) or `json`; the caller names the file.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from continual.errors import NESTED, InvalidDataset

CHUNK = 64 * 1024  # bytes read, or decompressed, at a time
GZIP_MAGIC = b"\x1f\x8b"


def read_chunks(file: BinaryIO, *, max_expanded_bytes: int) -> Iterator[bytes]:
    """The file's content from its start, a chunk at a time: a gzip file's decompressed
    content, of at most `max_expanded_bytes`."""
    file.seek(0)
    head = file.read(CHUNK)
    if head.startswith(GZIP_MAGIC):
        yield from _gunzip(head, file, limit=max_expanded_bytes)
        return
    while head:
        yield head
        head = file.read(CHUNK)


def _gunzip(data: bytes, file: BinaryIO, *, limit: int) -> Iterator[bytes]:
    """Every member of a gzip file in turn (as gzip tools read a concatenation of gzip files),
    decompressed a chunk at a time: more than `limit` bytes in all is refused as soon as it is
    reached. Zero bytes after the last member (tape padding) are ignored, as gzip does."""
    expanded = 0
    try:
        while True:  # one member per pass; `data` holds its first bytes
            inflater = zlib.decompressobj(wbits=31)
            while not inflater.eof:
                data = data or file.read(CHUNK)
                out = inflater.decompress(data, CHUNK)
                if not data and not out:  # the file ended inside the member
                    raise InvalidDataset(field="data", reason="the gzip file is truncated")
                data = inflater.unconsumed_tail
                expanded += len(out)
                if expanded > limit:
                    raise InvalidDataset(field="data", reason=f"expands to more than {limit} bytes")
                if out:
                    yield out
            data, padding = inflater.unused_data, 0
            while not data.strip(b"\0"):  # nothing after the member but zeros, so far
                padding += len(data)
                data = file.read(CHUNK)
                if not data:
                    return
            if padding:
                reason = "not a valid gzip file: bytes after its zero padding"
                raise InvalidDataset(field="data", reason=reason)
    except zlib.error as exc:
        raise InvalidDataset(field="data", reason=f"not a valid gzip file: {exc}") from exc


def split_lines(chunks: Iterator[bytes], *, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """The content's lines, numbered from 1 and decoded as UTF-8. A line ends at `\\n` (a `\\r`
    before it is dropped), as in JSON Lines; one longer than `max_line_bytes` is refused as soon
    as its bytes pass the limit, before it is held whole."""
    number, offset, pending = 0, 0, bytearray()  # offset: where `pending` starts in the content
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending += chunk[start:end]
            number += 1
            yield number, _line(pending, number=number, offset=offset, limit=max_line_bytes)
            offset += len(pending) + 1
            pending.clear()
            start = end + 1
        pending += chunk[start:]
        if len(pending) > max_line_bytes + 1:  # (+ 1: room for a `\r` before its `\n`)
            raise _too_long(max_line_bytes, line=number + 1)
    if pending:
        yield number + 1, _line(pending, number=number + 1, offset=offset, limit=max_line_bytes)


def _line(raw: bytearray, *, number: int, offset: int, limit: int) -> str:
    size = len(raw) - raw.endswith(b"\r")
    if size > limit:
        raise _too_long(limit, line=number)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 (byte {offset + exc.start})"
        raise InvalidDataset(field="data", reason=reason, line=number) from None
    return text[:size] if size < len(raw) else text  # (`\r` is one byte and one character)


def _too_long(limit: int, *, line: int | None = None, record: int | None = None) -> InvalidDataset:
    return InvalidDataset(
        field="data", reason=f"longer than {limit} bytes", line=line, record=record
    )


def decode_utf8(chunks: Iterator[bytes]) -> Iterator[str]:
    """The content decoded as UTF-8, piece by piece (a character cut between chunks is joined);
    a malformed byte is refused with its offset in the content."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0  # bytes given to the decoder so far
    try:
        for chunk in chunks:
            text = decoder.decode(chunk)
            fed += len(chunk)
            if text:
                yield text
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:  # `exc.start` counts from the bytes the decoder held back
        at = fed - len(decoder.getstate()[0]) + exc.start
        raise InvalidDataset(field="data", reason=f"not UTF-8 (byte {at})") from None


LIST = "must be a JSON list of {sentence, label} objects"  # (the one list format uploaded)


def json_records(pieces: Iterator[str], *, max_record_bytes: int) -> Iterator[tuple[int, Any]]:
    """The records of a JSON list, numbered from 1, each parsed (by json's parser) as soon as it
    has been read whole: whatever the list's length or layout (pretty-printed or on one line),
    memory holds one record, and one longer than `max_record_bytes` is refused as it is read."""
    text = _Text(pieces)
    first = text.peek()
    if first != "[":
        reason = "the file is empty" if not first else LIST
        raise InvalidDataset(field="data" if not first else "records", reason=reason)
    text.pos += 1
    number = 0
    if text.peek() == "]":
        text.pos += 1
    else:
        while True:
            number += 1
            text.peek()
            yield number, text.value(limit=max_record_bytes, number=number)
            after = text.peek()
            if after not in (",", "]"):
                reason = "invalid JSON: expected ',' or ']' after the record"
                raise InvalidDataset(field="json", reason=reason, record=number)
            text.pos += 1
            if after == "]":
                break
    if text.peek():
        raise InvalidDataset(field="json", reason="invalid JSON: extra data after the list")


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's
_DECODER = json.JSONDecoder()
# A parse error this close to the end of the text read so far may be the cut's, not the record's
# (a literal, a number or an escape cut short): the record is read further and parsed again.
_CUT_SLACK = 32


class _Text:
    """Text arriving in pieces, read from `pos`; what lies before `pos` is dropped as more
    arrives."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.text, self.pos, self.ended = "", 0, False

    def more(self, at_least: int = 1) -> None:
        """Read on until `at_least` more characters have arrived, or the content ends."""
        parts, got = [self.text[self.pos :]], 0
        for piece in self._pieces:
            parts.append(piece)
            got += len(piece)
            if got >= at_least:
                break
        else:
            self.ended = True
        self.text, self.pos = "".join(parts), 0

    def peek(self) -> str:
        """The next character that is not whitespace ('' at the end), `pos` moved to it."""
        while True:
            match = _WHITESPACE.match(self.text, self.pos)
            self.pos = match.end() if match else self.pos
            if self.pos < len(self.text) or self.ended:
                return self.text[self.pos : self.pos + 1]
            self.more()

    def value(self, *, limit: int, number: int) -> Any:
        """The JSON value at `pos` (record `number`, of at most `limit` bytes); `pos` moves past
        it. Read on (doubling what is held, so a record is parsed a few times at most) while it
        may be cut short."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated") or exc.pos >= len(self.text) - _CUT_SLACK
                if self.ended or not cut:
                    reason = f"invalid JSON: {exc.msg}"
                    raise InvalidDataset(field="json", reason=reason, record=number) from None
            except RecursionError:  # json's parser recurses once per nesting level
                raise InvalidDataset(field="json", reason=NESTED, record=number) from None
            else:
                if end < len(self.text) or self.ended:  # (a number at the end may go on)
                    chars = end - self.pos
                    if chars > limit or (
                        chars * 4 > limit and len(self.text[self.pos : end].encode()) > limit
                    ):
                        raise _too_long(limit, record=number)
                    self.pos = end
                    return value
            held = len(self.text) - self.pos
            if held > limit:  # characters: at least as many bytes
                raise _too_long(limit, record=number)
            self.more(at_least=min(max(held, CHUNK), limit + 1 - held))
