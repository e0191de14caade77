"""Evaluation: perplexity with the standard protocol, on a dataset name, a file, a list of texts or token ids.

Protocol (as in the SparseGPT/Wanda reference code): join the test documents, cut the token stream into
non-overlapping windows of ``seq_len`` tokens (the incomplete tail is dropped), average the next-token negative
log-likelihood over every predicted token, and exponentiate.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .block_io import batches


def _model_device(model: nn.Module) -> torch.device:
    weight = model.get_input_embeddings().weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = False) -> float:
    """Perplexity of ``model`` over token windows [W, L]; each window is scored independently (no context carried)."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total_nll, total_tokens = 0.0, 0
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=windows.shape[0], desc="perplexity", unit="window")
    try:
        for rows in batches(windows.shape[0], batch_size):
            ids = windows[rows].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
            if progress is not None:
                progress.update(ids.shape[0])
    finally:
        model.train(was_training)
        if progress is not None:
            progress.close()
    return math.exp(total_nll / total_tokens)


def perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    source: Union[str, list[str], torch.Tensor] = "wikitext2",
    split: str = "test",
    seq_len: int = 2048,
    batch_size: int = 4,
    max_windows: Optional[int] = None,
    text_column: Optional[str] = None,
    show_progress: bool = False,
) -> float:
    """Perplexity on a named dataset ("wikitext2", "c4", "ptb", "default"), a local file, a list of texts, or ids.

    ``source`` may also be a LongTensor of windows [W, L], in which case ``tokenizer`` is not needed.
    """
    if isinstance(source, torch.Tensor):
        windows = source
    else:
        from .calibration import load_texts, stream_windows_for_eval

        if tokenizer is None:
            raise ValueError("perplexity on text needs a tokenizer")
        texts = load_texts(source, split=split, text_column=text_column)
        windows = stream_windows_for_eval(texts, tokenizer, seq_len, max_windows=max_windows)
    if max_windows is not None:
        windows = windows[:max_windows]
    return perplexity_of_ids(model, windows, batch_size=batch_size, show_progress=show_progress)
