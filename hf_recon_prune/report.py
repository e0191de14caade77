"""What a pruning run returns: achieved sparsity, reconstruction errors per block, training curves and timings.

Reconstruction error (the paper's definition): the mean squared error, averaged over all tokens and hidden units,
between the sparse model's block output fed by the sparse stream and the dense model's block output fed by the dense
stream. ``before`` is measured once the block's masks (and LR) are applied, ``after`` once block-wise reconstruction
has finished; each on the calibration samples and on held-out samples that neither mask selection nor the optimiser
sees. When ``after`` on held-out data rises while it falls on calibration data, reconstruction overfits.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

ROLES = ("dense", "pruned")
#: ``PruneReport.calibration["source"]`` of a run given token ids (``Pruner(calibration_data=ids)``): the config's
#: calibration fields were not used.
USER_TOKEN_IDS = "user-provided token ids"


@dataclass
class BlockReport:
    index: int
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # per prunable weight (a fused experts parameter
    # counts once, over all its experts)
    # {"block": parameters in the block, "eligible": in its pruned weights, "pruned": zeros among those,
    #  "dense:<why>": parameters left dense for that reason ("router", "bias", "norm or vector", "excluded", ...)}
    parameters: dict[str, int] = field(default_factory=dict)
    left_dense: dict[str, str] = field(default_factory=dict)  # parameter -> why it was not pruned (prunable.py)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # experts module -> tokens routed per expert
    expert_fallback: dict[str, list[int]] = field(default_factory=dict)  # experts given every token's statistics
    target_sparsity: Optional[float] = None  # the block's own target (sparsity_profile="owl"); None: the config's
    outlier_ratio: Optional[float] = None  # OWL's share of outlier scores in the block, measured before pruning
    dampening: dict[str, float] = field(default_factory=dict)
    error_before: dict[str, Optional[float]] = field(default_factory=dict)  # {"calibration": ..., "heldout": ...}
    error_after: dict[str, Optional[float]] = field(default_factory=dict)
    train_losses: list[list[float]] = field(default_factory=list)  # one list of epoch losses per window trained in
    # One entry per window trained in: what BR chose from the held-out error and why (reconstruction/selection.py,
    # WindowChoice): {"window", "lr", "lr_rule", "lr_probe", "best_epoch", "kept_epoch", "epochs_run",
    # "stopped_early", "reverted_because_worse", "heldout_before", "heldout_by_epoch", "notes", ...}
    br_choices: list[dict[str, Any]] = field(default_factory=list)
    reverted: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@contextmanager
def timed_stage(report: BlockReport, stage: str) -> Iterator[None]:
    """Add the stage's wall time to the block's report. CUDA work is asynchronous, so the stage ends with a
    synchronisation: without it a stage's kernels would be billed to whichever later stage waits for them (the
    stages are long, so the lost overlap costs little)."""
    import torch  # the report itself is read without torch (the CLI, the card)

    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        report.add_time(stage, time.perf_counter() - start)


@dataclass
class PruneReport:
    model_name: str
    family: str
    config: dict[str, Any]
    blocks: list[BlockReport] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, Any] = field(default_factory=dict)  # {dataset: {"split", "seq_len", "dense", "pruned"}}, see Pruner.record_perplexity
    total_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # {"estimate": memory.MemoryEstimate.to_dict() (planned bytes per process, stream placement, budget),
    #  "peak_device_bytes_per_window": measured torch.cuda.max_memory_allocated per window (GPU runs only),
    #  "data_parallel_processes": n}
    memory: dict[str, Any] = field(default_factory=dict)
    # {"num_fewshot", "metric", "limit", "harness_version", "tasks": {task: {"metric", "dataset", "num_samples",
    #  "version", "dense": {"acc": .., "acc_stderr": .., ...}, "pruned": {...}}}}, see record_evaluation
    zero_shot: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ measured quality
    def record_evaluation(self, results: Any, role: str = "pruned") -> None:
        """Store what ``hf_recon_prune.evaluation.evaluate`` measured, for the pruned model or its dense baseline.

        ``results`` is an EvalResults (or its ``to_dict()``). Perplexity goes to ``self.perplexity`` and zero-shot
        scores to ``self.zero_shot``, next to the other role's values; both reach the model card's model-index. A
        value of the other role measured under a different protocol (split, seq_len, windows; num_fewshot, limit,
        task version) is dropped with a warning rather than shown side by side with this one.
        """
        _check_role(role)
        data = results.to_dict() if hasattr(results, "to_dict") else dict(results)
        for label, entry in (data.get("perplexity") or {}).items():
            self.record_perplexity_value(label, entry.get("value"), role=role, split=entry.get("split"),
                                         seq_len=entry.get("seq_len"), windows=entry.get("windows"))
        if data.get("zero_shot"):
            self.record_zero_shot(data["zero_shot"], role=role)

    def record_perplexity_value(self, dataset: str, value: Optional[float], *, role: str = "pruned",
                                split: Optional[str] = None, seq_len: Optional[int] = None,
                                windows: Optional[int] = None) -> None:
        """One perplexity for one role; the same layout as ``Pruner.record_perplexity`` writes."""
        _check_role(role)
        key = str(dataset)
        entry = dict(self.perplexity.get(key) or {})
        protocol = {"split": split, "seq_len": seq_len}
        if windows is not None:
            protocol["windows"] = windows
        other = "dense" if role == "pruned" else "pruned"
        mismatch = [k for k, v in protocol.items() if k in entry and entry[k] is not None and entry[k] != v]
        if entry.get(other) is not None and mismatch:
            warnings.warn(f"perplexity on {key}: the {other} value was measured with a different "
                          f"{', '.join(mismatch)} and is dropped", stacklevel=3)
            entry.pop(other, None)
        entry.update(protocol)
        entry[role] = value
        self.perplexity[key] = entry

    def record_zero_shot(self, results: Any, role: str = "pruned") -> None:
        """Store zero-shot scores (a ZeroShotResults or its ``to_dict()``) for one role; see ``record_evaluation``."""
        _check_role(role)
        data = results.to_dict() if hasattr(results, "to_dict") else dict(results)
        other = "dense" if role == "pruned" else "pruned"
        protocol = {"num_fewshot": data.get("num_fewshot", 0), "limit": data.get("limit")}
        stored = self.zero_shot
        if stored and any(stored.get(k) != v for k, v in protocol.items()):
            warnings.warn(f"zero-shot results of the {other} model were measured with different settings "
                          f"({ {k: stored.get(k) for k in protocol} }) and are dropped", stacklevel=3)
            stored = {}
        stored = dict(stored or {})
        stored.update(protocol)
        stored["metric"] = data.get("metric", stored.get("metric", "acc"))
        stored["harness_version"] = data.get("harness_version", stored.get("harness_version"))
        tasks = dict(stored.get("tasks") or {})
        for name, score in (data.get("tasks") or {}).items():
            entry = dict(tasks.get(name) or {})
            same = {k: score.get(k) for k in ("version", "num_samples")}
            if entry.get(other) is not None and any(entry.get(k) != v for k, v in same.items()):
                warnings.warn(f"zero-shot task {name}: the {other} model's score is from a different task version "
                              "or sample count and is dropped", stacklevel=3)
                entry.pop(other, None)
            entry.update(same)
            entry["metric"] = score.get("metric", "acc")
            entry["dataset"] = dict(score.get("dataset") or {})
            entry[role] = dict(score.get("metrics") or {score.get("metric", "acc"): score.get("value")})
            tasks[name] = entry
        stored["tasks"] = tasks
        self.zero_shot = stored

    def zero_shot_mean(self, role: str = "pruned") -> Optional[float]:
        """Mean of the headline metric over the recorded tasks (None unless every task has a value for ``role``)."""
        _check_role(role)
        values = [(entry.get(role) or {}).get(entry.get("metric", "acc"))
                  for entry in (self.zero_shot.get("tasks") or {}).values()]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    # ------------------------------------------------------------------ summaries
    @property
    def layer_sparsity(self) -> dict[str, float]:
        return {f"{b.index}.{name}": s for b in self.blocks for name, s in b.layer_sparsity.items()}

    @property
    def mean_sparsity(self) -> float:
        """Zeros over eligible parameters in the pruned weights (each weight counts by its size); reports written
        before blocks counted their parameters fall back to the mean over layers."""
        counted = self.parameter_counts()
        if counted is not None:
            return counted["pruned"] / counted["eligible"] if counted["eligible"] else 0.0
        values = list(self.layer_sparsity.values())
        return sum(values) / len(values) if values else 0.0

    @property
    def reconstruction_mode(self) -> Optional[str]:
        """What BR trained ("full" / "lora", with ``reconstruction_mode="auto"`` resolved), or None when unknown."""
        return (self.memory.get("estimate") or {}).get("reconstruction_mode") or None

    def parameter_counts(self) -> Optional[dict[str, int]]:
        """{"block", "eligible", "pruned"} summed over the blocks, or None if a block did not count them."""
        if not self.blocks or any(not b.parameters for b in self.blocks):
            return None
        return {key: sum(b.parameters.get(key, 0) for b in self.blocks) for key in ("block", "eligible", "pruned")}

    @property
    def block_sparsity(self) -> Optional[float]:
        """Zeros over *all* parameters of the decoder blocks (norms, routers and what was left dense included)."""
        counted = self.parameter_counts()
        return counted["pruned"] / counted["block"] if counted and counted["block"] else None

    def left_dense(self) -> dict[str, int]:
        """Why parameters were left dense -> how many parameters that is, summed over the blocks."""
        totals: dict[str, int] = {}
        for b in self.blocks:
            for reason, count in b.parameters.items():
                if reason.startswith("dense:"):
                    totals[reason[len("dense:"):]] = totals.get(reason[len("dense:"):], 0) + count
        return totals

    def sparsity_by_layer_type(self) -> dict[str, float]:
        grouped: dict[str, list[float]] = {}
        for b in self.blocks:
            for name, s in b.layer_sparsity.items():
                grouped.setdefault(name, []).append(s)
        return {name: sum(v) / len(v) for name, v in grouped.items()}

    def final_block_error(self, split: str = "calibration", when: str = "after") -> Optional[float]:
        if not self.blocks:
            return None
        return getattr(self.blocks[-1], f"error_{when}").get(split)

    def stage_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for b in self.blocks:
            for stage, s in b.seconds.items():
                totals[stage] = totals.get(stage, 0.0) + s
        return totals

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_sparsity"] = self.mean_sparsity
        data["block_sparsity"] = self.block_sparsity
        data["stage_seconds"] = self.stage_seconds()
        return data

    def to_json_file(self, path: str | os.PathLike) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneReport":
        data = dict(data)
        data.pop("mean_sparsity", None)
        data.pop("block_sparsity", None)
        data.pop("stage_seconds", None)
        blocks = [BlockReport(**b) for b in data.pop("blocks", [])]
        return cls(blocks=blocks, **data)

    def to_markdown(self) -> str:
        """Per-block table: sparsity and reconstruction error before/after on calibration and held-out samples."""

        def fmt(value: Optional[float]) -> str:
            return "–" if value is None else f"{value:.4g}"

        lines = [
            "| block | sparsity | calib. error before | calib. error after | held-out error before | held-out error after | time (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in self.blocks:
            sparsity = (b.parameters["pruned"] / b.parameters["eligible"] if b.parameters.get("eligible") else
                        sum(b.layer_sparsity.values()) / max(len(b.layer_sparsity), 1))
            lines.append(
                f"| {b.index} | {sparsity:.3f} | {fmt(b.error_before.get('calibration'))} | "
                f"{fmt(b.error_after.get('calibration'))} | {fmt(b.error_before.get('heldout'))} | "
                f"{fmt(b.error_after.get('heldout'))} | {sum(b.seconds.values()):.1f} |"
                + (" reverted" if b.reverted else "")
                + (" BR reverted (held-out error worse)" if any(c.get("reverted_because_worse") for c in b.br_choices)
                   else "")
            )
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [
            f"{self.model_name}: mean sparsity {self.mean_sparsity:.3f} over {len(self.layer_sparsity)} layers",
            f"final-block error (calibration) {self.final_block_error('calibration')}",
            f"final-block error (held-out) {self.final_block_error('heldout')}",
            f"time {self.total_seconds:.1f}s",
        ]
        for dataset, entry in self.perplexity.items():
            parts.append(f"perplexity on {dataset} ({entry.get('split')}, seq_len {entry.get('seq_len')}): "
                         f"dense {_number(entry.get('dense'))} -> pruned {_number(entry.get('pruned'))}")
        if self.zero_shot.get("tasks"):
            tasks = self.zero_shot["tasks"]
            parts.append(f"zero-shot mean accuracy over {len(tasks)} tasks ({', '.join(tasks)}): "
                         f"dense {_number(self.zero_shot_mean('dense'), percent=True)} -> "
                         f"pruned {_number(self.zero_shot_mean('pruned'), percent=True)}")
        return "\n".join(parts)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role={role!r} is not allowed; allowed: 'dense' (the model before pruning) or 'pruned'")


def _number(value: Any, percent: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "not measured"
    return f"{100.0 * value:.2f}%" if percent else f"{value:.3f}"
