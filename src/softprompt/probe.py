"""Make a soft prompt understandable: nearest vocabulary tokens, norms, drift from its initialisation, and
similarity to another prompt. `inspect` bundles them into one JSON-able dict; `format_report` and `write_png`
render it. The CLI (`softprompt inspect`) is a thin layer over these functions.

Every similarity is a cosine similarity in the frozen model's input-embedding space. "The vocabulary" is the
embedding rows of real tokens (ids below len(tokenizer)); rows a model pads its table with are left out.

A deep prompt ([n, 2 x layers, kv_dim]: keys and values at every layer) has no input embeddings to hold against
the vocabulary: its report has no nearest tokens; its norms are those of each virtual token's keys/values next to
the keys/values real text leaves (a seeded sample of the vocabulary run as one sequence), overall and per layer;
drift and comparisons use each virtual token's whole key/value row.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .config import InspectConfig, from_call
from .errors import SoftPromptError
from .prompt import INIT_STRATEGIES, SoftPrompt, as_prompt

if TYPE_CHECKING:
    from .model import BaseModel

CHUNK_ROWS = 32768  # vocabulary rows converted to fp32 at a time (a 150k x 4096 table never doubles in memory)
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
REPORT_KEYS = ("prompt", "name", "model", "n_virtual_tokens", "dim", "k", "nearest", "norms", "drift", "compare")


# ---- nearest tokens ---------------------------------------------------------------------------------

def show_token(text: str) -> str:
    """A token string with whitespace made visible: space ␣, newline ↵, tab ⇥, CR ␍; other controls escaped."""
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out) or "∅"


def _token_text(tokenizer, token_id: int) -> tuple[str, str]:
    """(decoded text, display form). A piece that is part of a multi-byte character decodes to U+FFFD: show
    the vocabulary piece itself (e.g. `<0xE2>` or byte-level `âĢ`) instead."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" in text or not text:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece:
            return text, show_token(str(piece))
    return text, show_token(text)


def _vocab_rows(base: BaseModel) -> int:
    """How many embedding rows are real tokens (models often pad the table to a multiple of 64/128)."""
    try:
        n = len(base.tokenizer)
    except TypeError:
        n = base.vocab_size
    return max(1, min(base.vocab_size, n))


def _prompt_tensor(prompt: SoftPrompt | torch.Tensor) -> torch.Tensor:
    t = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    if t.dim() != 2:
        raise SoftPromptError(f"a soft prompt is a 2-D tensor [n_virtual, d_model], got shape {tuple(t.shape)}")
    return t.detach().float()


def _rows(prompt: SoftPrompt | torch.Tensor) -> torch.Tensor:
    """Each virtual token as one fp32 vector: [n, d] for input embeddings, [n, 2 x layers x kv_dim] for a deep prompt."""
    t = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt
    return t.detach().float().reshape(t.shape[0], -1)


def deep_norm_report(base: BaseModel, prompt: SoftPrompt | torch.Tensor, n_reference: int = 256,
                     seed: int = 0) -> dict[str, Any]:
    """A deep prompt's key/value norms next to those real text leaves: `n_reference` vocabulary tokens (a seeded
    draw) run as one sequence through the model, their keys/values taken at every layer.

    Returns {"kind": "keys/values", "vocab": stats of the reference rows' L2 norms, "prompt_mean", "per_token":
    [{"index", "norm", "ratio_to_median", "vocab_percentile"}], "per_layer": [{"layer", "keys_rms", "values_rms",
    "reference_keys_rms", "reference_values_rms"}], "per_token_layer_rms": [n][layers] (keys and values together)}.
    """
    t = (prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt).detach().float().cpu()  # [n, 2L, kv]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_rows(base), (n_reference,), generator=gen)
    with torch.no_grad():
        ref = base.prompt_kv(base.embedding_matrix()[ids.to(base.device)]).float().cpu()  # [N, 2L, kv]
    layers = t.shape[1] // 2

    def rms(x: torch.Tensor) -> torch.Tensor:  # [rows, 2L, kv] -> [rows, L, 2] (keys, values per layer)
        return x.reshape(x.shape[0], layers, 2, -1).pow(2).mean(-1).sqrt()

    norms = t.reshape(t.shape[0], -1).norm(dim=1)
    stats, per_token = _against(norms, ref.reshape(ref.shape[0], -1).norm(dim=1))
    mine, theirs = rms(t).mean(0), rms(ref).mean(0)  # [L, 2]
    per_layer = [{"layer": i, "keys_rms": round(mine[i, 0].item(), 6), "values_rms": round(mine[i, 1].item(), 6),
                  "reference_keys_rms": round(theirs[i, 0].item(), 6),
                  "reference_values_rms": round(theirs[i, 1].item(), 6)} for i in range(layers)]
    by_layer = t.reshape(t.shape[0], layers, -1).pow(2).mean(-1).sqrt()  # [n, L]
    return {"kind": "keys/values", "vocab": stats, "prompt_mean": round(norms.mean().item(), 6), "per_token": per_token,
            "per_layer": per_layer, "per_token_layer_rms": [[round(x, 6) for x in row] for row in by_layer.tolist()]}


def _check_width(base: BaseModel, emb: torch.Tensor) -> None:
    if emb.shape[1] != base.hidden_size:
        raise SoftPromptError(f"prompt width {emb.shape[1]} does not match model {base.source!r} "
                              f"hidden size {base.hidden_size}")


def _scan_vocab(
    base: BaseModel, emb: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over the vocabulary in fp32 chunks: (row norms [V], top-k cosine [n, k], top-k ids [n, k])."""
    table = base.embedding_matrix().detach()
    rows = _vocab_rows(base)
    device = table.device
    unit = F.normalize(emb.to(device), dim=1) if emb is not None else None
    norms, best_val, best_idx = [], None, None
    with torch.no_grad():
        for start in range(0, rows, CHUNK_ROWS):
            chunk = table[start:min(rows, start + CHUNK_ROWS)].float()  # [c, d]
            chunk_norms = chunk.norm(dim=1)
            norms.append(chunk_norms.cpu())
            if unit is None:
                continue
            sims = (unit @ chunk.T) / chunk_norms.clamp_min(1e-12)  # [n, c]
            val, idx = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx + start
            if best_val is not None:
                val, pos = torch.cat([best_val, val], 1).topk(min(k, best_val.shape[1] + val.shape[1]), dim=1)
                idx = torch.cat([best_idx, idx], 1).gather(1, pos)
            best_val, best_idx = val, idx
    if best_val is None:
        return torch.cat(norms), None, None
    return torch.cat(norms), best_val.cpu(), best_idx.cpu()


def nearest_tokens(base: BaseModel, prompt: SoftPrompt | torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
    """For each virtual token, the `k` vocabulary tokens whose input embeddings have the highest cosine similarity.

    Returns one entry per virtual token: {"index": i, "tokens": [{"id", "token" (decoded), "display"
    (whitespace visible), "similarity"}, ...]}, most similar first.
    """
    if k < 1:
        raise SoftPromptError(f"k must be >= 1, got {k}")
    emb = _prompt_tensor(prompt)
    _check_width(base, emb)
    _, vals, ids = _scan_vocab(base, emb, k)
    out = []
    for i in range(emb.shape[0]):
        tokens = []
        for v, t in zip(vals[i].tolist(), ids[i].tolist()):
            text, display = _token_text(base.tokenizer, t)
            tokens.append({"id": t, "token": text, "display": display, "similarity": round(v, 6)})
        out.append({"index": i, "tokens": tokens})
    return out


# ---- norms ------------------------------------------------------------------------------------------

def vocab_norm_stats(base: BaseModel) -> dict[str, float]:
    """Summary of the L2 norms of the vocabulary's input-embedding rows."""
    norms, _, _ = _scan_vocab(base, None, 1)
    return _stats(norms)


def _stats(norms: torch.Tensor) -> dict[str, Any]:
    q = torch.quantile(norms.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    std = norms.std().item() if norms.numel() > 1 else 0.0
    stats = {"count": int(norms.numel()), "mean": norms.mean().item(), "std": std, "min": norms.min().item(),
             "p5": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p95": q[4], "max": norms.max().item()}
    return {key: value if key == "count" else round(value, 6) for key, value in stats.items()}


def _against(norms: torch.Tensor, reference: torch.Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reference norms' summary, and each virtual token's norm [n] placed in it."""
    stats, ordered = _stats(reference), reference.sort().values
    per_token = []
    for i, n in enumerate(norms.tolist()):
        below = int(torch.searchsorted(ordered, torch.tensor(n, dtype=ordered.dtype)).item())
        per_token.append({"index": i, "norm": round(n, 6),
                          "ratio_to_median": round(n / stats["median"], 6) if stats["median"] > 0 else None,
                          "vocab_percentile": round(100.0 * below / len(ordered), 3)})
    return stats, per_token


def norm_report(base: BaseModel, prompt: SoftPrompt | torch.Tensor) -> dict[str, Any]:
    """L2 norm of each virtual token next to the vocabulary's norm distribution.

    Returns {"vocab": {count, mean, std, min, p5, p25, median, p75, p95, max}, "prompt_mean": float,
    "per_token": [{"index", "norm", "ratio_to_median" (norm / vocab median), "vocab_percentile" (% of vocabulary
    rows with a smaller norm)}]}. Trained prompts often drift far above the vocabulary's norms.
    """
    emb = _prompt_tensor(prompt)
    _check_width(base, emb)
    vocab, _, _ = _scan_vocab(base, None, 1)
    norms = emb.norm(dim=1)
    stats, per_token = _against(norms, vocab)
    return {"kind": "input embeddings", "vocab": stats, "prompt_mean": round(norms.mean().item(), 6),
            "per_token": per_token}


# ---- prompt vs prompt -------------------------------------------------------------------------------

def compare(a: SoftPrompt | torch.Tensor, b: SoftPrompt | torch.Tensor) -> dict[str, Any]:
    """How similar two prompts (for the same model) are.

    - "cosine_matrix": cosine of every virtual token of `a` [n_a] with every one of `b` [n_b].
    - "per_token_cosine" / "mean_per_token_cosine": cosine of token i with token i (same-length prompts only,
      else None): position-aligned similarity, what matters when both were trained from the same init.
    - "mean_vector_cosine": cosine of the two prompts' mean vectors; length-independent but coarse (the mean
      of any set of embeddings shares the table's common direction, so unrelated prompts can score high).
    - "matching": an optimal one-to-one matching of tokens (Hungarian algorithm on the cosine matrix,
      maximising the total): {"pairs": [[i, j, cosine], ...] (min(n_a, n_b) pairs), "mean_cosine"}.
      Length- and order-independent: two prompts with the same vectors in any order score 1.
    """
    ea, eb = _rows(a), _rows(b)
    if ea.shape[1] != eb.shape[1]:
        raise SoftPromptError(f"cannot compare prompts of width {ea.shape[1]} and {eb.shape[1]} (different models, "
                              "or a deep prompt with an input-embedding one)")
    ua, ub = F.normalize(ea, dim=1), F.normalize(eb, dim=1)
    matrix = (ua @ ub.T).clamp(-1, 1)  # [n_a, n_b]
    same = ea.shape[0] == eb.shape[0]
    diag = matrix.diagonal().tolist() if same else None
    mean_cos = F.cosine_similarity(ea.mean(0), eb.mean(0), dim=0).item()
    pairs = _max_matching(matrix.double().tolist())
    matched = [[i, j, round(matrix[i, j].item(), 6)] for i, j in pairs]
    return {
        "n_a": ea.shape[0],
        "n_b": eb.shape[0],
        "same_length": same,
        "per_token_cosine": [round(c, 6) for c in diag] if diag is not None else None,
        "mean_per_token_cosine": round(sum(diag) / len(diag), 6) if diag else None,
        "mean_vector_cosine": round(mean_cos, 6),
        "matching": {"pairs": matched, "mean_cosine": round(sum(p[2] for p in matched) / len(matched), 6)},
        "cosine_matrix": [[round(x, 6) for x in row] for row in matrix.tolist()],
    }


def _max_matching(score: list[list[float]]) -> list[tuple[int, int]]:
    """Maximum-total one-to-one assignment on a rectangular matrix (Hungarian algorithm, O(n^2 m))."""
    transpose = len(score) > len(score[0])
    if transpose:
        score = [list(col) for col in zip(*score)]
    n, m = len(score), len(score[0])  # n <= m
    cost = [[-x for x in row] for row in score]
    u, v, p, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [math.inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = sorted((p[j] - 1, j - 1) for j in range(1, m + 1) if p[j])
    return sorted((j, i) for i, j in pairs) if transpose else pairs


# ---- drift from the initialisation ------------------------------------------------------------------

def reproduce_init(base: BaseModel, prompt: SoftPrompt) -> tuple[torch.Tensor | None, str | None]:
    """Rebuild the prompt's initial tensor from meta["init"]: (tensor, None), or (None, why it cannot be)."""
    init = prompt.meta.get("init") or {}
    strategy = init.get("strategy")
    if strategy == "peft-import":
        return None, "imported from a PEFT adapter, which does not record its initialisation"
    if not strategy:
        return None, "the artifact records no initialisation (meta['init'] is missing)"
    if strategy not in INIT_STRATEGIES:
        return None, f"unknown init strategy {strategy!r}"
    want = (prompt.meta.get("base") or {}).get("embedding_sha256")
    have = base.fingerprint()["embedding_sha256"]
    if strategy in ("vocab", "text", "labels") and want and want != have:
        return None, f"the init was drawn from another model's embeddings (hash {want}, this model {have})"
    extra: dict[str, Any] = {}
    if strategy == "prompt":  # transfer: started from another prompt, recorded by path
        source = init.get("prompt")
        if not source or not Path(str(source)).exists():
            return None, f"the prompt it started from ({source or 'unrecorded'}) is not found"
        extra["init_prompt"] = str(source)
    try:
        start = SoftPrompt.initialise(base, prompt.n_virtual_tokens, strategy, init_text=init.get("text"),
                                      labels=init.get("labels"), seed=int(init.get("seed") or 0), deep=prompt.is_deep,
                                      **extra)
    except SoftPromptError as e:
        return None, f"re-running init {strategy!r} failed: {e}"
    return start.embeddings.detach().float(), None


def drift_from_init(base: BaseModel, prompt: SoftPrompt) -> dict[str, Any]:
    """How far training moved each virtual token from where it started (the init, rebuilt from meta["init"]).

    Returns {"init": meta["init"], "reproducible": bool, "reason": why not (or None), and when reproducible:
    "per_token": [{"index", "l2" (distance), "relative" (l2 / the init vector's norm), "cosine" (to the init)}],
    "mean_l2", "max_l2", "mean_cosine", "total_l2" (Frobenius norm of the whole difference)}.
    A freshly initialised prompt has drift 0 and cosine 1.
    """
    init = dict(prompt.meta.get("init") or {})
    start, reason = reproduce_init(base, prompt)
    out: dict[str, Any] = {"init": init or None, "reproducible": start is not None, "reason": reason}
    if start is None:
        return out
    now, start = _rows(prompt), start.reshape(start.shape[0], -1)
    diff = now - start
    l2 = diff.norm(dim=1)
    rel = l2 / start.norm(dim=1).clamp_min(1e-12)
    cos = F.cosine_similarity(now, start, dim=1)
    out["per_token"] = [{"index": i, "l2": round(d, 6), "relative": round(r, 6), "cosine": round(c, 6)}
                        for i, (d, r, c) in enumerate(zip(l2.tolist(), rel.tolist(), cos.tolist()))]
    out.update({"mean_l2": round(l2.mean().item(), 6), "max_l2": round(l2.max().item(), 6),
                "mean_cosine": round(cos.mean().item(), 6), "total_l2": round(diff.norm().item(), 6)})
    return out


# ---- everything at once -----------------------------------------------------------------------------

def inspect_prompt(
    prompt_path: InspectConfig | dict | str | os.PathLike | SoftPrompt | None = None,
    model: str | os.PathLike | None = None,
    k: int | None = None,
    compare: str | os.PathLike | SoftPrompt | None = None,
    *,
    base: BaseModel | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Inspect one prompt (artifact or PEFT adapter directory): nearest tokens, norms, drift, and optionally
    its similarity to another prompt. The model defaults to the one the prompt's meta["base"] names.

    Takes an InspectConfig (or a dict of its fields), or the prompt, `model`, `k` (InspectConfig.top_k, default 5),
    `compare` and any other field as keyword arguments; `base` reuses a loaded model.

    Returns a JSON-able dict with the keys REPORT_KEYS: "prompt" (path or name), "name", "model" (base source),
    "n_virtual_tokens", "dim", "k", "nearest" (nearest_tokens), "norms" (norm_report), "drift"
    (drift_from_init), "compare" (compare(...) plus "other": its path or name; None without `compare`).
    """
    from .model import load_model

    cfg = from_call(InspectConfig, prompt_path, "prompt", {"model": model, "top_k": k, "compare": compare}, kwargs)
    prompt_path, model, k, compare, dtype, device = cfg.prompt, cfg.model, cfg.top_k, cfg.compare, cfg.dtype, cfg.device
    prompt = as_prompt(prompt_path)
    label = str(prompt_path) if not isinstance(prompt_path, SoftPrompt) else str(prompt.meta.get("name") or "prompt")
    if base is None:
        wanted = model if model is not None else (prompt.meta.get("base") or {}).get("source")
        base = load_model(wanted, dtype=dtype, device=device)
    base.check_compatible(prompt, source=label)
    report: dict[str, Any] = {
        "prompt": label,
        "name": prompt.meta.get("name"),
        "model": base.source,
        "n_virtual_tokens": prompt.n_virtual_tokens,
        "dim": prompt.dim,
        "k": k,
        # a deep prompt has no input embeddings: no vocabulary neighbours (see the module doc)
        "nearest": ([{"index": i, "tokens": []} for i in range(prompt.n_virtual_tokens)] if prompt.is_deep
                    else nearest_tokens(base, prompt, k)),
        "norms": deep_norm_report(base, prompt) if prompt.is_deep else norm_report(base, prompt),
        "drift": drift_from_init(base, prompt),
        "compare": None,
    }
    if compare is not None:
        other = as_prompt(compare)
        other_label = str(compare) if not isinstance(compare, SoftPrompt) else str(other.meta.get("name") or "other")
        base.check_compatible(other, source=other_label)
        report["compare"] = {"other": other_label, **_compare(prompt, other)}
    return report


_compare = compare  # `inspect`'s parameter named `compare` shadows the function inside it


# ---- rendering --------------------------------------------------------------------------------------

def format_report(report: dict[str, Any]) -> str:
    """The report as a readable terminal table."""
    norms, drift, cmp = report["norms"], report["drift"], report["compare"]
    v, deep = norms["vocab"], norms.get("kind") == "keys/values"
    shape = f"{2 * len(norms['per_layer'])} x {report['dim']}" if deep else str(report["dim"])
    kind = "deep prompt: keys and values at every layer, " if deep else ""
    lines = [f"prompt {report['prompt']}: {report['n_virtual_tokens']} virtual tokens x {shape} "
             f"({kind}on model {report['model']})"]
    what = f"keys/values real text leaves ({v['count']} tokens)" if deep else f"vocabulary norms ({v['count']} tokens)"
    lines.append(f"{what}: mean {v['mean']:.3g}, median {v['median']:.3g}, "
                 f"p5 {v['p5']:.3g}, p95 {v['p95']:.3g}, max {v['max']:.3g}; prompt mean {norms['prompt_mean']:.3g}")
    if deep:
        layers = norms["per_layer"]
        show = layers if len(layers) <= 6 else [layers[0], layers[len(layers) // 2], layers[-1]]
        lines.append("keys / values RMS by layer, prompt vs text: " + "; ".join(
            f"layer {x['layer']}: {x['keys_rms']:.3g}/{x['values_rms']:.3g} vs "
            f"{x['reference_keys_rms']:.3g}/{x['reference_values_rms']:.3g}" for x in show))
    init = drift["init"] or {}
    desc = str(init.get("strategy") or "unknown")
    if init.get("text"):
        desc += f" {init['text']!r}"
    if init.get("labels"):
        desc += f" labels {', '.join(map(str, init['labels']))}"
    if init.get("strategy") in INIT_STRATEGIES:
        desc += f", seed {init.get('seed')}"
    if drift["reproducible"]:
        lines.append(f"init {desc}: reproduced; drift mean L2 {drift['mean_l2']:.3g} (max {drift['max_l2']:.3g}), "
                     f"mean cosine to init {drift['mean_cosine']:.3f}")
    else:
        lines.append(f"init {desc}: cannot be reproduced ({drift['reason']}); no drift")
    if cmp is not None:
        text = f"compared with {cmp['other']} ({cmp['n_b']} tokens): "
        if cmp["same_length"]:
            text += f"mean per-token cosine {cmp['mean_per_token_cosine']:.3f}; "
        text += (f"mean-vector cosine {cmp['mean_vector_cosine']:.3f}; optimal matching mean cosine "
                 f"{cmp['matching']['mean_cosine']:.3f} ({len(cmp['matching']['pairs'])} pairs)")
        lines.append(text)
    header = ["#", "norm", "x med", "drift", "cos init"]
    if cmp is not None and cmp["same_length"]:
        header.append("cos other")
    header.append("nearest tokens: none (keys/values)" if deep else f"nearest tokens (cosine), top {report['k']}")
    rows = []
    for i, near in enumerate(report["nearest"]):
        nt = norms["per_token"][i]
        ratio = nt["ratio_to_median"]
        row = [str(i), f"{nt['norm']:.3g}", f"{ratio:.2f}" if ratio is not None else "-"]
        if drift["reproducible"]:
            d = drift["per_token"][i]
            row += [f"{d['l2']:.3g}", f"{d['cosine']:.3f}"]
        else:
            row += ["-", "-"]
        if cmp is not None and cmp["same_length"]:
            row.append(f"{cmp['per_token_cosine'][i]:.3f}")
        row.append("  ".join(f"{t['display']} {t['similarity']:.2f}" for t in near["tokens"]))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header) - 1)]
    for r in [header] + rows:
        cells = [r[c].rjust(widths[c]) for c in range(len(widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)


def write_png(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Heat map: virtual tokens x top-k nearest-token cosines annotated with the tokens (a deep prompt: virtual
    tokens x layers, key/value RMS), or, when the report has a comparison, the prompt-vs-prompt cosine matrix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SoftPromptError("--png needs matplotlib: pip install matplotlib") from None
    out = Path(path)
    if out.parent and not out.parent.exists():
        raise SoftPromptError(f"cannot write {out}: folder {out.parent} does not exist")
    cmp = report["compare"]
    with warnings.catch_warnings(), matplotlib.rc_context({"text.parse_math": False}):
        warnings.simplefilter("ignore", UserWarning)  # glyphs missing from the font for exotic tokens
        if cmp is not None:
            data = torch.tensor(cmp["cosine_matrix"])
            na, nb = data.shape
            fig, ax = plt.subplots(figsize=(min(24, 2.5 + 0.45 * nb), min(24, 2 + 0.4 * na)))
            im = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_xlabel(f"virtual token of {cmp['other']}")
            ax.set_ylabel(f"virtual token of {report['prompt']}")
            ax.set_title(f"cosine between virtual tokens (matching mean {cmp['matching']['mean_cosine']:.2f})")
            ax.set_xticks(range(nb))
            ax.set_yticks(range(na))
            if na * nb <= 900:
                for i in range(na):
                    for j in range(nb):
                        ax.text(j, i, f"{data[i, j].item():.2f}", ha="center", va="center", fontsize=6)
            fig.colorbar(im, ax=ax, label="cosine")
        elif report["norms"].get("kind") == "keys/values":
            data = torch.tensor(report["norms"]["per_token_layer_rms"])  # [n, layers]
            fig, ax = plt.subplots(figsize=(min(24, 2.5 + 0.3 * data.shape[1]), min(24, 1.5 + 0.4 * data.shape[0])))
            im = ax.imshow(data.numpy(), cmap="viridis", aspect="auto")
            ax.set_xlabel("layer")
            ax.set_ylabel("virtual token")
            ax.set_title(f"{report['prompt']}: key/value RMS per layer (deep prompt, {report['model']})")
            fig.colorbar(im, ax=ax, label="RMS of keys and values")
        else:
            near = report["nearest"]
            k = max(len(n["tokens"]) for n in near)
            data = torch.full((len(near), k), float("nan"))
            for i, n in enumerate(near):
                for j, t in enumerate(n["tokens"]):
                    data[i, j] = t["similarity"]
            fig, ax = plt.subplots(figsize=(min(30, 2.5 + 1.6 * k), min(40, 1.5 + 0.45 * len(near))))
            im = ax.imshow(data.numpy(), cmap="viridis", aspect="auto")
            finite = data[~data.isnan()]
            middle = (finite.min().item() + finite.max().item()) / 2
            for i, n in enumerate(near):
                for j, t in enumerate(n["tokens"]):
                    label = t["display"] if len(t["display"]) <= 14 else t["display"][:13] + "…"
                    color = "white" if t["similarity"] < middle else "black"  # readable on viridis
                    ax.text(j, i, f"{label}\n{t['similarity']:.2f}", ha="center", va="center", fontsize=7,
                            color=color, linespacing=1.1)
            ax.set_xticks(range(k), [str(j + 1) for j in range(k)])
            ax.set_yticks(range(len(near)))
            ax.set_xlabel("rank of nearest vocabulary token")
            ax.set_ylabel("virtual token")
            ax.set_title(f"{report['prompt']}: nearest tokens by cosine ({report['model']})")
            fig.colorbar(im, ax=ax, label="cosine similarity")
        fig.tight_layout()
        try:
            fig.savefig(out, dpi=120)
        finally:
            plt.close(fig)
    return out
