"""Searching a stream's adapter versions: by their tags and their own task's accuracy
(`metrics.accuracy`), done on the rows in Python (JSON queries differ between SQLite and
PostgreSQL, and a stream holds hundreds of versions, not millions)."""

from __future__ import annotations

from collections.abc import Sequence

from registry.errors import InvalidValue
from registry.tables import AdapterVersionRow
from registry.validation import check_name

MAX_TAGS = 32
MAX_TAG_VALUE = 256
ORDERS = ("id", "accuracy")  # oldest first, or best `metrics.accuracy` first


def search(
    rows: Sequence[AdapterVersionRow],
    *,
    tags: dict[str, str],
    min_accuracy: float | None,
    order_by: str,
) -> list[AdapterVersionRow]:
    """The rows holding every tag of `tags` and at least `min_accuracy`, in `order_by`
    (versions without an accuracy last)."""
    found = [
        r for r in rows
        if all((r.tags or {}).get(k) == v for k, v in tags.items())
        and (min_accuracy is None or _at_least(accuracy(r), min_accuracy))
    ]  # fmt: skip
    if order_by == "accuracy":
        found.sort(key=lambda r: -(a if (a := accuracy(r)) is not None else -1.0))
    return found


def _at_least(value: float | None, bound: float) -> bool:
    return value is not None and value >= bound


def accuracy(row: AdapterVersionRow) -> float | None:
    value = (row.metrics or {}).get("accuracy")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_tags(tags: object) -> dict[str, str]:
    if not isinstance(tags, dict):
        raise InvalidValue("must be an object of names to strings", field="tags")
    if len(tags) > MAX_TAGS:
        raise InvalidValue(f"at most {MAX_TAGS} tags, got {len(tags)}", field="tags")
    for key, value in tags.items():
        check_name(key, field=f"tags.{str(key)[:64]}")
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            raise InvalidValue(f"must be a string of at most {MAX_TAG_VALUE} characters",
                               field=f"tags.{key}")  # fmt: skip
    return dict(tags)
