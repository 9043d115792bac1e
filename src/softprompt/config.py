"""Typed configs: one dataclass per command, at once the Python API, the CLI flags and the --config file schema.

`train` TrainConfig, `distill` DistillConfig, `eval` EvalConfig, `generate` GenerateConfig, `inspect` InspectConfig,
`serve` ServeConfig. The CLI's flags are generated from the fields (add_dataclass_args); `--config FILE` (JSON, YAML
or TOML) holds any of them, and flags win (config_from_args); the Python entry points take a config object, a dict
or the fields as keyword arguments (from_kwargs). A field's metadata says how it reads on a command line:
`help`, `required` (checked after the file is merged, so a file can supply it), `escapes` (`\\n` typed in a shell
is a newline), `positional`, `aliases` (extra spellings, e.g. `-k`), `metavar`, `choices`, and `comma` (a
`list[str]` given as one comma list, `--baselines untuned,kshot`); any other `list[str]` field is a repeatable
flag (`--stop A --stop B`), or, positional, any number of words.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import SoftPromptError


def cli_text(text: str) -> str:
    r"""Text typed on a command line: `\n`, `\t` and `\\` become a newline, a tab and a backslash, as a shell user
    means them in "Review: {x}\nSentiment:" (config files hold real newlines and skip this)."""
    return re.sub(r"\\([\\nt])", lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], text)


def opt(default: Any, help: str, *, repr: bool = True, **kw) -> Any:
    """A config field: its default, its help text (the flag's), and how it reads on a command line (module doc)."""
    return field(default=default, repr=repr, metadata={"help": help, **kw})


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
    time_budget: str | None = opt(None, "wall-clock budget for the whole run, counted from the command's start "
                                  "(imports and model loading included), e.g. 90s, 10m, 1.5h: the first steps are "
                                  "timed, then the step count is fixed so that warmup and decay still fit, and "
                                  "corrected when the steps slow down. Default run length, when none of --steps, "
                                  "--epochs, --time-budget is given: 3 epochs, at most 10 minutes")
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


MODEL_HELP = "hub id, local folder or .gguf file (default: the prompt's base model, else the embedded SmolLM2-135M-Instruct)"
DTYPE_HELP = "base model dtype: auto | float32 | bfloat16 | float16"
DEVICE_HELP = "auto | cpu | cuda | cuda:N"


@dataclass
class EvalConfig:
    """`softprompt eval` / `softprompt.evaluate`: score soft prompts and baselines on the same rows."""

    data: str = opt(None, "a data file, a Hugging Face dataset folder (FOLDER[@SPLIT]) or hf:ID[:CONFIG][@SPLIT] "
                          "(README, Train)", required=True)
    prompt: list[str] | None = opt(None, "prompt artifact or PEFT adapter directory (repeatable; omit: the untuned "
                                         "model); the Python API also takes SoftPrompt objects")
    task: str = opt("auto", "auto: lm for an empty input template, classification for a small label set, else "
                            "generation", choices=("auto", "classification", "generation", "lm"))
    baselines: list[str] | None = opt(None, "comma list of untuned, instruction, kshot; 'all' (those whose inputs are "
                                            "available) or 'none' (the default: a quick check scores the prompt "
                                            "alone; without --prompt the untuned model is scored)", comma=True)
    instruction: str | None = opt(None, "hand-written instruction placed before each input (default: the prompt's "
                                        "--init-text, if any)", escapes=True)
    shots: int = opt(4, "examples in the k-shot baseline")
    shots_from: str | None = opt(None, "rows for the k-shot baseline (default: the prompt's training data)")
    seed: int = opt(0, "seed for drawing the k-shot examples")
    limit: int | None = opt(None, "evaluate only the first N rows (quick look)")
    batch_size: int = opt(16, "rows per forward pass")
    max_length: int = opt(512, "max tokens per row (input truncated from the left)")
    max_new_tokens: int | None = opt(None, "generation: tokens to generate (default: from the references)")
    stop: list[str] | None = opt(None, "generation: stop string (repeatable; default: newline when no reference has "
                                       "one)")
    input_template: str | None = opt(None, "override the prompt's input template", escapes=True)
    output_template: str | None = opt(None, "override the prompt's output template", escapes=True)
    label_map: str | None = opt(None, "override the prompt's label words, e.g. 0=negative,1=positive")
    chat: bool | None = opt(None, "use the chat template (default: as the prompt was trained)")
    model: str | None = opt(None, MODEL_HELP)
    dtype: str = opt("auto", DTYPE_HELP)
    device: str = opt("auto", DEVICE_HELP)
    progress: bool = opt(True, "show progress bars")


@dataclass
class GenerateConfig:
    """`softprompt generate` / `softprompt.generate`: continue texts with a soft prompt (or none)."""

    text: list[str] | None = opt(None, "input text(s); read from standard input when none", positional=True)
    prompt: str | None = opt(None, "prompt artifact or PEFT adapter directory (omit: the untuned model); the Python "
                                   "API also takes a SoftPrompt, or a list with one per text")
    max_new_tokens: int = opt(64, "tokens to generate at most")
    temperature: float = opt(0.0, "sampling temperature (0: greedy)")
    top_p: float = opt(1.0, "nucleus sampling: sample from the smallest set of tokens whose probability reaches this")
    seed: int | None = opt(0, "seed for sampling")
    stop: list[str] | None = opt(None, "stop string (repeatable)")
    raw: bool = opt(False, "do not apply the prompt's input template")
    batch_size: int = opt(16, "texts generated together")
    model: str | None = opt(None, MODEL_HELP)
    dtype: str = opt("auto", DTYPE_HELP)
    device: str = opt("auto", DEVICE_HELP)


@dataclass
class InspectConfig:
    """`softprompt inspect` / `probe.inspect_prompt`: nearest tokens, norms, drift, similarity to another prompt."""

    prompt: str = opt(None, "prompt artifact or PEFT adapter directory", required=True, positional=True)
    top_k: int = opt(5, "nearest tokens per virtual token", aliases=("-k",))
    compare: str | None = opt(None, "also compare with this prompt (cosines, matching)", metavar="OTHER_PROMPT")
    model: str | None = opt(None, MODEL_HELP)
    dtype: str = opt("auto", DTYPE_HELP)
    device: str = opt("auto", DEVICE_HELP)


@dataclass
class ServeConfig:
    """`softprompt serve` / `serve.run_server` and `serve.create_app`: many soft prompts on one frozen model behind
    an OpenAI-compatible API. Every limit is a field, so a flag and a --config key."""

    prompts: str | None = opt(None, "folder of prompt artifacts / PEFT prompt-tuning adapters, one per subfolder "
                                    "(rescanned while serving)")
    model: str | None = opt(None, "hub id, folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    dtype: str = opt("auto", DTYPE_HELP)
    device: str = opt("auto", DEVICE_HELP)
    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only; another address needs an API key "
                                 "or --allow-no-api-key)")
    port: int = opt(8000, "port to bind")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on every endpoint but /health (default: "
                                    "$SOFTPROMPT_API_KEY, else none; visible in the process list: prefer "
                                    "--api-key-file or the variable)", repr=False)
    api_key_file: str | None = opt(None, "read the API key from this file (its first line)")
    allow_no_api_key: bool = opt(False, "serve a non-loopback --host without an API key (refused by default)")
    served_model_name: str | None = opt(None, "the base model's name in requests' `model` field (default: from --model)")
    max_running: int = opt(32, "sequences decoded together (the batch)")
    max_waiting: int = opt(256, "queued sequences; beyond this a request gets 429 at once")
    max_connections: int | None = opt(None, "open HTTP connections; uvicorn answers 503 beyond (default: "
                                            "max_running + max_waiting + 16)")
    max_input_tokens: int = opt(2048, "longest input in tokens; longer is a 400")
    max_output_tokens: int = opt(512, "largest max_tokens a request may ask for; more is a 400")
    max_prefill_tokens: int = opt(4096, "input tokens prefilled in one scheduler step (newcomers beyond wait a step)")
    prefill_wait_steps: int = opt(4, "while others decode, newcomers wait up to this many decode steps so that several "
                                     "join the batch in one step (each joining step's pass is longer); 0: each joins "
                                     "at once. With nothing running nobody waits")
    request_timeout: float = opt(120.0, "seconds from a request's arrival to its last token; beyond, a 504",
                                 aliases=("--timeout",))
    max_body_bytes: int = opt(1 << 20, "largest request body in bytes; larger is a 413")
    watch_interval: float = opt(2.0, "seconds between rescans of the prompts folder (0: only at start and on an "
                                     "admin reload)")
    max_prompt_bytes: int = opt(64 << 20, "largest prompt tensor file loaded, in bytes")
    max_virtual_tokens: int = opt(1024, "most virtual tokens a served prompt may have")
    max_n: int = opt(8, "largest `n` (choices per request)")


def from_kwargs(cls, config: Any = None, **kwargs) -> Any:
    """Accept a config object, a dict, or keyword arguments (the Python API's convenience); keyword arguments win.
    Always a new object: the caller's config is never changed."""
    if config is None:
        config = {}
    if isinstance(config, cls):
        config = {f.name: getattr(config, f.name) for f in fields(cls)}
    elif not isinstance(config, Mapping):
        raise SoftPromptError(f"expected a {cls.__name__}, a dict or keyword arguments, got {type(config).__name__}")
    known = {f.name for f in fields(cls)}
    merged = {**config, **kwargs}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise SoftPromptError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    missing = [f.name for f in fields(cls) if f.metadata.get("required") and merged.get(f.name) is None]
    if missing:
        raise SoftPromptError(f"missing required field(s): {', '.join(missing)}")
    return cls(**merged)


def from_call(cls, first: Any, first_field: str, positional: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """An entry point's two call forms as one config: `f(Config(...) or dict, **overrides)`, or today's
    `f(value_of_first_field, next_positional, ..., **fields)`. Positional arguments left at None are not given."""
    given = {k: v for k, v in positional.items() if v is not None}
    if isinstance(first, (cls, Mapping)):
        return from_kwargs(cls, first, **given, **kwargs)
    if first is not None:
        given[first_field] = first
    return from_kwargs(cls, **given, **kwargs)


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
    if data is None and p.suffix in (".yaml", ".yml"):
        data = {}  # an empty (or all-comment) YAML file
    if not isinstance(data, dict):
        raise SoftPromptError(f"{p}: a config file must hold a mapping of field: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _field_kind(hint: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `list[str] | None` -> (list, True); `bool` -> (bool, False)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    inner = args[0] if (args and get_origin(hint) is not list) else hint
    return (list if get_origin(inner) is list else inner), optional


def _file_value(source: str, f, hint: Any, value: Any) -> Any:
    """A value read from a config file, checked against the field's type (a clear error, not a crash later)."""
    kind, optional = _field_kind(hint)
    if value is None and (optional or f.default is None):
        return None
    if kind is list:
        if isinstance(value, str):  # `stop = "\n"` means one stop string; a comma field splits its list
            value = _comma_list(value) if f.metadata.get("comma") else [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        what = "a list of strings (or one string)"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        what = "true or false"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        what = "an integer"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        what = "a number"
    elif kind is str:
        if isinstance(value, str):
            return value
        what = "a string"
    else:
        return value
    raise SoftPromptError(f"{source}: {f.name} must be {what}, got {value!r}")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _flags(f) -> list[str]:
    """A field's spellings: short aliases first (as `-k, --top-k` reads), then --name, then long aliases."""
    aliases = list(f.metadata.get("aliases", ()))
    short = [a for a in aliases if not a.startswith("--")]
    return [*short, "--" + f.name.replace("_", "-"), *[a for a in aliases if a.startswith("--")]]


def add_dataclass_args(parser: argparse.ArgumentParser, cls, positional: tuple[str, ...] = ()) -> None:
    """One flag per field (`positional` in the field's metadata, or named here: an argument); defaults stay None so
    a --config file can fill what the command line leaves out. A required field is checked after the merge."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        shown = default.encode("unicode_escape").decode() if isinstance(default, str) else default  # "\n" visible
        help_text = f.metadata.get("help", "") + ("" if default is None or default is False else f" (default: {shown})")
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        kind, _ = _field_kind(hints[f.name])
        is_positional = f.metadata.get("positional") or f.name in positional
        names = [f.name] if is_positional else _flags(f)
        kw: dict[str, Any] = {"default": None, "help": help_text}
        if not is_positional:
            kw["dest"] = f.name
        if kind is bool:  # --x / --no-x (unset: None, the default)
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind is list:
            if f.metadata.get("comma"):
                kw["type"] = _comma_list
            elif is_positional:
                kw["nargs"] = "*"
            else:
                kw["action"] = "append"
            if f.metadata.get("escapes"):
                kw["type"] = cli_text
        else:
            kw["type"] = cli_text if f.metadata.get("escapes") else kind
            if is_positional:
                kw["nargs"] = "?"  # a --config file may give it instead
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        kw["metavar"] = f.metadata.get("metavar", f.name.upper())
        parser.add_argument(*names, **kw)


def config_from_args(cls, args: argparse.Namespace, extras: Mapping[str, type] | None = None) -> Any:
    """The config of a parsed command line: --config FILE's values, then every flag given (flags win).

    `extras`: the command's own options that are not config fields (e.g. `--json`: name -> type); a file may set
    them too, and they are written onto `args` where the command line left them unset (None)."""
    extras = dict(extras or {})
    values: dict[str, Any] = {}
    source = getattr(args, "config", None)
    if source:
        hints = get_type_hints(cls)
        by_name = {f.name: f for f in fields(cls)}
        for key, value in read_config_file(source).items():
            if key in by_name:
                values[key] = _file_value(source, by_name[key], hints[key], value)
            elif key in extras:
                if not isinstance(value, extras[key]):
                    raise SoftPromptError(f"{source}: {key} must be a {extras[key].__name__}, got {value!r}")
                if getattr(args, key, None) is None:
                    setattr(args, key, value)
            else:
                import difflib

                close = difflib.get_close_matches(key, [*by_name, *extras], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SoftPromptError(f"{source}: unknown key {key!r}{hint}: a key is one of the command's long "
                                      f"flags without '--' ({cls.__name__}; see --help)")
    for f in fields(cls):
        given = getattr(args, f.name, None)
        if given is not None and given != []:  # a positional list that was not given parses to []
            values[f.name] = given
    return from_kwargs(cls, values)
