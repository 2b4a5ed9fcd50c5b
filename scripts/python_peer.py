#!/usr/bin/env python3
"""A plain Python reranker worker: the peer that `reranker bench --python-peer` measures against.

confluent-kafka consumer (its own group, from the beginning of the input topic), tokenizers and
onnxruntime; for each retrieval event: tokenize its (query, passage) pairs, sort them by length,
score them in batches of --batch padded to each batch's longest, and produce the top-N as JSON to
the output topic. Stops after --events events and prints one JSON line:
{"events", "pairs", "pairs_per_s", "cpu_us_per_pair", ...}.

pairs/s is the steady state, as `reranker bench` counts it: pairs produced after the first output
divided by the time from the first output to the last one (delivered).

  python3 scripts/python_peer.py --brokers HOST:PORT --input TOPIC --output TOPIC --model DIR --events N
"""
import argparse
import json
import resource
import sys
import time

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, KafkaError, Producer
from tokenizers import Tokenizer


def cpu_s():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", default=None, help="consumer group (default: python-peer-<time>)")
    ap.add_argument("--model", required=True, help="model dir: model.onnx + tokenizer.json")
    ap.add_argument("--model-file", default="model.onnx")
    ap.add_argument("--events", type=int, required=True, help="stop after this many events")
    ap.add_argument("--id-prefix", default="", help="only events whose request_id starts with this count")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--spinning", action="store_true", help="let ONNX Runtime's idle threads spin (its default)")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    a = ap.parse_args()

    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(max_length=a.max_length, strategy="longest_first")
    pad_id = 0
    so = ort.SessionOptions()
    if a.threads:
        so.intra_op_num_threads = a.threads
    # ONNX Runtime's default lets idle intra-op threads spin, which bills CPU without work; the
    # worker turns it off (model.allow_spinning), and the peer follows its setting.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if a.spinning else "0")
    sess = ort.InferenceSession(f"{a.model}/{a.model_file}", so, providers=["CPUExecutionProvider"])
    input_names = {i.name for i in sess.get_inputs()}

    consumer = Consumer({
        "bootstrap.servers": a.brokers,
        "group.id": a.group or f"python-peer-{int(time.time() * 1000)}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
    })
    producer = Producer({"bootstrap.servers": a.brokers, "linger.ms": 5})
    consumer.subscribe([a.input])

    delivered = {"n": 0, "err": None}

    def on_delivery(err, _msg):
        if err is not None:
            delivered["err"] = err
        delivered["n"] += 1

    def score(encs):
        """Scores encodings (one event's pairs) in length-sorted batches; returns logits in input order."""
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        logits = np.empty(len(encs), dtype=np.float32)
        for s in range(0, len(order), a.batch):
            idx = order[s:s + a.batch]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.full((len(idx), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            types = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                e = encs[i]
                n = len(e.ids)
                ids[r, :n] = e.ids
                mask[r, :n] = 1
                types[r, :n] = e.type_ids
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in input_names:
                feed["token_type_ids"] = types
            out = sess.run(["logits"], feed)[0]
            logits[idx] = out[:, 0]
        return logits

    events = pairs = 0
    first = None  # (time, cpu, pairs) at the first output
    start = None  # (time, cpu) at the first record
    deadline = time.monotonic() + a.timeout
    while events < a.events:
        if time.monotonic() > deadline:
            sys.exit(f"python peer: timed out after {a.timeout:.0f} s with {events} of {a.events} events")
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                continue
            sys.exit(f"python peer: consume error: {msg.error()}")
        if start is None:
            start = (time.monotonic(), cpu_s())
        ev = json.loads(msg.value())
        rid = ev.get("request_id", "")
        if not rid.startswith(a.id_prefix):
            continue
        query = ev["query"]
        cands = ev.get("candidates", [])
        encs = tok.encode_batch([(query, c["text"]) for c in cands]) if cands else []
        logits = score(encs) if encs else np.empty(0, dtype=np.float32)
        relevance = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        best = sorted(range(len(cands)), key=lambda i: -logits[i])[: int(ev.get("top_n", 10))]
        out = {
            "schema_version": 1,
            "request_id": rid,
            "query": query,
            "results": [
                {"id": cands[i]["id"], "score": float(relevance[i]), "logit": float(logits[i]), "rank": r + 1}
                for r, i in enumerate(best)
            ],
            "candidates": len(cands),
        }
        producer.produce(a.output, key=msg.key(), value=json.dumps(out).encode(), on_delivery=on_delivery)
        producer.poll(0)
        events += 1
        pairs += len(cands)
        if first is None:
            producer.flush(30)
            first = (time.monotonic(), cpu_s(), pairs)
    producer.flush(60)
    t_end, cpu_end = time.monotonic(), cpu_s()
    consumer.close()
    if delivered["err"] is not None:
        sys.exit(f"python peer: produce error: {delivered['err']}")
    if first is None:
        sys.exit("python peer: --events 0: nothing to measure")
    t1, c1, p1 = first
    steady = pairs - p1
    wall = t_end - t1
    if steady == 0 or wall <= 0:  # one event: from its arrival instead
        (t1, c1), steady = start, pairs
        wall = t_end - t1
    print(json.dumps({
        "events": events,
        "pairs": pairs,
        "pairs_per_s": steady / max(wall, 1e-9),
        "cpu_us_per_pair": (cpu_end - c1) * 1e6 / max(steady, 1),
        "steady_pairs": steady,
        "steady_s": wall,
        "delivered": delivered["n"],
    }))


if __name__ == "__main__":
    main()
