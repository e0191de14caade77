"""SparseGPT + block-wise reconstruction with global propagation (LR + BR + GP) on a Llama, the recipe of
Shin et al. (EMNLP 2024), with perplexity before and after and the per-block reconstruction error.

    # offline, on a CPU: SmolLM2-135M-Instruct (a Llama) with small settings, a few minutes
    python examples/sparsegpt_br_gp_llama.py

    # the paper's setting, on a GPU (256 x 1024 tokens of C4, 10 epochs of BR, 2:4 or 50% unstructured)
    python examples/sparsegpt_br_gp_llama.py --model meta-llama/Llama-2-7b-hf --calibration c4 \
        --num-samples 256 --seq-len 1024 --br-epochs 10 --eval-source wikitext2 --eval-seq-len 2048 --pattern 2:4

Add --cross-block for CR (windows of two adjacent blocks, sliding by one, with a single block at both ends as in
the authors' code).
"""

from __future__ import annotations

import argparse

from hf_recon_prune import Pruner, PruningConfig, evaluate
from hf_recon_prune.config import parse_nm
from hf_recon_prune.models import load_model


def _learning_rate(value: str):
    return value if value == "auto" else float(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4")
    parser.add_argument("--cross-block", action="store_true", help="add CR: train windows of two adjacent blocks")
    parser.add_argument("--calibration", default="default")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--br-epochs", type=int, default=2)
    parser.add_argument("--br-lr", type=_learning_rate, default="auto", help="a number, or auto (the default)")
    parser.add_argument("--eval-source", default="default")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32, help="score at most this many windows")
    parser.add_argument("--output", default="out/sparsegpt-br-gp")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    if model.config.model_type != "llama":
        print(f"note: {model.config.model_type} is not a Llama; the recipe works on every supported family anyway")

    nm = parse_nm(args.pattern)
    sparsity = 1.0 - nm[0] / nm[1] if nm else args.sparsity  # an N:M pattern fixes the sparsity
    reconstruction = ["lr", "br", "gp"] + (["cr"] if args.cross_block else [])
    config = PruningConfig(
        method="sparsegpt", sparsity=sparsity, pattern=args.pattern, reconstruction=reconstruction,
        calibration=args.calibration, num_samples=args.num_samples, seq_len=args.seq_len,
        br_epochs=args.br_epochs, br_lr=args.br_lr,
    )

    def measure():  # perplexity on the first --eval-windows windows; the results say how many were scored
        return evaluate(model, tokenizer, perplexity=args.eval_source, split="test", seq_len=args.eval_seq_len,
                        max_windows=args.eval_windows, measure_sparsity=False, show_progress=True)

    dense_results = measure()
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune()
    pruned_results = measure()
    report.record_evaluation(dense_results, role="dense")  # both reach the model card, protocol included
    report.record_evaluation(pruned_results)
    folder = pruner.save_pretrained(args.output)
    (dense,) = [entry["value"] for entry in dense_results.perplexity.values()]
    (pruned,) = [entry["value"] for entry in pruned_results.perplexity.values()]

    # Per block: error after LR ("before") and after BR, on calibration windows and on held-out windows that
    # neither the masks nor the optimiser saw. A held-out error that stops falling while the calibration error
    # falls is the overfitting that self-generated calibration data counters (see self_generated_calibration.py).
    print(report.to_markdown())
    print(f"\nperplexity on {args.eval_source}: dense {dense:.3f} -> pruned {pruned:.3f}")
    print(f"saved to {folder}")
    return {"dense": dense, "pruned": pruned, "report": report, "folder": folder}


if __name__ == "__main__":
    main()
