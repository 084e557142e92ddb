"""Vocabularies (numpy level; no TensorFlow). seqio adapters are in ``taipan_jax.data.seqio_tasks``.

Every vocabulary has ``vocab_size``, ``pad_id``, ``eos_id``, ``bos_id`` (the id a document's input
starts with: the "decoder start" token), ``encode(text) -> int32 array``, ``decode(ids) -> str`` and
``bytes_per_token(ids)`` (how many UTF-8 bytes each token stands for; 0 for special ids), used for
bits per byte.

* ``bytes`` — :class:`ByteVocabulary`, seqio's layout: 0 pad, 1 EOS, 2 UNK, byte b -> b + 3.
* ``spm:<path>`` — a SentencePiece model (train one with ``python -m taipan_jax.data.train_spm``).
* ``hf:<path to tokenizer.json>[;eos=<token>][;bos=<token>]`` — a local Hugging Face tokenizer
  (``tokenizers`` library; e.g. Llama-3's ``tokenizer.json``).
* ``tiktoken:<path to a .tiktoken BPE file>[;pattern=llama3|cl100k|gpt2][;special=llama3|none]`` —
  a local tiktoken rank file (e.g. Llama-3's ``tokenizer.model``); ``special=llama3`` adds Llama-3's
  256 special tokens after the ranks.

Nothing is downloaded: every path is a local file.

Undecodable output (token sequences that are not valid UTF-8, e.g. half of a multi-byte character)
is decoded with U+FFFD replacement characters — the project's documented policy; decoding never
raises on model output. Ids outside ``[0, vocab_size)`` raise ``ValueError``.
"""

from __future__ import annotations

import base64
import functools
import os

import numpy as np


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}): min {ids.min()}, max {ids.max()}")
    return ids


class ByteVocabulary:
    """UTF-8 bytes with seqio's three special ids in front (vocab size 259).

    Decoding drops special ids; byte sequences that are not valid UTF-8 are decoded with
    ``errors="replace"`` (U+FFFD), the documented policy of this project.
    """

    name = "bytes"
    pad_id = 0
    eos_id = 1
    unk_id = 2
    bos_id = 0  # seqio's decoder start token (= pad)
    offset = 3
    vocab_size = 256 + 3

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def bytes_per_token(self, ids) -> np.ndarray:
        """Bytes each token stands for (1 for a byte, 0 for a special id)."""
        return (np.asarray(ids) >= self.offset).astype(np.int32)


class _TableVocabulary:
    """Shared pieces: ``bytes_per_token`` from a per-id table built on first use."""

    _table: np.ndarray | None = None

    def _byte_lengths(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def bytes_per_token(self, ids) -> np.ndarray:
        if self._table is None:
            self._table = self._byte_lengths().astype(np.int32)
        return self._table[np.asarray(ids)]


class SentencePieceVocabulary(_TableVocabulary):
    """A local SentencePiece model. ``bos_id`` is the model's BOS, or 0 (= pad, seqio's) if it has none."""

    def __init__(self, path: str):
        import sentencepiece as spm

        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.name = f"spm:{path}"
        self.vocab_size = int(self.sp.get_piece_size())
        self.pad_id = max(int(self.sp.pad_id()), 0)
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path!r} has no EOS piece (train it with eos_id >= 0)")
        self.unk_id = int(self.sp.unk_id())
        self.bos_id = int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else self.pad_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        keep = [int(i) for i in ids if not self.sp.is_control(int(i))]
        return self.sp.decode(keep)

    def _byte_lengths(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


@functools.lru_cache(maxsize=1)
def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (byte-level BPE token strings -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")


class HFTokenizerVocabulary(_TableVocabulary):
    """A local Hugging Face ``tokenizer.json`` (``tokenizers`` library); no special tokens are added
    by ``encode``. EOS / BOS are found by their usual names or given as ``eos=`` / ``bos=`` options."""

    def __init__(self, path: str, eos: str = "", bos: str = "", pad: str = ""):
        from tokenizers import Tokenizer

        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        self.path, self.name = path, f"hf:{path}"
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._find(eos, _EOS_NAMES, "eos")
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {path!r}: no EOS token found (looked for {list(_EOS_NAMES)}); name one with ';eos=<token>'"
            )
        found_bos = self._find(bos, _BOS_NAMES, "bos")
        found_pad = self._find(pad, ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"), "pad")
        self.pad_id = self.eos_id if found_pad is None else found_pad
        self.bos_id = self.eos_id if found_bos is None else found_bos
        self.unk_id = None
        self._special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}

    def _find(self, given: str, names, what: str):
        if given:
            i = self.tok.token_to_id(given)
            if i is None:
                raise ValueError(f"tokenizer {self.path!r} has no {what} token {given!r}")
            return int(i)
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _byte_lengths(self) -> np.ndarray:
        u2b = _gpt2_unicode_to_byte()
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            t = self.tok.id_to_token(i)
            if t is None or t in self._special:
                continue
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                out[i] = 1  # SentencePiece-style byte fallback
            elif all(c in u2b for c in t):
                out[i] = len(t)  # byte-level BPE: one character per byte
            else:
                out[i] = len(t.replace("\u2581", " ").encode("utf-8"))
        return out


# The pre-tokenisation patterns of well-known tiktoken encodings.
TIKTOKEN_PATTERNS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
}


def llama3_special_tokens() -> list[str]:
    """Llama 3.1's 256 special tokens, in id order after the 128,000 ranks."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken rank file: one ``base64(token) rank`` per line (read locally, never cached)."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a tiktoken rank line ('<base64 token> <rank>'): {line[:80]!r}") from e
    if not ranks:
        raise ValueError(f"tiktoken file {path!r} is empty")
    return ranks


class TiktokenVocabulary(_TableVocabulary):
    """A local tiktoken BPE rank file. ``special=llama3`` appends Llama-3's special tokens (EOS
    ``<|end_of_text|>``, BOS ``<|begin_of_text|>``); ``special=none`` appends one ``<|endoftext|>`` (EOS)."""

    def __init__(self, path: str, pattern: str = "llama3", special: str = "llama3"):
        import tiktoken

        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tiktoken file {path!r} does not exist")
        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"unknown tiktoken pattern {pattern!r}; known: {sorted(TIKTOKEN_PATTERNS)}")
        ranks = read_tiktoken_ranks(path)
        n = len(ranks)
        if special == "llama3":
            names = llama3_special_tokens()
            eos, bos = "<|end_of_text|>", "<|begin_of_text|>"
        elif special == "none":
            names, eos, bos = ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>"
        else:
            raise ValueError(f"unknown tiktoken special-token set {special!r}; use 'llama3' or 'none'")
        specials = {t: n + i for i, t in enumerate(names)}
        self.path, self.name = path, f"tiktoken:{path}"
        self.enc = tiktoken.Encoding(name=f"local:{os.path.basename(path)}", pat_str=TIKTOKEN_PATTERNS[pattern],
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.n_ranks = n
        self.vocab_size = n + len(names)
        self.eos_id, self.bos_id = specials[eos], specials[bos]
        self.pad_id = specials.get("<|finetune_right_pad_id|>", self.eos_id)
        self.unk_id = None

    def encode(self, text: str) -> np.ndarray:
        # Special-token text inside documents is encoded as ordinary text, never as a special id.
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(x, np.int32) for x in self.enc.encode_ordinary_batch(texts)]

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        return self.enc.decode([int(i) for i in ids if i < self.n_ranks], errors="replace")

    def _byte_lengths(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.n_ranks):
            out[i] = len(self.enc.decode_single_token_bytes(i))
        return out


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``kind[:arg][;key=value]*`` -> ``(kind, arg, options)``."""
    head, *opts = spec.split(";")
    kind, _, arg = head.partition(":")
    options = {}
    for o in opts:
        if not o.strip():
            continue
        k, eq, v = o.partition("=")
        if not eq:
            raise ValueError(f"{spec!r}: option {o!r} is not key=value")
        options[k.strip()] = v.strip()
    return kind.strip(), arg.strip(), options


def _take(options: dict, spec: str, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{spec!r}: unknown option(s) {unknown}; allowed: {list(allowed)}")
    return options


@functools.lru_cache(maxsize=16)
def get_vocabulary(name: str):
    """A vocabulary by spec: ``bytes``, ``spm:<path>``, ``hf:<tokenizer.json>``, ``tiktoken:<file>``."""
    kind, arg, options = parse_spec(name)
    if kind == "bytes" and not arg:
        _take(options, name, ())
        return ByteVocabulary()
    if kind == "spm":
        _take(options, name, ())
        return SentencePieceVocabulary(arg)
    if kind == "hf":
        return HFTokenizerVocabulary(arg, **_take(options, name, ("eos", "bos", "pad")))
    if kind == "tiktoken":
        return TiktokenVocabulary(arg, **_take(options, name, ("pattern", "special")))
    raise ValueError(
        f"unknown vocabulary {name!r}; available: 'bytes', 'spm:<model file>', 'hf:<tokenizer.json>', "
        "'tiktoken:<rank file>'"
    )
