"""Training speed, side by side in ONE process (issue 6): softprompt vs PEFT PromptTuning on the same model.

    python bench/speed.py                         # SmolLM2-135M on SST-2 + English quotes, ~6-8 min on 2 cores
    python bench/speed.py --tiny                  # the tiny offline Llama: a smoke test (~30 s)
    python bench/speed.py --configs softprompt,softprompt-plain --datasets sst2 --steps 12

Every configuration trains in its own process, on that process's main thread, through its real loop
(`softprompt.train` with its `on_step` hook, HF `Trainer` with a callback), and a gate lets exactly one
configuration run one optimizer step at a time, in rounds: A B C D, A B C D, ... (Processes, not threads: each
thread running torch gets an OpenMP team of its own, and with more OpenMP threads than cores libgomp stops spinning
between parallel regions; configurations trained in threads ran 20-30 % slower, bf16 ones most. And a process
per configuration needs no single malloc arena to keep memory figures apart: the earlier thread version set
M_ARENA_MAX=1 for that, which made every bf16 step 2x slower, allocator lock contention between torch's threads:
1.29 against 0.62 s a step in the same training loop.) So every configuration sees the same machine load (this machine is shared and
noisy), and the report is about ratios. Per configuration it reports, over the timed steps (after warmup):

- real tokens/s and examples/s (padding and virtual tokens not counted),
- peak memory of a step: RSS high-water mark above the resident set before the step (Linux clear_refs; the
  allocator is trimmed first), or peak CUDA memory above the allocated memory before the step; plus the
  bytes of the frozen weights that configuration keeps resident,
- model FLOP utilisation: model FLOPs = 4 x non-embedding params x real tokens (forward + activation-gradient
  backward; frozen weights need no weight gradients) + 4 x hidden x vocab x labelled tokens (the LM head where
  there is a loss), over the measured matmul peak (fp32 and bf16, best of several shapes). Extra work an
  implementation does (padding, per-row virtual tokens, full-vocab logits) is not counted: it lowers MFU.

Configurations (`--configs`):
  softprompt        the product: dtype auto (fp32 on CPU, bf16 on CUDA), length batching, shared prefix auto
                    (on for CPU, off on CUDA)
  softprompt-plain  shared prefix forced off (virtual tokens run once per row), for the ablation
  softprompt-shared shared prefix forced on (virtual tokens once per batch)
  softprompt-bf16   frozen base in bf16 (prompt master copy fp32)
  softprompt-fp32   frozen base in fp32 (on CUDA, where auto is bf16)
  peft-fp32         PEFT PromptTuning + HF Trainer as its docs show (fp32 default, random batches, dynamic padding)
  peft-bf16         the same with TrainingArguments(bf16=True) (autocast)
  peft-fp32-guide   peft-fp32 with the preprocessing of PEFT's prompt-based-methods guide: every row left-padded to
                    one fixed max_length (here the workload's longest row, so nothing is truncated) and
                    `default_data_collator`, instead of the kinder dynamic padding

Writes OUT/speed.json and OUT/speed.md (a markdown table; BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIGS = "softprompt,softprompt-plain,softprompt-bf16,peft-fp32,peft-fp32-guide,peft-bf16"


# ---- machine ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.5) -> dict[str, float]:
    """Best measured matmul FLOP/s over a few shapes (the model's own and a big square one)."""
    if device.type == "cuda":
        shapes = [(8192, 8192, 8192), (16384, 4096, 14336), (8192, 2048, 8192)]
    else:
        shapes = [(1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)]
    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        w = torch.randn(n, k, device=device).to(dtype)
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        sync(device)
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            reps = 10 if device.type == "cuda" else 1
            t = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(a, w)
            sync(device)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
        out[f"{m}x{k}x{n}"] = best
        del a, w
    return out


def measure_peaks(device: torch.device, peaks: dict, report: dict, seconds: float) -> None:
    """Best matmul FLOP/s per dtype so far (measured at the start and the end of a run: noise only lowers it)."""
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        by_shape = matmul_peak(device, dtype, seconds=seconds)
        peaks[name] = max(peaks.get(name, 0.0), *by_shape.values())
        report.setdefault("matmul_tflops_by_shape", {}).setdefault(name, []).append({k: v / 1e12 for k, v in by_shape.items()})
    report["peaks_tflops"] = {k: v / 1e12 for k, v in peaks.items()}
    print(f"matmul peak TFLOP/s: {report['peaks_tflops']}", flush=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        flags = ""
        with contextlib.suppress(OSError):
            flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        info["cpu_flags"] = [f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f" {f}" in flags]
        info["cores"] = os.cpu_count()
    return info


# ---- memory ----------------------------------------------------------------------------------------

_libc = None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryProbe:
    """Peak memory of one step above what was resident before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = False
        if device.type == "cpu":
            global _libc
            with contextlib.suppress(OSError):
                _libc = _libc or ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.cpu_ok = True

    def before(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not self.cpu_ok:
            return 0
        gc.collect()
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return _proc_status("VmRSS")

    def after(self, before: int) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - before
        if not self.cpu_ok:
            return None
        return _proc_status("VmHWM") - before


def total_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status("VmHWM")


# ---- stepping a training loop from outside -----------------------------------------------------


class StopBench(Exception):
    pass


@dataclass
class Stepper:
    """Runs a training loop in a thread; `step()` lets it do exactly one more optimizer step and times it.

    The loop calls `gate()` after each step (softprompt's on_step, a Trainer callback); the gate records the
    time and blocks until the next `step()`. The first step (setup, allocator and kernel warm-up) is untimed.
    """

    name: str
    run: Callable[[Callable[[], None]], None]  # run(gate): trains, calling gate() after every step
    device: torch.device
    weights_bytes: int = 0
    counts: dict = field(default_factory=lambda: {"tokens": 0, "labelled": 0, "examples": 0, "positions": 0})
    _go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    _done: queue.Queue = field(default_factory=queue.Queue)
    _stop: bool = False
    error: BaseException | None = None
    activate: Callable[[], None] = lambda: None  # called before each of its steps

    def gate(self) -> None:
        sync(self.device)
        self._done.put(time.perf_counter())
        self._go.acquire()
        if self._stop:
            raise StopBench

    def _main(self) -> None:
        try:
            self.run(self.gate)
            self._done.put(None)
        except StopBench:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by the orchestrator
            self.error = e
            self._done.put(None)

    def start(self) -> None:
        self.activate()
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self.thread.start()
        self._wait()

    def _wait(self) -> float:
        t = self._done.get()
        if t is None:
            raise RuntimeError(f"{self.name}: training stopped early") from self.error
        return t

    def step(self, probe: MemoryProbe) -> dict[str, float]:
        before = dict(self.counts)
        self.activate()
        mem0 = probe.before()
        t0 = time.perf_counter()
        self._go.release()
        t1 = self._wait()
        mem = probe.after(mem0)
        return {"seconds": t1 - t0, "peak_bytes": mem, **{k: self.counts[k] - before[k] for k in self.counts}}

    def finish(self) -> None:
        self._stop = True
        self._go.release()
        self.thread.join(timeout=120)


PROTOCOL = "@@speed@@ "  # prefix of the lines a configuration's process sends back (anything else is its log)


class ProcessStepper:
    """A configuration in a process of its own (this script with --child): same interface as Stepper. The child
    times its own steps (and memory) and answers one JSON line per step."""

    def __init__(self, name: str, dataset: str, argv: list[str], out: Path):
        self.name, self.dataset, self.argv, self.out = name, dataset, argv, out
        self.weights_bytes = 0

    def start(self) -> None:
        self.log = open(self.out / f"child-{self.name}-{self.dataset}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *self.argv, "--child", self.name,
                                      "--child-dataset", self.dataset], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.weights_bytes = self._read()["weights_bytes"]  # setup + first step, untimed

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                reply = json.loads(line[len(PROTOCOL):])
                if reply.get("ended"):
                    break
                return reply
        self.log.flush()
        raise RuntimeError(f"{self.name}: training stopped early; see {self.log.name}")

    def step(self, probe) -> dict:
        self.proc.stdin.write("mem\n" if isinstance(probe, MemoryProbe) else "time\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def child_main(args) -> None:
    """One configuration on this process's main thread: after each step, report it, then wait for the next order."""
    from transformers import AutoTokenizer

    from softprompt.model import pick_device

    device = pick_device(args.device)
    folder = model_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (work,) = load_workloads([args.child_dataset], tokenizer, args, tmp)
        (stepper,) = build_steppers([args.child], folder, work, args, tmp, device, {})
        probe, no_probe, state = MemoryProbe(device), NoProbe(), {}

        def gate() -> None:
            sync(device)
            t1 = time.perf_counter()
            if "t0" in state:
                reply = {"seconds": t1 - state["t0"], "peak_bytes": state["probe"].after(state["mem0"]),
                         **{k: stepper.counts[k] - state["counts"][k] for k in stepper.counts}}
            else:
                reply = {"weights_bytes": stepper.weights_bytes}
            print(PROTOCOL + json.dumps(reply), flush=True)
            order = sys.stdin.readline().strip()
            if order not in ("time", "mem"):
                raise StopBench
            state["probe"] = probe if order == "mem" else no_probe
            state["counts"] = dict(stepper.counts)
            stepper.activate()
            state["mem0"] = state["probe"].before()
            state["t0"] = time.perf_counter()

        stepper.gate = gate  # the Trainer callback calls stepper.gate()
        stepper.activate()
        try:
            stepper.run(gate)
            print(PROTOCOL + json.dumps({"ended": True}), flush=True)
        except StopBench:
            pass


def count_inputs(counts: dict, attention_mask: torch.Tensor, labels: torch.Tensor | None) -> None:
    counts["tokens"] += int(attention_mask.sum())
    counts["positions"] += attention_mask.numel()  # padded input positions (virtual tokens not included)
    counts["examples"] += int(attention_mask.shape[0])
    if labels is not None:
        counts["labelled"] += int((labels != -100).sum())


# ---- configurations ------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    data_file: Path  # jsonl rows for softprompt.train
    template: dict  # TrainConfig fields: input_template / output_template / label_map / lm
    encoded: list  # softprompt Encoded rows (for PEFT: the very same token ids and labels)


def weights_bytes(model) -> int:
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def shared_prefix_for(name: str) -> bool | None:
    """softprompt: the product's choice (None = auto: on for CPU, off on CUDA); -shared / -plain force it."""
    return {"softprompt-shared": True, "softprompt-plain": False}.get(name)


def softprompt_stepper(name: str, base, work: Workload, args, out: Path, shared_prefix: bool | None = None) -> Stepper:
    from softprompt import train

    if not hasattr(base, "_bench_counts"):  # count the rows every step feeds in (one wrapper per model)
        original = base.prepend_prompts
        base._bench_counts = {}

        def counted(input_ids, attention_mask, prompts, labels=None):
            count_inputs(base._bench_counts, attention_mask, labels)
            return original(input_ids, attention_mask, prompts, labels)

        base.prepend_prompts = counted

    def run(gate):
        train(data=str(work.data_file), output=str(out / f"{name}-{work.name}"), base=base, overwrite=True,
              steps=args.warmup + args.steps + args.memory_steps + 5, batch_size=args.batch_size, virtual_tokens=args.virtual_tokens,
              max_length=args.max_length, lr=0.03, save_every=10**9, progress=False, seed=0,
              chat=False, deep=False,  # the rows PEFT trains on (plain template, input embeddings)
              on_step=lambda step, record: gate(), **work.template)

    stepper = Stepper(name, run, base.device, weights_bytes(base.model))

    def activate():  # configurations may share one loaded model: each step sets its own switches
        base.shared_prefix = shared_prefix
        base._bench_counts = stepper.counts

    stepper.activate = activate
    return stepper


def peft_stepper(name: str, hf_model, tokenizer, work: Workload, args, out: Path, bf16: bool,
                 fixed_padding: bool = False) -> Stepper:
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    peft_model = get_peft_model(hf_model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                             num_virtual_tokens=args.virtual_tokens))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in work.encoded]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    if fixed_padding:  # the guide: pad every row on the left to one max_length, then default_data_collator
        width = max(len(r["input_ids"]) for r in rows)
        rows = [{"input_ids": torch.tensor([tokenizer.pad_token_id] * (width - len(r["input_ids"])) + r["input_ids"]),
                 "attention_mask": torch.tensor([0] * (width - len(r["input_ids"])) + r["attention_mask"]),
                 "labels": torch.tensor([-100] * (width - len(r["input_ids"])) + r["labels"])} for r in rows]
        collator = default_data_collator
    stepper: Stepper | None = None

    def count_hook(module, a, kwargs):
        count_inputs(stepper.counts, kwargs["attention_mask"], kwargs.get("labels"))

    class Gate(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            stepper.gate()

    def run(gate):
        handle = peft_model.register_forward_pre_hook(count_hook, with_kwargs=True)
        targs = TrainingArguments(
            output_dir=str(out / f"{name}-{work.name}"), per_device_train_batch_size=args.batch_size,
            learning_rate=0.03, max_steps=args.warmup + args.steps + args.memory_steps + 5, save_strategy="no", report_to=[],
            logging_steps=10**6, disable_tqdm=True, bf16=bf16, use_cpu=hf_model.device.type == "cpu", seed=0,
            dataloader_num_workers=0)
        trainer = Trainer(model=peft_model, args=targs, train_dataset=rows, callbacks=[Gate()], data_collator=collator)
        try:
            trainer.train()
        finally:
            handle.remove()

    stepper = Stepper(name, run, hf_model.device, weights_bytes(hf_model))
    return stepper


# ---- workloads -------------------------------------------------------------------------------------


def load_workloads(names: list[str], tokenizer, args, tmp: Path) -> list[Workload]:
    from softprompt.data import Encoder, Template, read_rows

    specs = {
        "sst2": (Path(args.data_root) / "sst2" / "train.tsv",
                 dict(input_template="Review: {sentence}\nSentiment:", output_template=" {label}",
                      label_map="0=negative,1=positive")),
        "quotes": (Path(args.data_root) / "english_quotes" / "quotes.jsonl",
                   dict(lm=True, output_template="{quote}")),
    }
    out = []
    for name in names:
        path, template = specs[name]
        if args.tiny:
            rows = _tiny_rows(name)
            if name == "sst2":
                template = dict(input_template="{input}", output_template=" {output}")
            else:
                template = dict(lm=True, output_template="{text}")
        else:
            rows = read_rows(path)[: args.rows]
        data_file = tmp / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tpl = Template(input="" if template.get("lm") else template["input_template"],
                       output=template["output_template"], label_map=template.get("label_map"))
        encoded = Encoder(tokenizer, tpl, max_length=args.max_length, score_first=True).encode_rows(rows, str(path))
        out.append(Workload(name, data_file, template, encoded))
    return out


def _tiny_rows(name: str) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import sentiment_rows

    rows = sentiment_rows(256, 0)
    if name == "sst2":
        return rows
    return [{"text": r["input"].replace("Review: ", "").replace("\nSentiment:", "") + " " + r["output"]} for r in rows]


# ---- models ----------------------------------------------------------------------------------------


def model_folder(args) -> str:
    """A local folder with the model. The embedded GGUF is dequantised once into a cache folder, so that the
    several copies the benchmark loads take seconds, not 20 s each."""
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny_model_dir

        path = Path(tempfile.gettempdir()) / "softprompt-bench-tiny"
        if not (path / "config.json").exists():
            make_tiny_model_dir(path)
        return str(path)
    if args.model not in (None, "", "embedded"):
        return args.model
    cache = Path(args.cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if not (cache / "config.json").exists():
        from transformers import AutoModelForCausalLM

        from softprompt import load_model

        base = load_model(None, dtype="float32", device="cpu")
        config = base.model.config.to_dict()
        config.pop("quantization_config", None)
        clean = AutoModelForCausalLM.from_config(type(base.model.config).from_dict(config))
        clean.load_state_dict(base.model.state_dict())
        cache.mkdir(parents=True, exist_ok=True)
        clean.save_pretrained(cache)
        base.tokenizer.save_pretrained(cache)
        del base, clean
    return str(cache)


def meta_model(folder: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def non_embedding_params(hf_model) -> tuple[int, int, int]:
    emb = hf_model.get_input_embeddings().weight
    head = hf_model.get_output_embeddings()
    skip = [emb] + ([head.weight] if head is not None else [])  # by identity: works on the meta device too
    n = sum(p.numel() for p in hf_model.parameters() if not any(p is q for q in skip))
    return n, emb.shape[1], emb.shape[0]


# ---- the run ---------------------------------------------------------------------------------------


def build_steppers(configs: list[str], folder: str, work: Workload, args, out: Path, device: torch.device,
                   bases: dict) -> list[Stepper]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt import load_model
    from softprompt.model import pick_dtype

    steppers = []
    for name in configs:
        if name.startswith("softprompt"):
            dtype = {"softprompt-bf16": "bfloat16", "softprompt-fp32": "float32"}.get(name, "auto")
            from transformers import AutoConfig

            key = str(pick_dtype(dtype, device, AutoConfig.from_pretrained(folder), "train")[0])
            if key not in bases:  # as `softprompt train` loads it: the dtype (and attention) measured for training
                bases[key] = load_model(folder, dtype=dtype, device=str(device), purpose="train")
            steppers.append(softprompt_stepper(name, bases[key], work, args, out, shared_prefix=shared_prefix_for(name)))
        elif name in ("peft-fp32", "peft-bf16", "peft-fp32-guide"):
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
            tok = AutoTokenizer.from_pretrained(folder)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            steppers.append(peft_stepper(name, hf, tok, work, args, out, bf16=name == "peft-bf16",
                                         fixed_padding=name == "peft-fp32-guide"))
        else:
            raise SystemExit(f"unknown config {name!r}")
    return steppers


def measure(steppers: list[Stepper], args, device: torch.device) -> dict[str, list[dict]]:
    """Warm up, then timed rounds (one step of each configuration in turn), then memory rounds. Memory is
    measured on separate steps: trimming the allocator before a step makes that step fault its pages in
    again, which would slow the timed steps."""
    probe, no_probe = MemoryProbe(device), NoProbe()
    for s in steppers:
        s.start()  # setup + first step, untimed
        for _ in range(args.warmup - 1):
            s.step(no_probe)
        print(f"  {s.name}: warmed up", flush=True)
    samples: dict[str, list[dict]] = {s.name: [] for s in steppers}
    for r in range(args.steps):  # rounds: every configuration one step, in turn
        for s in steppers:
            samples[s.name].append(s.step(no_probe))
        if (r + 1) % max(1, args.steps // 4) == 0:
            print(f"  round {r + 1}/{args.steps}", flush=True)
    for _ in range(args.memory_steps):
        for s in steppers:
            mem = s.step(probe)["peak_bytes"]
            samples[s.name][0].setdefault("memory_steps", []).append(mem)
    for s in steppers:
        s.finish()
    return samples


class NoProbe:
    def before(self) -> int:
        return 0

    def after(self, before: int) -> None:
        return None


def summarise(name: str, dataset: str, samples: list[dict], stepper: Stepper, flops_per_token: float,
              head_flops_per_label: float, peaks: dict) -> dict:
    seconds = sum(s["seconds"] for s in samples)
    tokens = sum(s["tokens"] for s in samples)
    labelled = sum(s["labelled"] for s in samples)
    examples = sum(s["examples"] for s in samples)
    flops = flops_per_token * tokens + head_flops_per_label * labelled
    mems = [m for m in samples[0].get("memory_steps", []) if m is not None]
    row = {
        "name": name, "dataset": dataset, "steps": len(samples),
        "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds,
        "median_step_s": statistics.median(s["seconds"] for s in samples),
        "tokens_per_step": tokens / len(samples),
        "positions_per_token": sum(s["positions"] for s in samples) / max(tokens, 1),
        "model_tflops": flops / seconds / 1e12,
        "mfu_vs_bf16_peak": flops / seconds / peaks["bfloat16"],
        "mfu_vs_fp32_peak": flops / seconds / peaks["float32"],
        "mfu_vs_best_peak": flops / seconds / max(peaks.values()),
        "step_peak_mib": max(mems) / 2**20 if mems else None,
        "weights_mib": stepper.weights_bytes / 2**20,
        "samples": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()} for s in samples],
    }
    if row["step_peak_mib"] is not None:
        row["total_mib"] = row["step_peak_mib"] + row["weights_mib"]
    return row


def markdown(report: dict) -> str:
    peaks = report["peaks_tflops"]
    lines = ["| dataset | config | tokens/s | examples/s | x PEFT fp32 | x PEFT fp32 guide | x PEFT bf16 | MFU (bf16 peak) "
             "| MFU (best peak) | step peak MiB | + weights MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ds in dict.fromkeys(r["dataset"] for r in report["runs"]):
        rows = [r for r in report["runs"] if r["dataset"] == ds]
        ref = {r["name"]: r["tokens_per_s"] for r in rows}
        for r in rows:
            def ratio(other):
                return f"{r['tokens_per_s'] / ref[other]:.2f}" if other in ref else "-"
            mem = f"{r['step_peak_mib']:.0f}" if r["step_peak_mib"] is not None else "-"
            lines.append(f"| {ds} | {r['name']} | {r['tokens_per_s']:.0f} | {r['examples_per_s']:.1f} | "
                         f"{ratio('peft-fp32')} | {ratio('peft-fp32-guide')} | {ratio('peft-bf16')} | {100 * r['mfu_vs_bf16_peak']:.0f}% | "
                         f"{100 * r['mfu_vs_best_peak']:.0f}% | {mem} | {r['weights_mib']:.0f} |")
    lines.append("")
    lines.append(f"Measured matmul peak: fp32 {peaks['float32']:.2f} TFLOP/s, bf16 {peaks['bfloat16']:.2f} TFLOP/s "
                 f"({report['machine'].get('gpu') or report['machine'].get('cpu', '')}, {report['machine']['threads']} threads).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="model folder or hub id (default: the embedded SmolLM2-135M)")
    ap.add_argument("--tiny", action="store_true", help="tiny offline Llama and generated data (smoke test)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--datasets", default="sst2,quotes")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--rows", type=int, default=4096, help="rows read per dataset")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (>= 1)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (rounds) per configuration")
    ap.add_argument("--memory-steps", type=int, default=1, help="extra steps per configuration measuring memory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache-dir", default=os.environ.get("SOFTPROMPT_BENCH_CACHE", "~/.cache/softprompt-bench"))
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/speed"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-dataset", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.tiny:
        args.rows, args.steps, args.warmup, args.max_length = 256, min(args.steps, 3), 1, 64
    args.warmup = max(1, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    from softprompt.model import pick_device

    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(device), "args": vars(args), "runs": []}
    print(f"machine: {report['machine']}", flush=True)

    peaks: dict[str, float] = {}
    measure_peaks(device, peaks, report, seconds=0.3 if args.tiny else 1.5)

    folder = model_folder(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for work in load_workloads([d.strip() for d in args.datasets.split(",") if d.strip()], tokenizer, args, tmp):
            print(f"{work.name}: {len(work.encoded)} rows, mean length "
                  f"{statistics.mean(len(e.input_ids) for e in work.encoded):.1f} tokens", flush=True)
            steppers = [ProcessStepper(name, work.name, argv, out) for name in configs]
            n_params, hidden, vocab = non_embedding_params(meta_model(folder))
            samples = measure(steppers, args, device)
            for s in steppers:
                row = summarise(s.name, work.name, samples[s.name], s, 4 * n_params, 4 * hidden * vocab, peaks)
                report["runs"].append(row)
                print(f"  {s.name:17s} {row['tokens_per_s']:8.1f} tok/s  {row['examples_per_s']:6.2f} ex/s  "
                      f"MFU {100 * row['mfu_vs_best_peak']:.0f}% of best peak  step peak "
                      f"{row['step_peak_mib'] or float('nan'):.0f} MiB", flush=True)
            del steppers, samples
            gc.collect()
    measure_peaks(device, peaks, report, seconds=0.3 if args.tiny else 1.5)  # again: noise only ever lowers a peak
    for row in report["runs"]:
        flops = row["model_tflops"] * 1e12
        row.update(mfu_vs_bf16_peak=flops / peaks["bfloat16"], mfu_vs_fp32_peak=flops / peaks["float32"],
                   mfu_vs_best_peak=flops / max(peaks.values()))
    report["params_non_embedding"] = n_params
    report["wall_s"] = time.perf_counter() - started
    (out / "speed.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "speed.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'speed.json'} and {out / 'speed.md'} in {report['wall_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
