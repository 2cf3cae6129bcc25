"""The synthetic MotionX-like world: config, rendering, captions, held-out splits, files on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import re

import numpy as np
import pytest
import torch

from lofa.config import ConfigError
from lofa.data.figure import ACTIONS, BACKGROUNDS, COLOURS, DIRECTIONS, SIZES, SPEEDS, ClipSpec, render_clip
from lofa.data.synthetic import (COARSE, COARSE_TEMPLATES, HELDOUT_KINDS, PRESETS, STATED, TEMPLATES, SynthConfig,
                                 action_gif, caption, caption_path, coarse_caption, coarse_caption_path,
                                 contact_sheet, generate, heldout_choices, plan, read_meta, render_like, video_path)
from lofa.encoders.video import SynthCodec

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

#: Words that name each attribute value in any template (written here, apart from the module's tables).
WORDS = {
    "size": {"small": ("small", "little", "short", "slight"), "large": ("large", "big", "tall", "heavy")},
    "speed": {"slow": ("slowly", "slow pace", "unhurriedly"), "normal": ("steady pace", "normal pace", "even pace"),
              "fast": ("quickly", "fast pace", "briskly")},
    "direction": {"left": ("left",), "right": ("right",)},
    "background": {"white": ("white",), "gray": ("gray",), "sky": ("daytime sky", "sunny sky", "bright sky"),
                   "night": ("night",)},
    "colour": {c: (c,) for c in COLOURS},
    "action": {"walk": ("walk",), "run": ("run",), "jump": ("jump",), "wave": ("waves", "waving"),
               "squat": ("squat",), "kick": ("kick",), "clap": ("clap",), "punch": ("punch",), "bow": ("bow",),
               "spin": ("spin",)},
}
MOTION_WORDS = {w for a in ("action", "speed", "direction") for ws in WORDS[a].values() for w in ws} | \
    {"facing", "heading", "towards", "turned", "moves", "pace"}


def read_attributes(text: str, attrs: tuple[str, ...] = STATED) -> dict[str, str]:
    """The attribute values a caption names: exactly one value per attribute, else AssertionError."""
    out = {}
    for a in attrs:
        named = [v for v, words in WORDS[a].items() if any(re.search(rf"\b{w}", text) for w in words)]
        assert len(named) == 1, f"{text!r}: {a} named as {named}"
        out[a] = named[0]
    return out


def _all_specs() -> list[ClipSpec]:
    return [ClipSpec(a, c, d, s, z, b) for a in ACTIONS for c in ("orange", "blue") for d in DIRECTIONS
            for s in SPEEDS for z in SIZES for b in BACKGROUNDS]


def test_every_template_states_every_attribute() -> None:
    assert len(TEMPLATES) >= 10
    for spec in _all_specs():
        caps = [caption(spec, t) for t in range(len(TEMPLATES))]
        assert len(set(caps)) == len(TEMPLATES)
        for c in caps:
            assert read_attributes(c) == {k: getattr(spec, k) for k in STATED}, c
            assert "\n" not in c and " a orange" not in c and not c.startswith("a orange")
    spec = ClipSpec("jump", "orange", "right", "fast", "small", "sky")
    assert caption(spec, 0) == "a small person in orange jumps quickly to the right against a clear daytime sky"
    assert caption(ClipSpec("wave", "red", "left", "slow", "large", "white"), 1) == \
        "someone big wearing red waves both arms facing left at a slow pace in front of a white wall"


def test_coarse_captions_state_colour_size_background_and_no_motion() -> None:
    for spec in _all_specs():
        for t in range(len(COARSE_TEMPLATES)):
            c = coarse_caption(spec, t)
            assert read_attributes(c, COARSE) == {k: getattr(spec, k) for k in COARSE}, c
            assert not {w for w in MOTION_WORDS if re.search(rf"\b{w}", c)}, c
    clips = plan(SynthConfig.from_params({"preset": "default"}))
    assert len({c.coarse_caption for c in clips}) > 40  # colours x sizes x backgrounds x wordings


def test_plan_heldout_properties() -> None:
    cfg = SynthConfig.from_params({"preset": "default"})
    clips = plan(cfg)
    held = heldout_choices(cfg)
    assert len(clips) == cfg.num_clips and len({c.id for c in clips}) == cfg.num_clips
    assert len(held.combos) == 6 and len({a for a, _ in held.combos}) == 6 and len(held.templates) == 2
    assert len(held.bg_combos) == 4 and len({a for a, _ in held.bg_combos}) == 4
    assert not {a for a, _ in held.combos} & {a for a, _ in held.bg_combos}  # 6 + 4 actions of 10: disjoint
    seen = [c for c in clips if c.split in ("train", "val")]
    pairs = {(c.spec.action, c.spec.colour) for c in seen}
    bg_pairs = {(c.spec.action, c.spec.background) for c in seen}
    assert not pairs & set(held.combos) and not bg_pairs & set(held.bg_combos)
    assert not {c.template for c in seen} & set(held.templates)
    kinds = {k: [c for c in clips if c.heldout == k] for k in HELDOUT_KINDS}
    assert all(c.split == "test" for k in kinds.values() for c in k)
    assert {c.split for c in clips if not c.heldout} == {"train", "val"}
    # each kind is new in exactly one way
    assert {(c.spec.action, c.spec.colour) for c in kinds["combo"]} == set(held.combos)
    assert all((c.spec.action, c.spec.background) in bg_pairs for c in kinds["combo"])
    assert {(c.spec.action, c.spec.background) for c in kinds["combo_bg"]} == set(held.bg_combos)
    assert all((c.spec.action, c.spec.colour) in pairs for c in kinds["combo_bg"])
    assert {c.template for c in kinds["template"]} <= set(held.templates)
    assert all((c.spec.action, c.spec.colour) in pairs and (c.spec.action, c.spec.background) in bg_pairs
               for c in kinds["template"])
    assert all(c.template not in held.templates for k in ("combo", "combo_bg") for c in kinds[k])
    train_pairs = {(c.spec.action, c.spec.colour) for c in clips if c.split == "train"}
    assert len(train_pairs) == len(ACTIONS) * len(COLOURS) - len(held.combos)  # every seen pair trained on
    assert {c.template for c in clips if c.split == "train"} == set(range(len(TEMPLATES))) - set(held.templates)
    counts = {s: sum(c.split == s for c in clips) for s in ("train", "val", "test")}
    assert counts == {"train": 168, "val": 12, "test": 60}
    assert {k: len(v) for k, v in kinds.items()} == {"combo": 24, "combo_bg": 24, "template": 12}
    assert all(c.id == f"synth/{c.spec.action}/{i:06d}" for i, c in enumerate(clips))
    assert all(c.caption == caption(c.spec, c.template) for c in clips)
    assert all(c.coarse_caption == coarse_caption(c.spec, c.coarse_template) for c in clips)
    other = plan(dataclasses.replace(cfg, seed=1))
    assert heldout_choices(dataclasses.replace(cfg, seed=1)) != held
    assert [c.caption for c in other] != [c.caption for c in clips]
    assert plan(cfg) == clips


# ---------------------------------------------------------------- what the caption determines

def _latents(videos: list[np.ndarray]) -> np.ndarray:
    """The codec's normalised latents (what the flow loss sees), flattened: (N, D)."""
    x = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return SynthCodec().encode(x).flatten(1).numpy()


def test_render_like_keeps_stated_attributes_with_fresh_nuisance() -> None:
    cfg = SynthConfig.from_params({**SMALL, "frames": 9, "height": 64, "width": 64})
    clip = plan(cfg)[0]
    row = {"id": clip.id, "caption": clip.caption, **{k: getattr(clip.spec, k) for k in STATED}}
    videos = render_like(row, 3, seed=4, cfg=cfg)
    assert [v.shape for v in videos] == [(9, 64, 64, 3)] * 3 and videos[0].dtype == np.uint8
    np.testing.assert_array_equal(np.stack(videos), np.stack(render_like(row, 3, seed=4, cfg=cfg)))  # by seed
    assert not np.array_equal(videos[0], render_like(row, 1, seed=5, cfg=cfg)[0])
    assert all(not np.array_equal(videos[i], videos[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    for v in videos:
        body = _figure_mask(v, clip.spec)
        assert body.sum() > 200 and _nearest_colour_share(v[body], clip.spec.colour) > 0.9
        corner = v[:, :4, :4].reshape(-1, 3).astype(int)  # background at the top left
        assert np.abs(corner - np.array(BACKGROUNDS[clip.spec.background][0])).max() < 8
    with pytest.raises(KeyError, match="lack.*speed"):
        render_like({k: v for k, v in row.items() if k != "speed"}, 1, 0, cfg)


def test_every_stated_attribute_moves_the_latent_more_than_nuisance() -> None:
    """Changing one stated attribute moves the latent (median over clips and values) at least 5x
    further than fresh nuisance does; measured ratios 6.6 (speed) to 24 (action)."""
    cfg = SynthConfig.from_params({**SMALL, "frames": 9, "height": 64, "width": 64})
    values = {"action": ACTIONS, "colour": list(COLOURS), "direction": DIRECTIONS, "speed": list(SPEEDS),
              "size": list(SIZES), "background": list(BACKGROUNDS)}
    ratios: dict[str, list[float]] = {k: [] for k in STATED}
    for clip in plan(cfg)[:8]:
        row = {k: getattr(clip.spec, k) for k in STATED}
        z = _latents(render_like(row, 2, 0, cfg))
        nuisance = float(((z[0] - z[1]) ** 2).mean())
        for k in STATED:
            other = next(v for v in values[k] if v != row[k])
            moved = _latents(render_like({**row, k: other}, 1, 0, cfg))[0]
            ratios[k].append(float(((z[0] - moved) ** 2).mean()) / nuisance)
    assert all(np.median(r) > 5 for r in ratios.values()), {k: np.median(r) for k, r in ratios.items()}


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
            assert coarse_caption_path(root, clip_id).read_text() == meta[clip_id]["coarse_caption"] + "\n"
            assert read_attributes(meta[clip_id]["caption"]) == {k: meta[clip_id][k] for k in STATED}
    first = (root / "meta.csv").read_text().splitlines()[0].split(",")
    assert first[:11] == ["id", "split", "action", "colour", "direction", "speed", "size", "background",
                          "template", "heldout", "caption"]  # the first world's columns, in order; added after
    assert {"coarse_caption", "seed"} <= set(first[11:])
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
