"""Evaluation: perplexity, zero-shot accuracy, sparsity and reconstruction error through one entry point.

``evaluate(model, tokenizer, perplexity=..., zero_shot=..., report=...)`` measures a model as it is in memory and
returns EvalResults; ``PruneReport.record_evaluation`` stores them (dense baseline and pruned model) so the model
card's model-index lists them; ``compare`` (``hf_recon_prune.comparison``) puts several models side by side (JSON and
markdown).

Perplexity protocol (as in the SparseGPT/Wanda reference code): join the test documents, cut the token stream into
non-overlapping windows of ``seq_len`` tokens (the incomplete tail is dropped), average the next-token negative
log-likelihood over every predicted token, and exponentiate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .block_io import batches
from .comparison import Comparison, compare  # noqa: F401 - Comparison is re-exported

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    weight = model.get_input_embeddings().weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


# ====================================================================================================== where it runs
#: Of a GPU's free memory, what a measurement moved there may fill: the model's weights and one batch's working set.
EVALUATION_MEMORY_FRACTION = 0.9
CPU = torch.device("cpu")


def evaluation_working_bytes(model: nn.Module, batch_size: int, seq_len: int) -> int:
    """The memory one perplexity batch needs beside the weights: the float32 logits three times over (logits, their
    float32 copy, the log-softmax) and a few hidden-state tensors per layer in flight."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    tokens = batch_size * seq_len
    return 3 * 4 * tokens * vocab + 16 * 4 * tokens * hidden


def evaluation_device(model: nn.Module, requested: str = "auto", *, working_bytes: int = 0,
                      free_bytes: Optional[int] = None) -> tuple[torch.device, str]:
    """Where a measurement of ``model`` (perplexity, zero-shot, self-generation) should run, and why.

    ``requested``: ``"auto"`` (a GPU when there is one and the model fits there, else where the model is), ``"cpu"``,
    or a device such as ``"cuda:1"`` (refused with ValueError when the model does not fit). A model that is not
    entirely in CPU memory (already on a GPU, or dispatched by Accelerate with offloaded layers) runs where it is.
    The model fits when its weights and ``working_bytes`` take at most :data:`EVALUATION_MEMORY_FRACTION` of the
    device's free memory (``free_bytes``; measured when None)."""
    where = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if requested == "cpu":
        if where != {"cpu"}:
            return _model_device(model), "the model is not in CPU memory (dispatched or on a GPU): it runs where it is"
        return CPU, "asked for the CPU"
    if where != {"cpu"} or getattr(model, "hf_device_map", None):
        return _model_device(model), "the model runs where it was loaded"
    if requested == "auto":
        if not torch.cuda.is_available():
            return CPU, "no GPU"
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        try:
            target = torch.device(requested)
        except RuntimeError:
            target = None
        if target is None or target.type not in ("cpu", "cuda"):
            raise ValueError(f"device={requested!r} is not allowed here; allowed: 'auto', 'cpu' or a CUDA device")
        if target.type == "cpu":
            return CPU, "asked for the CPU"
        if not torch.cuda.is_available():
            raise ValueError(f"device={requested!r}: this machine has no CUDA device; use 'auto' or 'cpu'")
        target = torch.device("cuda", torch.cuda.current_device() if target.index is None else target.index)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(target)[0]
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    needed = weights + working_bytes
    if needed > EVALUATION_MEMORY_FRACTION * free_bytes:
        why = (f"the model and one batch need {needed / 2**30:.1f} GiB and {target} has {free_bytes / 2**30:.1f} GiB "
               "free")
        if requested != "auto":
            raise ValueError(f"device={requested!r}: {why}; use 'cpu', a smaller batch or a device with more memory")
        return CPU, f"{why}: it runs on the CPU (slow on a large model; fewer windows are less work)"
    return target, f"the model fits on {target}"


@contextlib.contextmanager
def placed_for_evaluation(model: nn.Module, requested: str = "auto", *,
                          working_bytes: int = 0) -> Iterator[tuple[torch.device, str]]:
    """Move a model in CPU memory to the device :func:`evaluation_device` chooses for the measurements inside, and
    back to the CPU afterwards (also after an error); yields ``(device, why)``."""
    device, why = evaluation_device(model, requested, working_bytes=working_bytes)
    moved = device.type != "cpu" and _model_device(model).type == "cpu"
    if moved:
        model.to(device)
    try:
        yield device, why
    finally:
        if moved:
            model.to(CPU)
            torch.cuda.empty_cache()  # the memory goes back to whatever runs next (pruning plans with what is free)


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = False) -> float:
    """Perplexity of ``model`` over token windows [W, L]; each window is scored independently (no context carried)."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise TypeError(f"perplexity needs integer token ids, got windows of dtype {windows.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is not allowed; allowed: an integer > 0")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total_nll, total_tokens = 0.0, 0
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=windows.shape[0], desc="perplexity", unit="window")
    try:
        for rows in batches(windows.shape[0], batch_size):
            ids = windows[rows].to(device=device, dtype=torch.long)  # int32 ids would fail in cross_entropy
            logits = model(input_ids=ids, use_cache=False).logits
            # half-precision logits are summed in float32; a float64 model keeps its precision
            logits = logits if logits.dtype == torch.float64 else logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
            if progress is not None:
                progress.update(ids.shape[0])
    finally:
        model.train(was_training)
        if progress is not None:
            progress.close()
    return math.exp(total_nll / total_tokens)


def perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    source: Union[str, list[str], torch.Tensor] = "wikitext2",
    split: str = "test",
    seq_len: int = 2048,
    batch_size: int = 4,
    max_windows: Optional[int] = None,
    text_column: Optional[str] = None,
    show_progress: bool = False,
) -> float:
    """Perplexity on a named dataset ("wikitext2", "c4", "ptb", "default"), a local file, a list of texts, or ids.

    ``source`` may also be a LongTensor of windows [W, L], in which case ``tokenizer`` is not needed.
    """
    if isinstance(source, torch.Tensor):
        windows = source
    else:
        from .calibration import stream_windows_for_eval

        if tokenizer is None:
            raise ValueError("perplexity on text needs a tokenizer")
        texts = _evaluation_texts(source, split, text_column)
        windows = stream_windows_for_eval(texts, tokenizer, seq_len, max_windows=max_windows)
    if max_windows is not None:
        windows = windows[:max_windows]
    return perplexity_of_ids(model, windows, batch_size=batch_size, show_progress=show_progress)


# ====================================================================================================== one entry point
# Everything we measure on a model goes through ``evaluate``: perplexity on named datasets, files or texts,
# zero-shot accuracy through lm-evaluation-harness, the measured sparsity, and the reconstruction errors a
# PruneReport recorded. Its EvalResults feed the report (``PruneReport.record_evaluation``), hence the model card's
# model-index, the CLI's ``eval`` command, and the side-by-side ``compare`` view.

PerplexitySources = Union[None, str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]], Mapping[str, Any]]


@dataclass
class EvalResults:
    """What ``evaluate`` measured on one model; JSON round-trips with ``to_dict`` / ``from_dict``.

    ``perplexity``: ``{label: {"source", "split", "seq_len", "windows", "value"}}``; ``zero_shot``: a
    ``ZeroShotResults`` (per task and mean); ``reconstruction``: the final block's error before/after reconstruction
    on calibration and held-out samples, copied from a PruneReport; ``sparsity``: the fraction of zero weights in
    the decoder blocks' linear layers, measured on the weights.
    """

    model: Optional[str] = None
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero_shot: Optional[Any] = None  # ZeroShotResults
    reconstruction: Optional[dict[str, Any]] = None
    sparsity: Optional[float] = None

    @property
    def zero_shot_mean(self) -> Optional[float]:
        return self.zero_shot.mean if self.zero_shot is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "sparsity": self.sparsity, "perplexity": {k: dict(v) for k, v in self.perplexity.items()},
            "zero_shot": self.zero_shot.to_dict() if self.zero_shot is not None else None,
            "reconstruction": self.reconstruction,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResults":
        from .zero_shot import ZeroShotResults

        zero_shot = data.get("zero_shot")
        return cls(model=data.get("model"), perplexity={k: dict(v) for k, v in (data.get("perplexity") or {}).items()},
                   zero_shot=ZeroShotResults.from_dict(zero_shot) if zero_shot else None,
                   reconstruction=data.get("reconstruction"), sparsity=data.get("sparsity"))

    @classmethod
    def from_report(cls, report: Any, role: str = "pruned") -> "EvalResults":
        """The results a PruneReport holds for the pruned model (``role="pruned"``) or its dense baseline."""
        from .report import _check_role
        from .zero_shot import TaskScore, ZeroShotResults

        _check_role(role)
        perplexity = {}
        for label, entry in (getattr(report, "perplexity", None) or {}).items():
            if isinstance(entry, Mapping) and entry.get(role) is not None:
                perplexity[str(label)] = {"source": str(label), "split": entry.get("split"),
                                          "seq_len": entry.get("seq_len"), "windows": entry.get("windows"),
                                          "value": entry[role]}
        zero_shot = None
        stored = getattr(report, "zero_shot", None) or {}
        tasks = {}
        for name, entry in (stored.get("tasks") or {}).items():
            metrics = entry.get(role)
            if not metrics or entry.get("metric") not in metrics:
                continue
            tasks[name] = TaskScore(task=name, metric=entry["metric"], value=metrics[entry["metric"]],
                                    stderr=metrics.get(f"{entry['metric']}_stderr"), metrics=dict(metrics),
                                    num_samples=entry.get("num_samples"), dataset=dict(entry.get("dataset") or {}),
                                    version=entry.get("version"))
        if tasks:
            zero_shot = ZeroShotResults(tasks=tasks, num_fewshot=stored.get("num_fewshot", 0),
                                        metric=stored.get("metric", "acc"), limit=stored.get("limit"),
                                        harness_version=stored.get("harness_version"))
        is_pruned = role == "pruned"
        return cls(model=getattr(report, "model_name", None) if is_pruned else "dense", perplexity=perplexity,
                   zero_shot=zero_shot, reconstruction=reconstruction_summary(report) if is_pruned else None,
                   sparsity=(getattr(report, "mean_sparsity", None) or None) if is_pruned else None)

    def to_json_file(self, path: Union[str, "os.PathLike[str]"]) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        os.replace(tmp, path)

    @classmethod
    def from_json_file(cls, path: Union[str, "os.PathLike[str]"]) -> "EvalResults":
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def to_markdown(self) -> str:
        """The results as one row of the comparison table (see ``compare`` for several models side by side)."""
        return compare({self.model or "model": self}).to_markdown()


def evaluate(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    perplexity: PerplexitySources = None,
    zero_shot: Union[None, bool, str, Sequence[str]] = None,
    report: Any = None,
    split: str = "test",
    seq_len: int = 2048,
    batch_size: int = 4,
    max_windows: Optional[int] = None,
    text_column: Optional[str] = None,
    num_fewshot: int = 0,
    zero_shot_batch_size: Union[int, str] = 8,
    zero_shot_metric: str = "acc",
    limit: Optional[float] = None,
    include_path: Any = None,
    task_manager: Any = None,
    measure_sparsity: bool = True,
    model_name: Optional[str] = None,
    show_progress: bool = False,
) -> EvalResults:
    """Measure ``model`` as it is in memory: perplexity, zero-shot accuracy, sparsity; add a report's errors.

    Args:
        perplexity: what to measure perplexity on: a preset ("wikitext2", "c4", "ptb", "default"), an HF dataset id
            or a local file; a list of those; or a mapping ``{label: source}`` whose sources may also be lists of
            texts or LongTensors of token windows. Standard protocol (``perplexity_of_ids``) at ``seq_len``.
        zero_shot: lm-evaluation-harness task names, ``True`` / ``"paper"`` for the paper's seven tasks, or None.
            Needs the ``eval`` extra (``pip install 'hf-recon-prune[eval]'``).
        report: a PruneReport of the run that produced ``model``: its final-block reconstruction errors are copied in.
        split, seq_len, batch_size, max_windows, text_column: the perplexity protocol (see ``perplexity``).
        num_fewshot, zero_shot_batch_size, zero_shot_metric, limit, include_path, task_manager: passed to
            ``evaluate_zero_shot``.
        measure_sparsity: measure the fraction of zero weights (cheap; skipped for architectures not supported).
        model_name: a label for the results (default: the model's ``_name_or_path``).

    Returns:
        EvalResults. Store them with ``report.record_evaluation(results, role="pruned")`` (or ``role="dense"`` for
        the model before pruning): the saved model card then lists every value in its model-index.
    """
    sources = _perplexity_sources(perplexity)
    tasks = _zero_shot_tasks(zero_shot)
    if not sources and not tasks and report is None and not measure_sparsity:
        raise ValueError("nothing to evaluate: pass perplexity=..., zero_shot=... or report=...")
    needs_tokenizer = bool(tasks) or any(not isinstance(s, torch.Tensor) for s in sources.values())
    if needs_tokenizer and tokenizer is None:
        raise ValueError("perplexity on text and zero-shot evaluation need the model's tokenizer")
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "") or None
    results = EvalResults(model=name)
    if measure_sparsity:
        results.sparsity = _measured_sparsity(model)
    for label, source in sources.items():
        results.perplexity[label] = _perplexity_entry(model, tokenizer, source, split=split, seq_len=seq_len,
                                                      batch_size=batch_size, max_windows=max_windows,
                                                      text_column=text_column, show_progress=show_progress)
    if tasks:
        from .zero_shot import evaluate_zero_shot

        results.zero_shot = evaluate_zero_shot(
            model, tokenizer, tasks, num_fewshot=num_fewshot, batch_size=zero_shot_batch_size, metric=zero_shot_metric,
            limit=limit, include_path=include_path, task_manager=task_manager,
        )
    if report is not None:
        results.reconstruction = reconstruction_summary(report)
    return results


def reconstruction_summary(report: Any) -> Optional[dict[str, Any]]:
    """The final block's reconstruction error (the paper's "Error" column) before/after, per sample set, and the
    mean over blocks: ``{"block": i, "final": {"calibration": {"before", "after"}, "heldout": {...}}, "mean": {...}}``."""
    blocks = list(getattr(report, "blocks", None) or [])
    if not blocks:
        return None
    last = blocks[-1]
    seen = {s for b in blocks for s in (*b.error_before, *b.error_after)}
    splits = [s for s in ("calibration", "heldout") if s in seen] + sorted(seen - {"calibration", "heldout"})
    final = {s: {"before": last.error_before.get(s), "after": last.error_after.get(s)} for s in splits}
    mean = {}
    for s in splits:
        mean[s] = {}
        for when in ("before", "after"):
            values = [getattr(b, f"error_{when}").get(s) for b in blocks]
            values = [float(v) for v in values if v is not None]
            mean[s][when] = sum(values) / len(values) if values and len(values) == len(blocks) else None
    return {"block": last.index, "final": final, "mean": mean}


def _perplexity_sources(perplexity: PerplexitySources) -> dict[str, Any]:
    if perplexity is None:
        return {}
    if isinstance(perplexity, Mapping):
        return {str(label): source for label, source in perplexity.items()}
    if isinstance(perplexity, (str, os.PathLike)):
        perplexity = [perplexity]
    if isinstance(perplexity, torch.Tensor):
        raise TypeError("give token windows as a mapping {label: tensor}, e.g. perplexity={'heldout': windows}")
    sources = {}
    for source in perplexity:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"perplexity sources must be names or paths; put lists of texts or token windows in a "
                            f"mapping {{label: source}} (got {type(source).__name__})")
        sources[os.fspath(source)] = os.fspath(source)
    return sources


def _zero_shot_tasks(zero_shot: Union[None, bool, str, Sequence[str]]) -> list[str]:
    from .zero_shot import PAPER_TASKS, _task_list

    if zero_shot is None or zero_shot is False:
        return []
    if zero_shot is True or zero_shot == "paper":
        return list(PAPER_TASKS)
    return _task_list(zero_shot)


def _perplexity_entry(model, tokenizer, source, *, split, seq_len, batch_size, max_windows, text_column,
                      show_progress) -> dict[str, Any]:
    if isinstance(source, torch.Tensor):
        windows, described, split, seq_len = source, "token windows", None, int(source.shape[-1])
    else:
        from .calibration import describe_source, stream_windows_for_eval

        texts = _evaluation_texts(source, split, text_column)
        windows = stream_windows_for_eval(texts, tokenizer, seq_len, max_windows=max_windows)
        described = describe_source(source)
    if max_windows is not None:
        windows = windows[:max_windows]
    value = perplexity_of_ids(model, windows, batch_size=batch_size, show_progress=show_progress)
    return {"source": described, "split": split, "seq_len": seq_len, "windows": int(windows.shape[0]), "value": value}


def _evaluation_texts(source: Any, split: Optional[str], text_column: Optional[str]) -> list[str]:
    """``load_texts``, with its errors speaking of the evaluation source (they say "calibration" otherwise, which
    sent a user with a mistyped ``--eval-source`` to look at ``--calibration``)."""
    from .calibration import SourceLoadError, load_texts

    try:
        return load_texts(source, split=split, text_column=text_column)
    except (ValueError, TypeError, OSError, SourceLoadError) as err:
        message = str(err).replace("calibration source", "evaluation source").replace("calibration file",
                                                                                    "evaluation file")
        if message == str(err):
            raise
        raise type(err)(message) from err


def model_sparsity(model: Any, config: Any = None) -> dict[str, Any]:
    """Fraction of zero weights in the prunable weights of the decoder blocks (``prunable.prunable_weights``:
    linear layers, fused experts parameters, Conv1D; routers, embeddings and the LM head are skipped).

    ``config`` (a PruningConfig, e.g. the one a saved folder stores) makes the count follow the run's choices: its
    ``include_modules`` / ``exclude_modules`` filter the weights, and weights its ``sparsity_overrides`` set to 0
    count as left dense, as the run's report counts them.

    Returns ``{"overall": zeros / weights over all those layers, "zeros": int, "total": int,
    "layers": {"model.layers.0.self_attn.q_proj": fraction, ...}, "by_type": {"self_attn.q_proj": fraction, ...},
    "skipped": [names of layers whose weights are not materialised (meta device)], "block_parameters": int,
    "left_dense": {why: parameters}, "left_dense_names": {why: [names inside a block]}}``. Works on any supported
    model, including one loaded back with plain ``AutoModelForCausalLM.from_pretrained``.
    """
    from .architectures import resolve_layout
    from .prunable import prunable_weights, unprunable_parameters
    from .sparsity_profile import weight_sparsity

    include = getattr(config, "include_modules", None)
    exclude = getattr(config, "exclude_modules", None)
    overrides = getattr(config, "sparsity_overrides", None)
    layout = resolve_layout(model)
    layers: dict[str, float] = {}
    by_type: dict[str, list[int]] = {}
    skipped: list[str] = []
    left_dense: dict[str, int] = {}
    left_dense_names: dict[str, set[str]] = {}
    zeros_total = weights_total = block_parameters = 0
    with torch.no_grad():
        for index, block in enumerate(layout.blocks):
            block_parameters += sum(p.numel() for p in block.parameters())
            weights = prunable_weights(block, include, exclude, model.config.get_text_config())
            dense = {name: (reason, block.get_parameter(name).numel())
                     for name, reason in unprunable_parameters(block, weights).items()}
            for name, prunable in weights.items():
                weight = prunable.weight
                if overrides and weight_sparsity(name, 1.0, overrides) == 0.0:
                    dense[prunable.parameter_name] = ("sparsity override 0", weight.numel())
                    continue
                full_name = f"{layout.blocks_path}.{index}.{name}"
                if weight.device.type == "meta":
                    skipped.append(full_name)
                    continue
                zeros, numel = int((weight == 0).sum()), weight.numel()
                layers[full_name] = zeros / numel if numel else 0.0
                counts = by_type.setdefault(name, [0, 0])
                counts[0] += zeros
                counts[1] += numel
                zeros_total += zeros
                weights_total += numel
            for name, (reason, numel) in dense.items():
                left_dense[reason] = left_dense.get(reason, 0) + numel
                left_dense_names.setdefault(reason, set()).add(name)
    return {
        "overall": zeros_total / weights_total if weights_total else 0.0,
        "zeros": zeros_total,
        "total": weights_total,
        "layers": layers,
        "by_type": {name: z / n if n else 0.0 for name, (z, n) in by_type.items()},
        "skipped": skipped,
        "block_parameters": block_parameters,
        "left_dense": left_dense,
        "left_dense_names": {reason: sorted(names) for reason, names in left_dense_names.items()},
    }


def _measured_sparsity(model: nn.Module) -> Optional[float]:
    try:
        measured = model_sparsity(model)
    except Exception as err:  # an architecture without a known block layout: the other results still count
        logger.info("sparsity not measured: %s", err)
        return None
    return measured["overall"] if measured["total"] else None
