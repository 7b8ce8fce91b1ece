"""E5-style instructions at evaluation time, as an MTEB encoder wrapper.

An instruction-trained embedder (E5-mistral, SPEED) reads ``Instruct: {task}\\nQuery: {text}`` on the
query side and bare documents. Which side is which comes from MTEB's ``prompt_type``:

- ``query``: the instruction is prepended (retrieval and reranking queries);
- ``document``: the text is left bare (retrieval corpora, reranking candidates);
- none (STS, classification, clustering, which have no sides): the instruction is prepended to every
  input, as E5 did for its symmetric tasks.

The wrapper subclasses MTEB's own ``SentenceTransformerEncoderWrapper`` and changes only the text that
reaches the model, so similarity functions, batching and metadata stay MTEB's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

# the same prefix the training rows were written with (one formatter for both sides)
from speed.formats import instruction_prefix

logger = logging.getLogger(__name__)


def instructed_encoder(model: Any, instructions: Mapping[str, str]) -> Any:
    """Wrap a SentenceTransformer for MTEB so that each task's inputs carry its instruction.

    Args:
        model: A loaded ``SentenceTransformer``.
        instructions: Task name -> instruction; tasks not in it are encoded bare.

    Returns:
        An MTEB encoder (a ``SentenceTransformerEncoderWrapper`` subclass).
    """
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from mteb.types import PromptType

    class InstructedEncoder(SentenceTransformerEncoderWrapper):
        """MTEB's SentenceTransformer wrapper, with E5-style instructions on the query side."""

        def encode(
            self,
            inputs: Any,
            *,
            task_metadata: Any,
            hf_split: str,
            hf_subset: str,
            prompt_type: Any = None,
            **kwargs: Any,
        ) -> Any:
            instruction = instructions.get(task_metadata.name)
            if not instruction or prompt_type == PromptType.document:
                return super().encode(
                    inputs,
                    task_metadata=task_metadata,
                    hf_split=hf_split,
                    hf_subset=hf_subset,
                    prompt_type=prompt_type,
                    **kwargs,
                )
            texts = [text for batch in inputs for text in batch["text"]]
            logger.debug("%s: %d inputs with instruction %r", task_metadata.name, len(texts), instruction)
            embeddings = self.model.encode(texts, prompt=instruction_prefix(instruction), **kwargs)
            if hasattr(embeddings, "cpu"):
                embeddings = embeddings.cpu().detach().float().numpy()
            return embeddings

    return InstructedEncoder(model)
