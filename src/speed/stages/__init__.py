"""The pipeline's stages, one module each; importing this package registers them all."""

# alignment stages (SPEED): teacher -> junior (SFT) -> senior (DPO) -> revisor (SFT)
# the embedding model and its evaluation
from speed.stages import (  # noqa: F401  # noqa: E402, F401
    brainstorm,
    candidates,
    embed,
    evaluate,
    judge,
    junior,
    labels,
    revisions,
    revisor,
    seed,
    senior,
    synthesize,  # the senior writes at scale, the revisor revises (sharded, local or Ray)
)
