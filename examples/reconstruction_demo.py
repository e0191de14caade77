"""What reconstruction buys: SmolLM2-135M-Instruct pruned to 50 % with LR only and with LR + BR + GP, side by side.

    python examples/reconstruction_demo.py            # what `make demo` runs: offline, a few minutes on a 2-core CPU

Both recipes use SparseGPT masks and the same calibration windows from the default offline corpus (the Python
documentation topics); perplexity is measured on held-out windows of that corpus *and* on the standard library's
module docstrings, a source the calibration never saw (the paper's pitfall: reconstruction can fit the calibration
source). The LR + BR + GP model is saved with its model card, which records both perplexities.

The budget is small so that the demo runs on a laptop CPU in under six minutes: 24 windows of 128 tokens and 4 BR
epochs, perplexity on 8 windows of 512 tokens per source (the paper uses 256 x 1024 tokens and 10 epochs, see
docs/benchmarks.md for that on a GPU, and for what the demo's budget costs on two CPUs).
"""

from __future__ import annotations

import argparse
import copy
import time

from hf_recon_prune import Pruner, PruningConfig
from hf_recon_prune.calibration import load_texts, stream_windows_for_eval
from hf_recon_prune.calibration.sources import stdlib_docstrings
from hf_recon_prune.evaluation import perplexity_of_ids
from hf_recon_prune.models import load_model

RECIPES = {"LR": ["lr"], "LR + BR + GP": ["lr", "br", "gp"]}


def _learning_rate(value: str):
    return value if value == "auto" else float(value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--num-samples", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--br-lr", type=_learning_rate, default="auto", help="a number, or auto (the default)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows per evaluation text")
    parser.add_argument("--output", default="out/smollm2-sparse50")
    args = parser.parse_args(argv)

    dense, tokenizer = load_model(args.model)
    held_out = {
        "default corpus, held-out part": stream_windows_for_eval(load_texts("default", split="test"), tokenizer,
                                                                 args.eval_seq_len, max_windows=args.eval_windows),
        "stdlib docstrings (another source)": stream_windows_for_eval(stdlib_docstrings(), tokenizer,
                                                                      args.eval_seq_len, max_windows=args.eval_windows),
    }
    rows = {"dense": ({name: perplexity_of_ids(dense, ids) for name, ids in held_out.items()}, 0.0)}
    kept = None
    for label, reconstruction in RECIPES.items():
        model = copy.deepcopy(dense)
        config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=reconstruction, calibration="default",
                               num_samples=args.num_samples, seq_len=args.seq_len, br_epochs=args.epochs,
                               br_lr=args.br_lr, device="cpu")
        pruner = Pruner(model, config, tokenizer=tokenizer)
        started = time.perf_counter()
        pruner.prune()
        seconds = time.perf_counter() - started
        rows[label] = ({name: perplexity_of_ids(model, ids) for name, ids in held_out.items()}, seconds)
        for name, ids in held_out.items():
            pruner.record_perplexity(name, "test", args.eval_seq_len, rows["dense"][0][name], rows[label][0][name],
                                     windows=int(ids.shape[0]))
        kept = pruner
    print(_table(rows, held_out))
    folder = kept.save_pretrained(args.output)
    print(f"saved the {list(RECIPES)[-1]} model with its model card to {folder}")
    return {"folder": folder, "perplexity": {label: values for label, (values, _) in rows.items()}}


def _table(rows: dict, held_out: dict) -> str:
    names = list(held_out)
    lines = ["", "| model | " + " | ".join(f"perplexity: {n}" for n in names) + " | gap to dense closed | time (s) |",
             "|---|" + "---:|" * (len(names) + 2)]
    dense, lr = rows["dense"][0], rows["LR"][0]
    for label, (values, seconds) in rows.items():
        closed = ""
        if label not in ("dense", "LR"):
            closed = " / ".join(f"{(lr[n] - values[n]) / (lr[n] - dense[n]):.0%}" for n in names)
        cells = " | ".join(f"{values[n]:.2f}" for n in names)
        lines.append(f"| {label} | {cells} | {closed} | {seconds:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
