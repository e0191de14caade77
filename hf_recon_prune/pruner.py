"""The facade users import: ``Pruner`` prunes a Hugging Face causal LM in place, saves it and pushes it.

The block loop itself lives in ``engine.py``; this module sets a run up, hands it to the engine, and owns what
happens when a run fails (the model restored from backups, or flagged as partially modified) and what is saved.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from .architectures import resolve_layout
from .config import PruningConfig
from .engine import BlockEngine
from .propagation import NonFiniteActivationsError
from .report import PruneReport

logger = logging.getLogger(__name__)

__all__ = ["Pruner", "PruningFailedError", "NonFiniteActivationsError"]


class PruningFailedError(RuntimeError):
    """Raised when prune() fails part-way; says whether the model was restored or is partially modified."""


class Pruner:
    """Prune a Hugging Face causal LM in place, block by block, following a PruningConfig.

    Args:
        model: any ``AutoModelForCausalLM`` model of a supported family (see ``architectures.py``).
        config: the PruningConfig.
        tokenizer: needed to tokenise text calibration sources and for self-generated data.
        calibration_data: an already built ``CalibrationSet`` (or a LongTensor of token ids [N, L]) instead of
            reading ``config.calibration``.
        keep_backup: keep a CPU copy of every block before it is modified so that a failure restores the model
            exactly (costs host memory equal to the model's size). Without it, a failure raises
            ``PruningFailedError`` that says which blocks were modified.
        show_progress: tqdm progress bar over the blocks.
        on_block_end: called as ``on_block_end(index, report)`` after decoder block ``index`` is finalised (its
            weights will not change again) and, with ``config.checkpoint_dir``, after its checkpoint is on disk.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[PruningConfig] = None,
        tokenizer: Any = None,
        calibration_data: Any = None,
        keep_backup: bool = False,
        show_progress: bool = True,
        on_block_end: Optional[Callable[[int, PruneReport], None]] = None,
    ):
        self.model = model
        self.config = config if config is not None else PruningConfig()
        self.tokenizer = tokenizer
        self.calibration_data = calibration_data
        self.keep_backup = keep_backup
        self.show_progress = show_progress
        self.on_block_end = on_block_end
        self.layout = resolve_layout(model)
        self.report: Optional[PruneReport] = None
        self.masks: dict[str, torch.Tensor] = {}
        self._engine: Optional[BlockEngine] = None  # the latest run's engine

    # ------------------------------------------------------------------ calibration
    def _calibration_set(self):
        from .calibration import CalibrationSet, build_calibration_set

        data = self.calibration_data
        if data is None:
            return build_calibration_set(self.config, self.tokenizer, self.model)
        if isinstance(data, torch.Tensor):
            return CalibrationSet(
                input_ids=data.long(),
                is_self_generated=torch.zeros(data.shape[0], dtype=torch.bool),
                heldout_ids=data.new_zeros((0, data.shape[1])).long(),
                statistics_mask=torch.ones(data.shape[0], dtype=torch.bool),
                description={"source": "user-provided token ids", "num_samples": int(data.shape[0])},
            )
        return data

    # ------------------------------------------------------------------ public
    def prune(self, resume: bool = False) -> PruneReport:
        """Run the block loop; returns (and keeps in ``self.report``) the PruneReport.

        Args:
            resume: continue from the latest complete checkpoint in ``config.checkpoint_dir`` (one is written after
                every finalised block). The model must be the same dense model the interrupted run started from,
                with the same configuration and calibration data (checked: a mismatch raises
                ``checkpoint.CheckpointError``); the result is the model an uninterrupted run produces (bit for bit
                on the CPU). Without a checkpoint in the folder the run starts from the first block.

        On a CUDA device the engine resets ``torch.cuda``'s peak-memory statistics before every window, to report
        the peak of each window in ``report.memory["peak_device_bytes_per_window"]``: read peaks from there, not from
        ``torch.cuda.max_memory_allocated()`` after the call.
        """
        model, cfg = self.model, self.config
        if resume and not cfg.checkpoint_dir:
            raise ValueError("prune(resume=True) needs PruningConfig.checkpoint_dir: the folder the interrupted run "
                             "wrote its checkpoints to")
        engine = self._engine = BlockEngine(model, self.layout, cfg, self._calibration_set,
                                            keep_backup=self.keep_backup, show_progress=self.show_progress,
                                            on_block_end=self.on_block_end)
        engine.masks = self.masks
        was_training = model.training
        use_cache = getattr(model.config, "use_cache", None)
        model.eval()
        if use_cache is not None:
            model.config.use_cache = False
        try:
            report = engine.run(resume)
        except BaseException as error:
            self._handle_failure(error, engine)
            raise
        finally:
            model.train(was_training)
            if use_cache is not None:
                model.config.use_cache = use_cache
        self.report = report
        return report

    def record_perplexity(self, dataset: str, split: str, seq_len: int, dense: Optional[float], pruned: float) -> None:
        """Store measured perplexities in the report (and so in the model card's model-index)."""
        self._require_report().perplexity[str(dataset)] = {
            "split": split, "seq_len": seq_len, "dense": dense, "pruned": pruned,
        }

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> str:
        """Save the pruned model (dense safetensors), tokenizer, PruningConfig in config.json, report and model card.

        In a data-parallel run every process holds the same model: rank 0 writes, the others wait for it.
        """
        from .hub import save_pruned_model

        engine_state = self._engine.state if self._engine is not None else None
        data_parallel = engine_state.data_parallel if engine_state is not None else None
        if data_parallel is not None:
            folder = None
            if data_parallel.is_main:
                folder = save_pruned_model(self.model, save_directory, self.config, tokenizer=self.tokenizer,
                                           report=self._require_report(), **kwargs)
            return data_parallel.broadcast_object(folder)
        return save_pruned_model(self.model, save_directory, self.config, tokenizer=self.tokenizer,
                                 report=self._require_report(), **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        local_dir: Optional[str] = None,
    ) -> str:
        """Save locally (``local_dir``, default ``./<repo name>``), then upload that folder; returns the commit URL.

        The token is passed to huggingface_hub only; it is never written to a file, a log or the card.
        """
        from .hub import push_folder_to_hub

        folder = self.save_pretrained(local_dir or repo_id.split("/")[-1], repo_id=repo_id)
        return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                  revision=revision, create_pr=create_pr)

    def _require_report(self) -> PruneReport:
        if self.report is None:
            raise RuntimeError("call Pruner.prune() before saving or pushing: the model has not been pruned yet")
        return self.report

    def _handle_failure(self, error: BaseException, engine: BlockEngine) -> None:
        placement = engine.placement
        if placement is not None:
            try:  # the blocks of the failed window go back where they live (and under their accelerate hooks)
                placement.restore_all(list(self.layout.blocks))
            except Exception as restore_error:  # noqa: BLE001 - the original error matters more
                logger.error("could not put the blocks back after the failure: %s", restore_error)
        if not engine.modified:
            return
        if self.keep_backup:
            for index, state in engine.backups.items():
                block = self.layout.blocks[index]
                if placement is not None:
                    placement.onload(block)  # an offloaded block holds meta tensors: restore through its storage
                block.load_state_dict(state)
                if placement is not None:
                    placement.offload(block)
            logger.error("pruning failed (%s); the %d modified blocks were restored", error, len(engine.backups))
            return
        self.model._hf_recon_prune_incomplete = True
        message = (
            f"pruning failed in the middle of the run ({type(error).__name__}: {error}); decoder blocks "
            f"{sorted(set(engine.modified))} of the model were ALREADY MODIFIED in place. The model is partially "
            "pruned: reload it before using it, or pass keep_backup=True to have it restored on failure."
        )
        logger.error(message)
        if isinstance(error, Exception):
            raise PruningFailedError(message) from error
