"""Configs, atomic safetensors I/O and the adapted-matrix vocabulary."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch

from lofa.config import ConfigError, from_dict, load_section
from lofa.io import ArtifactError, atomic_path, load_tensors, read_metadata, save_tensors, tensors_hash
from lofa.layers import ATTN_MODULES, AdaptedMatrix, Vocabulary


@dataclass(frozen=True)
class _Cfg:
    steps: int = 10
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    dims: tuple[int, ...] = (1, 2)


def test_config_types_and_unknown_keys(tmp_path: Path) -> None:
    cfg = from_dict(_Cfg, {"steps": 3, "lr": 1, "dims": [4, 5]})
    assert cfg == _Cfg(3, 1.0, "a", (4, 5)) and isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\]; valid keys are \['dims', 'lr', 'mode', 'steps'\]"):
        from_dict(_Cfg, {"stepz": 3})
    with pytest.raises(ConfigError, match="_Cfg.steps: expected an integer"):
        from_dict(_Cfg, {"steps": 2.5})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(_Cfg, {"steps": True})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(_Cfg, {"mode": "c"})
    (tmp_path / "p.yaml").write_text("train:\n  steps: 7\n")
    assert load_section(_Cfg, "train", tmp_path / "p.yaml").steps == 7
    with pytest.raises(ConfigError, match="missing section 'eval'"):
        load_section(_Cfg, "eval", tmp_path / "p.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_section(_Cfg, "train", tmp_path / "bad.yaml")


def test_safetensors_roundtrip_metadata_and_refusals(tmp_path: Path) -> None:
    t = {"a": torch.randn(3, 4), "m": torch.tensor([True, False])}
    save_tensors(tmp_path / "x.safetensors", t, metadata={"prompt": "héllo"})
    back = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and back["m"].dtype == torch.bool
    assert read_metadata(tmp_path / "x.safetensors") == {"prompt": "héllo"}
    assert tensors_hash(t) == tensors_hash(dict(reversed(list(t.items()))))
    save_tensors(tmp_path / "nan.safetensors", {"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ArtifactError, match="nan.safetensors: tensor 'a' contains NaN or inf"):
        load_tensors(tmp_path / "nan.safetensors")
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ArtifactError, match="evil.safetensors: not a valid safetensors file"):
        load_tensors(tmp_path / "evil.safetensors")
    with pytest.raises(ArtifactError, match="file not found"):
        load_tensors(tmp_path / "missing.safetensors")


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_vocabulary_from_config_shapes_and_keys() -> None:
    v = Vocabulary.from_dims(dim=96, ffn_dim=160, num_layers=3, modules=ATTN_MODULES + ("ffn.0", "ffn.2"))
    assert len(v) == 30 and v.num_blocks == 3
    m = v[8]
    assert m == AdaptedMatrix(0, "ffn.0", 160, 96) and m.type_index == 8
    assert m.lora_keys("export") == ("diffusion_model.blocks.0.ffn.0.lora_A.weight",
                                     "diffusion_model.blocks.0.ffn.0.lora_B.weight")
    assert v[1].lora_keys("diffsynth")[0] == "blocks.0.self_attn.k.lora_A.default.weight"
    shapes = v.lora_shapes(rank=4)
    assert shapes["diffusion_model.blocks.2.ffn.2.lora_A.weight"] == (4, 160)
    assert shapes["diffusion_model.blocks.2.ffn.2.lora_B.weight"] == (96, 4)
    assert v.num_lora_params(4) == 3 * (8 * 4 * 192 + 4 * 256 * 2)
    wan = Vocabulary.from_dit_config({"dim": 1536, "ffn_dim": 8960, "num_layers": 30})
    assert len(wan) == 240 and wan.num_lora_params(32) == 23_592_960
    peft = v.convert_keys({k: 0 for k in v.lora_keys("export")}, "export", "peft")
    assert set(peft) == set(v.lora_keys("peft"))
    with pytest.raises(KeyError, match="first: 'nope'"):
        v.convert_keys({"nope": 0}, "export", "peft")
    with pytest.raises(ValueError, match="unknown module 'ffn.1'"):
        Vocabulary.from_dims(8, 8, 1, modules=("ffn.1",))


def test_saved_safetensors_are_byte_identical_run_after_run(tmp_path):
    """safetensors writes metadata in hash-map order; save_tensors sorts it, so the same tensors and
    metadata give the same bytes (DVC sees an unchanged output after a rerun)."""
    from lofa.io import load_tensors, read_metadata, save_tensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    meta = {f"key{i}": f"value {i}" for i in range(12)} | {"prompt": "une silhouette bleue, 跳舞 🙂"}
    blobs = set()
    for i in range(6):
        order = dict(sorted(meta.items(), reverse=bool(i % 2)))
        save_tensors(tmp_path / f"{i}.safetensors", tensors, order)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    got = load_tensors(tmp_path / "0.safetensors")
    assert torch.equal(got["b"], tensors["b"]) and torch.equal(got["a"], tensors["a"])
    assert read_metadata(tmp_path / "0.safetensors") == meta
