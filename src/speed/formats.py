"""E5's query format: ``Instruct: {instruction}\\nQuery: {query}``, written and read in one place.

An instruction-trained embedder (E5-mistral, SPEED) reads its queries in this form, at training time
(the rows a task kind writes, the anchors the contrastive trainer builds) and at evaluation time (the
prompt MTEB's encoder puts before a query). If the two sides wrote it differently (one stripping
whitespace, the other not) the model would be evaluated on a format it was not trained on, so every
writer uses :func:`format_query` or :func:`instruction_prefix`, and every reader that needs the parts
back (the export to other trainers' layouts) uses :func:`parse_query`, the inverse of the formatter.

Design choices:
- Instruction and query are stripped: the model never saw stray spaces around either.
- A query that already carries an instruction is left as it is, so a row whose ``query`` was written
  with its instruction is never prefixed twice.
- This module imports nothing of speed's, so any layer may use it.
"""

from __future__ import annotations

#: What comes before the instruction, and what separates it from the query.
INSTRUCT = "Instruct: "
QUERY_MARKER = "\nQuery: "
#: The whole format, for documentation and other tools' flags (``--query_instruction_format``).
QUERY_FORMAT = INSTRUCT + "{instruction}" + QUERY_MARKER + "{query}"


def instruction_prefix(instruction: str) -> str:
    """The text put before a query: ``Instruct: {instruction}\\nQuery: `` (instruction stripped)."""
    return f"{INSTRUCT}{instruction.strip()}{QUERY_MARKER}"


def parse_query(text: str) -> tuple[str | None, str]:
    """Split a query written by :func:`format_query` into its instruction and its bare query.

    Surrounding whitespace is ignored, on the whole text and on each part.

    Args:
        text: a query, with or without the E5 instruction.

    Returns:
        ``(instruction, query)``; ``instruction`` is None when the text carries none.

    Example:
        >>> parse_query("Instruct: Find it.\\nQuery: q")
        ('Find it.', 'q')
    """
    stripped = text.strip()
    marker = QUERY_MARKER.rstrip()  # a query that is empty after stripping loses the marker's space
    if stripped.startswith(INSTRUCT.rstrip()) and marker in stripped:
        head, _, query = stripped.partition(marker)
        instruction = head[len(INSTRUCT.rstrip()) :].strip()
        if instruction:
            return instruction, query.strip()
    return None, stripped


def format_query(instruction: str | None, query: str) -> str:
    """A query as an instruction-trained model reads it: ``Instruct: {instruction}\\nQuery: {query}``.

    Args:
        instruction: the task's one-sentence instruction; None or blank gives the bare query.
        query: the query text; one that already carries an instruction is returned as it is
            (stripped), never prefixed twice.

    Returns:
        The formatted query, instruction and query stripped; :func:`parse_query` gives both back.
    """
    stripped = query.strip()
    if not instruction or not instruction.strip() or parse_query(stripped)[0] is not None:
        return stripped
    return instruction_prefix(instruction) + stripped
