"""How long a run is: `--steps`, `--epochs`, or a wall-clock `--time-budget` fitted to this machine.

A budget cannot be turned into steps before the steps are timed, yet the schedule (warmup, then decay to zero)
needs its total. So the run starts with a provisional total, times its first steps, then fixes the total that
fits the budget (and refines it once, after the first validation pass has shown what validating costs). The plan
is saved in the checkpoint: a resumed run keeps it, so resume stays exact.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SoftPromptError

DEFAULT_EPOCHS = 3.0
DEFAULT_TIME_BUDGET = "10m"
CALIBRATION_STEPS = 6  # timed before the total is fixed; the first step (one-off costs) is not counted
SAFETY = 0.97  # plan to end a little before the deadline: step times wander
END_RESERVE_S = 5.0  # writing the artifact and the plot after the last step


def parse_duration(text: str | float | int, field_name: str = "time_budget") -> float:
    """'90', '90s', '10m', '1.5h', '1h30m' -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", str(text).strip().lower())
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms]?)", "", str(text).strip().lower()).strip():
            raise SoftPromptError(f"{field_name}: {text!r} is not a duration; write e.g. 90s, 10m or 1.5h")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit] for n, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise SoftPromptError(f"{field_name}: the budget must be a positive duration, got {text!r}")
    return seconds


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that cannot be read. The command's
    budget counts the user's whole wait, the interpreter's start and the imports (several seconds) included."""
    try:
        fields_after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields_after_name[19])  # field 22 of proc(5), starttime: clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def pace(step_times: list[float]) -> float:
    """Seconds a step, for planning the steps still to come: the mean of the steps so far, or of the latest third
    when those ran slower. This machine's speed drifts by tens of percent within minutes; planning on the whole
    mean after a slowdown overran a 600 s budget by 4 s."""
    counted = step_times[1:] or step_times  # the first step pays one-off costs
    recent = counted[-max(CALIBRATION_STEPS, len(counted) // 3):]
    return max(sum(counted) / len(counted), sum(recent) / len(recent))


@dataclass
class RunLength:
    """What bounds the run: a step cap (from --steps or --epochs), a wall-clock budget, or both."""

    cap: int | None
    budget_s: float | None
    how: str  # for the user: where the length came from

    @classmethod
    def from_config(cls, steps: int | None, epochs: float | None, time_budget: str | None,
                    steps_per_epoch: int) -> RunLength:
        budget = parse_duration(time_budget) if time_budget is not None else None
        if steps is not None:
            if steps < 1:
                raise SoftPromptError(f"steps must be >= 1, got {steps}")
            return cls(steps, budget, f"{steps} steps")
        if epochs is not None:
            if not (epochs > 0 and math.isfinite(epochs)):
                raise SoftPromptError(f"epochs must be a positive number, got {epochs}")
            return cls(max(1, math.ceil(epochs * steps_per_epoch)), budget, f"{epochs:g} epochs")
        if budget is not None:
            return cls(None, budget, f"time budget {time_budget}")
        # The default: a few passes over small data, bounded in time on big data (and on slow machines).
        return cls(max(1, math.ceil(DEFAULT_EPOCHS * steps_per_epoch)), parse_duration(DEFAULT_TIME_BUDGET),
                   f"default: {DEFAULT_EPOCHS:g} epochs within {DEFAULT_TIME_BUDGET}")

    def initial_state(self) -> dict:
        """The plan's part of a run's state: the total so far, and the step at which to plan (again)."""
        return {"total": self.cap if self.cap is not None else 1000,  # a guess for the first steps' warmup
                "next_plan": CALIBRATION_STEPS if self.budget_s is not None else None}


@dataclass
class BudgetPlanner:
    """Fixes (and keeps correcting) the total step count of a budgeted run from measured step and validation times.

    Steps differ in cost (batches are grouped by length), so a few early steps misjudge the mean: the plan is
    made after CALIBRATION_STEPS, then remade each time a third of the remaining steps is done, at the `pace`
    of the steps so far. Late corrections are small, so the schedule's shape barely moves. In the last stretch
    the plan only shrinks, and only when the deadline would be missed at the latest steps' pace.
    """

    length: RunLength
    started: float  # time.perf_counter() when the user's wait began (process start, model loading included)
    step_times: list[float] = field(default_factory=list)
    eval_times: list[float] = field(default_factory=list)

    def observe(self, step_s: float, eval_s: float | None) -> None:
        self.step_times.append(step_s)
        if eval_s is not None:
            self.eval_times.append(eval_s)

    def due(self, state: dict) -> bool:
        """Whether `replan` runs at this step: the planned step, and in the last stretch every CALIBRATION_STEPS
        steps. It reads only the plan's state, so every process of a distributed run gives the same answer."""
        if self.length.budget_s is None:
            return False
        if state.get("next_plan") is not None:
            return state["step"] >= state["next_plan"]
        return state["step"] % CALIBRATION_STEPS == 0 and state["step"] < state["total"]

    def replan(self, state: dict, now: float, eval_every: int | None) -> str | None:
        """Update state['total'] when a plan is due (state['next_plan'] reached), or shorten it in the last stretch
        (state['next_plan'] None) when the run would end past the budget; returns a line saying what was chosen,
        or None when nothing changed."""
        if not self.due(state) or not self.step_times:
            return None
        due = state.get("next_plan")
        step_s = pace(self.step_times)
        eval_s = statistics.median(self.eval_times) if self.eval_times else 0.0
        per_step = step_s + (eval_s / eval_every if eval_every else 0.0)  # validation passes still to come
        left = self.started + self.length.budget_s - now
        if due is None:  # the last stretch: the latest steps' pace decides whether the tail still fits
            latest = self.step_times[-2 * CALIBRATION_STEPS:]
            per_step = max(per_step, sum(latest) / len(latest))
            fits = state["step"] + max(0, int((left - END_RESERVE_S) / per_step))
            if fits >= state["total"]:
                return None
            state["total"] = max(state["step"] + 1, fits)  # the lr is near zero here: a shorter tail bends nothing
            return (f"time budget {self.length.budget_s:.0f}s: {state['total']} steps at step {state['step']} "
                    f"(the steps slowed to {per_step:.3f}s)")
        more = max(0, int((left * SAFETY - END_RESERVE_S - eval_s) / per_step))
        total = state["step"] + more
        capped = self.length.cap is not None and total >= self.length.cap
        state["total"] = self.length.cap if capped else total
        remaining = state["total"] - state["step"]
        # The last eighth runs on the plan as it stands (unless it would overrun): a correction there would bend
        # the decay for a second or two.
        last = capped or remaining < max(3 * CALIBRATION_STEPS, state["total"] // 8)
        state["next_plan"] = None if last else state["step"] + remaining // 3
        return (f"time budget {self.length.budget_s:.0f}s: {state['total']} steps planned at step {state['step']} "
                f"({step_s:.3f}s a step" + (f", validation {eval_s:.1f}s a pass" if self.eval_times else "")
                + (f"; capped at {self.length.cap}" if capped else "") + ")")
