"""Serving benchmark: `softprompt serve` (mixed-prompt continuous batching) vs a PEFT baseline, plus a load test.

    python bench/serve.py                      # the full run recorded in BENCHMARKS.md (~10 min on 2 CPU cores)
    python bench/serve.py --quick              # a smoke run (few requests)

Both servers load the embedded SmolLM2-135M-Instruct and the same 8 soft prompts, and answer the same
`POST /v1/completions` requests (greedy, max_tokens 32) from 1, 8 and 32 concurrent clients:
  - softprompt: `softprompt serve` (one frozen model, every prompt batched together in one forward pass).
  - peft: PEFT's PeftModel with the 8 prompt-tuning adapters loaded; per request `set_adapter` + PEFT's `generate`,
    one request at a time (a lock), as one would serve adapters with PEFT alone.
Every output text is compared across concurrency levels and backends (greedy: batched == alone == PEFT).
Then a load test sends thousands of requests (a third malformed) to the softprompt server and reads its memory.
Servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEXTS = [
    "Review: the film was a delight from start to finish.\nSentiment:",
    "Review: the plot dragged and the acting was wooden.\nSentiment:",
    "Question: what is the capital of France?\nAnswer:",
    "Translate to French: the weather is nice today.\nFrench:",
    "Summarise: the meeting was moved to Thursday because the room was booked.\nSummary:",
    "Review: this phone's battery lasts two days, but the camera is poor.\nSentiment:",
    "Write a short greeting for a new colleague.\n",
    "Question: how many legs does a spider have?\nAnswer:",
]
N_PROMPTS = 8
MAX_TOKENS = 32


# ---- setup ---------------------------------------------------------------------------------------------------


def make_prompts(out: Path) -> None:
    """8 prompts of 8..22 virtual tokens, initialised from different vocabulary samples; also as PEFT adapters."""
    from softprompt import SoftPrompt, export_peft, load_model

    if (out / "prompts" / f"p{N_PROMPTS - 1}").exists() and (out / "peft" / f"p{N_PROMPTS - 1}").exists():
        return
    base = load_model(None)
    for i in range(N_PROMPTS):
        p = SoftPrompt.initialise(base, 8 + 2 * i, "vocab", seed=i)
        p.save(out / "prompts" / f"p{i}")
        export_peft(p, out / "peft" / f"p{i}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the PEFT baseline server -------------------------------------------------------------------------------------


def peft_app(adapters: Path):
    import threading

    import torch
    from peft import PeftModel
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from softprompt import load_model

    base = load_model(None)
    names = sorted(p.name for p in adapters.iterdir())
    model = PeftModel.from_pretrained(base.model, str(adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters / name), adapter_name=name)
    model.eval()
    # PEFT 0.21 looks for `past_key_values` in the generation kwargs; transformers 5.2x renamed it `cache`, so PEFT
    # would re-inject the prompt at every decode step (wrong tokens, more work). Restore PEFT's intended behaviour.
    original = model.base_model_prepare_inputs_for_generation

    def prepare(*args, **kwargs):
        out = original(*args, **kwargs)
        if "cache" in out and "past_key_values" not in out:
            out["past_key_values"] = out.pop("cache")
        return out

    model.base_model_prepare_inputs_for_generation = prepare
    tok = base.tokenizer
    lock = threading.Lock()
    eos = {tok.eos_token_id}

    def generate(adapter: str, text: str, max_tokens: int) -> tuple[str, int, int]:
        ids = tok(text, return_tensors="pt")
        with lock, torch.inference_mode():
            model.set_adapter(adapter)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        return tok.decode(new, skip_special_tokens=True), ids["input_ids"].shape[1], len(new)

    async def completions(request: Request):
        body = await request.json()
        adapter = body["model"].rpartition(":")[2]
        if adapter not in names:
            return JSONResponse({"error": {"message": f"unknown adapter {adapter}"}}, status_code=404)
        text, n_in, n_out = await asyncio.to_thread(generate, adapter, body["prompt"], int(body.get("max_tokens", 16)))
        return JSONResponse({"object": "text_completion", "model": body["model"],
                             "choices": [{"index": 0, "text": text, "finish_reason": None}],
                             "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health)])


# ---- servers as subprocesses --------------------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, backend: str, out: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        if backend == "softprompt":
            cmd = [sys.executable, "-m", "softprompt", "serve", "--prompts", str(out / "prompts"), "--port", str(port),
                   "--watch-interval", "0", "--max-waiting", "1024", "--max-output-tokens", "64"]
        else:
            cmd = [sys.executable, __file__, "--peft-server", str(out / "peft"), "--port", str(port)]
        self.log = open(out / f"server-{backend}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---- load generation --------------------------------------------------------------------------------------------


def request_for(i: int) -> tuple[str, str]:
    return f"p{i % N_PROMPTS}", TEXTS[(i // N_PROMPTS + i) % len(TEXTS)]


async def run_level(url: str, model_name: str, concurrency: int, n_requests: int) -> dict:
    import httpx

    latencies, tokens, outputs, errors = [], 0, {}, 0
    counter = iter(range(n_requests))

    async def worker(client):
        nonlocal tokens, errors
        for i in counter:
            prompt, text = request_for(i)
            t = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": f"{model_name}:{prompt}", "prompt": text,
                                                           "max_tokens": MAX_TOKENS, "temperature": 0})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors += 1
                continue
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            outputs[f"{prompt}|{text}"] = body["choices"][0]["text"]

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1200, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": n_requests, "errors": errors, "wall_s": wall,
            "requests_per_s": n_requests / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
            "outputs": outputs}


async def load_test(url: str, model_name: str, n_requests: int, concurrency: int, malformed_every: int) -> dict:
    """Thousands of requests, every `malformed_every`-th one malformed: good ones must all succeed."""
    import httpx

    rng = random.Random(0)
    bad_bodies = [b"{", b"[]", b'{"model": 5}', json.dumps({"model": f"{model_name}:nope", "prompt": "a"}).encode(),
                  json.dumps({"model": model_name, "prompt": ""}).encode(),
                  json.dumps({"model": model_name, "prompt": "a", "max_tokens": "many"}).encode(),
                  json.dumps({"model": model_name, "prompt": "a", "max_tokens": 10**6}).encode(),
                  b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}']
    stats = {"good": 0, "good_failed": 0, "bad": 0, "bad_answered_4xx": 0, "bad_other": 0}
    counter = iter(range(n_requests))

    async def rss() -> int:
        text = (await client.get("/metrics")).text
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("softprompt_resident_memory_bytes")))

    async def worker():
        for i in counter:
            if i % malformed_every == 0:
                stats["bad"] += 1
                try:
                    r = await client.post("/v1/completions", content=rng.choice(bad_bodies),
                                          headers={"content-type": "application/json"})
                    ok = 400 <= r.status_code < 500 and "error" in r.json()
                except (httpx.HTTPError, ValueError):
                    ok = False
                stats["bad_answered_4xx" if ok else "bad_other"] += 1
                continue
            stats["good"] += 1
            prompt, text = request_for(i)
            try:
                r = await client.post("/v1/completions", json={"model": f"{model_name}:{prompt}", "prompt": text,
                                                               "max_tokens": 2, "temperature": 0})
                if r.status_code != 200 or not r.json()["choices"]:
                    stats["good_failed"] += 1
            except httpx.HTTPError:
                stats["good_failed"] += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        rss_start = await rss()
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
        rss_end = await rss()
        health = (await client.get("/health")).json()
    return {**stats, "requests": n_requests, "concurrency": concurrency, "wall_s": wall, "rss_start_mb": rss_start / 2**20,
            "rss_end_mb": rss_end / 2**20, "health_after": health}


# ---- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-serve")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="softprompt,peft")
    ap.add_argument("--load-requests", type=int, default=2000)
    ap.add_argument("--peft-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peft_server:  # the baseline server process
        import uvicorn

        uvicorn.run(peft_app(Path(args.peft_server)), host="127.0.0.1", port=args.port, log_level="warning")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [(1, 2), (8, 8), (32, 32)] if args.quick else [(1, 8), (8, 32), (32, 64)]
    t0 = time.time()
    make_prompts(out)
    print(f"prompts ready ({time.time() - t0:.0f}s); load average {os.getloadavg()}", flush=True)
    results: dict = {"levels": {}, "max_tokens": MAX_TOKENS, "load_before": os.getloadavg()}
    for backend in args.backends.split(","):
        server = ServerProcess(backend, out, free_port())
        try:
            server.wait_ready()
            model_name = "SmolLM2-135M-Instruct"
            asyncio.run(run_level(server.url, model_name, 4, 8))  # warm-up, not measured
            results["levels"][backend] = []
            for concurrency, n in levels:
                r = asyncio.run(run_level(server.url, model_name, concurrency, n))
                results["levels"][backend].append(r)
                print(f"{backend:10s} c={concurrency:2d} n={n:3d} {r['tokens_per_s']:7.1f} tok/s {r['requests_per_s']:6.2f} "
                      f"req/s p50 {r['p50_s']:6.2f}s p99 {r['p99_s']:6.2f}s errors {r['errors']}", flush=True)
            if backend == "softprompt":
                import httpx

                metrics = httpx.get(server.url + "/metrics").text
                results["softprompt_metrics"] = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                                                 if line.startswith("softprompt_") and "{" not in line}
                n_load = 200 if args.quick else args.load_requests
                results["load_test"] = asyncio.run(load_test(server.url, model_name, n_load, 32, 3))
                print("load test:", json.dumps(results["load_test"]), flush=True)
        finally:
            server.stop()
    # greedy parity: the same (prompt, text) must give the same text at every concurrency and in both backends
    seen: dict[str, set] = {}
    for backend, rows in results["levels"].items():
        for r in rows:
            for key, text in r.pop("outputs").items():
                seen.setdefault(key, set()).add(text)
    results["parity"] = {"pairs": len(seen), "pairs_with_one_output": sum(len(v) == 1 for v in seen.values())}
    lv = results["levels"]
    if "peft" in lv and "softprompt" in lv:
        results["speedup_tokens_per_s"] = {r["concurrency"]: r["tokens_per_s"] / b["tokens_per_s"]
                                           for r, b in zip(lv["softprompt"], lv["peft"])}
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "softprompt_metrics"}, indent=2))


if __name__ == "__main__":
    main()
