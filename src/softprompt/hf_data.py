"""Rows from Hugging Face `datasets`: a folder written by `save_to_disk`, a local folder `load_dataset` reads,
or a hub id. `read_rows` (data.py) sends such sources here, so every command that reads data takes them.

Syntax (the `@SPLIT` part is optional; default `train`):

    path/to/folder[@SPLIT]            Dataset / DatasetDict.save_to_disk output, or files load_dataset reads
    hf:ID[:CONFIG][@SPLIT]            the hub, e.g. hf:glue:sst2@validation, hf:stanfordnlp/imdb@test
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SoftPromptError

HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
EXTRA_HINT = "pip install 'softprompt[datasets]'"


@dataclass(frozen=True)
class HFSource:
    """A parsed `--data` value that names a Hugging Face dataset."""

    text: str  # as the user wrote it (errors quote it)
    hub_id: str | None = None  # hub dataset id, or None for a local folder
    config: str | None = None  # hub config name (e.g. sst2 of glue)
    folder: Path | None = None
    split: str | None = None  # None: the default


def parse_source(source: str | Path) -> HFSource | None:
    """The HF dataset a data argument names, or None when it is an ordinary file path."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        spec, _, split = text[len(HUB_PREFIX):].partition("@")
        hub_id, _, config = spec.partition(":")
        if not hub_id or (split == "" and "@" in text) or (config == "" and ":" in spec):
            raise SoftPromptError(f"{text}: a hub dataset is hf:ID[:CONFIG][@SPLIT], e.g. hf:glue:sst2@validation")
        return HFSource(text, hub_id=hub_id, config=config or None, split=split or None)
    path = Path(text)
    if path.is_dir():
        return HFSource(text, folder=path)
    folder, at, split = text.rpartition("@")
    if at and folder and split and Path(folder).is_dir():
        return HFSource(text, folder=Path(folder), split=split)
    return None


def is_local_dataset(source: str | Path) -> bool:
    """A dataset folder on this machine (readable without a network), as opposed to a file or a hub id."""
    return not str(source).startswith(HUB_PREFIX) and parse_source(source) is not None


def read_hf_rows(source: HFSource) -> list[dict[str, Any]]:
    """Rows as dicts, through `datasets` itself (ClassLabel columns stay integers: map them with --label-map)."""
    datasets = _import_datasets(source.text)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars on every read: noise in logs
    try:
        data = _load_folder(datasets, source) if source.folder is not None else _load_hub(datasets, source)
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, source)
    elif source.split and source.hub_id is None and str(getattr(data, "split", None)) != source.split:
        raise SoftPromptError(f"{source.text}: {source.folder} holds one dataset (split {data.split}), not a "
                              f"DatasetDict with a split {source.split!r}; drop @{source.split}")
    if not isinstance(data, datasets.Dataset):
        raise SoftPromptError(f"{source.text}: expected a dataset of rows, got {type(data).__name__} "
                              "(streaming / iterable datasets are not supported)")
    rows = data.to_list()
    if not rows:
        raise SoftPromptError(f"{source.text}: no rows")
    return rows


def _import_datasets(text: str):
    try:
        import datasets
    except ImportError:
        raise SoftPromptError(f"{text}: reading Hugging Face datasets needs the `datasets` package: {EXTRA_HINT}") from None
    return datasets


def _load_folder(datasets, source: HFSource):
    folder = source.folder
    saved = any((folder / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    try:
        if saved:  # written by save_to_disk
            return datasets.load_from_disk(str(folder))
        # Data files load_dataset recognises (csv, json, parquet, ... named by split or in data/).
        return datasets.load_dataset(str(folder))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise SoftPromptError(f"{source.text}: could not read {folder} as a Hugging Face dataset ({_first_line(e)})") from None


def _load_hub(datasets, source: HFSource):
    name = source.hub_id + (f" (config {source.config})" if source.config else "")
    try:
        return datasets.load_dataset(source.hub_id, source.config, split=source.split or DEFAULT_SPLIT)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        # Offline (HF_DATASETS_OFFLINE=1, no network), unknown id, config or split: all are the user's to fix.
        raise SoftPromptError(f"{source.text}: could not load the hub dataset {name} ({_first_line(e)}; offline, "
                              "only datasets already in the Hugging Face cache load)") from None


def _pick_split(data, source: HFSource):
    split = source.split or DEFAULT_SPLIT
    if split not in data:
        raise SoftPromptError(f"{source.text}: no split {split!r}; it has {', '.join(data) or 'none'} "
                              f"(pick one with {source.folder or source.text.partition('@')[0]}@SPLIT)")
    return data[split]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
