"""Post-processing of synthetic examples: parsing, quality filters, dedup and decontamination.

``parsing`` (JSON extraction, repair, validation), ``filters`` (named drop reasons and the
``DropCounter`` that all of them report to), ``dedup`` (MinHash LSH) and ``decontam`` (n-gram overlap
with the evaluation data). Import the submodules; this package imports nothing heavy.
"""
