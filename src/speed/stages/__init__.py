"""The pipeline's stages, one module each; importing this package registers them all."""

# alignment stages (SPEED): teacher -> junior (SFT) -> senior (DPO) -> revisor (SFT)
from speed.stages import (  # noqa: F401
    brainstorm,
    candidates,
    judge,
    junior,
    revisions,
    revisor,
    seed,
    senior,
    synthesize,  # the senior writes at scale, the revisor revises (sharded, local or Ray)
)

# the embedding model and its evaluation
from speed.stages import embed, evaluate  # noqa: E402, F401
