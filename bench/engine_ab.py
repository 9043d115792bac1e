"""In-process A/B of the decoding engine's passes, alternating in one process (this machine's speed drifts by
+-25 % within minutes, so only side-by-side numbers mean anything). The embedded model and the 8 prompts of
`bench/serve.py` (made under --out if missing); requests as bench/serve.py sends them.

    python bench/engine_ab.py prefill   # newcomers prefilled into a running batch of 32: HF forward vs written out
    python bench/engine_ab.py clients   # 32 in-process clients, 288 requests, the scheduler's own loop (no HTTP):
                                        # tokens/s with --prefill-wait-steps 4 (the default) and 0
    python bench/engine_ab.py joint     # 32 in-process clients, 288 requests (steady state): newcomers joined to
                                        # the decode step's pass (the engine's way) against a prefill pass of
                                        # their own before it
    python bench/engine_ab.py draft     # would prompt-lookup speculative decoding pay here? Tokens a forward would
                                        # yield on the bench's greedy outputs, against what a forward of W tokens
                                        # per row costs
    python bench/engine_ab.py where     # where a steady-state run's time goes (288 requests, 32 clients): the
                                        # engine's passes and bookkeeping timed, rows busy per decode step
    python bench/engine_ab.py newcomer  # what joining costs: a decode step of ~30 running rows alone against the
                                        # same step with 1 or 4 newcomers of 1 or 15 input tokens, alternating
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import MAX_TOKENS, make_prompts, request_for  # noqa: E402

from softprompt import SoftPrompt, load_model  # noqa: E402
from softprompt.engine import Engine, PromptEntry, Sequence  # noqa: E402
from softprompt.model.fast_forward import NewTokens, fast_forward  # noqa: E402
from softprompt.sampling import SamplingParams  # noqa: E402
from softprompt.scheduler import Scheduler  # noqa: E402


def greedy_requests(base, entries, n: int, first: int = 0, max_tokens: int = MAX_TOKENS) -> list[Sequence]:
    """Requests first..first+n-1 as bench/serve.py sends them, greedy."""
    return [Sequence(base.tokenizer(t).input_ids, SamplingParams(max_tokens=max_tokens, temperature=0), entries[p])
            for p, t in (request_for(i) for i in range(first, first + n))]


def prefill_ab(base, entries, rounds: int) -> None:
    def seqs(n, first):
        return greedy_requests(base, entries, n, first, max_tokens=10**6)

    fast, times = fast_forward(base.model), {}
    with torch.inference_mode():
        for r in range(rounds):
            for n in (32, 8, 2):
                for mode in ("hf", "written out") if r % 2 == 0 else ("written out", "hf"):
                    base._cache["fast_forward"] = fast if mode == "written out" else None
                    engine = Engine(base)
                    engine.add(seqs(32, 100))  # a running batch, as in serving
                    t = time.perf_counter()
                    engine.add(seqs(n, r * 7))
                    times.setdefault((n, mode), []).append(1000 * (time.perf_counter() - t))
    base._cache["fast_forward"] = fast
    for (n, mode), ms in sorted(times.items()):
        print(f"prefill of {n:2d} rows, {mode:11s}: median {statistics.median(ms):6.1f} ms  ({', '.join(f'{x:.0f}' for x in ms)})")


def clients(base, entries, wait: int, n_requests: int = 96, concurrency: int = 32) -> float:
    """The scheduler's own loop on this thread, `concurrency` client threads each submitting its next request when
    the last one finished: generated tokens/s."""
    sched = Scheduler(base, max_running=32, prefill_wait_steps=wait, autostart=False)
    todo, lock, tokens, done, left = iter(range(n_requests)), threading.Lock(), [0], threading.Event(), [n_requests]

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            prompt, text = request_for(i)
            finished = threading.Event()

            def sink(event):
                if event.kind == "finish":
                    tokens[0] += event.completion_tokens
                    finished.set()
            sched.submit(Sequence(base.tokenizer(text).input_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                  entries[prompt], sink, stream=False))
            finished.wait()
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    start = time.perf_counter()
    for _ in range(concurrency):
        threading.Thread(target=client, daemon=True).start()
    sched.run_forever(alive=lambda: not done.is_set())
    return tokens[0] / (time.perf_counter() - start)


def clients_ab(base, entries, rounds: int) -> None:
    clients(base, entries, 0, 16, 8)  # warm-up
    rates: dict = {4: [], 0: []}
    for r in range(rounds):
        for wait in (4, 0) if r % 2 == 0 else (0, 4):
            rates[wait].append(clients(base, entries, wait, 288))  # steady state: the tail a small part
        print(f"round {r}: " + ", ".join(f"wait {w}: {v[-1]:.1f} tok/s" for w, v in rates.items()), flush=True)
    for wait, v in rates.items():
        print(f"--prefill-wait-steps {wait}: median {statistics.median(v):.1f} tok/s")


def joint_ab(base, entries, rounds: int) -> None:
    joint = Engine.step

    def apart(self, newcomers=()):
        if newcomers:
            self.add(newcomers)
        self.decode()

    clients(base, entries, 4, 16, 8)  # warm-up
    rates: dict = {"joint": [], "apart": []}
    try:
        for r in range(rounds):
            for mode in ("joint", "apart") if r % 2 == 0 else ("apart", "joint"):
                Engine.step = joint if mode == "joint" else apart
                rates[mode].append(clients(base, entries, 4, 288))
            print(f"round {r}: joint {rates['joint'][-1]:.1f}, apart {rates['apart'][-1]:.1f} tok/s, "
                  f"ratio {rates['joint'][-1] / rates['apart'][-1]:.3f}", flush=True)
    finally:
        Engine.step = joint
    ratios = [a / b for a, b in zip(rates["joint"], rates["apart"])]
    print(f"joint / apart: median ratio {statistics.median(ratios):.3f} ({', '.join(f'{x:.2f}' for x in ratios)})")


def lookup_yield(seqs, k: int, n_max: int = 3) -> tuple[float, float]:
    """Prompt-lookup drafting replayed on finished greedy sequences: each step drafts the k tokens that followed the
    latest earlier occurrence of the context's last n tokens (n = n_max..1), a forward checks them, and the row
    gains the agreeing prefix plus one token. Returns (tokens per forward, share of forwards with a draft)."""
    forwards = tokens = drafted = 0
    for s in seqs:
        gen = s.generated
        if not gen:
            continue
        ctx, i = list(s.input_ids) + gen[:1], 1  # the first token comes from the prefill
        while i < len(gen):
            draft = []
            for n in range(min(n_max, len(ctx) - 1), 0, -1):
                tail = ctx[-n:]
                j = next((j for j in range(len(ctx) - n - 1, -1, -1) if ctx[j:j + n] == tail), None)
                if j is not None:
                    draft = ctx[j + n:j + n + k]
                    break
            agree = 0
            while agree < len(draft) and i + agree < len(gen) and draft[agree] == gen[i + agree]:
                agree += 1
            gain = min(agree + 1, len(gen) - i)
            ctx += gen[i:i + gain]
            i, tokens, forwards, drafted = i + gain, tokens + gain, forwards + 1, drafted + bool(draft)
    return tokens / forwards, drafted / forwards


def draft_ab(base, entries, rounds: int) -> None:
    seqs = greedy_requests(base, entries, 96)
    Engine(base).run(seqs)
    fast, head = fast_forward(base.model), base.model.get_output_embeddings()
    layers, heads, dim = base.kv_layout
    rows, past = 32, 64
    kv = torch.randn(2, layers, rows, heads, past + 8, dim, dtype=base.dtype) * 0.1
    plans = {1: lookup_yield(seqs, 0)} | {k + 1: lookup_yield(seqs, k) for k in (1, 2, 3)}  # W -> (yield, share)
    times: dict = {}
    with torch.inference_mode():
        for r in range(rounds):
            for w in plans if r % 2 == 0 else list(plans)[::-1]:
                ids = torch.randint(0, 1000, (rows, w))
                mask = torch.ones(rows, past + w, dtype=torch.long)
                mask[:round(rows * (1 - plans[w][1])), past:past + w - 1] = 0  # rows without a draft feed 1 token
                extra = torch.randn(int(mask[:, past:].sum()) - rows, base.model.config.hidden_size, dtype=base.dtype)
                pos = torch.arange(past, past + w).expand(rows, w)

                def forward():  # every fed token's logits are checked: the LM head runs on all of them
                    fast(kv, NewTokens(ids, mask, pos, slice(0, rows), 0, past))
                    if len(extra):
                        head(extra).float().argmax(-1)
                forward()
                t = time.perf_counter()
                for _ in range(4):
                    forward()
                times.setdefault(w, []).append((time.perf_counter() - t) / 4)
    one = statistics.median(times[1])
    for w, (gain, share) in plans.items():
        cost = statistics.median(times[w]) / one
        print(f"W={w} ({w - 1} drafted, {share:.0%} of forwards draft): {gain:.2f} tokens a forward, forward cost "
              f"{cost:.2f}x, net {gain / cost:.2f}x")


def where(base, entries, rounds: int) -> None:
    from softprompt.batch_cache import DecodeBatch

    spent: dict = {}

    def timed(cls, name, key=None):
        f = getattr(cls, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key or name] = spent.get(key or name, 0.0) + time.perf_counter() - t
        setattr(cls, name, wrapper)
        return f

    forward = type(base).forward_in_place

    def forward_in_place(self, kv, *blocks):  # a decode-only pass, or one with newcomers joined
        t = time.perf_counter()
        try:
            return forward(self, kv, *blocks)
        finally:
            key = "pass: decode only" if len(blocks) == 1 and blocks[0].ids.shape[1] == 1 else "pass: with newcomers"
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
            spent["passes " + key[6:]] = spent.get("passes " + key[6:], 0) + 1

    busy = []
    decode_block = Engine._decode_block

    def counting_decode_block(self):
        busy.append(len(self.batch.rows))
        return decode_block(self)

    originals = [(type(base), "forward_in_place", forward), (Engine, "_decode_block", decode_block)]
    type(base).forward_in_place, Engine._decode_block = forward_in_place, counting_decode_block
    originals.append((Engine, "_sample", timed(Engine, "_sample", "sampling")))
    originals += [(DecodeBatch, n, timed(DecodeBatch, n, f"batch cache: {n}")) for n in ("open", "join", "keep", "grow")]
    try:
        clients(base, entries, 4, 16, 8)  # warm-up
        for r in range(rounds):
            spent.clear()
            busy.clear()
            t = time.perf_counter()
            rate = clients(base, entries, 4, 288)
            wall = time.perf_counter() - t
            print(f"round {r}: {rate:.1f} tok/s, {wall:.1f} s, rows busy per decode step {statistics.mean(busy):.1f}")
            for key, v in sorted(spent.items()):
                print(f"  {key:28s} {v:8.0f}" if key.startswith("passes") else f"  {key:28s} {v:7.2f} s {v / wall:6.1%}")
    finally:
        for cls, name, f in originals:
            setattr(cls, name, f)


def newcomer(base, entries, rounds: int) -> None:
    engine = Engine(base)

    def running():
        engine.reset()
        engine.add(greedy_requests(base, entries, 31, 0, max_tokens=10**6))
        for _ in range(20):
            engine.decode()

    def arrivals(m, t):  # one token each, then done (their rows leave in the same step: included in the cost)
        return [Sequence(list(range(1000, 1000 + t)), SamplingParams(max_tokens=1, temperature=0), entries[f"p{i}"])
                for i in range(m)]

    cases = [(0, 0), (1, 1), (1, 15), (4, 1), (4, 15)]
    times: dict = {}
    with torch.inference_mode():
        running()
        for r in range(rounds):
            for m, t in cases if r % 2 == 0 else cases[::-1]:
                arriving = arrivals(m, t)
                start = time.perf_counter()
                engine.step(arriving)  # no newcomers: a decode step
                times.setdefault((m, t), []).append(1000 * (time.perf_counter() - start))
            if engine.batch.width > 120:
                running()
    for (m, t), ms in times.items():
        what = "decode step alone" if not m else f"+ {m} newcomer{'s' * (m > 1)} of {t} token{'s' * (t > 1)}"
        print(f"{what:30s} median {statistics.median(ms):6.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prefill", "clients", "joint", "draft", "where", "newcomer"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="runs/bench-serve")
    args = ap.parse_args()
    out = Path(args.out)
    make_prompts(out)
    base = load_model(None)
    entries = {p.name: PromptEntry(p.name, SoftPrompt.load(p, base).embeddings.to(base.dtype))
               for p in sorted((out / "prompts").iterdir())}
    {"prefill": prefill_ab, "clients": clients_ab, "joint": joint_ab, "draft": draft_ab, "where": where,
     "newcomer": newcomer}[args.what](base, entries, args.rounds)


if __name__ == "__main__":
    main()
