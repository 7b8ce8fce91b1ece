"""The user's corpus: load, validate, chunk and sample the documents that generation is grounded on.

A ``corpus`` config section (:class:`speed.config.CorpusConfig`) names one or more files or folders:
JSON Lines (``.jsonl``), Parquet (``.parquet``) or plain text (``.txt``, ``.md``: one document per
file, its id the file's path below the folder given). Each document is cut into passages of at most
``chunk_tokens`` tokens (whitespace words, or a tokenizer's tokens) with ``chunk_overlap`` tokens
shared between neighbours; ``sample_size`` passages are drawn with the run seed for generation.

Output, in the run folder (``RUN/corpus/``), prepared once by the first stage that needs it:

- ``passages.jsonl``: every passage, in corpus order: ``{"id": str, "text": str, "title": str | null,
  "document": str}``. A document that fits in one passage keeps its id; the passages of a longer one
  are ``ID#0``, ``ID#1``, ... ``document`` is the id of the document a passage was cut from, and the
  title is the document's (every passage of it carries both): labels checks never take a passage
  of an example's own document for a competitor or a negative.
- ``sample.jsonl``: the passages drawn for generation (same schema, corpus order); all of them when
  ``sample_size`` is unset.
- ``manifest.json``: the key (a hash of the corpus section, the run seed and the sha256 of every input
  file), counts (documents, passages, sampled, drops by reason) and the sha256 of both outputs.

Read them with :func:`load_passages` and :func:`load_sample` (other stages: hard-negative mining
draws from all passages, grounded generation from the sample).

Design choices:
- Not a stage of the graph: a run without a corpus must keep its stage keys and its stage list.
  The stages that ground their prompts call :func:`prepare` (cached by key, like a stage) and put
  :func:`fingerprint` into their keys only when a corpus is configured.
- Passages are cut on token boundaries of the original text (character offsets), so a passage is
  a verbatim slice of the document, never a detokenized approximation.
- Errors are :class:`CorpusError` (a :class:`~speed.config.ConfigError`): a missing file, an empty
  corpus, a field the records lack (with the nearest field names), undecodable bytes (with file,
  line and byte), duplicate ids. The outputs are written in a work folder and renamed into place
  with the manifest already inside, so a killed preparation leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from speed.config import ConfigError, CorpusConfig
from speed.io import read_json, write_json, write_jsonl
from speed.suggest import did_you_mean

logger = logging.getLogger(__name__)

#: the folder of the prepared corpus inside a run, and its files
FOLDER = "corpus"
PASSAGES = "passages.jsonl"
SAMPLE = "sample.jsonl"
MANIFEST = "manifest.json"
#: bump when the passages themselves change for the same inputs (ids, texts, sampling): it is part
#: of the key, so every grounded stage runs again
VERSION = 1
#: bump when the files gain or change a field but the passages stay the same: an older layout is
#: prepared again, the key (and every stage's) stays
LAYOUT = 2

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES

_WORD = re.compile(r"\S+")


class CorpusError(ConfigError):
    """A corpus that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Passage:
    """One passage of the corpus: the unit a grounded prompt is built on."""

    id: str
    text: str
    title: str | None = None
    #: the id of the document the passage was cut from (its own id when empty)
    document: str = ""

    @property
    def document_id(self) -> str:
        return self.document or self.id

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "title": self.title, "document": self.document_id}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Passage:
        return cls(str(row["id"]), str(row["text"]), row.get("title"), str(row.get("document") or ""))


@dataclass(frozen=True)
class Document:
    """One document as read, before chunking; ``where`` is ``file:line`` for messages."""

    id: str
    text: str
    title: str | None
    where: str


# --------------------------------------------------------------------------------------------
# files


def expand(path: str, eval_dir: str | os.PathLike[str] | None = None) -> Path:
    """A configured path with ``~`` and ``$VARS`` expanded.

    ``$SPEED_EVAL_DIR`` (or ``${SPEED_EVAL_DIR}``) left unset in the environment stands for the
    evaluation data folder found as evaluation finds it (``evaluate.data_dir``, then a ``shared/eval``
    above the working directory), so a config can point at the shared test corpora without copying
    them.

    Raises:
        CorpusError: a variable is still unset after expansion.
    """
    from speed.paths import EVAL_DIR_ENV, EvalDataNotFoundError, eval_data_dir

    if EVAL_DIR_ENV in path and not os.environ.get(EVAL_DIR_ENV):
        try:
            found = str(eval_data_dir(eval_dir))
        except EvalDataNotFoundError as err:
            raise CorpusError(f"corpus.paths: '{path}' names ${EVAL_DIR_ENV}, but {err}") from None
        path = path.replace("${" + EVAL_DIR_ENV + "}", found).replace("$" + EVAL_DIR_ENV, found)
    expanded = os.path.expandvars(os.path.expanduser(path))
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise CorpusError(
            f"corpus.paths: '{path}' uses the environment variable ${unset.group(1)}, which is not set; "
            "export it or write the path out"
        )
    return Path(expanded)


def resolve_files(
    cfg: CorpusConfig, eval_dir: str | os.PathLike[str] | None = None
) -> list[tuple[Path, str]]:
    """The input files of the corpus, each with the name it has in ids and keys.

    A folder is searched recursively for files of the known suffixes (hidden files skipped), in
    sorted order; a plain-text file's id is its path below that folder.

    Raises:
        CorpusError: no path is configured, a path does not exist, a file has an unknown suffix, or
            a folder holds no file of a known suffix.
    """
    if not cfg.paths:
        raise CorpusError("corpus.paths is empty; list the files or folders of your documents")
    out: list[tuple[Path, str]] = []
    for i, raw in enumerate(cfg.paths):
        path = expand(raw, eval_dir)
        if not path.exists():
            raise CorpusError(
                f"corpus.paths[{i}]: '{path}' does not exist; give an existing file or folder "
                f"({', '.join(SUFFIXES)} files)"
            )
        if path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise CorpusError(
                    f"corpus.paths[{i}]: '{path}' is a {path.suffix or 'suffix-less'} file; speed reads "
                    f"{', '.join(SUFFIXES)} (convert it, or rename a plain-text file to .txt)"
                )
            out.append((path, path.name))
            continue
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise CorpusError(
                f"corpus.paths[{i}]: folder '{path}' holds no {', '.join(SUFFIXES)} file; "
                "point it at the folder of your documents"
            )
        out += [(p, str(p.relative_to(path))) for p in found]
    return out


def _field_error(field: str, name: str, where: str, keys: Sequence[str]) -> CorpusError:
    hint = did_you_mean(name, keys, cutoff=0.5)
    return CorpusError(
        f"corpus.{field}: '{name}' is not a field of the records in {where} (fields: "
        f"{', '.join(map(str, keys))}).{hint} Set corpus.{field} to the field that holds it."
    )


def _decode(raw: bytes, encoding: str, where: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"corpus: {where} is not {encoding} text (byte {err.start}: {raw[err.start : err.start + 4]!r}); "
            "convert the file to UTF-8 or set corpus.encoding to its encoding (e.g. latin-1)"
        ) from None


def _document(cfg: CorpusConfig, record: dict[str, Any], where: str, counts: Counter[str]) -> Document | None:
    if cfg.id_field not in record:
        raise _field_error("id_field", cfg.id_field, where, list(record))
    if cfg.text_field not in record:
        raise _field_error("text_field", cfg.text_field, where, list(record))
    if cfg.title_field is not None and cfg.title_field not in record:
        raise _field_error("title_field", cfg.title_field, where, list(record))
    text = record[cfg.text_field]
    if text is None or (isinstance(text, str) and not text.strip()):
        counts["empty_text"] += 1
        return None
    if not isinstance(text, str):
        raise CorpusError(
            f"corpus.text_field: '{cfg.text_field}' holds a {type(text).__name__} in {where}, not text; "
            "name the field that holds the document's text"
        )
    doc_id = record[cfg.id_field]
    if doc_id is None or isinstance(doc_id, dict | list) or str(doc_id) == "":
        raise CorpusError(
            f"corpus.id_field: '{cfg.id_field}' is {doc_id!r} in {where}; every document needs an id "
            "(a string or number): fix the record or name another id field"
        )
    title = record.get(cfg.title_field) if cfg.title_field else None
    title = str(title).strip() or None if title is not None else None
    return Document(str(doc_id), text, title, where)


def _jsonl_documents(cfg: CorpusConfig, path: Path, counts: Counter[str]) -> Iterator[Document]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, cfg.encoding, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"corpus: {where} is not valid JSON ({err.msg}); fix the line or remove it"
                ) from None
            if not isinstance(record, dict):
                raise CorpusError(
                    f"corpus: {where} is a JSON {type(record).__name__}, not an object; "
                    "a JSONL corpus holds one object per line"
                )
            doc = _document(cfg, record, where, counts)
            if doc is not None:
                yield doc


def _parquet_documents(cfg: CorpusConfig, path: Path, counts: Counter[str]) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several kinds for a file that is not Parquet
        raise CorpusError(f"corpus: {path} cannot be read as Parquet ({err}); check the file") from None
    names = list(pf.schema_arrow.names)
    wanted = [cfg.id_field, cfg.text_field] + ([cfg.title_field] if cfg.title_field else [])
    for field, name in zip(("id_field", "text_field", "title_field"), wanted, strict=False):
        if name not in names:
            raise _field_error(field, name, str(path), names)
    row = 0
    for batch in pf.iter_batches(columns=wanted):
        for record in batch.to_pylist():
            row += 1
            for key in (cfg.text_field, cfg.title_field):
                if key and isinstance(record.get(key), bytes):
                    record[key] = _decode(record[key], cfg.encoding, f"{path} row {row}")
            doc = _document(cfg, record, f"{path} row {row}", counts)
            if doc is not None:
                yield doc


def _text_document(cfg: CorpusConfig, path: Path, name: str, counts: Counter[str]) -> Iterator[Document]:
    text = _decode(path.read_bytes(), cfg.encoding, str(path))
    if not text.strip():
        counts["empty_text"] += 1
        return
    yield Document(name, text, None, str(path))


def iter_documents(
    cfg: CorpusConfig, files: Sequence[tuple[Path, str]], counts: Counter[str] | None = None
) -> Iterator[Document]:
    """The documents of ``files`` (from :func:`resolve_files`), in order; empty ones are counted
    under ``empty_text`` in ``counts`` and skipped.

    Raises:
        CorpusError: a record lacks a configured field, a text is not text, bytes do not decode.
    """
    counts = Counter() if counts is None else counts
    for path, name in files:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(cfg, path, counts)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_documents(cfg, path, counts)
        else:
            yield from _text_document(cfg, path, name, counts)


# --------------------------------------------------------------------------------------------
# chunking

#: a tokenizer for chunking: text -> character spans of its tokens
Spans = Callable[[str], list[tuple[int, int]]]


def whitespace_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def tokenizer_spans(name: str) -> Spans:
    """Character spans of the tokens of a transformers (fast) tokenizer.

    Raises:
        CorpusError: transformers is missing, or the tokenizer cannot be loaded or gives no offsets.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CorpusError(
            f"corpus.tokenizer '{name}' needs transformers: pip install 'speed[train]', or unset "
            "corpus.tokenizer to count whitespace words"
        ) from None
    from speed.models import ModelNotFoundError, resolve_hf

    try:
        tok = AutoTokenizer.from_pretrained(resolve_hf(name))
    except (OSError, ValueError, ModelNotFoundError) as err:
        raise CorpusError(
            f"corpus.tokenizer: cannot load '{name}' ({err}); name a packaged model, a local folder or "
            "a hub name, or unset it to count whitespace words"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise CorpusError(
            f"corpus.tokenizer: '{name}' has no fast tokenizer (no character offsets); use another one, "
            "or unset it to count whitespace words"
        )

    def spans(text: str) -> list[tuple[int, int]]:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(int(a), int(b)) for a, b in enc["offset_mapping"] if b > a]

    return spans


def chunk_text(text: str, spans: Spans, chunk_tokens: int, overlap: int) -> list[tuple[str, int]]:
    """Cut ``text`` into passages of at most ``chunk_tokens`` tokens, ``overlap`` shared.

    Returns:
        Each passage as a verbatim slice of ``text`` (outer whitespace stripped) and its token count.
    """
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap {overlap} must be in [0, chunk_tokens={chunk_tokens})")
    tokens = spans(text)
    out: list[tuple[str, int]] = []
    step = chunk_tokens - overlap
    for start in range(0, len(tokens), step):
        end = min(start + chunk_tokens, len(tokens))
        out.append((text[tokens[start][0] : tokens[end - 1][1]].strip(), end - start))
        if end == len(tokens):
            break
    return out


def build_passages(
    cfg: CorpusConfig, files: Sequence[tuple[Path, str]], counts: Counter[str] | None = None
) -> list[Passage]:
    """Every passage of the corpus, in corpus order (see the module docstring for ids).

    Raises:
        CorpusError: as :func:`iter_documents`; two documents share an id; no passage is left.
    """
    counts = Counter() if counts is None else counts
    spans = tokenizer_spans(cfg.tokenizer) if cfg.tokenizer else whitespace_spans
    seen: dict[str, str] = {}
    out: list[Passage] = []
    documents = 0
    for doc in iter_documents(cfg, files, counts):
        if doc.id in seen:
            raise CorpusError(
                f"corpus.id_field: document id '{doc.id}' appears twice ({seen[doc.id]} and {doc.where}); "
                "ids must be unique: name a unique field as corpus.id_field or fix the data"
            )
        seen[doc.id] = doc.where
        documents += 1
        chunks = chunk_text(doc.text, spans, cfg.chunk_tokens, cfg.chunk_overlap)
        for k, (text, n) in enumerate(chunks):
            if n < cfg.min_tokens:
                counts["too_short"] += 1
                continue
            pid = doc.id if len(chunks) == 1 else f"{doc.id}#{k}"
            out.append(Passage(pid, text, doc.title, doc.id))
    counts["documents"] = documents
    if not out:
        where = ", ".join(str(p) for p, _ in files[:3]) + (" ..." if len(files) > 3 else "")
        drops = {k: v for k, v in counts.items() if k != "documents"}
        raise CorpusError(
            f"corpus: no passage in {where} ({documents} documents with text, drops: {drops}); check "
            f"corpus.text_field ('{cfg.text_field}') and corpus.min_tokens ({cfg.min_tokens})"
        )
    return out


def sample_passages(passages: Sequence[Passage], size: int | None, seed: int) -> list[Passage]:
    """``size`` passages drawn with ``seed`` (all when ``size`` is None or not smaller), in corpus order."""
    if size is None or size >= len(passages):
        return list(passages)
    digest = hashlib.sha256(f"{seed}/corpus/sample".encode()).hexdigest()
    rng = random.Random(int(digest[:16], 16))
    return [passages[i] for i in sorted(rng.sample(range(len(passages)), size))]


# --------------------------------------------------------------------------------------------
# the prepared corpus in a run


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def fingerprint(cfg: CorpusConfig, seed: int, eval_dir: str | os.PathLike[str] | None = None) -> str:
    """The key of the prepared corpus: the corpus section, the run seed, every input file's sha256
    (by its name below the configured folder, so that the key does not depend on where the data
    lies). Stages whose prompts are grounded put it into their keys.

    Raises:
        CorpusError: as :func:`resolve_files`.
    """
    files = [(name, _sha256(path)) for path, name in resolve_files(cfg, eval_dir)]
    payload = {"version": VERSION, "config": cfg.model_dump(mode="json"), "seed": seed, "files": files}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _outputs_match(folder: Path, manifest: dict[str, Any]) -> bool:
    recorded = manifest.get("outputs")
    if not isinstance(recorded, dict):
        return False
    for name in (PASSAGES, SAMPLE):
        path = folder / name
        if not path.is_file() or recorded.get(name) != _sha256(path):
            return False
    return True


def prepare(
    cfg: CorpusConfig,
    seed: int,
    run_dir: str | os.PathLike[str],
    eval_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load, chunk and sample the corpus into ``RUN/corpus/`` unless it is there with this key.

    Returns:
        The corpus manifest (key, counts, outputs' sha256).

    Raises:
        CorpusError: the corpus cannot be read (see :func:`build_passages`).
    """
    run_dir = Path(run_dir)
    folder = run_dir / FOLDER
    key = fingerprint(cfg, seed, eval_dir)
    if (folder / MANIFEST).is_file():
        try:
            manifest = dict(read_json(folder / MANIFEST))
        except ValueError:
            manifest = {}
        reusable = manifest.get("key") == key and manifest.get("layout", 1) == LAYOUT
        if reusable and _outputs_match(folder, manifest):
            return manifest
    files = resolve_files(cfg, eval_dir)
    counts: Counter[str] = Counter()
    passages = build_passages(cfg, files, counts)
    sample = sample_passages(passages, cfg.sample_size, seed)
    work = run_dir / ".work" / FOLDER
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_jsonl(work / PASSAGES, (p.to_row() for p in passages))
    write_jsonl(work / SAMPLE, (p.to_row() for p in sample))
    documents = counts.pop("documents", 0)
    manifest = {
        "key": key,
        "version": VERSION,
        "layout": LAYOUT,
        "files": {name: _sha256(path) for path, name in files},
        "documents": documents,
        "passages": len(passages),
        "sampled": len(sample),
        "drops": dict(counts),
        "chunking": {
            "tokenizer": cfg.tokenizer or "whitespace",
            "chunk_tokens": cfg.chunk_tokens,
            "chunk_overlap": cfg.chunk_overlap,
            "min_tokens": cfg.min_tokens,
        },
        "outputs": {PASSAGES: _sha256(work / PASSAGES), SAMPLE: _sha256(work / SAMPLE)},
    }
    write_json(work / MANIFEST, manifest)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(work, folder)
    logger.info(
        "corpus: %d documents -> %d passages, %d sampled (drops %s) in %s",
        documents,
        len(passages),
        len(sample),
        dict(counts),
        folder,
    )
    return manifest


def _load(run_dir: str | os.PathLike[str], name: str) -> list[Passage]:
    path = Path(run_dir) / FOLDER / name
    if not (path.parent / MANIFEST).is_file() or not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the corpus of this run is not prepared; set corpus.paths and run a stage "
            "that grounds its prompts (brainstorm, seed)"
        )
    from speed.io import iter_jsonl

    return [Passage.from_row(row) for row in iter_jsonl(path)]


def load_passages(run_dir: str | os.PathLike[str]) -> list[Passage]:
    """Every passage of the run's prepared corpus (``RUN/corpus/passages.jsonl``), in corpus order.

    Raises:
        FileNotFoundError: the corpus was not prepared in this run.
    """
    return _load(run_dir, PASSAGES)


def load_sample(run_dir: str | os.PathLike[str]) -> list[Passage]:
    """The passages drawn for generation (``RUN/corpus/sample.jsonl``), in corpus order.

    Raises:
        FileNotFoundError: the corpus was not prepared in this run.
    """
    return _load(run_dir, SAMPLE)
