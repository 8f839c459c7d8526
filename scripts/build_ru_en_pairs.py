"""Build kdpipe/_data/ru_en/pairs.tsv.gz: Russian -> English message pairs from the Debian gettext catalogues.

Every `/usr/share/locale/ru/LC_MESSAGES/*.mo` on the machine holds (msgid = English, msgstr = Russian)
pairs. Kept: singular, non-empty, placeholder- and markup-free messages whose English side has at least
4 words and differs from the Russian; a message context (msgctxt) is stripped, the message kept;
accelerator markers (`_File`, `&Open`) are removed and whitespace is normalised; duplicates on
(ru, en) are dropped and the rows sorted. Columns: ru, en, package (the Debian package owning the .mo
file, from `dpkg -S`). Also writes SOURCES.md: the command, the date and each package's version,
licence and pair count.

    python scripts/build_ru_en_pairs.py [--locale-dir DIR] [--out-dir kdpipe/_data/ru_en]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCALE_DIR = Path("/usr/share/locale/ru/LC_MESSAGES")
OUT_DIR = ROOT / "kdpipe" / "_data" / "ru_en"
MIN_EN_WORDS = 4
# placeholders (printf %s, {name}, $VAR, \n escapes, `cmd`), markup (<b>) and tabs
_FORBIDDEN = re.compile(r"[%{}$<>\\`\t]|&\w+;")
# a marker before a letter; an accelerator is one at the start of a word (`_File`, `&Open`) or, when it is the
# string's only marker, inside a lower-case word (`Op_en`); a word found verbatim on the other side (an
# identifier such as max_wal_size, _sym) is never changed
_MARKER = re.compile(r"[_&](?=[^\W\d_])")
_WORD_START = re.compile(r"^(\W*)[_&](?=[^\W\d_])")
_MID_WORD = re.compile(r"(?<=[a-zа-яё])[_&](?=[a-zа-яё])")


def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a GNU .mo file, as stored: a plural is NUL-joined, a context is `ctxt\\x04msgid`."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0x950412DE else ">"
    if struct.unpack(endian + "I", data[:4])[0] != 0x950412DE:
        raise ValueError(f"{path}: not a GNU .mo file")
    _, count, orig_at, trans_at = struct.unpack(endian + "4I", data[4:20])
    raw = []
    for i in range(count):
        olen, ooff = struct.unpack(endian + "2I", data[orig_at + 8 * i : orig_at + 8 * i + 8])
        tlen, toff = struct.unpack(endian + "2I", data[trans_at + 8 * i : trans_at + 8 * i + 8])
        raw.append((data[ooff : ooff + olen], data[toff : toff + tlen]))
    charset = "utf-8"
    for key, value in raw:
        if key == b"":
            found = re.search(rb"charset=([\w.-]+)", value)
            if found and found.group(1).lower() != b"charset":
                charset = found.group(1).decode("ascii")
    return [(k.decode(charset, "replace"), v.decode(charset, "replace")) for k, v in raw]


def clean(text: str, other: str) -> str:
    """`text` with its accelerator markers removed and whitespace collapsed; `other` is the pair's other side."""
    shared = set(other.split())
    single = len(_MARKER.findall(text)) == 1
    words = []
    for word in text.split():
        if word not in shared:
            word = _WORD_START.sub(r"\1", word, count=1)
            if single:
                word = _MID_WORD.sub("", word, count=1)
        words.append(word)
    return " ".join(words)


def keep_pair(msgid: str, msgstr: str) -> tuple[str, str] | None:
    """(ru, en) for a usable message, None for one the rules drop."""
    if not msgid or not msgstr or "\x00" in msgid or "\x00" in msgstr:
        return None  # the header, untranslated, or a plural entry
    msgid = msgid.rsplit("\x04", 1)[-1]  # the context is stripped, the message kept
    if _FORBIDDEN.search(msgid) or _FORBIDDEN.search(msgstr) or "\ufffd" in msgstr:
        return None
    en, ru = clean(msgid, msgstr), clean(msgstr, msgid)
    if not en or not ru or en == ru or len(en.split()) < MIN_EN_WORDS:
        return None
    return ru, en


def owning_package(path: Path) -> str:
    """The Debian package that installed `path` (`dpkg -S`; the arch qualifier dropped)."""
    out = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, check=True).stdout
    return out.split(":", 1)[0].split(",")[0].strip()


def package_version(pkg: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


_LICENCE_WORDS = (
    ("GNU Lesser General Public License", "LGPL"),
    ("GNU Library General Public License", "LGPL"),
    ("GNU General Public License", "GPL"),
    ("PostgreSQL", "PostgreSQL"),
    ("BSD", "BSD"),
    ("MIT", "MIT"),
)


def package_licence(pkg: str) -> str:
    """The distinct `License:` values of the package's copyright file (first three), else a licence named
    in its text, else 'see copyright'."""
    path = Path("/usr/share/doc") / pkg / "copyright"
    if not path.is_file():
        return "no copyright file"
    text = path.read_text(errors="replace")
    found: list[str] = []
    for line in text.splitlines():
        name = line.split(":", 1)[1].strip() if line.startswith("License:") else ""
        name = name if len(name) <= 40 else name[:37] + "..."
        if name and name not in found:
            found.append(name)
    if found:
        return ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    named = [short for words, short in _LICENCE_WORDS if words in text]
    return ", ".join(dict.fromkeys(named)) + " (from the copyright text)" if named else "see copyright"


def collect(locale_dir: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Sorted unique (ru, en, package) rows, and the .mo files read (symlinked duplicates once)."""
    seen_files: set[Path] = set()
    rows: dict[tuple[str, str], str] = {}
    used = []
    for mo in sorted(locale_dir.glob("*.mo")):
        real = mo.resolve()
        if real in seen_files:
            continue
        seen_files.add(real)
        used.append(mo.name)
        pkg = owning_package(mo)
        for msgid, msgstr in read_mo(real):
            pair = keep_pair(msgid, msgstr)
            if pair is not None:
                # the first package (in file order) that contributes a pair owns it
                rows.setdefault(pair, pkg)
    return sorted((ru, en, pkg) for (ru, en), pkg in rows.items()), used


def write_pairs(rows: list[tuple[str, str, str]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(["ru", "en", "package"])
    writer.writerows(rows)
    # mtime=0: the same rows give the same bytes
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode("utf-8"))


def write_sources(rows: list[tuple[str, str, str]], files: list[str], locale_dir: Path, path: Path) -> None:
    counts = Counter(pkg for _, _, pkg in rows)
    lines = [
        "# ru_en/pairs.tsv.gz: where the pairs come from",
        "",
        f"Built on {dt.date.today().isoformat()} with",
        "",
        "```",
        "python scripts/build_ru_en_pairs.py" + ("" if locale_dir == LOCALE_DIR else f" --locale-dir {locale_dir}"),
        "```",
        "",
        f"from the {len(files)} distinct gettext catalogues in `{locale_dir}` of a Debian 12 system (msgid = English,",
        "msgstr = its Russian translation). Kept: singular, non-empty messages without placeholders or markup",
        "(any of % { } $ < > \\, a backtick, a tab or an &name; entity),",
        f"at least {MIN_EN_WORDS} English words, Russian != English; a msgctxt",
        "is stripped (the message kept); accelerators (`_File`, `&Open`) removed; whitespace normalised;",
        "deduplicated on (ru, en), sorted. A pair found in several catalogues is credited to the first package.",
        "",
        f"{len(rows):,} pairs. Columns: `ru` (source), `en` (target), `package`.",
        "",
        "The translations remain under their packages' licences (below, from `/usr/share/doc/<package>/copyright`);",
        "this file redistributes them as data under those terms.",
        "",
        "| package | version | licence | pairs |",
        "|---|---|---|---:|",
    ]
    for pkg in sorted(counts):
        lines.append(f"| {pkg} | {package_version(pkg)} | {package_licence(pkg)} | {counts[pkg]:,} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locale-dir", type=Path, default=LOCALE_DIR)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    rows, files = collect(args.locale_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_pairs(rows, args.out_dir / "pairs.tsv.gz")
    write_sources(rows, files, args.locale_dir, args.out_dir / "SOURCES.md")
    size = (args.out_dir / "pairs.tsv.gz").stat().st_size
    print(f"{len(rows):,} pairs from {len(files)} catalogues -> {args.out_dir} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
