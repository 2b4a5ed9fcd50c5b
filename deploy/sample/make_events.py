#!/usr/bin/env python3
"""Writes deploy/sample/retrieval-events.txt, the input the compose stack's `producer` feeds.

One record per line as `KEY<TAB>JSON` (kafka-console-producer.sh with parse.key=true): the demo's
Jim Carrey event, SciFact retrieval results (top-K of a real first-stage retriever, from
../shared/data) and one malformed record that must land on the dead-letter topic. Committed, so
`docker compose up` needs nothing outside the repository; re-run to regenerate.

    python3 deploy/sample/make_events.py [--events 16] [--candidates 6]
"""
import argparse
import gzip
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCIFACT = os.path.join(ROOT, "..", "shared", "data", "scifact", "retrieval-top100.jsonl.gz")

# Same as src/tools/demo.rs jim_carrey_event(): a keyword retriever ranks the wrong film first.
JIM_CARREY = {
    "schema_version": 1,
    "request_id": "demo-jim-carrey",
    "query": "What is the Jim Carrey movie where he and his best friend go on a road trip to Aspen?",
    "top_n": 4,
    "candidates": [
        {"id": "ace-ventura", "text": "Ace Ventura: Pet Detective (1994): a pet detective searches for the stolen dolphin mascot of the Miami Dolphins.", "retriever_score": 0.81},
        {"id": "sonic", "text": "Sonic the Hedgehog (2020): Jim Carrey plays Dr. Robotnik, who hunts a fast blue alien hedgehog.", "retriever_score": 0.79},
        {"id": "dumb-and-dumber", "text": "Dumb and Dumber (1994): two dim-witted best friends drive across the country to Aspen to return a briefcase.", "retriever_score": 0.74},
        {"id": "bruce-almighty", "text": "Bruce Almighty (2003): a TV reporter is given God's powers for a week.", "retriever_score": 0.72},
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "retrieval-events.txt"))
    a = ap.parse_args()
    events = [JIM_CARREY]
    with gzip.open(SCIFACT, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= a.events:
                break
            row = json.loads(line)
            events.append({
                "schema_version": 1,
                "request_id": f"scifact-{row['query_id']}",
                "query": row["query"],
                "candidates": row["candidates"][: a.candidates],
                "top_n": 3,
            })
    with open(a.out, "w", encoding="utf-8") as out:
        for ev in events:
            # json.dumps escapes tabs and newlines inside strings, so the separator stays unique.
            out.write(f"{ev['request_id']}\t{json.dumps(ev, ensure_ascii=False)}\n")
        out.write('demo-broken\t{"schema_version": 1, "query": \n')


if __name__ == "__main__":
    main()
