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
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class BlockReport:
    index: int
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    dampening: dict[str, float] = field(default_factory=dict)
    error_before: dict[str, Optional[float]] = field(default_factory=dict)  # {"calibration": ..., "heldout": ...}
    error_after: dict[str, Optional[float]] = field(default_factory=dict)
    train_losses: list[list[float]] = field(default_factory=list)  # one list of epoch losses per window trained in
    reverted: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


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

    # ------------------------------------------------------------------ summaries
    @property
    def layer_sparsity(self) -> dict[str, float]:
        return {f"{b.index}.{name}": s for b in self.blocks for name, s in b.layer_sparsity.items()}

    @property
    def mean_sparsity(self) -> float:
        values = list(self.layer_sparsity.values())
        return sum(values) / len(values) if values else 0.0

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
            sparsity = sum(b.layer_sparsity.values()) / max(len(b.layer_sparsity), 1)
            lines.append(
                f"| {b.index} | {sparsity:.3f} | {fmt(b.error_before.get('calibration'))} | "
                f"{fmt(b.error_after.get('calibration'))} | {fmt(b.error_before.get('heldout'))} | "
                f"{fmt(b.error_after.get('heldout'))} | {sum(b.seconds.values()):.1f} |"
                + (" reverted" if b.reverted else "")
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
            dense = entry.get("dense")
            dense_text = f"{dense:.3f}" if isinstance(dense, (int, float)) else "not measured"
            parts.append(f"perplexity on {dataset} ({entry.get('split')}, seq_len {entry.get('seq_len')}): "
                         f"dense {dense_text} -> pruned {entry['pruned']:.3f}")
        return "\n".join(parts)
