"""Carry the medium bundle's text embeddings in float16 (scripts/medium_bundle.sh, scripts/device_medium.sh).

World v2 captions are long and nearly all distinct, so their float32 MiniLM embeddings barely
compress (xz: 27.5 KB per clip for the full caption, 7.8 KB for the coarse one, against 6.3 KB of
latents; docs/world.md); in float16 they take about half. No stage reads float16, so:

- ``pack PRE STAGE`` (here): rounds every clip file's text tensors (TEXT_KEYS) in ``PRE`` through
  float16 in place (still float32 files; idempotent; the manifest's sha256 column follows), then
  writes ``STAGE``: the same tree with those tensors stored as float16 (what the bundle carries).
- ``unpack PRE`` (the device): casts them back to float32 in place. The values were already
  float16-representable, so the files come back byte-identical to ``PRE`` here (the stages there
  and here read the same bytes).

Rounding changes an embedding by at most 2^-11 of its magnitude (float16 keeps 11 significant
bits); MiniLM token embeddings stay far inside float16's range (a value past it is an error).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lofa.io import ArtifactError, atomic_path, load_tensors, read_metadata, save_tensors, sha256_file  # noqa: E402

#: The clip-file tensors carried in float16 (lofa/data/preprocess.py writes them float32).
TEXT_KEYS = ("context", "coarse_context")
#: Header key naming the tensors a staged file holds in float16 (removed again by ``unpack``).
MARK = "lofa_text16"
F16_MAX = float(torch.finfo(torch.float16).max)


def _clip_files(pre: Path) -> list[Path]:
    manifest = pre / "manifest.parquet"
    if not manifest.is_file():
        raise ArtifactError(f"{manifest}: no manifest; run the preprocess stage first")
    return [pre / rel for rel in pd.read_parquet(manifest)["path"]]


def _rounded(path: Path, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(t)
    for k in TEXT_KEYS:
        if k not in t:
            continue
        if t[k].dtype != torch.float32:
            raise ArtifactError(f"{path}: tensor '{k}' is {t[k].dtype}, expected float32 (preprocess's output)")
        peak = float(t[k].abs().max()) if t[k].numel() else 0.0
        if peak >= F16_MAX:
            raise ArtifactError(f"{path}: tensor '{k}' reaches {peak:g}, past float16's range {F16_MAX:g}")
        out[k] = t[k].half().float()
    return out


def pack(pre: Path, stage: Path) -> dict[str, int]:
    """Round ``pre``'s text tensors through float16 in place; write the float16 copy tree ``stage``."""
    files = _clip_files(pre)
    rounded = 0
    if stage.exists():
        shutil.rmtree(stage)
    for path in files:
        t, meta = load_tensors(path), read_metadata(path)
        r = _rounded(path, t)
        if any(not torch.equal(r[k], t[k]) for k in TEXT_KEYS if k in t):
            save_tensors(path, r, metadata=meta)
            rounded += 1
        keys = [k for k in TEXT_KEYS if k in r]
        save_tensors(stage / path.relative_to(pre), {**r, **{k: r[k].half() for k in keys}},
                     metadata={**meta, MARK: ",".join(keys)})
    df = pd.read_parquet(pre / "manifest.parquet")
    if rounded:
        df["sha256"] = [sha256_file(pre / rel) for rel in df["path"]]
        with atomic_path(pre / "manifest.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    for p in pre.iterdir():  # manifest, rejected.csv, ...: everything but the clip files
        if p.is_file():
            shutil.copy2(p, stage / p.name)
    return {"clips": len(files), "rounded_now": rounded}


def unpack(pre: Path) -> dict[str, int]:
    """Cast the float16 text tensors of a staged tree back to float32, in place."""
    cast = 0
    for path in _clip_files(pre):
        meta = read_metadata(path)
        if MARK not in meta:
            continue
        t = load_tensors(path)
        keys = [k for k in meta.pop(MARK).split(",") if k]
        for k in keys:
            if k not in t or t[k].dtype != torch.float16:
                raise ArtifactError(f"{path}: header {MARK} names '{k}', which is not a float16 tensor here")
        save_tensors(path, {**t, **{k: t[k].float() for k in keys}}, metadata=meta)
        cast += 1
    return {"cast_back": cast}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="round PRE's text through float16 in place; write the float16 tree STAGE")
    p.add_argument("pre", type=Path)
    p.add_argument("stage", type=Path)
    u = sub.add_parser("unpack", help="cast PRE's float16 text tensors back to float32 in place")
    u.add_argument("pre", type=Path)
    a = ap.parse_args(argv)
    out = pack(a.pre, a.stage) if a.cmd == "pack" else unpack(a.pre)
    print(f"[medium_text16] {a.cmd}: {out}")


if __name__ == "__main__":
    main()
