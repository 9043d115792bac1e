"""Experiment trackers for `train --report-to tensorboard,wandb`: each metrics.jsonl record also goes to them.

TensorBoard events go to OUTPUT/tensorboard (`tensorboard --logdir OUTPUT`); W&B runs offline into OUTPUT/wandb
(`wandb sync OUTPUT/wandb/offline-run-*` uploads it later). Both get the run's config once, as text / run config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import SoftPromptError

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl keys -> tracker tags; anything else numeric (a future key) goes under train/ by its own name.
TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch",
        "elapsed_s": "train/elapsed_s"}


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; None / 'none' -> []."""
    if value is None:
        return []
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SoftPromptError(f"report_to: unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def tag_of(key: str) -> str:
    return "val/" + key[4:] if key.startswith("val_") else TAGS.get(key, "train/" + key)


class Reporter:
    """Created before anything is written (so a missing package fails the run at once); `open` on the process
    that writes the log; `log(record)` next to each metrics.jsonl line; `close` at the end or on Ctrl-C."""

    def __init__(self, report_to: str | list[str] | None):
        self.names = parse_report_to(report_to)
        self.writers: list[Any] = []
        if "tensorboard" in self.names:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
            except ImportError:
                raise SoftPromptError("report_to tensorboard needs the tensorboard package: "
                                      "pip install 'softprompt[tensorboard]'") from None
        if "wandb" in self.names:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise SoftPromptError("report_to wandb needs the wandb package: pip install 'softprompt[wandb]'") from None

    def open(self, output: Path, config: dict[str, Any], start_step: int = 0) -> None:
        """`start_step` > 0 on --resume: TensorBoard drops the events after it (logged after the checkpoint, so
        about to be logged again)."""
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(Path(output) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
            writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", start_step)
            self.writers.append(TensorBoardWriter(writer))
        if "wandb" in self.names:
            self.writers.append(WandbWriter(Path(output), config))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        scalars = {tag_of(k): float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self.writers:
            writer.log(scalars, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class TensorBoardWriter:
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()  # flushes the event file


class WandbWriter:
    def __init__(self, output: Path, config: dict[str, Any]):
        import wandb

        # Offline: nothing leaves the machine and no account is needed; `wandb sync` uploads later. A resumed
        # training run starts a new W&B run whose steps continue where the checkpoint left off.
        self.run = wandb.init(project="softprompt", name=output.name, dir=str(output), mode="offline",
                              config=json.loads(json.dumps(config, default=str)))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
