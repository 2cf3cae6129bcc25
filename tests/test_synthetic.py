"""The synthetic MotionX-like world: config, rendering, captions, held-out splits, files on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lofa.config import ConfigError
from lofa.data.figure import ACTIONS, BACKGROUNDS, COLOURS, ClipSpec, render_clip
from lofa.data.synthetic import (PRESETS, TEMPLATES, SynthConfig, action_gif, caption, caption_path,
                                 contact_sheet, generate, heldout_choices, plan, read_meta, video_path)

SMALL = dict(preset="default", num_clips=24, frames=9, height=48, width=64, fps=8)


# ---------------------------------------------------------------- config

def test_presets_merge_and_override() -> None:
    cfg = SynthConfig.from_params({"preset": "medium", "num_clips": 100, "seed": 3})
    assert (cfg.num_clips, cfg.seed, cfg.height, cfg.width, cfg.frames) == (100, 3, 64, 64, 17)
    default = SynthConfig.from_params({})
    assert dataclasses.asdict(default) == {"preset": "default", "seed": 0, **PRESETS["default"]}
    assert 200 <= default.num_clips <= 300 and (default.height, default.width) == (64, 64)


def test_bad_config_rejected() -> None:
    with pytest.raises(ConfigError, match=r"4k\+1"):
        SynthConfig.from_params({"preset": "default", "frames": 16})
    with pytest.raises(ConfigError, match=r"4k\+1"):
        SynthConfig(frames=18)
    with pytest.raises(ConfigError, match=r"'huge' is unknown; valid presets are \['default', 'medium'\]"):
        SynthConfig.from_params({"preset": "huge"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['clips'\].*num_clips"):
        SynthConfig.from_params({"preset": "default", "clips": 10})
    with pytest.raises(ConfigError, match="multiple of 16"):
        SynthConfig.from_params({"height": 60})
    with pytest.raises(ConfigError, match="training clips"):
        SynthConfig.from_params({"num_clips": 12})


# ---------------------------------------------------------------- rendering

def _figure_mask(video: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """(T, H, W) pixels close to the body colour (full or far-limb shade)."""
    rgb = np.array(COLOURS[spec.colour], dtype=np.float64)
    v = video.astype(np.float64)
    return (np.abs(v - rgb).max(-1) < 40) | (np.abs(v - 0.72 * rgb).max(-1) < 40)


def _nearest_colour_share(pixels: np.ndarray, colour: str) -> float:
    """Share of ``(N, 3)`` pixels whose nearest named body colour (full or far-limb shade) is ``colour``."""
    names = list(COLOURS)
    ref = np.array([COLOURS[n] for n in names] * 2, dtype=np.float64)
    ref[len(names):] *= 0.72
    nearest = np.linalg.norm(pixels[:, None, :].astype(np.float64) - ref[None], axis=-1).argmin(1) % len(names)
    return float((nearest == names.index(colour)).mean())


@pytest.mark.parametrize("action", ACTIONS)
def test_render_every_action_visible_and_moving(action: str) -> None:
    spec = ClipSpec(action, "red", "right", "normal", "large", "white", seed=5)
    video = render_clip(spec, 17, 64, 64, 8)
    assert video.shape == (17, 64, 64, 3) and video.dtype == np.uint8
    np.testing.assert_array_equal(video, render_clip(spec, 17, 64, 64, 8))  # pure
    bg = np.array(BACKGROUNDS["white"][0])
    differs = (np.abs(video.astype(int) - bg).max(-1) > 30).sum(axis=(1, 2))
    assert differs.min() > 60, f"{action}: figure almost invisible ({differs.min()} px)"
    assert _figure_mask(video, spec).sum(axis=(1, 2)).min() > 40
    motion = np.abs(np.diff(video.astype(int), axis=0)).sum(axis=(1, 2, 3))
    assert (motion > 0).mean() >= 0.8, f"{action}: still frames {motion.tolist()}"
    assert motion.mean() > 500


@pytest.mark.parametrize("action", ["walk", "run", "jump"])
def test_direction_sets_travel(action: str) -> None:
    for direction, sign in (("right", 1), ("left", -1)):
        spec = ClipSpec(action, "blue", direction, "normal", "small", "sky", seed=2)
        mask = _figure_mask(render_clip(spec, 17, 64, 64, 8), spec)
        xs = [np.nonzero(m)[1].mean() for m in mask]
        assert sign * (xs[-1] - xs[0]) > 8, f"{action} {direction}: centroid x {xs[0]:.1f} -> {xs[-1]:.1f}"


def test_size_and_speed_attributes() -> None:
    def spec(**kw: str) -> ClipSpec:
        return ClipSpec(**{"action": "wave", "colour": "green", "direction": "left", "speed": "normal",
                           "size": "large", "background": "gray", "seed": 1, **kw})

    heights = {}
    for size in ("small", "large"):
        rows = np.nonzero(_figure_mask(render_clip(spec(size=size), 5, 64, 64, 8), spec(size=size))[0].any(1))[0]
        heights[size] = rows.max() - rows.min()
    assert heights["large"] > 1.25 * heights["small"], heights
    motion = {s: np.abs(np.diff(render_clip(spec(speed=s, action="walk"), 17, 64, 64, 8).astype(int), axis=0)).mean()
              for s in ("slow", "fast")}
    assert motion["fast"] > 1.3 * motion["slow"], motion
    with pytest.raises(ValueError, match="colour: 'teal' is not one of"):
        spec(colour="teal")


# ---------------------------------------------------------------- captions and splits

def test_captions_name_action_colour_and_attributes() -> None:
    assert len(TEMPLATES) >= 6
    spec = ClipSpec("jump", "orange", "right", "fast", "small", "sky")
    caps = [caption(spec, t) for t in range(len(TEMPLATES))]
    assert len(set(caps)) == len(TEMPLATES)
    assert all("jump" in c and "orange" in c and "\n" not in c for c in caps)
    assert caps[1] == "someone wearing orange jumps to the right"
    assert caps[0] == "a person in orange jumps quickly"
    assert "an orange" in caption(spec, 7) and "a orange" not in " ".join(caps)
    assert sum("to the right" in c for c in caps) >= 4 and sum("quickly" in c for c in caps) >= 4
    wave = caption(ClipSpec("wave", "red", "left", "slow", "large", "white"), 0)
    assert wave == "a person in red waves both arms slowly"


def test_plan_heldout_properties() -> None:
    cfg = SynthConfig.from_params({"preset": "default"})
    clips = plan(cfg)
    combos, templates = heldout_choices(cfg)
    assert len(clips) == cfg.num_clips and len({c.id for c in clips}) == cfg.num_clips
    assert len(combos) == 6 and len({a for a, _ in combos}) == 6 and len(templates) == 2
    seen = [c for c in clips if c.split in ("train", "val")]
    train_combos = {(c.spec.action, c.spec.colour) for c in clips if c.split == "train"}
    assert not train_combos & set(combos)
    assert not {c.template for c in seen} & set(templates)
    kinds = {k: [c for c in clips if c.heldout == k] for k in ("combo", "template")}
    assert all(c.split == "test" for k in kinds.values() for c in k)
    assert {c.split for c in clips if not c.heldout} == {"train", "val"}
    assert {(c.spec.action, c.spec.colour) for c in kinds["combo"]} == set(combos)
    assert {c.template for c in kinds["template"]} <= set(templates)
    assert all((c.spec.action, c.spec.colour) in train_combos for c in seen + kinds["template"])
    assert len(train_combos) == len(ACTIONS) * len(COLOURS) - len(combos)  # every seen combo trained on
    assert {c.template for c in clips if c.split == "train"} == set(range(len(TEMPLATES))) - set(templates)
    counts = {s: sum(c.split == s for c in clips) for s in ("train", "val", "test")}
    assert counts == {"train": 168, "val": 24, "test": 48}
    assert all(c.id == f"synth/{c.spec.action}/{i:06d}" for i, c in enumerate(clips))
    other = plan(dataclasses.replace(cfg, seed=1))
    assert heldout_choices(dataclasses.replace(cfg, seed=1)) != (combos, templates)
    assert [c.caption for c in other] != [c.caption for c in clips]
    assert plan(cfg) == clips


# ---------------------------------------------------------------- files on disk

@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = tmp_path_factory.mktemp(f"synth_{name}")
        summary = generate(SynthConfig.from_params({**SMALL, "seed": seed}), root, progress=False)
        assert summary["written"] == 24 and summary["kept"] == 0
        out[name] = root
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(roots: dict[str, Path]) -> None:
    root = roots["a"]
    ids = {s: (root / "splits" / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids)) == 24 and all(ids.values())
    videos = {str(p.relative_to(root / "video"))[:-4] for p in (root / "video").rglob("*.mp4")}
    texts = {str(p.relative_to(root / "texts" / "semantic_labels"))[:-4]
             for p in (root / "texts" / "semantic_labels").rglob("*.txt")}
    assert videos == texts == set(all_ids)
    meta = {r["id"]: r for r in read_meta(root)}
    assert set(meta) == set(all_ids)
    for split, members in ids.items():
        for clip_id in members:
            text = caption_path(root, clip_id).read_text()
            assert text.endswith("\n") and text.count("\n") == 1 and text.strip() == meta[clip_id]["caption"]
            assert meta[clip_id]["split"] == split and clip_id.startswith(f"synth/{meta[clip_id]['action']}/")
            assert (meta[clip_id]["heldout"] != "") == (split == "test")
    assert not list(root.rglob(".tmp-*"))


def test_deterministic_files(roots: dict[str, Path]) -> None:
    a, b, c = (_files(roots[k]) for k in "abc")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between two runs with the same seed"
    assert sum(n.endswith(".mp4") for n in a) == 24
    assert a["meta.csv"] != c["meta.csv"] and a["splits/train.txt"] != c["splits/train.txt"]
    shared = [n for n in a if n.endswith(".mp4") and n in c]
    assert shared and all(a[n] != c[n] for n in shared)


def test_decoded_frames_match_render(roots: dict[str, Path]) -> None:
    import decord

    root = roots["a"]
    cfg = SynthConfig.from_params(SMALL)
    for clip in plan(cfg)[:4]:
        vr = decord.VideoReader(str(video_path(root, clip.id)))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        assert len(vr) == cfg.frames and frames.shape == (cfg.frames, cfg.height, cfg.width, 3)
        rendered = render_clip(clip.spec, cfg.frames, cfg.height, cfg.width, cfg.fps)
        err = np.abs(frames.astype(int) - rendered.astype(int))
        assert err.mean() < 3.0, f"{clip.id}: mean abs codec error {err.mean():.2f}"
        body = _figure_mask(rendered, clip.spec)
        assert _nearest_colour_share(frames[body], clip.spec.colour) > 0.9  # colours survive yuv420p
        assert np.abs(np.diff(frames.astype(int), axis=0)).sum() > 0


def test_resume_rewrites_only_missing(roots: dict[str, Path], tmp_path: Path) -> None:
    cfg = SynthConfig.from_params(SMALL)
    root = roots["a"]
    victim = video_path(root, plan(cfg)[3].id)
    before = victim.read_bytes()
    victim.unlink()
    summary = generate(cfg, root, progress=False)
    assert (summary["written"], summary["kept"]) == (1, 23) and victim.read_bytes() == before
    assert summary["splits"]["train"] + summary["splits"]["val"] + summary["splits"]["test"] == 24
    with pytest.raises(ConfigError, match=r"synth.json: .*another synth config.*'seed'"):
        generate(dataclasses.replace(cfg, seed=9), root, progress=False)


def test_contact_sheet_and_gif(roots: dict[str, Path], tmp_path: Path) -> None:
    import imageio.v3 as iio

    png = contact_sheet(roots["a"], tmp_path / "sheet.png")
    img = iio.imread(png)
    present = {r["action"] for r in read_meta(roots["a"])}
    assert img.ndim == 3 and img.shape[0] > 40 * len(present) and img.shape[1] > 6 * 64
    gif = iio.imread(action_gif(roots["a"], tmp_path / "actions.gif"))
    assert gif.shape[0] == SMALL["frames"] and gif.shape[1] % SMALL["height"] == 0
