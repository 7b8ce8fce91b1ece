"""Evaluation of embedding models on MTEB's own tasks with data read from local folders.

Public entry points:

- ``evaluate_model(model, tasks, data_dir=None, out_dir=None, instructions=False, batch_size=64,
  baseline=None)``: scores, a results JSON and a markdown table beside a baseline.
- ``get_task(name, data_dir=None)``: one MTEB task instance whose data is local.

Importing this package does not import mteb or torch; they load on first use.
"""

from speed.evaluation.mteb_eval import evaluate_model, load_embedder
from speed.evaluation.registry import (
    INSTRUCTIONS,
    SUITES,
    TASKS,
    LocalTask,
    UnknownTaskError,
    get_task,
    resolve_task_names,
)
from speed.evaluation.results import category_averages, markdown_table, write_results
from speed.formats import format_query, instruction_prefix

__all__ = [
    "INSTRUCTIONS",
    "SUITES",
    "TASKS",
    "LocalTask",
    "UnknownTaskError",
    "category_averages",
    "evaluate_model",
    "format_query",
    "get_task",
    "instruction_prefix",
    "load_embedder",
    "markdown_table",
    "resolve_task_names",
    "write_results",
]
