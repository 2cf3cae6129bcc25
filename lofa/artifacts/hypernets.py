"""The trained hypernetworks on disk: ``<stage>/model.safetensors`` + ``model.json``.

The training loop exports the pair at its end (:func:`lofa.train.train`); the sidecar's ``meta``
(:func:`hypernet_meta`) holds what rebuilds the model without params.yaml: the hypernetwork config,
the base DiT's vocabulary dimensions and the base model's hash. ``tensors_hash`` is the weights' hash
that every predicted LoRA's header records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lofa.artifacts.base import require
from lofa.config import from_dict, to_dict
from lofa.hypernet import HyperNet, HyperNetConfig
from lofa.io import ArtifactError, read_json
from lofa.layers import Vocabulary
from lofa.train import load_checkpoint_weights

#: A stage directory's files.
WEIGHTS, SIDECAR = "model.safetensors", "model.json"


def weights_file(stage_dir: str | Path) -> Path:
    """The exported weights of a stage directory (``model.safetensors``)."""
    return Path(stage_dir) / WEIGHTS


def hypernet_meta(cfg: HyperNetConfig, vocab: Vocabulary, base_hash: str) -> dict[str, Any]:
    """The sidecar's ``meta`` of a hypernetwork trained for ``vocab`` on base model ``base_hash``."""
    m0 = vocab[0]
    ffn = next((m.out_features for m in vocab if m.module == "ffn.0"), m0.in_features)
    return {"hypernet": to_dict(cfg), "base_model_hash": base_hash,
            "vocab": {"dim": m0.in_features, "ffn_dim": ffn, "num_layers": vocab.num_blocks,
                      "modules": list(vocab.modules)}}


def _read_meta(sidecar_path: Path) -> tuple[Any, dict[str, Any]]:
    """A sidecar and its ``meta`` ({} when it has none)."""
    sidecar = read_json(sidecar_path)
    meta = sidecar.get("meta") if isinstance(sidecar, dict) else None
    return sidecar, meta if isinstance(meta, dict) else {}


def load_hypernet(path: str | Path) -> HyperNet:
    """A trained hypernetwork from ``model.safetensors`` and its ``model.json`` sidecar (strict)."""
    path = Path(path)
    _, meta = _read_meta(path.with_suffix(".json"))
    if not {"hypernet", "vocab"} <= set(meta):
        raise ArtifactError(f"{path.with_suffix('.json')}: no 'meta.hypernet' and 'meta.vocab' "
                            "(not the sidecar of a hypernetwork export)")
    cfg = from_dict(HyperNetConfig, meta["hypernet"], f"{path.with_suffix('.json')}:meta.hypernet")
    vocab = Vocabulary.from_dims(**meta["vocab"])
    model = HyperNet(cfg, vocab)
    load_checkpoint_weights(path, model)
    return model.eval().requires_grad_(False)


def stage_meta(stage_dir: str | Path) -> dict[str, Any]:
    """A stage directory's hypernetwork config, base-model hash and weights hash, from its sidecar
    alone (no weights read)."""
    path = Path(stage_dir) / SIDECAR
    sidecar, meta = _read_meta(path)
    if "hypernet" not in meta:
        raise ArtifactError(f"{path}: no 'meta.hypernet' (not a hypernetwork export)")
    return {"config": meta["hypernet"], "base_model_hash": str(meta.get("base_model_hash", "")),
            "weights_hash": str(sidecar.get("tensors_hash", ""))}


def load_stage(stage_dir: str | Path, stage: int) -> tuple[HyperNet, str, str]:
    """(frozen hypernetwork, its base-model hash, its weights hash) from a stage directory."""
    weights = require(Path(stage_dir), f"stage-{'I' * stage} directory") / WEIGHTS
    require(weights, f"stage-{'I' * stage} weights")
    meta = stage_meta(stage_dir)
    model = load_hypernet(weights)
    if model.cfg.stage != stage:
        raise ArtifactError(f"{weights}: a stage-{model.cfg.stage} model where stage {stage} was expected")
    return model, meta["base_model_hash"], meta["weights_hash"]
