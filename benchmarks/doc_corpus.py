"""Collect a text corpus from a Debian system's package documentation (offline), to train and evaluate on.

    python benchmarks/doc_corpus.py corpus.txt                  # ~40 MB from /usr/share/doc
    twomamba-train --config small --config.data.source=text:corpus.txt ...

Reads the files under ``--root`` in name order (changelogs, NEWS, README files; gzipped ones decompressed; no
``copyright`` files), keeps those that decode as UTF-8 and are printable text, and writes them joined by blank
lines (so every file is at least one document of a ``text:`` source) until ``--megabytes`` is reached.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

TEXT_SUFFIXES = ("", ".txt", ".md", ".rst", ".gz")


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not printable UTF-8 text."""
    if path.name == "copyright" or path.suffix not in TEXT_SUFFIXES:
        return None
    try:
        text = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    head = text[:2000]
    if not head or sum(c.isprintable() or c in "\n\t" for c in head) < 0.98 * len(head):
        return None
    return text


def collect(root: Path, limit: int) -> list[str]:
    """Texts of the files under ``root``, in path order, until their UTF-8 size passes ``limit`` bytes."""
    texts, size = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        text = read_text(path)
        if text is None:
            continue
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= limit:
            break
    return texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="the text file to write")
    parser.add_argument("--root", type=Path, default=Path("/usr/share/doc"), help="directory to read")
    parser.add_argument("--megabytes", type=float, default=40.0, help="stop after this much text")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root: {args.root} is not a directory")
    if args.megabytes <= 0:
        parser.error(f"--megabytes: expected a positive number; got {args.megabytes}")
    texts = collect(args.root, int(args.megabytes * 1e6))
    if not texts:
        parser.error(f"--root: no text files under {args.root}")
    args.output.write_text("\n\n".join(texts), encoding="utf-8")
    print(f"wrote {args.output}: {len(texts)} files, {args.output.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
