"""One explicit training loop: AdamW on the prompt only, warmup + schedule, clipping, accumulation,
periodic validation keeping the best prompt, atomic checkpoints, exact resume, JSONL log and a loss plot.

Exact resume works because nothing in a step is random except the data order, and the order of epoch e
is a pure function of (seed, e): a checkpoint needs only the prompt, Adam's moments and a few counters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .budget import BudgetPlanner, RunLength
from .evaluate import prepare as prepare_eval, score
from .config import TrainConfig, from_kwargs
from .distributed import World, init_world, shard_frozen_base
from .data import Encoded, Encoder, Template, collate, epoch_batches, label_set, read_rows
from .errors import SoftPromptError
from .model import BaseModel, load_model
from .progress import progress_bar
from .prompt import MAX_PROMPT_ABS, META_FILE, TENSOR_FILE, SoftPrompt, atomic_write, remove_stale_temps
from .reparam import ReparamPrompt
from .trackers import Reporter

CHECKPOINT = "checkpoint.safetensors"
LOG = "metrics.jsonl"
PLOT = "loss.png"
# Default peak learning rates, by (deep, reparameterised), measured on SST-2 (BENCHMARKS.md, Quality). Through an
# encoder, Adam moves every weight by ~lr and each output sums those moves weighted by activations that grow with
# the encoder's input: a deep prompt's row (SmolLM2-135M: 11,520 keys/values, RMS ~1.5) needs far smaller steps.
DEFAULT_LR = {(False, False): 0.1, (True, False): 0.01, (False, True): 0.01, (True, True): 1e-5}
# Changing these between a run and its resume would silently change the training: refuse instead.
RESUME_KEYS = ("data", "batch_size", "grad_accum", "seed", "virtual_tokens", "init", "deep", "reparam", "lr", "schedule", "warmup",
               "input_template", "output_template", "label_map", "lm", "chat", "system", "max_length", "steps", "epochs",
               "time_budget")
log = logging.getLogger("softprompt")


@dataclass
class TrainResult:
    prompt: SoftPrompt
    output: Path
    metrics: dict[str, Any]


def template_from(cfg: TrainConfig) -> Template:
    if cfg.lm:
        return Template(input="", output=cfg.output_template or "{text}", label_map=cfg.label_map)
    return Template(input=cfg.input_template, output=cfg.output_template, label_map=cfg.label_map, chat=cfg.chat,
                    system=cfg.system)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup, then cosine / linear decay to 0, or constant. `step` counts from 0."""
    warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise SoftPromptError(f"unknown schedule {cfg.schedule!r}; choose cosine, linear or constant")


def train(config: TrainConfig | dict | None = None, /, *, base: BaseModel | None = None,
          on_step: Callable[[int, dict], None] | None = None, started_at: float | None = None,
          examples: list[Encoded] | None = None, start: SoftPrompt | None = None,
          piece_loss: PieceLoss | None = None, **kwargs) -> TrainResult:
    """Train a soft prompt on a frozen model and write its artifact to `output`.

    Accepts a TrainConfig, a dict, or its fields as keyword arguments: `train(data=..., output=...)`.
    `base` reuses an already loaded model; `on_step(step, metrics)` is called after every step, the metrics
    holding also "prompt": the current prompt tensor (detached; a snapshot needs a copy). `started_at`
    (time.perf_counter()) is when the user's wait began, for a time budget (default: this call).
    Jobs built on this loop (distill.py) pass their own encoded `examples` (cfg.data is then only recorded),
    the `start` prompt, and the `piece_loss` (default: answer NLL, `nll_loss`).
    """
    entered = time.perf_counter()  # a --time-budget counts from here: model loading is part of the user's wait
    cfg = from_kwargs(TrainConfig, config, **kwargs)
    out = Path(cfg.output)
    ckpt_path = out / CHECKPOINT
    # Check every input before touching the output folder: a failed start never clobbers a run.
    has_run = ckpt_path.exists() or (out / TENSOR_FILE).exists()
    if cfg.resume and not ckpt_path.exists():
        raise SoftPromptError(f"--resume: no checkpoint at {ckpt_path}")
    if has_run and not (cfg.resume or cfg.overwrite):
        raise SoftPromptError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise SoftPromptError("batch_size must be a positive multiple of grad_accum")
    check_numbers(cfg)
    if cfg.system is not None and (cfg.chat is False or cfg.lm):
        raise SoftPromptError("system: a system message needs --chat (it goes into the chat template); "
                              "without --chat put the text in --input-template")
    RunLength.from_config(cfg.steps, cfg.epochs, cfg.time_budget, 1)  # a bad --steps / --time-budget fails early
    reporter = Reporter(cfg.report_to)  # a missing tracker package fails here, before the model loads
    train_rows = read_rows(cfg.data) if examples is None else None
    val_rows = read_rows(cfg.validation) if cfg.validation else None
    if cfg.eval_limit and val_rows:
        val_rows = val_rows[: cfg.eval_limit]

    world, device = init_world(cfg.device)
    if cfg.batch_size < world.size * cfg.grad_accum:
        raise SoftPromptError(f"batch_size {cfg.batch_size} is smaller than processes x grad_accum "
                              f"({world.size} x {cfg.grad_accum}); batch_size is the global batch")
    base = base or load_model(cfg.model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                              quantize=cfg.quantize, purpose="train")
    cfg = replace(cfg, chat=resolve_chat(cfg, base), deep=resolve_deep(cfg, base))
    if cfg.lr is None:
        cfg = replace(cfg, lr=DEFAULT_LR[cfg.deep, bool(cfg.reparam)])
    if cfg.system is not None and not cfg.chat:
        raise SoftPromptError(f"system: a system message needs --chat, and model {base.source!r} has no chat "
                              "template to put it in; put the text in --input-template instead")
    template = template_from(cfg)
    if cfg.activation_checkpointing:
        base.enable_activation_checkpointing()
    if cfg.fsdp:
        shard_frozen_base(base.model, world)
    max_length = min(cfg.max_length, base.max_positions - cfg.virtual_tokens)
    if examples is None:
        examples = Encoder(base.tokenizer, template, max_length=max_length, score_first=not cfg.deep).encode_rows(train_rows, cfg.data)
    valset = prepare_eval(base, template, val_rows, source=cfg.validation, max_length=max_length) if val_rows else None
    if start is not None:
        init = start
    else:
        labels = valset.labels if valset else (label_set(template, train_rows) if train_rows else None)
        init = SoftPrompt.initialise(base, cfg.virtual_tokens, cfg.init, init_text=cfg.init_text, labels=labels,
                                     init_prompt=cfg.init_prompt, seed=cfg.seed, deep=cfg.deep)
    # The trainable module: forward() -> the prompt tensor; parameters() are all that trains.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the reparameterisation encoder's init is part of the run's identity
        prompt = (ReparamPrompt(init.embeddings, cfg.reparam, cfg.reparam_hidden or base.hidden_size, init.meta) if cfg.reparam else init)
    prompt = prompt.to(base.device)
    optimizer = torch.optim.AdamW(list(prompt.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lengths = [len(e.input_ids) for e in examples]
    length = RunLength.from_config(cfg.steps, cfg.epochs, cfg.time_budget, math.ceil(len(examples) / cfg.batch_size))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "examples": 0, "tokens": 0, "elapsed": 0.0,
             "best_step": None, "best_metric": None, "last_loss": None, **length.initial_state()}
    best = prompt().detach().clone()
    if cfg.resume:
        best = _load_checkpoint(ckpt_path, cfg, prompt, optimizer, state)
    planner = BudgetPlanner(length, (started_at if started_at is not None else entered) - state["elapsed"])
    dtype = base.dtype_choice.to_dict() if base.dtype_choice else {"dtype": str(base.dtype).removeprefix("torch.")}
    if world.is_main:
        log.info("run length: %s%s; %s; %s (lr %g)", length.how, "" if length.budget_s is None else
                 " (the step count is fixed after timing the first steps)", "chat template on" if cfg.chat else
                 "no chat template", "deep prompt" if cfg.deep else "input-embedding prompt", cfg.lr)
    if world.is_main:  # only process 0 writes: checkpoints, log, artifact
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        _trim_log(out / LOG, state["step"])
        reporter.open(out, asdict(cfg), state["step"])

    def save_checkpoint():
        if world.is_main:
            _save_checkpoint(ckpt_path, cfg, prompt, optimizer, state, best)
        world.barrier()

    pad_id = base.tokenizer.pad_token_id
    bar = progress_bar(total=state["total"], initial=state["step"], desc="train", disable=not (cfg.progress and world.is_main),
               dynamic_ncols=True)
    started = time.perf_counter() - state["elapsed"]
    first_record = True
    try:
        while state["step"] < state["total"]:
            batches = epoch_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=state["epoch"])
            for indices in batches[state["batch_in_epoch"]:]:
                if state["step"] >= state["total"]:
                    break
                total = state["total"]
                eval_every = cfg.eval_every or max(1, total // 10)
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], cfg, total)
                batch = [examples[i] for i in indices]
                with attention_backend(base):
                    loss, tokens = _step(base, prompt, optimizer, batch, cfg, pad_id, world, piece_loss or nll_loss)
                _check_finite(loss, prompt, state["step"] + 1, ckpt_path)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                state["examples"] += len(batch)
                state["tokens"] += tokens
                state["last_loss"] = loss
                state["elapsed"] = time.perf_counter() - started
                step_s = time.perf_counter() - t0
                record = {"step": state["step"], "epoch": state["epoch"], "loss": round(loss, 6),
                          "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(tokens / step_s, 1),
                          "elapsed_s": round(state["elapsed"], 2)}
                if first_record:  # once per (re)start: what the numbers were measured with
                    record.update(dtype=dtype["dtype"], planned_steps=total)
                    first_record = False
                eval_s = None
                if valset and (state["step"] % eval_every == 0 or state["step"] == total):
                    t_eval = time.perf_counter()
                    with torch.no_grad():
                        current = prompt().detach()
                    metrics = score(base, current, valset)
                    record.update({f"val_{k}": v for k, v in metrics.items() if k in ("loss", "accuracy")})
                    value = metrics.get("accuracy", -metrics["loss"])
                    if state["best_metric"] is None or value > state["best_metric"]:
                        state["best_metric"], state["best_step"] = value, state["step"]
                        best = current.clone()
                    eval_s = time.perf_counter() - t_eval
                planner.observe(step_s, eval_s)
                said = None
                if planner.due(state):  # the same step in every process: the collective below is safe
                    said = planner.replan(state, time.perf_counter(), eval_every if valset else None)
                    _agree_on_plan(world, state, base.device)
                if said:
                    bar.total = state["total"]
                    record["planned_steps"] = state["total"]
                    if world.is_main:
                        log.info(said)
                if world.is_main:
                    _append_log(out / LOG, record)
                    reporter.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{state['tokens'] / max(state['elapsed'], 1e-9):.0f}",
                                **({"val": f"{record['val_accuracy']:.3f}"} if "val_accuracy" in record else {}))
                if on_step:
                    with torch.no_grad():
                        on_step(state["step"], {**record, "prompt": prompt().detach()})
                if state["step"] % cfg.save_every == 0:
                    save_checkpoint()
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        save_checkpoint()
        bar.close()
        raise
    finally:
        reporter.close()
    bar.close()
    save_checkpoint()

    with torch.no_grad():
        final = SoftPrompt(best if valset else prompt().detach(), prompt.meta)
    final.meta.update({
        "template": template.to_dict(),
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "progress")},
        "precision": dtype,
        "metrics": {"steps": state["step"], "run_length": length.how, "examples_seen": state["examples"], "tokens_seen": state["tokens"],
                    "wall_time_s": round(state["elapsed"], 2), "final_train_loss": state["last_loss"],
                    "best_step": state["best_step"],
                    **({"best_val_" + ("accuracy" if valset.labels else "neg_loss"): state["best_metric"]} if valset else {})},
    })
    if world.is_main:
        final.save(out)
        _plot(out / LOG, out / PLOT)
    world.barrier()
    return TrainResult(final, out, final.meta["metrics"])


def resolve_chat(cfg: TrainConfig, base: BaseModel) -> bool:
    """--chat unset: on when the model has a chat template and rows have an input (an instruct model answers
    best in the format it was tuned on; measured in BENCHMARKS.md); never for --lm corpora."""
    if cfg.chat is not None:
        return bool(cfg.chat) and not cfg.lm
    return not cfg.lm and bool(cfg.input_template) and bool(getattr(base.tokenizer, "chat_template", None))


def resolve_deep(cfg: TrainConfig, base: BaseModel) -> bool:
    """--deep unset: a deep prompt for rows with an input (it reached 89.3 % on SST-2 where an input-embedding
    prompt reached 88.1 %, same steps, chat format; BENCHMARKS.md, Defaults), where the model can take one. Not for
    --lm corpora (an --lm prompt must also continue from an empty input, which needs virtual input tokens) nor
    with --reparam (its encoders are measured on input embeddings)."""
    if cfg.deep is not None:
        return bool(cfg.deep)
    return not cfg.lm and not cfg.reparam and bool(cfg.input_template) and base.has_plain_kv_cache


def _agree_on_plan(world: World, state: dict, device: torch.device) -> None:
    """Every process must run the same steps: process 0's plan (total, next planning step) is the plan."""
    if not world.active:
        return
    mine = [float(state["total"]), -1.0 if state["next_plan"] is None else float(state["next_plan"])]
    plan = world.all_reduce(torch.tensor(mine if world.is_main else [0.0, 0.0], device=device)).tolist()
    state["total"], state["next_plan"] = int(plan[0]), None if plan[1] < 0 else int(plan[1])


# A step's loss, piece by piece: (base, prompt tensor, micro-batch, whole global batch, pad id) -> scalar, the
# piece's share of the batch loss (summed over its rows, divided by a count over the whole batch).
PieceLoss = Callable[[BaseModel, torch.Tensor, list, list, int], torch.Tensor]


def attention_backend(base: BaseModel):
    """torch's plain-math attention for the training step where the dtype probe measured it faster than the fused
    kernel on this machine (`DtypeChoice.attention`), else torch's own choice."""
    if getattr(base.dtype_choice, "attention", None) == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def nll_loss(base: BaseModel, prompt: torch.Tensor, piece: list[Encoded], batch: list[Encoded], pad_id: int) -> torch.Tensor:
    """Mean NLL per answer token of the whole batch, this piece's part of it."""
    label_tokens = sum(sum(1 for t in e.labels if t != -100) for e in batch)
    tensors = collate(piece, pad_id)
    prompted = base.prepend_prompts(tensors["input_ids"], tensors["attention_mask"], prompt, tensors["labels"])
    nll, _ = base.sequence_nll(prompted)
    return nll.sum() / label_tokens


def _step(base: BaseModel, prompt: torch.nn.Module, optimizer, batch, cfg: TrainConfig, pad_id: int,
          world: World = World(), piece_loss: PieceLoss = nll_loss) -> tuple[float, int]:
    """One optimizer step over the global `batch`: this process's rows, in grad_accum micro-batches.
    Loss = `piece_loss` summed over pieces (default: mean NLL per answer token of the whole batch), so
    splitting the batch (accumulation, processes) changes nothing but float summation order."""
    optimizer.zero_grad(set_to_none=True)
    mine = batch[world.rank::world.size]
    micro = math.ceil(len(mine) / cfg.grad_accum)
    # Under FSDP every process must run the same number of forwards (each holds collectives), even with
    # an empty share of a short last batch: such a micro-batch runs one row with zero weight.
    pieces = [mine[s:s + micro] for s in range(0, len(mine), micro)] if mine else []
    if cfg.fsdp:
        pieces = [pieces[i] if i < len(pieces) else [] for i in range(cfg.grad_accum)]
    loss_sum = torch.zeros((), device=base.device)
    tokens = 0
    for piece in pieces:
        loss = piece_loss(base, prompt(), piece or batch[:1], batch, pad_id) * (1.0 if piece else 0.0)
        loss.backward()
        loss_sum += loss.detach()
        tokens += sum(len(e.input_ids) for e in piece)
    if world.active:
        for p in prompt.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            world.all_reduce(p.grad)
        stats = world.all_reduce(torch.stack([loss_sum.float(), torch.tensor(float(tokens), device=loss_sum.device)]))
        loss_sum, tokens = stats[0], int(stats[1].item())
    total_loss = float(loss_sum)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(prompt.parameters()), cfg.max_grad_norm)
    optimizer.step()
    return total_loss, tokens


def check_numbers(cfg: TrainConfig) -> None:
    """Numbers that would crash later (--save-every 0) or train nothing (--steps -3, --lr nan): refuse up front."""
    if cfg.steps is not None and cfg.steps < 1:
        raise SoftPromptError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.epochs is not None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise SoftPromptError(f"epochs must be a positive number, got {cfg.epochs}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr >= 0):  # 0: a run that only scores its init
        raise SoftPromptError(f"lr must be a finite number >= 0, got {cfg.lr}")
    if cfg.save_every < 1:
        raise SoftPromptError(f"save_every must be >= 1, got {cfg.save_every}")
    if cfg.eval_every < 0:
        raise SoftPromptError(f"eval_every must be >= 0 (0: ten times per run), got {cfg.eval_every}")
    for name in ("warmup", "weight_decay", "max_grad_norm"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise SoftPromptError(f"{name} must be a finite number >= 0, got {value}")


def _check_finite(loss: float, prompt: torch.nn.Module, step: int, ckpt_path: Path) -> None:
    """Stop a diverged run before it logs or saves anything non-finite: the last checkpoint stays the last good one."""
    last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
    if not math.isfinite(loss):
        raise SoftPromptError(f"step {step}: the loss is {loss} (training diverged; lower --lr); stopped, {last}")
    params = [p.detach() for p in prompt.parameters()]
    flags = torch.stack([torch.stack([p.isfinite().all(), p.abs().max() <= MAX_PROMPT_ABS]) for p in params])
    if not bool(flags.all()):
        raise SoftPromptError(f"step {step}: the prompt holds non-finite or huge values (over {MAX_PROMPT_ABS:g}) "
                              f"after the update (training diverged; lower --lr); stopped, {last}")


def _save_checkpoint(path: Path, cfg: TrainConfig, prompt, optimizer, state: dict, best: torch.Tensor):
    """Every trainable tensor of the prompt module (an encoder too) and its Adam moments, by parameter name."""
    tensors = {"best": best.cpu().contiguous()}
    for name, p in prompt.named_parameters():
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        adam = optimizer.state.get(p, {})
        if adam:
            tensors[f"exp_avg/{name}"] = adam["exp_avg"].cpu().contiguous()
            tensors[f"exp_avg_sq/{name}"] = adam["exp_avg_sq"].cpu().contiguous()
            state = {**state, "adam_step": float(adam["step"])}
    meta = {"state": json.dumps(state), "config": json.dumps({k: getattr(cfg, k) for k in RESUME_KEYS}),
            "prompt_meta": json.dumps(prompt.meta, default=str)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_checkpoint(path: Path, cfg: TrainConfig, prompt, optimizer, state: dict) -> torch.Tensor:
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        saved_state, saved_cfg = json.loads(meta["state"]), json.loads(meta["config"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise SoftPromptError(f"{path} is not a readable checkpoint ({e})") from None
    changed = [k for k in RESUME_KEYS if saved_cfg.get(k) != getattr(cfg, k)]
    if changed:
        raise SoftPromptError(f"--resume with different settings than the checkpoint: {', '.join(changed)} "
                              f"(checkpoint has {', '.join(f'{k}={saved_cfg.get(k)!r}' for k in changed)})")
    adam_step = saved_state.pop("adam_step", None)
    for name, p in prompt.named_parameters():
        if f"param/{name}" not in tensors:
            raise SoftPromptError(f"{path} has no tensor for {name!r}: it was written by another kind of run")
        wanted = {f"param/{name}": p.shape}
        if adam_step is not None:
            wanted.update({f"exp_avg/{name}": p.shape, f"exp_avg_sq/{name}": p.shape})
        for key, shape in wanted.items():
            if key not in tensors or tensors[key].shape != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise SoftPromptError(f"{path}: tensor {key!r} is {got}, this run needs {tuple(shape)} "
                                      "(a checkpoint of another model or run)")
        with torch.no_grad():
            p.copy_(tensors[f"param/{name}"])
        if adam_step is not None:
            optimizer.state[p] = {"step": torch.tensor(adam_step),
                                  "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                                  "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device)}
    state.update(saved_state)
    if "best" not in tensors or tensors["best"].shape != prompt().shape:
        raise SoftPromptError(f"{path}: tensor 'best' does not match this run's prompt {tuple(prompt().shape)}")
    return tensors["best"].to(next(prompt.parameters()).device)


def _append_log(path: Path, record: dict) -> None:
    # Non-finite numbers would make the line non-JSON (NaN): write null instead.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    line = (json.dumps(clean, allow_nan=False) + "\n").encode()
    try:
        with path.open("ab") as f:
            f.write(line)  # one write: a crash or a full disk leaves at most a torn last line, dropped on resume
    except OSError as e:
        raise SoftPromptError(f"cannot write {path}: {e.strerror or e} (checkpoints written so far are intact: "
                              "free space, then continue with --resume)") from None


def read_log(path: Path) -> list[dict]:
    """The JSONL log's records, skipping lines that do not parse (a torn last line from a crash or a full disk)."""
    records = []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise SoftPromptError(f"cannot read {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (steps the interrupted run did after saving) and torn ones."""
    if not path.exists():
        return
    keep = [r for r in read_log(path) if r["step"] <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))


def _plot(log: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a nicety; the JSONL log has the numbers
        return
    records = read_log(log) if log.exists() else []
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", alpha=0.7)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        if "val_accuracy" in val[0]:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "s--", color="tab:green", label="val accuracy")
            ax2.set_ylabel("accuracy")
            ax2.legend(loc="center right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / answer token)")
    ax.legend(loc="upper right")
    ax.set_title(f"softprompt training: {log.parent.name}")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
