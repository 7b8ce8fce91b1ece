"""The user's corpus: loading JSONL / Parquet / text, chunking, sampling, errors, the prepared folder."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import pytest

from speed.config import ConfigError, CorpusConfig, load_config
from speed.corpus import (
    CorpusError,
    build_passages,
    chunk_text,
    fingerprint,
    load_passages,
    load_sample,
    prepare,
    resolve_files,
    sample_passages,
    whitespace_spans,
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _words(n, prefix="w"):
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_jsonl_documents_become_passages_with_their_ids_and_titles(tmp_path):
    _jsonl(
        tmp_path / "c.jsonl",
        [
            {"_id": "a", "title": "Alpha", "text": _words(20)},
            {"_id": 7, "title": "Beta", "text": _words(12, "v")},
        ],
    )
    cfg = CorpusConfig(paths=[str(tmp_path / "c.jsonl")], id_field="_id", title_field="title")
    passages = build_passages(cfg, resolve_files(cfg))
    assert [(p.id, p.title) for p in passages] == [("a", "Alpha"), ("7", "Beta")]
    assert passages[0].text == _words(20)


def test_long_documents_are_chunked_with_overlap_as_verbatim_slices():
    text = "  " + "\n".join(_words(25).split(" ")) + " "
    chunks = chunk_text(text, whitespace_spans, chunk_tokens=10, overlap=3)
    assert [n for _, n in chunks] == [10, 10, 10, 4]
    first, second = chunks[0][0].split(), chunks[1][0].split()
    assert first[-3:] == second[:3]  # the overlap
    assert all(c in text for c, _ in chunks)  # slices of the original, newlines kept
    assert chunks[-1][0].split()[-1] == "w24"


def test_chunk_ids_number_the_parts_of_a_long_document(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": _words(30)}, {"id": "e", "text": _words(9)}])
    cfg = CorpusConfig(paths=[str(tmp_path)], chunk_tokens=12, chunk_overlap=2, min_tokens=5)
    ids = [p.id for p in build_passages(cfg, resolve_files(cfg))]
    assert ids == ["d#0", "d#1", "d#2", "e"]


def test_short_passages_and_empty_texts_are_dropped_and_counted(tmp_path):
    _jsonl(
        tmp_path / "c.jsonl",
        [{"id": "a", "text": _words(10)}, {"id": "b", "text": "  "}, {"id": "c", "text": "two words"}],
    )
    cfg = CorpusConfig(paths=[str(tmp_path / "c.jsonl")], min_tokens=3)
    counts: Counter[str] = Counter()
    passages = build_passages(cfg, resolve_files(cfg), counts)
    assert [p.id for p in passages] == ["a"]
    assert counts["empty_text"] == 1 and counts["too_short"] == 1 and counts["documents"] == 2


def test_a_folder_of_text_and_parquet_files_is_read_recursively(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "one.txt").write_text(_words(10), encoding="utf-8")
    (tmp_path / "docs" / "sub" / "two.md").write_text(_words(11, "m"), encoding="utf-8")
    (tmp_path / "docs" / ".hidden.txt").write_text(_words(10), encoding="utf-8")
    (tmp_path / "docs" / "notes.csv").write_text("ignored", encoding="utf-8")
    pq.write_table(pa.table({"doc": ["p1"], "body": [_words(10, "q")]}), tmp_path / "docs" / "t.parquet")
    cfg = CorpusConfig(paths=[str(tmp_path / "docs")], id_field="doc", text_field="body")
    ids = [p.id for p in build_passages(cfg, resolve_files(cfg))]
    assert ids == ["one.txt", "sub/two.md", "p1"]


def test_sampling_is_reproducible_with_the_seed_and_keeps_corpus_order(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": _words(10)} for i in range(50)])
    cfg = CorpusConfig(paths=[str(tmp_path / "c.jsonl")])
    passages = build_passages(cfg, resolve_files(cfg))
    a, b, c = (sample_passages(passages, 10, s) for s in (0, 0, 1))
    assert a == b and a != c and len(a) == 10
    assert [int(p.id) for p in a] == sorted(int(p.id) for p in a)
    assert sample_passages(passages, None, 0) == passages


# -- errors -----------------------------------------------------------------------------------


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    cfg = CorpusConfig(paths=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(CorpusError, match=r"corpus.paths\[0\]: '.*nope.jsonl' does not exist"):
        resolve_files(cfg)


def test_wrong_text_field_suggests_the_nearest_field(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"_id": "a", "title": "t", "text": "x"}])
    cfg = CorpusConfig(paths=[str(tmp_path / "c.jsonl")], id_field="_id", text_field="txt")
    with pytest.raises(CorpusError, match=r"corpus.text_field: 'txt' is not a field .*Did you mean 'text'\?"):
        build_passages(cfg, resolve_files(cfg))


def test_wrong_id_field_in_parquet_suggests_the_nearest_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"_id": ["a"], "text": ["x y z"]}), tmp_path / "c.parquet")
    cfg = CorpusConfig(paths=[str(tmp_path / "c.parquet")])
    with pytest.raises(CorpusError, match=r"corpus.id_field: 'id' .*Did you mean '_id'\?"):
        build_passages(cfg, resolve_files(cfg))


def test_empty_corpus_says_what_to_check(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": ""}, {"id": "b", "text": None}])
    cfg = CorpusConfig(paths=[str(tmp_path / "c.jsonl")])
    with pytest.raises(CorpusError, match=r"no passage in .*empty_text.: 2.*corpus.text_field"):
        build_passages(cfg, resolve_files(cfg))


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"holds no .jsonl"):
        resolve_files(CorpusConfig(paths=[str(tmp_path / "empty")]))


def test_undecodable_text_names_file_line_and_encoding(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok ok ok"}\n{"id": "b", "text": "caf\xe9 au lait"}\n')
    cfg = CorpusConfig(paths=[str(path)])
    with pytest.raises(CorpusError, match=r"c.jsonl:2 is not utf-8 text \(byte \d+.*corpus.encoding"):
        build_passages(cfg, resolve_files(cfg))
    latin = CorpusConfig(paths=[str(path)], encoding="latin-1", min_tokens=1)
    assert build_passages(latin, resolve_files(latin))[1].text == "café au lait"


def test_duplicate_ids_are_refused(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x y"}, {"id": "a", "text": "z w"}])
    cfg = CorpusConfig(paths=[str(tmp_path / "c.jsonl")], min_tokens=1)
    with pytest.raises(CorpusError, match=r"id 'a' appears twice"):
        build_passages(cfg, resolve_files(cfg))


def test_config_refuses_overlap_not_below_chunk_and_unknown_encoding(tmp_path):
    with pytest.raises(ConfigError, match=r"corpus.chunk_overlap \(10\) must be smaller"):
        load_config(None, ["corpus.chunk_tokens=10", "corpus.chunk_overlap=10"])
    with pytest.raises(ConfigError, match=r"corpus.encoding.*unknown text encoding 'utf-9'"):
        load_config(None, ["corpus.encoding=utf-9"])
    with pytest.raises(ConfigError, match=r"corpus.grounded_kinds"):
        load_config(None, ["corpus.grounded_kinds=[sts]"])
    with pytest.raises(ConfigError, match=r"Did you mean 'text_field'"):
        load_config(None, ["corpus.text_feld=body"])


def test_eval_dir_variable_resolves_to_the_evaluation_folder(tmp_path, monkeypatch):
    eval_dir = tmp_path / "eval"
    (eval_dir / "retrieval" / "X").mkdir(parents=True)
    _jsonl(eval_dir / "retrieval" / "X" / "corpus.jsonl", [{"id": "a", "text": "x y z"}])
    monkeypatch.delenv("SPEED_EVAL_DIR", raising=False)
    cfg = CorpusConfig(paths=["${SPEED_EVAL_DIR}/retrieval/X/corpus.jsonl"])
    assert resolve_files(cfg, eval_dir)[0][0] == eval_dir / "retrieval" / "X" / "corpus.jsonl"
    monkeypatch.setenv("SPEED_EVAL_DIR", str(eval_dir))
    assert resolve_files(cfg)[0][0] == eval_dir / "retrieval" / "X" / "corpus.jsonl"
    with pytest.raises(CorpusError, match=r"\$NOT_SET_ANYWHERE, which is not set"):
        resolve_files(CorpusConfig(paths=["$NOT_SET_ANYWHERE/c.jsonl"]))


# -- the prepared folder ----------------------------------------------------------------------------


def test_prepare_writes_passages_sample_and_manifest_once(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": _words(10)} for i in range(20)])
    cfg = CorpusConfig(paths=[str(src)], sample_size=5)
    run = tmp_path / "run"
    manifest = prepare(cfg, 0, run)
    assert manifest["documents"] == 20 and manifest["passages"] == 20 and manifest["sampled"] == 5
    assert len(load_passages(run)) == 20 and len(load_sample(run)) == 5
    rows = [json.loads(line) for line in (run / "corpus" / "passages.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"id", "text", "title", "document"}
    mtime = os.stat(run / "corpus" / "passages.jsonl").st_mtime_ns
    assert prepare(cfg, 0, run)["key"] == manifest["key"]  # cached: not written again
    assert os.stat(run / "corpus" / "passages.jsonl").st_mtime_ns == mtime
    assert not (run / ".work" / "corpus").exists()


def test_an_older_layout_is_prepared_again_under_the_same_key(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": _words(12)}])
    cfg = CorpusConfig(paths=[str(src)], chunk_tokens=4, chunk_overlap=0, min_tokens=1)
    run = tmp_path / "run"
    manifest = prepare(cfg, 0, run)
    assert [(p.id, p.document_id) for p in load_passages(run)] == [("d#0", "d"), ("d#1", "d"), ("d#2", "d")]
    # a run prepared before passages named their document: same key, files without the field
    old = {k: v for k, v in manifest.items() if k != "layout"}
    path = run / "corpus" / "passages.jsonl"
    rows = [
        {k: v for k, v in json.loads(line).items() if k != "document"}
        for line in path.read_text().splitlines()
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    old["outputs"]["passages.jsonl"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "corpus" / "manifest.json").write_text(json.dumps(old))
    assert [p.document_id for p in load_passages(run)] == ["d#0", "d#1", "d#2"]  # each its own
    assert prepare(cfg, 0, run)["key"] == manifest["key"]
    assert [p.document_id for p in load_passages(run)] == ["d", "d", "d"]


def test_key_follows_content_and_seed_and_a_damaged_output_is_rebuilt(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": _words(10)} for i in range(6)])
    cfg = CorpusConfig(paths=[str(src)], sample_size=3)
    key = fingerprint(cfg, 0)
    assert fingerprint(cfg, 1) != key
    run = tmp_path / "run"
    prepare(cfg, 0, run)
    (run / "corpus" / "sample.jsonl").write_text("", encoding="utf-8")
    assert len(load_sample(run)) == 0
    prepare(cfg, 0, run)
    assert len(load_sample(run)) == 3
    _jsonl(src, [{"id": str(i), "text": _words(10)} for i in range(7)])
    assert fingerprint(cfg, 0) != key
    assert prepare(cfg, 0, run)["passages"] == 7


def test_a_failed_preparation_leaves_the_previous_corpus_whole(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": _words(10)}])
    cfg = CorpusConfig(paths=[str(src)])
    run = tmp_path / "run"
    prepare(cfg, 0, run)
    src.write_bytes(b'{"id": "a", "text": "\xff"}\n')
    with pytest.raises(CorpusError):
        prepare(cfg, 0, run)
    assert [p.id for p in load_passages(run)] == ["a"]


def test_load_passages_without_a_corpus_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set corpus.paths"):
        load_passages(tmp_path)
