"""Your own pruning criterion in a few lines: register a class with a ``scores`` method, then use its name.

    python examples/custom_criterion.py          # SmolLM2-135M-Instruct, offline, a minute or two on a laptop CPU

The criterion below keeps the weights whose magnitude is largest relative to their output row's mean magnitude
("row-relative magnitude"); any scores of the weight's shape work, higher meaning keep. The package turns them into
unstructured or N:M masks, runs LR and BR on top if asked, and names the criterion in the model card.
"""

from __future__ import annotations

import argparse

from hf_recon_prune import Pruner, PruningConfig, register_criterion
from hf_recon_prune.models import load_model


@register_criterion("row-relative-magnitude")
class RowRelativeMagnitude:
    """row-relative magnitude (|W| divided by the mean |W| of its output row)"""

    def scores(self, weight, statistics):
        magnitude = weight.detach().abs().float()
        return magnitude / magnitude.mean(dim=1, keepdim=True).clamp_min(1e-12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--calibration", default="default")
    parser.add_argument("--pattern", default="2:4", help="'unstructured' or N:M")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default="out/custom-criterion-2of4")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    config = PruningConfig(method="row-relative-magnitude", sparsity=0.5, pattern=args.pattern,
                           reconstruction=["lr"], calibration=args.calibration, num_samples=args.num_samples,
                           seq_len=args.seq_len)
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune()
    folder = pruner.save_pretrained(args.output)
    print(report.summary())
    print(f"saved to {folder}")
    return {"folder": folder, "report": report, "masks": pruner.masks}


if __name__ == "__main__":
    main()
