"""The hypernetwork in the MLflow model registry: registered with its config and the
base model's hash, and loaded back (no pickle) it predicts the same LoRAs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from lofa.serving.predict import PredictError, Predictor
from lofa.lora import load_lora
from lofa.serving.registry import CHAMPION, RegisterConfig, load_predictor, promote, register_hypernet
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


def test_loaded_from_the_registry_predicts_the_same_loras(registered, tmp_path):
    art, version, _ = registered
    direct = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])
    uri = f"models:/lofa-hypernet-test/{version.version}"
    loaded = load_predictor(uri)
    for want, got in zip(direct.predict_batch(PROMPTS), loaded.predict_batch(PROMPTS)):
        for a, b in zip(want.A + want.B, got.A + got.B):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert any(float(b.abs().max()) > 0 for b in got.B)  # a real (non-zero) prediction
    # the pyfunc interface: a LoRA file per prompt (path, or its bytes), never the floats as JSON
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"out_dir": str(tmp_path)})
    assert list(out["prompt"]) == PROMPTS
    raw = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params={"output": "bytes"})["lora_safetensors"][0]
    (tmp_path / "from_bytes.safetensors").write_bytes(raw)
    for path, prompt in [*zip(out["lora_path"], PROMPTS), (tmp_path / "from_bytes.safetensors", PROMPTS[0])]:
        assert Path(path).parent == tmp_path
        got, want = load_lora(path, direct.vocab), direct.predict(prompt)
        assert got.metadata["prompt"] == prompt and got.metadata["base_model_hash"] == direct.base.hash
        # the file holds float32; a prompt predicted in a batch of two differs from it predicted alone by
        # float32 rounding of other matmul shapes (seen: 3e-8 on factors of ~1e-2), far below 1e-6
        for a, b in zip(want.A + want.B, got.A + got.B):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_model_has_signature_code_and_requirements(registered):
    _, version, _ = registered
    info = mlflow.models.get_model_info(f"models:/lofa-hypernet-test/{version.version}")
    sig = info.signature.to_dict()
    assert json.loads(sig["inputs"]) == [{"type": "string", "name": "prompt", "required": True}]
    assert {c["name"] for c in json.loads(sig["outputs"])} == {"prompt", "lora_path", "lora_safetensors"}
    assert {p["name"]: p["default"] for p in json.loads(sig["params"])} == {"output": "path", "out_dir": ""}
    root = Path(mlflow.artifacts.download_artifacts(f"models:/lofa-hypernet-test/{version.version}"))
    assert (root / "code" / "lofa" / "serving" / "predict.py").is_file()  # the project code travels with the model
    reqs = (root / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"torch", "diffsynth", "safetensors", "transformers"}, reqs
    assert all("==" in r for r in reqs), reqs  # pinned to the versions it was registered with


@pytest.mark.parametrize("bar, passes", [(-1e9, True), (1e9, False)])
def test_champion_alias_follows_the_bar(tmp_path, bar, passes):
    """A version whose evaluation passes the bar gets the alias; one that fails leaves it where it was."""
    art = write_artifacts(tmp_path)
    name = f"lofa-champion-test-{'pass' if passes else 'fail'}"
    cfg = RegisterConfig(name=name, champion_bar=bar)
    methods = {"predicted": {"gap_closed": 0.07, "gap_closed_lo": 0.056, "gap_closed_hi": 0.08}}
    client = mlflow.MlflowClient()
    with stage_run("evaluate", {}) as ml:
        first = register_hypernet(ml, art["stage2"], art["stage1"], art["params"], art["base"], name=name)
        client.set_registered_model_alias(name, CHAMPION, first.version)  # an earlier champion
        second = register_hypernet(ml, art["stage2"], art["stage1"], art["params"], art["base"], name=name)
        assert promote(client, second, methods, cfg) is passes
    want = second.version if passes else first.version
    assert client.get_model_version_by_alias(name, CHAMPION).version == want
    tags = client.get_model_version(name, second.version).tags
    assert tags["champion_passed"] == str(passes).lower() and tags["eval.predicted.gap_closed_lo"] == "0.056"
    with pytest.raises(KeyError, match="methods.naive.gap_closed_lo"):
        promote(client, second, methods, RegisterConfig(name=name, champion_method="naive"))


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
