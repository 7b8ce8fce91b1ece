"""The teacher's revision (its model, prompt and schema) and the revisor's prompt."""

from __future__ import annotations

from speed.stages.alignment import REASON_MAX_CHARS, revisor_prompt
from speed.stages.revisions import parse_revision, revise_prompt, revision_json_schema
from speed.tasks import get_kind, strict_schema

STS = {"S1": "A dog runs.", "S2": "A dog is running.", "S3": "A cat sleeps."}


def test_revise_prompt_and_parse_revision() -> None:
    example = get_kind("sts").schema.model_validate(STS)
    prompt = revise_prompt("GEN PROMPT", example)
    assert "GEN PROMPT" in prompt and '"S1": "A dog runs."' in prompt
    for word in ("relevance", "completeness", "accuracy"):
        assert word in prompt
    text = (
        '```json\n{"reason": "S3 was too close", "revised": '
        '{"s1": "A dog runs.", "S2": "A dog is running.", "S3": "A dog barks."}}\n```'
    )
    result = parse_revision(text, "sts")
    assert result.ok, result.detail
    assert result.value.revised.S3 == "A dog barks." and result.value.reason == "S3 was too close"
    missing = parse_revision('{"reason": "x", "revised": {"S1": "a", "S2": "b"}}', get_kind("sts"))
    assert missing.reason == "schema_mismatch" and "revised.S3" in missing.detail


def test_revision_schema_comes_from_the_models_with_the_example_inlined() -> None:
    schema = revision_json_schema(get_kind("retrieval"))
    assert schema["required"] == ["reason", "revised"] and schema["additionalProperties"] is False
    assert "$defs" not in schema and "$ref" not in str(schema)  # not every decoder follows $ref
    assert schema["properties"]["reason"]["maxLength"] == REASON_MAX_CHARS
    # the revised example is the kind's own schema, with the field's description
    revised = schema["properties"]["revised"]
    assert revised["description"].startswith("The revised example")
    assert revised["properties"] == strict_schema(get_kind("retrieval").schema)["properties"]
    assert revised["additionalProperties"] is False
    assert revised["required"] == ["user_query", "positive_document", "hard_negative_document"]


def test_revisor_prompt_holds_prompt_and_example() -> None:
    prompt = revisor_prompt("GEN PROMPT", '{"S1": "a"}')
    assert "GEN PROMPT" in prompt and '{"S1": "a"}' in prompt
