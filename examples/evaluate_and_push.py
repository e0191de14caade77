"""Evaluate a pruned model and publish it on the Hugging Face Hub with a model card that carries the results.

    # offline: prune SmolLM2-135M-Instruct (magnitude, 50%), evaluate it, write the carded folder; no upload
    python examples/evaluate_and_push.py

    # a folder saved by hf-recon-prune, compared with its dense base model, then pushed
    python examples/evaluate_and_push.py --model out/llama2-7b-2of4 --dense-model meta-llama/Llama-2-7b-hf \
        --eval-source wikitext2 --eval-seq-len 2048 --repo-id you/llama2-7b-2of4

The card (README.md) gets a model-index entry with the measured perplexity, the sparsity, the PruningConfig,
the per-block reconstruction errors of the run (from prune_report.json) and the citation. Pushing needs a token:
HF_TOKEN, `hf auth login`, or --token.
"""

from __future__ import annotations

import argparse
import json
import os

from hf_recon_prune import Pruner, PruningConfig, perplexity
from hf_recon_prune.hub import REPORT_FILE, model_sparsity, push_folder_to_hub, save_already_pruned, save_pruned_model
from hf_recon_prune.models import load_model
from hf_recon_prune.report import PruneReport


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="folder of a pruned model (default: prune the offline SmolLM2-135M-Instruct first)")
    parser.add_argument("--dense-model", default=None, help="the dense base model, for the perplexity baseline")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model for the card's metadata")
    parser.add_argument("--eval-source", default="default")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--output", default="out/evaluated", help="folder for the model with its updated card")
    parser.add_argument("--repo-id", default=None, help="push to this Hub repo (namespace/name); no push without it")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the cached login")
    args = parser.parse_args(argv)

    def ppl(model, tokenizer):
        return perplexity(model, tokenizer, source=args.eval_source, split="test", seq_len=args.eval_seq_len,
                          max_windows=args.eval_windows, show_progress=True)

    if args.model is None:
        # Nothing to evaluate yet: prune the offline default (magnitude needs no statistics, so this is quick).
        model, tokenizer = load_model(None)
        dense = ppl(model, tokenizer)
        pruner = Pruner(model, PruningConfig(method="magnitude", sparsity=0.5, reconstruction=[],
                                             calibration="default", num_samples=8, seq_len=128), tokenizer=tokenizer)
        report = pruner.prune()
    else:
        dense = None
        if args.dense_model:
            dense_model, dense_tokenizer = load_model(args.dense_model)
            dense = ppl(dense_model, dense_tokenizer)
            del dense_model
        model, tokenizer = load_model(args.model)
        report_file = os.path.join(args.model, REPORT_FILE)
        report = None
        if os.path.isfile(report_file):
            with open(report_file, encoding="utf-8") as handle:
                report = PruneReport.from_dict(json.load(handle))

    pruned = ppl(model, tokenizer)
    sparsity = model_sparsity(model)["overall"]
    print(f"perplexity on {args.eval_source}: dense {dense if dense is None else round(dense, 3)} -> "
          f"pruned {pruned:.3f}; measured sparsity {sparsity:.4f}")

    if report is not None:
        report.perplexity[args.eval_source] = {"split": "test", "seq_len": args.eval_seq_len, "dense": dense,
                                               "pruned": pruned}
        folder = save_pruned_model(model, args.output, tokenizer=tokenizer, report=report,
                                   base_model=args.base_model, repo_id=args.repo_id)
    else:  # pruned by something else: the card describes the measured sparsity only
        folder = save_already_pruned(model, args.output, tokenizer=tokenizer, base_model=args.base_model,
                                     repo_id=args.repo_id)
    print(f"carded model in {folder} (model card: {os.path.join(folder, 'README.md')})")

    url = None
    if args.repo_id:
        url = push_folder_to_hub(folder, args.repo_id, private=args.private or None, token=args.token)
        print(f"pushed to {url}")
    else:
        print("not pushed: give --repo-id namespace/name to upload")
    return {"dense": dense, "pruned": pruned, "sparsity": sparsity, "folder": folder, "url": url}


if __name__ == "__main__":
    main()
