"""Typed configs: each dataclass is at once the Python API, the CLI flags and the --config file schema."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from .errors import SoftPromptError


def cli_text(text: str) -> str:
    r"""Text typed on a command line: `\n`, `\t` and `\\` become a newline, a tab and a backslash, as a shell user
    means them in "Review: {x}\nSentiment:" (config files hold real newlines and skip this)."""
    return re.sub(r"\\([\\nt])", lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], text)


def opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    data: str = opt(None, "training data: .jsonl/.json/.csv/.tsv/.parquet, a Hugging Face dataset folder (FOLDER[@SPLIT]) or hf:ID[:CONFIG][@SPLIT]", required=True)
    output: str = opt(None, "artifact directory to write (prompt.safetensors, softprompt.json, log, plot)", required=True)
    model: str | None = opt(None, "hub id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    validation: str | None = opt(None, "validation data (same forms as --data), evaluated every --eval-every steps; the best prompt is kept")
    input_template: str = opt("{input}", "how a row becomes the input text, e.g. 'Review: {sentence}\\nSentiment:'", escapes=True)
    output_template: str | None = opt(None, "how a row becomes the answer (default ' {output}'; '{output}' with --chat)", escapes=True)
    label_map: str | None = opt(None, "turn label values into words, e.g. 0=negative,1=positive")
    lm: bool = opt(False, "language modelling: no input, loss on the whole text (output template defaults to '{text}')")
    chat: bool | None = opt(None, "wrap inputs in the model's chat template (default: on when the model has one and "
                               "rows have an input; --no-chat turns it off)")
    system: str | None = opt(None, "with --chat: the system message (default: the chat template's own, if it has one)", escapes=True)
    virtual_tokens: int = opt(20, "number of trainable virtual tokens")
    init: str = opt("vocab", "initialisation: random | vocab | text | labels | prompt")
    init_text: str | None = opt(None, "text for --init text (also the hand-written baseline in eval)", escapes=True)
    init_prompt: str | None = opt(None, "for --init prompt: an existing prompt or PEFT adapter to start from (transfer, SPoT)")
    deep: bool | None = opt(None, "deep prompt (Prefix-Tuning / P-tuning v2): train keys/values at every layer, not "
                               "input embeddings (default: on for rows with an input on decoder-only models whose "
                               "layers keep a plain key/value cache, without --reparam; off for --lm; --no-deep)")
    reparam: str | None = opt(None, "train through an encoder: mlp | lstm (P-tuning) | residual (Residual Prompt Tuning); the artifact stays plain embeddings")
    reparam_hidden: int = opt(0, "hidden size of the reparameterisation encoder (0: the model's hidden size)")
    steps: int | None = opt(None, "optimizer steps (overrides --epochs)")
    epochs: float | None = opt(None, "passes over the training data when --steps is not given")
    time_budget: str | None = opt(None, "wall-clock budget for the whole run (model loading included), e.g. 90s, 10m, "
                                  "1.5h: the first steps are timed, then the step count is fixed so that warmup and "
                                  "decay still fit. Default run length, when none of --steps, --epochs, "
                                  "--time-budget is given: 3 epochs, at most 10 minutes")
    batch_size: int = opt(16, "examples per optimizer step (global, over all processes and accumulation)")
    grad_accum: int = opt(1, "split each step's batch into this many micro-batches (saves memory, same result)")
    lr: float | None = opt(None, "peak learning rate (default 0.1; 0.01 for a deep prompt or with --reparam; 1e-5 with both: keys/values and encoder weights need smaller steps; prompt tuning needs far higher rates than fine-tuning)")
    warmup: float = opt(0.06, "warmup as a fraction of steps (<1) or a number of steps (>=1)")
    schedule: str = opt("cosine", "learning-rate schedule after warmup: cosine | linear | constant")
    weight_decay: float = opt(0.0, "AdamW weight decay on the prompt")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 disables)")
    max_length: int = opt(512, "max tokens per row (input is truncated from the left, with a warning)")
    eval_every: int = opt(0, "validate every N steps (0: 10 times per run when --validation is given)")
    eval_limit: int | None = opt(None, "validate on at most this many rows")
    save_every: int = opt(50, "write a checkpoint every N steps (and on Ctrl-C)")
    seed: int = opt(0, "seed for the init, data order and sampling")
    dtype: str = opt("auto", "base model dtype: auto | float32 | bfloat16 | float16")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = opt(False, "continue from OUTPUT/checkpoint.safetensors")
    overwrite: bool = opt(False, "start over even if OUTPUT already holds a run")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward: less memory, ~30% more time (big models, long rows)")
    quantize: str | None = opt(None, "store the frozen base in 8bit or 4bit (bitsandbytes, CUDA only)")
    fsdp: bool = opt(False, "shard the frozen base's transformer blocks across processes (PyTorch FSDP2; launch with torchrun/accelerate)")
    trust_remote_code: bool = opt(False, "allow the model's own code from the hub (off by default)")
    progress: bool = opt(True, "show a progress bar")
    report_to: str | None = opt(None, "also log loss, lr, tokens/s, validation metrics and the config to: tensorboard "
                                      "(OUTPUT/tensorboard) and/or wandb (offline, OUTPUT/wandb); comma list")


@dataclass
class DistillConfig:
    """`softprompt distill`: a long hard prompt (the teacher) -> a few virtual tokens (the student)."""

    teacher: str = opt(None, "the long prompt to distil: its text, or a file holding it", required=True, escapes=True)
    data: str = opt(None, "inputs to distil on (.jsonl/.json/.csv/.tsv/.parquet); rows with an output are gold answers for --gold-weight", required=True)
    output: str = opt(None, "artifact directory to write (prompt, teacher cache, checkpoint, log)", required=True)
    model: str | None = opt(None, "hub id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    validation: str | None = opt(None, "held-out inputs for the report (default: --holdout of --data)")
    holdout: float = opt(0.1, "without --validation: this fraction of --data (at least 1 row) is held out for the report; 0: no report")
    input_template: str = opt("{input}", "how a row becomes the input text", escapes=True)
    output_template: str | None = opt(None, "how a row becomes its gold answer (default ' {output}'; '{output}' with --chat)", escapes=True)
    chat: bool = opt(False, "wrap inputs in the chat template; the teacher prompt is then the system message")
    separator: str = opt("\n\n", "without --chat: what goes between the teacher prompt and the input", escapes=True)
    virtual_tokens: int = opt(20, "virtual tokens of the student (at most the teacher prompt's length with --init teacher)")
    deep: bool = opt(False, "deep prompt: train keys/values at every layer (a KV prefix)")
    init: str = opt("teacher", "teacher (the teacher prompt's own token embeddings, or with --deep its keys/values) | vocab | random | text")
    init_text: str | None = opt(None, "text for --init text", escapes=True)
    compress: str = opt("even", "with --init teacher and fewer virtual tokens than teacher tokens: which positions to keep: even (evenly spaced, the first included) | sink (the first + the last) | last | first")
    max_new_tokens: int = opt(32, "length of the teacher's greedy continuations (the positions the KL is taken at)")
    top_k: int = opt(64, "teacher log-probs stored per position; the rest of the vocabulary is one renormalised tail bucket")
    gold_weight: float = opt(0.0, "add this x the gold answers' NLL (rows that have an output) to the KL")
    steps: int | None = opt(None, "optimizer steps (overrides --epochs)")
    epochs: float = opt(3.0, "passes over the inputs when --steps is not given")
    batch_size: int = opt(8, "inputs per optimizer step")
    grad_accum: int = opt(1, "split each step's batch into this many micro-batches")
    lr: float | None = opt(None, "peak learning rate (default as train: 0.1; 0.01 with --deep)")
    warmup: float = opt(0.06, "warmup as a fraction of steps (<1) or a number of steps (>=1)")
    schedule: str = opt("cosine", "cosine | linear | constant")
    weight_decay: float = opt(0.0, "AdamW weight decay on the prompt")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 disables)")
    max_length: int = opt(1024, "max tokens of teacher prompt + input + continuation (longer is an error, never cut)")
    save_every: int = opt(50, "write a checkpoint every N steps (and on Ctrl-C)")
    seed: int = opt(0, "seed for the init, the holdout split and data order")
    dtype: str = opt("auto", "base model dtype: auto | float32 | bfloat16 | float16")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = opt(False, "continue from OUTPUT/checkpoint.safetensors (the teacher cache is reused)")
    overwrite: bool = opt(False, "start over even if OUTPUT already holds a run")
    trust_remote_code: bool = opt(False, "allow the model's own code from the hub (off by default)")
    progress: bool = opt(True, "show progress bars")


def from_kwargs(cls, config: Any = None, **kwargs) -> Any:
    """Accept a config object, a dict, or keyword arguments (the Python API's convenience)."""
    if config is None:
        config = {}
    if isinstance(config, cls):
        return config if not kwargs else cls(**{**config.__dict__, **kwargs})
    known = {f.name for f in fields(cls)}
    merged = {**config, **kwargs}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SoftPromptError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    missing = [f.name for f in fields(cls) if f.metadata.get("required") and merged.get(f.name) is None]
    if missing:
        raise SoftPromptError(f"missing required field(s): {', '.join(missing)}")
    return cls(**merged)


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SoftPromptError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # each parser has its own error type; all mean the same to the user
        raise SoftPromptError(f"{p}: cannot parse config ({e})") from None
    if not isinstance(data, dict):
        raise SoftPromptError(f"{p}: a config file must hold a mapping of field: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def add_dataclass_args(parser: argparse.ArgumentParser, cls, positional: tuple[str, ...] = ()) -> None:
    """One flag per field; defaults stay None so a --config file can fill what the command line leaves out."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        flag = f.name if f.name in positional else "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        shown = default.encode("unicode_escape").decode() if isinstance(default, str) else default  # "\n" visible
        help_text = f.metadata.get("help", "") + ("" if default in (None, False) else f" (default: {shown})")
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        typ = hints[f.name]
        if typ is bool or set(get_args(typ)) == {bool, type(None)}:  # --x / --no-x (unset: None, the default)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            args = [a for a in get_args(typ) if a is not type(None)]
            base = args[0] if args else typ  # `int | None` -> int
            kind = cli_text if f.metadata.get("escapes") else base
            parser.add_argument(flag, type=kind, default=None, help=help_text, metavar=f.name.upper())


def config_from_args(cls, args: argparse.Namespace) -> Any:
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    for f in fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return from_kwargs(cls, values)
