"""labels: labels you can trust, between ``synthesize`` and ``embed``.

Three checks of the synthetic examples whose positive is a passage (``labels.kinds``: retrieval and
matching by default), each off by default, so that the stage passes SPEED's data through as the
paper had it:

1. **Relabel** (``labels.relabel``, Gecko): when a passage of the pool scores above an example's
   positive by more than ``margin`` (the embedder's cosine), the judge (the teacher, or the revisor
   trained in the run) reads the query and both passages and says which answers it; the positive is
   swapped, kept, or the example dropped (``relabel_neither``). With ``both_orders`` (default) it
   sees the pair twice, the candidate first and second, and a verdict that changes with the order
   keeps the example (``inconsistent``). Calls go through the ledger.
2. **Round trip** (``labels.round_trip``, Promptagator): the positive (after relabeling) must rank
   within the top ``k`` of the pool for its query, by the embedder or BM25; otherwise the example is
   dropped (``round_trip``).
3. **Mined negatives** (``labels.mining``, NV-Retriever): sentence-transformers'
   ``mine_hard_negatives`` with positive-aware margins, from the run's corpus or the synthetic pool,
   replacing (``mined``) or adding to (``both``) the LLM-written negative.

Relabel runs before the round trip so that a swapped positive (the top passage) is not dropped for
the rank of the passage it replaced. The pool is the run's corpus (every passage of the ``corpus``
section, prepared in ``RUN/corpus`` by :mod:`speed.corpus`) plus every positive and negative of the
checked examples. An example built on a corpus passage (its attributes name it) has the other
passages of that document set aside in all three checks: they are neither competitors nor negatives
(a document cut into passages answers its query in more than one of them).

Outputs: ``data/part-NNNNN.parquet`` (the training rows embed reads: ``id``, ``kind``,
``instruction``, ``query``, ``query_text``, ``positive``, ``negative``, ``negative_source``:
generated or mined, ``relabeled``), ``dropped.jsonl`` (each dropped example with its reason and
scores), ``relabel.jsonl`` (each judged example: its passages, scores, each order's raw answer and
outcome, the outcome acted on). Stats count every drop, swap and mined negative.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed.evaluation import load_embedder
from speed.io import atomic_write, read_rows, write_jsonl
from speed.stage import Stage, StageContext, StageError, register
from speed.tasks import get_kind

if TYPE_CHECKING:
    from speed.corpus import Passage
    from speed.data.labels import Outcome, Side

logger = logging.getLogger(__name__)

#: the columns of the output rows, in order
COLUMNS: dict[str, str] = {
    "id": "string",
    "kind": "string",
    "instruction": "string",
    "query": "string",
    "query_text": "string",
    "positive": "string",
    "negative": "string",
    "negative_source": "string",
    "relabeled": "bool_",
}

#: rows per Parquet part
PART_ROWS = 100_000


def corpus_passages(ctx: StageContext) -> list[Passage] | None:
    """Every passage of the run's corpus (prepared in ``RUN/corpus`` if it is not there yet, see
    :func:`speed.corpus.prepare`), or None when the config names no corpus."""
    ccfg = ctx.cfg.corpus
    if not ccfg.enabled:
        return None
    from speed.corpus import load_passages, prepare

    prepare(ccfg, ctx.cfg.run.seed, ctx.run_dir, ctx.cfg.evaluate.data_dir)
    return [p for p in load_passages(ctx.run_dir) if p.text]


def write_parts(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as Parquet parts of the stage's columns (atomically, part by part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    for i, start in enumerate(range(0, max(len(rows), 1), PART_ROWS)):
        chunk = rows[start : start + PART_ROWS]
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in chunk], schema=schema)
        with atomic_write(folder / f"part-{i:05d}.parquet", "wb") as fh:
            pq.write_table(table, fh)


def _row(src: dict[str, Any]) -> dict[str, Any]:
    negative = src.get("negative") or None
    return {
        **{c: src.get(c) for c in ("id", "kind", "instruction", "query", "query_text", "positive")},
        "negative": negative,
        "negative_source": "generated" if negative else None,
        "relabeled": False,
    }


@register
class Labels(Stage):
    """Relabel, round-trip filter and mined negatives over the synthetic data (each opt-in)."""

    name = "labels"
    # 2: a passage of the positive's own document is no competitor and no negative
    version = 2
    # the revisor as trained in this run (relabel.judge: revisor)
    reads = ("synthesize", "revisor")
    roles = ("embedder", "teacher", "revisor")
    templates = ("relabel",)
    # the corpus decides the mining pool: its config, and (below) its files' fingerprint
    extra_sections = ("corpus",)

    def template_hashes(self, cfg: Any) -> dict[str, str]:
        hashes = super().template_hashes(cfg)
        if cfg.corpus.enabled:
            from speed.corpus import fingerprint

            hashes["corpus"] = fingerprint(cfg.corpus, cfg.run.seed, cfg.evaluate.data_dir)
        return hashes

    def check(self, ctx: StageContext) -> None:
        cfg = ctx.section
        if self.active(ctx) and not (cfg.model or ctx.cfg.models.embedder.model):
            raise StageError(
                "stage 'labels' scores with an embedder, but neither labels.model nor "
                "models.embedder.model is set; name one, e.g. all-MiniLM-L6-v2"
            )
        wants_corpus = cfg.mining.negatives != "generated" and cfg.mining.source == "corpus"
        if wants_corpus and not ctx.cfg.corpus.enabled:
            raise StageError(
                "labels.mining.source is 'corpus', but the config names no corpus (corpus.paths is "
                "empty); add your documents there, or set labels.mining.source: pool"
            )
        if cfg.relabel.enabled and cfg.relabel.judge == "revisor":
            ctx.weights("revisor")

    @staticmethod
    def active(ctx: StageContext) -> bool:
        cfg = ctx.section
        return bool(cfg.mining.negatives != "generated" or cfg.round_trip.enabled or cfg.relabel.enabled)

    # -- run -----------------------------------------------------------------------------------

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.section
        start = time.monotonic()
        source = read_rows(ctx.input("synthesize"))
        rows = [_row(r) for r in source]
        drops: Counter[str] = Counter()
        stats: dict[str, Any] = {"input": len(rows)}
        if not self.active(ctx):
            write_parts(ctx.out / "data", rows)
            return {**stats, "count": len(rows), "drops": {}, "checked": 0}

        from speed.data.labels import Pool, document_neighbours

        # a grounded variant (retrieval_grounded) is checked as its kind (retrieval)
        families = {k: get_kind(k).family for k in {r["kind"] for r in rows}}
        checked = [i for i, r in enumerate(rows) if families[r["kind"]] in cfg.kinds and r["positive"]]
        passages = corpus_passages(ctx)
        corpus = [p.text for p in passages] if passages is not None else None
        pool = Pool(corpus or [])
        pool.add(rows[i]["positive"] for i in checked)
        pool.add(rows[i]["negative"] for i in checked if rows[i]["negative"])
        # a grounded example's positive is a passage of a corpus document: the document's other
        # passages are neither competitors (relabel, round trip) nor negatives (mining)
        found = document_neighbours(
            [source[i].get("attributes") for i in checked],
            [rows[i]["positive"] for i in checked],
            passages or [],
        )
        neighbours = dict(zip(checked, found, strict=True))
        near = {i: {pool.id(t) for t in neighbours[i]} - {-1} for i in checked}
        stats.update(checked=len(checked), pool=len(pool), corpus=len(corpus) if corpus is not None else None)
        logger.info(
            "labels: %d of %d rows checked against a pool of %d passages", len(checked), len(rows), len(pool)
        )

        spec = ctx.cfg.models.embedder
        model_name = str(cfg.model or spec.model)
        model = load_embedder(model_name, None if spec.device == "auto" else spec.device, cfg.precision)
        dropped: dict[int, dict[str, Any]] = {}
        extra_positives: list[tuple[str, str]] = []
        timings: dict[str, float] = {}

        dense = None
        if cfg.relabel.enabled or (cfg.round_trip.enabled and cfg.round_trip.scorer == "embedder"):
            t0 = time.monotonic()
            dense = self.dense(ctx, model, rows, checked, pool, near)
            timings["encode_search"] = time.monotonic() - t0
            stats["index"] = dense["index"]

        if cfg.relabel.enabled:
            assert dense is not None
            t0 = time.monotonic()
            stats["relabel"] = self.relabel(ctx, rows, checked, pool, dense, near, dropped, extra_positives)
            timings["relabel"] = time.monotonic() - t0

        if cfg.round_trip.enabled:
            t0 = time.monotonic()
            stats["round_trip"] = self.round_trip(ctx, rows, checked, pool, dense, near, dropped)
            timings["round_trip"] = time.monotonic() - t0

        kept = [i for i in range(len(rows)) if i not in dropped]
        out_rows = [rows[i] for i in kept]
        if cfg.mining.negatives != "generated":
            t0 = time.monotonic()
            todo = [i for i in checked if i not in dropped]
            miner = model
            if dense is not None:  # the library gets the vectors the search made, not a second encoding
                from speed.data.labels import Encoded

                texts = [rows[i]["query_text"] or rows[i]["query"] for i in checked]
                miner = Encoded(
                    model,
                    dict(zip(texts, dense["queries"], strict=True)),
                    dict(zip(pool.texts, dense["vectors"], strict=True)),
                )
            out_rows, stats["mining"] = self.mine(
                ctx, miner, rows, kept, todo, corpus, pool, extra_positives, neighbours
            )
            stats["mining"]["encoded"] = getattr(miner, "encoded", None)
            timings["mining"] = time.monotonic() - t0

        for info in dropped.values():
            drops[info["drop"]] += 1
        write_parts(ctx.out / "data", out_rows)
        write_jsonl(ctx.out / "dropped.jsonl", [dropped[i] for i in sorted(dropped)])
        seconds = time.monotonic() - start
        timings["total"] = seconds
        logger.info(
            "labels: kept %d of %d rows in %.1f s; drops %s", len(out_rows), len(rows), seconds, dict(drops)
        )
        if not out_rows:
            raise StageError(
                f"stage 'labels': no row survived (drops: {dict(drops)}); see {ctx.out / 'dropped.jsonl'}"
            )
        return {
            **stats,
            "model": str(model_name),
            "count": len(out_rows),
            "drops": dict(drops),
            "seconds": {k: round(v, 2) for k, v in timings.items()},
            "seconds_per_1k_checked": round(1000 * seconds / max(len(checked), 1), 2),
        }

    # -- steps ---------------------------------------------------------------------------------

    def dense(
        self,
        ctx: StageContext,
        model: Any,
        rows: list[dict[str, Any]],
        checked: list[int],
        pool: Any,
        near: dict[int, set[int]],
    ) -> dict[str, Any]:
        """Encode the pool and the checked queries; search each query's top passages once, deep
        enough that ``k`` competitors remain past the positive's neighbours (``near``)."""
        from speed.data.labels import PassageIndex, encode, search_depth

        cfg = ctx.section
        vectors = encode(model, pool.texts, cfg.batch_size)
        queries = encode(
            model, [rows[i]["query_text"] or rows[i]["query"] for i in checked], cfg.batch_size, query=True
        )
        index = PassageIndex(vectors, ann_threshold=cfg.ann_threshold)
        depth = max(cfg.round_trip.k, 1)
        scores, ids = index.search(queries, search_depth(depth, near.values()))
        return {
            "index": index.kind,
            "vectors": vectors,
            "queries": queries,
            "scores": scores,
            "ids": ids,
            "pos": {i: n for n, i in enumerate(checked)},
        }

    def relabel(
        self,
        ctx: StageContext,
        rows: list[dict[str, Any]],
        checked: list[int],
        pool: Any,
        dense: dict[str, Any],
        near: dict[int, set[int]],
        dropped: dict[int, dict[str, Any]],
        extra_positives: list[tuple[str, str]],
    ) -> dict[str, Any]:
        """Ask the judge where a passage outscores the positive; swap, keep or drop."""
        import numpy as np

        from speed.data.labels import (
            OUTCOMES,
            RelabelVerdict,
            agreed_outcome,
            other_side,
            rank_in_results,
            relabel_order,
            relabel_outcome,
            relabel_values,
        )
        from speed.data.parsing import parse_json
        from speed.llm.base import Request, Sampling
        from speed.tasks import render_template

        cfg = ctx.section.relabel
        depth = max(ctx.section.round_trip.k, 1)
        asks: list[tuple[int, int, float, float, Side]] = []
        for i in checked:
            n = dense["pos"][i]
            positive = pool.id(rows[i]["positive"])
            pos_score = float(np.dot(dense["queries"][n], dense["vectors"][positive]))
            ranked = rank_in_results(
                dense["scores"][n],
                dense["ids"][n],
                positive,
                pos_score,
                pool.id(rows[i]["negative"]),
                depth,
                near[i],
            )
            if ranked.best_other >= 0 and ranked.best_other_score > pos_score + cfg.margin:
                where = relabel_order(ctx.rng(f"relabel/{rows[i]['id']}/{i}"))
                asks.append((i, ranked.best_other, pos_score, ranked.best_other_score, where))
        counts: Counter[str] = Counter()
        if not asks:
            return {
                "judge": cfg.judge,
                "both_orders": cfg.both_orders,
                "asked": 0,
                **dict.fromkeys(OUTCOMES, 0),
            }
        # the seeded order first (a rerun with both_orders replays it from the ledger), then the other
        orders: list[list[Side]] = [
            [where, other_side(where)] if cfg.both_orders else [where] for _, _, _, _, where in asks
        ]
        schema = RelabelVerdict.model_json_schema()
        requests = [
            Request.chat(
                render_template(
                    "relabel",
                    **relabel_values(rows[i], rows[i]["positive"], pool.texts[cand], side),
                ),
                sampling=Sampling(
                    temperature=0.0, max_tokens=cfg.max_tokens, seed=ctx.seed_for("relabel", i)
                ),
                schema=schema,
            )
            for (i, cand, _, _, _), sides in zip(asks, orders, strict=True)
            for side in sides
        ]
        logger.info("labels: asking the %s about %d examples (%d calls)", cfg.judge, len(asks), len(requests))
        answers = iter(ctx.llm(cfg.judge).generate(requests))
        log = []
        for (i, cand, pos_score, cand_score, _), sides in zip(asks, orders, strict=True):
            verdicts: list[dict[str, Any]] = []
            outcomes: list[Outcome] = []
            for side in sides:
                comp = next(answers)
                verdict = None
                if comp.error is None:
                    verdict = parse_json(comp.text, RelabelVerdict).value
                outcomes.append(relabel_outcome(verdict, side))
                verdicts.append(
                    {
                        "candidate_at": side,
                        "raw_output": comp.text,
                        "error": comp.error,
                        "outcome": outcomes[-1],
                    }
                )
            outcome = agreed_outcome(outcomes)
            counts[outcome] += 1
            row = rows[i]
            log.append(
                {
                    "id": row["id"],
                    "query": row["query_text"],
                    "positive": row["positive"],
                    "candidate": pool.texts[cand],
                    "positive_score": pos_score,
                    "candidate_score": cand_score,
                    "verdicts": verdicts,
                    "outcome": outcome,
                }
            )
            if outcome == "swap":
                row["positive"], row["relabeled"] = pool.texts[cand], True
            elif outcome == "both":
                extra_positives.append((row["query_text"], pool.texts[cand]))
            elif outcome == "drop":
                dropped[i] = {**row, "drop": "relabel_neither", "candidate": pool.texts[cand]}
        write_jsonl(ctx.out / "relabel.jsonl", log)
        return {
            "judge": cfg.judge,
            "both_orders": cfg.both_orders,
            "asked": len(asks),
            "calls": len(requests),
            **{k: counts[k] for k in OUTCOMES},
        }

    def round_trip(
        self,
        ctx: StageContext,
        rows: list[dict[str, Any]],
        checked: list[int],
        pool: Any,
        dense: dict[str, Any] | None,
        near: dict[int, set[int]],
        dropped: dict[int, dict[str, Any]],
    ) -> dict[str, Any]:
        """Drop the examples whose positive is not within the top k for their query (passages of
        its own document do not count above it)."""
        import numpy as np

        from speed.data.labels import BM25Scorer, rank_in_results

        cfg = ctx.section.round_trip
        todo = [i for i in checked if i not in dropped]
        positives = [pool.id(rows[i]["positive"]) for i in todo]
        excluded = [pool.id(rows[i]["negative"]) for i in todo]
        neighbours = [near[i] for i in todo]
        if cfg.scorer == "bm25":
            ranks = BM25Scorer(pool.texts).ranks(
                [rows[i]["query_text"] for i in todo], positives, excluded, cfg.k, neighbours
            )
        else:
            assert dense is not None
            ranks = []
            for i, pos, exc, nbr in zip(todo, positives, excluded, neighbours, strict=True):
                n = dense["pos"][i]
                score = float(np.dot(dense["queries"][n], dense["vectors"][pos]))
                ranks.append(
                    rank_in_results(dense["scores"][n], dense["ids"][n], pos, score, exc, cfg.k, nbr)
                )
        at: Counter[str] = Counter()
        for i, ranked in zip(todo, ranks, strict=True):
            at[str(ranked.rank) if ranked.rank is not None else f">{cfg.k}"] += 1
            if ranked.rank is None:
                dropped[i] = {
                    **rows[i],
                    "drop": "round_trip",
                    "positive_score": ranked.positive_score,
                    "best_other": pool.texts[ranked.best_other] if ranked.best_other >= 0 else None,
                    "best_other_score": ranked.best_other_score,
                }
        return {
            "scorer": cfg.scorer,
            "k": cfg.k,
            "checked": len(todo),
            "dropped": at.get(f">{cfg.k}", 0),
            "ranks": dict(sorted(at.items())),
            # positives a passage of their own document outscored (not counted against them)
            "neighbour_above": sum(r.neighbours_above > 0 for r in ranks),
        }

    def mine(
        self,
        ctx: StageContext,
        model: Any,
        rows: list[dict[str, Any]],
        kept: list[int],
        todo: list[int],
        corpus: list[str] | None,
        pool: Any,
        extra_positives: list[tuple[str, str]],
        neighbours: dict[int, frozenset[str]],
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Mined negatives for the checked rows left, as ``labels.mining.negatives`` says; never a
        passage of the positive's own document."""
        from speed.data.labels import mine_negatives

        cfg = ctx.section.mining
        use_corpus = cfg.source == "corpus" or (cfg.source == "auto" and corpus is not None)
        source = (corpus or []) if use_corpus else pool.texts
        counts: Counter[str] = Counter()
        mined = mine_negatives(
            model,
            [rows[i]["query_text"] for i in todo],
            [rows[i]["positive"] for i in todo],
            source,
            cfg,
            batch_size=ctx.section.batch_size,
            seed=ctx.seed_for("mining"),
            extra_positives=extra_positives,
            aside={(rows[i]["query_text"], rows[i]["positive"]): neighbours[i] for i in todo},
            counts=counts,
            use_faiss=len(source) > ctx.section.ann_threshold and _has_faiss(),
        )
        wanted = set(todo)
        out: list[dict[str, Any]] = []
        for i in kept:
            row = rows[i]
            if i not in wanted:
                out.append(row)
                continue
            negatives = mined.get((row["query_text"], row["positive"]), [])
            counts["mined"] += len(negatives)
            if not negatives:
                counts["none_found"] += 1
                out.append(row)  # the generated negative, if any, stays
                continue
            variants = [{**row, "negative": n, "negative_source": "mined"} for n, _ in negatives]
            if cfg.negatives == "both" and row["negative"]:
                out += [row, *variants]
                counts["rows_added"] += len(variants)
            else:
                counts["replaced" if row["negative"] else "filled"] += 1
                counts["rows_added"] += len(variants) - 1
                out += variants
        return out, {
            "negatives": cfg.negatives,
            "source": "corpus" if use_corpus else "pool",
            "candidates": len(source),
            "examples": len(todo),
            **{k: counts[k] for k in ("mined", "none_found", "replaced", "filled", "rows_added")},
            "same_document": counts["aside"],
        }


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
