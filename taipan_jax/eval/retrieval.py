"""In-context retrieval evaluations: MQAR by sequence length and number of key-value pairs, and a
synthetic SWDE/FDA-style task (extract one attribute's value from a long semi-structured document).

Every task is a batch of token rows ``inputs`` / ``targets`` (``targets[t] = inputs[t + 1]``) and
``weights`` (1 where a target is scored). A **predictor** is any callable
``inputs (b, l) int32 -> predictions (b, l) int32`` (the predicted next token at every position);
:func:`evaluate_predictor` scores it teacher-forced:

* ``accuracy`` — the fraction of scored positions predicted exactly (MQAR's metric: one position
  per queried key);
* ``exact_match`` — the fraction of examples whose scored positions are *all* right. For SWDE the
  scored span is the value's tokens plus the newline that ends it, so an example is an exact match
  exactly when greedy decoding from the prompt would write the value and stop at the newline.

Predictors: :func:`model_predictor` (a model's argmax, batched and jitted), oracles that solve a
task from the inputs alone (:func:`mqar_oracle`, :func:`swde_oracle`) and random guessers with an
analytic chance level (:func:`uniform_guesser`: ``1 / (high - low)`` per position, i.e. ``2 / V``
for MQAR's values; :func:`swde_field_guesser`: copies a uniformly chosen field of the document,
``1 / num_fields``).

SWDE-style document (text, tokenised by the model's vocabulary; each piece is encoded on its own
and the pieces' tokens are concatenated, so a value has the same tokens in the document and in
the answer)::

    [BOS] <html><body>                             # header
    <p>Nolo rava ketimu ...</p>                    # filler: prose, navigation, related items,
    <tr><th>director</th><td> Kavel Morani </td></tr>   #   dates and numbers (distractors)
    ...                                            # num_fields fields at random places
    </body></html>
    director: Kavel Morani                         # query "\\n{attribute}:", answer " {value}" "\\n"

Well-formed by construction (``check_swde_example``): the attribute names are distinct, the values
are distinct, the queried value and every field label occur exactly once in the document text.

CLI::

    python -m taipan_jax.eval.retrieval --workdir=DIR --task=mqar --lengths=64,128,256 --num_pairs=4,8,16
    python -m taipan_jax.eval.retrieval --workdir=DIR --task=swde --lengths=512,1024 --num_fields=4,8
    python -m taipan_jax.eval.retrieval --task=mqar --predictor=random --vocab_size=64 ...  # reference
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np

from taipan_jax.data.mqar import MQARConfig, mqar_accuracy, mqar_rows

Predictor = Callable[[np.ndarray], np.ndarray]


# -- scoring ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class RetrievalBatch:
    inputs: np.ndarray  # (n, l) int32
    targets: np.ndarray  # (n, l) int32
    weights: np.ndarray  # (n, l) float32, 1 at scored positions
    info: dict = dataclasses.field(default_factory=dict)  # task settings (reported with the scores)
    examples: list | None = None  # per-example details (SWDE: text, attribute, value, fields)


def score_predictions(predictions, targets, weights) -> dict[str, float]:
    """``accuracy`` over scored positions (MQAR's :func:`mqar_accuracy`), ``exact_match`` per row."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    w = np.asarray(weights) > 0
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ in shape")
    rows = w.any(axis=1)
    if not rows.all():
        raise ValueError(f"{int((~rows).sum())} example(s) have no scored position")
    right = (predictions == targets) | ~w
    return {"accuracy": mqar_accuracy(predictions, targets, w),
            "exact_match": float(right.all(axis=1).mean()),
            "examples": int(targets.shape[0]), "scored_positions": int(w.sum())}


def evaluate_predictor(predictor: Predictor, batch: RetrievalBatch, batch_size: int | None = None) -> dict:
    """Scores of ``predictor`` on ``batch`` (called on slices of ``batch_size`` rows, or all at once)."""
    n = batch.inputs.shape[0]
    step = n if not batch_size else int(batch_size)
    parts = [np.asarray(predictor(batch.inputs[lo: lo + step])) for lo in range(0, n, step)]
    preds = np.concatenate(parts, axis=0)
    if preds.shape != batch.inputs.shape:
        raise ValueError(f"the predictor returned shape {preds.shape} for inputs {batch.inputs.shape}")
    return {**batch.info, **score_predictions(preds, batch.targets, batch.weights)}


# -- MQAR ------------------------------------------------------------------------------------------
def mqar_batch(seq_len: int, num_pairs: int, *, vocab_size: int, num_examples: int, seed: int = 0,
               num_queries: int | None = None, power_a: float = 0.01, random_non_queries: bool = True,
               split: str = "test") -> RetrievalBatch:
    """``num_examples`` MQAR rows of ``seq_len`` tokens (taipan_jax.data.mqar; ``num_queries`` defaults to
    ``num_pairs``, Zoology's setting)."""
    cfg = MQARConfig(vocab_size=vocab_size, num_pairs=num_pairs, num_queries=num_queries or num_pairs,
                     seq_len=seq_len, power_a=power_a, random_non_queries=random_non_queries)
    rows = mqar_rows(cfg, seed, range(num_examples), split)
    info = {"task": "mqar", "seq_len": seq_len, "num_pairs": num_pairs, "num_queries": cfg.num_queries,
            "vocab_size": vocab_size, "chance_uniform": 2.0 / vocab_size}
    return RetrievalBatch(rows["inputs"], rows["targets"], rows["weights"], info)


def evaluate_mqar(predictor: Predictor, *, lengths: Sequence[int], num_pairs: Sequence[int], vocab_size: int,
                  num_examples: int = 64, seed: int = 0, num_queries: int | None = None, power_a: float = 0.01,
                  random_non_queries: bool = True, batch_size: int | None = None) -> list[dict]:
    """MQAR scores for every (length, pairs) setting; settings that do not fit are reported as skipped."""
    out = []
    for L in lengths:
        for P in num_pairs:
            try:
                batch = mqar_batch(L, P, vocab_size=vocab_size, num_examples=num_examples, seed=seed,
                                   num_queries=num_queries, power_a=power_a, random_non_queries=random_non_queries)
            except ValueError as e:
                out.append({"task": "mqar", "seq_len": L, "num_pairs": P, "skipped": str(e)})
                continue
            out.append(evaluate_predictor(predictor, batch, batch_size))
    return out


def mqar_oracle(inputs: np.ndarray) -> np.ndarray:
    """Solves MQAR from the inputs: after a token, predict what followed its first occurrence.

    The key-value pairs come first, so a queried key's first occurrence is its pair."""
    inputs = np.asarray(inputs)
    out = np.zeros_like(inputs)
    for r, row in enumerate(inputs):
        first: dict[int, int] = {}
        for t, tok in enumerate(row.tolist()):
            s = first.setdefault(tok, t)
            if s < t and s + 1 < row.size:
                out[r, t] = row[s + 1]
    return out


def uniform_guesser(low: int, high: int, seed: int = 0) -> Predictor:
    """Predicts uniform random ids in ``[low, high)`` everywhere (chance ``1 / (high - low)``)."""
    rng = np.random.default_rng(seed)
    return lambda inputs: rng.integers(low, high, np.shape(inputs)).astype(np.int32)


# -- SWDE / FDA style ------------------------------------------------------------------------------
# attribute -> kind of value
ATTRIBUTES: dict[str, str] = {
    "title": "name", "director": "name", "author": "name", "publisher": "name", "studio": "name",
    "city": "word", "country": "word", "genre": "word", "language": "word", "founder": "name",
    "year": "year", "founded": "year", "released": "date", "runtime": "minutes", "pages": "count",
    "price": "price", "rating": "rating", "isbn": "code", "population": "count", "employees": "count",
}
_SYLLABLES = ("ka", "ve", "lo", "ri", "mu", "no", "ta", "si", "de", "ba", "zu", "pe", "xo", "qui", "lan",
              "tor", "mi", "ga", "fe", "dro", "sul", "ne", "wa", "yo")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclasses.dataclass(frozen=True)
class SWDEConfig:
    seq_len: int = 512  # model inputs per example ([BOS] + document + query + answer, minus one)
    num_fields: int = 8  # attribute-value fields in the document (one is queried)

    def __post_init__(self):
        if not 1 <= self.num_fields <= len(ATTRIBUTES):
            raise ValueError(f"SWDE num_fields must be in [1, {len(ATTRIBUTES)}], got {self.num_fields}")


def _word(rng, lo=2, hi=4) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.integers(lo, hi + 1)))


def _value(kind: str, rng) -> str:
    if kind == "name":
        return f"{_word(rng).capitalize()} {_word(rng).capitalize()}"
    if kind == "word":
        return _word(rng, 2, 4).capitalize()
    if kind == "year":
        return str(int(rng.integers(1850, 2030)))
    if kind == "date":
        return f"{int(rng.integers(1, 29))} {rng.choice(_MONTHS)} {int(rng.integers(1900, 2030))}"
    if kind == "minutes":
        return f"{int(rng.integers(60, 240))} min"
    if kind == "count":
        return f"{int(rng.integers(100, 999))},{int(rng.integers(0, 1000)):03d}"
    if kind == "price":
        return f"${int(rng.integers(1, 500))}.{int(rng.integers(0, 100)):02d}"
    if kind == "rating":
        return f"{rng.integers(10, 100) / 10:.1f}/10"
    if kind == "code":
        return f"{int(rng.integers(100, 999))}-{int(rng.integers(0, 10))}-{int(rng.integers(10000, 99999))}"
    raise ValueError(kind)


def _filler(rng) -> str:
    kind = rng.integers(0, 4)
    if kind == 0:
        words = [_word(rng) for _ in range(rng.integers(5, 13))]
        return "<p>" + " ".join(words).capitalize() + ".</p>\n"
    if kind == 1:
        links = " | ".join(f'<a href="/{_word(rng)}">{_word(rng).capitalize()}</a>' for _ in range(rng.integers(2, 5)))
        return f'<div class="nav">{links}</div>\n'
    if kind == 2:  # a related item: a distractor name and year
        return f'<li class="related">{_value("name", rng)} ({_value("year", rng)})</li>\n'
    return f'<span class="meta">{_value(str(rng.choice(["count", "price", "date", "rating"])), rng)}</span>\n'


def _field_open(attr: str) -> str:
    return f"<tr><th>{attr}</th><td>"


_FIELD_CLOSE = " </td></tr>\n"
_HEADER, _FOOTER = "<html><body>\n", "</body></html>"


def _query(attr: str) -> str:
    return f"\n{attr}:"


def _find(row: np.ndarray, pattern: np.ndarray, start: int = 0) -> int:
    """First index >= start where ``pattern`` occurs in ``row`` (-1 if none)."""
    n, m = row.size, pattern.size
    if m == 0 or n - start < m:
        return -1
    win = np.lib.stride_tricks.sliding_window_view(row[start:], m)
    hits = np.nonzero((win == pattern).all(axis=1))[0]
    return int(hits[0]) + start if hits.size else -1


def swde_example(cfg: SWDEConfig, vocab, seed: int, index: int) -> dict:
    """One example (a pure function of ``(seed, index)``): ``tokens`` (<= seq_len + 1), the scored
    ``answer`` mask over ``tokens``, the document ``text``, ``attribute``, ``value`` and ``fields``."""
    for attempt in range(100):  # redraw the rare document where a value also occurs elsewhere
        ex = _swde_draw(cfg, vocab, np.random.default_rng([seed, 7, index, attempt]))
        if all(ex["text"].count(v) == 1 for v in ex["fields"].values()):
            return ex
    raise RuntimeError(f"could not draw a well-formed SWDE document (seed {seed}, index {index})")


def _swde_draw(cfg: SWDEConfig, vocab, rng) -> dict:
    enc = lambda s: np.asarray(vocab.encode(s), np.int32)
    attrs = [str(a) for a in rng.choice(list(ATTRIBUTES), cfg.num_fields, replace=False)]
    fields: dict[str, str] = {}
    for a in attrs:
        v = _value(ATTRIBUTES[a], rng)
        while any(v in u or u in v for u in fields.values()):
            v = _value(ATTRIBUTES[a], rng)
        fields[a] = v
    attr = attrs[int(rng.integers(0, len(attrs)))]
    value = fields[attr]
    answer = [enc(" " + value), enc("\n")]
    query = enc(_query(attr))
    field_pieces = {a: (_field_open(a), " " + v, _FIELD_CLOSE) for a, v in fields.items()}
    fixed = 1 + len(enc(_HEADER)) + len(enc(_FOOTER)) + len(query) + sum(len(x) for x in answer)
    fixed += sum(len(enc(p)) for ps in field_pieces.values() for p in ps)
    budget = cfg.seq_len + 1 - fixed
    if budget < 0:
        raise ValueError(f"SWDE seq_len {cfg.seq_len} is too short for {cfg.num_fields} fields (needs >= {fixed - 1})")
    forbidden = list(fields.values()) + [_field_open(a) for a in ATTRIBUTES] + [f"{a}:" for a in ATTRIBUTES]
    filler: list[str] = []
    misses = 0
    while misses < 8:  # fill until a few blocks in a row do not fit
        block = _filler(rng)
        n = len(enc(block))
        if n > budget or any(f in block for f in forbidden):
            misses += 1
            continue
        filler.append(block)
        budget -= n
        misses = 0
    # Fields at random places among the filler blocks.
    slots = sorted(rng.choice(len(filler) + len(attrs), len(attrs), replace=False).tolist())
    order = [str(a) for a in rng.permutation(attrs)]
    blocks, fi, placed = [], 0, 0
    for pos in range(len(filler) + len(attrs)):
        if placed < len(slots) and slots[placed] == pos:
            blocks.append(field_pieces[order[placed]])
            placed += 1
        else:
            blocks.append((filler[fi],))
            fi += 1
    pieces = [_HEADER] + [p for b in blocks for p in b]
    space = enc(" ")
    pad = [space] * budget if space.size == 1 else []  # exact length (one-token space), else shorter
    doc_tokens = [enc(p) for p in pieces] + pad + [enc(_FOOTER)]
    text = "".join(pieces) + " " * len(pad) + _FOOTER
    tokens = np.concatenate([[vocab.bos_id], *doc_tokens, query, *answer]).astype(np.int32)
    mask = np.zeros(tokens.size, np.int32)
    mask[tokens.size - sum(len(x) for x in answer):] = 1
    return {"tokens": tokens, "answer": mask, "text": text, "attribute": attr, "value": value, "fields": fields,
            "query": _query(attr), "answer_text": " " + value + "\n"}


def check_swde_example(ex: dict, cfg: SWDEConfig, vocab) -> None:
    """Asserts that an example is well-formed (used by the tests)."""
    text, attr, value, fields = ex["text"], ex["attribute"], ex["value"], ex["fields"]
    assert ex["tokens"].size <= cfg.seq_len + 1, (ex["tokens"].size, cfg.seq_len)
    assert len(fields) == cfg.num_fields and len(set(fields.values())) == cfg.num_fields, fields
    assert fields[attr] == value
    assert text.count(value) == 1, (value, text.count(value))
    for a, v in fields.items():
        assert text.count(_field_open(a)) == 1 and text.count(_field_open(a) + " " + v + _FIELD_CLOSE) == 1, a
    for a in set(ATTRIBUTES) - set(fields):
        assert _field_open(a) not in text, a
    assert f"{attr}:" not in text  # the query's form occurs only in the query
    full = vocab.decode(ex["tokens"])
    assert full == text + ex["query"] + ex["answer_text"], "tokens do not decode to the example's text"
    answer_tokens = ex["tokens"][ex["answer"] > 0]
    assert vocab.decode(answer_tokens) == ex["answer_text"]
    value_tokens = np.asarray(vocab.encode(" " + value), np.int32)
    assert _find(ex["tokens"][:-answer_tokens.size], value_tokens) >= 0  # copyable token by token


def swde_batch(seq_len: int, num_fields: int, vocab, *, num_examples: int, seed: int = 0) -> RetrievalBatch:
    """``num_examples`` examples, right-padded (weights 0) to ``seq_len`` inputs."""
    cfg = SWDEConfig(seq_len=seq_len, num_fields=num_fields)
    exs = [swde_example(cfg, vocab, seed, i) for i in range(num_examples)]
    n = len(exs)
    tokens = np.full((n, seq_len + 1), vocab.pad_id, np.int32)
    mask = np.zeros((n, seq_len + 1), np.float32)
    for i, ex in enumerate(exs):
        tokens[i, : ex["tokens"].size] = ex["tokens"]
        mask[i, : ex["tokens"].size] = ex["answer"]
    info = {"task": "swde", "seq_len": seq_len, "num_fields": num_fields, "chance_field": 1.0 / num_fields}
    return RetrievalBatch(tokens[:, :-1], tokens[:, 1:], mask[:, 1:], info, exs)


def evaluate_swde(predictor: Predictor, vocab, *, lengths: Sequence[int], num_fields: Sequence[int] = (8,),
                  num_examples: int = 64, seed: int = 0, batch_size: int | None = None) -> list[dict]:
    out = []
    for L in lengths:
        for K in num_fields:
            try:
                batch = swde_batch(L, K, vocab, num_examples=num_examples, seed=seed)
            except ValueError as e:
                out.append({"task": "swde", "seq_len": L, "num_fields": K, "skipped": str(e)})
                continue
            out.append(evaluate_predictor(predictor, batch, batch_size))
    return out


def _swde_fields(row: np.ndarray, patterns) -> tuple[str | None, int, dict[str, np.ndarray]]:
    """(queried attribute, index after the query, {attribute: value tokens}) parsed from token row."""
    queried, q_end, values = None, -1, {}
    close = patterns["close"]
    for a in ATTRIBUTES:
        q = _find(row, patterns["query", a])
        if q >= 0:
            queried, q_end = a, q + patterns["query", a].size
        o = _find(row, patterns["open", a])
        if o >= 0:
            start = o + patterns["open", a].size
            end = _find(row, close, start)
            if end >= 0:
                values[a] = row[start:end]
    return queried, q_end, values


def _swde_patterns(vocab) -> dict:
    enc = lambda s: np.asarray(vocab.encode(s), np.int32)
    pats = {"close": enc(_FIELD_CLOSE), "newline": enc("\n")}
    for a in ATTRIBUTES:
        pats["query", a], pats["open", a] = enc(_query(a)), enc(_field_open(a))
    return pats


def _swde_copier(vocab, choose: Callable[[str, dict], str | None]) -> Predictor:
    pats = _swde_patterns(vocab)

    def predict(inputs: np.ndarray) -> np.ndarray:
        inputs = np.asarray(inputs)
        out = np.zeros_like(inputs)
        for r, row in enumerate(inputs):
            queried, q_end, values = _swde_fields(row, pats)
            pick = choose(queried, values) if queried is not None else None
            if pick is None:
                continue
            ans = np.concatenate([values[pick], pats["newline"]])
            span = out[r, q_end - 1: q_end - 1 + ans.size]
            span[:] = ans[: span.size]
        return out

    return predict


def swde_oracle(vocab) -> Predictor:
    """Reads the queried attribute's field in the document and copies its value (then a newline)."""
    return _swde_copier(vocab, lambda queried, values: queried if queried in values else None)


def swde_field_guesser(vocab, seed: int = 0) -> Predictor:
    """Copies the value of a uniformly chosen field of the document (chance ``1 / num_fields``)."""
    rng = np.random.default_rng(seed)
    return _swde_copier(vocab, lambda queried, values: str(rng.choice(sorted(values))) if values else None)


# -- model-backed ----------------------------------------------------------------------------------
def model_predictor(model, *, batch_size: int = 8, pad_id: int = 0, sal_attention: str = "dense") -> Predictor:
    """The model's argmax next token at every position (jitted, bucketed lengths, ``batch_size`` rows)."""
    from taipan_jax.eval.common import ModelRunner, prepare_model

    runner = ModelRunner(prepare_model(model, sal_attention), batch_size=batch_size, pad_id=pad_id)
    return runner.argmax


# -- CLI -------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    keys = ["task", "seq_len", "num_pairs", "num_fields", "examples", "accuracy", "exact_match", "chance_uniform",
            "chance_field"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["\t".join(keys + ["note"])]
    for r in rows:
        cells = [(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, ""))) for k in keys]
        lines.append("\t".join(cells + [r.get("skipped", "")]))
    return "\n".join(lines)


def main() -> None:
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "A training workdir (latest checkpoint unless --step).")
    step = flags.DEFINE_integer("step", None, "Checkpoint step.")
    task = flags.DEFINE_enum("task", "mqar", ["mqar", "swde"], "Which retrieval task.")
    predictor_kind = flags.DEFINE_enum("predictor", "model", ["model", "oracle", "random"],
                                       "model (needs --workdir), or a reference: oracle | random guesser.")
    lengths = flags.DEFINE_list("lengths", ["64", "128", "256"], "Sequence lengths (model inputs per example).")
    num_pairs = flags.DEFINE_list("num_pairs", ["4", "8", "16"], "MQAR key-value pairs (one setting each).")
    num_queries = flags.DEFINE_integer("num_queries", None, "MQAR queries per example (default: num_pairs).")
    vocab_size = flags.DEFINE_integer("vocab_size", None, "MQAR ids (even; default: the model's, rounded down).")
    random_non_queries = flags.DEFINE_boolean("random_non_queries", True, "MQAR filler uniform over ids (else 0).")
    num_fields = flags.DEFINE_list("num_fields", ["8"], "SWDE fields per document.")
    vocab_spec = flags.DEFINE_string("vocab", None, "SWDE vocabulary (default: the workdir's, else bytes).")
    num_examples = flags.DEFINE_integer("num_examples", 64, "Examples per setting.")
    batch_size = flags.DEFINE_integer("batch_size", 8, "Rows per model call.")
    seed = flags.DEFINE_integer("seed", 0, "Data (and random guesser) seed.")
    output = flags.DEFINE_string("output", None, "Write the rows here (JSON).")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        model = vocab = None
        if predictor_kind.value == "model":
            if not workdir.value:
                raise app.UsageError("--predictor=model needs --workdir")
            from taipan_jax.eval.common import load_for_eval

            model, vocab, at = load_for_eval(workdir.value, step=step.value)
            print(f"# {workdir.value}, checkpoint step {at}")
        if vocab_spec.value or vocab is None:
            from taipan_jax.data.vocab import get_vocabulary

            vocab = get_vocabulary(vocab_spec.value or "bytes")
        Ls = [int(x) for x in lengths.value]
        if task.value == "mqar":
            V = vocab_size.value or (model.cfg.vocab_size // 2 * 2 if model is not None else 64)
            if model is not None and V > model.cfg.vocab_size:
                raise app.UsageError(f"--vocab_size={V} exceeds the model's {model.cfg.vocab_size} ids")
            pred = {"model": lambda: model_predictor(model, batch_size=batch_size.value),
                    "oracle": lambda: mqar_oracle,
                    "random": lambda: uniform_guesser(V // 2, V, seed.value)}[predictor_kind.value]()
            rows = evaluate_mqar(pred, lengths=Ls, num_pairs=[int(x) for x in num_pairs.value], vocab_size=V,
                                 num_examples=num_examples.value, seed=seed.value, num_queries=num_queries.value,
                                 random_non_queries=random_non_queries.value)
        else:
            pred = {"model": lambda: model_predictor(model, batch_size=batch_size.value, pad_id=vocab.pad_id),
                    "oracle": lambda: swde_oracle(vocab),
                    "random": lambda: swde_field_guesser(vocab, seed.value)}[predictor_kind.value]()
            rows = evaluate_swde(pred, vocab, lengths=Ls, num_fields=[int(x) for x in num_fields.value],
                                 num_examples=num_examples.value, seed=seed.value)
        for r in rows:
            r["predictor"] = predictor_kind.value
        print(format_table(rows))
        if output.value:
            with open(output.value, "w") as f:
                json.dump({"workdir": workdir.value, "rows": rows}, f, indent=2)
            print(f"wrote {output.value}")

    app.run(_main)


if __name__ == "__main__":
    main()
