"""`softprompt COMMAND ...`: thin wrappers over the typed Python functions. Errors print on one line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from .config import DistillConfig, TrainConfig, add_dataclass_args, cli_text, config_from_args
from .errors import SoftPromptError
from .progress import show_load_progress

_STARTED = time.perf_counter()  # a --time-budget counts the user's whole wait: imports and model loading too


def _cmd_train(args) -> int:
    from .train import train

    cfg = config_from_args(TrainConfig, args)
    try:
        result = train(cfg, started_at=_STARTED)
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


def _template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-template", type=cli_text, help="override the prompt's input template")
    p.add_argument("--output-template", type=cli_text, help="override the prompt's output template")
    p.add_argument("--label-map", help="e.g. 0=negative,1=positive")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help="use the chat template")


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, folder or .gguf (default: the prompt's base, else embedded SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def _cmd_eval(args) -> int:
    from .evaluate import evaluate, format_table

    prompts = args.prompt or None
    result = evaluate(args.data, prompts, model=args.model, input_template=args.input_template,
                      output_template=args.output_template, label_map=args.label_map, chat=args.chat,
                      limit=args.limit, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                      progress=not args.json and not args.no_progress, task=args.task,
                      baselines=args.baselines or (),
                      instruction=args.instruction, shots=args.shots, shots_from=args.shots_from, seed=args.seed,
                      max_new_tokens=args.max_new_tokens, stop=args.stop, max_length=args.max_length)
    if args.json:
        drop = {"predictions"}
        out = {k: v for k, v in result.items() if k not in drop}
        out["systems"] = [{k: v for k, v in s.items() if k not in drop} for s in result["systems"]]
        print(json.dumps(out))
        return 0
    print(format_table(result))
    if prompts and not args.baselines:
        _say("(the prompt alone; --baselines all adds the untuned model, a hand-written instruction and k-shot "
             "on the same rows)")
    return 0


def _cmd_generate(args) -> int:
    from .generate import generate
    from .model import load_model
    from .prompt import SoftPrompt, prompt_base_source

    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SoftPromptError("no input text: pass it as an argument or on standard input")
    base = load_model(args.model if args.model else prompt_base_source(args.prompt), dtype=args.dtype, device=args.device)
    prompt = SoftPrompt.load(args.prompt, base) if args.prompt else None
    kw = dict(base=base, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              seed=args.seed, stop=args.stop or (), raw=args.raw)
    tuned = generate(texts, prompt, **kw)
    if not args.compare:
        for t in tuned:
            print(t)
        return 0
    from .data import Template

    template = Template.from_dict(prompt.template) if prompt is not None and prompt.template else None
    untuned = generate(texts, None, template=None if args.raw else template, **kw)
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

    report = inspect_prompt(args.prompt, model=args.model, k=args.top_k, compare=args.compare, dtype=args.dtype,
                     device=args.device)
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
    import logging

    from .model import load_model
    from .serve import ServeConfig, check_exposure, read_api_key, run_server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    cfg = ServeConfig(host=args.host, port=args.port, api_key=read_api_key(args.api_key, args.api_key_file),
                      allow_no_api_key=args.allow_no_api_key,
                      served_model_name=args.served_model_name, max_running=args.max_running,
                      max_waiting=args.max_waiting, max_input_tokens=args.max_input_tokens,
                      max_output_tokens=args.max_output_tokens, request_timeout=args.timeout,
                      max_body_bytes=args.max_body_bytes, watch_interval=args.watch_interval)
    check_exposure(cfg)  # before the model load, not 20 s later
    base = load_model(args.model, dtype=args.dtype, device=args.device)
    run_server(base, args.prompts, cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description="Train, evaluate and use soft prompts on frozen language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a soft prompt", description="Train a soft prompt on a frozen model.")
    p.add_argument("--config", help="JSON/YAML/TOML file with any of the fields below (flags win)")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("distill", help="distil a long prompt into a soft prompt (prompt compression)",
                       description="Train a soft prompt so that the model without the long --teacher prompt behaves "
                                   "as it does with it: KL to the teacher's next-token distributions along its own "
                                   "greedy continuations of --data's inputs. Reports agreement, KL and prefill "
                                   "speed-up on held-out inputs.")
    p.add_argument("--config", help="JSON/YAML/TOML file with any of the fields below (flags win)")
    add_dataclass_args(p, DistillConfig)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("eval", help="evaluate prompts and baselines on data (classification, generation, lm)",
                       description="Score soft prompts and baselines (untuned model, hand-written instruction, "
                                   "k-shot examples) on the same rows, and print one table (or --json).")
    p.add_argument("--prompt", action="append", help="prompt artifact or PEFT adapter directory (repeatable; "
                   "omit: the untuned model)")
    p.add_argument("--data", required=True, help="a data file, a Hugging Face dataset folder (FOLDER[@SPLIT]) or "
                   "hf:ID[:CONFIG][@SPLIT] (README, Train)")
    p.add_argument("--task", default="auto", choices=["auto", "classification", "generation", "lm"],
                   help="auto: lm for an empty input template, classification for a small label set, else generation")
    p.add_argument("--baselines", help="comma list of untuned, instruction, kshot; 'all' (those whose inputs are "
                   "available) or 'none' (the default: a quick check scores the prompt alone; without --prompt "
                   "the untuned model is scored)")
    p.add_argument("--instruction", type=cli_text, help="hand-written instruction placed before each input (default: the prompt's "
                   "--init-text, if any)")
    p.add_argument("--shots", type=int, default=4, help="examples in the k-shot baseline (default: 4)")
    p.add_argument("--shots-from", help="rows for the k-shot baseline (default: the prompt's training data)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the k-shot examples")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows (quick look)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="max tokens per row (input truncated from the left)")
    p.add_argument("--max-new-tokens", type=int, help="generation: tokens to generate (default: from the references)")
    p.add_argument("--stop", action="append", help="generation: stop string (repeatable; default: newline when "
                   "no reference has one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _template_args(p)
    _common_model_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="generate with a soft prompt")
    p.add_argument("text", nargs="*", help="input text(s); read from stdin when none")
    p.add_argument("--prompt", help="prompt artifact or PEFT adapter directory")
    p.add_argument("--compare", action="store_true", help="print the untuned and the tuned answers side by side")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the prompt's input template")
    _common_model_args(p)
    p.set_defaults(func=_cmd_generate)

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

    p = sub.add_parser("inspect", help="what a prompt looks like: nearest tokens, norms, drift from its init, "
                       "similarity to another prompt", description="Nearest vocabulary tokens of each virtual token "
                       "(cosine), norms against the vocabulary's, distance from the reproduced initialisation, and "
                       "with --compare the similarity to another prompt for the same model.")
    p.add_argument("prompt", help="prompt artifact or PEFT adapter directory")
    p.add_argument("-k", "--top-k", type=int, default=5, help="nearest tokens per virtual token (default: 5)")
    p.add_argument("--compare", metavar="OTHER_PROMPT", help="also compare with this prompt (cosines, matching)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", metavar="FILE", help="write a heat map (nearest tokens, or the --compare cosine matrix)")
    _common_model_args(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo", help="train on a small built-in task and show before/after (a few minutes on CPU)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default=None)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: many soft prompts on one frozen model",
                       description="Serve every prompt in --prompts (a model id BASE:PROMPT each) with mixed-prompt "
                                   "continuous batching. See docs/serving.md.")
    p.add_argument("--model", help="hub id, folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", required=True, help="folder of prompt artifacts / PEFT prompt-tuning adapters, one per subfolder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $SOFTPROMPT_API_KEY, else none; "
                   "visible in the process list: prefer --api-key-file or the variable)")
    p.add_argument("--api-key-file", help="read the API key from this file (its first line)")
    p.add_argument("--allow-no-api-key", action="store_true", help="serve a non-loopback --host without an API key "
                   "(refused by default)")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: from --model)")
    p.add_argument("--max-running", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences; beyond this, 429")
    p.add_argument("--max-input-tokens", type=int, default=2048)
    p.add_argument("--max-output-tokens", type=int, default=512)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--watch-interval", type=float, default=2.0, help="seconds between prompt-folder rescans (0: off)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_serve)
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
    warnings.formatwarning = lambda msg, cat, *a, **k: f"softprompt: warning: {msg}\n"
    _log_to_stderr()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
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
