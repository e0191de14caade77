"""Saving a pruned model as a self-describing folder (see ``hf_recon_prune.hub`` for what the folder holds).

The folder is written next to its destination under a temporary name and renamed into place once complete, so a
failure (or an interrupt) never leaves a half-written folder, and an existing folder is replaced only by a complete
new one. What a killed save left behind (``.<name>.tmp-*``, ``.<name>.old-*``) is removed by the next save to the same
destination (an ``.old-*`` folder, the previous save moved aside, is put back when the destination is missing).

Nothing is replaced without being asked: the model's own source folder and a model folder this package did not write
(it has no ``MARKER_FILE``) are refused unless ``overwrite=True``; a non-empty folder that holds no model is always
refused. Every file is made from the config and report as ``hf_recon_prune.sanitise`` leaves them: no calibration
text and no absolute local path is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from typing import Any, Optional, Union

from .._version import __version__
from ..config import CONFIG_KEY, PruningConfig
from ..sanitise import sanitise_config_dict, sanitise_report_dict
from .card import CARD_FILE, build_model_card

logger = logging.getLogger(__name__)

REPORT_FILE = "prune_report.json"
PLOT_FILE = "reconstruction_error.png"
#: Written into every folder this package saves (and never uploaded): a folder with it may be replaced by a new save.
MARKER_FILE = ".hf-recon-prune.json"
#: Room kept free on the disk beyond the model's bytes (tokenizer, card, plot, file system overhead).
_DISK_MARGIN = 64 << 20


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
    overwrite: bool = False,
) -> str:
    """Save a pruned model with its tokenizer, PruningConfig, report, error plot and model card; return the folder.

    Args:
        model: the pruned ``*ForCausalLM`` model; saved with its own ``save_pretrained`` (safetensors, dense shards).
        save_directory: the folder to write. An existing folder is replaced only by a complete new one, and only if
            it is empty or a model folder this package saved: a folder without a model is refused (never deleted);
            the model's own source folder and a model folder saved by something else only with ``overwrite``.
        config: the PruningConfig (stored in config.json under ``"pruning_config"``); defaults to the report's config
            or to one already stored in ``model.config``.
        tokenizer: saved alongside when given (the card's usage snippet then loads it from the same repo).
        report: the PruneReport of the run; without it the card has no per-block tables (see ``save_already_pruned``).
        base_model: Hub id of the dense model, for the card's ``base_model`` when ``model.config._name_or_path`` is
            not a Hub id (e.g. the model was loaded from a local folder). Local paths are never written to the card.
        license: the license for the card; defaults to the base model's, when a local copy of its card says it.
        repo_id: the Hub repo the folder is meant for, used in the card's usage snippet and as the model-index name
            (default: the folder's name).
        overwrite: replace the folder the model was loaded from, or a model folder this package did not write.

    Returns:
        the absolute path of the saved folder.

    Raises:
        FileExistsError: the folder may not be replaced (the message names it and says what to do).
        OSError: the disk has no room for the model.
    """
    config = _resolve_config(model, config, report)
    _check_saveable(model)
    final = _absolute(save_directory)
    parent, name = os.path.split(final)
    if os.path.isdir(parent):
        _clean_leftovers(parent, name)
    check_save_target(final, model=model, overwrite=overwrite)
    os.makedirs(parent, exist_ok=True)
    _check_disk(model, parent)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    config, report = _sanitised(config, report, [tmp, final, *_source_folders(model)])
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
    overwrite: bool = False,
) -> str:
    """Save a model pruned earlier (no PruneReport, e.g. loaded back from a saved folder) with a card of its own.

    The card reports the sparsity measured on the weights (``model_sparsity``) instead of the run's per-block
    tables. ``config`` defaults to the PruningConfig stored in ``model.config`` (present in folders saved by this
    package); without any, the card describes the measured sparsity only.
    """
    return save_pruned_model(model, save_directory, config, tokenizer, None, base_model=base_model, license=license,
                             repo_id=repo_id, overwrite=overwrite)


def rewrite_report_and_card(
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
    """Write the report and model card of a folder ``save_pruned_model`` saved anew, from ``report`` as it is now
    (after measuring the saved model, say), as ``save_pruned_model`` with the same arguments would write them. The
    weights, config and tokenizer are not touched; each of the two files is written aside and renamed over the old
    one, so an interrupt leaves the old or the new file, never half of one. Returns the folder's absolute path.

    Raises:
        FileExistsError: the folder is not one this package saved (it has no ``MARKER_FILE``).
    """
    final = _absolute(save_directory)
    if not written_by_this_package(final):
        raise FileExistsError(f"{final} is not a model folder hf-recon-prune saved; only such a folder's report and "
                              "card are rewritten. Save the model there first (save_pretrained)")
    config = _resolve_config(model, config, report)
    config, report = _sanitised(config, report, [final, *_source_folders(model)])
    plot_file = PLOT_FILE if os.path.isfile(os.path.join(final, PLOT_FILE)) else None
    card = build_model_card(
        model, config, report, model_name=os.path.basename(final), base_model=base_model, license=license,
        repo_id=repo_id, has_tokenizer=tokenizer is not None, plot_file=plot_file, local_paths=[final],
    )
    if report is not None:
        _replace_file(os.path.join(final, REPORT_FILE), report.to_json_file)
    _replace_file(os.path.join(final, CARD_FILE), card.save)
    logger.info("rewrote the report and model card of %s", final)
    return final


def _replace_file(path: str, write: Any) -> None:
    """``write(temporary path)``, then rename the result over ``path``."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


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


def _absolute(save_directory: Union[str, os.PathLike]) -> str:
    final = os.path.abspath(os.path.expanduser(os.fspath(save_directory)))
    return os.path.realpath(final) if os.path.islink(final) else final


def check_save_target(save_directory: Union[str, os.PathLike], model: Any = None, overwrite: bool = False) -> str:
    """Refuse, before anything is written, a destination that saving must not replace; returns its absolute path.

    Always refused: a file, a non-empty folder without a config.json (it holds no model) and the working directory.
    Refused unless ``overwrite``: the folder ``model`` was loaded from (or one that contains it), a folder inside the
    Hugging Face cache, and a model folder without ``MARKER_FILE`` (written by something other than this package,
    or downloaded from the Hub).
    """
    final = _absolute(save_directory)
    if os.path.exists(final) and not os.path.isdir(final):
        raise FileExistsError(f"{final} exists and is not a folder; choose another save_directory")
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, final):
        raise FileExistsError(f"cannot replace {final}: it is (or contains) the current working directory; choose "
                              "another save_directory")
    way_out = "choose another save_directory, or pass overwrite=True (--overwrite) to replace it"
    if not overwrite:
        for source in _source_folders(model):
            if _inside(source, final):
                raise FileExistsError(f"refusing to save into {final}: the model was loaded from "
                                      f"{'it' if source == final else source}, so saving would replace its own "
                                      f"weights; {way_out}")
        cache = _hub_cache()
        if cache and _inside(final, cache):
            raise FileExistsError(f"refusing to save into {final}: it is inside the Hugging Face cache ({cache}); "
                                  f"{way_out}")
    entries = os.listdir(final) if os.path.isdir(final) else []
    if entries and "config.json" not in entries:
        raise FileExistsError(
            f"{final} exists and does not hold a saved model (no config.json); it is not replaced. Choose another "
            "save_directory or empty it first."
        )
    if entries and not overwrite and not written_by_this_package(final):
        raise FileExistsError(
            f"refusing to replace {final}: it holds a model that hf-recon-prune did not save (no {MARKER_FILE}: a "
            "model downloaded from the Hub, pushed by hf-recon-prune or not, or written by another tool has none), "
            f"and saving would delete every file in it; {way_out}"
        )
    return final


def written_by_this_package(folder: str) -> bool:
    """Whether ``folder`` was saved by this package: its ``MARKER_FILE`` says so.

    Nothing else does: a ``prune_report.json`` next to a ``pruning_config`` is also what every repo this package
    pushed holds once downloaded (the marker is never uploaded), so a folder saved before the marker existed needs
    ``overwrite=True`` once.
    """
    marker = _read_json_dict(os.path.join(folder, MARKER_FILE))
    return marker is not None and marker.get("written_by") == "hf-recon-prune"


def _read_json_dict(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _source_folders(model: Any) -> list[str]:
    """Local folders the model's weights came from: ``config._name_or_path`` when it is a folder."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return [os.path.realpath(name)] if name and os.path.isdir(name) else []


def _hub_cache() -> Optional[str]:
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        return os.path.realpath(constants.HF_HUB_CACHE)
    return None


_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{12}$")


def _clean_leftovers(parent: str, name: str) -> None:
    """Remove what a killed save to ``parent/name`` left: temporary folders, and the previous save moved aside
    (restored when the destination itself is missing). Those of a save still running in another process stay."""
    final = os.path.join(parent, name)
    for entry in sorted(os.listdir(parent)):
        match = _LEFTOVER_RE.match(entry)
        path = os.path.join(parent, entry)
        if not match or match.group("name") != name or not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = int(match.group("pid")) if match.group("pid") else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if match.group("kind") == "old" and not os.path.lexists(final):
            os.rename(path, final)
            logger.warning("a killed save had moved %s aside; it was put back", final)
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed %s, left by a save that did not finish", path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _check_disk(model: Any, parent: str) -> None:
    needed = _model_bytes(model) + _DISK_MARGIN
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OSError(f"not enough disk space to save the model in {parent}: it needs about {needed / 2**30:.2f} GiB "
                      f"and {free / 2**30:.2f} GiB are free; free some space or choose another save_directory")


def _model_bytes(model: Any) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _sanitised(config: Optional[PruningConfig], report: Any, known: list[str]) -> tuple[Optional[PruningConfig], Any]:
    """The config and report every saved file is made from: as ``hf_recon_prune.sanitise`` leaves them."""
    if config is not None:
        config = PruningConfig.from_dict(sanitise_config_dict(config.to_dict(), known))
    if report is not None:
        from ..report import PruneReport

        report = PruneReport.from_dict(sanitise_report_dict(report.to_dict(), known))
    return config, report


def _move_into_place(tmp: str, final: str) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` is moved aside first and restored on failure."""
    parent, name = os.path.split(final)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        _fsync_dir(parent)
        return
    backup = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    _fsync_dir(parent)
    shutil.rmtree(backup, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    """Make the renames in ``path`` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    with open(os.path.join(tmp, MARKER_FILE), "w", encoding="utf-8") as handle:
        json.dump({"written_by": "hf-recon-prune", "version": __version__}, handle)
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
