"""Topics: the packaged taxonomy, the depth cut, seeded sampling and domain expansion."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from speed.tasks import template_hash
from speed.tasks.topics import (
    DOMAIN_TEMPLATE,
    domain_prompt,
    domain_topics,
    load_topics,
    parse_subtopics,
    sample_topics,
)


def test_builtin_taxonomy_is_broad_and_three_to_four_deep():
    topics = load_topics()
    assert 300 <= len(topics) == len(set(topics))
    assert {len(t.split("/")) for t in topics} == {3, 4}
    roots = {t.split("/")[0] for t in topics}
    for root in ("Arts", "Business", "Computers", "Games", "Health", "Home", "News", "Recreation",
                 "Reference", "Regional", "Science", "Shopping", "Society", "Sports"):  # fmt: skip
        assert root in roots
    assert "Science/Biology/Genetics/Gene therapy" in topics


def test_max_depth_cuts_and_deduplicates():
    cut = load_topics(max_depth=2)
    assert all(len(t.split("/")) <= 2 for t in cut)
    assert len(cut) == len(set(cut)) < len(load_topics())
    assert "Science/Biology" in cut
    with pytest.raises(ValueError, match="max_depth"):
        load_topics(max_depth=0)


def test_custom_topic_file(tmp_path):
    path = tmp_path / "topics.txt"
    path.write_text("# mine\nA/B/C/D/E\n\nA/B/C/D/F\n X / Y \n")
    assert load_topics(path) == ["A/B/C/D", "X/Y"]
    with pytest.raises(FileNotFoundError, match=r"topics\.source"):
        load_topics(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no topic"):
        load_topics(tmp_path / "empty.txt")


def test_sampling_is_seeded_and_uses_every_topic_before_repeating():
    topics = load_topics()
    a = sample_topics(topics, 1000, random.Random(5))
    assert a == sample_topics(topics, 1000, random.Random(5))
    assert a != sample_topics(topics, 1000, random.Random(6))
    assert len(set(a[: len(topics)])) == len(topics)
    assert max(Counter(a).values()) - min(Counter(a).values()) <= 1
    with pytest.raises(ValueError, match="empty"):
        sample_topics([], 3, random.Random(0))


def test_domain_expansion_prompt_and_parser():
    prompt = domain_prompt("Swiss tax law", 12)
    assert "Swiss tax law" in prompt and "12" in prompt and '"subtopics"' in prompt
    assert len(template_hash([DOMAIN_TEMPLATE])) == 64
    text = 'Here are some:\n```json\n{"subtopics": ["1. Cantonal income tax", "VAT / MWST", "cantonal income tax", ""]}\n```'
    result = parse_subtopics(text)
    assert result.ok, result.detail
    assert result.value.subtopics == ["Cantonal income tax", "VAT or MWST"]
    assert domain_topics("Swiss tax law", result.value.subtopics) == [
        "Swiss tax law/Cantonal income tax",
        "Swiss tax law/VAT or MWST",
    ]
    assert parse_subtopics("I cannot help with that.").reason == "no_json"
    with pytest.raises(ValueError, match=r"topics\.domain"):
        domain_prompt("  ", 3)
