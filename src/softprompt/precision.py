"""`dtype="auto"`: pick the frozen base's dtype by measuring this machine, not by assuming.

Machines of one kind differ: one CPU ran fp32 matmuls at 0.39 TFLOP/s and bf16 at 0.19, the next fp32 at 0.10
and bf16 at 0.43 (AVX512-BF16), a third with AMX bf16 at 2.2 against fp32 0.3. Matmuls are not the whole story
either: on that third CPU bf16 matmuls were 2-3x faster, yet a bf16 training step was 1.8x SLOWER (attention's
backward and the elementwise ops are slow in bf16 there), while bf16 decoding was faster. So a short probe times
ONE decoder layer of the model's own architecture and shapes (random weights, built from its config) doing what
the caller will do: forward + backward to the input for training (`purpose="train"`), forward for inference, in
each candidate dtype; layers too big to build quickly fall back to one MLP block of the model's shapes. The winner
is cached per machine + torch + thread count + shape + purpose in the user's cache folder (`$SOFTPROMPT_CACHE_DIR`,
default `~/.cache/softprompt`). Only the frozen base changes dtype: the trainable prompt, its optimizer state and
the loss stay fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("softprompt")

# A half-precision dtype must beat fp32 by this much to be chosen: below it the speed-up does not pay for the
# precision given up (and elementwise ops, not probed, gain less than matmuls).
MIN_SPEEDUP = 1.25
PROBE_SECONDS = 0.06  # per dtype, after one warm-up call
PROBE_FLOP = 4e8  # per call: rows are cut so that a large model's probe stays well under a second
PROBE_WEIGHTS = 2**22  # elements per probed weight matrix
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class DtypeChoice:
    dtype: str  # float32 | bfloat16 | float16
    auto: bool  # chosen by measurement (dtype="auto") or given
    reason: str  # one line for the user
    speedup: float | None = None  # chosen over fp32, measured
    cached: bool = False
    # Training only: "math" when torch's plain-math attention measured faster than its fused kernel for this
    # layer in the chosen dtype (CPU bf16 here: the fused backward cost 1.4x a whole step); None: torch's choice.
    attention: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    env = os.environ.get("SOFTPROMPT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "softprompt"


def machine_key(device: torch.device) -> str:
    """What the answer depends on: the processor (model and bf16/AMX features), torch, threads."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{_cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|{_cpu_flags()}|threads={torch.get_num_threads()}"
    return f"{device.type}|{what}|torch={torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return ",".join(f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in flags)


LAYER_PARAMS_MAX = 64e6  # a bigger layer is probed by its MLP block alone (building it would cost more than the probe)
PROBE_TOKENS = (8, 64)  # (rows, length) a layer is probed on: a training batch's worth, attention included
PURPOSES = ("inference", "train")


def probe_seconds(dtypes: list[torch.dtype], hidden: int, ffn: int, device: torch.device, config=None,
                  purpose: str = "inference") -> dict[str, float]:
    """Seconds per call in each dtype: one decoder layer built from `config` (see the module doc), else one SwiGLU
    MLP block [rows, hidden] -> [rows, hidden]. The best call of several, the dtypes taking turns so that a burst
    of load from another process hits them alike."""
    layer = layer_calls(dtypes, config, device, purpose) if config is not None else None
    if layer is not None:
        return _best_times(layer, device, rounds=3)
    return _best_times(_mlp_calls(dtypes, hidden, ffn, device), device)


def layer_calls(dtypes, config, device, purpose):
    """{dtype name: a call running one decoder layer of `config`}, or None where that cannot be built."""
    try:
        from transformers import AutoModelForCausalLM

        small = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 256,
                                            "quantization_config": None})
        calls = {}
        for dtype in dtypes:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(small, dtype=dtype)
            backbone = model.base_model
            n_params = sum(p.numel() for p in backbone.parameters())
            if n_params > LAYER_PARAMS_MAX + 256 * config.hidden_size:
                return None
            backbone.requires_grad_(False)
            rows, length = PROBE_TOKENS
            x = torch.empty(rows, length, config.hidden_size, device=device, dtype=dtype).uniform_(-1, 1)
            mask = torch.ones(rows, length, device=device, dtype=torch.long)
            for i in range(rows):  # a real batch is padded (rows of different lengths): attention takes a mask
                mask[i, : (i * length) // (2 * rows)] = 0
            calls[NAMES[dtype]] = _layer_call(backbone, x, mask, purpose == "train")
        return calls
    except Exception as e:  # noqa: BLE001  any architecture we cannot build: the MLP probe still answers
        log.debug("dtype probe: no layer probe for %s (%s); timing its MLP block", type(config).__name__, e)
        return None


def _layer_call(backbone, x, mask, backward: bool):
    def call():
        if backward:
            inp = x.detach().requires_grad_(True)
            backbone(inputs_embeds=inp, attention_mask=mask, use_cache=False).last_hidden_state.float().sum().backward()
        else:
            with torch.no_grad():
                backbone(inputs_embeds=x, attention_mask=mask, use_cache=False)
    return call


def _mlp_calls(dtypes, hidden, ffn, device):
    # Big models: the widths are cut to PROBE_WEIGHTS elements a matrix (making the weights would cost more than
    # the probe); matmul efficiency only grows with size, so the cut shape is a fair stand-in.
    while hidden * ffn > PROBE_WEIGHTS:
        hidden, ffn = (hidden // 2, ffn) if hidden > ffn // 2 else (hidden, ffn // 2)
    rows = int(max(16, min(512, PROBE_FLOP / (6 * hidden * ffn))))

    def block(dtype):
        x = torch.empty(rows, hidden, device=device, dtype=dtype).uniform_(-1, 1)
        w_gate, w_up = (torch.empty(ffn, hidden, device=device, dtype=dtype).uniform_(-1, 1) / hidden ** 0.5
                        for _ in range(2))
        w_down = torch.empty(hidden, ffn, device=device, dtype=dtype).uniform_(-1, 1) / ffn ** 0.5

        def call():
            with torch.no_grad():
                F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        return call

    return {NAMES[d]: block(d) for d in dtypes}


def _best_times(calls: dict, device: torch.device, rounds: int = 1) -> dict[str, float]:
    def timed(call) -> float:
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    best = {name: timed(call) and float("inf") for name, call in calls.items()}  # first call: warm-up
    started, done = time.perf_counter(), 0
    while done < rounds or time.perf_counter() - started < PROBE_SECONDS * len(calls):
        for name, call in calls.items():
            best[name] = min(best[name], timed(call))
        done += 1
    return best


def candidates(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        # fp16 only where bf16 is missing (pre-Ampere): with bf16 at hand its range wins at equal speed.
        return [torch.float32, torch.bfloat16] if torch.cuda.is_bf16_supported() else [torch.float32, torch.float16]
    if device.type == "cpu":
        return [torch.float32, torch.bfloat16]
    return [torch.float32]  # mps, xpu, ...: not measured here, fp32 is always right


def choose_dtype(device: torch.device, hidden: int, ffn: int, *, use_cache: bool = True, config=None,
                 purpose: str = "inference") -> DtypeChoice:
    """Measure (or recall) which dtype runs this model fastest here, for `purpose` (train: forward + backward;
    inference: forward). Never raises for a cache problem: an unreadable or unwritable cache only means measuring
    again."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    options = candidates(device)
    if len(options) == 1:
        return DtypeChoice("float32", True, f"float32 ({device.type}: no faster dtype is probed)")
    shape = f"mlp={hidden}x{ffn}" if config is None else f"layer={_config_key(config)}|{purpose}"
    key = f"{machine_key(device)}|{shape}"
    path = cache_dir() / "dtype-probe.json"
    table = _read_cache(path) if use_cache else {}
    entry = table.get(hashlib.sha256(key.encode()).hexdigest()[:20])
    cached = entry is not None
    if entry is None:
        started = time.perf_counter()
        times = probe_seconds(options, hidden, ffn, device, config=config, purpose=purpose)
        entry = {"key": key, "seconds": times, "probe_s": round(time.perf_counter() - started, 3)}
        if use_cache:
            table[hashlib.sha256(key.encode()).hexdigest()[:20]] = entry
            _write_cache(path, table)
    times = entry["seconds"]
    fp32 = times["float32"]
    best = min(times, key=times.get)
    speedup = fp32 / times[best]
    chosen = "float32" if best == "float32" or speedup < MIN_SPEEDUP else best
    attention, note = None, ""
    if config is not None and purpose == "train":
        if "attention" not in entry or chosen not in entry["attention"]:
            entry.setdefault("attention", {})[chosen] = attention_seconds(DTYPES_BY_NAME[chosen], config, device)
            if use_cache:
                table[hashlib.sha256(key.encode()).hexdigest()[:20]] = entry
                _write_cache(path, table)
        fused, math = entry["attention"][chosen] or (None, None)
        attention = "math" if fused and math and fused / math >= MIN_ATTENTION_SPEEDUP else None
        note = "" if attention is None else f"; attention: plain math, {fused / math:.2f}x the fused kernel here"
    if best == "float32" or speedup < MIN_SPEEDUP:
        half = next(n for n in times if n != "float32")
        what = "" if config is None else (" training" if purpose == "train" else " inference")
        return DtypeChoice("float32", True, f"float32 ({half} measured {fp32 / times[half]:.2f}x the speed of "
                           f"float32{what} on this {device.type}; {MIN_SPEEDUP}x needed{note})", 1.0, cached, attention)
    what = "" if config is None else (" to train" if purpose == "train" else " to run")
    return DtypeChoice(best, True, f"{best} (measured {speedup:.1f}x faster than float32{what} on this {device.type}; "
                       f"the prompt, its optimizer state and the loss stay float32{note})", round(speedup, 2), cached,
                       attention)


MIN_ATTENTION_SPEEDUP = 1.15  # plain-math attention must beat the fused kernel by this much (fwd + bwd of a layer)
DTYPES_BY_NAME = {name: dtype for dtype, name in NAMES.items()}


def attention_seconds(dtype: torch.dtype, config, device: torch.device) -> tuple[float, float] | None:
    """(fused kernel, plain math) seconds for one layer's forward + backward in `dtype`, or None if not measurable."""
    if device.type != "cpu":  # on GPUs the fused kernels win by far; not worth the probe
        return None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    calls = layer_calls([dtype], config, device, "train")
    if calls is None:
        return None
    (call,) = calls.values()

    def with_math():
        with sdpa_kernel(SDPBackend.MATH):
            call()

    times = _best_times({"fused": call, "math": with_math}, device, rounds=3)
    return times["fused"], times["math"]


def _config_key(config) -> str:
    """What a layer's speed depends on: the architecture and its shapes."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return ",".join(str(getattr(config, k, None)) for k in keys)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        log.debug("could not cache the dtype probe in %s: %s", path, e)
