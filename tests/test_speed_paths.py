"""Correctness guard for the speed paths (issue 6): every fast path gives the plain fp32 path's loss and
gradient on the same batch, on the tiny offline Llama. fp32 paths agree to float rounding (1e-5 relative);
bf16 paths to bf16 tolerance (a few 1e-2 relative on the loss, see BENCHMARKS.md "Speed")."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_prefix
from softprompt import load_model

ROOT = Path(__file__).resolve().parents[1]


def _batch(seed: int = 0, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    if left:
        mask[1, :3] = 0
        mask[2, :6] = 0
    else:
        mask[1, 6:] = 0
        mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # an input part without loss
    return ids, mask, labels


def _loss_and_grad(base, prompt, ids, mask, labels):
    p = prompt.detach().clone().requires_grad_(True)
    nll, count = base.sequence_nll(base.prepend_prompts(ids, mask, p, labels))
    nll.sum().backward()
    return nll.detach().float(), count, p.grad.detach().float()


def _counting(base):
    calls = []
    handle = base.model.base_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(tuple(k["inputs_embeds"].shape)), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("left", [False, True])
def test_shared_prefix_equals_plain_path_fp32(tiny_base, left):
    torch.manual_seed(1)
    prompt = torch.randn(5, tiny_base.hidden_size) * 0.5
    ids, mask, labels = _batch(left=left)
    with shared_prefix(tiny_base, False):
        ref = _loss_and_grad(tiny_base, prompt, ids, mask, labels)
    calls, handle = _counting(tiny_base)
    try:
        with shared_prefix(tiny_base, True):
            fast = _loss_and_grad(tiny_base, prompt, ids, mask, labels)
    finally:
        handle.remove()
    # the prompt once, then the rows (less their last position, which predicts nothing)
    assert calls == [(1, 5, tiny_base.hidden_size), (4, 8, tiny_base.hidden_size)]
    assert torch.equal(ref[1], fast[1])
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-4, atol=1e-6)


def test_shared_prefix_scores_first_token_from_last_virtual_token(tiny_base):
    # LM rows: every token labelled, the first one predicted from the prompt's last position.
    torch.manual_seed(2)
    prompt = torch.randn(3, tiny_base.hidden_size)
    ids, mask, _ = _batch(seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    with shared_prefix(tiny_base, False):
        ref = _loss_and_grad(tiny_base, prompt, ids, mask, labels)
    with shared_prefix(tiny_base, True):
        fast = _loss_and_grad(tiny_base, prompt, ids, mask, labels)
    assert fast[1].tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_head_nll_equals_full_logits(dtype, tol):
    from softprompt.model import head_nll

    torch.manual_seed(6)
    weight = torch.randn(300, 16).to(dtype)
    hidden = torch.randn(23, 16).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 300, (23,))
    upstream = torch.rand(23)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets, reduction="none")
    (ref * upstream).sum().backward()
    ref_grad, hidden.grad = hidden.grad.clone(), None
    nll = head_nll(hidden, weight, targets, chunk_bytes=4 * 300 * 5)  # 5 rows per chunk
    (nll * upstream).sum().backward()
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.float(), ref_grad.float(), rtol=tol, atol=tol * 10)
    with torch.no_grad():
        assert not head_nll(hidden, weight, targets).requires_grad


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_sequence_nll_equals_full_logits_reference(tiny_base, shared, left):
    """Independent reference: HF's own forward on the whole injected batch, full-vocab logits, plain cross
    entropy. Every fast path (head only at labels, chunked NLL, last position skipped, shared prefix) must
    give the same per-row NLL and prompt gradient."""
    torch.manual_seed(7)
    prompt = torch.randn(5, tiny_base.hidden_size) * 0.5
    ids, mask, labels = _batch(seed=8, left=left)
    p_ref = prompt.clone().requires_grad_(True)
    batch = tiny_base.prepend_prompts(ids, mask, p_ref, labels)
    logits = tiny_base.forward(batch).logits.float()  # [B, L, V]
    targets = batch.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                            ignore_index=-100).sum(1)
    nll.sum().backward()
    with shared_prefix(tiny_base, shared):
        fast = _loss_and_grad(tiny_base, prompt, ids, mask, labels)
    assert fast[1].tolist() == (targets != -100).sum(1).tolist()
    torch.testing.assert_close(fast[0], nll.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2], p_ref.grad, rtol=1e-4, atol=1e-6)


def test_one_token_rows(tiny_base):
    prompt = torch.randn(3, tiny_base.hidden_size)
    ids = torch.tensor([[5], [6]])
    mask = torch.ones(2, 1, dtype=torch.long)
    results = []
    for shared in (False, True):
        with shared_prefix(tiny_base, shared):
            results.append(_loss_and_grad(tiny_base, prompt, ids, mask, ids.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].tolist() == [1, 1]
    with shared_prefix(tiny_base, False):  # no prompt, one token: nothing to predict
        nll, count = tiny_base.sequence_nll(tiny_base.prepend_prompts(ids, mask, None, ids.clone()))
    assert count.tolist() == [0, 0] and nll.tolist() == [0.0, 0.0]


def test_per_row_prompts_take_the_plain_path_and_nothing_common_too(tiny_base):
    ids, mask, labels = _batch()
    prompted = tiny_base.prepend_prompts(ids, mask, [torch.zeros(2, tiny_base.hidden_size)] * 4, labels)
    assert prompted.shared is None
    calls, handle = _counting(tiny_base)
    try:
        with shared_prefix(tiny_base, True):  # no prompt and rows with no common first token: nothing to share
            tiny_base.sequence_nll(tiny_base.prepend_prompts(ids, mask, None, labels))
    finally:
        handle.remove()
    assert calls == [(4, 8, tiny_base.hidden_size)]


def _common_start(left: bool):
    """Rows that all begin with the same 4 tokens (a chat template's system turn), then differ."""
    ids, mask, labels = _batch(seed=9, left=left)
    start = torch.tensor([7, 8, 9, 10])
    for row in range(ids.shape[0]):
        first = int((mask[row] == 0).sum()) if left else 0
        ids[row, first:first + 4] = start[:ids.shape[1] - first]
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    return ids, mask, labels


@pytest.mark.parametrize("kind", ["input", "deep", "none"])
@pytest.mark.parametrize("left", [False, True])
def test_common_leading_tokens_run_once(tiny_base, kind, left):
    """The tokens every row starts with run once per batch, after the prompt (input-embedding or deep) or
    alone: same per-row loss and prompt gradient as the plain path. The shortest row (3 tokens) keeps its
    last token to itself, so 2 of the 4 common tokens are shared."""
    torch.manual_seed(10)
    shape = {"input": (5, tiny_base.hidden_size), "deep": (5, *tiny_base.kv_shape), "none": None}[kind]
    prompt = torch.randn(*shape) * 0.5 if shape else None
    ids, mask, labels = _common_start(left)

    def run():
        p = None if prompt is None else prompt.clone().requires_grad_(True)
        nll, count = tiny_base.sequence_nll(tiny_base.prepend_prompts(ids, mask, p, labels))
        if p is None:
            return nll.detach(), count, None
        nll.sum().backward()
        return nll.detach(), count, p.grad

    with shared_prefix(tiny_base, False):
        ref = run()
    calls, handle = _counting(tiny_base)
    try:
        with shared_prefix(tiny_base, True):
            fast = run()
    finally:
        handle.remove()
    n_virtual = 5 if kind == "input" else 0
    assert calls == [(1, n_virtual + 2, tiny_base.hidden_size), (4, 9 - 2 - 1, tiny_base.hidden_size)]
    assert torch.equal(ref[1], fast[1])
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    if prompt is not None:
        torch.testing.assert_close(fast[2], ref[2], rtol=1e-4, atol=1e-6)


def test_bf16_within_tolerance_of_fp32(tiny_model_dir):
    base32 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    base16 = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    torch.manual_seed(4)
    prompt = torch.randn(5, base32.hidden_size) * 0.5  # fp32 master copy in both cases
    ids, mask, labels = _batch()
    with shared_prefix(base32, False):
        ref = _loss_and_grad(base32, prompt, ids, mask, labels)
    for on in (False, True):
        with shared_prefix(base16, on):
            fast = _loss_and_grad(base16, prompt, ids, mask, labels)
        assert fast[2].dtype == torch.float32
        torch.testing.assert_close(fast[0], ref[0], rtol=3e-2, atol=3e-2)
        cos = torch.nn.functional.cosine_similarity(fast[2].flatten(), ref[2].flatten(), dim=0)
        assert cos > 0.98


def test_activation_checkpointing_falls_back_to_plain_path(tiny_model_dir):
    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    torch.manual_seed(5)
    prompt = torch.randn(4, base.hidden_size)
    ids, mask, labels = _batch()
    with shared_prefix(base, False):
        ref = _loss_and_grad(base, prompt, ids, mask, labels)
    base.enable_activation_checkpointing()  # HF drops caches under checkpointing: the shared path must step aside
    calls, handle = _counting(base)
    try:
        fast = _loss_and_grad(base, prompt, ids, mask, labels)
    finally:
        handle.remove()
    assert calls == [(4, 12, base.hidden_size)]  # plain path: 4 + 9 positions, less the last
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-4, atol=1e-6)


def test_training_is_the_same_with_and_without_shared_prefix(tiny_model_dir, sentiment_files, tmp_path):
    from softprompt import train

    train_file, dev_file = sentiment_files
    results = {}
    for on in (False, True):
        base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
        base.shared_prefix = on
        result = train(data=str(train_file), output=str(tmp_path / f"run{on}"), base=base, steps=4, batch_size=8,
                       virtual_tokens=4, progress=False, seed=0)
        results[on] = result.prompt.embeddings
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-5)


def test_speed_bench_runs_tiny(tmp_path):
    """bench/speed.py end to end on the tiny model (a smoke test: it runs and writes its report)."""
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft not installed")
    out = tmp_path / "speed"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "speed.json").read_text())
    names = {r["name"] for r in report["runs"]}
    assert {"softprompt", "peft-fp32", "peft-fp32-guide"} <= names
    assert (out / "speed.md").read_text().startswith("|")
    # The guide's fixed-length padding computes more positions per real token than dynamic padding, never fewer.
    pos = {r["name"]: r for r in report["runs"] if r["dataset"] == "sst2"}
    assert pos["peft-fp32-guide"]["positions_per_token"] >= pos["peft-fp32"]["positions_per_token"]



def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft not installed")
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_speed.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_speed.json").read_text())
    assert any(r["name"].startswith("softprompt") for r in report["runs"])
    # The GPU default (plain path) must stay launch-lean: per step, about the operators HF's own forward
    # dispatches (a per-row or per-layer Python loop would multiply them).
    ops = {(r["dataset"], r["name"]): r["ops_per_step"] for r in report["direct"]}
    for dataset in ("cls", "lm"):
        assert 0 < ops[dataset, "ours plain"] <= 1.2 * ops[dataset, "hf full logits (PEFT's computation)"], ops


def test_gpu_script_is_wired_to_the_python_bench():
    text = (ROOT / "bench" / "gpu.sh").read_text()
    assert "bench/gpu_speed.py" in text and "PYTHONPATH" in text and "timeout" in text
