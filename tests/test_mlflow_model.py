"""The MLflow pyfunc model (``lofa.serving.mlflow_model``) called directly, as MLflow calls it after loading.

test_registry.py loads it through the registry, where MLflow runs a copy of the file stored with the
model; this file runs the module itself on tiny artifacts: one file per prompt (a repeat overwrites
its own), the bytes output, and the refusals (an unknown output, another base model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from mlflow.pyfunc import PythonModelContext

from lofa.lora import load_lora
from lofa.serving.predict import PredictError, Predictor
from tiny_artifacts import write_artifacts

PROMPTS = ["a small red figure waves quickly", "the large figure in yellow claps while facing left"]


def _loaded(art: dict[str, Path], **config: str) -> object:
    """``load_context`` with the artifacts and model config ``register_hypernet`` stores. (Imported here:
    importing the module registers its model with MLflow, which warns, at collection otherwise.)"""
    from lofa.serving.mlflow_model import LoFAHypernet

    base_hash = json.loads((art["base"] / "dit.json").read_text())["base_model_hash"]
    model = LoFAHypernet()
    artifacts = {"stage1": str(art["stage1"]), "stage2": str(art["stage2"]), "params": str(art["params"])}
    model.load_context(PythonModelContext(artifacts, {"base_dir": str(art["base"]),
                                                      "base_model_hash": base_hash, **config}))
    return model


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_artifacts(tmp_path_factory.mktemp("pyfunc"))


def test_one_file_per_prompt_equal_to_the_predictor(art: dict[str, Path], tmp_path: Path) -> None:
    model = _loaded(art, out_dir=str(tmp_path / "default"))
    direct = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])
    out = model.predict(None, PROMPTS + PROMPTS[:1])  # a list; the repeated prompt names the same file
    assert list(out["prompt"]) == PROMPTS + PROMPTS[:1]
    paths = [Path(p) for p in out["lora_path"]]
    assert paths[0] == paths[2] != paths[1] and all(p.parent == tmp_path / "default" for p in paths)
    for path, prompt in zip(paths, PROMPTS):
        got, want = load_lora(path, direct.vocab), direct.predict(prompt)
        assert got.metadata["prompt"] == prompt
        # batch of three vs alone: float32 rounding of other matmul shapes, far below 1e-6 (test_registry)
        for a, b in zip(want.A + want.B, got.A + got.B):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_bytes_output_holds_the_same_lora_and_unknown_outputs_are_refused(art: dict[str, Path], tmp_path: Path) -> None:
    model = _loaded(art)
    written = model.predict(None, PROMPTS[:1], params={"out_dir": str(tmp_path)})["lora_path"][0]
    raw = model.predict(None, PROMPTS[:1], params={"output": "bytes"})["lora_safetensors"][0]
    (tmp_path / "from_bytes.safetensors").write_bytes(raw)
    vocab = model.predictor.vocab
    got, want = load_lora(tmp_path / "from_bytes.safetensors", vocab), load_lora(written, vocab)
    assert got.metadata["prompt"] == PROMPTS[0]
    for a, b in zip(want.A + want.B, got.A + got.B):  # the same one-prompt batch: the same floats
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(PredictError, match=re.escape("output='json': use one of ['path', 'bytes']")):
        model.predict(None, PROMPTS[:1], params={"output": "json"})


def test_another_base_model_hash_is_refused(art: dict[str, Path]) -> None:
    with pytest.raises(PredictError, match="was registered for 0000"):
        _loaded(art, base_model_hash="0000")
