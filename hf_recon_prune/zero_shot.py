"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, run on the model object in memory.

Shin et al. (2024) judge every recipe by perplexity and by the mean zero-shot accuracy over seven tasks
(``PAPER_TASKS``). The maintained harness (PyPI ``lm_eval``, the ``eval`` extra) scores the model through its
Hugging Face wrapper, ``lm_eval.models.huggingface.HFLM(pretrained=<model>, tokenizer=<tokenizer>)``: the pruned
model is neither saved nor reloaded, and none of the frozen forks the research repositories ship is involved.

Metric. Every task here is multiple choice: the harness sums the log-probabilities of each choice's tokens after the
context and predicts the choice with the highest sum (``acc``). Where a task also defines ``acc_norm``, the sum is
divided by the choice's length in characters first. The headline is ``acc`` on every task by default: it is what the
Wanda/SparseGPT evaluation code the paper builds on prints, and the paper's numbers are consistent with it (HellaSwag
near 53 for 50%-sparse LLaMA-7B, where acc_norm would be near 70). ``metric="acc_norm"`` makes acc_norm the headline
on the tasks that define it (acc on the others); both are always recorded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

logger = logging.getLogger(__name__)

#: The seven tasks of the paper's zero-shot table, under their lm-evaluation-harness names.
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
INSTALL_HINT = "pip install 'hf-recon-prune[eval]'"
METRICS = ("acc", "acc_norm")
HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"

# Dataset builders of the ``datasets`` library: a task reading local files names one of these as its dataset_path,
# which is no Hub dataset id.
_PACKAGED_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "webdataset", "imagefolder",
                      "audiofolder", "sql", "generator"}

# Building the index of the harness's ~10k task configs takes seconds to tens of seconds; evaluating the dense and
# the pruned model in one process needs it once.
_TASK_MANAGERS: dict[tuple, Any] = {}


def require_lm_eval():
    """Import the harness, or raise an ImportError that names the extra to install."""
    try:
        import lm_eval
        from lm_eval import evaluator  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as err:
        # ModuleNotFoundError, so that callers catching the missing-module case (the CLI) report it cleanly.
        raise ModuleNotFoundError(
            f"zero-shot evaluation runs EleutherAI's lm-evaluation-harness (the lm_eval package), which could not "
            f"be imported ({err}); install it with: {INSTALL_HINT}",
            name="lm_eval",
        ) from err
    return lm_eval


# ====================================================================================================== results
@dataclass
class TaskScore:
    """One task's result: the headline ``metric`` and its ``value``, plus every metric the harness reported."""

    task: str
    metric: str
    value: float
    stderr: Optional[float] = None
    metrics: dict[str, Optional[float]] = field(default_factory=dict)  # {"acc": .., "acc_stderr": .., "acc_norm": ..}
    num_samples: Optional[int] = None
    dataset: dict[str, Optional[str]] = field(default_factory=dict)  # {"path", "name", "split"} as the task loads it
    version: Optional[str] = None  # the task config's version: results of different versions are not comparable
    samples: Optional[list[dict[str, Any]]] = None  # per document, only with return_samples=True

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in ("task", "metric", "value", "stderr", "metrics", "num_samples",
                                               "dataset", "version")}
        if self.samples is not None:
            data["samples"] = self.samples
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskScore":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class ZeroShotResults:
    """Per-task scores and their mean, as in the paper's table; ``to_markdown`` renders that table."""

    tasks: dict[str, TaskScore] = field(default_factory=dict)
    num_fewshot: int = 0
    metric: str = "acc"
    limit: Optional[float] = None
    harness_version: Optional[str] = None

    @property
    def mean(self) -> Optional[float]:
        """Unweighted mean of the headline metric over the tasks (the paper's "Mean" column)."""
        values = [t.value for t in self.tasks.values() if _finite(t.value) is not None]
        return sum(values) / len(values) if values and len(values) == len(self.tasks) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_fewshot": self.num_fewshot, "metric": self.metric, "limit": self.limit,
            "harness_version": self.harness_version, "mean": self.mean,
            "tasks": {name: score.to_dict() for name, score in self.tasks.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ZeroShotResults":
        return cls(
            tasks={name: TaskScore.from_dict(score) for name, score in (data.get("tasks") or {}).items()},
            num_fewshot=int(data.get("num_fewshot", 0)), metric=data.get("metric", "acc"),
            limit=data.get("limit"), harness_version=data.get("harness_version"),
        )

    def to_markdown(self, percent: bool = True) -> str:
        """One row per task (metric, value, standard error) and the mean, in percent like the paper by default."""
        scale, unit = (100.0, " (%)") if percent else (1.0, "")
        lines = [f"| task | metric | value{unit} | stderr{unit} | samples |", "|---|---|---:|---:|---:|"]
        for name, t in self.tasks.items():
            lines.append(f"| {name} | {t.metric} | {_fmt(t.value, scale)} | {_fmt(t.stderr, scale)} | "
                         f"{t.num_samples if t.num_samples is not None else '–'} |")
        lines.append(f"| **mean** | | **{_fmt(self.mean, scale)}** | | |")
        return "\n".join(lines)


# ====================================================================================================== running
def evaluate_zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Union[str, Sequence[str]] = PAPER_TASKS,
    num_fewshot: int = 0,
    batch_size: Union[int, str] = 8,
    *,
    metric: str = "acc",
    limit: Optional[float] = None,
    include_path: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]] = None,
    task_manager: Any = None,
    max_length: Optional[int] = None,
    return_samples: bool = False,
    bootstrap_iters: int = 100000,
    **hflm_kwargs: Any,
) -> ZeroShotResults:
    """Zero-shot (or few-shot) accuracy of ``model`` as it is in memory, through lm-evaluation-harness.

    Args:
        model: a ``*ForCausalLM`` model on the device it should run on; evaluated in eval mode, its training mode is
            restored afterwards. Its weights are not changed.
        tokenizer: the model's tokenizer. One without a pad token is copied before the harness sets one, so the
            caller's tokenizer is left as it was.
        tasks: harness task names (default: the paper's seven), or one name.
        num_fewshot: examples in the prompt; 0 as in the paper.
        batch_size: requests per forward pass, or "auto" (the harness finds the largest that fits).
        metric: the headline metric, "acc" (default) or "acc_norm" (used where a task defines it).
        limit: evaluate only this many documents per task (a fraction below 1: that share); for quick checks, the
            numbers are then not comparable to published ones.
        include_path: folder(s) with extra task YAML files (custom tasks), indexed alongside the built-in ones.
        task_manager: an ``lm_eval.tasks.TaskManager`` to use instead (e.g. one built with include_defaults=False).
        max_length: context length for the harness (default: the model config's maximum).
        return_samples: keep per-document log-likelihoods in ``TaskScore.samples`` (not needed for the table).
        bootstrap_iters: passed to the harness (standard errors of metrics that are not plain means).
        **hflm_kwargs: further arguments of ``HFLM`` (e.g. ``softmax_dtype="float32"`` for bf16 models).

    Returns:
        ZeroShotResults; ``.mean`` is the mean over the tasks, ``.to_markdown()`` the table.

    Raises:
        ModuleNotFoundError (an ImportError) naming ``pip install 'hf-recon-prune[eval]'`` when lm_eval is missing.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {METRICS}")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative int, got {num_fewshot!r}")
    if tokenizer is None:
        raise ValueError("zero-shot evaluation needs the model's tokenizer")
    task_names = _task_list(tasks)
    lm_eval = require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    manager = task_manager if task_manager is not None else get_task_manager(include_path)
    harness_tokenizer = tokenizer
    if getattr(tokenizer, "pad_token", None) is None:
        harness_tokenizer = copy.deepcopy(tokenizer)  # the harness sets a pad token on the object it gets

    was_training = getattr(model, "training", False)
    try:
        lm = HFLM(pretrained=model, tokenizer=harness_tokenizer, batch_size=batch_size, max_length=max_length,
                  **hflm_kwargs)
        with _preserved_rng_state():
            output = evaluator.simple_evaluate(
                model=lm, tasks=task_names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=return_samples, bootstrap_iters=bootstrap_iters,
            )
    finally:
        model.train(was_training)
    if output is None:  # only on non-zero ranks of a distributed run, which this in-memory path never starts
        raise RuntimeError("lm-evaluation-harness returned no results")
    return parse_harness_output(output, metric=metric, num_fewshot=num_fewshot, limit=limit,
                                harness_version=getattr(lm_eval, "__version__", None))


def get_task_manager(include_path=None, include_defaults: bool = True):
    """A (cached) ``lm_eval.tasks.TaskManager`` indexing the built-in tasks and the YAML files under ``include_path``."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"include_path {path} is not a folder of task YAML files")
    key = (tuple(paths), include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def parse_harness_output(output: Mapping[str, Any], *, metric: str = "acc", num_fewshot: int = 0,
                         limit: Optional[float] = None, harness_version: Optional[str] = None) -> ZeroShotResults:
    """ZeroShotResults from the dict ``lm_eval.simple_evaluate`` returns (leaf tasks only; groups are skipped)."""
    results = output.get("results") or {}
    configs = output.get("configs") or {}
    counts = output.get("n-samples") or {}
    versions = output.get("versions") or {}
    samples = output.get("samples") or {}
    scores: dict[str, TaskScore] = {}
    for name, entry in results.items():
        if name not in configs:  # a group's aggregate; its member tasks are reported themselves
            continue
        metrics = _metrics_of(entry)
        headline = metric if metric in metrics else "acc" if "acc" in metrics else next(
            (m for m in metrics if not m.endswith("_stderr")), None)
        if headline is None:
            logger.warning("task %s reported no metric; left out", name)
            continue
        config = configs.get(name) or {}
        split = config.get("test_split") or config.get("validation_split")
        count = counts.get(name) or {}
        scores[name] = TaskScore(
            task=name, metric=headline, value=metrics[headline], stderr=metrics.get(f"{headline}_stderr"),
            metrics=metrics,
            num_samples=count.get("effective", count.get("original")) if isinstance(count, dict) else None,
            dataset={"path": config.get("dataset_path"), "name": config.get("dataset_name"), "split": split},
            version=None if versions.get(name) is None else str(versions.get(name)),
            samples=[_sample_row(s) for s in samples[name]] if name in samples else None,
        )
    return ZeroShotResults(tasks=scores, num_fewshot=num_fewshot, metric=metric, limit=limit,
                           harness_version=harness_version)


def hub_dataset_id(dataset: Mapping[str, Any]) -> Optional[str]:
    """The Hub dataset id a task loads (``dataset_path``), or None for local files read by a packaged builder."""
    path = dataset.get("path") if isinstance(dataset, Mapping) else None
    if not isinstance(path, str) or not path or path.lower() in _PACKAGED_BUILDERS or os.path.isabs(path):
        return None
    return path


# ====================================================================================================== helpers
def _task_list(tasks: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    names = [str(t) for t in tasks if str(t).strip()]
    if not names:
        raise ValueError("no tasks given; e.g. tasks=hf_recon_prune.zero_shot.PAPER_TASKS")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks contains duplicates: {names}")
    return names


def _metrics_of(entry: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """{"acc": 0.5, "acc_stderr": 0.1, ...} from the harness's {"acc,none": 0.5, "acc_stderr,none": 0.1, ...}."""
    by_filter: dict[str, dict[str, Optional[float]]] = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        name, filter_name = key.split(",", 1)
        by_filter.setdefault(filter_name, {})[name] = _finite(value)
    if not by_filter:
        return {}
    # Multiple-choice tasks have the single filter "none"; other tasks report their first filter.
    return by_filter.get("none") or next(iter(by_filter.values()))


def _sample_row(sample: Mapping[str, Any]) -> dict[str, Any]:
    responses = sample.get("filtered_resps") or sample.get("resps") or []
    loglikelihoods = []
    for response in responses:
        value = response[0] if isinstance(response, (list, tuple)) else response
        if isinstance(value, (list, tuple)):  # unfiltered responses are nested one level deeper
            value = value[0]
        loglikelihoods.append(float(value))
    row = {"doc_id": sample.get("doc_id"), "target": sample.get("target"), "loglikelihoods": loglikelihoods}
    for name in METRICS:
        if name in sample:
            row[name] = sample[name]
    return row


@contextlib.contextmanager
def _preserved_rng_state() -> Iterator[None]:
    """The harness seeds Python, NumPy and torch globally; put the caller's generators back afterwards."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _finite(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):  # the harness writes "N/A" for a standard error it did not compute
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Optional[float], scale: float) -> str:
    return "–" if value is None else f"{value * scale:.2f}"
