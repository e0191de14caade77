"""Several models side by side: ``compare`` builds the table (the paper's Table 1) as JSON and markdown.

Re-exported by ``hf_recon_prune.evaluation``, whose ``EvalResults`` are the rows; this module imports it when a
table is built, so that the two modules do not import each other at load time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:
    from .evaluation import EvalResults


@dataclass
class Comparison:
    """Several models side by side: one row per model, one column per measured quantity (the paper's Table 1).

    ``to_dict`` / ``to_json`` give ``{"columns": [{"key", "header", "kind"}], "rows": [{"name", "values"}],
    "notes": [...]}``; ``to_markdown`` the table (accuracy and sparsity in percent, like the paper).
    """

    columns: list[dict[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [dict(c) for c in self.columns],
                "rows": [{"name": r["name"], "values": dict(r["values"])} for r in self.rows],
                "notes": list(self.notes)}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def value(self, row: str, column: str) -> Optional[float]:
        for r in self.rows:
            if r["name"] == row:
                return r["values"].get(column)
        raise KeyError(row)

    def to_markdown(self) -> str:
        headers = ["model"] + [c["header"] for c in self.columns]
        align = ["---"] + ["---:" for _ in self.columns]
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
        for r in self.rows:
            cells = [_md_cell(r["name"])] + [_format_value(r["values"].get(c["key"]), c["kind"]) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


def compare(models: Union[Mapping[str, Any], Sequence[Any]], *, include_dense: Union[bool, str] = "auto") -> Comparison:
    """Dense vs pruned, and several pruned variants, side by side.

    Args:
        models: ``{name: results}`` (or a sequence, named by each result's model name), where results are
            EvalResults, PruneReports (the pruned model's values), their ``to_dict()`` form, or a path to a JSON file
            of either, or a saved folder holding ``prune_report.json``.
        include_dense: add a "dense" row with the baseline values stored in the first PruneReport that has them
            ("auto": when no model is named "dense" already).

    Columns, in order: measured sparsity; final-block reconstruction error after reconstruction on calibration and
    held-out samples; perplexity per dataset; zero-shot accuracy per task and its mean. The mean is taken over the
    tasks of the table, so a model missing a task has no mean rather than a mean over fewer tasks.
    """
    from .evaluation import EvalResults

    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    rows: list[tuple[str, EvalResults]] = []
    dense: Optional[EvalResults] = None
    for name, item in items:
        results, report = _as_results(item)
        label = str(name) if name is not None else (results.model or f"model {len(rows) + 1}")
        rows.append((label, results))
        if dense is None and report is not None:
            candidate = EvalResults.from_report(report, role="dense")
            if candidate.perplexity or candidate.zero_shot is not None:
                dense = candidate
    names = [label for label, _ in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique in a comparison, got {names}")
    if dense is not None and (include_dense is True or (include_dense == "auto" and "dense" not in names)):
        rows.insert(0, ("dense" if "dense" not in names else "dense (baseline)", dense))

    columns: list[dict[str, str]] = [{"key": "sparsity", "header": "sparsity (%)", "kind": "percent"}]
    if any(r.reconstruction for _, r in rows):
        columns.append({"key": "error_calibration", "header": "error calib.", "kind": "error"})
        columns.append({"key": "error_heldout", "header": "error held-out", "kind": "error"})
    notes: list[str] = []
    # A local file is one column under its file name: a saved report publishes only that name (sanitise.py), while a
    # fresh evaluation knows the whole path.
    protocols: dict[str, set] = {}
    local_paths: dict[str, set] = {}
    for _, r in rows:
        for label, entry in r.perplexity.items():
            shown = _short_label(label)
            protocols.setdefault(shown, set()).add((entry.get("split"), entry.get("seq_len"), entry.get("windows")))
            if shown != label:
                local_paths.setdefault(shown, set()).add(label)
    ppl_keys: dict[tuple, str] = {}
    for label, seen in protocols.items():
        for protocol in sorted(seen, key=str):
            key = f"ppl:{label}" if len(seen) == 1 else f"ppl:{label}:{protocol[0]}:{protocol[1]}:{protocol[2]}"
            header = f"ppl {label}" + ("" if len(seen) == 1 else f" ({_protocol_label(protocol)})")
            ppl_keys[(label, protocol)] = key
            columns.append({"key": key, "header": header, "kind": "perplexity"})
        if len(seen) > 1:
            notes.append(f"perplexity on {label} was measured with different protocols (split, seq_len, "
                         "windows); each has its own column")
        if len(local_paths.get(label, ())) > 1:
            notes.append(f"perplexity on {label} comes from {len(local_paths[label])} local files of that name in "
                         "different folders, shown in one column")
    tasks: list[str] = []
    zs_protocols = set()
    metrics: dict[str, set] = {}
    for _, r in rows:
        if r.zero_shot is None:
            continue
        zs_protocols.add((r.zero_shot.num_fewshot, r.zero_shot.limit))
        for task, score in r.zero_shot.tasks.items():
            if task not in tasks:
                tasks.append(task)
            metrics.setdefault(task, set()).add(score.metric)
    for task in tasks:
        metric = "/".join(sorted(metrics[task]))
        columns.append({"key": f"zs:{task}", "header": f"{task} ({metric})", "kind": "accuracy"})
    if tasks:
        columns.append({"key": "zs:mean", "header": "zero-shot mean", "kind": "accuracy"})
        if len(zs_protocols) > 1:
            notes.append("zero-shot results come from different settings (num_fewshot, limit): "
                         + ", ".join(map(str, sorted(zs_protocols, key=str))))
        if any(len(m) > 1 for m in metrics.values()):
            notes.append("some tasks are reported with different headline metrics across models (acc vs acc_norm)")

    table_rows = []
    for name, r in rows:
        values: dict[str, Optional[float]] = {"sparsity": r.sparsity}
        if r.reconstruction:
            final = r.reconstruction.get("final") or {}
            values["error_calibration"] = (final.get("calibration") or {}).get("after")
            values["error_heldout"] = (final.get("heldout") or {}).get("after")
        for label, entry in r.perplexity.items():
            protocol = (entry.get("split"), entry.get("seq_len"), entry.get("windows"))
            values[ppl_keys[(_short_label(label), protocol)]] = entry.get("value")
        if r.zero_shot is not None:
            scores = [r.zero_shot.tasks[t].value if t in r.zero_shot.tasks else None for t in tasks]
            for task, value in zip(tasks, scores):
                values[f"zs:{task}"] = value
            values["zs:mean"] = sum(scores) / len(scores) if scores and None not in scores else None
        table_rows.append({"name": name, "values": {c["key"]: values.get(c["key"]) for c in columns}})
    return Comparison(columns=columns, rows=table_rows, notes=notes)


def _protocol_label(protocol: tuple) -> str:
    """"test, 2048" or "test, 2048, 32 windows": every part in which two columns of one dataset can differ."""
    split, seq_len, windows = protocol
    return f"{split}, {seq_len}" + (f", {windows} windows" if windows is not None else "")


def _as_results(item: Any) -> tuple[EvalResults, Any]:
    """(EvalResults, the PruneReport it came from or None) for anything ``compare`` accepts."""
    from .evaluation import EvalResults
    from .report import PruneReport

    if isinstance(item, EvalResults):
        return item, None
    if isinstance(item, PruneReport):
        return EvalResults.from_report(item), item
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if os.path.isdir(path):
            path = os.path.join(path, "prune_report.json")
        with open(path, encoding="utf-8") as handle:
            item = json.load(handle)
    if isinstance(item, Mapping):
        if isinstance(item.get("results"), Mapping):  # the JSON of ``hf-recon-prune eval``
            return EvalResults.from_dict(item["results"]), None
        if "blocks" in item and "config" in item:
            report = PruneReport.from_dict(item)
            return EvalResults.from_report(report), report
        return EvalResults.from_dict(item), None
    raise TypeError(f"cannot compare a {type(item).__name__}; give EvalResults, a PruneReport, a dict or a JSON path")


def _short_label(label: str) -> str:
    # Local paths are shown by their file name: tables get pasted into cards and issues.
    return os.path.basename(label.rstrip("/\\")) if os.path.isabs(label) else label


def _md_cell(text: Any) -> str:
    return " ".join(str(text).replace("|", "\\|").split())


def _format_value(value: Optional[float], kind: str) -> str:
    if value is None:
        return "–"
    if kind in ("percent", "accuracy"):
        return f"{100.0 * value:.2f}"
    if kind == "perplexity":
        return f"{value:.2f}"
    return f"{value:.4g}"
