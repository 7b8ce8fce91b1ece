"""Task kinds, their prompts and topics (DESIGN.md, "Task kind").

``get_kind(name)`` returns one of: retrieval, classification, sts, matching_short, matching_long,
bitext. Importing this package registers them, and the grounded variants of retrieval and matching
(:mod:`speed.tasks.grounded`), which stages use when a corpus is configured.
"""

# isort: off
# imported in this order so that kind_names() lists the kinds as SPEED does (registration order)
from speed.tasks import retrieval, classification, sts, matching, bitext  # noqa: F401

# the grounded variants of retrieval and matching (a corpus passage is the positive)
from speed.tasks import grounded  # noqa: F401

# isort: on
from speed.formats import QUERY_FORMAT, format_query
from speed.tasks.base import (
    Example,
    TaskKind,
    TaskList,
    TemplateError,
    UnknownKindError,
    example_json,
    get_kind,
    kind_names,
    list_templates,
    register_kind,
    render_template,
    strict_schema,
    template_hash,
    template_path,
)

__all__ = [
    "QUERY_FORMAT",
    "Example",
    "TaskKind",
    "TaskList",
    "TemplateError",
    "UnknownKindError",
    "example_json",
    "format_query",
    "get_kind",
    "kind_names",
    "list_templates",
    "register_kind",
    "render_template",
    "strict_schema",
    "template_hash",
    "template_path",
]
