"""The MotionX reader and the preprocess data contract, on a fixture in the real layout."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import torch

from lofa.config import ConfigError, from_dict
from lofa.data.motionx import ClipError, list_clips, read_caption, read_video, sample_indices
from lofa.data.preprocess import MANIFEST_COLUMNS, PreprocessConfig, preprocess
from lofa.io import load_tensors, read_metadata, sha256_file


def _write_mp4(path: Path, frames: int = 24, h: int = 48, w: int = 80, fps: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(frames)[:, None, None]
    yy, xx = np.mgrid[:h, :w]
    r = ((xx[None] + 3 * t) % w) * (255 // w)
    video = np.stack([r, np.broadcast_to(yy * (255 // h), r.shape), np.full_like(r, 90)], -1).astype(np.uint8)
    iio.imwrite(path, video, fps=fps, codec="libx264", macro_block_size=1)


def _clip(root: Path, cid: str, caption: str | bytes | None = "a person walks to the left", **kw) -> None:
    _write_mp4(root / "video" / f"{cid}.mp4", **kw)
    if caption is not None:
        p = root / "texts" / "semantic_labels" / f"{cid}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(caption if isinstance(caption, bytes) else (caption + "\n").encode())


@pytest.fixture(scope="module")
def motionx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six good clips and one of every bad kind, in the MotionX layout."""
    root = tmp_path_factory.mktemp("motionx")
    good = [f"idea400/subset_000{i}/Clip_{i}" for i in range(6)]
    for i, cid in enumerate(good):
        _clip(root, cid, f"someone number {i} jumps slowly")
    vdir = root / "video" / "bad"
    _clip(root, "bad/truncated")
    data = (vdir / "truncated.mp4").read_bytes()
    (vdir / "truncated.mp4").write_bytes(data[: len(data) // 3])
    _clip(root, "bad/zero")
    (vdir / "zero.mp4").write_bytes(b"")
    _clip(root, "bad/notvideo")
    (vdir / "notvideo.mp4").write_text("this is not a video at all\n" * 50)
    _clip(root, "bad/short", frames=4)
    _clip(root, "bad/tiny", h=8, w=8)
    _clip(root, "bad/nocaption", caption=None)
    _clip(root, "bad/emptycaption", caption="   ")
    _clip(root, "bad/latin1caption", caption="caf\xe9 dancer".encode("latin-1"))
    (root / "splits").mkdir()
    bad = ["bad/truncated", "bad/zero", "bad/notvideo", "bad/short", "bad/tiny", "bad/nocaption",
           "bad/emptycaption", "bad/latin1caption", "bad/missingvideo"]
    (root / "splits" / "train.txt").write_text("\n".join(good[:4] + bad + [good[0]]) + "\n")
    (root / "splits" / "val.txt").write_text(good[4] + "\n")
    (root / "splits" / "test.txt").write_text(good[5] + "\n" + good[1] + "\n")
    return root


EXPECTED_REJECTS = {
    "bad/truncated": {"unreadable_video", "corrupt_video", "too_few_frames"},
    "bad/zero": {"empty_video"},
    "bad/notvideo": {"unreadable_video"},
    "bad/short": {"too_few_frames"},
    "bad/tiny": {"bad_dimensions"},
    "bad/nocaption": {"missing_caption"},
    "bad/emptycaption": {"empty_caption"},
    "bad/latin1caption": {"undecodable_caption"},
    "bad/missingvideo": {"missing_video"},
}


def test_list_clips_reads_splits_and_flags_duplicates(motionx: Path) -> None:
    refs, rejected = list_clips(motionx)
    ids = [r.id for r in refs]
    assert len(ids) == len(set(ids))
    assert ("idea400/subset_0000/Clip_0", "duplicate_id") in rejected
    assert ("idea400/subset_0001/Clip_1", "duplicate_id") in rejected  # listed in train and test
    assert ("bad/missingvideo", "missing_video") in rejected
    split = {r.id: r.split for r in refs}
    assert split["idea400/subset_0004/Clip_4"] == "val" and split["idea400/subset_0005/Clip_5"] == "test"


def test_list_clips_without_split_files_hashes_ids(tmp_path: Path) -> None:
    for i in range(5):
        _clip(tmp_path, f"a/clip{i}")
    refs, rejected = list_clips(tmp_path)
    assert not rejected and len(refs) == 5
    assert {r.split for r in refs} <= {"train", "val"}
    assert [r.split for r in refs] == [r.split for r in list_clips(tmp_path)[0]]


def test_read_video_samples_resizes_and_crops(motionx: Path) -> None:
    video, info = read_video(motionx / "video/idea400/subset_0000/Clip_0.mp4", 9, 6.0, 32, 32)
    assert video.shape == (3, 9, 32, 32) and video.dtype == torch.float32
    assert -1.0 <= video.min() and video.max() <= 1.0
    assert (info.src_height, info.src_width, info.src_frames) == (48, 80, 24)
    assert info.src_fps == pytest.approx(12.0)
    assert sample_indices(24, 12.0, 9, 6.0) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    with pytest.raises(ClipError, match="too_few_frames"):
        sample_indices(10, 12.0, 9, 6.0)


@pytest.mark.parametrize("cid,reason", [("bad/zero", "empty_video"), ("bad/notvideo", "unreadable_video"),
                                        ("bad/tiny", "bad_dimensions"), ("bad/short", "too_few_frames")])
def test_read_video_bad_inputs(motionx: Path, cid: str, reason: str) -> None:
    with pytest.raises(ClipError) as e:
        read_video(motionx / "video" / f"{cid}.mp4", 9, 6.0, 32, 32)
    assert e.value.reason == reason and cid.split("/")[1] in str(e.value)


def test_read_caption_errors(motionx: Path) -> None:
    cap = motionx / "texts" / "semantic_labels"
    assert read_caption(cap / "idea400/subset_0000/Clip_0.txt") == "someone number 0 jumps slowly"
    for cid, reason in [("bad/emptycaption", "empty_caption"), ("bad/latin1caption", "undecodable_caption"),
                        ("bad/nocaption", "missing_caption")]:
        with pytest.raises(ClipError, match=reason):
            read_caption(cap / f"{cid}.txt")


def test_preprocess_contract_rejects_and_resume(motionx: Path, tmp_path: Path) -> None:
    cfg = PreprocessConfig(num_frames=9, fps=6.0, height=32, width=32, text_max_length=16, encode_batch=4)
    out = tmp_path / "pre"
    summary = preprocess(cfg, motionx, out, progress=False)
    assert summary["clips"] == 6 and summary["per_split"] == {"test": 1, "train": 4, "val": 1}
    rej = pd.read_csv(out / "rejected.csv")
    got = dict(zip(rej["id"], rej["reason"]))
    for cid, allowed in EXPECTED_REJECTS.items():
        assert got[cid] in allowed, (cid, got.get(cid))
    assert summary["rejected"] == len(EXPECTED_REJECTS) + 2  # plus two duplicate ids

    man = pd.read_parquet(out / "manifest.parquet")
    assert tuple(man.columns) == MANIFEST_COLUMNS and man["id"].is_unique
    for row in man.itertuples():
        path = out / row.path
        assert sha256_file(path) == row.sha256
        t = load_tensors(path)
        assert t["latents"].shape == (16, 3, 4, 4) and t["latents"].dtype == torch.float32
        assert t["context"].shape == (16, 384) and t["mask"].dtype == torch.bool
        n = int(t["mask"].sum())
        assert 0 < n < 16 and t["context"][n:].abs().sum() == 0 and t["context"][:n].abs().sum() > 0
        assert list(row.latent_shape) == [16, 3, 4, 4] and row.num_frames == 9
        assert (row.src_height, row.src_width) == (48, 80) and "jumps" in row.caption
        assert "lofa_clip" in read_metadata(path)
        assert row.coarse_caption == "" and "coarse_context" not in t  # MotionX has no coarse caption

    again = preprocess(cfg, motionx, out, progress=False)
    assert again["encoded_now"] == 0 and again["clips"] == 6
    victim = out / man.loc[0, "path"]
    before = load_tensors(victim)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*.safetensors") if p != victim}
    victim.unlink()
    third = preprocess(cfg, motionx, out, progress=False)
    assert third["encoded_now"] == 1 and victim.is_file()
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert not list(out.rglob(".tmp-*"))
    after = pd.read_parquet(out / "manifest.parquet")
    # the re-encoded clip's bytes may differ in the last float bits: every column but sha256 equal
    for col in [c for c in MANIFEST_COLUMNS if c != "sha256"]:
        assert after[col].astype(str).tolist() == man[col].astype(str).tolist(), col
    assert after["sha256"].tolist()[1:] == man["sha256"].tolist()[1:]
    redone = load_tensors(victim)
    for k in before:
        torch.testing.assert_close(redone[k], before[k], rtol=1e-4, atol=1e-5)


def test_preprocess_fails_when_nothing_usable(tmp_path: Path) -> None:
    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "x.mp4").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no usable clip"):
        preprocess(PreprocessConfig(num_frames=9, height=32, width=32), tmp_path, tmp_path / "out", progress=False)


def test_preprocess_config_rejects_bad_params() -> None:
    with pytest.raises(ConfigError, match="unknown key.*valid keys"):
        from_dict(PreprocessConfig, {"num_frame": 17})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(PreprocessConfig, {"num_frames": "17"})
    with pytest.raises(ConfigError, match="4k\\+1"):
        from_dict(PreprocessConfig, {"num_frames": 16})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(PreprocessConfig, {"profile": "sd15"})


def test_coarse_captions_are_encoded_beside_the_full_ones(motionx: Path, tmp_path: Path) -> None:
    """Where ``texts/coarse_labels/<id>.txt`` exists (the synthetic world), preprocess encodes it as
    ``coarse_context``/``coarse_mask`` and the manifest names it; pretraining reads it by default."""
    import shutil

    from lofa.data.dataset import load_clips
    from lofa.encoders.text import build_text_encoder
    from lofa.pretrain import PretrainConfig, pretraining_clips
    from lofa.wan import WanDiTConfig

    root = tmp_path / "root"
    shutil.copytree(motionx, root)
    ids = [f"idea400/subset_000{i}/Clip_{i}" for i in range(6)]
    for i, cid in enumerate(ids):
        p = root / "texts" / "coarse_labels" / f"{cid}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"a small figure number {i} in red\n")
    (root / "texts" / "coarse_labels" / f"{ids[5]}.txt").write_text("   \n")
    cfg = PreprocessConfig(num_frames=9, fps=6.0, height=32, width=32, text_max_length=16, encode_batch=4)
    out = tmp_path / "pre"
    assert preprocess(cfg, root, out, progress=False)["clips"] == 5
    rej = pd.read_csv(out / "rejected.csv")
    assert dict(zip(rej["id"], rej["reason"]))[ids[5]] == "coarse_empty_caption"
    man = pd.read_parquet(out / "manifest.parquet").set_index("id")
    enc = build_text_encoder("synthetic", max_length=16, device="cpu")
    for i, cid in enumerate(ids[:5]):
        assert man.loc[cid, "coarse_caption"] == f"a small figure number {i} in red"
        t = load_tensors(out / man.loc[cid, "path"])
        ref = enc.encode([f"a small figure number {i} in red", man.loc[cid, "caption"]])
        # the same encoder on the same text: equal up to float summation order across batch sizes
        torch.testing.assert_close(t["coarse_context"], ref.tokens[0].float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t["context"], ref.tokens[1].float(), rtol=1e-4, atol=1e-5)
        assert torch.equal(t["coarse_mask"], ref.mask[0].bool()) and not torch.equal(t["coarse_context"], t["context"])

    train = load_clips(out, ("train",))
    assert train.coarse_text is not None and train.coarse_text.shape == train.text.shape
    dit = WanDiTConfig(dim=64, ffn_dim=64, num_heads=2, num_layers=1, text_dim=384)
    view = pretraining_clips(train, from_dict(PretrainConfig, {"dit": dit.__dict__, "train": {"max_steps": 1}}))
    assert torch.equal(view.text, train.coarse_text) and torch.equal(view.mask, train.coarse_mask)
    full = pretraining_clips(train, from_dict(PretrainConfig, {"dit": dit.__dict__, "train": {"max_steps": 1},
                                                               "caption": "full"}))
    assert torch.equal(full.text, train.text)
    no_coarse = load_clips(out, ("train",))
    no_coarse = type(no_coarse)(no_coarse.ids, no_coarse.captions, no_coarse.splits, no_coarse.latents,
                                no_coarse.text, no_coarse.mask)
    with pytest.raises(ValueError, match="no coarse caption.*caption: full"):
        pretraining_clips(no_coarse, from_dict(PretrainConfig, {"dit": dit.__dict__, "train": {"max_steps": 1}}))
