"""The prompts directory as loaded prompts: scanned at start and while serving, with admin add / remove.

Each folder is one prompt (our artifact or a PEFT prompt-tuning adapter, safetensors only), named by the folder.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from ..artifact_files import META_FILE, PEFT_CONFIG, PEFT_WEIGHTS, TENSOR_FILE
from ..errors import SoftPromptError
from ..model import BaseModel
from ..prompt import SoftPrompt
from ..engine import PromptEntry

log = logging.getLogger("softprompt.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS)


class PromptRegistry:
    """The prompts directory as loaded prompts. Lookups are lock-free reads of an immutable dict; scans, adds and
    removals build a new dict, so a request admitted with a prompt keeps it whatever happens on disk."""

    def __init__(self, base: BaseModel, directory: str | os.PathLike | None, *, max_prompt_bytes: int = 64 << 20,
                 max_virtual_tokens: int = 1024):
        self.base = base
        self.directory = Path(directory).expanduser().resolve() if directory is not None else None
        if self.directory is not None and not self.directory.is_dir():
            raise SoftPromptError(f"prompts directory not found: {directory}")
        self.max_prompt_bytes = max_prompt_bytes
        self.max_virtual_tokens = max_virtual_tokens
        self.entries: dict[str, PromptEntry] = {}
        self.errors: dict[str, str] = {}  # name -> why its last load failed
        self._signatures: dict[str, tuple] = {}
        self._disabled: set[str] = set()  # removed by an admin: not reloaded by scans until added again
        self._lock = threading.Lock()
        self._version = 0

    def get(self, name: str) -> PromptEntry | None:
        return self.entries.get(name)

    def _path(self, name: str) -> Path:
        if not NAME_RE.match(name) or ".." in name:
            raise SoftPromptError(f"invalid prompt name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
        assert self.directory is not None
        path = self.directory / name
        if path.is_symlink() and not path.resolve().is_relative_to(self.directory):
            raise SoftPromptError(f"prompt {name!r} is a link outside the prompts directory")
        return path

    @staticmethod
    def _signature(path: Path) -> tuple | None:
        sig = []
        for f in (TENSOR_FILE, META_FILE, *PEFT_FILES):
            try:
                st = (path / f).stat()
            except OSError:
                continue
            sig.append((f, st.st_size, st.st_mtime_ns))
        return tuple(sig) or None

    def _load(self, name: str, path: Path) -> PromptEntry:
        for f in (TENSOR_FILE, PEFT_FILES[1]):
            if (path / f).is_symlink() and not (path / f).resolve().is_relative_to(self.directory):
                raise SoftPromptError(f"{name}/{f} is a link outside the prompts directory")
            if (path / f).exists() and (path / f).stat().st_size > self.max_prompt_bytes:
                raise SoftPromptError(f"{name}/{f} is over {self.max_prompt_bytes} bytes")
        prompt = SoftPrompt.load(path, self.base, strict=True)  # safetensors only, never pickle
        if prompt.n_virtual_tokens > self.max_virtual_tokens:
            raise SoftPromptError(f"{name}: {prompt.n_virtual_tokens} virtual tokens, over the limit of {self.max_virtual_tokens}")
        self._version += 1
        emb = prompt.embeddings.detach().to(self.base.device, self.base.dtype)
        return PromptEntry(name=name, embeddings=emb, version=self._version, meta=dict(prompt.meta))

    def scan(self) -> dict[str, list[str]]:
        """Bring the loaded set in line with the directory: load new or changed prompts, drop deleted ones.
        A prompt that fails to load keeps its previous version (if any) and its error is recorded."""
        report: dict[str, list[str]] = {"added": [], "updated": [], "removed": [], "failed": []}
        if self.directory is None:
            return report
        with self._lock:
            entries = dict(self.entries)
            seen = set()
            for path in sorted(self.directory.iterdir()):
                name = path.name
                if name.startswith(".") or not path.is_dir() or name in self._disabled:
                    continue
                try:
                    path = self._path(name)
                except SoftPromptError as e:
                    if name not in self.errors:  # report (and log) a bad folder once, not on every scan
                        log.warning("skipping %s", e)
                        report["failed"].append(name)
                    self.errors[name] = str(e)
                    continue
                sig = self._signature(path)
                if sig is None:
                    continue  # not (yet) a prompt
                seen.add(name)
                if self._signatures.get(name) == sig:
                    continue
                self._signatures[name] = sig
                try:
                    entries[name] = self._load(name, path)
                except Exception as e:  # noqa: BLE001  one bad folder never blocks the others (or the server)
                    self.errors[name] = str(e) if isinstance(e, SoftPromptError) else f"{type(e).__name__}: {e}"
                    report["failed"].append(name)
                    log.warning("prompt %s not loaded: %s", name, e)
                    continue
                self.errors.pop(name, None)
                report["updated" if name in self.entries else "added"].append(name)
            for name in list(entries):
                if name not in seen:
                    del entries[name]
                    self._signatures.pop(name, None)
                    report["removed"].append(name)
            for name in list(self.errors):
                if not (self.directory / name).exists():
                    del self.errors[name]
            self.entries = entries
        if any(report.values()):
            log.info("prompts: %s", ", ".join(f"{k} {v}" for k, v in report.items() if v))
        return report

    def add(self, name: str) -> PromptEntry:
        """Load (or reload) one prompt by name from the directory; re-enables a removed one."""
        if self.directory is None:
            raise SoftPromptError("no prompts directory")
        with self._lock:
            path = self._path(name)
            if not path.is_dir():
                raise FileNotFoundError(f"no prompt folder {name!r} in the prompts directory")
            entry = self._load(name, path)
            self._disabled.discard(name)
            self._signatures[name] = self._signature(path)
            self.errors.pop(name, None)
            self.entries = {**self.entries, name: entry}
        return entry

    def remove(self, name: str) -> bool:
        """Unload a prompt (requests already admitted finish with it); later scans skip it until add()."""
        with self._lock:
            if name not in self.entries:
                return False
            self._disabled.add(name)
            self._signatures.pop(name, None)
            self.entries = {k: v for k, v in self.entries.items() if k != name}
        return True
