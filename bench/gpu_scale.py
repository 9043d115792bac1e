"""Scale check (issue 7): train a soft prompt on a big Llama-shaped frozen base through the FSDP code path.

Random weights (speed and memory do not depend on them), a tokenizer-free vocabulary ("t0 t1 ..." words, one
id each) so nothing is downloaded, and the real `softprompt.train` with `fsdp=True` and activation
checkpointing, launched by torchrun:

    torchrun --standalone --nproc_per_node 1 bench/gpu_scale.py --shape 8b --steps 200 --out results/
    python bench/gpu_scale.py --shape tiny --device cpu --steps 3 --out /tmp/scale   # smoke test on CPU

Writes scale.json: parameters, tokens/s, peak GPU memory, and model FLOP utilisation against the measured
bf16 matmul peak (6 x params x tokens per step: forward, recomputed forward, activation-gradient backward).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # Llama-3-style shapes
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "14b": dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8, vocab_size=128256),
}


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Special tokens must not be prefixes of words ("t1" would split "t10"), so they get their own names.
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    if device == "cpu":
        n, reps = 1024, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-fsdp", action="store_true")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "scale-results"))
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt import BaseModel, train
    from softprompt.distributed import init_world

    world, device = init_world(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = SHAPES[args.shape]
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=1, pad_token_id=2)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config)  # initialised on the device, in bf16: seconds, not minutes
    torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    base = BaseModel(model, word_tokenizer(shape["vocab_size"]), f"random-llama-{args.shape}")
    build_s = time.perf_counter() - t0

    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    rows = [{"text": " ".join(f"t{rng.randrange(3, shape['vocab_size'])}" for _ in range(args.seq_len))}
            for _ in range(args.batch_size * 4)]
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step, record):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(base=base, data=str(work / "rows.jsonl"), output=str(work / "run"), lm=True, output_template="{text}",
                   virtual_tokens=args.virtual_tokens, steps=args.steps, batch_size=args.batch_size, lr=0.03,
                   max_length=args.seq_len + 8, fsdp=not args.no_fsdp, activation_checkpointing=not args.no_checkpointing,
                   save_every=10**9, progress=False, on_step=tick)
    steady = sorted(times[min(5, len(times) - 1):])
    step_s = steady[len(steady) // 2]
    tokens_per_step = args.batch_size * (args.seq_len + args.virtual_tokens)
    tok_s = tokens_per_step / step_s * world.size
    peak = matmul_peak(device, dtype)
    flops_per_token = (6 if not args.no_checkpointing else 4) * params
    report = {
        "shape": args.shape, "parameters": params, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "processes": world.size, "fsdp": not args.no_fsdp, "activation_checkpointing": not args.no_checkpointing,
        "dtype": str(dtype), "batch_size": args.batch_size, "seq_len": args.seq_len, "virtual_tokens": args.virtual_tokens,
        "steps": result.metrics["steps"], "median_step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
        "matmul_peak_tflops": round(peak / 1e12, 1), "mfu": round(flops_per_token * tok_s / (peak * world.size), 4),
        "build_s": round(build_s, 1), "final_loss": result.metrics["final_train_loss"], "torch": torch.__version__,
    }
    if world.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"scale-{args.shape}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
