"""What ``prune`` and ``info`` print about a run: the one-line description of a config and the summary table."""

from __future__ import annotations

from typing import Optional

from ..config import PruningConfig


def _describe_config(config: PruningConfig, mode: Optional[str] = None) -> str:
    """``mode``: what BR trained when the run resolved ``reconstruction_mode="auto"``."""
    recon = ",".join(config.reconstruction) or "none"
    chosen = f"auto: {mode}" if config.reconstruction_mode == "auto" and mode else config.reconstruction_mode
    mode = f" ({chosen})" if config.uses("br") else ""
    return (f"{config.method}, {config.pattern}, sparsity {config.sparsity:g}, reconstruction {recon}{mode}; "
            f"{config.num_samples} x {config.seq_len} tokens from {config.calibration!r}"
            + (f" + {config.num_self_samples} self-generated" if config.num_self_samples else ""))


def summary_table(report, results: dict[str, float], timings: dict[str, float], *, model: str = "",
                  config: Optional[PruningConfig] = None, eval_label: str = "") -> str:
    """The table ``prune`` prints at the end: sparsity, final-block errors, perplexity before/after, times."""
    rows: list[tuple[str, str]] = []
    if model:
        rows.append(("model", model))
    if config is not None:
        rows.append(("pruning", _describe_config(config, report.reconstruction_mode)))
    rows.append(("sparsity of the pruned weights", f"{report.mean_sparsity:.4f} ({len(report.layer_sparsity)} weights)"))
    if report.block_sparsity is not None:
        dense = report.left_dense()
        left = ", ".join(f"{why} {count:,}" for why, count in sorted(dense.items(), key=lambda item: -item[1]))
        rows.append(("zeros among all block parameters", f"{report.block_sparsity:.4f}"
                     + (f" (left dense: {left})" if left else "")))
    coverage = [tokens for b in report.blocks for tokens in b.expert_tokens.values()]
    if coverage:
        counts = sorted(n for tokens in coverage for n in tokens)
        fallback = sum(len(e) for b in report.blocks for e in b.expert_fallback.values())
        rows.append(("calibration tokens per expert (min / median / max)",
                     f"{counts[0]} / {counts[len(counts) // 2]} / {counts[-1]}"
                     + (f"; {fallback} experts used every token's statistics" if fallback else "")))
    # Without BR nothing changes a block after its masks (and LR): one error per split, not a before/after pair.
    trained = "br" in ((report.config or {}).get("reconstruction") or [])
    for split, label in (("calibration", "calibration"), ("heldout", "held-out")):
        before = report.final_block_error(split, "before")
        after = report.final_block_error(split, "after")
        if before is None and after is None:
            continue
        if trained:
            rows.append((f"final-block error, {label} (before -> after BR)", f"{_fmt(before)} -> {_fmt(after)}"))
        else:
            rows.append((f"final-block error, {label}", _fmt(after if after is not None else before)))
    if eval_label and results:
        rows.append(("perplexity measured on", eval_label))
    if "dense" in results:
        rows.append(("perplexity before (dense)", f"{results['dense']:.3f}"))
    if "pruned" in results:
        change = ""
        if results.get("dense"):
            change = f" ({(results['pruned'] / results['dense'] - 1.0) * 100:+.1f}%)"
        rows.append(("perplexity after (pruned)", f"{results['pruned']:.3f}{change}"))
    reverted = [b.index for b in report.blocks if b.reverted]
    if reverted:
        rows.append(("blocks reverted (non-finite loss)", ", ".join(map(str, reverted))))
    rows.append(("time (s): pruning / evaluation / total",
                 " / ".join(f"{timings.get(k, 0.0):.1f}" for k in ("pruning", "evaluation", "total"))))
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join(["summary", rule, *(f"{k.ljust(width)}  {v}" for k, v in rows), rule])


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"
