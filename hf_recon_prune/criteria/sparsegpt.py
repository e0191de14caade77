"""SparseGPT (Frantar & Alistarh, 2023): mask selection with the OBS weight update, i.e. layer-wise reconstruction.

The same solver performs LR for a mask chosen by another criterion (``fixed_keep_mask``): columns are pruned left to
right and each pruned weight's error is compensated on the columns not yet processed, through the Cholesky factor of
the inverse Hessian. All arithmetic is float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .masks import nm_mask, prune_lowest

logger = logging.getLogger(__name__)

MAX_DAMPENING_RETRIES = 6


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # float32, pruned and updated
    keep_mask: torch.Tensor  # bool, True = kept
    dampening: float  # the relative dampening that made the Hessian positive definite


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after dampening ``H += dampening * mean(diag H) * I``.

    A Hessian that is still not positive definite (rank deficient, tiny calibration set) gets ten times more
    dampening, a few times, before giving up; the dampening actually used is returned so the report can show it.
    """
    H = hessian.clone()
    diag = torch.diagonal(H)
    mean_diag = diag.mean().clamp_min(1e-8) if diag.numel() else torch.tensor(1.0)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(MAX_DAMPENING_RETRIES):
        damp = dampening * (10.0**attempt)
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    logger.warning("Hessian was singular; solved with dampening %.3g instead of %.3g", damp, dampening)
                return U, damp
    raise RuntimeError(
        f"SparseGPT: the Hessian is not positive definite even with dampening {damp:g}; the calibration inputs of "
        "this layer are degenerate (all zero or non-finite)."
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    block_size: int = 128,
    dampening: float = 0.01,
    fixed_keep_mask: Optional[torch.Tensor] = None,
) -> SparseGPTResult:
    """Prune ``weight`` [out, in] and update the kept weights to minimise ||W X - W' X||^2 given H = X^T X.

    Unstructured masks prune exactly ``floor(sparsity * out * width)`` weights in every column block of ``width``
    (<= block_size) columns, chosen by the OBS saliency ``w^2 / [H^-1]_jj^2``; N:M masks are chosen per group of M
    columns as the solver reaches it, with the already-updated weights.
    """
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    out_features, in_features = W.shape

    # Inputs that are always zero on the calibration data: H needs a non-zero diagonal there, and their weights are
    # the cheapest to prune (saliency 0), but they are not zeroed beyond the mask, so the sparsity stays exact.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0

    Hinv, used_damp = inverse_hessian_cholesky(H, dampening)
    keep = torch.ones_like(W, dtype=torch.bool)
    if fixed_keep_mask is not None:
        keep = fixed_keep_mask.to(W.device, torch.bool).clone()

    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        width = end - start
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        d = torch.diagonal(Hinv1)

        if fixed_keep_mask is None and nm is None:
            saliency = (W1.square() / d.square().unsqueeze(0)).masked_fill(dead[start:end], 0.0)
            flat_keep = prune_lowest(saliency.reshape(1, -1), int(sparsity * saliency.numel()))
            keep[:, start:end] = flat_keep.reshape(out_features, width)
        keep1 = keep[:, start:end]

        for i in range(width):
            if fixed_keep_mask is None and nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = (W1[:, group].square() / d[group].square().unsqueeze(0)).masked_fill(dead[start:end][group], 0.0)
                keep1[:, group] = nm_mask(saliency, *nm)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, start:end] = Q1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]

    W.mul_(keep)
    return SparseGPTResult(weight=W, keep_mask=keep, dampening=used_damp)
