"""MarginMaskedMultipleNegativesRankingLoss: InfoNCE whose in-batch negatives that score near the
positive are masked out, as likely false negatives.

With synthetic data, two examples of a batch may share a topic, or the same passage, so another
row's positive can answer this row's query: a false negative that InfoNCE pushes away. This loss
drops from the softmax every in-batch negative (another row's positive or hard negative) whose
score, by the model being trained, is at least ``positive - margin``. The row's own hard negative is
never masked: it was chosen as a negative (and, mined, checked against the positive already).
sentence-transformers' ``GISTEmbedLoss`` does the same with a separate guide model's scores; this
loss needs no second model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import all_gather_with_grad, cos_sim, get_rank
from torch import Tensor


class MarginMaskedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss with in-batch negatives above ``positive - margin`` masked.

    Args:
        model: the SentenceTransformer being trained.
        scale: inverse temperature of the softmax (E5: 1 / 0.02).
        margin: an in-batch negative scoring at least ``positive - margin`` (cosine) is masked; 0
            masks those scoring as high as the positive or higher (a duplicate positive).
        similarity_fct: the similarity of query and document embeddings.
        gather_across_devices: take in-batch negatives from every process (DDP), as E5 did.

    Inputs:
        (anchor, positive) pairs or (anchor, positive, negative) triplets, as
        MultipleNegativesRankingLoss.

    Attributes:
        masked: in-batch negatives masked since construction.
        seen: in-batch negatives seen since construction.

    Example::

        loss = MarginMaskedMultipleNegativesRankingLoss(model, scale=50.0, margin=0.05)
    """

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        margin: float = 0.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices
        )
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.masked = 0
        self.seen = 0

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        queries, docs = embeddings[0], embeddings[1:]
        batch_size = queries.size(0)
        offset = 0
        if self.gather_across_devices:
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(doc) for doc in docs]
            offset = get_rank() * batch_size
        world = queries.size(0)
        local = torch.arange(offset, offset + batch_size, device=queries.device)
        rows = torch.arange(batch_size, device=queries.device)
        # (bs, world * (1 + negatives)): column j of block b is row j's document b
        sims = self.similarity_fct(queries[local], torch.cat(docs, dim=0))
        positive = sims[rows, local]
        own = torch.eye(world, device=queries.device, dtype=torch.bool)[local].repeat(1, len(docs))
        with torch.no_grad():
            mask = (sims >= positive.unsqueeze(1) - self.margin) & ~own
        self.masked += int(mask.sum())
        self.seen += int((~own).sum())
        logits = (sims * self.scale).masked_fill(mask, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, local)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "margin": self.margin}

    @property
    def citation(self) -> str:
        return (
            "@misc{moreira2024nvretriever, title={NV-Retriever: Improving text embedding models with "
            "effective hard-negative mining}, author={Moreira, Gabriel de Souza P. and others}, "
            "year={2024}, eprint={2407.15831}, archivePrefix={arXiv}}"
        )
