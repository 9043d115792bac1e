"""`dtype="auto"`: pick the frozen base's dtype by measuring this machine, not by assuming.

Machines of one kind differ: one CPU ran fp32 matmuls at 0.39 TFLOP/s and bf16 at 0.19, the next fp32 at 0.10
and bf16 at 0.43 (AVX512-BF16), a third with AMX bf16 at 2.2 against fp32 0.3. So a short probe times one MLP
block of the model's own shapes (gate/up/down projections + SiLU, the bulk of a transformer step) in each
candidate dtype, and the winner is cached per machine + torch + thread count + shape in the user's cache folder
(`$SOFTPROMPT_CACHE_DIR`, default `~/.cache/softprompt`). Only the frozen base changes dtype: the trainable
prompt, its optimizer state and the loss stay fp32.
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


def probe_seconds(dtypes: list[torch.dtype], hidden: int, ffn: int, device: torch.device) -> dict[str, float]:
    """Seconds per call of one SwiGLU MLP block [rows, hidden] -> [rows, hidden] in each dtype: the best call of
    several, the dtypes taking turns so that a burst of load from another process hits them alike."""
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
        return lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    def timed(call) -> float:
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        calls = {NAMES[d]: block(d) for d in dtypes}
        best = {name: timed(call) and float("inf") for name, call in calls.items()}  # first call: warm-up
        started = time.perf_counter()
        while time.perf_counter() - started < PROBE_SECONDS * len(calls):
            for name, call in calls.items():
                best[name] = min(best[name], timed(call))
    return best


def candidates(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        # fp16 only where bf16 is missing (pre-Ampere): with bf16 at hand its range wins at equal speed.
        return [torch.float32, torch.bfloat16] if torch.cuda.is_bf16_supported() else [torch.float32, torch.float16]
    if device.type == "cpu":
        return [torch.float32, torch.bfloat16]
    return [torch.float32]  # mps, xpu, ...: not measured here, fp32 is always right


def choose_dtype(device: torch.device, hidden: int, ffn: int, *, use_cache: bool = True) -> DtypeChoice:
    """Measure (or recall) which dtype runs this model's matmuls fastest here. Never raises for a cache problem:
    an unreadable or unwritable cache only means measuring again."""
    options = candidates(device)
    if len(options) == 1:
        return DtypeChoice("float32", True, f"float32 ({device.type}: no faster dtype is probed)")
    key = f"{machine_key(device)}|mlp={hidden}x{ffn}"
    path = cache_dir() / "dtype-probe.json"
    table = _read_cache(path) if use_cache else {}
    entry = table.get(hashlib.sha256(key.encode()).hexdigest()[:20])
    cached = entry is not None
    if entry is None:
        started = time.perf_counter()
        times = probe_seconds(options, hidden, ffn, device)
        entry = {"key": key, "seconds": times, "probe_s": round(time.perf_counter() - started, 3)}
        if use_cache:
            table[hashlib.sha256(key.encode()).hexdigest()[:20]] = entry
            _write_cache(path, table)
    times = entry["seconds"]
    fp32 = times["float32"]
    best = min(times, key=times.get)
    speedup = fp32 / times[best]
    if best == "float32" or speedup < MIN_SPEEDUP:
        half = next(n for n in times if n != "float32")
        return DtypeChoice("float32", True, f"float32 ({half} measured {fp32 / times[half]:.2f}x the speed of "
                           f"float32 on this {device.type}; {MIN_SPEEDUP}x needed)", 1.0, cached)
    return DtypeChoice(best, True, f"{best} (measured {speedup:.1f}x faster than float32 on this {device.type}; "
                       "the prompt, its optimizer state and the loss stay float32)", round(speedup, 2), cached)


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
