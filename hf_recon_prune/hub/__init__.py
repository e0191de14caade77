"""Saving a pruned model as a self-describing folder, its model card, and uploading that folder to the Hub.

A saved folder holds:

    config.json, model*.safetensors, generation_config.json   ``model.save_pretrained``: plain dense shards in which
                                                            the pruned weights are zeros, so the model loads with
                                                            plain transformers; config.json carries the PruningConfig
                                                            under ``"pruning_config"``
    tokenizer files                                          when a tokenizer is given
    prune_report.json                                        the PruneReport (when there is one)
    reconstruction_error.png                                 per-block error before/after, calibration vs held-out
    README.md                                                the model card (hf_recon_prune/templates/pruned_model_card.md)
    .hf-recon-prune.json                                     marks the folder as saved by this package (a later save
                                                            may replace it without overwrite=True); never uploaded

Nothing private is written: the config and the report pass through ``hf_recon_prune.sanitise`` first (calibration
texts become a count and a hash, local paths lose their folders or are dropped).

The folder is written next to its destination under a temporary name and renamed into place once complete, so a
failure (or an interrupt) never leaves a half-written folder, and an existing folder is replaced only by a complete
new one. Uploading is a separate step (``push_folder_to_hub``) that only reads the folder: when it fails, the
complete local copy is still there to retry with ``hf-recon-prune push <folder> <repo>``.

Modules: ``save`` (the folder), ``card`` (the model card; ``model_index``, ``provenance`` and ``formatting`` hold
its parts), ``push`` (the upload). ``model_sparsity`` lives in ``hf_recon_prune.evaluation`` and is re-exported
here, loaded on first use so that importing this package stays free of torch.
"""

from __future__ import annotations

from .card import (
    CARD_FILE,
    CARD_TEMPLATE,
    CITATION,
    KNOWN_LICENSES,
    TECHNIQUES,
    build_model_card,
    card_template_path,
    method_description,
    method_label,
)
from .model_index import METRIC_NAMES, PRESET_DATASETS, ZERO_SHOT_NAMES
from .push import HubUploadError, check_publishable, push_folder_to_hub
from .save import (
    MARKER_FILE,
    PLOT_FILE,
    REPORT_FILE,
    check_save_target,
    rewrite_report_and_card,
    save_already_pruned,
    save_pruned_model,
    written_by_this_package,
)

__all__ = [
    "CARD_FILE", "CARD_TEMPLATE", "CITATION", "KNOWN_LICENSES", "MARKER_FILE", "METRIC_NAMES",
    "PLOT_FILE", "PRESET_DATASETS", "REPORT_FILE", "TECHNIQUES", "ZERO_SHOT_NAMES", "HubUploadError",
    "build_model_card", "card_template_path", "check_publishable", "check_save_target", "method_description",
    "method_label", "model_sparsity", "push_folder_to_hub", "rewrite_report_and_card", "save_already_pruned",
    "save_pruned_model", "written_by_this_package",
]


def __getattr__(name):
    # evaluation imports torch; saving needs it anyway, pushing and reading the constants do not.
    if name == "model_sparsity":
        from ..evaluation import model_sparsity

        return model_sparsity
    raise AttributeError(f"module 'hf_recon_prune.hub' has no attribute {name!r}")
