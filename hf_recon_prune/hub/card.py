"""The model card (README.md) of a saved pruned model, rendered from hf_recon_prune/templates/pruned_model_card.md.

``build_model_card`` fills the template's variables (``_card_context``) and the card's metadata: base model,
license, tags, calibration datasets and a model-index of every value the report measured (``model_index.py``).
Nothing here uses the network.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
from typing import Any, Iterator, Optional

from .._version import __version__
from ..config import RECONSTRUCTIONS, TECHNIQUES, PruningConfig, parse_nm
from ..report import USER_TOKEN_IDS
from ..sanitise import parse_texts_marker, sanitise_config_dict
from .formatting import _cell, _percent
from .model_index import PRESET_DATASETS, _evaluation
from .provenance import _FILE_SUFFIXES, _base_model_id, _looks_like_hub_id, _Redactor

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
#: The card template, package data of hf_recon_prune (see model_cards/README.md).
CARD_TEMPLATE = "templates/pruned_model_card.md"

CITATION = """@inproceedings{shin-etal-2024-rethinking,
    title = "Rethinking Pruning Large Language Models: Benefits and Pitfalls of Reconstruction Error Minimization",
    author = "Shin, Sungbin and Park, Wonpyo and Lee, Jaeho and Lee, Namhoon",
    booktitle = "Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing",
    year = "2024",
    address = "Miami, Florida, USA",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2024.emnlp-main.68",
    pages = "1182--1191",
}"""

#: Licenses of base models this package loads itself (no network is used to look licenses up).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def method_label(method: str) -> str:
    """The criterion's name as the card's summary sentence writes it ("Wanda"); an unknown one as given."""
    criterion = _criterion(method)
    return criterion.label if criterion is not None else method


def method_description(method: str) -> str:
    """The criterion with what it scores, for the card's settings table; an unknown one as given."""
    criterion = _criterion(method)
    return criterion.description if criterion is not None else method


def _criterion(method: str):
    """The registered criterion, or None for a name this process does not know (e.g. a card rebuilt from a saved
    folder whose custom criterion is not registered here)."""
    from ..methods import get_criterion

    try:
        return get_criterion(method)
    except ValueError:
        return None


@contextlib.contextmanager
def card_template_path() -> Iterator[str]:
    """The card template as a file path (package data; extracted to a temporary file when installed zipped)."""
    resource = importlib.resources.files("hf_recon_prune").joinpath(CARD_TEMPLATE)
    with importlib.resources.as_file(resource) as path:
        yield os.fspath(path)


def build_model_card(
    model: Any,
    config: Optional[PruningConfig],
    report: Any = None,
    *,
    model_name: str,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
    has_tokenizer: bool = True,
    plot_file: Optional[str] = None,
    local_paths: tuple[str, ...] | list[str] = (),
):
    """Render the model card (a ``huggingface_hub.ModelCard``) from the template, without touching the network.

    Metadata: ``base_model`` (a Hub id, never a local path), ``library_name``, ``pipeline_tag``, ``license`` (when
    known), tags, calibration ``datasets`` that are Hub ids, and a model-index with every value the report measured
    (perplexity per dataset, zero-shot scores per task, the final block's reconstruction error; see ``_evaluation``).
    ``local_paths`` are extra absolute paths that must not appear in the card (the folder being written).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..evaluation import model_sparsity

    name_or_path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    base = _base_model_id(base_model, name_or_path, getattr(report, "model_name", None))
    base_meta = _base_card_metadata(name_or_path, base)
    license = license or getattr(getattr(model, "config", None), "license", None) or base_meta.get("license") \
        or KNOWN_LICENSES.get(base or "")
    redactor = _Redactor([*local_paths, name_or_path if os.path.isabs(name_or_path) else ""])
    repo_id = repo_id or model_name
    model_name = repo_id.split("/")[-1]

    eval_results, perplexity_rows, zero_shot_rows = _evaluation(report, redactor)
    sparsity = None if report is not None else model_sparsity(model, config)

    tags = ["pruned", "sparse"]
    if config is not None:
        tags.append(config.method)
        nm = parse_nm(config.pattern)
        tags.append("unstructured" if nm is None else f"{nm[0]}:{nm[1]}-sparsity")
    tags.append("hf-recon-prune")

    card_data = ModelCardData(
        base_model=base,
        # The Hub knows four relations: adapter, merge, quantized, finetune. A pruned checkpoint has the base
        # model's architecture and format with changed full-precision weights (zeroed and, with LR/BR,
        # re-optimised on calibration data): that is "finetune". "quantized" would list it among lower-precision
        # variants, which it is not.
        base_model_relation="finetune" if base else None,
        datasets=_calibration_datasets(config, report) or None,
        language=base_meta.get("language"),
        library_name="transformers",
        license=license,
        license_name=base_meta.get("license_name") if license == base_meta.get("license") else None,
        license_link=base_meta.get("license_link") if license == base_meta.get("license") else None,
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )

    context = _card_context(model, config, report, base=base, model_name=model_name, repo_id=repo_id,
                            has_tokenizer=has_tokenizer, plot_file=plot_file, sparsity=sparsity,
                            perplexity_rows=perplexity_rows, zero_shot_rows=zero_shot_rows, redactor=redactor,
                            version=__version__)
    with card_template_path() as template:
        card = ModelCard.from_template(card_data, template_path=template, **context)
    text = redactor.literal(str(card))
    return ModelCard(text) if text != str(card) else card


def _card_context(model, config, report, *, base, model_name, repo_id, has_tokenizer, plot_file, sparsity,
                  perplexity_rows, redactor, version, zero_shot_rows=()) -> dict[str, Any]:
    import torch
    import transformers

    used = [t for t in RECONSTRUCTIONS if t in config.reconstruction] if config is not None else []
    nm, target, pattern_label, summary = _summary(config, report, base, sparsity, used)
    sparsity_rows, sparsity_source = _sparsity_rows(report, sparsity)
    config_json = None
    if config is not None:
        config_json = json.dumps(redactor.value(sanitise_config_dict(config.to_dict())), indent=2, sort_keys=True)
    base_note = None
    if not base:
        base_note = ("The Hub id of the base model is not recorded (it was not loaded from the Hub by its id); pass "
                     "`base_model=` when saving to link it.")

    total_seconds = getattr(report, "total_seconds", 0.0) if report is not None else 0.0
    return {
        "library_version": version,
        "title": model_name,
        "summary": summary,
        "base_model_note": base_note,
        "is_nm": nm is not None,
        "pattern": config.pattern if config is not None else None,
        "method_label": method_description(config.method) if config is not None else "unknown",
        "pattern_label": pattern_label,
        "target_sparsity": target,
        "achieved_sparsity": _achieved_sparsity(report, sparsity),
        "reconstruction_label": ", ".join(t.upper() for t in used) or "none",
        "reconstruction_mode_label": _reconstruction_mode(config, report) if config is not None and "br" in used
        else None,
        "calibration_rows": [(a, _cell(b)) for a, b in _calibration_rows(config, report, redactor)]
        if config is not None else [],
        "seed": config.seed if config is not None else "unknown",
        "pruning_time": f"{total_seconds:.1f} s" if total_seconds else None,
        "software": f"hf-recon-prune {version}, transformers {transformers.__version__}, torch {torch.__version__}",
        "techniques": [{"name": TECHNIQUES[t][0], "explanation": TECHNIQUES[t][1]} for t in used],
        "uses_lr": "lr" in used,
        "sparsity_rows": sparsity_rows,
        "sparsity_source": sparsity_source,
        **_coverage_context(report, sparsity),
        "sparsity_profile": _profile(config),
        "block_table": report.to_markdown() if report is not None and report.blocks else None,
        "plot_file": plot_file,
        "perplexity_rows": perplexity_rows,
        "zero_shot_rows": list(zero_shot_rows),
        "zero_shot_setting": _zero_shot_setting(report) if zero_shot_rows else None,
        "warnings": _card_warnings(report, redactor),
        "repo_id": repo_id,
        "repo_id_comment": "" if "/" in repo_id else f"  # this folder, or <namespace>/{repo_id} on the Hub",
        "has_tokenizer": has_tokenizer,
        "tokenizer_hint": base or "<the base model's tokenizer>",
        "has_pruning_config": config is not None,
        "has_report": report is not None,
        "config_json": config_json,
        "citation": CITATION,
    }


def _summary(config: Optional[PruningConfig], report: Any, base: Optional[str], sparsity: Optional[dict[str, Any]],
             used: list[str]) -> tuple[Optional[tuple[int, int]], str, str, str]:
    """(N:M of the pattern or None, target sparsity, pattern label, the card's opening sentence)."""
    base_link = f"[{base}](https://huggingface.co/{base})" if base else "a dense causal language model"
    if config is None:
        measured = sparsity["overall"] if sparsity is not None else getattr(report, "mean_sparsity", 0.0)
        summary = (f"This model is {base_link} with {_percent(measured, 2)} of the weights of its decoder blocks' "
                   "linear layers set to zero.")
        return None, "unknown", "unknown", summary
    nm = parse_nm(config.pattern)
    target = _percent(config.sparsity)
    criterion = _criterion(config.method)
    group = getattr(criterion, "unstructured_group", None)
    group = group.format(block_size=config.sparsegpt_block_size) if group else None
    pattern_label = (f"unstructured (the same fraction pruned in {group})" if nm is None and group else
                     "unstructured" if nm is None else
                     f"{config.pattern} semi-structured ({nm[0]} of every {nm[1]} consecutive input weights kept)")
    short_pattern = "unstructured" if nm is None else config.pattern
    names = [TECHNIQUES[t][0].split(" (")[0].lower() for t in used]
    how = f"{method_label(config.method)} masks" + (
        f", {', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else
        f" and {names[0]}" if names else " and no reconstruction")
    summary = (f"This model is {base_link} pruned to {target} {short_pattern} sparsity in the prunable weights of "
               f"its decoder blocks (linear layers and routed experts), with {how}, by hf-recon-prune."
               + _left_dense_sentence(report, sparsity))
    return nm, target, pattern_label, summary


#: Reasons for leaving a weight dense that a reader of the summary would not assume (norms, biases and routers
#: are dense in every pruned model).
_NOTABLE_DENSE = ("excluded", "sparsity override 0", "unsupported")


def _left_dense_sentence(report: Any, sparsity: Optional[dict[str, Any]]) -> str:
    if report is not None and getattr(report, "blocks", None):
        counts, total = report.left_dense(), (report.parameter_counts() or {}).get("block")
    elif sparsity is not None:
        counts, total = sparsity.get("left_dense", {}), sparsity.get("block_parameters")
    else:
        return ""
    notable = {reason: counts[reason] for reason in _NOTABLE_DENSE if counts.get(reason)}
    if not notable or not total:
        return ""
    return (f" Not every matrix was pruned: {_percent(sum(notable.values()) / total, 2)} of the decoder blocks' "
            f"parameters were left dense ({', '.join(notable)}; see *What was left dense*).")


def _achieved_sparsity(report: Any, sparsity: Optional[dict[str, Any]]) -> Optional[str]:
    if report is not None and getattr(report, "blocks", None):
        return _percent(report.mean_sparsity, 2)
    if sparsity is not None and sparsity["total"]:
        return _percent(sparsity["overall"], 2)
    return None


def _sparsity_rows(report: Any, sparsity: Optional[dict[str, Any]]) -> tuple[list[tuple[str, str]], str]:
    """The per-layer-type sparsity table and the sentence saying where its values come from."""
    if report is not None and report.blocks:
        rows = [(name, _percent(v, 2)) for name, v in report.sparsity_by_layer_type().items()]
        return rows, "Fraction of zero weights in each kind of linear layer, averaged over the decoder blocks."
    if sparsity is not None:
        rows = [(name, _percent(v, 2)) for name, v in sparsity["by_type"].items()]
        return rows, "Fraction of zero weights in each kind of linear layer, measured on the saved weights."
    return [], ""


def _profile(config: Optional[PruningConfig]) -> Optional[str]:
    from ..sparsity_profile import describe

    return describe(config) if config is not None else None


def _coverage_context(report: Any, sparsity: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What the pruned weights cover: zeros over all block parameters, what was left dense and why, and how many
    calibration tokens reached each routed expert (mixture-of-experts models). Without a report (a model saved
    again), the first two come from the weights (``sparsity``, ``model_sparsity``'s result)."""
    if report is None or not getattr(report, "blocks", None):
        if not sparsity or not sparsity.get("block_parameters"):
            return {"block_sparsity": None, "dense_rows": [], "expert_rows": []}
        total = sparsity["block_parameters"]
        return {"block_sparsity": _percent(sparsity["zeros"] / total, 2), "expert_rows": [],
                "dense_rows": _dense_rows(sparsity["left_dense"], sparsity["left_dense_names"], total)}
    block_sparsity = getattr(report, "block_sparsity", None)
    counts = report.parameter_counts() if hasattr(report, "parameter_counts") else None
    dense_rows = []
    if counts:
        names = {}
        for b in report.blocks:
            for name, why in b.left_dense.items():
                names.setdefault(why, set()).add(name)
        dense_rows = _dense_rows(report.left_dense(), {why: sorted(n) for why, n in names.items()}, counts["block"])
    expert_rows = []
    for b in report.blocks:
        for module, tokens in (getattr(b, "expert_tokens", None) or {}).items():
            ordered = sorted(tokens)
            median = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1]
                                                                          + ordered[len(ordered) // 2]) / 2
            fallback = (getattr(b, "expert_fallback", None) or {}).get(module, [])
            expert_rows.append((b.index, module, len(tokens), ordered[0], f"{median:g}", ordered[-1],
                                ", ".join(map(str, fallback)) or "none"))
    return {"block_sparsity": _percent(block_sparsity, 2) if block_sparsity is not None else None,
            "dense_rows": dense_rows, "expert_rows": expert_rows}


def _dense_rows(counts: dict[str, int], names: dict[str, list[str]], block_parameters: int) -> list[tuple]:
    """The rows of "What was left dense": why, how many parameters, their share, which (the first six names)."""
    rows = []
    for reason, count in sorted(counts.items(), key=lambda item: -item[1]):
        listed = names.get(reason, [])
        shown = ", ".join(f"`{n}`" for n in listed[:6]) + (f" and {len(listed) - 6} more" if len(listed) > 6 else "")
        rows.append((reason, f"{count:,}", _percent(count / block_parameters, 2), shown))
    return rows


def _card_warnings(report: Any, redactor: "_Redactor") -> list[str]:
    """The run's warnings and those of its blocks, once each, with local paths removed."""
    warnings_list: list[str] = []
    if report is not None:
        for message in [*getattr(report, "warnings", [])] + [w for b in report.blocks for w in b.warnings]:
            message = redactor(str(message))
            if message not in warnings_list:
                warnings_list.append(message)
    return warnings_list


def _zero_shot_setting(report: Any) -> str:
    stored = getattr(report, "zero_shot", None) or {}
    shots = stored.get("num_fewshot", 0)
    version = stored.get("harness_version")
    text = (f"{'zero-shot' if not shots else f'{shots}-shot'}, lm-evaluation-harness"
            + (f" {version}" if version else "") + ", on the model in memory")
    if stored.get("limit") is not None:
        text += f"; only {stored['limit']} documents per task (not comparable to published numbers)"
    return text


def _learning_rate(config: PruningConfig, report: Any) -> str:
    """The fixed learning rate, or what ``br_lr="auto"`` chose over the windows."""
    if not isinstance(config.br_lr, str):
        return f"learning rate {config.br_lr:g}"
    chosen: dict[str, int] = {}
    for block in getattr(report, "blocks", None) or []:
        for choice in getattr(block, "br_choices", None) or []:
            key = f"{choice['lr']:g}" + (" (fallback)" if choice.get("lr_rule") == "auto-fallback" else "")
            chosen[key] = chosen.get(key, 0) + 1
    used = ", ".join(f"{lr} in {n} window{'s' if n > 1 else ''}" for lr, n in sorted(chosen.items()))
    return "learning rate chosen per window by held-out error" + (f" ({used})" if used else "")


def _reconstruction_mode(config: PruningConfig, report: Any = None) -> str:
    mode = getattr(report, "reconstruction_mode", None) or config.reconstruction_mode
    if mode == "lora":
        what = (f"masked LoRA adapters (rank {config.lora_rank}, alpha {config.lora_alpha:g}) trained, then merged "
                "into the weights under the masks")
    else:
        what = "all kept weights of the block" + (
            " and its other parameters (norms, biases)" if config.br_train_other_params else "")
    kept = ""
    if getattr(config, "br_keep_best", False):
        kept = "; the epoch with the lowest held-out error kept" + (
            f", stopping after {config.br_patience} epochs without a new best" if config.br_patience else "")
    chosen = ""
    if config.reconstruction_mode == "auto" and mode != "auto":
        chosen = ' (chosen by `reconstruction_mode="auto"` from the memory estimate and the device budget)'
    return (f"`{mode}` mode{chosen}, {what}; Adam, {_learning_rate(config, report)}, batch size "
            f"{config.br_batch_size}, up to {config.br_epochs} epoch{'s' * (config.br_epochs != 1)}{kept}")


def _calibration_rows(config: PruningConfig, report: Any, redactor: "_Redactor") -> list[tuple[str, str]]:
    desc = dict(getattr(report, "calibration", None) or {}) if report is not None else {}
    source = desc.get("source", config.calibration)
    if source == USER_TOKEN_IDS:
        return [("calibration data", "token ids handed to the Pruner (`calibration_data`); the configuration's "
                                     "`calibration`, `num_samples` and `seq_len` were not used"),
                ("calibration samples", f"{desc.get('num_samples', '?')} windows of {desc.get('seq_len', '?')} tokens"),
                ("held-out samples (error measurement only)", "none")]
    split = desc.get("split", None if config.calibration == "self" else (config.calibration_split or "train"))
    version = f" ({desc['source_version']})" if desc.get("source_version") else ""
    rows = [("calibration data", redactor(_describe_source(source, split)) + version)]
    seq_len = desc.get("seq_len", config.seq_len)
    self_only = config.calibration == "self"
    num_real = desc.get("num_real", 0 if self_only else config.num_samples)
    num_self = desc.get("num_self_generated", config.num_samples * self_only + config.num_self_samples)
    if "num_real" in desc or "num_self_generated" in desc or report is None:
        rows.append(("calibration samples", f"{num_real} real + {num_self} self-generated windows of {seq_len} tokens"))
    else:  # e.g. a CalibrationSet handed to the Pruner directly
        rows.append(("calibration samples", redactor(f"{desc.get('num_samples', '?')} windows of {seq_len} tokens")))
    if num_self:
        generation = desc.get("self_generation") or {}
        rows.append(("self-generated samples", (
            f"generated by the dense model: first {generation.get('greedy_tokens', config.self_gen_greedy_tokens)} "
            f"tokens greedy, then sampled at temperature {generation.get('temperature', config.self_gen_temperature):g}"
            f" (top-k {generation.get('top_k', config.self_gen_top_k)}, top-p "
            f"{generation.get('top_p', config.self_gen_top_p):g}), language filter "
            f"{generation.get('language', config.self_gen_language) or 'none'}; used for "
            + ("mask statistics and reconstruction" if config.self_samples_use == "all" else "reconstruction only")
        )))
    if desc.get("windows_sha256"):
        rows.append(("calibration tokens, sha256", f"`{desc['windows_sha256']}` (two runs with the same value calibrated "
                                                   "on the same token windows)"))
    heldout = desc.get("heldout")
    num_heldout = desc.get("num_heldout", heldout.get("num") if isinstance(heldout, dict) else None)
    if num_heldout:
        heldout_source = heldout.get("source") if isinstance(heldout, dict) else None
        where = _describe_source(heldout_source, heldout.get("split")) if heldout_source is not None else \
            "the calibration source, disjoint from the calibration windows"
        if heldout_source is not None and heldout_source == source and heldout.get("split") == split:
            where += ", at token positions no calibration window covers"  # the same split, so say how it is apart
        rows.append(("held-out samples (error measurement only)",
                     redactor(f"{num_heldout} window{'s' * (num_heldout != 1)} from {where}")))
    elif report is not None:
        rows.append(("held-out samples (error measurement only)", "none"))
    return rows


def _describe_source(source: Any, split: Optional[str] = None) -> str:
    marker = parse_texts_marker(source)
    if isinstance(source, dict) and "texts" in source:
        text = f"{source['texts']} user-provided texts (sha256 {str(source.get('sha256', '?'))[:16]})"
    elif marker is not None:
        text = f"{marker[0]} user-provided texts (sha256 {marker[1][:16]})"
    elif isinstance(source, list):
        text = f"{len(source)} user-provided texts"
    elif source == "self":
        return PRESET_DATASETS["self"][1]
    elif isinstance(source, str) and source in PRESET_DATASETS:
        hub_id, pretty, _ = PRESET_DATASETS[source]
        text = f"{pretty}" + (f", `{hub_id}`" if hub_id else "") + f" (preset `{source}`)"
    else:
        text = f"`{source}`"
    return text + (f", split `{split}`" if split else "")


def _calibration_datasets(config: Optional[PruningConfig], report: Any) -> list[str]:
    """Hub dataset ids of the calibration data (presets mapped to their ids; local files, lists, self omitted)."""
    source = (getattr(report, "calibration", None) or {}).get("source") if report is not None else None
    if source is None and config is not None:
        source = config.calibration
    if not isinstance(source, str):
        return []
    if source in PRESET_DATASETS:
        hub_id = PRESET_DATASETS[source][0]
        return [hub_id] if hub_id else []
    return [source] if _looks_like_hub_id(source) and not source.lower().endswith(_FILE_SUFFIXES) else []


def _base_card_metadata(name_or_path: str, base: Optional[str]) -> dict[str, Any]:
    """Metadata of the base model's card from a local copy only: the folder it was loaded from, or the HF cache."""
    candidates = []
    if name_or_path and os.path.isdir(name_or_path):
        candidates.append(os.path.join(name_or_path, CARD_FILE))
    if base:
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, CARD_FILE)
            if isinstance(cached, str):
                candidates.append(cached)
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            from huggingface_hub import ModelCard

            return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
        except Exception as err:  # a broken card of the base model must not stop the save
            logger.debug("could not read the base model's card: %s", err)
    return {}
