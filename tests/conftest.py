"""Fixtures: a tiny randomly initialised Llama with a real BPE tokenizer, built offline and saved to a folder,
so tests load it through the same `load_model(folder)` path users take. Plus small generated datasets."""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path

import pytest
import torch

@pytest.fixture(autouse=True)
def _restore_loggers():
    """The CLI (`main([...])` in tests) gives the `softprompt` and `softprompt.load` loggers stderr handlers, as
    a process does once; between tests that would leak into tests of the silent Python API."""
    loggers = [logging.getLogger(name) for name in ("softprompt", "softprompt.load")]
    saved = [(x.handlers[:], x.level, x.propagate) for x in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


WORDS_POS = ["great", "wonderful", "superb", "lovely", "brilliant", "excellent"]
WORDS_NEG = ["awful", "terrible", "boring", "dreadful", "poor", "horrible"]
SUBJECTS = ["the film", "the plot", "the acting", "this phone", "the meal", "the hotel"]


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"{s} was {w} . positive negative Review : Sentiment" for s in SUBJECTS for w in WORDS_POS + WORDS_NEG]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    _pretrain(model, fast, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _pretrain(model, tokenizer, seed: int, steps: int = 150) -> None:
    """A few hundred ms of language modelling, so the tiny model reacts to its inputs like a trained one
    (a freshly initialised model predicts nearly uniform tokens whatever its prompt)."""
    rng = random.Random(seed)
    texts = [f"Review: {rng.choice(SUBJECTS)} was {rng.choice(WORDS_POS + WORDS_NEG)} .\nSentiment: "
             f"{rng.choice(['positive', 'negative'])}" for _ in range(256)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    from softprompt import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        word = rng.choice(WORDS_POS if label else WORDS_NEG)
        rows.append({"input": f"Review: {rng.choice(SUBJECTS)} was {word} .\nSentiment:",
                     "output": "positive" if label else "negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sentiment_files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", sentiment_rows(48, 1)), write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(16, 2))


@pytest.fixture(scope="session")
def smol_base():
    """The embedded SmolLM2-135M (slow tests only; loads once per session)."""
    from softprompt import load_model

    return load_model(None, dtype="float32", device="cpu")


# Chat templates for the tiny tokenizer (it ships none): one for chat-format training, one for the server's turns.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SERVE_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} .\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant :{% endif %}")


def chat_model_copy(model_dir: Path, out: Path) -> Path:
    """A copy of the tiny model folder whose tokenizer has a chat template, like an instruct model's."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def load_with_serve_chat_template(model_dir: Path):
    """Our own load (not the shared tiny_base): serving tests give its tokenizer a chat template."""
    from softprompt import load_model

    b = load_model(str(model_dir), dtype="float32", device="cpu")
    b.tokenizer.chat_template = SERVE_CHAT_TEMPLATE
    return b


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect failure, and return its one-line error (no traceback)."""
    from softprompt.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err and err[-1].startswith("softprompt: error:") and "Traceback" not in "\n".join(err)
    return err[-1]


@contextlib.contextmanager
def shared_prefix(base, on: bool):
    """Force `BaseModel.shared_prefix` on or off for a block (the fast path vs the plain one)."""
    old = base.shared_prefix
    base.shared_prefix = on
    try:
        yield
    finally:
        base.shared_prefix = old


class LocalServer:
    """uvicorn serving `app` on 127.0.0.1, an ephemeral port, in a thread (the serving tests' real socket)."""

    def __init__(self, app, log_level: str = "warning"):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)

    def __exit__(self, *exc):
        self.stop()
