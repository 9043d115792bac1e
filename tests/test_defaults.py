"""Defaults that decide by themselves: the measured dtype, the time budget, the chat format, quick eval."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import chat_model_copy, sentiment_rows, write_jsonl
from softprompt import SoftPromptError, load_model, train
from softprompt import precision
from softprompt.budget import END_RESERVE_S, SAFETY, BudgetPlanner, RunLength, pace, parse_duration, process_age
from softprompt.cli import main
from softprompt.train import lr_at


# ---- dtype auto --------------------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_probe(monkeypatch, seconds: dict[str, float]):
    calls = []

    def probe(dtypes, hidden, ffn, device, config=None, purpose="inference"):
        calls.append((hidden, ffn, purpose))
        return {precision.NAMES[d]: seconds[precision.NAMES[d]] for d in dtypes}

    monkeypatch.setattr(precision, "probe_seconds", probe)
    return calls


def test_auto_dtype_follows_the_measurement_and_is_cached_per_shape(cache_dir, monkeypatch):
    cpu = torch.device("cpu")
    calls = fake_probe(monkeypatch, {"float32": 2.0, "bfloat16": 1.0})  # a CPU with fast bf16
    first = precision.choose_dtype(cpu, 64, 256)
    assert first.dtype == "bfloat16" and first.speedup == 2.0 and not first.cached and "float32" in first.reason
    again = precision.choose_dtype(cpu, 64, 256)
    assert again.dtype == "bfloat16" and again.cached and len(calls) == 1  # measured once per machine + shape
    assert (cache_dir / "dtype-probe.json").exists()
    precision.choose_dtype(cpu, 128, 256)
    assert len(calls) == 2  # another model shape is measured anew

    calls = fake_probe(monkeypatch, {"float32": 1.0, "bfloat16": 0.9})  # bf16 barely faster: not worth its precision
    assert precision.choose_dtype(cpu, 32, 32, use_cache=False).dtype == "float32"
    fake_probe(monkeypatch, {"float32": 1.0, "bfloat16": 2.0})  # bf16 slower (a CPU without bf16 units)
    slow = precision.choose_dtype(cpu, 32, 48, use_cache=False)
    assert slow.dtype == "float32" and "0.50x" in slow.reason


def test_a_broken_cache_file_only_means_measuring_again(cache_dir, monkeypatch):
    cache_dir.mkdir(parents=True)
    (cache_dir / "dtype-probe.json").write_text("{not json")
    fake_probe(monkeypatch, {"float32": 3.0, "bfloat16": 1.0})
    assert precision.choose_dtype(torch.device("cpu"), 64, 256).dtype == "bfloat16"
    assert json.loads((cache_dir / "dtype-probe.json").read_text())  # rewritten whole


def test_the_real_probe_runs_fast_and_returns_a_time_per_dtype(tiny_base):
    times = precision.probe_seconds([torch.float32, torch.bfloat16], 64, 128, torch.device("cpu"))
    assert set(times) == {"float32", "bfloat16"} and all(0 < t < 1 for t in times.values())
    # one decoder layer of the model's own architecture, forward + backward (train) or forward (inference)
    assert precision.layer_calls([torch.float32], tiny_base.config, torch.device("cpu"), "train") is not None
    for purpose in precision.PURPOSES:
        times = precision.probe_seconds([torch.float32, torch.bfloat16], 64, 128, torch.device("cpu"),
                                        config=tiny_base.config, purpose=purpose)
        assert set(times) == {"float32", "bfloat16"} and all(0 < t < 1 for t in times.values())


def test_training_and_inference_are_measured_apart(cache_dir, monkeypatch, tiny_base):
    calls = fake_probe(monkeypatch, {"float32": 2.0, "bfloat16": 1.0})
    cpu = torch.device("cpu")
    assert precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="train").dtype == "bfloat16"
    assert precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="inference").cached is False
    assert precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="train").cached
    assert [c[2] for c in calls] == ["train", "inference"]


def test_train_records_the_chosen_dtype(tiny_model_dir, sentiment_files, tmp_path, cache_dir, monkeypatch):
    fake_probe(monkeypatch, {"float32": 2.0, "bfloat16": 1.0})
    base = load_model(str(tiny_model_dir), device="cpu")  # dtype="auto"
    assert base.dtype == torch.bfloat16 and base.dtype_choice.auto
    result = train(base=base, data=str(sentiment_files[0]), output=str(tmp_path / "run"), steps=2, batch_size=8,
                   virtual_tokens=3, progress=False)
    assert result.prompt.embeddings.dtype == torch.float32  # the trainable prompt stays fp32
    meta = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert meta["precision"]["dtype"] == "bfloat16" and meta["precision"]["auto"] is True
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["dtype"] == "bfloat16" and first["planned_steps"] == 2
    assert load_model(str(tiny_model_dir), dtype="float32").dtype_choice.auto is False


# ---- run length and the time budget --------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("1h30m", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10 minutes", "-5m", "0", "m"])
def test_bad_durations_name_the_field(text):
    with pytest.raises(SoftPromptError, match="time_budget"):
        parse_duration(text)


def test_default_run_length_is_three_epochs_within_ten_minutes():
    length = RunLength.from_config(None, None, None, steps_per_epoch=500)
    assert length.cap == 1500 and length.budget_s == 600 and "default" in length.how
    assert RunLength.from_config(40, None, None, 500).budget_s is None  # --steps alone: exactly that
    assert RunLength.from_config(None, 2.0, None, 500).cap == 1000
    assert RunLength.from_config(None, None, "2m", 500).cap is None


def test_budget_planner_fits_the_steps_into_the_budget_and_corrects_itself():
    """A fake clock: 10 s of loading, then 1 s a step, 300 s budget; later the steps slow down to 2 s."""
    length = RunLength(cap=None, budget_s=300.0, how="time budget 300s")
    planner = BudgetPlanner(length, started=0.0)
    state = {"step": 0, **length.initial_state()}
    now = 10.0

    def steps(n, seconds, eval_every=None, eval_s=None):
        nonlocal now
        said = None
        for _ in range(n):
            now += seconds
            state["step"] += 1
            planner.observe(seconds, None)
            said = planner.replan(state, now, eval_every) or said
        return said

    assert steps(5, 1.0) is None and state["total"] == 1000  # still calibrating: a provisional total
    assert "planned" in steps(1, 1.0)
    more = int((284 * SAFETY - END_RESERVE_S) / 1.0)
    assert state["total"] == 6 + more and state["next_plan"] == 6 + more // 3
    first_total, first_next = state["total"], state["next_plan"]
    steps(first_next - 6, 2.0)  # slower steps than measured: the plan shrinks to fit, at the latest steps' pace
    now_at = 16 + 2.0 * (first_next - 6)
    assert state["total"] == first_next + int(((300 - now_at) * SAFETY - END_RESERVE_S) / 2.0) < first_total
    while state["next_plan"] is not None:
        steps(1, 2.0)
    assert now + 2.0 * (state["total"] - state["step"]) <= 300  # it ends inside the budget
    # The last stretch: when its steps slow down (here by half), the tail shrinks to what still fits.
    final, said = state["total"], None
    while state["step"] < state["total"]:
        said = steps(1, 3.0) or said
    assert said and "slowed" in said and state["total"] < final
    assert now <= 300 - END_RESERVE_S  # the planned 2 s steps took 3 s, and the run still ends in time
    # Validation passes to come are part of the cost of a step.
    with_eval = BudgetPlanner(length, started=0.0, step_times=[1.0] * 7, eval_times=[20.0])
    st = {"step": 7, "total": 1000, "next_plan": 6}
    with_eval.replan(st, 17.0, eval_every=10)
    assert st["total"] == 7 + int(((300 - 17) * SAFETY - END_RESERVE_S - 20) / 3.0)
    capped = RunLength(cap=50, budget_s=1e6, how="x")
    st = {"step": 6, "total": 50, "next_plan": 6}
    BudgetPlanner(capped, started=0.0, step_times=[1.0] * 6).replan(st, 6.0, eval_every=None)
    assert st["total"] == 50 and st["next_plan"] is None  # the epoch cap binds: nothing more to plan


def test_pace_follows_a_slowdown_but_not_a_speedup():
    assert pace([9.0] + [1.0] * 30) == 1.0  # the first step's one-off costs are not counted
    assert pace([1.0] * 20 + [2.0] * 10) == 2.0  # slower lately: plan at the latest pace
    assert pace([2.0] * 20 + [1.0] * 10) == pytest.approx(48 / 29)  # faster lately: the mean, the safer guess


def test_replanning_runs_at_the_same_steps_in_every_process():
    """`due` reads only the shared plan (not the local clock): distributed processes agree on when to sync."""
    planner = BudgetPlanner(RunLength(cap=None, budget_s=100.0, how="x"), started=0.0, step_times=[1.0] * 3)
    assert planner.due({"step": 6, "total": 50, "next_plan": 6}) and not planner.due({"step": 5, "total": 50,
                                                                                      "next_plan": 6})
    assert [s for s in range(40, 50) if planner.due({"step": s, "total": 50, "next_plan": None})] == [42, 48]
    assert not BudgetPlanner(RunLength(cap=5, budget_s=None, how="x"), started=0.0).due({"step": 6, "total": 5,
                                                                                          "next_plan": None})


def test_process_age_is_this_process_s():
    age = process_age()
    if age is None:
        pytest.skip("no /proc here")
    import time

    assert 0.0 < age < time.monotonic() + 1.0  # it started before now, and after the machine booted


def test_the_command_s_budget_counts_from_the_process_start(monkeypatch, tmp_path):
    """The command line's train gets the process's start (imports included); a call from Python, its own."""
    from softprompt import cli

    seen = []
    monkeypatch.setattr(cli, "process_age", lambda: 7.0)
    monkeypatch.setattr(cli, "_cmd_train", lambda args: seen.append(args.started_at) or 0)
    import time

    before = time.perf_counter()
    monkeypatch.setattr(sys, "argv", ["softprompt", "train", "--data", "x.jsonl", "--output", str(tmp_path)])
    cli.main()
    cli.main(["train", "--data", "x.jsonl", "--output", str(tmp_path)])
    after = time.perf_counter()
    assert before - 7.0 <= seen[0] <= after - 7.0 and before <= seen[1] <= after
    monkeypatch.setattr(cli, "process_age", lambda: 3600.0)  # a long-lived program calling main(): not the wait
    cli.main()
    assert seen[2] >= before


def test_time_budget_run_plans_its_steps_and_decays_to_zero(tiny_model_dir, tmp_path, monkeypatch):
    """A fake clock (every reading 10 ms later) makes the run's timing, and so its plan, independent of load."""
    import sys

    train_module = sys.modules["softprompt.train"]

    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 0.01
        return clock["t"]

    monkeypatch.setattr(train_module, "time", type("FakeTime", (), {"perf_counter": staticmethod(perf_counter)}))
    base = load_model(str(tiny_model_dir), dtype="float32")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(400, 1))
    result = train(base=base, data=str(data), output=str(tmp_path / "run"), time_budget="20s", batch_size=8,
                   virtual_tokens=3, progress=False, save_every=1000)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    planned = [r["planned_steps"] for r in log if "planned_steps" in r]
    assert planned[0] == 1000 and len(planned) >= 3  # a provisional total, then the plan and its corrections
    assert planned[-1] == result.metrics["steps"] == len(log)
    assert 250 < len(log) < 500 and log[-1]["elapsed_s"] < 20.0
    assert log[-1]["lr"] < 0.05 * max(r["lr"] for r in log)  # the schedule still ends near zero
    assert max(r["lr"] for r in log) > 0.9 * result.prompt.meta["training"]["lr"]  # ... after reaching its peak
    assert result.metrics["run_length"] == "time budget 20s"


def test_lr_schedule_warms_up_and_decays(tiny_model_dir):
    from softprompt.config import TrainConfig

    cfg = TrainConfig(data="x", output="y", lr=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] < lrs[5] == pytest.approx(0.1) and lrs[-1] < 0.001


# ---- the chat format by default ---------------------------------------------------------------------


@pytest.fixture
def chat_model_dir(tiny_model_dir, tmp_path):
    return chat_model_copy(tiny_model_dir, tmp_path / "tiny-chat")


def test_chat_is_on_by_default_for_a_model_with_a_chat_template(chat_model_dir, sentiment_files, tmp_path):
    base = load_model(str(chat_model_dir), dtype="float32")
    common = dict(base=base, data=str(sentiment_files[0]), steps=1, batch_size=8, virtual_tokens=2, progress=False)
    on = train(output=str(tmp_path / "on"), **common)
    assert on.prompt.template["chat"] is True and on.prompt.template["output"] == "{output}"
    off = train(output=str(tmp_path / "off"), chat=False, **common)
    assert off.prompt.template["chat"] is False
    lm = train(output=str(tmp_path / "lm"), lm=True, output_template="{input}", **common)
    assert lm.prompt.template["chat"] is False  # a corpus has no user turn
    # The CLI flag pair: --no-chat turns it off.
    assert main(["train", "--data", str(sentiment_files[0]), "--output", str(tmp_path / "cli"), "--model",
                 str(chat_model_dir), "--steps", "1", "--batch-size", "8", "--no-chat", "--no-progress"]) == 0
    assert json.loads((tmp_path / "cli" / "softprompt.json").read_text())["template"]["chat"] is False


def test_chat_answers_lose_the_inline_leading_space(chat_model_dir, tmp_path):
    from softprompt.data import Encoder, Template

    tok = load_model(str(chat_model_dir), dtype="float32").tokenizer
    chat = Encoder(tok, Template(input="{input}", output=" {output}", chat=True))
    plain = Encoder(tok, Template(input="{input}", output="{output}", chat=True))
    row = {"input": "the film was great .", "output": "positive"}
    assert chat.encode_rows([row]) == plain.encode_rows([row])


def test_export_carries_the_template_and_import_brings_it_back(chat_model_dir, sentiment_files, tmp_path):
    from softprompt import SoftPrompt, export_peft, import_peft

    base = load_model(str(chat_model_dir), dtype="float32")
    run = train(base=base, data=str(sentiment_files[0]), output=str(tmp_path / "run"), steps=1, batch_size=8,
                virtual_tokens=2, progress=False, system="Be brief.")
    export_peft(run.prompt, tmp_path / "peft")
    assert "apply_chat_template" in (tmp_path / "peft" / "README.md").read_text()
    assert SoftPrompt.load(tmp_path / "peft").template == run.prompt.template
    import_peft(tmp_path / "peft", tmp_path / "back")
    assert SoftPrompt.load(tmp_path / "back").template["system"] == "Be brief."


# ---- quick eval -------------------------------------------------------------------------------------


def test_eval_with_a_prompt_scores_the_prompt_alone_unless_baselines_are_asked(tiny_model_dir, sentiment_files,
                                                                               tmp_path, capsys):
    train_file, dev = sentiment_files
    assert main(["train", "--data", str(train_file), "--output", str(tmp_path / "run"), "--model", str(tiny_model_dir),
                 "--steps", "2", "--batch-size", "8", "--virtual-tokens", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--prompt", str(tmp_path / "run"), "--data", str(dev), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert [s["system"] for s in alone["systems"]] == ["softprompt"]
    assert main(["eval", "--prompt", str(tmp_path / "run"), "--data", str(dev), "--json", "--baselines", "untuned"]) == 0
    assert [s["system"] for s in json.loads(capsys.readouterr().out)["systems"]] == ["untuned", "softprompt"]


def test_deep_prompt_by_default_where_the_model_takes_one(tiny_base, sentiment_files, tmp_path):
    common = dict(base=tiny_base, data=str(sentiment_files[0]), steps=1, batch_size=8, virtual_tokens=2, progress=False)
    default = train(output=str(tmp_path / "d"), **common)
    assert default.prompt.is_deep and default.prompt.meta["training"]["lr"] == 0.01
    assert not train(output=str(tmp_path / "n"), deep=False, **common).prompt.is_deep
    assert not train(output=str(tmp_path / "lm"), lm=True, output_template="{input}", **common).prompt.is_deep
    assert not train(output=str(tmp_path / "r"), reparam="residual", **common).prompt.is_deep


def test_training_attention_backend_follows_the_measurement(cache_dir, monkeypatch, tiny_base, tiny_model_dir,
                                                             sentiment_files, tmp_path):
    """A CPU where torch's plain-math attention trains a layer faster than its fused kernel: the choice says so,
    and train() runs its steps under the math backend (measured, cached per machine, told on the loading line)."""
    import sys

    fake_probe(monkeypatch, {"float32": 2.0, "bfloat16": 1.0})
    timings = {"calls": 0}

    def attention(dtype, config, device):
        timings["calls"] += 1
        return (1.0, 0.5)  # fused 1.0 s, math 0.5 s

    monkeypatch.setattr(precision, "attention_seconds", attention)
    cpu = torch.device("cpu")
    choice = precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="train")
    assert choice.attention == "math" and "plain math" in choice.reason
    assert precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="train").attention == "math"
    assert timings["calls"] == 1  # cached with the dtype
    assert precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="inference").attention is None
    monkeypatch.setattr(precision, "attention_seconds", lambda *a: (1.0, 0.95))  # not worth it
    assert precision.choose_dtype(cpu, 64, 256, config=tiny_base.config, purpose="train", use_cache=False).attention is None
    monkeypatch.setattr(precision, "attention_seconds", attention)

    steps = sys.modules["softprompt.train"]
    entered = []
    real = steps.attention_backend
    monkeypatch.setattr(steps, "attention_backend", lambda base: entered.append(base.dtype_choice.attention) or real(base))
    base = load_model(str(tiny_model_dir), device="cpu", purpose="train")
    assert base.dtype_choice.attention == "math"
    train(base=base, data=str(sentiment_files[0]), output=str(tmp_path / "run"), steps=2, batch_size=8,
          virtual_tokens=3, progress=False)
    assert entered == ["math", "math"]
