"""Tiny pipeline artifacts in the layout the stages write (data/base, data/stage1, data/stage2,
params.yaml, a preprocessed clip), for the predict / generate / refine tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from lofa.config import to_dict
from lofa.encoders.video import SynthCodec
from lofa.hypernet import HyperNetConfig
from lofa.hypertrain import build_hypernet
from lofa.io import SCHEMA_VERSION, save_tensors, tensors_hash, write_json
from lofa.layers import Vocabulary
from lofa.wan import WanDiTConfig, base_model_hash, build_dit

DIT = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=384)
RANK = 4
PARAMS = {
    "preprocess": {"profile": "synthetic", "num_frames": 5, "fps": 8.0, "height": 32, "width": 32,
                   "text_max_length": 16},
    "fit_loras": {"rank": RANK, "alpha": float(RANK), "steps": 8, "lr": 5e-3, "clips_per_batch": 1, "seed": 0},
}
CLIP_ID = "synth/wave/000001"
CAPTION = "a small red figure waves quickly"


def hypernet_config(stage: int, **kw: object) -> HyperNetConfig:
    extra = {"cross_stage1_after": (1,), "b_init_std": 0.05} if stage == 2 else {}
    return HyperNetConfig(d_model=32, num_heads=2, num_blocks=2, patch_size=32, rank=RANK, text_dim=384,
                          stage=stage, **{**extra, **kw})


def write_base(out: Path, cfg: WanDiTConfig = DIT, seed: int = 0) -> str:
    """``dit.safetensors`` + ``dit.json`` as ``pretrain_base`` writes them; returns the base hash."""
    torch.manual_seed(seed)
    dit = build_dit(cfg).eval()
    save_tensors(out / "dit.safetensors", dit.state_dict(), metadata={"format": "wan_video_dit"})
    h = base_model_hash(dit)
    write_json(out / "dit.json", {"config": to_dict(cfg), "base_model_hash": h, "step": 0,
                                  "schema_version": SCHEMA_VERSION})
    return h


def write_hypernet(out: Path, cfg: HyperNetConfig, base_hash: str, dit: WanDiTConfig = DIT, seed: int = 0) -> None:
    """``model.safetensors`` + ``model.json`` as the training loop exports them (random weights)."""
    vocab = Vocabulary.from_dit_config(dit)
    model = build_hypernet(cfg, vocab, seed)
    weights = model.state_dict()
    save_tensors(out / "model.safetensors", weights, {"schema_version": SCHEMA_VERSION, "step": 0})
    meta = {"hypernet": to_dict(cfg), "base_model_hash": base_hash,
            "vocab": {"dim": dit.dim, "ffn_dim": dit.dim, "num_layers": dit.num_layers,
                      "modules": list(vocab.modules)}}
    write_json(out / "model.json", {"schema_version": SCHEMA_VERSION, "kind": "lofa.train.model", "step": 0,
                                    "meta": meta, "tensors_hash": tensors_hash(weights)})


def write_clip(path: Path, encoder: object | None = None) -> Path:
    """A preprocessed clip (latents of a smooth moving pattern, MiniLM context), as ``preprocess`` writes it."""
    p = PARAMS["preprocess"]
    t = torch.linspace(0, 1, p["num_frames"])[:, None, None]
    y, x = torch.meshgrid(torch.linspace(-1, 1, p["height"]), torch.linspace(-1, 1, p["width"]), indexing="ij")
    video = torch.stack([torch.sin(3 * x + 4 * t), torch.cos(2 * y - 3 * t), 0.5 * torch.sin(x * y + t)])
    latents = SynthCodec().encode(0.8 * video[None])[0]
    if encoder is None:
        from lofa.encoders.text import MiniLMTextEncoder

        encoder = MiniLMTextEncoder(max_length=p["text_max_length"])
    emb = encoder.encode([CAPTION])
    head = {"id": CLIP_ID, "split": "test", "caption": CAPTION, "num_frames": p["num_frames"]}
    save_tensors(path, {"latents": latents, "context": emb.tokens[0], "mask": emb.mask[0]},
                 metadata={"lofa_clip": json.dumps(head), "format": "lofa.clip.v1"})
    return path


def write_artifacts(root: Path, use_stage1: bool = True) -> dict[str, Path]:
    """base/, stage1/, stage2/ and params.yaml under ``root``."""
    paths = {name: root / name for name in ("base", "stage1", "stage2")}
    h = write_base(paths["base"])
    write_hypernet(paths["stage1"], hypernet_config(1), h, seed=1)
    write_hypernet(paths["stage2"], hypernet_config(2, use_stage1=use_stage1), h, seed=2)
    paths["params"] = root / "params.yaml"
    paths["params"].write_text(yaml.safe_dump(PARAMS))
    return paths
