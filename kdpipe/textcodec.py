"""Text codec names: the one check that both the recipe validator and the data reader apply."""

from __future__ import annotations

import codecs


def encoding_problem(name: str) -> str | None:
    if name == "auto":
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return f"unknown encoding '{name}' (e.g. utf-8, cp1252, latin-1, cp1251, utf-16, or 'auto')"
    if not getattr(info, "_is_text_encoding", True):
        return f"'{name}' is not a text encoding (e.g. utf-8, cp1252, latin-1, cp1251, utf-16, or 'auto')"
    return None
