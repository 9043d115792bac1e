"""Rank classification with multi-token labels: one pass over each input (labels behind its cached keys/values)
against one pass per (input, label) pair, side by side on the same rows, same model, same process.

    python bench/label_scoring.py                      # embedded SmolLM2-135M, 256 SST-2 rows, 4 labels
    python bench/label_scoring.py --model TINY --rows 16   # smoke

Labels are deliberately several tokens (" very negative", " negative", " positive", " very positive") so that
the pair path runs every input four times. Prints seconds for each path, the ratio, and the largest difference
between the two score tables (they compute the same log-likelihoods).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from softprompt import load_model  # noqa: E402
from softprompt.data import Template  # noqa: E402
from softprompt.evaluate import label_scores, prepare  # noqa: E402
from softprompt.scoring import pair_label_scores  # noqa: E402

LABELS = {"0": "negative", "1": "positive"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data", default=os.environ.get("SOFTPROMPT_DATA", str(ROOT.parent / "shared" / "data")))
    args = ap.parse_args(argv)
    with open(Path(args.data) / "sst2" / "validation.tsv", newline="") as f:
        raw = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: args.rows]
    # Four answers of one to three tokens each; every row's gold is one of them.
    words = [" very negative", " negative", " positive", " very positive"]
    rows = [{"input": f"Review: {r['sentence'].strip()}\nSentiment:", "output": words[1 + int(r["label"])]} for r in raw]
    base = load_model(args.model, dtype=args.dtype)
    template = Template(input="{input}", output="{output}")
    evalset = prepare(base, template, rows, labels=words, task="classification")
    warm = prepare(base, template, rows[:args.batch_size], labels=words, task="classification")
    label_scores(base, None, warm, batch_size=args.batch_size)  # one-off costs (kernel selection) paid by neither
    pair_label_scores(base, None, warm, args.batch_size, False)
    t0 = time.perf_counter()
    one_pass = label_scores(base, None, evalset, batch_size=args.batch_size)
    t1 = time.perf_counter()
    pairs = pair_label_scores(base, None, evalset, args.batch_size, False)
    t2 = time.perf_counter()
    result = {"rows": len(rows), "label_tokens": [len(ids) for ids in evalset.label_ids], "dtype": str(base.dtype),
              "one_pass_s": round(t1 - t0, 2), "pairs_s": round(t2 - t1, 2), "speedup": round((t2 - t1) / (t1 - t0), 2),
              "max_abs_diff": float((one_pass - pairs).abs().max()),
              "same_predictions": bool((one_pass.argmax(1) == pairs.argmax(1)).all())}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
