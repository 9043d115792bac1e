"""train --report-to: the metrics.jsonl records reach TensorBoard (read back from the event file) and W&B (offline)."""

import json
import sys

import pytest

from softprompt import SoftPromptError, train
from softprompt.cli import build_parser
from softprompt.config import TrainConfig, config_from_args
from softprompt.trackers import parse_report_to


def _train(base, files, out, **kw):
    args = dict(data=str(files[0]), validation=str(files[1]), output=str(out), steps=6, batch_size=8,
                virtual_tokens=4, eval_every=3, progress=False, save_every=2)
    return train(base=base, **{**args, **kw})


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_metric_and_the_config(tiny_base, sentiment_files, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    _train(tiny_base, sentiment_files, out, report_to="tensorboard")
    acc = _events(out / "tensorboard")
    log = _log(out)
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("tokens_per_s", "train/tokens_per_s")):
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in log]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in log], rel=1e-6)
    val = [r for r in log if "val_accuracy" in r]
    assert [s for s, _ in scalars["val/accuracy"]] == [3, 6] == [r["step"] for r in val]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([r["val_loss"] for r in val], rel=1e-6)
    # The run's config, as text (TensorBoard's Text tab).
    config_event = acc.Tensors("config/text_summary")[0]
    text = config_event.tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard"' in text and '"virtual_tokens": 4' in text


def test_tensorboard_after_a_crash_and_resume_has_each_step_once(tiny_base, sentiment_files, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"

    def crash(step, record):
        if step == 3:  # after the step-2 checkpoint: step 3 was logged, then lost
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        _train(tiny_base, sentiment_files, out, report_to="tensorboard", on_step=crash)
    _train(tiny_base, sentiment_files, out, report_to="tensorboard", resume=True)
    steps = [e.step for e in _events(out / "tensorboard").Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6] == [r["step"] for r in _log(out)]


def _wandb_records(path):
    """The protobuf records of an offline .wandb file: a LevelDB-style log (7-byte file header ':W&B' + magic +
    version; 32 KiB blocks of records with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle /
    4 last), as wandb's own reader (`wandb sync`) scans it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_records_the_metrics_and_config(tiny_base, sentiment_files, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _train(tiny_base, sentiment_files, out, report_to="wandb", steps=3, eval_every=3)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    history = [{(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    log = _log(out)
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["train/loss"] for h in history] == [r["loss"] for r in log]
    assert [h["train/lr"] for h in history] == pytest.approx([r["lr"] for r in log])
    assert history[-1]["val/accuracy"] == log[-1]["val_accuracy"] and "val/loss" not in history[0]
    config = {item.key: item.value_json for r in records if r.WhichOneof("record_type") == "run"
              for item in r.run.config.update}
    assert json.loads(config["virtual_tokens"]) == 4 and json.loads(config["report_to"]) == "wandb"


def test_report_to_flag_and_errors(sentiment_files, tmp_path, monkeypatch):
    args = build_parser().parse_args(["train", "--data", "d.jsonl", "--output", "o", "--report-to", "tensorboard,wandb"])
    assert config_from_args(TrainConfig, args).report_to == "tensorboard,wandb"
    assert parse_report_to("TensorBoard, none") == ["tensorboard"] and parse_report_to(None) == []
    with pytest.raises(SoftPromptError, match="unknown tracker mlflow; choose from tensorboard, wandb"):
        train(data=str(sentiment_files[0]), output=str(tmp_path / "o"), report_to="mlflow")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SoftPromptError, match=r"pip install 'softprompt\[tensorboard\]'"):
        train(data=str(sentiment_files[0]), output=str(tmp_path / "o"), report_to="tensorboard")
    assert not (tmp_path / "o").exists()  # failed before touching the output folder (and before loading a model)
