"""The pipeline's stages, one module each; importing this package registers them all."""
