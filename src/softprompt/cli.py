"""`softprompt COMMAND ...`: thin wrappers over the typed Python functions. Errors print on one line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import replace

from .budget import process_age
from .config import (DistillConfig, EvalConfig, GenerateConfig, InspectConfig, ServeConfig, TrainConfig,
                     add_dataclass_args, config_from_args)
from .errors import SoftPromptError
from .progress import show_load_progress

MAX_STARTUP_S = 120.0  # an older process (a program that calls main() late) is not the user's wait


def _cmd_train(args) -> int:
    from .train import train

    cfg = config_from_args(TrainConfig, args)
    try:
        result = train(cfg, started_at=args.started_at)
    except KeyboardInterrupt:
        _say(f"interrupted: checkpoint saved in {cfg.output}; continue with --resume")
        return 130
    m = result.metrics
    _say(f"wrote {result.output} ({m['steps']} steps, {m['examples_seen']} examples, {m['wall_time_s']:.0f}s, "
         f"final train loss {m['final_train_loss']:.4f}"
         + (f", best validation {m['best_val_accuracy']:.4f} at step {m['best_step']}" if "best_val_accuracy" in m else "")
         + ")")
    return 0


def _cmd_distill(args) -> int:
    from .distill import distill, format_report

    cfg = config_from_args(DistillConfig, args)
    try:
        result = distill(cfg)
    except KeyboardInterrupt:
        _say(f"interrupted: checkpoint saved in {cfg.output}; continue with --resume")
        return 130
    m = result.metrics
    _say(f"wrote {result.output} ({m['steps']} steps, {m['wall_time_s']:.0f}s, final train KL {m['final_train_loss']:.4f})")
    print(format_report(m))
    return 0


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, folder or .gguf (default: the prompt's base, else embedded SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def _cmd_eval(args) -> int:
    from .evaluate import evaluate, format_table

    cfg = config_from_args(EvalConfig, args, _EXTRAS["eval"])
    if args.json:
        cfg = replace(cfg, progress=False)  # standard output is the JSON object; no bars on standard error either
    result = evaluate(cfg)
    if args.json:
        drop = {"predictions"}
        out = {k: v for k, v in result.items() if k not in drop}
        out["systems"] = [{k: v for k, v in s.items() if k not in drop} for s in result["systems"]]
        print(json.dumps(out))
        return 0
    print(format_table(result))
    if cfg.prompt and not cfg.baselines:
        _say("(the prompt alone; --baselines all adds the untuned model, a hand-written instruction and k-shot "
             "on the same rows)")
    return 0


def _cmd_generate(args) -> int:
    from .generate import generate

    cfg = config_from_args(GenerateConfig, args, _EXTRAS["generate"])
    texts = cfg.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SoftPromptError("no input text: pass it as an argument or on standard input")
    cfg = replace(cfg, text=texts)
    if not args.compare:
        for t in generate(cfg):
            print(t)
        return 0
    from .data import Template
    from .model import load_model
    from .prompt import SoftPrompt, prompt_base_source

    # Both runs on one loaded model; the untuned one gets the prompt's template, so only the prompt differs.
    base = load_model(cfg.model if cfg.model else prompt_base_source(cfg.prompt), dtype=cfg.dtype, device=cfg.device)
    prompt = SoftPrompt.load(cfg.prompt, base) if cfg.prompt else None
    tuned = generate(cfg, prompt, base=base)
    template = Template.from_dict(prompt.template) if prompt is not None and prompt.template else None
    untuned = generate(replace(cfg, prompt=None), base=base, template=None if cfg.raw else template)
    for text, before, after in zip(texts, untuned, tuned):
        print(f"input:   {text}\nuntuned: {before.strip()!r}\ntuned:   {after.strip()!r}\n")
    return 0


def _cmd_export(args) -> int:
    from .peft_io import export_peft

    if args.format != "peft":
        raise SoftPromptError(f"unknown export format {args.format!r}; supported: peft")
    out = export_peft(args.prompt, args.output, base_model=args.base_model)
    _say(f"wrote PEFT prompt-tuning adapter to {out}; load it with PeftModel.from_pretrained(base, {str(out)!r})")
    return 0


def _cmd_vllm_request(args) -> int:
    from .vllm_client import completion_request

    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SoftPromptError("no input text: pass it as an argument or on standard input")
    body = completion_request(texts[0] if len(texts) == 1 else texts, args.prompt, model=args.model,
                              served_model_name=args.served_model_name, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, stop=args.stop or (), raw=args.raw,
                              embeds_dtype=args.embeds_dtype, dtype=args.dtype, device=args.device)
    text = json.dumps(body)
    if not args.output:
        print(text)
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    _say(f"wrote {args.output}: POST it to a vLLM server started with --enable-prompt-embeds (docs/vllm.md)")
    return 0


def _cmd_import(args) -> int:
    from .peft_io import import_peft

    out = import_peft(args.adapter, args.output)
    _say(f"wrote softprompt artifact to {out}")
    return 0


def _cmd_inspect(args) -> int:
    from .probe import format_report, inspect_prompt, write_png

    cfg = config_from_args(InspectConfig, args, _EXTRAS["inspect"])
    report = inspect_prompt(cfg)
    if args.png:
        write_png(report, args.png)
    print(json.dumps(report) if args.json else format_report(report))
    if args.png:
        _say(f"wrote {args.png}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output=args.output, steps=args.steps, model=args.model)
    return 0


def _cmd_serve(args) -> int:
    from .serve import run_server

    cfg = config_from_args(ServeConfig, args)
    if not cfg.prompts:
        raise SoftPromptError("serve needs --prompts DIR: a folder of prompt artifacts or PEFT adapters, one per "
                              "subfolder (or `prompts` in --config)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    run_server(config=cfg)  # the API key, the exposure check (before the model loads), the model, the server
    return 0


# A command's own options that are not fields of its config (how the result is shown); --config may set them too.
_EXTRAS: dict[str, dict[str, type]] = {"eval": {"json": bool}, "generate": {"compare": bool},
                                       "inspect": {"json": bool, "png": str}}


def _config_command(sub, name: str, cls, func, **parser_kw) -> argparse.ArgumentParser:
    """A command whose flags are its config dataclass's fields, plus --config FILE."""
    p = sub.add_parser(name, **parser_kw)
    p.add_argument("--config", metavar="FILE", help="JSON, YAML or TOML file holding any of the options below (keys "
                   "are the long flags without '--'); flags given as well win")
    add_dataclass_args(p, cls)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description="Train, evaluate and use soft prompts on frozen language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    _config_command(sub, "train", TrainConfig, _cmd_train, help="train a soft prompt",
                    description="Train a soft prompt on a frozen model.")

    _config_command(sub, "distill", DistillConfig, _cmd_distill,
                    help="distil a long prompt into a soft prompt (prompt compression)",
                    description="Train a soft prompt so that the model without the long --teacher prompt behaves "
                                "as it does with it: KL to the teacher's next-token distributions along its own "
                                "greedy continuations of --data's inputs. Reports agreement, KL and prefill "
                                "speed-up on held-out inputs.")

    p = _config_command(sub, "eval", EvalConfig, _cmd_eval,
                        help="evaluate prompts and baselines on data (classification, generation, lm)",
                        description="Score soft prompts and baselines (untuned model, hand-written instruction, "
                                    "k-shot examples) on the same rows, and print one table (or --json).")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object (no progress bars)")

    p = _config_command(sub, "generate", GenerateConfig, _cmd_generate, help="generate with a soft prompt",
                        description="Continue each input text with a soft prompt (filled into its saved input "
                                    "template unless --raw), or with the untuned model.")
    p.add_argument("--compare", action="store_true", default=None,
                   help="print the untuned and the tuned answers side by side")

    p = sub.add_parser("export", help="write a prompt in another format (PEFT)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--format", default="peft")
    p.add_argument("--output", required=True)
    p.add_argument("--base-model", help="base_model_name_or_path to record (default: the prompt's base)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("vllm-request", help="a /v1/completions body with prompt_embeds for a vLLM server",
                       description="Print (or --output) the JSON body of a vLLM /v1/completions request whose "
                                   "prompt_embeds are the prompt's virtual tokens + the input's token embeddings, the "
                                   "template applied as `generate` does. Serve with `vllm serve MODEL "
                                   "--enable-prompt-embeds`; see docs/vllm.md.")
    p.add_argument("text", nargs="*", help="input text(s), one choice each; read from stdin when none")
    p.add_argument("--prompt", required=True, help="prompt artifact or PEFT adapter directory (input-embedding "
                   "prompts only)")
    p.add_argument("--served-model-name", help="the request's model field (default: the prompt's base model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the prompt's input template")
    p.add_argument("--embeds-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype in the payload (vLLM casts to its own; bfloat16 halves the size)")
    p.add_argument("--output", help="write the JSON body here instead of standard output")
    _common_model_args(p)
    p.set_defaults(func=_cmd_vllm_request)

    p = sub.add_parser("import", help="convert a PEFT prompt-tuning adapter into a softprompt artifact")
    p.add_argument("adapter")
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_import)

    p = _config_command(sub, "inspect", InspectConfig, _cmd_inspect,
                        help="what a prompt looks like: nearest tokens, norms, drift from its init, similarity to "
                             "another prompt",
                        description="Nearest vocabulary tokens of each virtual token (cosine), norms against the "
                                    "vocabulary's, distance from the reproduced initialisation, and with --compare "
                                    "the similarity to another prompt for the same model.")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object")
    p.add_argument("--png", metavar="FILE", help="write a heat map (nearest tokens, or the --compare cosine matrix)")

    p = sub.add_parser("demo", help="train on a small built-in task and show before/after (a few minutes on CPU)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default=None)
    p.set_defaults(func=_cmd_demo)

    _config_command(sub, "serve", ServeConfig, _cmd_serve,
                    help="OpenAI-compatible HTTP server: many soft prompts on one frozen model",
                    description="Serve every prompt in --prompts (a model id BASE:PROMPT each) with mixed-prompt "
                                "continuous batching. Every limit is a flag (and a --config key). See "
                                "docs/serving.md.")
    return parser


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun/accelerate, only process 0 talks
        print(msg, file=sys.stderr, flush=True)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (not the stream of the first call: tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break a command
            self.handleError(record)


def _log_to_stderr() -> None:
    """The library logs what it decided (e.g. the measured dtype) to the `softprompt` logger; the CLI shows it."""
    logger = logging.getLogger("softprompt")
    if os.environ.get("RANK", "0") != "0" or any(getattr(h, "_softprompt", False) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("softprompt: %(message)s"))
    handler._softprompt = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    # A --time-budget counts the user's whole wait: for the command itself (argv None) from the process's start,
    # imports and model loading included; for a call from Python code, from this call.
    age = process_age() if argv is None else None
    started_at = time.perf_counter() - (age if age is not None and age < MAX_STARTUP_S else 0.0)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"softprompt: warning: {msg}\n"
    _log_to_stderr()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    args.started_at = started_at
    if args.command != "demo" and os.environ.get("RANK", "0") == "0":  # the demo prints its own loading line
        show_load_progress()  # "loading model X ... done in 21s" on stderr
    debug = bool(os.environ.get("SOFTPROMPT_DEBUG"))
    try:
        return args.func(args)
    except SoftPromptError as e:
        if debug:
            raise
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        if debug:
            raise
        print(f"softprompt: error: {type(e).__name__}: {e} (set SOFTPROMPT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
