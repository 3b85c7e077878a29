"""Error messages: every failure augssl reports is one line that names what is wrong and where."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """`exc`'s message on one line (its type's name when it has none), cut to `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
