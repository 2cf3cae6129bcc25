"""Atomic, self-describing artifacts: safetensors tensors and JSON sidecars.

Every tensor file the project reads or writes goes through this module. Nothing
here (or anywhere in lofa) unpickles. Where each trained artifact lives and how it is
loaded and saved is :mod:`lofa.artifacts`, built on these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An artifact that cannot be read, or does not fit what it is used with, naming the file and
    the problem: the one error type of :mod:`lofa.artifacts` (``lofa.lora.LoRAFormatError`` is one)."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    No partial file is ever visible under the final name: the temporary name
    starts with ``.tmp-`` and is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; final files get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors atomically (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:  # (safetensors 0.8 writes broken JSON for no tensors and metadata {})
        save_file(flat, str(tmp), metadata=meta or None)
        _sort_header_metadata(Path(tmp))


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` in sorted key order, in place.

    safetensors writes metadata in hash-map order, which changes from process to process:
    the same tensors and metadata gave files with different bytes, so DVC saw a changed
    output (and reran what depends on it) after every rerun. Same keys, same length.
    """
    with path.open("r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # another JSON escaping than safetensors' own: leave the file as written
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def load_tensors(path: str | Path, *, check_finite: bool = True,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse anything else (pickles included) and non-finite values."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: not a valid safetensors file ({e})") from None
    if check_finite:
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ArtifactError(f"{path}: tensor '{k}' contains NaN or inf")
    return tensors


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors header, without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: not a valid safetensors file ({e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes), order-independent."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
