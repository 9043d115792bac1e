"""GPU training speed (issue 6): softprompt vs PEFT PromptTuning on a Llama-shaped model with random weights.

Nothing is downloaded and no tokenizer file is needed: the model is built from a LlamaConfig (random weights:
speed does not depend on them) and the data are random token ids written as words "t12 t907 ..." that a
word-level tokenizer maps one to one. Uses the same side-by-side machinery as bench/speed.py (one step of
each configuration in turn; tokens/s, peak memory, MFU against the measured matmul peak).

    python bench/gpu_speed.py --shape 1b --out results/1b            # on a CUDA machine (PYTHONPATH=src)
    python bench/gpu_speed.py --device cpu --tiny --out /tmp/gpu     # smoke test of the same code on CPU
    python bench/gpu_speed.py --device cpu --shape 1b-narrow --configs softprompt-plain,peft-fp32   # op counts

Workloads: `cls` (rows of 32-128 tokens, a one-token answer + EOS scored: classification-style) and `lm`
(rows of 256-512 tokens, every token scored: language modelling). Writes OUT/gpu_speed.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from types import SimpleNamespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (bench/speed.py: Stepper, steppers, peaks, report)

SHAPES = {  # Llama-3-style shapes (vocab 128256; the 1b/3b tie embeddings like Llama-3.2)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # The 1b's depth at a width where compute is negligible: per-step op counts and dispatch cost on any device.
    "1b-narrow": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=16, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=None, eos_token_id=1,
                         pad_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval().requires_grad_(False)
    return model


def rows_for(workload: str, n: int, vocab: int, tiny: bool, seed: int = 0) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(k))  # noqa: E731
    if workload == "cls":
        lo, hi = (8, 24) if tiny else (32, 128)
        rows = [{"input": words(rng.randint(lo, hi)), "output": words(1)} for _ in range(n)]
        return rows, dict(input_template="{input}", output_template=" {output}")
    lo, hi = (16, 48) if tiny else (256, 512)
    return [{"text": words(rng.randint(lo, hi))} for _ in range(n)], dict(lm=True, output_template="{text}")


# Operators that only make views, allocate or query: not counted as a step's work.
NOT_COMPUTE = {f"aten::{n}" for n in ("view", "as_strided", "reshape", "expand", "slice", "select", "transpose", "t",
                                      "unsqueeze", "squeeze", "permute", "detach", "_unsafe_view", "alias", "empty",
                                      "empty_strided", "empty_like", "lift_fresh", "resolve_conj", "resolve_neg",
                                      "contiguous", "result_type", "item", "_local_scalar_dense", "to", "is_nonzero")}


def direct_phase(base, work, args, device: torch.device, out: Path) -> list[dict]:
    """No threads, no training loop: the bare step (inject, loss, backward) timed in a plain loop, for our path
    (shared prefix auto / on / off) and for the HF full-logits forward PEFT does (prompt concatenated, logits for
    every position, HF's loss), on the same model and the same length-sorted batches. Separates the cost of
    the path from the cost of loops and harness; counts each path's operators per step; a profile of our
    step goes to OUT/profile-<workload>.txt."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    from softprompt.data import collate, epoch_batches

    pad = base.tokenizer.pad_token_id
    batches = epoch_batches([len(e.input_ids) for e in work.encoded], args.batch_size, seed=1, epoch=0)
    batches = [collate([work.encoded[i] for i in b], pad) for b in batches[: args.warmup + args.steps]]
    prompt = (torch.randn(args.virtual_tokens, base.hidden_size, device=device) * 0.02).requires_grad_(True)

    def ours(t):
        nll, _ = base.sequence_nll(base.prepend_prompts(t["input_ids"], t["attention_mask"], prompt, t["labels"]))
        nll.sum().backward()

    def full_logits(t):
        ids, mask, labels = (t[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        embeds = torch.cat([prompt.to(base.dtype).expand(ids.shape[0], -1, -1), base.model.get_input_embeddings()(ids)], 1)
        mask = torch.cat([mask.new_ones(ids.shape[0], args.virtual_tokens), mask], 1)
        labels = torch.cat([labels.new_full((ids.shape[0], args.virtual_tokens), -100), labels], 1)
        base.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def profiled(fn, steps):
        with profile(activities=activities) as prof:
            for t in steps:
                fn(t)
                speed.sync(device)
                prompt.grad = None
        return prof.key_averages()

    def ops_per_step(fn, t) -> dict[str, int]:
        """Operators one step dispatches (views and allocations not counted), and on CUDA the kernels it
        launches: what a launch-bound step's fixed cost scales with."""
        events = profiled(fn, [t])
        ops = sum(e.count for e in events if e.key.startswith("aten::") and e.key not in NOT_COMPUTE)
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return {"ops_per_step": ops, **({"kernels_per_step": kernels} if device.type == "cuda" else {})}

    rows = []
    saved = base.shared_prefix
    variants = [("ours (auto)", None, ours), ("ours shared", True, ours), ("ours plain", False, ours),
                ("hf full logits (PEFT's computation)", None, full_logits)]
    for name, flag, fn in variants:
        base.shared_prefix = flag
        times, tokens = [], 0
        for i, t in enumerate(batches):
            speed.sync(device)
            t0 = time.perf_counter()
            fn(t)
            speed.sync(device)
            prompt.grad = None
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                tokens += int(t["attention_mask"].sum())
        rows.append({"name": name, "dataset": work.name, "tokens_per_s": tokens / sum(times),
                     "median_step_s": statistics.median(times), **ops_per_step(fn, batches[-1])})
        print(f"  direct {name:38s} {rows[-1]['tokens_per_s']:10.0f} tok/s  median step {rows[-1]['median_step_s']:.4f}s"
              f"  {rows[-1]['ops_per_step']} ops", flush=True)
    base.shared_prefix = saved
    if args.profile:
        table = profiled(ours, batches[-2:])
        text = [f"ours (auto), 2 steps of {work.name}\n"]
        if device.type == "cuda":
            text.append(table.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
        text.append(table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        (out / f"profile-{work.name}.txt").write_text("\n".join(text))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="tiny shape, short rows, few steps (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workloads", default="cls,lm")
    ap.add_argument("--configs", default="softprompt,softprompt-shared,peft-bf16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--memory-steps", type=int, default=1)
    ap.add_argument("--no-direct", dest="direct", action="store_false",
                    help="skip the bare-step timing (no threads, no loop) of our path vs HF's full-logits forward")
    ap.add_argument("--profile", action="store_true", help="profile two bare steps of our path (OUT/profile-*.txt)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_speed"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.rows, args.steps, args.warmup, args.batch_size = "tiny", 128, 2, 1, 8
    args.tiny_data = args.tiny
    device = torch.device(args.device)  # (no single malloc arena: on CPU it made bf16 steps 2x slower, see speed.py)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (PEFT's default Trainer run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"machine": speed.machine_info(device), "args": vars(args), "shape": SHAPES[args.shape], "runs": []}
    print(f"machine: {report['machine']}", flush=True)
    peaks: dict[str, float] = {}
    speed.measure_peaks(device, peaks, report, seconds=0.2 if args.tiny else 1.0)

    from softprompt import BaseModel
    from softprompt.data import Encoder, Template
    from softprompt.model import pick_dtype

    vocab = SHAPES[args.shape]["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bases: dict = {}
    n_params, hidden, _ = speed.non_embedding_params(build_model(args.shape, torch.device("meta"), torch.float32))
    report["params_non_embedding"] = n_params
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for wl in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            rows, template = rows_for(wl, args.rows, vocab, args.tiny)
            data_file = tmp / f"{wl}.jsonl"
            data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tpl = Template(input="" if template.get("lm") else template["input_template"],
                           output=template["output_template"])
            encoded = Encoder(tokenizer, tpl, max_length=args.max_length, score_first=True).encode_rows(rows, wl)
            work = speed.Workload(wl, data_file, template, encoded)
            steppers = []
            for name in configs:
                if name.startswith("softprompt"):
                    dtype, _ = pick_dtype({"softprompt-bf16": "bfloat16", "softprompt-fp32": "float32"}.get(name, "auto"),
                                          device, SimpleNamespace(**SHAPES[args.shape]))
                    if dtype not in bases:
                        bases[dtype] = BaseModel(build_model(args.shape, device, dtype), tokenizer, f"random-{args.shape}")
                    steppers.append(speed.softprompt_stepper(name, bases[dtype], work, args, tmp,
                                                             shared_prefix=speed.shared_prefix_for(name)))
                elif name in ("peft-bf16", "peft-fp32", "peft-amp"):
                    # peft-bf16: bf16 weights + Trainer(bf16=True); peft-amp: fp32 weights + autocast; peft-fp32: plain
                    dtype = torch.bfloat16 if name == "peft-bf16" else torch.float32
                    steppers.append(speed.peft_stepper(name, build_model(args.shape, device, dtype), tokenizer, work,
                                                       args, tmp, bf16=name != "peft-fp32"))
                else:
                    raise SystemExit(f"unknown config {name!r}")
            print(f"{wl}: {len(encoded)} rows, mean {sum(len(e.input_ids) for e in encoded) / len(encoded):.0f} tokens",
                  flush=True)
            samples = speed.measure(steppers, args, device)
            for s in steppers:
                row = speed.summarise(s.name, wl, samples[s.name], s, 4 * n_params, 4 * hidden * vocab, peaks)
                if device.type == "cuda":
                    row["weights_mib"] = s.weights_bytes / 2**20
                report["runs"].append(row)
                print(f"  {s.name:17s} {row['tokens_per_s']:10.0f} tok/s  MFU {100 * row['mfu_vs_bf16_peak']:.0f}% "
                      f"of bf16 peak  step peak {row['step_peak_mib'] or float('nan'):.0f} MiB", flush=True)
            if args.direct and bases:
                base = next(iter(bases.values()))
                report.setdefault("direct", []).extend(direct_phase(base, work, args, device, out))
            for s in steppers:  # free PEFT copies before the next workload
                s.run = None
            del steppers, samples
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            (out / "gpu_speed.json").write_text(json.dumps(report, indent=2, default=str))  # partial results survive a timeout
    report["wall_s"] = time.perf_counter() - started
    (out / "gpu_speed.json").write_text(json.dumps(report, indent=2, default=str))
    direct = "".join(f"| {r['dataset']} | {r['name']} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.4f} | "
                     f"{r['ops_per_step']} | {r.get('kernels_per_step', '-')} |\n" for r in report.get("direct", []))
    if direct:
        direct = ("\nBare steps (no threads, no training loop; same model, same length-sorted batches):\n\n"
                  "| dataset | path | tokens/s | median step s | ops / step | CUDA kernels / step |\n"
                  "|---|---|---:|---:|---:|---:|\n" + direct)
    (out / "gpu_speed.md").write_text(f"Shape {args.shape}: {n_params / 1e9:.2f} B non-embedding params, "
                                      f"batch {args.batch_size}, {args.virtual_tokens} virtual tokens.\n\n"
                                      + speed.markdown(report) + direct)
    print((out / "gpu_speed.md").read_text())
    print(f"wrote {out / 'gpu_speed.json'} in {report['wall_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
