"""Text codec names: the one check that both the recipe validator and the data reader apply; and the
byte-level sniffing and escaping that keep a wrong file's bytes out of an error message."""

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


def printable(text: str, limit: int | None = None) -> str:
    """`text` with every unprintable character (NUL, newline, ESC, zero-width space...) escaped as Python
    writes it (\\x00, \\n, \\x1b, \\u200b): a terminal shows an error message as written, and a NUL or an
    escape sequence from a wrong file would garble it or hide what it names. Cut at `limit` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if limit is None or len(out) <= limit else out[:limit] + "..."


def utf16_without_bom(data: bytes) -> str | None:
    """'utf-16-le' / 'utf-16-be' when `data` looks like UTF-16 without a byte-order mark, else None.

    ASCII characters in UTF-16 are a NUL and the character, so the NULs sit on one side of each byte pair
    (odd offsets little-endian, even ones big-endian), a good share of that side for a CSV's commas, digits
    and line ends even in Chinese text; a binary file has them on both sides, or a few, or no valid UTF-16."""
    sample = data[: 1 << 16]
    sample = sample[: len(sample) // 2 * 2]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    for codec, nuls, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if nuls >= max(4, len(sample) // 40) and other <= nuls // 8:
            try:
                sample.decode(codec)
            except UnicodeDecodeError as e:
                if e.start < len(sample) - 4:  # not just a surrogate pair cut by the sample's end
                    return None
            return codec
    return None


# leading bytes of the files most often given under a text name; what each is and how to get text from it
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (`gzip -dc FILE > new.csv`) and give that file"),
    (b"PK\x03\x04", "a zip archive (an Excel .xlsx / .ods workbook?)", "export the sheet as CSV (UTF-8) or unzip it"),
    (b"PAR1", "a parquet file", "rename it to .parquet"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (`xz -dc FILE > new.csv`) and give that file"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (`zstd -dc FILE > new.csv`) and give that file"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV (`sqlite3 -csv -header ...`)"),
)


def binary_kind(data: bytes) -> tuple[str, str] | None:
    """(what the file is, how to get text from it) for a known non-text format by its leading bytes."""
    for magic, what, how in _MAGIC:
        # parquet also ends with its magic: a text header that happens to start "PAR1" is not parquet
        if data.startswith(magic) and (magic != b"PAR1" or data.endswith(magic)):
            return what, how
    return None
