#!/usr/bin/env python3
"""Checks scripts/reference_score.py against the PyTorch-computed rows shipped with the model.

    python3 scripts/check_reference.py [--model-dir DIR] [--tolerance 1e-4]

The model's reference.jsonl was computed with PyTorch + transformers, so agreement here shows the scorer's
tokenization and ONNX inference are a sound oracle for the Rust service's parity tests.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_score import Scorer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model-dir",
        default=os.environ.get("RERANKER_MODEL__DIR", os.path.join(REPO, "..", "shared", "models", "minilm-l6-ce")),
    )
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    ref_path = os.path.join(args.model_dir, "reference.jsonl")
    with open(ref_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    scorer = Scorer(args.model_dir)
    max_diff, failures = 0.0, []
    for i, row in enumerate(rows):
        logit, ids = scorer.score(row["query"], row["passage"], row["max_length"])
        diff = abs(logit - row["logit"])
        max_diff = max(max_diff, diff)
        if ids != row["input_ids"]:
            failures.append(f"row {i}: input_ids differ (got {len(ids)} tokens, want {len(row['input_ids'])})")
        if len(ids) != row["num_tokens"]:
            failures.append(f"row {i}: num_tokens {len(ids)} != {row['num_tokens']}")
        if diff > args.tolerance:
            failures.append(f"row {i}: logit {logit:.6f} vs {row['logit']:.6f} (diff {diff:.2e})")
    for msg in failures[:20]:
        print(msg, file=sys.stderr)
    print(f"{len(rows)} rows, max |logit diff| = {max_diff:.3e}, {len(failures)} failures")
    sys.exit(1 if failures or not rows else 0)


if __name__ == "__main__":
    main()
