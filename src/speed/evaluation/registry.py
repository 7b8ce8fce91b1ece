"""Registry of the evaluation tasks that speed can run offline, and how each is built.

A registered task is MTEB's own task class (``mteb.get_task(name)``: same metadata, evaluator, splits,
main score, dataset transform) subclassed with one change: ``load_data`` reads the local folder in the
layout of ``shared/eval`` instead of the dataset hub. Where MTEB has no such task (Cranfield,
TrecQA-clean), ``custom_tasks.py`` declares one of the right type with its own metadata.

Each entry also carries the task's instruction for instruction-trained models, in E5's style
(``Instruct: {instruction}\\nQuery: {text}``); the wording is ours. Adding a task is one entry here plus
a folder in the data directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from speed.evaluation import loaders
from speed.paths import eval_data_dir
from speed.suggest import did_you_mean

logger = logging.getLogger(__name__)

Layout = Literal["sts", "classification", "clustering", "retrieval", "reranking"]


@dataclass(frozen=True)
class LocalTask:
    """One evaluation task read from a local folder.

    Attributes:
        name: The MTEB task name (or speed's own, for tasks MTEB lacks).
        folder: The task's folder, relative to the evaluation data directory.
        layout: Which reader of ``loaders.py`` understands the folder.
        instruction: The task description for instruction-trained models (E5 style, our wording).
        hf_subsets: The HF subsets to evaluate (multilingual tasks); None: the task's own.
        custom: True for tasks that MTEB lacks (declared in ``custom_tasks.py``).
    """

    name: str
    folder: str
    layout: Layout
    instruction: str
    hf_subsets: tuple[str, ...] | None = None
    custom: bool = False
    splits: tuple[str, ...] = field(default=("train", "validation", "dev", "test"))


TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in [
        LocalTask("STSBenchmark", "sts/STSBenchmark", "sts", "Retrieve semantically similar text."),
        LocalTask("SICK-R", "sts/SICK-R", "sts", "Retrieve semantically similar text."),
        LocalTask(
            "Banking77Classification",
            "classification/Banking77",
            "classification",
            "Given an online banking query, find the corresponding intent.",
        ),
        LocalTask(
            "SIB200ClusteringS2S",
            "clustering/SIB200-eng",
            "clustering",
            "Identify the topic or theme of the given sentence.",
            hf_subsets=("eng_Latn",),
        ),
        LocalTask(
            "SciFact",
            "retrieval/SciFact",
            "retrieval",
            "Given a scientific claim, retrieve documents that support or refute the claim.",
        ),
        LocalTask(
            "NFCorpus",
            "retrieval/NFCorpus",
            "retrieval",
            "Given a question about nutrition or health, retrieve documents that best answer it.",
        ),
        LocalTask(
            "Cranfield",
            "retrieval/Cranfield",
            "retrieval",
            "Given a question about aeronautics, retrieve scientific abstracts that answer it.",
            custom=True,
        ),
        LocalTask(
            "TrecQA-clean",
            "reranking/TrecQA-clean",
            "reranking",
            "Given a factoid question, retrieve the sentences that answer it.",
            custom=True,
        ),
    ]
}

#: Named task lists; ``all`` is every registered task.
SUITES: dict[str, list[str]] = {
    "all": list(TASKS),
    "quick": ["STSBenchmark", "SciFact", "Banking77Classification"],
}

#: The E5-style instruction of each registered task.
INSTRUCTIONS: dict[str, str] = {name: t.instruction for name, t in TASKS.items()}


class UnknownTaskError(KeyError):
    """A task name that is neither registered nor a suite; the message names the nearest ones."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def resolve_task_names(names: Iterable[str] | str) -> list[str]:
    """Expand suite names and check task names, keeping order and dropping repeats.

    Raises:
        UnknownTaskError: a name is not registered; the message suggests the nearest names.
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        expanded = SUITES.get(name, [name])
        for task in expanded:
            if task not in TASKS:
                hint = did_you_mean(task, [*TASKS, *SUITES], n=3, cutoff=0.4)
                raise UnknownTaskError(
                    f"unknown evaluation task '{task}' (evaluate.tasks); registered tasks: "
                    f"{', '.join(TASKS)}; suites: {', '.join(SUITES)}.{hint}"
                )
            if task not in out:
                out.append(task)
    return out


def _loader(spec: LocalTask, folder: Path, splits: Sequence[str]) -> Callable[[], Any]:
    if spec.layout == "sts":
        return lambda: loaders.load_sts(folder, splits)
    if spec.layout == "classification":
        return lambda: loaders.load_classification(folder, splits)
    if spec.layout == "clustering":
        return lambda: loaders.load_clustering(folder, splits, spec.hf_subsets or ("default",))
    if spec.layout == "retrieval":
        return lambda: loaders.load_beir(folder, splits)
    if spec.layout == "reranking":
        return lambda: loaders.load_beir(folder, splits, top_ranked=True)
    raise ValueError(f"task '{spec.name}': unknown layout '{spec.layout}'")


_LOCAL_CLASSES: dict[tuple[type[Any], str], type[Any]] = {}


def _local_class(base: type[Any], spec: LocalTask) -> type[Any]:
    """``base`` (an MTEB task class) with ``load_data`` reading a local folder; cached per base."""
    key = (base, spec.name)
    if key in _LOCAL_CLASSES:
        return _LOCAL_CLASSES[key]

    def load_data(self: Any, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        from mteb.timing import TimingStack

        timer = kwargs.get("timer") or TimingStack()
        folder: Path = self.local_folder
        # the retrieval readers need only the evaluation splits; others may need train (classification)
        # or all splits (SIB200's transform merges them), so read every split the folder has
        splits = list(self.eval_splits) if spec.layout in ("retrieval", "reranking") else list(spec.splits)
        with timer("Data loading", log_message=f"Loading {self.metadata.name} from {folder}..."):
            self.dataset = _loader(spec, folder, splits)()
        with timer("Dataset transform"):
            self.dataset_transform(num_proc=num_proc)
        self.data_loaded = True

    cls = type(
        f"Local{base.__name__}",
        (base,),
        {
            "load_data": load_data,
            "__module__": __name__,
            "__doc__": f"MTEB's {spec.name} with its data read from a local folder ({spec.folder}).",
        },
    )
    _LOCAL_CLASSES[key] = cls
    return cls


def get_task(name: str, data_dir: str | Path | None = None) -> Any:
    """An MTEB task instance whose data comes from the local evaluation folder.

    Args:
        name: A registered task name (see ``TASKS``).
        data_dir: The evaluation data directory; None: ``eval_data_dir()`` (``$SPEED_EVAL_DIR`` or
            ``shared/eval`` beside the repository).

    Returns:
        An instance of a subclass of the official MTEB task class (or of speed's own, for Cranfield
        and TrecQA-clean), with the same metadata.

    Raises:
        UnknownTaskError: the name is not registered (with suggestions).
        speed.paths.EvalDataNotFoundError: no data directory was found.
        speed.evaluation.loaders.EvalDataError: the task's folder is missing from the data directory.
    """
    (name,) = resolve_task_names([name])
    spec = TASKS[name]
    root = eval_data_dir(data_dir)
    folder = root / spec.folder
    if not folder.is_dir():
        raise loaders.EvalDataError(
            f"task '{name}' needs the folder '{spec.folder}' inside the evaluation data directory '{root}'; "
            "it is missing (see shared/eval/README.md for the layout)"
        )
    if spec.custom:
        from speed.evaluation.custom_tasks import custom_task_class

        base = custom_task_class(name)
    else:
        import mteb

        base = type(mteb.get_task(name))
    cls = _local_class(base, spec)
    task = cls()
    task.local_folder = folder
    if spec.hf_subsets is not None:
        task.filter_languages(languages=None, hf_subsets=list(spec.hf_subsets))
    return task


def task_type(name: str) -> str:
    """The MTEB task type (``STS``, ``Retrieval``, ...) of a registered task, without loading data."""
    spec = TASKS[resolve_task_names([name])[0]]
    if spec.custom:
        from speed.evaluation.custom_tasks import custom_task_class

        return str(custom_task_class(spec.name).metadata.type)
    import mteb

    return str(mteb.get_task(spec.name).metadata.type)
