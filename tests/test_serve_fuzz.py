"""The server under bad input: a bad row fails alone, a bad prompt folder fails alone, odd JSON is a 400, and a
Hypothesis fuzzer over the completion, chat and admin routes of a 127.0.0.1 server, with a concurrent stream of
good requests: no 5xx, no good request failed or answered differently. Tiny model, CPU, bounded in examples."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from softprompt import SoftPrompt  # noqa: E402
from softprompt.data import Encoder, Template  # noqa: E402
from softprompt.errors import SoftPromptError  # noqa: E402
from softprompt.generate import generate_ids  # noqa: E402
from softprompt.scheduler import PromptEntry, SamplingParams, Scheduler, Sequence  # noqa: E402
from softprompt.serve import PromptRegistry, ServeConfig, check_exposure, create_app, read_api_key  # noqa: E402

from conftest import cli_error  # noqa: E402

from conftest import LocalServer, load_with_serve_chat_template  # noqa: E402
GOOD_TEXT = "the film was great"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_with_serve_chat_template(tiny_model_dir)


@pytest.fixture(scope="module")
def mid(base):
    return SoftPrompt.initialise(base, 5, "random", seed=1)


@pytest.fixture()
def prompts_dir(tmp_path, base, mid):
    d = tmp_path / "prompts"
    mid.save(d / "mid")
    SoftPrompt.initialise(base, 2, "random", seed=2).save(d / "short")
    return d


def ids_of(base, text):
    return Encoder(base.tokenizer, Template()).input_ids(text)


def reference(base, prompt, n):
    return generate_ids(base, [ids_of(base, GOOD_TEXT)], prompt.embeddings, max_new_tokens=n)[0]


# ---- one bad row never fails the others in its step ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-7])
def test_a_degenerate_temperature_is_greedy_and_fails_nobody(base, mid, temperature):
    sched = Scheduler(base, autostart=False)
    e = PromptEntry("mid", mid.embeddings.detach())
    good_events, odd_events = [], []
    good = [Sequence(ids_of(base, GOOD_TEXT), SamplingParams(max_tokens=6, temperature=0.7, seed=i), e, good_events.append)
            for i in range(11)]
    odd = Sequence(ids_of(base, GOOD_TEXT), SamplingParams(max_tokens=6, temperature=temperature), e, odd_events.append)
    sched.submit(good[:5] + [odd] + good[5:])  # admitted in the same step
    sched.run_until_idle()
    assert sched.stats["errors"] == 0 and [ev.kind for ev in good_events].count("finish") == 11
    assert not [ev for ev in good_events if ev.kind == "error"]
    assert odd.generated == reference(base, mid, 6) and odd_events[-1].kind == "finish"


def test_a_nan_prompt_fails_only_its_own_rows(base, mid):
    sched = Scheduler(base, autostart=False)
    e = PromptEntry("mid", mid.embeddings.detach())
    nan = PromptEntry("nan", torch.full_like(mid.embeddings.detach(), float("nan")))
    events = {k: [] for k in ("greedy", "sampled", "bad_greedy", "bad_sampled")}
    greedy_ok = Sequence(ids_of(base, GOOD_TEXT), SamplingParams(max_tokens=6, temperature=0), e, events["greedy"].append)
    sampled_ok = Sequence(ids_of(base, GOOD_TEXT), SamplingParams(max_tokens=6, temperature=1.0, seed=3), e,
                          events["sampled"].append)
    bad = [Sequence(ids_of(base, GOOD_TEXT), SamplingParams(max_tokens=6, temperature=t, seed=1), nan, events[k].append)
           for t, k in ((0.0, "bad_greedy"), (1.0, "bad_sampled"))]
    sched.submit([greedy_ok, bad[0], sampled_ok, bad[1]])
    sched.run_until_idle()
    assert greedy_ok.generated == reference(base, mid, 6) and events["greedy"][-1].kind == "finish"
    assert events["sampled"][-1].kind == "finish"
    for k in ("bad_greedy", "bad_sampled"):
        assert events[k][-1].kind == "error" and "non-finite logits" in events[k][-1].text
    assert sched.stats["errors"] == 2 and sched.n_running == 0


# ---- one bad prompt folder fails alone ------------------------------------------------------------------------------


def _bad_folders(d, base):
    SoftPrompt.initialise(base, 2, "random", seed=3).save(d / "list-meta")
    (d / "list-meta" / "softprompt.json").write_text("[]")
    SoftPrompt.initialise(base, 2, "random", seed=4).save(d / "int-template")
    meta = json.loads((d / "int-template" / "softprompt.json").read_text())
    (d / "int-template" / "softprompt.json").write_text(json.dumps({**meta, "template": 5}))
    SoftPrompt.initialise(base, 2, "random", seed=5).save(d / "nan")
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.full((2, 32), float("nan"))}, str(d / "nan" / "prompt.safetensors"))
    (d / "half").mkdir()
    SoftPrompt.initialise(base, 2, "random", seed=6).save(d / "half")
    (d / "half" / "softprompt.json").unlink()


def test_bad_folders_at_start_and_on_reload_fail_alone(base, prompts_dir):
    from starlette.testclient import TestClient

    _bad_folders(prompts_dir, base)
    app = create_app(base, prompts_dir, served_model_name="tiny", watch_interval=0)  # starts despite them
    with TestClient(app) as c:
        listed = c.get("/admin/prompts").json()
        assert [p["name"] for p in listed["prompts"]] == ["mid", "short"]
        assert sorted(listed["errors"]) == ["half", "int-template", "list-meta", "nan"]
        assert "must hold a JSON object" in listed["errors"]["list-meta"]
        assert "'template' must be an object" in listed["errors"]["int-template"]
        assert "NaN" in listed["errors"]["nan"] and "interrupted save" in listed["errors"]["half"]
        SoftPrompt.initialise(base, 3, "random", seed=7).save(prompts_dir / "new")  # a good folder in the same scan
        (prompts_dir / "short" / "softprompt.json").write_text("[]")  # a loaded prompt goes bad
        r = c.post("/admin/reload")
        assert r.status_code == 200 and r.json()["added"] == ["new"] and r.json()["failed"] == ["short"]
        assert sorted(p["name"] for p in c.get("/admin/prompts").json()["prompts"]) == ["mid", "new", "short"]
        assert c.post("/admin/prompts/list-meta").status_code == 400
        body = {"model": "tiny:short", "prompt": "a", "max_tokens": 2}  # the previous version keeps serving
        assert c.post("/v1/completions", json=body).status_code == 200


def test_a_registry_scan_survives_any_exception_in_one_folder(base, prompts_dir, monkeypatch):
    reg = PromptRegistry(base, prompts_dir)
    real = PromptRegistry._load

    def flaky(self, name, path):
        if name == "mid":
            raise KeyError("unexpected")  # not a type the loader anticipates
        return real(self, name, path)

    monkeypatch.setattr(PromptRegistry, "_load", flaky)
    report = reg.scan()
    assert report["added"] == ["short"] and report["failed"] == ["mid"] and "KeyError" in reg.errors["mid"]


# ---- odd JSON is a 400 --------------------------------------------------------------------------------------------


@pytest.fixture()
def client(base, prompts_dir):
    from starlette.testclient import TestClient

    with TestClient(create_app(base, prompts_dir, served_model_name="tiny", watch_interval=0, max_output_tokens=16)) as c:
        yield c


@pytest.mark.parametrize("path, raw, needle", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", "malformed JSON"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "seed": -' + b"1" * 4400 + b"}", "malformed JSON"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfff"}]}',
     "lone UTF-16 surrogate"),
    ("/v1/completions", b'{"model": "tiny:\\ud800", "prompt": "a"}', "lone UTF-16 surrogate"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "temperature: must be a finite number, got nan"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "top_p": -Infinity}', "top_p: must be a finite number"),
])
def test_odd_json_is_a_400(client, path, raw, needle):
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_a_degenerate_temperature_over_http_is_greedy(client, base, mid):
    body = {"model": "tiny:mid", "prompt": GOOD_TEXT, "max_tokens": 5}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for t in (1e-300, 5e-324):
        assert client.post("/v1/completions", json={**body, "temperature": t}).json()["choices"][0]["text"] == greedy


# ---- binding beyond this machine, the key out of the process list --------------------------------------------


def test_a_public_bind_needs_a_key_or_an_explicit_yes(tmp_path, monkeypatch, capsys, prompts_dir):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_exposure(ServeConfig(host=host))
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(SoftPromptError, match="without an API key"):
            check_exposure(ServeConfig(host=host))
        check_exposure(ServeConfig(host=host, api_key="k"))
        check_exposure(ServeConfig(host=host, allow_no_api_key=True))
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    err = cli_error(capsys, ["serve", "--prompts", str(prompts_dir), "--host", "0.0.0.0", "--model", "/nonexistent"])
    assert "--allow-no-api-key" in err  # refused before loading the model
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert read_api_key(None, key) == "s3cret"
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "from-env")
    assert read_api_key(None, None) == "from-env" and read_api_key("flag", None) == "flag"
    key.write_text("")
    with pytest.raises(SoftPromptError, match="expected the key alone"):
        read_api_key(None, key)
    with pytest.raises(SoftPromptError, match="cannot read"):
        read_api_key(None, tmp_path / "absent")


# ---- the fuzzer ----------------------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name.encode("utf-8", "surrogatepass"), safe="")


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
          "seed", "stream", "stream_options", "use_template", "logprobs", "echo", "best_of", "logit_bias",
          "presence_penalty", "response_format", "tools", "suffix"]
ODD_STRINGS = ["", " ", "\ud800", "a\udfffb", "\x00", "tiny", "tiny:mid", "tiny:short", "tiny:absent", "mid",
               "tiny:../mid", "\u2028", "🙂" * 50, "x" * 3000]
ODD_NUMBERS = [0, -1, 1, 2, 7, 10**30, -(10**30), 2**63, 1e-300, 5e-324, 1e308, -0.0, 0.5, 2.0000001,
               float("nan"), float("inf"), float("-inf")]
scalars = (st.none() | st.booleans() | st.sampled_from(ODD_NUMBERS) | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(ODD_STRINGS)
           | st.text(st.characters(codec=None, exclude_categories=()), max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS + ["role", "content", "type", "text"]) | st.text(max_size=8),
                                             inner, max_size=4), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 5]),
                                           "content": scalars | st.lists(st.fixed_dictionaries(
                                               {"type": st.just("text"), "text": scalars}), max_size=2)}), max_size=4)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny:mid", "tiny:short", "short", "nope"]) | scalars},
    optional={"prompt": scalars | st.lists(scalars, max_size=4) | st.lists(st.integers(-5, 400), max_size=6),
              "messages": messages | json_values, "max_tokens": scalars, "temperature": scalars, "top_p": scalars,
              "n": scalars, "stop": scalars | st.lists(scalars, max_size=3), "seed": scalars, "stream": scalars,
              "stream_options": json_values, "use_template": scalars, "logprobs": scalars, "echo": scalars})
RAW = [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe\x00", b'{"model": "tiny", "prompt": "a", "n": ' + b"9" * 5000 + b"}",
       b'{"model": "tiny", "prompt": "\\ud800\\udc00\\ud800"}', b"[" * 100000, b'{"a": ' * 5000]
requests = st.one_of(
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.just("POST"), bodies | json_values),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/admin/reload"]), st.just("POST"),
              st.sampled_from(RAW) | st.binary(max_size=64)),
    st.tuples(st.builds(lambda n: f"/admin/prompts/{n}", st.sampled_from(["short", "absent", "..", "%2e%2e", "a%20b",
                                                                          "x" * 300, "short%00"]) | st.builds(
        _quote, st.text(st.characters(codec=None, exclude_categories=()), max_size=12).filter(lambda n: n != "mid"))),
              st.sampled_from(["POST", "PUT", "DELETE"]), st.none()),
    st.tuples(st.builds(lambda n: f"/v1/models/{_quote(n)}", st.text(st.characters(codec=None, exclude_categories=()),
                                                                      max_size=20)), st.just("GET"), st.none()),
)


def _send(client, path, method, body):
    if isinstance(body, bytes) or body is None:
        content = body or b""
    else:
        try:
            content = json.dumps(body).encode()  # NaN/Infinity as JS-style literals, surrogates as \\ud800
        except ValueError:  # an int too long to print: send it as the raw digits
            content = b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"
    return client.request(method, path, content=content, headers={"Content-Type": "application/json"})


def test_fuzzed_requests_never_5xx_and_never_fail_good_ones(base, mid, prompts_dir):
    """Good greedy requests stream in from 4 threads while Hypothesis sends odd ones (the bodies above, raw bytes,
    admin calls that add/remove/reload 'short'): every odd one gets < 500, every good one the right answer."""
    examples = int(os.environ.get("SOFTPROMPT_FUZZ_EXAMPLES", "150"))
    app = create_app(base, prompts_dir, served_model_name="tiny", watch_interval=0, max_output_tokens=8,
                     max_input_tokens=64, max_n=2, max_body_bytes=64 << 10, request_timeout=30)
    expected = base.tokenizer.decode(reference(base, mid, 4), skip_special_tokens=True)
    good = {"model": "tiny:mid", "prompt": GOOD_TEXT, "max_tokens": 4, "temperature": 0}
    outcome = {"good": 0, "bad": []}
    stop = threading.Event()
    seen_5xx = []

    def good_stream():
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/completions", json=good)
                if r.status_code == 200 and r.json()["choices"][0]["text"] == expected:
                    outcome["good"] += 1
                else:
                    outcome["bad"].append((r.status_code, r.text[:200]))

    with LocalServer(app, log_level="critical") as srv:
        workers = [threading.Thread(target=good_stream) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as fuzz:

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(requests)
                def odd(req):
                    r = _send(fuzz, *req)
                    if r.status_code >= 500:
                        seen_5xx.append((req, r.status_code, r.text[:300]))
                    assert r.status_code < 500, (req, r.text[:300])

                odd()
        finally:
            stop.set()
            for w in workers:
                w.join(60)
    assert not seen_5xx
    assert outcome["bad"] == [] and outcome["good"] >= 4
    assert app.state.server.scheduler.n_running == 0
