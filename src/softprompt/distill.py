"""`softprompt distill`: turn a long hard prompt into a few virtual tokens (prompt compression, Wingate et al. 2022;
gist tokens, Mu et al. 2023; Cartridges, Eyuboglu et al. 2025).

teacher = the frozen model with the long prompt in front of each input: [teacher prompt | input]
student = the same frozen model with the soft prompt instead:          [virtual tokens | input]

The student is trained on the teacher's own next-token distributions over the continuations the teacher writes
greedily for the inputs: KL(teacher || student) at every continuation position, teacher-forced. Only the top-k
teacher log-probs per position are stored, plus one bucket for the rest of the vocabulary ("tail"); the KL is taken
between the two distributions coarsened to those k+1 outcomes (a lower bound of the full KL, exact as the tail
mass goes to 0). The continuations and their top-k are computed ONCE and cached in the output folder, keyed by a
hash of everything they depend on, so epochs and resumes never re-run the teacher. The loop itself is train.py's
(`train(examples=..., start=..., piece_loss=...)`): checkpoints, exact resume, schedule and log come from there.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DistillConfig, TrainConfig, from_kwargs
from .data import Encoded, Encoder, Template, collate, read_rows
from .errors import SoftPromptError
from .generate import generate_ids
from .metrics import token_f1
from .model import BaseModel, load_model
from .progress import progress_bar
from .prompt import TENSOR_FILE, SoftPrompt, atomic_write
from .train import CHECKPOINT, train

TEACHER_CACHE = "teacher.safetensors"
COMPRESS = ("sink", "last", "even", "first")
TEACHER_BATCH = 8  # rows per teacher forward / generation call


@dataclass
class Targets:
    """One split of inputs with the teacher's outputs. Per row i: student_ids[i] (what the soft prompt sees),
    teacher_ids[i] (the long prompt + the input), continuation[i] (the teacher's greedy tokens, + EOS where it
    stopped), and for each continuation position j the teacher's top-k token ids / log-probs [m_i, k] and the
    log of the remaining mass [m_i]."""

    student_ids: list[list[int]]
    teacher_ids: list[list[int]]
    continuation: list[list[int]] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_logprobs: list[torch.Tensor] = field(default_factory=list)
    tail_logprob: list[torch.Tensor] = field(default_factory=list)
    gold_ids: list[list[int] | None] = field(default_factory=list)

    def generated(self, i: int, eos: int | None) -> list[int]:
        """The teacher's continuation as generation returns it (EOS cut off)."""
        cont = self.continuation[i]
        return cont[:-1] if cont and cont[-1] == eos else cont


@dataclass
class DistillExample(Encoded):
    """A training row for train()'s loop: input_ids = student input + teacher continuation, labelled on the
    continuation (so the loop's token counts are continuation tokens), plus the teacher's targets there."""

    top_ids: torch.Tensor | None = None  # [m, k]
    top_logprobs: torch.Tensor | None = None  # [m, k]
    tail_logprob: torch.Tensor | None = None  # [m]
    gold: Encoded | None = None  # student input + gold answer, labelled on the answer


@dataclass
class DistillResult:
    prompt: SoftPrompt
    output: Path
    metrics: dict[str, Any]
    splits: dict[str, Targets] = field(default_factory=dict, repr=False)  # "train", "heldout": inputs + teacher targets


# ---- the teacher ----------------------------------------------------------------------------------


def read_teacher(teacher: str) -> str:
    """--teacher is a file (if it names one) or the prompt text itself."""
    if not teacher or not teacher.strip():
        raise SoftPromptError("teacher: the teacher prompt is empty")
    one_line = "\n" not in teacher and len(teacher) < 4096
    looks_like_path = one_line and " " not in teacher.strip() and (
        Path(teacher).suffix.lower() in (".txt", ".md", ".prompt") or teacher.startswith(("/", "./", "../", "~")))
    path = Path(teacher).expanduser()
    try:
        is_file = one_line and path.is_file()
    except OSError:  # e.g. a one-line prompt longer than a file name may be
        is_file = False
    if looks_like_path or is_file:
        if not path.is_file():
            raise SoftPromptError(f"teacher file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SoftPromptError(f"{path}: teacher file is not UTF-8 text ({e})") from None
        if not text.strip():
            raise SoftPromptError(f"{path}: the teacher file is empty")
        return text.strip()
    return teacher


def teacher_prefix_ids(base: BaseModel, cfg: DistillConfig, teacher: str) -> list[int]:
    """The tokens the long prompt puts before the input: the text + separator, or with --chat its system turn."""
    tok = base.tokenizer
    if cfg.chat:
        try:
            rendered = tok.apply_chat_template([{"role": "system", "content": teacher}], tokenize=False)
        except Exception:  # templates that insist on a user turn (jinja raises its own errors): the bare text
            return tok(teacher, add_special_tokens=False)["input_ids"]
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return tok(teacher + cfg.separator)["input_ids"]


def encode_split(base: BaseModel, cfg: DistillConfig, teacher: str, rows: list[dict], source: str) -> Targets:
    """Student and teacher token ids of each row (and its gold answer, if it has one). Without --chat the teacher
    row is exactly prefix + student row, so a deep prompt holding the prefix's keys/values IS the teacher."""
    student_tmpl = Template(input=cfg.input_template, output=cfg.output_template, chat=cfg.chat)
    teacher_tmpl = replace(student_tmpl, system=teacher) if cfg.chat else student_tmpl
    student_enc, teacher_enc = Encoder(base.tokenizer, student_tmpl), Encoder(base.tokenizer, teacher_tmpl)
    prefix = [] if cfg.chat else teacher_prefix_ids(base, cfg, teacher)
    limit = min(cfg.max_length, base.max_positions)
    out = Targets([], [])
    for i, row in enumerate(rows, 1):
        where = f"{source}: row {i}"
        text = student_tmpl.render_input(row, where)
        if not text.strip():
            raise SoftPromptError(f"{where}: the input is empty")
        student = student_enc.input_ids(text)
        full = teacher_enc.input_ids(text) if cfg.chat else prefix + student
        if len(full) + cfg.max_new_tokens > limit:
            raise SoftPromptError(f"{where}: teacher prompt + input + {cfg.max_new_tokens} new tokens is "
                                  f"{len(full) + cfg.max_new_tokens} tokens, over max_length {limit}")
        out.student_ids.append(student)
        out.teacher_ids.append(full)
        gold = None
        names = student_tmpl.fields("output")
        if names and all(row.get(n) not in (None, "") for n in names):
            gold = student_enc.output_ids(student_tmpl.render_output(row, where))
        out.gold_ids.append(gold)
    return out


@torch.no_grad()
def teacher_targets(base: BaseModel, split: Targets, *, max_new_tokens: int, top_k: int, progress: bool = False,
                    desc: str = "teacher") -> None:
    """Fill `split` with the teacher's greedy continuations and its top-k log-probs along them."""
    eos = base.tokenizer.eos_token_id
    n = len(split.teacher_ids)
    bar = progress_bar(total=2 * n, desc=desc, disable=not progress, dynamic_ncols=True)
    conts: list[list[int]] = []
    for s in range(0, n, TEACHER_BATCH):
        new = generate_ids(base, split.teacher_ids[s:s + TEACHER_BATCH], None, max_new_tokens=max_new_tokens)
        # Stopped before the budget = it chose EOS: the student must learn to stop there too.
        conts += [c + [eos] if len(c) < max_new_tokens and eos is not None else c for c in new]
        bar.update(len(new))
    split.continuation = [c if c else [eos] for c in conts]
    for s in range(0, n, TEACHER_BATCH):
        rows = [labelled(t, c) for t, c in zip(split.teacher_ids[s:s + TEACHER_BATCH], split.continuation[s:s + TEACHER_BATCH])]
        logits, row_of = logits_on(base, rows, None)  # [N, V]
        ids, lp, tail = top_k_targets(logits, top_k)
        for r in range(len(rows)):
            pick = row_of == r
            split.top_ids.append(ids[pick].cpu())
            split.top_logprobs.append(lp[pick].cpu())
            split.tail_logprob.append(tail[pick].cpu())
        bar.update(len(rows))
    bar.close()


def labelled(input_ids: list[int], answer: list[int]) -> Encoded:
    return Encoded(input_ids + answer, [-100] * len(input_ids) + answer, len(input_ids))


def logits_on(base: BaseModel, rows: list[Encoded], prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [N, V] at every position predicting a labelled token, and each one's row [N]."""
    t = collate(rows, base.tokenizer.pad_token_id)
    return base.logits_at_labels(base.prepend_prompts(t["input_ids"], t["attention_mask"], prompt, t["labels"]))


def top_k_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V] logits -> top-k ids [N, k] (int64), their log-probs [N, k] and the log of the rest's mass [N]."""
    logp = torch.log_softmax(logits.float(), -1)
    lp, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, lp, tail_logprob(logits, ids)


def tail_logprob(logits: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log P(token not in top_ids) [N], as a difference of log-sum-exps (no 1 - sum cancellation)."""
    rest = logits.float().scatter(-1, top_ids, float("-inf"))
    return torch.logsumexp(rest, -1) - torch.logsumexp(logits.float(), -1)


def coarse_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor, tail_lp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) [N] over the teacher's top-k tokens + one tail bucket (fp32)."""
    logp = torch.log_softmax(student_logits.float(), -1)
    s_top = logp.gather(-1, top_ids)  # [N, k]
    s_tail = tail_logprob(student_logits, top_ids)  # [N]
    top = (top_lp.exp() * (top_lp - s_top)).sum(-1)
    q_tail = tail_lp.exp()
    tail = torch.where(q_tail > 0, q_tail * (tail_lp - s_tail), torch.zeros_like(q_tail))  # 0 * log 0 = 0
    return top + tail


# ---- the cache --------------------------------------------------------------------------------------


def cache_key(base: BaseModel, cfg: DistillConfig, teacher: str, splits: dict[str, Targets]) -> str:
    """Everything the teacher's outputs depend on: its text, every row's token ids (data, templates, chat,
    tokenizer), the model (fingerprint + dtype) and the generation settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": teacher, "model": base.fingerprint(), "dtype": str(base.dtype),
                         "max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k}, sort_keys=True).encode())
    for name in sorted(splits):
        h.update(json.dumps([name, splits[name].teacher_ids]).encode())
    return h.hexdigest()[:32]


def save_cache(path: Path, key: str, splits: dict[str, Targets]) -> None:
    tensors = {}
    for name, sp in splits.items():
        tensors[f"{name}/continuation"] = torch.tensor([t for c in sp.continuation for t in c], dtype=torch.long)
        tensors[f"{name}/lengths"] = torch.tensor([len(c) for c in sp.continuation], dtype=torch.long)
        tensors[f"{name}/top_ids"] = torch.cat(sp.top_ids).contiguous()
        tensors[f"{name}/top_logprobs"] = torch.cat(sp.top_logprobs).float().contiguous()
        tensors[f"{name}/tail_logprob"] = torch.cat(sp.tail_logprob).float().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": key, "splits": ",".join(splits)}))


def load_cache(path: Path, key: str, splits: dict[str, Targets]) -> bool:
    """Fill `splits` from the cache if it holds exactly these teacher outputs; False if it does not."""
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return False
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SoftPromptError(f"{path} is not a readable teacher cache ({e}); delete it to rebuild") from None
    for name, sp in splits.items():
        lengths = tensors[f"{name}/lengths"].tolist()
        flat = tensors[f"{name}/continuation"].tolist()
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        sp.continuation = [flat[s:s + n] for s, n in zip(starts, lengths)]
        for attr in ("top_ids", "top_logprobs", "tail_logprob"):
            setattr(sp, attr, list(torch.split(tensors[f"{name}/{attr}"], lengths)))
    return True


# ---- the student ------------------------------------------------------------------------------------


def keep_positions(n_teacher: int, n_virtual: int, how: str) -> list[int]:
    """Which of the teacher prompt's positions seed the virtual tokens when there are fewer of them."""
    if how not in COMPRESS:
        raise SoftPromptError(f"unknown compress {how!r}; choose {', '.join(COMPRESS)}")
    if n_virtual >= n_teacher:
        return list(range(n_teacher))
    if how == "first":
        return list(range(n_virtual))
    if how == "last":
        return list(range(n_teacher - n_virtual, n_teacher))
    if how == "sink":  # the first position (where attention parks: the "attention sink") + the most recent ones
        return [0] + list(range(n_teacher - n_virtual + 1, n_teacher))
    return torch.linspace(0, n_teacher - 1, n_virtual).round().long().tolist()


def initial_prompt(base: BaseModel, cfg: DistillConfig, prefix_ids: list[int]) -> SoftPrompt:
    """--init teacher: the teacher prompt's own token embeddings (shallow), or the keys/values it leaves at every
    layer (--deep: computed with the whole prompt as context, then `compress`ed to the virtual tokens: the last,
    evenly spaced or first positions). With as many virtual tokens as teacher tokens the deep student starts as
    the teacher, exactly (without --chat); with `last` it is the teacher with its first keys/values evicted."""
    if cfg.init != "teacher":
        return SoftPrompt.initialise(base, cfg.virtual_tokens, cfg.init, init_text=cfg.init_text, seed=cfg.seed,
                                     deep=cfg.deep)
    if cfg.virtual_tokens < 1:
        raise SoftPromptError(f"virtual_tokens must be >= 1, got {cfg.virtual_tokens}")
    keep = keep_positions(len(prefix_ids), cfg.virtual_tokens, cfg.compress)
    with torch.no_grad():
        embeds = base.embedding_matrix()[torch.tensor(prefix_ids, device=base.device)]  # [P, d]
        if cfg.deep:
            # Computed with the whole prompt as context, at positions shifted so that the prompt ends at n - 1,
            # right before the input, as in the teacher: the input then sees the kept keys at the teacher's
            # distances (rotary models) instead of keys rotated for positions past its own.
            try:
                tensor = base.prompt_kv(embeds, first_position=len(keep) - len(prefix_ids))[keep]  # [n, 2L, kv]
            except (IndexError, RuntimeError):  # learned absolute positions: no negative ones; keep 0..P-1
                tensor = base.prompt_kv(embeds)[keep]
        else:
            tensor = embeds[keep]  # [n, d]
    meta: dict[str, Any] = {"init": {"strategy": "teacher", "compress": cfg.compress, "teacher_tokens": len(prefix_ids),
                                     "positions": keep, "seed": cfg.seed}, "base": base.fingerprint()}
    if cfg.deep:
        layers, heads, head_dim = base.kv_layout
        meta["kv_layout"] = {"layers": layers, "kv_heads": heads, "head_dim": head_dim}
    return SoftPrompt(tensor.float().cpu(), meta)


def examples_of(split: Targets, gold_weight: float) -> list[DistillExample]:
    out = []
    for i, (student, cont) in enumerate(zip(split.student_ids, split.continuation)):
        row = labelled(student, cont)
        gold = split.gold_ids[i] if gold_weight > 0 else None
        out.append(DistillExample(row.input_ids, row.labels, row.n_input, split.top_ids[i], split.top_logprobs[i],
                                  split.tail_logprob[i], labelled(student, gold) if gold else None))
    return out


def distill_loss(gold_weight: float):
    """train()'s piece loss: KL summed over the piece / continuation tokens of the whole batch, plus gold_weight x
    gold NLL summed over the piece / gold tokens of the whole batch."""

    def piece_loss(base: BaseModel, prompt: torch.Tensor, piece: list[DistillExample], batch: list[DistillExample],
                   pad_id: int) -> torch.Tensor:
        logits, _ = logits_on(base, piece, prompt)  # [N, V], rows in piece order, positions in sequence order
        device = logits.device
        kl = coarse_kl(logits, torch.cat([e.top_ids for e in piece]).to(device),
                       torch.cat([e.top_logprobs for e in piece]).to(device),
                       torch.cat([e.tail_logprob for e in piece]).to(device))
        loss = kl.sum() / sum(len(e.top_ids) for e in batch)
        golds = [e.gold for e in piece if e.gold is not None]
        if gold_weight > 0 and golds:
            t = collate(golds, pad_id)
            nll, _ = base.sequence_nll(base.prepend_prompts(t["input_ids"], t["attention_mask"], prompt, t["labels"]))
            gold_tokens = sum(sum(1 for x in e.gold.labels if x != -100) for e in batch if e.gold is not None)
            loss = loss + gold_weight * nll.sum() / gold_tokens
        return loss

    return piece_loss


# ---- the report -------------------------------------------------------------------------------------


@torch.no_grad()
def measure(base: BaseModel, prompt: torch.Tensor | None, split: Targets, max_new_tokens: int,
            batch_size: int = TEACHER_BATCH) -> dict[str, float]:
    """How close [prompt | input] comes to the teacher on `split`: greedy continuations (exact-match rate, token-F1,
    ROUGE-L against the teacher's), and along the teacher's continuations (teacher-forced) the mean per-token top-k
    KL and `token_agreement`, how often the student's next-token argmax is the teacher's token."""
    eos = base.tokenizer.eos_token_id
    n = len(split.student_ids)
    generated: list[list[int]] = []
    kl_sum, kl_tokens, top1 = 0.0, 0, 0
    for s in range(0, n, batch_size):
        generated += generate_ids(base, split.student_ids[s:s + batch_size], prompt, max_new_tokens=max_new_tokens)
        rows = [labelled(a, c) for a, c in zip(split.student_ids[s:s + batch_size], split.continuation[s:s + batch_size])]
        logits, _ = logits_on(base, rows, prompt)
        kl = coarse_kl(logits, *(torch.cat(getattr(split, a)[s:s + batch_size]).to(logits.device)
                                 for a in ("top_ids", "top_logprobs", "tail_logprob")))
        kl_sum, kl_tokens = kl_sum + float(kl.sum()), kl_tokens + kl.numel()
        targets = torch.tensor([t for c in split.continuation[s:s + batch_size] for t in c], device=logits.device)
        top1 += int((logits.argmax(-1) == targets).sum())
    teacher = [split.generated(i, eos) for i in range(n)]
    decode = lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    preds, refs = [decode(g) for g in generated], [decode(t) for t in teacher]
    out = {"agreement": sum(g == t for g, t in zip(generated, teacher)) / n,
           "token_f1": sum(token_f1(p, [r]) for p, r in zip(preds, refs)) / n,
           "kl": kl_sum / max(kl_tokens, 1), "token_agreement": top1 / max(kl_tokens, 1)}
    try:
        from .metrics import generation_metrics

        out["rougeL"] = generation_metrics(preds, [[r] for r in refs])["rougeL"]
    except SoftPromptError:  # rouge-score not installed: the other numbers still stand
        pass
    return out


@torch.no_grad()
def prefill_times(base: BaseModel, prompt: torch.Tensor, split: Targets, repeats: int = 3, rows: int = TEACHER_BATCH) -> dict[str, float]:
    """Median wall time of one prefill forward (the cache a server builds before the first token) of the same
    inputs with the long hard prompt vs the soft prompt."""

    def timed(ids_rows, p) -> float:
        width = max(map(len, ids_rows))
        ids = torch.tensor([[base.tokenizer.pad_token_id] * (width - len(r)) + r for r in ids_rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids_rows])
        times = []
        for _ in range(repeats + 1):  # the first is warm-up
            t0 = time.perf_counter()
            base.forward(base.prepend_prompts(ids, mask, p), use_cache=True)
            if base.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    teacher = timed(split.teacher_ids[:rows], None)
    student = timed(split.student_ids[:rows], prompt)
    return {"prefill_teacher_ms": round(teacher * 1e3, 2), "prefill_student_ms": round(student * 1e3, 2),
            "prefill_speedup": round(teacher / student, 2), "prefill_rows": min(rows, len(split.student_ids))}


def report(base: BaseModel, prompt: torch.Tensor, split: Targets, cfg: DistillConfig) -> dict[str, float]:
    tuned = measure(base, prompt, split, cfg.max_new_tokens)
    untuned = measure(base, None, split, cfg.max_new_tokens)
    out = {"teacher_agreement": tuned["agreement"], "teacher_token_f1": tuned["token_f1"], "kl": tuned["kl"],
           "teacher_token_agreement": tuned["token_agreement"], "baseline_token_agreement": untuned["token_agreement"]}
    out.update({f"teacher_{k}": v for k, v in tuned.items() if k == "rougeL"})
    out.update({"baseline_agreement": untuned["agreement"], "baseline_token_f1": untuned["token_f1"], "baseline_kl": untuned["kl"]})
    out.update({f"baseline_{k}": v for k, v in untuned.items() if k == "rougeL"})
    out.update(prefill_times(base, prompt, split))
    return out


# ---- the job --------------------------------------------------------------------------------------


def distill(config: DistillConfig | dict | None = None, /, *, base: BaseModel | None = None, on_step=None,
            **kwargs) -> DistillResult:
    """Distil a long prompt into a soft prompt; write an ordinary artifact (plus the teacher cache) to `output`.

    Accepts a DistillConfig, a dict, or its fields as keyword arguments: `distill(teacher=..., data=..., output=...)`.
    """
    cfg = from_kwargs(DistillConfig, config, **kwargs)
    teacher = read_teacher(cfg.teacher)
    out = Path(cfg.output)
    has_run = (out / CHECKPOINT).exists() or (out / TENSOR_FILE).exists()
    if cfg.resume and not (out / CHECKPOINT).exists():
        raise SoftPromptError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    if has_run and not (cfg.resume or cfg.overwrite):
        raise SoftPromptError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if cfg.top_k < 1 or cfg.max_new_tokens < 1:
        raise SoftPromptError("top_k and max_new_tokens must be >= 1")
    if cfg.gold_weight < 0:
        raise SoftPromptError("gold_weight must be >= 0")
    if not 0 <= cfg.holdout < 1:
        raise SoftPromptError(f"holdout must be in [0, 1), got {cfg.holdout}")
    rows = read_rows(cfg.data)
    if cfg.validation:
        held = read_rows(cfg.validation)
    elif cfg.holdout > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_held = min(max(1, round(cfg.holdout * len(rows))), len(rows) - 1)
        held, rows = [rows[i] for i in sorted(order[:n_held])], [rows[i] for i in sorted(order[n_held:])]
    else:
        held = []

    base = base or load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                              purpose="train")
    prefix = teacher_prefix_ids(base, cfg, teacher)
    splits = {"train": encode_split(base, cfg, teacher, rows, cfg.data)}
    if held:
        splits["heldout"] = encode_split(base, cfg, teacher, held, cfg.validation or f"{cfg.data} (held out)")
    if cfg.gold_weight > 0 and not any(splits["train"].gold_ids):
        raise SoftPromptError(f"gold_weight {cfg.gold_weight}: no row of {cfg.data} has a gold output "
                              f"(fields {', '.join(Template(input=cfg.input_template, output=cfg.output_template, chat=cfg.chat).fields('output'))})")
    key = cache_key(base, cfg, teacher, splits)
    cache_path = out / TEACHER_CACHE
    reused = load_cache(cache_path, key, splits)
    if not reused:
        if cfg.resume and cache_path.exists():
            raise SoftPromptError(f"--resume: the teacher, data or settings differ from the run in {out} (its teacher "
                                  "cache has another key); start over with --overwrite")
        for name, split in splits.items():
            teacher_targets(base, split, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, progress=cfg.progress,
                            desc=f"teacher ({name})")
        out.mkdir(parents=True, exist_ok=True)
        save_cache(cache_path, key, splits)

    start = initial_prompt(base, cfg, prefix)
    train_cfg = TrainConfig(
        data=cfg.data, output=cfg.output, model=cfg.model, input_template=cfg.input_template,
        output_template=cfg.output_template, chat=cfg.chat, virtual_tokens=start.n_virtual_tokens, init=cfg.init,
        init_text=cfg.init_text, deep=cfg.deep, steps=cfg.steps, epochs=cfg.epochs, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length, save_every=cfg.save_every, seed=cfg.seed,
        dtype=cfg.dtype, device=cfg.device, resume=cfg.resume, overwrite=cfg.overwrite, progress=cfg.progress)
    result = train(train_cfg, base=base, on_step=on_step, examples=examples_of(splits["train"], cfg.gold_weight),
                   start=start, piece_loss=distill_loss(cfg.gold_weight))

    prompt = result.prompt
    metrics = dict(result.metrics)
    metrics.update({"teacher_tokens": len(prefix), "virtual_tokens": prompt.n_virtual_tokens,
                    "compression": round(len(prefix) / prompt.n_virtual_tokens, 2),
                    "kl_kind": f"top-{cfg.top_k} + tail bucket", "teacher_cache": "reused" if reused else "built",
                    "train_inputs": len(splits["train"].student_ids)})
    if "heldout" in splits:
        metrics["heldout_inputs"] = len(splits["heldout"].student_ids)
        with torch.no_grad():
            metrics.update(report(base, prompt.embeddings.to(base.device), splits["heldout"], cfg))
    prompt.meta["training"] = {**{f.name: getattr(cfg, f.name) for f in fields(cfg)
                                  if f.name not in ("resume", "overwrite", "progress")},
                               "job": "distill", "lr": result.prompt.meta.get("training", {}).get("lr"),
                               "teacher_cache_key": key}
    prompt.meta["metrics"] = metrics
    prompt.save(out)
    return DistillResult(prompt, out, metrics, splits)


def format_report(metrics: dict[str, Any]) -> str:
    """The held-out comparison as a small table (the CLI prints it)."""
    lines = [f"teacher prompt {metrics['teacher_tokens']} tokens -> {metrics['virtual_tokens']} virtual tokens "
             f"({metrics['compression']}x); {metrics['train_inputs']} training inputs, teacher cache {metrics['teacher_cache']}"]
    if "teacher_agreement" not in metrics:
        return lines[0] + "\n(no held-out inputs: pass --validation or --holdout > 0 for the report)"
    lines += [f"held out: {metrics['heldout_inputs']} inputs; KL is per token, {metrics['kl_kind']}",
              "agreement: greedy continuation == the teacher's; next-token: argmax == the teacher's token, teacher-forced",
              f"{'system':<20}{'agreement':>10}{'token_f1':>10}{'rougeL':>8}{'next-token':>11}{'kl':>9}",
              f"{'student (soft)':<20}{metrics['teacher_agreement']:>10.3f}{metrics['teacher_token_f1']:>10.3f}"
              f"{metrics.get('teacher_rougeL', float('nan')):>8.3f}{metrics['teacher_token_agreement']:>11.3f}{metrics['kl']:>9.4f}",
              f"{'untuned, no prompt':<20}{metrics['baseline_agreement']:>10.3f}{metrics['baseline_token_f1']:>10.3f}"
              f"{metrics.get('baseline_rougeL', float('nan')):>8.3f}{metrics['baseline_token_agreement']:>11.3f}{metrics['baseline_kl']:>9.4f}",
              f"prefill of {metrics['prefill_rows']} inputs: {metrics['prefill_teacher_ms']} ms with the long prompt, "
              f"{metrics['prefill_student_ms']} ms with the soft prompt ({metrics['prefill_speedup']}x)"]
    return "\n".join(lines)
