"""SparseGPT (Frantar & Alistarh, 2023): mask selection with the OBS weight update, i.e. layer-wise reconstruction.

The same solver performs LR for a mask chosen by another criterion (``fixed_keep_mask``): columns are pruned left to
right and each pruned weight's error is compensated on the columns not yet processed, through the Cholesky factor of
the inverse Hessian. All arithmetic is float32.

A Hessian that is not positive definite even after ``MAX_DAMPENING_RETRIES`` dampening tries (non-finite or
indefinite statistics) does not stop the run: its layer falls back to the identity in place of the inverse Hessian,
which makes the saliency the weight's magnitude and the OBS update nothing (magnitude masks, weights unchanged), with
a warning (logged, and handed to the callback of ``on_singular_hessian``, which the Pruner puts in the report).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .masks import nm_mask, prune_lowest

logger = logging.getLogger(__name__)

MAX_DAMPENING_RETRIES = 6

#: default of ``sparsegpt_prune(batched=None)``: benchmarks flip it to time the column loop against the batched solve
BATCHED_SOLVE = True

#: Columns per batched triangular solve inside a column block whose mask is fixed, by device type (absent: the whole
#: block in one solve). A solve's ``[rows, w, w]`` system costs memory traffic in proportion to ``w``, so on the CPU
#: groups of 32 columns with a rank-32 update between them beat one solve of 128 (1.9x over a SmolLM2 block's seven
#: layers on a 2-core CPU, Hessian factoring included: ``benchmarks/sparsegpt_solver.py``, docs/benchmarks.md). On a GPU one solve a block means
#: fewer kernel launches; groups there are not measured, so the GPU keeps the whole block.
SOLVE_GROUP_COLUMNS = {"cpu": 32}

_SINGULAR_CALLBACK: contextvars.ContextVar[Optional[Callable[[str], None]]] = contextvars.ContextVar(
    "hf_recon_prune_singular_hessian", default=None)


class SingularHessianError(RuntimeError):
    """The Hessian stayed not positive definite after every dampening try (``inverse_hessian_cholesky``)."""


@contextlib.contextmanager
def on_singular_hessian(callback: Callable[[str], None]) -> Iterator[None]:
    """Within the block, ``callback(message)`` is called for every layer that falls back to magnitude masks."""
    token = _SINGULAR_CALLBACK.set(callback)
    try:
        yield
    finally:
        _SINGULAR_CALLBACK.reset(token)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # float32, pruned and updated
    keep_mask: torch.Tensor  # bool, True = kept
    dampening: float  # the relative dampening that made the Hessian positive definite


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float, overwrite: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after dampening ``H += dampening * mean(diag H) * I``.

    A Hessian that is still not positive definite (rank deficient, tiny calibration set) gets ten times more
    dampening, a few times, before giving up; the dampening actually used is returned so the report can show it.
    ``overwrite=True`` dampens ``hessian`` itself instead of a copy (its diagonal is left dampened): for the engine,
    whose Hessians are used once, at most three d_in x d_in matrices (H, then H^-1 or its factors) exist at a time.
    """
    H = hessian if overwrite else hessian.clone()
    diag = torch.diagonal(H)
    mean_diag = diag.mean().clamp_min(1e-8) if diag.numel() else torch.tensor(1.0)
    added = 0.0
    for attempt in range(MAX_DAMPENING_RETRIES):
        damp = dampening * (10.0**attempt)
        diag.add_((damp - added) * mean_diag)
        added = damp
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            del L
            continue
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
        if int(info) == 0 and torch.isfinite(U).all():
            if attempt:
                logger.warning("Hessian was singular; solved with dampening %.3g instead of %.3g", damp, dampening)
            return U, damp
    raise SingularHessianError(
        f"SparseGPT: the Hessian is not positive definite even with dampening {damp:g}; the calibration inputs of "
        "this layer are degenerate (non-finite, or the statistics are not a Gram matrix)."
    )


@dataclass
class HessianFactor:
    """What SparseGPT needs of a layer's Hessian; layers that read the same input (q/k/v, gate/up) share one."""

    inverse_cholesky: torch.Tensor  # upper Cholesky factor of the dampened H^-1, float32
    dead: torch.Tensor  # bool [d_in]: inputs that were zero on every calibration token
    dampening: float  # the relative dampening that made H positive definite


def factor_hessian(hessian: torch.Tensor, dampening: float, consume: bool = False,
                   device: Optional[torch.device] = None, name: Optional[str] = None) -> HessianFactor:
    """Factor ``hessian`` for SparseGPT. ``consume=True`` works in the given float32 tensor (which the caller gives
    up) instead of a copy, so that only the factor outlives the call. A Hessian that no dampening makes positive
    definite gives the identity factor (magnitude masks, no update; see the module docstring); ``name`` (the layer)
    is for that warning."""
    owned = consume and hessian.dtype == torch.float32 and (device is None or hessian.device == torch.device(device))
    H = hessian.detach() if owned else hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    # Inputs that are always zero on the calibration data: H needs a non-zero diagonal there, and their weights are
    # the cheapest to prune (saliency 0), but they are not zeroed beyond the mask, so the sparsity stays exact.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    try:
        U, used = inverse_hessian_cholesky(H, dampening, overwrite=True)
    except SingularHessianError as error:
        return _identity_factor(H, dead, dampening, name, error)
    return HessianFactor(U, dead, used)


def _identity_factor(H: torch.Tensor, dead: torch.Tensor, dampening: float, name: Optional[str],
                     error: SingularHessianError) -> HessianFactor:
    """The fallback for a singular Hessian: with the identity as the inverse Hessian's factor, OBS saliency is the
    squared weight and every compensation term is zero."""
    finite = bool(torch.isfinite(H).all())
    damp = dampening * 10.0 ** (MAX_DAMPENING_RETRIES - 1)
    message = (f"the Hessian of {name or 'a layer'} is not positive definite even with dampening {damp:g} "
               f"({'non-finite statistics' if not finite else 'indefinite statistics'}); the layer was pruned without "
               "the OBS weight update (SparseGPT's own mask falls back to weight magnitude)")
    logger.warning("%s (%s)", message, error)
    callback = _SINGULAR_CALLBACK.get()
    if callback is not None:
        callback(message)
    eye = torch.eye(H.shape[0], dtype=torch.float32, device=H.device)
    return HessianFactor(eye, dead, damp)


class HessianFactors:
    """The factors of one block's Hessians, made when a layer first needs one and freed after its last layer.

    ``stats`` maps layer names to their InputStatistics, shared ones as the same object (see StatisticsRecorder):
    a shared Hessian is factored once for all its layers, and each Gram matrix is consumed in place by its
    factorisation, so the block holds one factor at a time instead of every layer's Hessian and its copies.
    """

    def __init__(self, stats: dict, dampening: float):
        self._stats = stats
        self._dampening = dampening
        self._remaining_users: dict[int, int] = {}
        for statistics in stats.values():
            self._remaining_users[id(statistics)] = self._remaining_users.get(id(statistics), 0) + 1
        self._factors: dict[int, HessianFactor] = {}

    def for_layer(self, name: str) -> HessianFactor:
        statistics = self._stats[name]
        key = id(statistics)
        if key not in self._factors:
            self._factors[key] = factor_hessian(statistics.take_hessian(), self._dampening, consume=True, name=name)
        factor = self._factors[key]
        self._remaining_users[key] -= 1
        if self._remaining_users[key] == 0:
            del self._factors[key]
        return factor


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: Optional[torch.Tensor],
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    block_size: int = 128,
    dampening: float = 0.01,
    fixed_keep_mask: Optional[torch.Tensor] = None,
    batched: Optional[bool] = None,
    factor: Optional[HessianFactor] = None,
) -> SparseGPTResult:
    """Prune ``weight`` [out, in] and update the kept weights to minimise ||W X - W' X||^2 given H = X^T X.

    Unstructured masks prune exactly ``floor(sparsity * out * width)`` weights in every column block of ``width``
    (<= block_size) columns, chosen by the OBS saliency ``w^2 / [H^-1]_jj^2``; N:M masks are chosen per group of M
    columns as the solver reaches it, with the already-updated weights.

    When a column block's mask is known before it is solved (unstructured masks, and any ``fixed_keep_mask``), its
    OBS updates are batched triangular solves over the rows (``_obs_block_batched``; on the CPU a group of
    ``SOLVE_GROUP_COLUMNS`` columns at a time); N:M selection solves a group of M columns at a time
    (``_obs_block_nm_groups``). ``batched=False`` forces the column loop everywhere (the reference the tests compare
    against); ``None`` follows the module's ``BATCHED_SOLVE``. ``factor`` (from :func:`factor_hessian`) replaces
    ``hessian`` and ``dampening``: the engine factors each distinct Hessian once for the layers that share it.
    """
    if batched is None:
        batched = BATCHED_SOLVE
    W = weight.detach().to(torch.float32).clone()
    out_features, in_features = W.shape
    if factor is None:
        if hessian is None:
            raise ValueError("sparsegpt_prune needs a hessian or a factor")
        factor = factor_hessian(hessian, dampening, device=W.device)
    Hinv, used_damp, dead = factor.inverse_cholesky, factor.dampening, factor.dead
    keep = torch.ones_like(W, dtype=torch.bool)
    if fixed_keep_mask is not None:
        keep = fixed_keep_mask.to(W.device, torch.bool).clone()

    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        width = end - start
        W1 = W[:, start:end].clone()
        Hinv1 = Hinv[start:end, start:end]
        d = torch.diagonal(Hinv1)

        if fixed_keep_mask is None and nm is None:
            saliency = (W1.square() / d.square().unsqueeze(0)).masked_fill(dead[start:end], 0.0)
            flat_keep = prune_lowest(saliency.reshape(1, -1), int(sparsity * saliency.numel()))
            keep[:, start:end] = flat_keep.reshape(out_features, width)
        keep1 = keep[:, start:end]

        if not batched:
            choose_nm = nm if fixed_keep_mask is None else None
            Q1, Err1 = _obs_block_sequential(W1, keep1, Hinv1, choose_nm, dead[start:end])
        elif fixed_keep_mask is None and nm is not None:  # masks chosen group by group as the solver reaches them
            Q1, Err1 = _obs_block_nm_groups(W1, keep1, Hinv1, nm, dead[start:end])
        else:  # the block's mask is known before the block is solved: batched triangular solves
            Q1, Err1 = _obs_block_in_groups(W1, keep1, Hinv1, SOLVE_GROUP_COLUMNS.get(W.device.type, width))

        W[:, start:end] = Q1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]

    W.mul_(keep)
    return SparseGPTResult(weight=W, keep_mask=keep, dampening=used_damp)


#: rows of one batched triangular solve: bounds its [rows, width, width] float32 system to 256 MiB (4096 rows of
#: a 128-column block in one call)
_SOLVE_ELEMENTS = 1 << 26


def _obs_block_batched(W1: torch.Tensor, keep1: torch.Tensor, Hinv1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS updates of one column block with a fixed mask, for every row at once.

    Column ``i`` of the block, as the sequential loop reaches it, holds ``w_i - sum_{k<i} e_k U_ki`` (``U = Hinv1``,
    upper triangular); its error is ``e_i = p_i (w_i - sum_{k<i} e_k U_ki) / U_ii`` with ``p_i = 1`` where the weight
    is pruned. So the errors of a row solve the lower-triangular system ``(diag(U) + diag(p) S^T) e = p * w`` with
    ``S`` the strictly upper part of ``U``: one batched ``solve_triangular`` over the rows replaces ``width`` Python
    iterations of rank-1 updates (a few GPU kernels per block instead of a few per column). Returns the pruned and
    updated block ``Q1 = keep * (W1 - E S)`` and the errors ``E``, the same quantities as the sequential loop up to
    float rounding.
    """
    out_features, width = W1.shape
    pruned = (~keep1).to(W1.dtype)
    strict = torch.triu(Hinv1, diagonal=1)
    lower = strict.T.contiguous()
    diag = torch.diagonal(Hinv1)
    Err1 = torch.empty_like(W1)
    rows_per_chunk = max(1, _SOLVE_ELEMENTS // max(width * width, 1))
    for first in range(0, out_features, rows_per_chunk):
        rows = slice(first, min(first + rows_per_chunk, out_features))
        p = pruned[rows]
        system = lower.unsqueeze(0) * p.unsqueeze(2)  # row i of row r's system scaled by p_ri
        system.diagonal(dim1=-2, dim2=-1).copy_(diag.unsqueeze(0).expand(p.shape[0], width))
        rhs = (p * W1[rows]).unsqueeze(2)
        Err1[rows] = torch.linalg.solve_triangular(system, rhs, upper=False).squeeze(2)
    Q1 = (W1 - Err1 @ strict) * keep1
    return Q1, Err1


def _obs_block_in_groups(W1: torch.Tensor, keep1: torch.Tensor, Hinv1: torch.Tensor, group_width: int,
                         choose_keep: Optional[Callable[[torch.Tensor, slice], torch.Tensor]] = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS updates of one column block, ``group_width`` columns at a time.

    The column loop's updates of a group's columns depend only on the group's own columns and on the errors of the
    columns before it. So each group is: (with ``choose_keep``) choose its mask from the current weights, solve its
    columns with that mask fixed (``_obs_block_batched``), and apply its errors to the block's later columns in one
    rank-``group_width`` update: the loop's result up to float rounding. ``choose_keep(W_group, columns)`` returns the
    group's keep-mask; it is written into ``keep1`` (a view into the layer's mask).
    """
    width = W1.shape[1]
    if choose_keep is None and group_width >= width:
        return _obs_block_batched(W1, keep1, Hinv1)
    W1 = W1.clone()
    Q1 = torch.empty_like(W1)
    Err1 = torch.empty_like(W1)
    for first in range(0, width, group_width):
        group = slice(first, min(first + group_width, width))
        if choose_keep is not None:
            keep1[:, group] = choose_keep(W1[:, group], group)
        Q1[:, group], Err1[:, group] = _obs_block_batched(W1[:, group], keep1[:, group], Hinv1[group, group])
        if group.stop < width:
            W1[:, group.stop:] -= Err1[:, group] @ Hinv1[group, group.stop:]
    return Q1, Err1


def _obs_block_nm_groups(W1, keep1, Hinv1, nm, dead1) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M selection with the OBS updates of one column block, a group of M columns at a time.

    The column loop chooses a group's mask at the group's first column, from weights that every earlier column has
    updated, and the group's own columns only update each other after that choice: so the groups of
    ``_obs_block_in_groups`` with M columns each, the mask chosen per group, give the loop's result up to float
    rounding with M times fewer steps.
    """
    n, m = nm
    d = torch.diagonal(Hinv1)

    def choose_keep(weights: torch.Tensor, group: slice) -> torch.Tensor:
        saliency = (weights.square() / d[group].square().unsqueeze(0)).masked_fill(dead1[group], 0.0)
        return nm_mask(saliency, n, m)

    return _obs_block_in_groups(W1, keep1, Hinv1, m, choose_keep)


def _obs_block_sequential(W1, keep1, Hinv1, nm, dead1) -> tuple[torch.Tensor, torch.Tensor]:
    """The column-by-column OBS loop of SparseGPT; N:M masks are chosen per group of M columns as it goes, from the
    already-updated weights (which is why this case cannot be batched like ``_obs_block_batched``). ``keep1`` is a
    view into the layer's mask and is written; ``nm=None`` uses ``keep1`` as given (the reference for tests)."""
    width = W1.shape[1]
    W1 = W1.clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    d = torch.diagonal(Hinv1)
    for i in range(width):
        if nm is not None and i % nm[1] == 0:
            group = slice(i, i + nm[1])
            saliency = (W1[:, group].square() / d[group].square().unsqueeze(0)).masked_fill(dead1[group], 0.0)
            keep1[:, group] = nm_mask(saliency, *nm)
        w = W1[:, i]
        q = torch.where(keep1[:, i], w, torch.zeros_like(w))
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1
