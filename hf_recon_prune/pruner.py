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
from .criteria.sparsegpt import on_singular_hessian
from .distributed import DataParallelError
from .engine import BlockEngine
from .preflight import PreflightError, preflight
from .propagation import NonFiniteActivationsError
from .report import USER_TOKEN_IDS, PruneReport

logger = logging.getLogger(__name__)

__all__ = ["Pruner", "PruningFailedError", "NonFiniteActivationsError", "PreflightError", "DataParallelError"]


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
            weights will not change again), back where the model keeps it and, with ``config.checkpoint_dir``, after
            its checkpoint is on disk. With overlapped placement (on a GPU) that is at the end of the next window
            (or of the run), since the block is written back while the next window computes.
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
                # the config's calibration fields were not used: the card says so instead of quoting them
                description={"source": USER_TOKEN_IDS, "num_samples": int(data.shape[0]),
                             "seq_len": int(data.shape[1]), "split": None},
            )
        return data

    # ------------------------------------------------------------------ public
    def prune(self, resume: bool = False, overwrite: bool = False) -> PruneReport:
        """Run the block loop; returns (and keeps in ``self.report``) the PruneReport.

        Args:
            resume: continue from the latest complete checkpoint in ``config.checkpoint_dir`` (one is written after
                every finalised block). The model must be the same dense model the interrupted run started from,
                with the same configuration and calibration data (checked: a mismatch raises
                ``checkpoint.CheckpointError``); the result is the model an uninterrupted run produces (bit for bit
                on the CPU). Without a checkpoint in the folder the run starts from the first block. A model left
                partially pruned by a failed run in this process may be resumed (its flag is cleared on success): a
                block the failed run changed but did not finish is put back from the copy of its dense weights in
                the checkpoint folder, which runs with a dense stream write (GP, or ``track_reconstruction_error``,
                the default); without that copy the resume refuses, naming the block, and the dense model must be
                loaded again.
            overwrite: let a fresh run replace a checkpoint of the same run in ``config.checkpoint_dir`` (refused
                otherwise: pass ``resume=True`` to continue it).

        Before any block is touched, ``preflight`` refuses what cannot succeed (a quantized model, ``seq_len`` beyond
        the model's positions, sizes this machine cannot hold, ...) with ``preflight.PreflightError``; the resource
        check against the memory plan follows once the calibration set is built. A layer whose Hessian stays
        singular after every dampening retry gets magnitude masks without the SparseGPT update, and a warning in the
        report (``report.warnings``), instead of stopping the run. In a data-parallel run a failure on any process is
        raised on every process as the same ``distributed.DataParallelError`` naming the failing rank.

        On a CUDA device the engine resets ``torch.cuda``'s peak-memory statistics before every window, to report
        the peak of each window in ``report.memory["peak_device_bytes_per_window"]``: read peaks from there, not from
        ``torch.cuda.max_memory_allocated()`` after the call.
        """
        model, cfg = self.model, self.config
        if resume and not cfg.checkpoint_dir:
            raise ValueError("prune(resume=True) needs PruningConfig.checkpoint_dir: the folder the interrupted run "
                             "wrote its checkpoints to")
        preflight(model, self.layout, cfg, self.calibration_data, resume=resume)
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
            with on_singular_hessian(lambda message: _warn_in_block(engine, message)):
                report = engine.run(resume, overwrite)
        except BaseException as error:
            self._handle_failure(error, engine)
            raise
        finally:
            model.train(was_training)
            if use_cache is not None:
                model.config.use_cache = use_cache
        if getattr(model, "_hf_recon_prune_incomplete", False):
            # Only a resume from the failed run's checkpoint gets here (preflight): every block is final now.
            del model._hf_recon_prune_incomplete
            logger.info("the resumed run completed the partially pruned model: it may be saved")
        self.report = report
        return report

    def record_perplexity(self, dataset: str, split: str, seq_len: int, dense: Optional[float], pruned: float,
                          windows: Optional[int] = None) -> None:
        """Store measured perplexities in the report (and so in the model card's model-index). ``windows``: how many
        windows of ``seq_len`` tokens were scored; ``evaluate`` records it always, so give it here too, or ``compare``
        puts this value in a column apart from an ``evaluate`` result of the same protocol."""
        entry = {"split": split, "seq_len": seq_len, "dense": dense, "pruned": pruned}
        if windows is not None:
            entry["windows"] = int(windows)
        self._require_report().perplexity[str(dataset)] = entry

    def save_pretrained(self, save_directory: str, overwrite: bool = False, **kwargs: Any) -> str:
        """Save the pruned model (dense safetensors), tokenizer, PruningConfig in config.json, report and model card.

        Nothing private is written (calibration texts become a count and a hash, local paths lose their folders; see
        ``hf_recon_prune.sanitise``). The folder the model was loaded from, and a model folder this package did not
        write, are replaced only with ``overwrite=True``. In a data-parallel run every process holds the same model:
        rank 0 writes, the others wait for it (and raise its error if it fails).
        """
        from .hub import save_pruned_model

        report = self._require_report()

        def save() -> str:
            return save_pruned_model(self.model, save_directory, self.config, tokenizer=self.tokenizer, report=report,
                                     overwrite=overwrite, **kwargs)

        return self._on_main_process(save, f"saving the model to {save_directory}")

    def rewrite_report_and_card(self, save_directory: str, **kwargs: Any) -> str:
        """After ``save_pretrained(save_directory, **kwargs)`` and further measurements (``record_perplexity``,
        ``report.record_evaluation``): write the folder's report and model card anew from the report as it is now,
        without writing the weights again (``hub.rewrite_report_and_card``). Pass the ``base_model`` / ``license`` /
        ``repo_id`` the save was given. In a data-parallel run rank 0 writes, the others wait for it."""
        from .hub import rewrite_report_and_card

        report = self._require_report()

        def rewrite() -> str:
            return rewrite_report_and_card(self.model, save_directory, self.config, tokenizer=self.tokenizer,
                                           report=report, **kwargs)

        return self._on_main_process(rewrite, f"rewriting the report and card of {save_directory}")

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        local_dir: Optional[str] = None,
        overwrite: bool = False,
    ) -> str:
        """Save locally (``local_dir``, default ``./<repo name>``; see ``save_pretrained`` for ``overwrite``), then
        upload that folder; returns the commit URL.

        The token is passed to huggingface_hub only (None: the HF_TOKEN variable or the cached login); it is never
        written to a file, a log or the card. In a data-parallel run rank 0 alone uploads.
        """
        from .hub import push_folder_to_hub

        folder = self.save_pretrained(local_dir or repo_id.split("/")[-1], overwrite=overwrite, repo_id=repo_id)

        def push() -> str:
            return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                      revision=revision, create_pr=create_pr)

        return self._on_main_process(push, f"uploading to {repo_id}")

    def _on_main_process(self, work: Callable[[], Any], what: str) -> Any:
        """``work()``; in a data-parallel run rank 0 alone does it and the others wait for (and share) its outcome."""
        data_parallel = self._data_parallel()
        return data_parallel.main_only(work, what) if data_parallel is not None else work()

    def _data_parallel(self):
        state = self._engine.state if self._engine is not None else None
        return state.data_parallel if state is not None else None

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
        if self.config.checkpoint_dir:
            message += (f" Its checkpoints in {self.config.checkpoint_dir} let prune(resume=True) (--resume) "
                        "continue it.")
        logger.error(message)
        if isinstance(error, Exception):
            raise PruningFailedError(message) from error


def _warn_in_block(engine: BlockEngine, message: str) -> None:
    """A note from the solver about the layer being pruned: into the report, under the block being prepared (the
    block the engine took last)."""
    state = engine.state
    block = state.modified[-1] if state is not None and state.modified else None
    engine._warn(message if block is None else f"block {block}: {message}", block)
