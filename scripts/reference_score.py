#!/usr/bin/env python3
"""Independent reference scorer for parity tests of the Rust service.

    python3 scripts/reference_score.py --model-dir DIR --max-length N < pairs.jsonl > scores.jsonl

Input lines {"query": str, "passage": str}; output lines {"logit": float, "num_tokens": int} in the same order
(plus "input_ids" with --with-input-ids). Each pair is scored alone, unpadded, on one thread, so the result
depends on nothing but the pair: no padding, batching or thread-count effects can hide a bug in the service.
"""
import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Scorer:
    def __init__(self, model_dir, label_index=0):
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        # tokenizer.json carries its own padding/truncation settings; never inherit them.
        self.tokenizer.no_padding()
        self.max_length = None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.label_index = label_index

    def encode(self, query, passage, max_length):
        if max_length != self.max_length:
            self.tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
            self.max_length = max_length
        return self.tokenizer.encode(query, passage)

    def score(self, query, passage, max_length):
        """Returns (logit, input_ids)."""
        enc = self.encode(query, passage, max_length)
        feeds = {
            "input_ids": np.array([enc.ids], dtype=np.int64),
            "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
        }
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.array([enc.type_ids], dtype=np.int64)
        (logits,) = self.session.run([self.output_name], feeds)
        return float(logits[0][self.label_index]), list(enc.ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--label-index", type=int, default=0, help="logit column for multi-label heads (default 0)")
    ap.add_argument("--with-input-ids", action="store_true", help="also emit the token ids")
    args = ap.parse_args()

    scorer = Scorer(args.model_dir, args.label_index)
    for line in sys.stdin:
        if not line.strip():
            continue
        pair = json.loads(line)
        logit, ids = scorer.score(pair["query"], pair["passage"], args.max_length)
        out = {"logit": logit, "num_tokens": len(ids)}
        if args.with_input_ids:
            out["input_ids"] = ids
        sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
