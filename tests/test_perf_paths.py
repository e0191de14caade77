"""The fast paths give the numbers of the plain ones: batched SparseGPT solve, tensor-core Hessian accumulation,
prefetched BR mini-batches."""

from __future__ import annotations

import pytest
import torch

from hf_recon_prune.criteria import InputStatistics, sparsegpt_prune
from hf_recon_prune.criteria import sparsegpt as sparsegpt_module
from hf_recon_prune.criteria.statistics import gram_update_


def _problem(out_features=48, in_features=200, tokens=600, dead=(3, 77), seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, in_features, generator=generator) * torch.rand(in_features, generator=generator) * 2
    X[:, list(dead)] = 0.0
    W = torch.randn(out_features, in_features, generator=generator)
    return W, X, X.T @ X / tokens


def _output_error(W, X, result):
    return float(((result.weight - W) @ X.T).double().square().mean())


@pytest.mark.parametrize("case", ["unstructured", "fixed", "fixed_nm", "one_block", "nm_2_4", "nm_4_8", "nm_1_4"])
def test_batched_solve_matches_column_loop(case):
    W, X, H = _problem()
    kwargs = {"block_size": 64}
    if case.startswith("nm_"):  # masks chosen by the solver: groups of M columns against the column loop
        n, m = int(case.split("_")[1]), int(case.split("_")[2])
        kwargs["nm"] = (n, m)
        W, X, H = _problem(in_features=192)  # a multiple of every M here, and of the block size
    if case == "fixed":
        kwargs["fixed_keep_mask"] = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    elif case == "fixed_nm":
        scores = torch.rand(W.shape, generator=torch.Generator().manual_seed(2))
        from hf_recon_prune.criteria import nm_mask

        kwargs["fixed_keep_mask"] = nm_mask(scores, 2, 4)
        kwargs["nm"] = (2, 4)
    elif case == "one_block":
        kwargs["block_size"] = 256  # a single block wider than the layer
    loop = sparsegpt_prune(W, H, 0.5, batched=False, **kwargs)
    fast = sparsegpt_prune(W, H, 0.5, batched=True, **kwargs)
    assert torch.equal(loop.keep_mask, fast.keep_mask)
    assert loop.dampening == fast.dampening
    torch.testing.assert_close(fast.weight, loop.weight, rtol=1e-4, atol=1e-5)
    assert (fast.weight[~fast.keep_mask] == 0).all()
    assert _output_error(W, X, fast) == pytest.approx(_output_error(W, X, loop), rel=1e-4)


@pytest.mark.parametrize("group_columns", [None, 1, 7, 32, 64, 500])
@pytest.mark.parametrize("fixed", [False, True])
def test_solve_in_column_groups_matches_column_loop(monkeypatch, group_columns, fixed):
    """A column block solved in groups (7 leaves a partial last group; 1 is the loop's order; 500 and None are one
    solve a block) gives the column loop's masks and weights."""
    W, X, H = _problem(seed=5)
    kwargs = {"block_size": 64}
    if fixed:
        kwargs["fixed_keep_mask"] = torch.rand(W.shape, generator=torch.Generator().manual_seed(6)) > 0.5
    monkeypatch.setattr(sparsegpt_module, "SOLVE_GROUP_COLUMNS", {} if group_columns is None else {"cpu": group_columns})
    calls = []
    original = sparsegpt_module._obs_block_batched
    monkeypatch.setattr(sparsegpt_module, "_obs_block_batched", lambda *a: calls.append(a[0].shape[1]) or original(*a))
    loop = sparsegpt_prune(W, H, 0.5, batched=False, **kwargs)
    assert not calls
    grouped = sparsegpt_prune(W, H, 0.5, batched=True, **kwargs)
    widths = [64, 64, 64, 8]  # 200 columns in blocks of 64
    expected = [min(g, w) for w in widths for g in ([w] if group_columns is None or group_columns >= w else
                                                    [group_columns] * (w // group_columns) + [w % group_columns])
                if g]
    assert calls == expected
    assert torch.equal(loop.keep_mask, grouped.keep_mask)
    torch.testing.assert_close(grouped.weight, loop.weight, rtol=1e-4, atol=1e-5)
    assert (grouped.weight[~grouped.keep_mask] == 0).all()


def test_batched_solve_chunks_rows(monkeypatch):
    W, X, H = _problem(out_features=40)
    whole = sparsegpt_prune(W, H, 0.5, block_size=32, batched=True)
    monkeypatch.setattr(sparsegpt_module, "_SOLVE_ELEMENTS", 7 * 32 * 32)  # 7 rows per solve, last chunk partial
    chunked = sparsegpt_prune(W, H, 0.5, block_size=32, batched=True)
    assert torch.equal(whole.keep_mask, chunked.keep_mask)
    torch.testing.assert_close(chunked.weight, whole.weight, rtol=1e-5, atol=1e-6)


def test_batched_solve_matches_float64_reference():
    """Both solvers agree with the column loop run in float64 (up to float32 rounding)."""
    W, X, H = _problem(seed=3)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    fast = sparsegpt_prune(W, H, 0.5, block_size=64, fixed_keep_mask=keep, batched=True)
    Hd = H.double().clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    Hinv, _ = sparsegpt_module.inverse_hessian_cholesky(Hd, fast.dampening)
    Wd = W.double().clone()
    for start in range(0, W.shape[1], 64):
        end = min(start + 64, W.shape[1])
        Q1, E1 = sparsegpt_module._obs_block_sequential(Wd[:, start:end].clone(), keep[:, start:end].clone(),
                                                        Hinv[start:end, start:end], None, dead[start:end])
        Wd[:, start:end] = Q1
        Wd[:, end:] -= E1 @ Hinv[start:end, end:]
    torch.testing.assert_close(fast.weight.double(), Wd * keep, rtol=1e-4, atol=1e-5)


def test_default_follows_module_flag(monkeypatch):
    W, X, H = _problem()
    calls = []
    original = sparsegpt_module._obs_block_batched
    monkeypatch.setattr(sparsegpt_module, "_obs_block_batched", lambda *a: calls.append(1) or original(*a))
    sparsegpt_prune(W, H, 0.5, block_size=64)
    assert calls
    calls.clear()
    monkeypatch.setattr(sparsegpt_module, "BATCHED_SOLVE", False)
    sparsegpt_prune(W, H, 0.5, block_size=64)
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_update_matches_float64(dtype):
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    gram = torch.ones(24, 24)
    gram_update_(gram, x)
    reference = 1.0 + x.double().T @ x.double()
    torch.testing.assert_close(gram.double(), reference, rtol=1e-5, atol=1e-4)


def test_input_statistics_bf16_inputs_match_float32_inputs():
    x = torch.randn(4, 50, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    low, high = InputStatistics(32, torch.device("cpu"), True), InputStatistics(32, torch.device("cpu"), True)
    for part in x.split(2):
        low.add(part)
        high.add(part.float())
    assert low.num_tokens == high.num_tokens == 200
    torch.testing.assert_close(low.hessian, high.hessian)
    torch.testing.assert_close(low.squared_norms, high.squared_norms)


def _rows_cases():
    return [slice(3, 9), torch.tensor([9, 2, 2, 15, 0]), slice(12, 16)]


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_stream_rows_load_ahead_and_store_equal_plain_indexing(where, monkeypatch):
    """StreamRows on the CPU (plain copies) and, with CUDA, from a pinned stream with copies ahead on a side stream:
    every load is the rows asked for, whether or not they were the rows copied ahead, and stores land in order."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("the side-stream path needs CUDA")
    import hf_recon_prune.offload as offload
    from hf_recon_prune.offload import StreamRows

    monkeypatch.setattr(offload, "OVERLAP_COPIES", True)
    device = torch.device(where, 0) if where == "cuda" else torch.device("cpu")
    source = torch.randn(16, 5, 7).to(torch.bfloat16)
    out = torch.zeros(16, 5, 7, dtype=torch.float32)
    if where == "cuda":
        source, out = source.pin_memory(), out.pin_memory()
    transfers = StreamRows(device)
    cases = _rows_cases()
    for number, rows in enumerate(cases):
        ahead = cases[number + 1] if number + 1 < len(cases) else None
        if number == 1:
            ahead = torch.tensor([1, 1])  # copied ahead but never asked for: dropped
        loaded = transfers.load(source, rows, ahead)
        assert loaded.device.type == where and torch.equal(loaded.cpu(), source[rows])
        if isinstance(rows, slice):
            transfers.store(out, rows, (loaded.float() * 2).to(device))
    same = transfers.load(source, torch.tensor([4, 5]), torch.tensor([6]))
    again = transfers.load(source, torch.tensor([6]))  # equal values, another tensor: the copy made ahead is used
    assert torch.equal(same.cpu(), source[[4, 5]]) and torch.equal(again.cpu(), source[[6]])
    transfers.finish()
    expected = torch.zeros_like(out)
    expected[3:9] = source[3:9].float() * 2
    expected[12:16] = source[12:16].float() * 2
    assert torch.equal(out, expected)
