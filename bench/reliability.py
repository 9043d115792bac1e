"""Reliability trials: faults injected into training, artifacts and the server, on the tiny test model (CPU, cheap).

    python bench/reliability.py                 # everything (~10 min on 2 CPU cores); JSON in bench/results/
    python bench/reliability.py --only kill     # one part: kill | fsize | corrupt | fuzz | soak

  kill     SIGKILL inside every write (checkpoint, artifact tensor and JSON, log append, plot; a partial temp file
           left behind as a real crash leaves it) and at random moments; then `--resume` (or a plain rerun when no
           checkpoint exists yet). Pass: every file a reader sees is whole, and the final prompt and the log's steps,
           losses and learning rates equal an uninterrupted run bit for bit.
  fsize    the file-size limit (`ulimit -f`, RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) hit inside each of
           those writes: one-line error naming the file, exit 1, the last good checkpoint/artifact intact, resume exact.
  corrupt  corrupt or foreign files of every kind (data, softprompt.json, tensors, PEFT adapters, checkpoint, log,
           config): one line naming the file, never a traceback, never a silent wrong result.
  fuzz     tests/test_serve_fuzz.py's Hypothesis fuzzer with many more examples (127.0.0.1 only).
  soak     a `softprompt serve` process: 10,000 requests (mixed prompts, greedy checked against the answer alone,
           sampled, malformed) from 16 clients while prompt folders are replaced, broken, deleted and reloaded;
           RSS from /metrics.

Faults inside a write are injected by a child process (`--child`) that wraps softprompt's own write functions
(`atomic_write`, the log append); nothing in the library knows about them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 40, 7  # checkpoints at 7, 14, ..., 35 and 40 (the end)
TRAIN_FLAGS = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "8", "--virtual-tokens", "4",
               "--lr", "0.1", "--no-progress", "--dtype", "float32", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


# ---- the child: training with one fault injected inside a write ---------------------------------------------------


def child(fault: dict, argv: list[str]) -> int:
    """Run `softprompt train argv` with `fault` = {"kind": kill|kill-after|fsize, "file": NAME|"append", "nth": N}."""
    sys.path.insert(0, str(ROOT / "src"))
    import importlib

    from softprompt.cli import main

    # import_module: `softprompt.train` as an attribute is the train() function the package exports
    prompt_mod, train_mod = importlib.import_module("softprompt.prompt"), importlib.import_module("softprompt.train")

    counts: dict[str, int] = {}
    real_atomic, real_append = prompt_mod.atomic_write, train_mod._append_log
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def hit(name: str) -> bool:
        counts[name] = counts.get(name, 0) + 1
        return fault["file"] == name and fault["nth"] == counts[name]

    def atomic_write(path, write):
        if hit(path.name):
            if fault["kind"] == "kill":  # die half way through the temp file
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                write(tmp)
                os.truncate(tmp, tmp.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            if fault["kind"] == "fsize":
                resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))  # under every file's size
            if fault["kind"] == "kill-after":  # the file is in place; the next one (or the exit) never comes
                real_atomic(path, write)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_atomic(path, write)

    def append_log(path, record):
        if hit("append"):
            if fault["kind"] == "kill":
                line = (json.dumps(record) + "\n").encode()
                with open(path, "ab") as f:
                    f.write(line[: len(line) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            if fault["kind"] == "fsize":
                resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 25, hard))
        return real_append(path, record)

    prompt_mod.atomic_write = train_mod.atomic_write = atomic_write
    train_mod._append_log = append_log
    return main(["train", *argv])


# ---- helpers ----------------------------------------------------------------------------------------------------


def tiny_model(work: Path) -> Path:
    """The tests' tiny Llama (tests/conftest.py), built once."""
    path = work / "tiny-llama"
    if not (path / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny_model_dir

        make_tiny_model_dir(path)
    return path


def make_data(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import sentiment_rows

    path = work / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(96, 1)))
    return path


def run_train(model: Path, data: Path, out: Path, *extra: str, fault: dict | None = None, timeout: float = 300):
    cmd = [sys.executable, "-m", "softprompt", "train", "--model", str(model), "--data", str(data), "--output", str(out),
           *TRAIN_FLAGS, *extra]
    env = ENV
    if fault is not None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(fault), "--", *cmd[4:]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def log_records(path: Path) -> tuple[list[dict], int]:
    """(parsed records, torn lines) of a metrics.jsonl."""
    records, torn = [], 0
    if path.exists():
        for line in path.read_text(errors="replace").split("\n"):
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                torn += 1
    return records, torn


def whole_files(out: Path) -> list[str]:
    """Problems with any file a reader would open (hidden temp files are not read by anything)."""
    from safetensors.torch import load_file

    problems = []
    for name in ("checkpoint.safetensors", "prompt.safetensors"):
        if (out / name).exists():
            try:
                load_file(str(out / name))
            except Exception as e:  # noqa: BLE001
                problems.append(f"{name}: {e}")
    if (out / "softprompt.json").exists():
        try:
            json.loads((out / "softprompt.json").read_text())
        except ValueError as e:
            problems.append(f"softprompt.json: {e}")
    return problems


def compare(out: Path, ref: Path) -> dict:
    """Data lost or changed against the uninterrupted run: prompt tensor, log steps/losses/lrs."""
    from safetensors.torch import load_file

    got = load_file(str(out / "prompt.safetensors"))["prompt_embeddings"]
    want = load_file(str(ref / "prompt.safetensors"))["prompt_embeddings"]
    keys = ("step", "epoch", "loss", "lr")
    a = [tuple(r.get(k) for k in keys) for r in log_records(out / "metrics.jsonl")[0]]
    b = [tuple(r.get(k) for k in keys) for r in log_records(ref / "metrics.jsonl")[0]]
    return {"prompt_bit_exact": bool((got == want).all()) and got.shape == want.shape, "log_exact": a == b,
            "log_steps": len(a), "temp_files_left": sorted(f.name for f in out.iterdir() if ".tmp-" in f.name)}


def resume_or_rerun(model, data, out):
    extra = ["--resume"] if (out / "checkpoint.safetensors").exists() else []
    return run_train(model, data, out, *extra)


def one_line_error(stderr: str) -> bool:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith("softprompt: error:") and "Traceback" not in stderr


# ---- kill --------------------------------------------------------------------------------------------------------


WRITE_FAULTS = ([("checkpoint.safetensors", n) for n in (1, 3, 6)]  # first, middle, the final save (step 40)
                + [("prompt.safetensors", 1), ("softprompt.json", 1), ("loss.png", 1)]
                + [("append", n) for n in (1, 7, 8, 23, 40)])


def trial_kill(model, data, ref, work, rng, n_random: int) -> list[dict]:
    rows = []
    faults = [{"kind": "kill", "file": f, "nth": n} for f, n in WRITE_FAULTS]
    faults += [{"kind": "kill-after", "file": "prompt.safetensors", "nth": 1},  # tensor in place, JSON not yet
               {"kind": "kill-after", "file": "checkpoint.safetensors", "nth": 2}]
    faults += [{"kind": "random"}] * n_random
    ref_elapsed = log_records(ref / "metrics.jsonl")[0][-1]["elapsed_s"]
    for i, fault in enumerate(faults):
        problems_before: list[str] = []
        out = work / f"kill-{i}"
        shutil.rmtree(out, ignore_errors=True)
        if fault["kind"] == "random":
            delay = rng.uniform(0, ref_elapsed * 1.3)
            proc = subprocess.Popen([sys.executable, "-m", "softprompt", "train", "--model", str(model), "--data",
                                     str(data), "--output", str(out), *TRAIN_FLAGS], env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None and not (out / "metrics.jsonl").exists():
                time.sleep(0.002)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            where = f"random, {delay:.2f}s into training"
        else:
            r = run_train(model, data, out, fault=fault)
            rc = r.returncode
            where = f"{fault['kind']} in {fault['file']} #{fault['nth']}"
            if rc != -signal.SIGKILL:  # the fault never fired: the trial would prove nothing
                problems_before = [f"no kill (exit {rc}): {r.stderr.strip()[-400:]}"]
        killed_at = len(log_records(out / "metrics.jsonl")[0])
        problems = problems_before + whole_files(out)
        torn = log_records(out / "metrics.jsonl")[1]
        temps = len([f for f in out.iterdir() if ".tmp-" in f.name]) if out.exists() else 0
        runs = 0
        while not (out / "prompt.safetensors").exists() or not (out / "softprompt.json").exists() or \
                not (out / "loss.png").exists():
            r = resume_or_rerun(model, data, out)
            runs += 1
            if r.returncode or runs > 2:
                problems.append(f"resume failed: {r.stderr.strip()[-300:]}")
                break
        if (out / "softprompt.json").exists() and rc == 0 and runs == 0:  # the kill came after the end
            where += " (after the run ended)"
        if runs == 0 and not problems:  # the run had finished: --resume of a finished run must change nothing
            r = run_train(model, data, out, "--resume")
            if r.returncode:
                problems.append(f"resume of a finished run failed: {r.stderr.strip()[-300:]}")
        cmp = compare(out, ref) if (out / "prompt.safetensors").exists() else {"prompt_bit_exact": False}
        rows.append({"fault": where, "exit": rc, "log_lines_at_kill": killed_at, "torn_log_lines": torn,
                     "temp_files_at_kill": temps, "half_written_files_read": problems, **cmp,
                     "ok": not problems and cmp.get("prompt_bit_exact") and cmp.get("log_exact")
                     and not cmp.get("temp_files_left")})
        print(f"kill {i:2d} {where:45s} -> {'ok' if rows[-1]['ok'] else 'FAIL ' + json.dumps(rows[-1])}", flush=True)
    return rows


# ---- fsize -------------------------------------------------------------------------------------------------------


def trial_fsize(model, data, ref, work) -> list[dict]:
    from safetensors import safe_open

    rows = []
    targets = [("checkpoint.safetensors", 1), ("checkpoint.safetensors", 3), ("checkpoint.safetensors", 6),
               ("prompt.safetensors", 1), ("softprompt.json", 1), ("loss.png", 1), ("append", 3), ("append", 30)]
    for i, (name, nth) in enumerate(targets):
        out = work / f"fsize-{i}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_train(model, data, out, fault={"kind": "fsize", "file": name, "nth": nth})
        stderr = r.stderr.strip()
        named = name if name != "append" else "metrics.jsonl"
        one_line = one_line_error(stderr) and named in stderr.splitlines()[-1]
        ckpt_step = None
        if (out / "checkpoint.safetensors").exists():
            with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
                ckpt_step = json.loads(f.metadata()["state"])["step"]
        expected_ckpt = {("checkpoint.safetensors", 1): None, ("checkpoint.safetensors", 3): 14,
                         ("checkpoint.safetensors", 6): 35, ("append", 3): None, ("append", 30): 28}.get((name, nth), 40)
        problems = whole_files(out)
        temps = sorted(f.name for f in out.iterdir() if ".tmp-" in f.name) if out.exists() else []
        r2 = resume_or_rerun(model, data, out)
        if r2.returncode:
            problems.append(f"resume failed: {r2.stderr.strip()[-300:]}")
        cmp = compare(out, ref) if not r2.returncode else {}
        row = {"fault": f"file-size limit in {named} #{nth}", "exit": r.returncode, "message": stderr.splitlines()[-1]
               if stderr else "", "stderr_tail": stderr[-600:] if not one_line else "", "one_line_naming_file": one_line, "checkpoint_step_after": ckpt_step,
               "checkpoint_as_expected": ckpt_step == expected_ckpt, "temp_files_left": temps,
               "half_written_files_read": problems, **cmp}
        row["ok"] = (r.returncode == 1 and one_line and row["checkpoint_as_expected"] and not temps and not problems
                     and cmp.get("prompt_bit_exact") and cmp.get("log_exact"))
        rows.append(row)
        print(f"fsize {i} {row['fault']:45s} -> {'ok' if row['ok'] else 'FAIL ' + json.dumps(row)}", flush=True)
    return rows


# ---- corrupt -----------------------------------------------------------------------------------------------------


def trial_corrupt(model, data, ref, work) -> list[dict]:
    """Each case: (what, setup(dir) -> argv, the text its one-line error must contain, or None: must succeed)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "src"))
    from softprompt.cli import main

    good = ref  # a finished artifact to copy and break

    def artifact(d: Path, name="p") -> Path:
        shutil.copytree(good, d / name, ignore=shutil.ignore_patterns("checkpoint*", "metrics*", "loss*"))
        return d / name

    def gen(p):
        return ["generate", "--model", str(model), "--prompt", str(p), "hello"]

    def data_case(content: bytes, suffix=".jsonl"):
        def setup(d):
            (d / f"data{suffix}").write_bytes(content)
            return ["train", "--model", str(model), "--data", str(d / f"data{suffix}"), "--output", str(d / "o"),
                    *TRAIN_FLAGS, "--steps", "2"]  # the last --steps wins
        return setup

    def meta_case(text: str):
        def setup(d):
            p = artifact(d)
            (p / "softprompt.json").write_text(text)
            return gen(p)
        return setup

    def tensor_case(tensor=None, raw: bytes | None = None):
        def setup(d):
            p = artifact(d)
            if raw is not None:
                (p / "prompt.safetensors").write_bytes(raw)
            else:
                save_file({"prompt_embeddings": tensor}, str(p / "prompt.safetensors"))
            return gen(p)
        return setup

    def peft_case(config: str | None = None, tensor=None):
        def setup(d):
            sys.path.insert(0, str(ROOT / "src"))
            from softprompt.peft_io import export_peft

            p = export_peft(str(artifact(d, "src")), d / "adapter")
            if config is not None:
                (p / "adapter_config.json").write_text(config)
            if tensor is not None:
                save_file({"prompt_embeddings": tensor}, str(p / "adapter_model.safetensors"))
            return gen(p)
        return setup

    def ckpt_case(mutate):
        def setup(d):
            out = d / "run"
            shutil.copytree(good, out)
            (out / "prompt.safetensors").unlink()
            mutate(out / "checkpoint.safetensors")
            return ["train", "--model", str(model), "--data", str(data), "--output", str(out), *TRAIN_FLAGS, "--resume"]
        return setup

    def shapes(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        save_file({k: torch.zeros(5, *v.shape[1:]) for k, v in load_file(str(path)).items()}, str(path), metadata=meta)

    def torn_log(d):
        out = d / "run"
        shutil.copytree(good, out)
        (out / "prompt.safetensors").unlink()
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 41, "lo')
        return ["train", "--model", str(model), "--data", str(data), "--output", str(out), *TRAIN_FLAGS, "--resume"]

    def config_case(text: str):
        def setup(d):
            (d / "c.json").write_text(text)
            return ["train", "--config", str(d / "c.json"), "--data", str(data), "--output", str(d / "o")]
        return setup

    def half_saved(d):
        p = artifact(d)
        (p / "softprompt.json").unlink()
        return gen(p)

    nan = torch.full((4, 32), float("nan"))
    cases = [
        ("data: invalid UTF-8", data_case(b'{"input": "a", "output": "b"}\n{"input": "\xff", "output": "b"}\n'),
         "data.jsonl:2: not UTF-8"),
        ("data: UTF-16", data_case('{"input": "a", "output": "b"}\n'.encode("utf-16")), "UTF-16"),
        ("data: binary", data_case(os.urandom(2048) + b"\x00", ".csv"), "data.csv:"),
        ("data: CSV with a BOM", data_case(b"\xef\xbb\xbfinput,output\nthe film was great,positive\n", ".csv"), None),
        ("data: torn JSON line", data_case(b'{"input": "a", "output": "b"}\n{"input": "a", "out'), "data.jsonl:2"),
        ("data: null output", data_case(b'{"input": "a", "output": null}\n'), "row 1: field 'output' is null"),
        ("data: NaN", data_case(b'{"input": NaN, "output": "b"}\n'), "row 1: field 'input' is nan"),
        ("data: Infinity", data_case(b'{"input": "a", "output": Infinity}\n'), "field 'output' is inf"),
        ("data: nested object", data_case(b'{"input": {"a": 1}, "output": "b"}\n'), "nested object"),
        ("data: 5000-digit integer", data_case(b'{"input": ' + b"9" * 5000 + b', "output": "b"}\n'), "data.jsonl:1"),
        ("data: a JSON list, not rows", data_case(b"[1, 2]", ".json"), "must hold a list of objects"),
        ("softprompt.json = []", meta_case("[]"), "softprompt.json must hold a JSON object"),
        ('softprompt.json = {"base": "x"}', meta_case('{"base": "x"}'), "field 'base' must be an object"),
        ('softprompt.json = {"template": 5}', meta_case('{"template": 5}'), "field 'template' must be an object"),
        ("softprompt.json truncated", meta_case('{"format_version": 1, "n_vir'), "softprompt.json is not valid JSON"),
        ("softprompt.json missing (half-saved)", half_saved, "without softprompt.json"),
        ("prompt.safetensors truncated", tensor_case(raw=(good / "prompt.safetensors").read_bytes()[:100]),
         "prompt.safetensors is not a readable safetensors file"),
        ("prompt.safetensors zeros", tensor_case(raw=b"\x00" * 256), "prompt.safetensors is not a readable"),
        ("prompt.safetensors NaN", tensor_case(nan), "prompt.safetensors: the prompt holds NaN"),
        ("prompt.safetensors 1e30", tensor_case(torch.full((4, 32), 1e30)), "values up to 1e+30"),
        ("prompt.safetensors 0 tokens", tensor_case(torch.zeros(0, 32)), "no virtual tokens"),
        ("prompt.safetensors wrong width", tensor_case(torch.zeros(4, 33)), "width 33 does not match"),
        ("adapter_config.json = []", peft_case("[]"), "adapter_config.json must hold a JSON object"),
        ("adapter_config.json truncated", peft_case('{"peft_type": "PROM'), "adapter_config.json is not valid JSON"),
        ("PEFT adapter 0 tokens", peft_case(tensor=torch.zeros(0, 32)), "no virtual tokens"),
        ("PEFT adapter NaN", peft_case(tensor=torch.full((4, 32), float("nan"))), "NaN or infinite"),
        ("checkpoint truncated", ckpt_case(lambda p: p.write_bytes(p.read_bytes()[:300])),
         "checkpoint.safetensors is not a readable checkpoint"),
        ("checkpoint garbage", ckpt_case(lambda p: p.write_bytes(os.urandom(4096))), "checkpoint.safetensors"),
        ("checkpoint wrong shapes", ckpt_case(shapes), "tensor 'param/embeddings' is (5, 32)"),
        ("metrics.jsonl torn last line (resume)", torn_log, None),
        ("config file = []", config_case("[]"), "c.json: a config file must hold a mapping"),
        ("config file truncated", config_case('{"steps": '), "c.json: cannot parse config"),
    ]
    rows = []
    for what, setup, needle in cases:
        d = Path(tempfile.mkdtemp(dir=work, prefix="corrupt-"))
        argv = setup(d)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except BaseException as e:  # noqa: BLE001  a traceback would be the failure this looks for
                rc, _ = -1, err.write(f"UNCAUGHT {type(e).__name__}: {e}")
        text = err.getvalue().strip()
        last = text.splitlines()[-1] if text else ""
        if needle is None:
            ok = rc == 0 and "Traceback" not in text
        else:
            ok = rc == 1 and one_line_error(text) and needle in last
        rows.append({"case": what, "exit": rc, "message": last[:240], "ok": ok})
        print(f"corrupt {what:42s} -> {'ok' if ok else 'FAIL'}: {last[:160]}", flush=True)
    return rows


# ---- fuzz --------------------------------------------------------------------------------------------------------


def trial_fuzz(examples: int) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_serve_fuzz.py"),
                        "-k", "fuzzed"], env={**ENV, "SOFTPROMPT_FUZZ_EXAMPLES": str(examples)}, capture_output=True,
                       text=True, cwd=ROOT)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    print(f"fuzz {examples} examples -> {tail}", flush=True)
    return {"examples": examples, "passed": r.returncode == 0, "summary": tail, "seconds": round(time.time() - t0, 1)}


# ---- soak --------------------------------------------------------------------------------------------------------


def answer_text(r, stream: bool) -> str | None:
    """The completion's text, or None for an error (status, or an error event inside a stream)."""
    if r.status_code != 200:
        return None
    if not stream:
        return r.json()["choices"][0]["text"]
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    if any("error" in e for e in events) or not r.text.rstrip().endswith("data: [DONE]"):
        return None
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def trial_soak(model, work, n_requests: int, concurrency: int = 16) -> dict:
    import asyncio

    import httpx

    sys.path.insert(0, str(ROOT / "src"))
    from softprompt import SoftPrompt, load_model

    chat_model = work / "tiny-llama-chat"  # the tests' tiny model plus a chat template, for chat requests
    if not chat_model.exists():
        shutil.copytree(model, chat_model)
        config = json.loads((chat_model / "tokenizer_config.json").read_text())
        config["chat_template"] = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} .\n{% endfor %}"
                                   "{% if add_generation_prompt %}assistant :{% endif %}")
        (chat_model / "tokenizer_config.json").write_text(json.dumps(config))
    model = chat_model
    base = load_model(str(model), dtype="float32", device="cpu")
    prompts = work / "soak-prompts"
    shutil.rmtree(prompts, ignore_errors=True)
    for i, n in enumerate((2, 5, 9)):
        SoftPrompt.initialise(base, n, "random", seed=i).save(prompts / f"stable{i}")
    churn = [SoftPrompt.initialise(base, 3 + i, "random", seed=10 + i) for i in range(3)]
    churn[0].save(prompts / "churn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "soak-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", str(model), "--prompts",
                               str(prompts), "--port", str(port), "--served-model-name", "tiny", "--watch-interval", "0.5", "--max-waiting", "1024",
                               "--max-output-tokens", "16", "--dtype", "float32", "--device", "cpu"], env=ENV,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    texts = ["the film was great", "Review : the plot was awful . Sentiment", "the meal", "this phone was superb"]
    stats = {"sent": 0, "good_ok": 0, "good_failed": 0, "bad_4xx": 0, "sampled_ok": 0, "churn_ok": 0, "churn_404": 0,
             "5xx": 0, "other": 0, "reloads": 0, "folder_changes": 0, "failures": []}

    def rss(c):
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith("softprompt_resident_memory_bytes"):
                return int(float(line.split()[1]))
        return 0

    async def run():
        rng = random.Random(0)
        expected: dict[tuple[str, str], str] = {}
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for name in ("tiny", "stable0", "stable1", "stable2"):  # the answer each gets alone, before the load
                for t in texts:
                    model_id = "tiny" if name == "tiny" else f"tiny:{name}"
                    r = await c.post("/v1/completions", json={"model": model_id, "prompt": t, "max_tokens": 8,
                                                              "temperature": 0})
                    expected[(model_id, t)] = r.json()["choices"][0]["text"]
            rss_start = rss(c)
            queue = list(range(n_requests))

            async def worker(wid):
                while queue:
                    k = queue.pop()
                    kind = rng.random()
                    stats["sent"] += 1
                    if kind < 0.55:  # greedy on a stable prompt (or none): must equal the answer alone
                        model_id = rng.choice(["tiny", "tiny:stable0", "tiny:stable1", "tiny:stable2"])
                        t = rng.choice(texts)
                        r = await c.post("/v1/completions", json={"model": model_id, "prompt": t, "max_tokens": 8,
                                                                  "temperature": 0, "stream": k % 5 == 0})
                        text = answer_text(r, stream=k % 5 == 0)
                        if text == expected[(model_id, t)]:
                            stats["good_ok"] += 1
                        else:
                            stats["good_failed"] += 1
                            stats["failures"].append((model_id, t, r.status_code, r.text[:200]))
                    elif kind < 0.7:  # sampled (with degenerate temperatures now and then), chat too
                        temp = rng.choice([0.7, 1.0, 1e-300, 5e-324, 2.0])
                        if rng.random() < 0.5:
                            r = await c.post("/v1/chat/completions", json={"model": "tiny:stable1", "max_tokens": 6,
                                             "messages": [{"role": "user", "content": rng.choice(texts)}],
                                             "temperature": temp})
                        else:
                            r = await c.post("/v1/completions", json={"model": "tiny:stable2", "prompt": rng.choice(texts),
                                                                      "max_tokens": 6, "temperature": temp, "n": 2})
                        stats["sampled_ok" if r.status_code == 200 else ("5xx" if r.status_code >= 500 else "other")] += 1
                    elif kind < 0.8:  # the prompt being replaced and broken: 200 or 404, never 5xx
                        r = await c.post("/v1/completions", json={"model": "tiny:churn", "prompt": rng.choice(texts),
                                                                  "max_tokens": 4, "temperature": 0})
                        stats["churn_ok" if r.status_code == 200 else "churn_404" if r.status_code == 404
                              else "5xx" if r.status_code >= 500 else "other"] += 1
                    else:  # malformed
                        body = rng.choice([b"{", b"[]", b'{"model": "tiny", "prompt": "\\ud800"}',
                                           b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
                                           b'{"model": "tiny:nope", "prompt": "a"}',
                                           b'{"model": "tiny", "prompt": "a", "temperature": NaN}'])
                        r = await c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
                        stats["bad_4xx" if 400 <= r.status_code < 500 else "5xx"] += 1
                    if r.status_code >= 500:
                        stats["failures"].append(("5xx", r.status_code, r.text[:200]))

            async def churner():
                i = 0
                while queue:
                    await asyncio.sleep(0.05)
                    i += 1
                    folder = prompts / "churn"
                    action = i % 4
                    if action == 0:  # replace with another prompt (atomic per file, as our save does)
                        churn[i % 3].save(folder)
                    elif action == 1:  # break it: a foreign softprompt.json
                        (folder / "softprompt.json").write_text("[]")
                    elif action == 2:  # delete it
                        shutil.rmtree(folder, ignore_errors=True)
                    else:
                        churn[i % 3].save(folder)
                    stats["folder_changes"] += 1
                    if i % 3 == 0:
                        r = await c.post("/admin/reload")
                        stats["reloads"] += 1
                        if r.status_code != 200:
                            stats["5xx" if r.status_code >= 500 else "other"] += 1

            t0 = time.time()
            await asyncio.gather(churner(), *[worker(w) for w in range(concurrency)])
            stats["seconds"] = round(time.time() - t0, 1)
            await asyncio.sleep(1.0)
            stats["rss_start_mb"] = round(rss_start / 2**20, 1)
            stats["rss_end_mb"] = round(rss(c) / 2**20, 1)

    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(Exception):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        asyncio.run(run())
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(60)
        if server.poll() is None:
            server.kill()
        log.close()
    stats["rss_growth_mb"] = round(stats["rss_end_mb"] - stats["rss_start_mb"], 1)
    stats["failures"] = stats["failures"][:10]
    stats["ok"] = stats["good_failed"] == 0 and stats["5xx"] == 0
    print("soak", json.dumps(stats), flush=True)
    return stats


def table(results: dict) -> str:
    """The BENCHMARKS.md summary of a results JSON."""
    lines = ["| trials | fault injected | outcome | data lost |", "| ---: | --- | --- | ---: |"]
    kill = results.get("kill", [])
    if kill:
        inside = [r for r in kill if not r["fault"].startswith("random")]
        rand = [r for r in kill if r["fault"].startswith("random")]
        for rows, what in ((inside, "SIGKILL inside a write: checkpoint (1st, 3rd, final), prompt.safetensors, "
                                    "softprompt.json, loss.png, log append (steps 1, 7, 8, 23, 40); and right after "
                                    "the tensor / a checkpoint"),
                           (rand, "SIGKILL at a random moment of training")):
            ok = sum(bool(r["ok"]) for r in rows)
            torn = sum(r.get("torn_log_lines", 0) for r in rows)
            temps = sum(r.get("temp_files_at_kill", 0) for r in rows)
            lines.append(f"| {len(rows)} | {what} | {ok}/{len(rows)} resumed bit-exact (prompt, log steps/losses/lr); "
                         f"{torn} torn log lines and {temps} temp files left by the kills, all dropped/removed; "
                         f"0 half-written files read | {len(rows) - ok} |")
    fs = results.get("fsize", [])
    if fs:
        ok = sum(bool(r["ok"]) for r in fs)
        lines.append(f"| {len(fs)} | file-size limit (RLIMIT_FSIZE, EFBIG) inside each write: checkpoint (1st, 3rd, "
                     f"final), prompt.safetensors, softprompt.json, loss.png, log append (steps 3, 30) | {ok}/{len(fs)}: "
                     "exit 1 with one line naming the file, last good checkpoint intact, no temp file left, resume "
                     f"bit-exact | {len(fs) - ok} |")
    co = results.get("corrupt", [])
    if co:
        ok = sum(bool(r["ok"]) for r in co)
        lines.append(f"| {len(co)} | corrupt or foreign files: data (invalid UTF-8, UTF-16, binary, BOM, torn line, "
                     "null, NaN, Infinity, nested, 5000-digit int), softprompt.json, prompt.safetensors, PEFT adapters, "
                     f"checkpoint, torn log, config | {ok}/{len(co)}: one line naming the file (line/field), no "
                     f"traceback; BOM CSV and torn log work | {len(co) - ok} |")
    fz = results.get("fuzz")
    if fz:
        lines.append(f"| {fz['examples']} | Hypothesis-fuzzed requests (completion, chat, admin; odd JSON, raw bytes) "
                     f"with 4 concurrent good clients | {'0 5xx, 0 good failed' if fz['passed'] else 'FAILED'} "
                     f"({fz['summary']}) | 0 |")
    so = results.get("soak")
    if so:
        lines.append(f"| {so['sent']} | soak: mixed prompts (greedy checked, sampled, chat, malformed) from 16 clients, "
                     f"{so['folder_changes']} prompt-folder replacements/breakages/deletions, {so['reloads']} reloads | "
                     f"{so['good_ok']} good answered exactly, {so['good_failed']} failed, {so['5xx']} 5xx, "
                     f"{so['bad_4xx']} malformed got 4xx; RSS {so['rss_start_mb']} → {so['rss_end_mb']} MB "
                     f"({so['seconds']} s) | 0 |")
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["kill", "fsize", "corrupt", "fuzz", "soak"], action="append")
    ap.add_argument("--random-kills", type=int, default=12)
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument("--fuzz-examples", type=int, default=2000)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    ap.add_argument("--table", metavar="JSON", help="print the markdown summary of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    parts = args.only or ["kill", "fsize", "corrupt", "fuzz", "soak"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="softprompt-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = tiny_model(work)
    data = make_data(work)
    ref = work / "reference"
    if any(p in parts for p in ("kill", "fsize", "corrupt")) and not (ref / "loss.png").exists():
        shutil.rmtree(ref, ignore_errors=True)
        r = run_train(model, data, ref)
        assert r.returncode == 0, r.stderr
    # parts run now replace those in an existing results file; the others are kept
    results: dict = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results.update({"steps": STEPS, "save_every": SAVE_EVERY})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    trials = {"corrupt": lambda: trial_corrupt(model, data, ref, work),
              "fsize": lambda: trial_fsize(model, data, ref, work),
              "kill": lambda: trial_kill(model, data, ref, work, random.Random(1), args.random_kills),
              "soak": lambda: trial_soak(model, work, args.soak_requests),
              "fuzz": lambda: trial_fuzz(args.fuzz_examples)}
    for part in [p for p in trials if p in parts]:
        results[part] = trials[part]()
        results["seconds"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # each part as it ends
    ok = all(r["ok"] for k in ("kill", "fsize", "corrupt") for r in results.get(k, []))
    ok = ok and results.get("fuzz", {"passed": True})["passed"] and results.get("soak", {"ok": True})["ok"]
    print(f"{'ALL OK' if ok else 'FAILURES'} in {results['seconds']}s; wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(json.loads(sys.argv[2]), sys.argv[4:]))
    sys.exit(main())
