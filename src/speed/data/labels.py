"""Label quality after synthesis: a passage pool, search over it, round-trip ranks, mined negatives,
and the relabel judge's prompt and verdict.

The pieces the ``labels`` stage (:mod:`speed.stages.labels`) puts together; each is a plain function
or a small class over texts and vectors, so that tests drive them with tiny models.

Design choices:
- **One pool** of distinct passage texts: the run's corpus passages (when there is one), then every
  positive and generated negative of the checked examples. An example's positive is found in it by
  its text, so two examples sharing a positive share its vector.
- **Search** is by cosine of normalized vectors (the embedder's), exact by matrix products in chunks
  of queries (never the whole query x pool matrix), or through a faiss HNSW index once the pool
  outgrows ``ann_threshold`` (approximate; faiss-cpu is the ``labels`` extra). BM25 (bm25s) scores a
  query against the whole pool, which is exact and cheap for a lexical model.
- **Round trip** (Promptagator): the rank of an example's positive among the pool for its query,
  not counting the example's own generated negative (it is written to be close to the query; it
  should not cost its own example), nor the other passages of the positive's own document (a
  corpus document cut into passages: a query about it that lands on the neighbouring passage
  found its document, and the neighbour is no competitor to relabel to).
- **Mining** is sentence-transformers' own :func:`sentence_transformers.util.mine_hard_negatives`,
  with its positive-aware margins and ranges; this module maps its output back to the examples. The
  library encodes its corpus and queries itself; :class:`Encoded` hands it the vectors the search
  already made, so a pool is encoded once per run, not twice (encoding is most of the stage's time).
  A passage of the positive's own document is never taken as a negative (on SciFact's abstracts cut
  in 128 words, 30 of 83 mined negatives would have been one: a false negative).
- **Relabel** (Gecko): the judge sees the query and two passages in a seeded random order (against
  position bias) and answers in JSON which one answers the query; :func:`relabel_outcome` turns the
  answer into swap, keep or drop. By default each pair is shown in both orders and only a verdict
  that survives the order is acted on (:func:`agreed_outcome`): a small judge picks the first
  passage almost always, and one order alone would then swap positives at random. An answer that
  does not parse keeps the example (a weak judge never costs an example), and is counted.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from speed.config import MiningConfig

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'speed[labels]' (faiss-cpu for large pools, bm25s for the BM25 scorer)"


# --------------------------------------------------------------------------------------------
# the pool


class Pool:
    """Distinct passage texts in first-seen order; a text's id is its position."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.texts: list[str] = []
        self.ids: dict[str, int] = {}
        self.add(texts)

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            if text and text not in self.ids:
                self.ids[text] = len(self.texts)
                self.texts.append(text)

    def __len__(self) -> int:
        return len(self.texts)

    def id(self, text: str | None) -> int:
        """The id of ``text``, or -1 when it is not in the pool (or None)."""
        return self.ids.get(text, -1) if text else -1


def document_neighbours(
    attributes: Sequence[Any], positives: Sequence[str], passages: Sequence[Any]
) -> list[frozenset[str]]:
    """For each example, the texts of the other passages of the document its positive was cut from.

    Args:
        attributes: each example's prompt attributes (a mapping or its JSON); a grounded example's
            ``attributes["passage"]["id"]`` names the corpus passage it was built on.
        positives: each example's positive (never among its own neighbours).
        passages: the run's corpus passages (:class:`speed.corpus.Passage`).

    Returns:
        One set per example, empty for an example not built on a corpus passage.
    """
    document = {p.id: p.document_id for p in passages}
    texts: dict[str, list[str]] = {}
    for p in passages:
        texts.setdefault(p.document_id, []).append(p.text)
    out = []
    for attrs, positive in zip(attributes, positives, strict=True):
        if isinstance(attrs, str):
            try:
                attrs = json.loads(attrs)
            except ValueError:
                attrs = None
        passage = attrs.get("passage") if isinstance(attrs, Mapping) else None
        pid = passage.get("id") if isinstance(passage, Mapping) else None
        doc = document.get(str(pid)) if pid is not None else None
        out.append(frozenset(t for t in texts.get(doc, ()) if t != positive) if doc else frozenset())
    return out


# --------------------------------------------------------------------------------------------
# vectors and search


class Encoded:
    """A SentenceTransformer that answers ``encode_query`` / ``encode_document`` from vectors it
    already has, and encodes (then keeps) only the texts it has not seen; anything else is the model's.

    Only calls that ask for normalized NumPy vectors with no prompt (what :func:`encode` makes) are
    answered from the table; any other call goes to the model unchanged.

    Args:
        model: the SentenceTransformer.
        queries, documents: text -> normalized float32 vector, of each side.
    """

    def __init__(
        self, model: Any, queries: Mapping[str, np.ndarray], documents: Mapping[str, np.ndarray]
    ) -> None:
        self.model = model
        self.tables = {"encode_query": dict(queries), "encode_document": dict(documents)}
        self.encoded = 0  # texts this wrapper had to encode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode_query(self, texts: Sequence[str], **kwargs: Any) -> Any:
        return self._answer("encode_query", texts, kwargs)

    def encode_document(self, texts: Sequence[str], **kwargs: Any) -> Any:
        return self._answer("encode_document", texts, kwargs)

    def _answer(self, side: str, texts: Sequence[str], kwargs: dict[str, Any]) -> Any:
        fn = getattr(self.model, side)
        if isinstance(texts, str) or not (
            kwargs.get("normalize_embeddings") and kwargs.get("convert_to_numpy", True)
        ):
            return fn(texts, **kwargs)
        if kwargs.get("prompt") or kwargs.get("prompt_name") or kwargs.get("pool"):
            return fn(texts, **kwargs)
        table = self.tables[side]
        missing = [t for t in dict.fromkeys(texts) if t not in table]
        if missing:
            vecs = np.asarray(fn(missing, **kwargs), dtype=np.float32)
            table.update(zip(missing, vecs, strict=True))
            self.encoded += len(missing)
        dim = self.model.get_embedding_dimension()
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([table[t] for t in texts])


def encode(model: Any, texts: Sequence[str], batch_size: int = 64, query: bool = False) -> np.ndarray:
    """Normalized float32 vectors of ``texts`` (the query or document side of the model)."""
    if not texts:
        dim = model.get_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    fn = model.encode_query if query else model.encode_document
    vecs = fn(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vecs, dtype=np.float32)


class PassageIndex:
    """Top-k inner-product search over normalized passage vectors.

    Exact (matrix products over chunks of ``chunk`` queries) up to ``ann_threshold`` passages; above
    it a faiss HNSW index (approximate), or exact search with a warning when faiss is not installed.
    ``kind`` says which was used.
    """

    def __init__(self, vectors: np.ndarray, ann_threshold: int = 200_000, chunk: int = 1024) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.chunk = chunk
        self.kind = "exact"
        self._faiss: Any = None
        if len(self.vectors) > ann_threshold:
            try:
                import faiss
            except ImportError:
                logger.warning(
                    "labels: %d passages, but faiss is not installed; searching exactly (slow at this "
                    "size). %s",
                    len(self.vectors),
                    INSTALL_HINT,
                )
            else:
                index = faiss.IndexHNSWFlat(self.vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efSearch = 128
                index.add(self.vectors)
                self._faiss, self.kind = index, "faiss-hnsw"

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` best passages per query, best first (ids -1 past the pool)."""
        n, size = len(queries), len(self.vectors)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        take = min(k, size)
        if n == 0 or take == 0:
            return scores, ids
        if self._faiss is not None:
            s, i = self._faiss.search(np.ascontiguousarray(queries, dtype=np.float32), take)
            scores[:, :take], ids[:, :take] = s, i
            ids[scores == -np.inf] = -1
            return scores, ids
        for start in range(0, n, self.chunk):
            sims = queries[start : start + self.chunk] @ self.vectors.T
            part = (
                np.argpartition(-sims, take - 1, axis=1)[:, :take]
                if take < size
                else np.tile(np.arange(size), (len(sims), 1))
            )
            part_scores = np.take_along_axis(sims, part, axis=1)
            order = np.argsort(-part_scores, axis=1, kind="stable")
            ids[start : start + len(sims), :take] = np.take_along_axis(part, order, axis=1)
            scores[start : start + len(sims), :take] = np.take_along_axis(part_scores, order, axis=1)
        return scores, ids


@dataclass
class Ranked:
    """Where an example's positive stands among the pool for its query.

    Attributes:
        rank: 1-based rank of the positive, not counting the example's own negative nor the other
            passages of its document; None when more than ``depth`` other passages score above it.
        positive_score: the positive's score.
        best_other: pool id of the best passage that counts, or -1.
        best_other_score: its score (-inf when there is none).
        neighbours_above: how many passages of the positive's own document score above it.
    """

    rank: int | None
    positive_score: float
    best_other: int
    best_other_score: float
    neighbours_above: int = 0


def search_depth(depth: int, neighbours: Iterable[Collection[int]] = ()) -> int:
    """How many results a search must return so that ``depth`` competitors remain past the
    positive, the own negative and the largest set of neighbours."""
    return depth + 2 + max((len(n) for n in neighbours), default=0)


def rank_in_results(
    scores: Sequence[float],
    ids: Sequence[int],
    positive: int,
    positive_score: float,
    excluded: int,
    depth: int,
    neighbours: Collection[int] = (),
) -> Ranked:
    """The positive's rank from one query's search results (:func:`search_depth` of them, best
    first), passing over the own negative (``excluded``) and the positive's ``neighbours``."""
    above, best, best_score, neighbours_above = 0, -1, -np.inf, 0
    for s, j in zip(scores, ids, strict=True):
        if j < 0 or j in (positive, excluded):
            continue
        if j in neighbours:
            neighbours_above += int(s > positive_score)
            continue
        if best < 0:
            best, best_score = int(j), float(s)
        if s > positive_score:
            above += 1
    rank = above + 1 if above < depth else None
    return Ranked(rank, float(positive_score), best, float(best_score), neighbours_above)


def dense_ranks(
    query_vecs: np.ndarray,
    index: PassageIndex,
    positives: Sequence[int],
    excluded: Sequence[int],
    depth: int,
    neighbours: Sequence[Collection[int]] | None = None,
) -> list[Ranked]:
    """Each query's positive ranked among the index (see :class:`Ranked`); ``neighbours[i]`` are
    the pool ids of the other passages of query ``i``'s positive's document."""
    near = neighbours if neighbours is not None else [()] * len(positives)
    scores, ids = index.search(query_vecs, search_depth(depth, near))
    pos = np.asarray(positives, dtype=np.int64)
    pos_scores = np.einsum("ij,ij->i", query_vecs, index.vectors[pos]) if len(pos) else np.zeros(0)
    return [
        rank_in_results(scores[i], ids[i], int(pos[i]), float(pos_scores[i]), excluded[i], depth, near[i])
        for i in range(len(pos))
    ]


class BM25Scorer:
    """BM25 over the pool (bm25s), scoring each query against every passage."""

    def __init__(self, texts: Sequence[str]) -> None:
        try:
            import bm25s
        except ImportError as err:
            raise ImportError(f"labels.round_trip.scorer=bm25 needs bm25s: {INSTALL_HINT}") from err
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(
            bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False
        )

    def ranks(
        self,
        queries: Sequence[str],
        positives: Sequence[int],
        excluded: Sequence[int],
        depth: int,
        neighbours: Sequence[Collection[int]] | None = None,
    ) -> list[Ranked]:
        """Each query's positive ranked among the pool by BM25 (exact: every passage is scored),
        passing over its own negative (``excluded``) and its positive's ``neighbours``."""
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
        near = neighbours if neighbours is not None else [()] * len(positives)
        out = []
        for toks, pos, exc, nbr in zip(tokens, positives, excluded, near, strict=True):
            scores = np.asarray(self.retriever.get_scores(toks), dtype=np.float64) if toks else None
            if scores is None:  # a query of stopwords only retrieves nothing
                out.append(Ranked(None, 0.0, -1, -np.inf))
                continue
            pos_score = float(scores[pos])
            scores[pos] = -np.inf
            if exc >= 0:
                scores[exc] = -np.inf
            nbr_ids = np.asarray(sorted(nbr), dtype=np.int64)
            neighbours_above = int((scores[nbr_ids] > pos_score).sum()) if len(nbr_ids) else 0
            scores[nbr_ids] = -np.inf
            above = int((scores > pos_score).sum())
            best = int(scores.argmax())
            out.append(
                Ranked(
                    above + 1 if above < depth and pos_score > 0 else None,
                    pos_score,
                    best,
                    float(scores[best]),
                    neighbours_above,
                )
            )
        return out


# --------------------------------------------------------------------------------------------
# mining


def mine_negatives(
    model: Any,
    queries: Sequence[str],
    positives: Sequence[str],
    corpus: Sequence[str],
    cfg: MiningConfig,
    *,
    batch_size: int = 64,
    seed: int = 0,
    extra_positives: Iterable[tuple[str, str]] = (),
    aside: Mapping[tuple[str, str], Collection[str]] | None = None,
    counts: Counter[str] | None = None,
    use_faiss: bool = False,
) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """Hard negatives per (query, positive) pair, through sentence-transformers' ``mine_hard_negatives``.

    Args:
        model: the SentenceTransformer that scores.
        queries: one query per example.
        positives: the example's positive, aligned with ``queries``.
        corpus: the passages to mine from (the positives are added by the library).
        cfg: margins, ranges, count and sampling (``labels.mining``).
        batch_size: texts per encoding batch.
        seed: seeds the library's random sampling (``sampling_strategy: random``).
        extra_positives: (query, passage) pairs also known to answer the query (a judge said both
            do): the library never mines a query's positives as its negatives.
        aside: ``(query, positive) -> passages`` never to take as that pair's negatives (the other
            passages of the positive's document): the library is asked for as many more negatives
            as the largest set holds, and those are passed over.
        counts: if given, ``counts["aside"]`` grows by the negatives that mining without ``aside``
            would have taken from those passages (of the first ``num_negatives``).
        use_faiss: the library's faiss search (large corpora).

    Returns:
        ``(query, positive) -> [(negative, score), ...]``, best first; a pair the margins left without
        a negative is absent.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = list(dict.fromkeys([*zip(queries, positives, strict=True), *extra_positives]))
    if not pairs:
        return {}
    aside = aside or {}
    spare = max((len(aside.get(pair, ())) for pair in pairs), default=0)
    dataset = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    state = random.getstate()
    random.seed(seed)  # the library samples with the module's random functions
    try:
        mined = mine_hard_negatives(
            dataset,
            model,
            anchor_column_name="query",
            positive_column_name="positive",
            corpus=list(corpus),
            range_min=cfg.range_min,
            range_max=cfg.range_max,
            absolute_margin=cfg.absolute_margin,
            relative_margin=cfg.relative_margin,
            num_negatives=cfg.num_negatives + spare,
            sampling_strategy=cfg.sampling_strategy,
            output_format="labeled-list",
            output_scores=True,
            batch_size=batch_size,
            use_faiss=use_faiss,
            verbose=False,
        )
    finally:
        random.setstate(state)
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for row in mined:
        texts, scores = row["positive"], row["scores"]
        pair = (row["query"], texts[0])
        skip = aside.get(pair, ())
        negatives = list(zip(texts[1:], (float(s) for s in scores[1:]), strict=True))
        kept = [(t, s) for t, s in negatives if t not in skip]
        if counts is not None:
            counts["aside"] += sum(t in skip for t, _ in negatives[: cfg.num_negatives])
        if kept:
            out[pair] = kept[: cfg.num_negatives]
    return out


# --------------------------------------------------------------------------------------------
# relabel


class RelabelVerdict(BaseModel):
    """The judge's answer: which of passages A and B answers the query."""

    reason: str = Field("", description="One sentence on why.")
    answer: Literal["A", "B", "both", "neither"]


Outcome = Literal["swap", "keep", "both", "drop", "unparsed", "inconsistent"]
#: every outcome, in the order stats and the report list them
OUTCOMES: tuple[Outcome, ...] = ("swap", "keep", "both", "drop", "unparsed", "inconsistent")

#: where a passage is shown to the judge
Side = Literal["A", "B"]


def relabel_order(rng: random.Random) -> Side:
    """Where the candidate passage goes (A or B); the positive takes the other place."""
    return "A" if rng.random() < 0.5 else "B"


def relabel_outcome(verdict: RelabelVerdict | None, candidate_at: Side) -> Outcome:
    """What a verdict means for the example.

    Args:
        verdict: the parsed answer, or None when it did not parse (or the call failed).
        candidate_at: where the candidate passage was shown; the positive was at the other place.

    Returns:
        swap (only the candidate answers: it becomes the positive), keep (only the positive answers),
        both (both answer: keep the positive, never mine the candidate as a negative), drop (neither
        answers), unparsed (no usable verdict: keep the example as it is).
    """
    if verdict is None:
        return "unparsed"
    if verdict.answer == "both":
        return "both"
    if verdict.answer == "neither":
        return "drop"
    return "swap" if verdict.answer == candidate_at else "keep"


def other_side(side: Side) -> Side:
    return "B" if side == "A" else "A"


def agreed_outcome(outcomes: Sequence[Outcome]) -> Outcome:
    """One outcome from the verdicts on the same pair shown in different orders.

    A judge that always picks the passage it saw first gives opposite outcomes for the two orders;
    only a verdict that survives the order is acted on. Any unparsed verdict makes the whole
    ``unparsed``; verdicts that disagree make ``inconsistent``; both keep the example as it is.
    """
    if "unparsed" in outcomes:
        return "unparsed"
    return outcomes[0] if len(set(outcomes)) == 1 else "inconsistent"


def relabel_values(
    row: Mapping[str, Any], positive: str, candidate: str, candidate_at: Side
) -> dict[str, str]:
    """The values of the relabel prompt template for one example."""
    first, second = (candidate, positive) if candidate_at == "A" else (positive, candidate)
    return {
        "task": str(row.get("instruction") or ""),
        "query": str(row.get("query_text") or row.get("query") or ""),
        "passage_a": first,
        "passage_b": second,
    }
