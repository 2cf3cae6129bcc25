"""The judge on disk: ``<judge>/judge.safetensors`` + ``judge.json`` (its config, attributes in order,
training report and tensors hash). ``train_judge`` writes the pair; ``evaluate`` and ``lofa score`` read it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lofa.config import to_dict
from lofa.io import SCHEMA_VERSION, ArtifactError, load_tensors, read_json, save_tensors, tensors_hash, write_json
from lofa.judge import Judge, JudgeConfig

#: The judge directory's files, and the ``kind`` both carry.
WEIGHTS, SIDECAR, KIND = "judge.safetensors", "judge.json", "lofa.judge"


def save_judge(out_dir: str | Path, judge: Judge, cfg: JudgeConfig, report: Mapping[str, Any]) -> None:
    """``judge.safetensors`` then ``judge.json`` (config, attributes, report, tensors hash), atomically."""
    out_dir = Path(out_dir)
    weights = {k: v.detach().contiguous() for k, v in judge.state_dict().items()}
    save_tensors(out_dir / WEIGHTS, weights, {"schema_version": SCHEMA_VERSION, "kind": KIND})
    write_json(out_dir / SIDECAR, {"schema_version": SCHEMA_VERSION, "kind": KIND, "config": to_dict(cfg),
                                   "channels": int(judge.mean.numel()), "frames": judge.frames,
                                   "attributes": [[k, list(v)] for k, v in judge.attributes.items()],  # in order
                                   "report": dict(report), "tensors_hash": tensors_hash(weights)})


def load_judge(judge_dir: str | Path) -> Judge:
    """The judge of ``judge_dir`` (strict load; a missing or foreign file raises, naming it)."""
    side_path = Path(judge_dir) / SIDECAR
    side = read_json(side_path)
    if side.get("kind") != KIND or "attributes" not in side:
        raise ArtifactError(f"{side_path}: not a judge sidecar (kind {side.get('kind')!r})")
    weights = load_tensors(Path(judge_dir) / WEIGHTS)
    judge = Judge(int(side["channels"]), int(side["frames"]), dict(side["attributes"]), int(side["config"]["width"]))
    try:
        judge.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{Path(judge_dir) / WEIGHTS}: does not match {side_path} ({e})") from None
    return judge.eval().requires_grad_(False)
