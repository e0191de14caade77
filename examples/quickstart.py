"""Quickstart: prune a causal LM to 50% sparsity and save it with its model card, in a few lines.

    python examples/quickstart.py                  # SmolLM2-135M-Instruct, offline, about a minute on a laptop CPU
    python examples/quickstart.py --model Qwen/Qwen2.5-0.5B --calibration c4 --output qwen2.5-0.5b-sparse50

The saved folder loads with plain transformers: AutoModelForCausalLM.from_pretrained(folder).
"""

from __future__ import annotations

import argparse

from hf_recon_prune import Pruner, PruningConfig
from hf_recon_prune.models import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--calibration", default="default",
                        help="calibration text: default (offline corpus), c4, wikitext2, a dataset id or a local file")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default="out/quickstart-sparse50")
    args = parser.parse_args(argv)

    # load_model(None) is the offline SmolLM2; for any other id it is AutoModelForCausalLM/AutoTokenizer.from_pretrained.
    model, tokenizer = load_model(args.model)
    config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=["lr"], calibration=args.calibration,
                           num_samples=args.num_samples, seq_len=args.seq_len)
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune()
    folder = pruner.save_pretrained(args.output)

    print(report.summary())
    print(f"saved to {folder}")
    return folder


if __name__ == "__main__":
    main()
