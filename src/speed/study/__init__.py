"""``speed study``: SPEED's ablation and E5's recipe at small scale (issue 16).

Equal-size training sets from each data source (:mod:`speed.study.sources`), embedders trained on
each with several seeds and scored on MTEB's own tasks (:mod:`speed.study.run`), and a table with
95% intervals and paired differences (:mod:`speed.study.table`, :mod:`speed.study.stats`).
"""

from speed.study.run import check_study, load_table, resolve_embedders, run_study
from speed.study.sources import SOURCE_STAGES, StudyRunner, training_sets
from speed.study.stats import mean_interval, paired_difference
from speed.study.table import build_table, markdown_table, plot_table

__all__ = [
    "SOURCE_STAGES",
    "StudyRunner",
    "build_table",
    "check_study",
    "load_table",
    "markdown_table",
    "mean_interval",
    "paired_difference",
    "plot_table",
    "resolve_embedders",
    "run_study",
    "training_sets",
]
