"""The hypernetwork in the MLflow model registry: registered with its config and the
base model's hash, and loaded back (no pickle) it predicts the same LoRAs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from lofa.predict import PredictError, Predictor
from lofa.registry import load_predictor, register_hypernet
from lofa.tracking import stage_run
from tiny_artifacts import write_artifacts, write_base

PROMPTS = ["a small red figure waves quickly", "the large figure in yellow claps while facing left"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    art = write_artifacts(tmp_path_factory.mktemp("reg"))
    with stage_run("train_stage2", {}) as ml:
        version = register_hypernet(ml, art["stage2"], art["stage1"], art["params"], art["base"],
                                    name="lofa-hypernet-test")
        run_id = ml.active_run().info.run_id
    return art, version, run_id


def test_registered_with_config_and_base_hash(registered):
    art, version, run_id = registered
    base_hash = json.loads((art["base"] / "dit.json").read_text())["base_model_hash"]
    stage2 = json.loads((art["stage2"] / "model.json").read_text())
    assert version.run_id == run_id and version.name == "lofa-hypernet-test"
    assert version.tags["base_model_hash"] == base_hash == stage2["meta"]["base_model_hash"]
    assert json.loads(version.tags["stage2_config"]) == stage2["meta"]["hypernet"]
    assert json.loads(version.tags["stage1_config"])["stage"] == 1
    assert version.tags["stage2_weights_hash"] == stage2["tensors_hash"]
    assert base_hash in version.description
    # the stored model is code + safetensors + JSON, no pickle
    root = Path(mlflow.artifacts.download_artifacts(f"models:/lofa-hypernet-test/{version.version}"))
    files = [p.name for p in root.rglob("*") if p.is_file()]
    assert files.count("model.safetensors") == 2 and "mlflow_model.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".bin", ".cloudpickle"))]


def test_loaded_from_the_registry_predicts_the_same_loras(registered):
    art, version, _ = registered
    direct = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])
    uri = f"models:/lofa-hypernet-test/{version.version}"
    loaded = load_predictor(uri)
    for want, got in zip(direct.predict_batch(PROMPTS), loaded.predict_batch(PROMPTS)):
        for a, b in zip(want.A + want.B, got.A + got.B):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert any(float(b.abs().max()) > 0 for b in got.B)  # a real (non-zero) prediction
    # the pyfunc interface gives the same factors under the export keys
    out = mlflow.pyfunc.load_model(uri).predict(PROMPTS[:1])
    pred = direct.predict(PROMPTS[0])
    m0 = pred.vocab[0]
    down, up = m0.lora_keys("export")
    np.testing.assert_array_equal(out[0][down], pred.A[0].numpy())
    np.testing.assert_array_equal(out[0][up], pred.B[0].numpy())
    assert len(out[0]) == 2 * len(pred.vocab)


def test_loading_with_another_base_model_is_refused(registered, tmp_path):
    _, version, _ = registered
    other = tmp_path / "other_base"
    write_base(other, seed=7)
    with pytest.raises(PredictError, match="base model"):
        load_predictor(f"models:/lofa-hypernet-test/{version.version}", base_dir=other)


def test_registry_survives_the_moved_stage_dirs(registered, tmp_path):
    """The registered copy is self-contained: deleting the stage directories does not break it."""
    art, version, _ = registered
    moved = tmp_path / "gone"
    shutil.move(str(art["stage2"]), moved)
    try:
        pred = load_predictor(f"models:/lofa-hypernet-test/{version.version}").predict(PROMPTS[0])
        assert len(pred.A) == len(pred.vocab)
    finally:
        shutil.move(str(moved), art["stage2"])
