"""Prune a model that does not fit in memory: load it with a device map under a memory limit (Accelerate puts what
does not fit on the CPU or on disk), and let the Pruner bring one block at a time to the execution device.

    # offline demo: SmolLM2-135M-Instruct with a CPU budget so small that most blocks live on disk
    python examples/offload_memory_limit.py --max-cpu-memory 200MB

    # a 70B model on one 80 GB GPU: blocks come to the GPU one at a time, the rest waits in CPU RAM / on disk
    python examples/offload_memory_limit.py --model meta-llama/Llama-2-70b-hf --max-gpu-memory 20GiB \
        --max-cpu-memory 200GiB --calibration c4 --num-samples 128 --seq-len 2048

Only the block being pruned (and the calibration activations, --stream-location) needs device memory, so the
budget here is for the weights that stay resident between turns.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_recon_prune import Pruner, PruningConfig


def default_model_folder() -> str:
    """The offline SmolLM2 as a plain safetensors folder (converted from the packaged GGUF on first use)."""
    from hf_recon_prune.models import default_cache_dir, load_default_model

    # The conversion loads the whole (small) model once; later runs read the folder directly with a device map.
    if not os.path.isfile(os.path.join(default_cache_dir(), "model.safetensors")):
        load_default_model()
    return default_cache_dir()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--max-gpu-memory", default="4GiB", help="budget on GPU 0 for resident weights (if a GPU)")
    parser.add_argument("--max-cpu-memory", default="200MB", help="budget in CPU RAM; the rest is offloaded to disk")
    parser.add_argument("--offload-folder", default="out/offload", help="where weights offloaded to disk are kept")
    parser.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--calibration", default="default")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default="out/offloaded-sparse50")
    args = parser.parse_args(argv)

    path = args.model or default_model_folder()
    max_memory = {"cpu": args.max_cpu_memory}
    if torch.cuda.is_available():
        max_memory = {0: args.max_gpu_memory, **max_memory}
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto", max_memory=max_memory,
                                                 offload_folder=args.offload_folder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    placement = sorted({str(where) for where in model.hf_device_map.values()})
    print(f"loaded with device map over {placement}: {model.hf_device_map}")

    config = PruningConfig(method=args.method, sparsity=0.5, reconstruction=["lr"], calibration=args.calibration,
                           num_samples=args.num_samples, seq_len=args.seq_len,
                           device="cuda:0" if torch.cuda.is_available() else "cpu")
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune()
    folder = pruner.save_pretrained(args.output)
    print(report.summary())
    print(f"saved to {folder}")
    return {"device_map": dict(model.hf_device_map), "report": report, "folder": folder}


if __name__ == "__main__":
    main()
