"""Saving a pruned model as a self-describing folder (see ``hf_recon_prune.hub`` for what the folder holds).

The folder is written next to its destination under a temporary name and renamed into place once complete, so a
failure (or an interrupt) never leaves a half-written folder, and an existing folder is replaced only by a complete
new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
import warnings
from typing import Any, Optional, Union

from ..config import CONFIG_KEY, PruningConfig
from .card import CARD_FILE, build_model_card

logger = logging.getLogger(__name__)

REPORT_FILE = "prune_report.json"
PLOT_FILE = "reconstruction_error.png"


def save_pruned_model(
    model: Any,
    save_directory: Union[str, os.PathLike],
    config: Optional[Union[PruningConfig, dict]] = None,
    tokenizer: Any = None,
    report: Any = None,
    *,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> str:
    """Save a pruned model with its tokenizer, PruningConfig, report, error plot and model card; return the folder.

    Args:
        model: the pruned ``*ForCausalLM`` model; saved with its own ``save_pretrained`` (safetensors, dense shards).
        save_directory: the folder to write. An existing folder is replaced only by a complete new one, and only if
            it is empty or a saved model (has a config.json): other folders are refused, never deleted.
        config: the PruningConfig (stored in config.json under ``"pruning_config"``); defaults to the report's config
            or to one already stored in ``model.config``.
        tokenizer: saved alongside when given (the card's usage snippet then loads it from the same repo).
        report: the PruneReport of the run; without it the card has no per-block tables (see ``save_already_pruned``).
        base_model: Hub id of the dense model, for the card's ``base_model`` when ``model.config._name_or_path`` is
            not a Hub id (e.g. the model was loaded from a local folder). Local paths are never written to the card.
        license: the license for the card; defaults to the base model's, when a local copy of its card says it.
        repo_id: the Hub repo the folder is meant for, used in the card's usage snippet and as the model-index name
            (default: the folder's name).

    Returns:
        the absolute path of the saved folder.
    """
    config = _resolve_config(model, config, report)
    _check_saveable(model)
    final = _target_folder(save_directory)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0o700
    try:
        _write_folder(tmp, model, config, tokenizer, report, final=final, base_model=base_model, license=license,
                      repo_id=repo_id)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved the pruned model to %s", final)
    return final


def save_already_pruned(
    model: Any,
    save_directory: Union[str, os.PathLike],
    config: Optional[Union[PruningConfig, dict]] = None,
    tokenizer: Any = None,
    *,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> str:
    """Save a model pruned earlier (no PruneReport, e.g. loaded back from a saved folder) with a card of its own.

    The card reports the sparsity measured on the weights (``model_sparsity``) instead of the run's per-block
    tables. ``config`` defaults to the PruningConfig stored in ``model.config`` (present in folders saved by this
    package); without any, the card describes the measured sparsity only.
    """
    return save_pruned_model(model, save_directory, config, tokenizer, None, base_model=base_model, license=license,
                             repo_id=repo_id)


def _resolve_config(model: Any, config: Any, report: Any) -> Optional[PruningConfig]:
    if isinstance(config, PruningConfig):
        return config
    if isinstance(config, dict):
        return PruningConfig.from_dict(config)
    if config is not None:
        raise TypeError(f"config must be a PruningConfig, a dict or None, got {type(config).__name__}")
    for candidate in (getattr(report, "config", None), getattr(getattr(model, "config", None), CONFIG_KEY, None)):
        if isinstance(candidate, dict) and candidate:
            return PruningConfig.from_dict(candidate)
    return None


def _check_saveable(model: Any) -> None:
    if getattr(model, "_hf_recon_prune_incomplete", False):
        raise RuntimeError(
            "refusing to save: pruning failed part-way and this model is only partially pruned; reload the model and "
            "prune it again"
        )
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(); expected a transformers model")
    adapters = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if adapters:
        raise ValueError(
            f"refusing to save: the model still holds LoRA adapters (e.g. {adapters[0]}), which plain transformers "
            "cannot load as a dense checkpoint; merge them into the weights first"
        )


def _target_folder(save_directory: Union[str, os.PathLike]) -> str:
    final = os.path.abspath(os.fspath(save_directory))
    if os.path.islink(final):
        final = os.path.realpath(final)
    if os.path.exists(final):
        if not os.path.isdir(final):
            raise FileExistsError(f"{final} exists and is not a folder; choose another save_directory")
        entries = os.listdir(final)
        if entries and "config.json" not in entries:
            raise FileExistsError(
                f"{final} exists and does not hold a saved model (no config.json); it is not replaced. Choose another "
                "save_directory or empty it first."
            )
    cwd = os.path.realpath(os.getcwd())
    if cwd == final or cwd.startswith(final.rstrip(os.sep) + os.sep):
        raise ValueError(f"cannot replace {final}: it is (or contains) the current working directory")
    return final


def _move_into_place(tmp: str, final: str) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` is moved aside first and restored on failure."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    parent, name = os.path.split(final)
    backup = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_folder(tmp: str, model: Any, config: Optional[PruningConfig], tokenizer: Any, report: Any, *,
                  final: str, base_model: Optional[str], license: Optional[str], repo_id: Optional[str]) -> None:
    if config is not None:
        # PretrainedConfig keeps unknown attributes and writes them to config.json; AutoConfig reads them back.
        model.config.pruning_config = config.to_dict()
    model.save_pretrained(tmp)
    if not any(f.endswith(".safetensors") for f in os.listdir(tmp)):
        raise RuntimeError(f"{type(model).__name__}.save_pretrained wrote no .safetensors file")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    plot_file = None
    if report is not None:
        report.to_json_file(os.path.join(tmp, REPORT_FILE))
        plot_file = _try_plot(report, os.path.join(tmp, PLOT_FILE))
    card = build_model_card(
        model, config, report, model_name=os.path.basename(final), base_model=base_model, license=license,
        repo_id=repo_id, has_tokenizer=tokenizer is not None, plot_file=plot_file,
        local_paths=[tmp, final],
    )
    card.save(os.path.join(tmp, CARD_FILE))


def _try_plot(report: Any, path: str) -> Optional[str]:
    """Draw the error plot; a missing matplotlib or a plotting error costs the figure, never the saved model."""
    try:
        from ..plots import plot_reconstruction_errors
    except ImportError as err:  # pragma: no cover - plots.py itself imports nothing optional
        warnings.warn(f"skipping {PLOT_FILE}: {err}", stacklevel=3)
        return None
    try:
        written = plot_reconstruction_errors(report, path)
    except ImportError:
        warnings.warn(
            f"matplotlib is not installed: {PLOT_FILE} is not written (pip install 'hf-recon-prune[report]')",
            stacklevel=3,
        )
        return None
    except Exception as err:  # a figure is not worth losing a pruned model over
        warnings.warn(f"could not draw {PLOT_FILE} ({type(err).__name__}: {err}); saving without it", stacklevel=3)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    return os.path.basename(written) if written else None
