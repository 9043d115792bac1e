"""One explicit training loop: AdamW on the prompt only, warmup + schedule, clipping, accumulation,
periodic validation keeping the best prompt, atomic checkpoints, exact resume, JSONL log and a loss plot.

Exact resume works because nothing in a step is random except the data order, and the order of epoch e
is a pure function of (seed, e): a checkpoint needs only the prompt, Adam's moments and a few counters.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .evaluate import prepare as prepare_eval, score
from .config import TrainConfig, from_kwargs
from .distributed import World, init_world, shard_frozen_base
from .data import Encoded, Encoder, Template, collate, epoch_batches, label_set, read_rows
from .errors import SoftPromptError
from .model import BaseModel, load_model
from .prompt import META_FILE, TENSOR_FILE, SoftPrompt, atomic_write
from .reparam import ReparamPrompt

CHECKPOINT = "checkpoint.safetensors"
LOG = "metrics.jsonl"
PLOT = "loss.png"
# Default peak learning rates, by (deep, reparameterised), measured on SST-2 (BENCHMARKS.md, Quality). Through an
# encoder, Adam moves every weight by ~lr and each output sums those moves weighted by activations that grow with
# the encoder's input: a deep prompt's row (SmolLM2-135M: 11,520 keys/values, RMS ~1.5) needs far smaller steps.
DEFAULT_LR = {(False, False): 0.1, (True, False): 0.01, (False, True): 0.01, (True, True): 1e-5}
# Changing these between a run and its resume would silently change the training: refuse instead.
RESUME_KEYS = ("data", "batch_size", "grad_accum", "seed", "virtual_tokens", "init", "deep", "reparam", "lr", "schedule", "warmup",
               "input_template", "output_template", "label_map", "lm", "chat", "system", "max_length", "steps", "epochs")


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
          on_step: Callable[[int, dict], None] | None = None, examples: list[Encoded] | None = None,
          start: SoftPrompt | None = None, piece_loss: PieceLoss | None = None, **kwargs) -> TrainResult:
    """Train a soft prompt on a frozen model and write its artifact to `output`.

    Accepts a TrainConfig, a dict, or its fields as keyword arguments: `train(data=..., output=...)`.
    `base` reuses an already loaded model; `on_step(step, metrics)` is called after every step, the metrics
    holding also "prompt": the current prompt tensor (detached; a snapshot needs a copy).
    Jobs built on this loop (distill.py) pass their own encoded `examples` (cfg.data is then only recorded),
    the `start` prompt, and the `piece_loss` (default: answer NLL, `nll_loss`).
    """
    cfg = from_kwargs(TrainConfig, config, **kwargs)
    if cfg.lr is None:
        cfg = replace(cfg, lr=DEFAULT_LR[cfg.deep, bool(cfg.reparam)])
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
    if cfg.system is not None and not (cfg.chat and not cfg.lm):
        raise SoftPromptError("system: a system message needs --chat (it goes into the chat template); "
                              "without --chat put the text in --input-template")
    template = template_from(cfg)
    train_rows = read_rows(cfg.data) if examples is None else None
    val_rows = read_rows(cfg.validation) if cfg.validation else None
    if cfg.eval_limit and val_rows:
        val_rows = val_rows[: cfg.eval_limit]

    world, device = init_world(cfg.device)
    if cfg.batch_size < world.size * cfg.grad_accum:
        raise SoftPromptError(f"batch_size {cfg.batch_size} is smaller than processes x grad_accum "
                              f"({world.size} x {cfg.grad_accum}); batch_size is the global batch")
    base = base or load_model(cfg.model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                              quantize=cfg.quantize)
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
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or max(1, total // 10)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "examples": 0, "tokens": 0, "elapsed": 0.0,
             "best_step": None, "best_metric": None, "last_loss": None}
    best = prompt().detach().clone()
    if cfg.resume:
        best = _load_checkpoint(ckpt_path, cfg, prompt, optimizer, state)
    if world.is_main:  # only process 0 writes: checkpoints, log, artifact
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / LOG, state["step"])

    def save_checkpoint():
        if world.is_main:
            _save_checkpoint(ckpt_path, cfg, prompt, optimizer, state, best)
        world.barrier()

    pad_id = base.tokenizer.pad_token_id
    bar = tqdm(total=total, initial=state["step"], desc="train", disable=not (cfg.progress and world.is_main),
               dynamic_ncols=True)
    started = time.perf_counter() - state["elapsed"]
    try:
        while state["step"] < total:
            batches = epoch_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=state["epoch"])
            for indices in batches[state["batch_in_epoch"]:]:
                if state["step"] >= total:
                    break
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], cfg, total)
                batch = [examples[i] for i in indices]
                loss, tokens = _step(base, prompt, optimizer, batch, cfg, pad_id, world, piece_loss or nll_loss)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                state["examples"] += len(batch)
                state["tokens"] += tokens
                state["last_loss"] = loss
                state["elapsed"] = time.perf_counter() - started
                record = {"step": state["step"], "epoch": state["epoch"], "loss": round(loss, 6),
                          "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1),
                          "elapsed_s": round(state["elapsed"], 2)}
                if valset and (state["step"] % eval_every == 0 or state["step"] == total):
                    with torch.no_grad():
                        current = prompt().detach()
                    metrics = score(base, current, valset)
                    record.update({f"val_{k}": v for k, v in metrics.items() if k in ("loss", "accuracy")})
                    value = metrics.get("accuracy", -metrics["loss"])
                    if state["best_metric"] is None or value > state["best_metric"]:
                        state["best_metric"], state["best_step"] = value, state["step"]
                        best = current.clone()
                if world.is_main:
                    _append_log(out / LOG, record)
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
    bar.close()
    save_checkpoint()

    with torch.no_grad():
        final = SoftPrompt(best if valset else prompt().detach(), prompt.meta)
    final.meta.update({
        "template": template.to_dict(),
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "progress")},
        "metrics": {"steps": state["step"], "examples_seen": state["examples"], "tokens_seen": state["tokens"],
                    "wall_time_s": round(state["elapsed"], 2), "final_train_loss": state["last_loss"],
                    "best_step": state["best_step"],
                    **({"best_val_" + ("accuracy" if valset.labels else "neg_loss"): state["best_metric"]} if valset else {})},
    })
    if world.is_main:
        final.save(out)
        _plot(out / LOG, out / PLOT)
    world.barrier()
    return TrainResult(final, out, final.meta["metrics"])


# A step's loss, piece by piece: (base, prompt tensor, micro-batch, whole global batch, pad id) -> scalar, the
# piece's share of the batch loss (summed over its rows, divided by a count over the whole batch).
PieceLoss = Callable[[BaseModel, torch.Tensor, list, list, int], torch.Tensor]


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
        with torch.no_grad():
            p.copy_(tensors[f"param/{name}"])
        if adam_step is not None:
            optimizer.state[p] = {"step": torch.tensor(adam_step),
                                  "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                                  "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device)}
    state.update(saved_state)
    return tensors["best"].to(next(prompt.parameters()).device)


def _append_log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (steps the interrupted run did after saving)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))


def _plot(log: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a nicety; the JSONL log has the numbers
        return
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
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
