"""`softprompt serve`: scheduler parity (mixed batch == alone == uncached), the OpenAI-compatible app in process,
a real socket with the `openai` client, hot reload, limits and every error path. Tiny model, float32, CPU."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from softprompt import SoftPrompt, export_peft, load_model  # noqa: E402
from softprompt.data import Encoder, Template  # noqa: E402
from softprompt.generate import generate_ids  # noqa: E402
from softprompt.scheduler import PromptEntry, SamplingParams, Scheduler, Sequence  # noqa: E402
from softprompt.serve import PromptRegistry, ServeConfig, create_app  # noqa: E402

from conftest import LocalServer, load_with_serve_chat_template  # noqa: E402
TEXTS = ["the film was great", "Review : the plot was awful . Sentiment", "the meal",
         "this phone was superb and the hotel was poor . positive negative"]
PROMPTS = {"short": 2, "mid": 5, "long": 9}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_with_serve_chat_template(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_objs(base):
    return {name: SoftPrompt.initialise(base, n, "random", seed=i) for i, (name, n) in enumerate(PROMPTS.items())}


@pytest.fixture()
def prompts_dir(tmp_path, base, prompt_objs):
    d = tmp_path / "prompts"
    for name, p in prompt_objs.items():
        p.save(d / name)
    export_peft(SoftPrompt.initialise(base, 3, "random", seed=7), d / "peft-a")  # a PEFT adapter folder
    return d


def make_app(base, prompts_dir, **kw):
    return create_app(base, prompts_dir, served_model_name="tiny", **kw)


def ids_of(base, text: str) -> list[int]:
    return Encoder(base.tokenizer, Template()).input_ids(text)


def reference(base, text: str, prompt: SoftPrompt | None, max_tokens: int) -> list[int]:
    """Uncached, unbatched: one row through prepend_prompts and generate_ids."""
    return generate_ids(base, [ids_of(base, text)], prompt.embeddings if prompt is not None else None,
                        max_new_tokens=max_tokens)[0]


def decode(base, ids):
    return base.tokenizer.decode(ids, skip_special_tokens=True)


def entry(name: str, p: SoftPrompt) -> PromptEntry:
    return PromptEntry(name, p.embeddings.detach())


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


# ---- scheduler: mixed batches, continuous batching, prefix cache ---------------------------------------------


def test_mixed_prompt_batch_equals_alone_and_uncached(base, prompt_objs):
    entries = {name: entry(name, p) for name, p in prompt_objs.items()}
    cases = [(t, name) for t in TEXTS for name in [None, *PROMPTS]]
    sched = Scheduler(base, autostart=False)
    seqs = [Sequence(ids_of(base, t), greedy(10), entries[n] if n else None, lambda ev: None) for t, n in cases]
    # continuous batching: a first group starts, the rest join at step boundaries while it decodes
    sched.submit(seqs[:5])
    sched.step()
    sched.step()
    sched.submit(seqs[5:11])
    sched.step()
    sched.submit(seqs[11:])
    sched.run_until_idle()
    assert sched.stats["max_batch_rows"] >= 12  # really batched: different prompts (and none) in one forward
    assert sched.stats["decode_steps"] < sum(len(s.generated) for s in seqs) / 4
    for s, (text, name) in zip(seqs, cases):
        p = prompt_objs[name] if name else None
        alone = Scheduler(base, autostart=False)
        one = Sequence(ids_of(base, text), greedy(10), entry("x", p) if p else None, lambda ev: None)
        alone.submit(one)
        alone.run_until_idle()
        assert s.generated == one.generated, (text, name)
        assert s.generated == reference(base, text, p, 10), (text, name)  # cached prefix == uncached
        assert len(s.generated) == 10


def test_prefix_cache_computed_once_per_prompt(base, prompt_objs):
    e = entry("mid", prompt_objs["mid"])
    sched = Scheduler(base, autostart=False)
    for t in TEXTS:
        sched.submit(Sequence(ids_of(base, t), greedy(3), e, lambda ev: None))
    sched.run_until_idle()
    first = e.kv
    assert first is not None and first.shape[3] == PROMPTS["mid"]  # [2, layers, H, P, D]
    sched.submit(Sequence(ids_of(base, TEXTS[0]), greedy(3), e, lambda ev: None))
    sched.run_until_idle()
    assert e.kv is first
    assert sched.stats["prefix_cache_misses"] == 1 and sched.stats["prefix_cache_hits"] >= len(TEXTS)


def test_an_empty_input_continues_from_the_prompt_alone_and_in_a_mixed_batch(base, prompt_objs):
    e = {name: entry(name, p) for name, p in prompt_objs.items()}
    want = {name: reference(base, "", p, 6) for name, p in prompt_objs.items()}
    assert ids_of(base, "") == []  # the tiny tokenizer adds no BOS: the row really has no token
    sched = Scheduler(base, autostart=False)  # every row empty: no forward at all, the prefixes are the past
    alone = [Sequence([], greedy(6), e[n], lambda ev: None) for n in PROMPTS]
    sched.submit(alone)
    sched.run_until_idle()
    assert [s.generated for s in alone] == [want[n] for n in PROMPTS]
    sched = Scheduler(base, autostart=False)  # mixed with rows that have text, and a row without a prompt
    mixed = [Sequence([], greedy(6), e["mid"], lambda ev: None),
             Sequence(ids_of(base, TEXTS[0]), greedy(6), e["long"], lambda ev: None),
             Sequence(ids_of(base, TEXTS[1]), greedy(6), None, lambda ev: None),
             Sequence([], greedy(6), e["long"], lambda ev: None)]
    sched.submit(mixed)
    sched.run_until_idle()
    assert mixed[0].generated == want["mid"] and mixed[3].generated == want["long"]
    assert mixed[1].generated == reference(base, TEXTS[0], prompt_objs["long"], 6)
    assert mixed[2].generated == reference(base, TEXTS[1], None, 6)
    sched = Scheduler(base, autostart=False)  # joining running rows in their decode pass: all empty, then mixed
    running = Sequence(ids_of(base, TEXTS[2]), greedy(12), e["short"], lambda ev: None)
    sched.submit(running)
    sched.step()
    empties = [Sequence([], greedy(6), e[n], lambda ev: None) for n in ("mid", "long")]
    sched.submit(empties)
    sched.step()
    late = [Sequence([], greedy(6), e["short"], lambda ev: None),
            Sequence(ids_of(base, TEXTS[3]), greedy(6), e["mid"], lambda ev: None)]
    sched.submit(late)
    sched.run_until_idle()
    assert [s.generated for s in empties] == [want["mid"], want["long"]] and late[0].generated == want["short"]
    assert late[1].generated == reference(base, TEXTS[3], prompt_objs["mid"], 6)
    assert running.generated == reference(base, TEXTS[2], prompt_objs["short"], 12)


def test_sampling_seeded_and_stop_strings_in_scheduler(base, prompt_objs):
    e = entry("long", prompt_objs["long"])
    sampled = []
    for seed in (5, 5, 6):
        sched = Scheduler(base, autostart=False)
        s = Sequence(ids_of(base, TEXTS[1]), SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed), e,
                     lambda ev: None)
        sched.submit(s)
        sched.run_until_idle()
        sampled.append(s.generated)
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    full = decode(base, reference(base, TEXTS[1], prompt_objs["long"], 12))
    stop = full[3:6]
    events = []
    sched = Scheduler(base, autostart=False)
    sched.submit(Sequence(ids_of(base, TEXTS[1]), SamplingParams(max_tokens=12, temperature=0, stop=(stop,)), e,
                          events.append))
    sched.run_until_idle()
    text = "".join(ev.text for ev in events if ev.kind == "delta")
    assert text == full[: full.index(stop)] and events[-1].finish_reason == "stop"


def test_a_failing_step_fails_only_its_sequences(base, prompt_objs, monkeypatch):
    e = entry("mid", prompt_objs["mid"])
    sched = Scheduler(base, autostart=False)
    ok_events, bad_events = [], []
    ok = Sequence(ids_of(base, TEXTS[0]), greedy(8), e, ok_events.append)
    sched.submit(ok)
    sched.step()
    real = base.forward_in_place

    def broken(kv, *blocks):
        if any(b.ids.shape[1] > 1 for b in blocks):  # passes with a prefill (alone, or joint with a decode step)
            raise RuntimeError("boom")
        return real(kv, *blocks)

    monkeypatch.setattr(base, "forward_in_place", broken)
    bad = Sequence(ids_of(base, TEXTS[1]), greedy(8), None, bad_events.append)
    sched.submit(bad)
    sched.step()
    assert bad_events[-1].kind == "error" and bad_events[-1].status == 500 and "boom" in bad_events[-1].text
    monkeypatch.setattr(base, "forward_in_place", real)
    sched.run_until_idle()
    assert ok.generated == reference(base, TEXTS[0], prompt_objs["mid"], 8) and ok_events[-1].kind == "finish"

    # a failing decode step fails the running batch, and the scheduler serves the next request normally
    def broken_decode(kv, *blocks):
        if all(b.ids.shape[1] == 1 for b in blocks):  # decode steps only
            raise RuntimeError("decode boom")
        return real(kv, *blocks)

    monkeypatch.setattr(base, "forward_in_place", broken_decode)
    events = []
    sched.submit(Sequence(ids_of(base, TEXTS[2]), greedy(4), e, events.append))
    sched.step()
    assert events[-1].kind == "error" and sched.n_running == 0
    monkeypatch.undo()
    again = Sequence(ids_of(base, TEXTS[2]), greedy(4), e, lambda ev: None)
    sched.submit(again)
    sched.run_until_idle()
    assert again.generated == reference(base, TEXTS[2], prompt_objs["mid"], 4)


# ---- the app in process ------------------------------------------------------------------------------------


@pytest.fixture()
def client(base, prompts_dir):
    from starlette.testclient import TestClient

    app = make_app(base, prompts_dir, watch_interval=0, max_input_tokens=64, max_output_tokens=48,
                     max_body_bytes=4096)
    with TestClient(app) as c:
        c.server = app.state.server
        yield c


def post(client, body, path="/v1/completions", **kw):
    return client.post(path, json=body, **kw)


def test_models_health_and_completion(client, base, prompt_objs):
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == ["tiny", "tiny:long", "tiny:mid", "tiny:peft-a", "tiny:short"]
    assert client.get("/v1/models/tiny:mid").json()["soft_prompt"]["n_virtual_tokens"] == 5
    assert client.get("/health").json()["status"] == "ok"
    r = post(client, {"model": "tiny:mid", "prompt": TEXTS[0], "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny:mid"
    assert body["choices"][0]["text"] == decode(base, reference(base, TEXTS[0], prompt_objs["mid"], 7))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids_of(base, TEXTS[0])), "completion_tokens": 7, "total_tokens":
                             len(ids_of(base, TEXTS[0])) + 7}
    # plain base, bare prompt name, and a PEFT adapter folder
    plain = post(client, {"model": "tiny", "prompt": TEXTS[0], "max_tokens": 5, "temperature": 0}).json()
    assert plain["choices"][0]["text"] == decode(base, reference(base, TEXTS[0], None, 5))
    assert post(client, {"model": "short", "prompt": "x", "max_tokens": 2}).status_code == 200
    peft = SoftPrompt.load(client.server.registry.directory / "peft-a")
    r = post(client, {"model": "tiny:peft-a", "prompt": TEXTS[2], "max_tokens": 5, "temperature": 0}).json()
    assert r["choices"][0]["text"] == decode(base, reference(base, TEXTS[2], peft, 5))
    metrics = client.get("/metrics").text
    assert "softprompt_generated_tokens_total" in metrics and 'status="200"' in metrics


def test_streaming_matches_and_chat(client, base, prompt_objs):
    body = {"model": "tiny:long", "prompt": TEXTS[3], "max_tokens": 9, "temperature": 0}
    plain = post(client, body).json()["choices"][0]["text"]
    r = post(client, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 9
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the film was"}]
    r = post(client, {"model": "tiny:short", "messages": messages, "max_tokens": 6, "temperature": 0},
             "/v1/chat/completions")
    assert r.status_code == 200, r.text
    rendered = base.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = base.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    want = decode(base, generate_ids(base, [ids], prompt_objs["short"].embeddings, max_new_tokens=6)[0])
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want}
    r = post(client, {"model": "tiny:short", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True},
             "/v1/chat/completions")
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want


def test_an_empty_prompt_is_answered_from_the_soft_prompt(client, base, prompt_objs):
    r = post(client, {"model": "tiny:mid", "prompt": "", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == decode(base, reference(base, "", prompt_objs["mid"], 5))


def test_stop_seed_n_and_list_prompts(client, base):
    full = post(client, {"model": "tiny:mid", "prompt": TEXTS[1], "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[4:7]
    cut = post(client, {"model": "tiny:mid", "prompt": TEXTS[1], "max_tokens": 12, "temperature": 0,
                        "stop": [stop, "zzzz"]}).json()["choices"][0]
    assert cut == {"index": 0, "text": text[: text.index(stop)], "logprobs": None, "finish_reason": "stop"}
    streamed = post(client, {"model": "tiny:mid", "prompt": TEXTS[1], "max_tokens": 12, "temperature": 0, "stop": stop,
                             "stream": True}).text
    parts = [json.loads(e[6:])["choices"][0]["text"] for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert "".join(parts) == text[: text.index(stop)]
    sampled = {"model": "tiny:long", "prompt": TEXTS[0], "max_tokens": 10, "temperature": 1.2, "top_p": 0.95, "seed": 3}
    a, b = post(client, sampled).json(), post(client, sampled).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    many = post(client, {**sampled, "n": 3, "prompt": [TEXTS[0], TEXTS[2]]}).json()
    assert [c["index"] for c in many["choices"]] == list(range(6))
    assert many["choices"][0]["text"] == a["choices"][0]["text"]  # choice j uses seed + j
    assert len({c["text"] for c in many["choices"][:3]}) > 1


def test_concurrent_mixed_requests_equal_alone(base, prompts_dir, prompt_objs):
    app = make_app(base, prompts_dir, watch_interval=0)
    cases = [(t, m) for t in TEXTS for m in ["tiny", "tiny:short", "tiny:mid", "tiny:long"]]

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"model": m, "prompt": t, "max_tokens": 8,
                                                                         "temperature": 0}) for t, m in cases])
        return [r.json()["choices"][0]["text"] for r in rs]

    try:
        texts = asyncio.run(run())
        assert app.state.server.scheduler.stats["max_batch_rows"] > 4  # they shared forward passes
        for got, (t, m) in zip(texts, cases):
            p = prompt_objs[m.split(":")[1]] if ":" in m else None
            assert got == decode(base, reference(base, t, p, 8)), (t, m)
    finally:
        app.state.server.scheduler.shutdown()


# ---- errors: every one is a JSON error, and the server keeps serving -------------------------------------------


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "malformed JSON"),
    (b"", 400, "empty request body"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'"text"', 400, "must be a JSON object"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[" * 2000 + b"]" * 2000, 400, "nested too deeply"),
    (b"[" * 100000 + b"]" * 100000, 413, "over this server's limit"),
])
def test_malformed_bodies(client, body, status, needle):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and needle in r.json()["error"]["message"]


@pytest.mark.parametrize("patch, status, needle", [
    ({"model": None}, 400, "model is required"),
    ({"model": 3}, 400, "model: expected a string"),
    ({"model": "tiny:nope"}, 404, "not found"),
    ({"model": "other-model"}, 404, "not found"),
    ({"model": "tiny:../short"}, 404, "not found"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt is empty: only an input-embedding soft prompt"),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": None}, 400, "prompt is required"),
    ({"prompt": 5}, 400, "prompt: expected a string"),
    ({"prompt": [1, "a"]}, 400, "prompt: expected a string"),
    ({"prompt": [99999]}, 400, "token ids must be in"),
    ({"max_tokens": "5"}, 400, "max_tokens: expected an integer"),
    ({"max_tokens": 0}, 400, "max_tokens: must be >= 1"),
    ({"max_tokens": 49}, 400, "over this server's limit of 48 (--max-output-tokens)"),
    ({"prompt": "the film " * 40}, 400, "over this server's limit of 64 (--max-input-tokens)"),
    ({"temperature": "hot"}, 400, "temperature: expected a number"),
    ({"temperature": 3}, 400, "temperature: must be in"),
    ({"top_p": 0}, 400, "top_p: must be in"),
    ({"stream": "yes"}, 400, "stream: expected true or false"),
    ({"stop": [1]}, 400, "stop: expected a string"),
    ({"stop": [""]}, 400, "must not be empty"),
    ({"stop": ["a"] * 9}, 400, "stop sequences, over"),
    ({"n": 9}, 400, "n: 9 is over"),
    ({"seed": 1.5}, 400, "seed: expected an integer"),
    ({"logprobs": 2}, 400, "logprobs is not supported"),
    ({"echo": True}, 400, "echo is not supported"),
    ({"use_template": True}, 400, "no saved template"),
])
def test_bad_completion_fields(client, patch, status, needle):
    body = {"model": "tiny:mid", "prompt": "the film", "max_tokens": 3, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = post(client, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert post(client, {"model": "tiny:mid", "prompt": "ok", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("patch, status, needle", [
    ({"messages": []}, 400, "messages is empty"),
    ({"messages": "hi"}, 400, "messages: expected an array"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "every message is empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content: expected a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
    ({"max_completion_tokens": 100}, 400, "--max-output-tokens"),
    ({"tools": [{"type": "function"}]}, 400, "tools is not supported"),
])
def test_bad_chat_fields(client, patch, status, needle):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **patch}
    r = post(client, body, "/v1/chat/completions")
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_context_and_routes(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = post(client, {"model": "tiny:long", "prompt": "x", "max_tokens": 48})
    assert r.status_code == 200
    r = client.post("/v1/completions", content=b"{}" + b" " * 5000)
    assert r.status_code == 413


def test_context_length_exceeded(base, prompts_dir):
    from starlette.testclient import TestClient

    with TestClient(make_app(base, prompts_dir, watch_interval=0, max_output_tokens=250)) as c:
        r = post(c, {"model": "tiny:long", "prompt": "the film was great", "max_tokens": 250})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "over the model's context of 256" in r.json()["error"]["message"]


def test_api_key(base, prompts_dir):
    from starlette.testclient import TestClient

    with TestClient(make_app(base, prompts_dir, watch_interval=0, api_key="s3cret")) as c:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
        assert post(c, body).status_code == 401
        assert post(c, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Basic s3cret"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200
        assert post(c, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/admin/reload").status_code == 401


def test_bounded_queue_gives_429_quickly_then_serves(base, prompts_dir):
    app = make_app(base, prompts_dir, watch_interval=0, max_waiting=2)
    sched = app.state.server.scheduler
    sched.autostart = False  # hold the queue still: nothing runs until start()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "tiny:short", "prompt": "the film", "max_tokens": 3, "temperature": 0}
            held = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(2)]
            while sched.n_waiting < 2:
                await asyncio.sleep(0.01)
            over = await c.post("/v1/completions", json=body)
            many = await c.post("/v1/completions", json={**body, "n": 2})  # all-or-nothing admission
            still_waiting = not any(t.done() for t in held)  # the 429s came back without waiting for them
            sched.start()
            return over, still_waiting, many, await asyncio.gather(*held)

    try:
        over, still_waiting, many, held = asyncio.run(run())
        assert over.status_code == 429 and over.headers["retry-after"] == "1" and still_waiting
        assert over.json()["error"]["type"] == "rate_limit_error" and many.status_code == 429
        assert [r.status_code for r in held] == [200, 200]
    finally:
        sched.shutdown()


def test_client_gone_before_answer_frees_its_sequence(base, prompts_dir):
    """A non-streaming client that disconnects: its sequences are cancelled, nothing is generated for it."""
    app = make_app(base, prompts_dir, watch_interval=0)
    sched = app.state.server.scheduler
    sched.autostart = False
    body = json.dumps({"model": "tiny:mid", "prompt": "the film", "max_tokens": 40, "n": 2}).encode()
    sent = []

    async def run():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            while sched.n_waiting < 2:  # the client leaves once its request is queued
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
                 "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "root_path": "",
                 "asgi": {"version": "3.0"}}
        await app(scope, receive, send)

    try:
        asyncio.run(run())
        assert sent[0]["status"] == 499
        sched.step()
        assert sched.stats["cancelled"] == 2 and sched.stats["generated_tokens"] == 0
        assert sched.n_waiting == 0 and sched.n_running == 0
    finally:
        sched.shutdown()


def test_request_timeout(base, prompts_dir):
    from starlette.testclient import TestClient

    with TestClient(make_app(base, prompts_dir, watch_interval=0, request_timeout=1e-6)) as c:
        r = post(c, {"model": "tiny", "prompt": "the film", "max_tokens": 40})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        r = post(c, {"model": "tiny", "prompt": "the film", "max_tokens": 40, "stream": True})
        assert r.status_code == 200 and '"error"' in r.text and "timed out" in r.text
        assert c.app.state.server.scheduler.stats["timeouts"] == 2


# ---- prompts: hot reload, validation, safety ----------------------------------------------------------------------


def test_hot_reload_without_disturbing_admitted_requests(base, prompts_dir, prompt_objs):
    app = make_app(base, prompts_dir, watch_interval=0)
    server = app.state.server
    server.scheduler.autostart = False
    new = SoftPrompt.initialise(base, 4, "random", seed=11)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "tiny:mid", "prompt": TEXTS[0], "max_tokens": 8, "temperature": 0}
            inflight = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while server.scheduler.n_waiting < 1:
                await asyncio.sleep(0.01)
            # while it waits: replace "mid" on disk, add "fresh", reload; then remove "mid" entirely
            shutil.rmtree(prompts_dir / "mid")
            new.save(prompts_dir / "mid")
            new.save(prompts_dir / "fresh")
            report = (await c.post("/admin/reload")).json()
            gone = await c.delete("/admin/prompts/mid")
            missing = await c.post("/v1/completions", json=body)
            server.scheduler.start()
            done = await inflight
            fresh = await c.post("/v1/completions", json={**body, "model": "tiny:fresh"})
            again = await c.post("/admin/prompts/mid")
            replaced = await c.post("/v1/completions", json=body)
            return report, gone, missing, done, fresh, again, replaced

    try:
        report, gone, missing, done, fresh, again, replaced = asyncio.run(run())
        assert report == {"added": ["fresh"], "updated": ["mid"], "removed": [], "failed": []}
        assert gone.status_code == 200 and missing.status_code == 404
        # the request admitted before all that finished with the prompt it started with
        assert done.json()["choices"][0]["text"] == decode(base, reference(base, TEXTS[0], prompt_objs["mid"], 8))
        assert fresh.json()["choices"][0]["text"] == decode(base, reference(base, TEXTS[0], new, 8))
        assert again.status_code == 200 and replaced.json()["choices"][0]["text"] == fresh.json()["choices"][0]["text"]
    finally:
        server.scheduler.shutdown()


def test_watcher_picks_up_new_and_deleted_prompts(base, prompts_dir):
    from starlette.testclient import TestClient

    with TestClient(make_app(base, prompts_dir, watch_interval=0.05)) as c:
        SoftPrompt.initialise(base, 3, "random", seed=5).save(prompts_dir / "late")
        shutil.rmtree(prompts_dir / "short")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
            if "tiny:late" in ids and "tiny:short" not in ids:
                break
            time.sleep(0.05)
        assert "tiny:late" in ids and "tiny:short" not in ids
        assert post(c, {"model": "tiny:late", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_prompt_names_and_files_are_validated(base, prompts_dir, tmp_path):
    outside = tmp_path / "outside"
    SoftPrompt.initialise(base, 2, "random", seed=1).save(outside)
    (prompts_dir / "linked").symlink_to(outside, target_is_directory=True)
    (prompts_dir / "bad name!").mkdir()
    (prompts_dir / "bad name!" / "prompt.safetensors").write_bytes(b"x")
    pickled = prompts_dir / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not-read")
    corrupt = prompts_dir / "corrupt"
    corrupt.mkdir()
    (corrupt / "prompt.safetensors").write_bytes(b"\x00" * 64)
    wide = prompts_dir / "wide"
    SoftPrompt(torch.zeros(3, base.hidden_size + 1)).save(wide)
    reg = PromptRegistry(base, prompts_dir)
    report = reg.scan()
    assert sorted(reg.entries) == ["long", "mid", "peft-a", "short"]
    assert set(report["failed"]) == {"linked", "pickled", "corrupt", "wide", "bad name!"}
    assert reg.scan() == {"added": [], "updated": [], "removed": [], "failed": []}  # reported once
    assert "outside the prompts directory" in reg.errors["linked"]
    assert "safetensors" in reg.errors["pickled"] and "safetensors" in reg.errors["corrupt"]
    assert "hidden size" in reg.errors["wide"] and "invalid prompt name" in reg.errors["bad name!"]
    for name in ("../mid", "..", "a/b", ".hidden", "x" * 200):
        with pytest.raises(Exception, match="invalid prompt name"):
            reg.add(name)
    from starlette.testclient import TestClient

    with TestClient(make_app(base, prompts_dir, watch_interval=0)) as c:
        assert c.post("/admin/prompts/..%2Fmid").status_code in (400, 404)
        assert c.post("/admin/prompts/corrupt").status_code == 400
        assert c.post("/admin/prompts/absent").status_code == 404
        assert c.delete("/admin/prompts/absent").status_code == 404
        assert sorted(c.get("/admin/prompts").json()["errors"]) == ["bad name!", "corrupt", "linked", "pickled", "wide"]
        assert post(c, {"model": "tiny:mid", "prompt": "a", "max_tokens": 1}).status_code == 200


# ---- a real socket: the openai client, client disconnects, graceful shutdown ----------------------------------


def test_real_socket_openai_client_disconnect_and_graceful_shutdown(base, prompts_dir, prompt_objs):
    openai = pytest.importorskip("openai")
    app = make_app(base, prompts_dir, watch_interval=0, api_key="k", max_output_tokens=256)
    sched = app.state.server.scheduler
    with LocalServer(app) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data][:2] == ["tiny", "tiny:long"]
        r = client.completions.create(model="tiny:mid", prompt=TEXTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].text == decode(base, reference(base, TEXTS[0], prompt_objs["mid"], 6))
        chat = client.chat.completions.create(model="tiny:short", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
        pieces = [c.choices[0].text for c in client.completions.create(model="tiny:mid", prompt=TEXTS[0], max_tokens=6,
                                                                      temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == r.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny:absent", prompt="a", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

        # a client that goes away mid-stream frees its batch slot
        before = sched.stats["cancelled"]
        with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer k"},
                          json={"model": "tiny", "prompt": "a", "max_tokens": 250, "temperature": 1.0,
                                "stream": True}) as resp:
            next(resp.iter_lines())
        deadline = time.monotonic() + 10
        while (sched.stats["cancelled"] == before or sched.n_running) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.stats["cancelled"] > before and sched.n_running == 0

        # graceful shutdown: a request in flight when shutdown begins still gets all its tokens
        result = {}

        def long_request():
            with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                              json={"model": "tiny:long", "prompt": TEXTS[1], "max_tokens": 200, "temperature": 0,
                                    "stream": True}) as resp:
                result["status"] = resp.status_code
                result["lines"] = [line for line in resp.iter_lines() if line]

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 10
        while not sched.n_running and time.monotonic() < deadline:
            time.sleep(0.005)
        srv.stop()
        t.join(60)
        assert result["status"] == 200 and result["lines"][-1] == "data: [DONE]"
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in result["lines"][:-1])
        assert text == decode(base, reference(base, TEXTS[1], prompt_objs["long"], 200))
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")


def test_mini_load_with_malformed_requests(base, prompts_dir):
    """Many concurrent requests, a third of them malformed: every good one succeeds, memory does not grow."""
    app = make_app(base, prompts_dir, watch_interval=0, max_waiting=1000)
    good = {"model": "tiny:mid", "prompt": "the film", "max_tokens": 2, "temperature": 0}
    bad = [b"{", b'{"model": "tiny:mid", "prompt": 7}', b'{"model": "tiny:zzz", "prompt": "a"}', b"[]"]

    async def run(rounds):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            for _ in range(rounds):
                reqs = [c.post("/v1/completions", json=good) for _ in range(20)]
                reqs += [c.post("/v1/completions", content=b) for b in bad * 2]
                rs = await asyncio.gather(*reqs)
                assert all(r.status_code == 200 for r in rs[:20])
                assert all(r.status_code in (400, 404) and "error" in r.json() for r in rs[20:])

    try:
        asyncio.run(run(2))
        import gc

        gc.collect()
        rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        asyncio.run(run(8))
        gc.collect()
        rss1 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert rss1 - rss0 < 50 << 20
        assert app.state.server.scheduler.n_running == 0 and app.state.server.scheduler.n_waiting == 0
    finally:
        app.state.server.scheduler.shutdown()


def test_cli_has_serve():
    from softprompt.cli import build_parser
    from softprompt.config import config_from_args

    args = build_parser().parse_args(["serve", "--prompts", "p"])
    cfg = config_from_args(ServeConfig, args)  # flags stay unset (None) in args so that a --config file can fill them
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and args.func.__name__ == "_cmd_serve"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_batch_on_cuda(tiny_model_dir, prompt_objs):
    cuda = load_model(str(tiny_model_dir), dtype="float32", device="cuda")
    sched = Scheduler(cuda, autostart=False)
    cases = [(t, n) for t in TEXTS for n in [None, *PROMPTS]]
    seqs = [Sequence(ids_of(cuda, t), greedy(8), entry(n, prompt_objs[n]) if n else None, lambda ev: None)
            for t, n in cases]
    sched.submit(seqs[:6])
    sched.step()
    sched.submit(seqs[6:])
    sched.run_until_idle()
    for s, (t, n) in zip(seqs, cases):
        assert s.generated == reference(cuda, t, prompt_objs[n] if n else None, 8), (t, n)
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16", device="cuda")
    app = make_app(bf16, None, watch_interval=0)
    from starlette.testclient import TestClient

    with TestClient(app) as c:
        r = post(c, {"model": "tiny", "prompt": [TEXTS[0], TEXTS[1]], "max_tokens": 6, "n": 2, "temperature": 0.5})
        assert r.status_code == 200 and all(c["finish_reason"] == "length" for c in r.json()["choices"])
