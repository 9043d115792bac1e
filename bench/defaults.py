"""The plain command as a new user runs it: `softprompt train --data sst2_train.jsonl --output run`, no other flag.

Builds the issue's files from ../shared/data/sst2 (never copied into the repo; written under --workdir): 8,000
seeded training rows as {"input": "Review: <sentence>\\nSentiment:", "output": " negative" | " positive"} and all
872 validation rows in the same form. Runs the CLI in a subprocess (its wall time is the user's wait, model
loading included), then scores all validation rows with `softprompt eval --prompt RUN --json`. Extra flags after
`--` go to `softprompt train` (paired comparisons: `-- --dtype float32`, `-- --no-chat`).

    python bench/defaults.py --name default                        # the issue's target run
    python bench/defaults.py --name fp32 -- --dtype float32        # the same draw in fp32
    python bench/defaults.py --smoke --model TINY_DIR              # seconds; what tests/test_bench_smoke.py runs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))


def write_rows(src: Path, dst: Path, n: int | None, seed: int) -> int:
    with src.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if n is not None:
        random.Random(seed).shuffle(rows)
        rows = rows[:n]
    with dst.open("w") as f:
        for r in rows:
            f.write(json.dumps({"input": f"Review: {r['sentence'].strip()}\nSentiment:",
                                "output": " negative" if r["label"] == "0" else " positive"}) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="default", help="run name (folder under --workdir)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "defaults"))
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0, help="seed of the training-row draw")
    p.add_argument("--model", help="passed to train and eval (default: the embedded model)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: 64 training rows, 32 validation rows, 3 steps")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sst2 = data_dir() / "sst2"
    train_file, val_file = work / "sst2_train.jsonl", work / "sst2_validation.jsonl"
    n_train = write_rows(sst2 / "train.tsv", train_file, 64 if args.smoke else args.rows, args.seed)
    n_val = write_rows(sst2 / "validation.tsv", val_file, 32 if args.smoke else None, 0)
    run = work / args.name
    model = ["--model", args.model] if args.model else []
    cmd = [sys.executable, "-m", "softprompt", "train", "--data", str(train_file), "--output", str(run),
           "--overwrite", "--no-progress", *model, *(["--steps", "3", "--batch-size", "8"] if args.smoke else []), *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode != 0:
        raise SystemExit(f"train failed ({done.returncode})")
    t1 = time.perf_counter()
    ev = subprocess.run([sys.executable, "-m", "softprompt", "eval", "--prompt", str(run), "--data", str(val_file),
                         "--json", *model], capture_output=True, text=True)
    if ev.returncode != 0:
        sys.stderr.write(ev.stderr[-3000:])
        raise SystemExit("eval failed")
    scores = json.loads(ev.stdout)
    meta = json.loads((run / "softprompt.json").read_text())
    result = {"name": args.name, "train_args": extra, "train_rows": n_train, "validation_rows": n_val,
              "train_wall_s": round(wall, 1), "eval_wall_s": round(time.perf_counter() - t1, 1),
              "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "loss": scores["loss"],
              "steps": meta["metrics"]["steps"], "run_length": meta["metrics"].get("run_length"),
              "precision": meta.get("precision"), "chat": meta["template"].get("chat"),
              "deep": meta["training"].get("deep"), "lr": meta["training"].get("lr"),
              "log_tail": done.stderr.strip().splitlines()[-6:]}
    (work / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
    return result


if __name__ == "__main__":
    main()
