"""The judge (``lofa.judge``): trained on rendered clips only, it recognises fresh renders'
attributes; its artifact round-trips; evaluation labels outside its values are refused."""

from __future__ import annotations

import pytest
import torch

from lofa.artifacts.judge import load_judge, save_judge
from lofa.data.preprocess import PreprocessConfig, codec_for
from lofa.data.synthetic import STATED, SynthConfig
from lofa.io import ArtifactError, write_json
from lofa.judge import JudgeConfig, accuracy, attribute_values, build_judge, label_indices, predict, rendered_set

SYNTH = SynthConfig.from_params({"preset": "default", "frames": 9, "height": 32, "width": 32})
PRE = PreprocessConfig(num_frames=9, height=32, width=32)
TINY = JudgeConfig(clips=600, val_clips=200, steps=150, width=24, batch_size=32)


@pytest.fixture(scope="module")
def judged():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    judge, report = build_judge(TINY, SYNTH, PRE, codec_for(PRE))
    torch.set_num_threads(threads)
    return judge, report


def test_judge_predicts_every_stated_attribute_of_fresh_renders(judged):
    judge, report = judged
    assert list(judge.attributes) == list(STATED) == list(attribute_values())
    acc = report["render_val"]
    assert set(acc) == {f"{a}_acc" for a in STATED} | {"all_acc"}
    # 600 clips x 150 steps (about 20 s): the static attributes are learned already (measured colour 0.975,
    # size 0.97, background 0.995 on 200 fresh renders), motion only begins (action 0.40 against a chance of 0.1)
    for a in ("colour", "size", "background"):
        assert acc[f"{a}_acc"] >= 0.85, acc
    assert acc["action_acc"] >= 2 / len(attribute_values()["action"]), acc
    assert report["latent_shape"] == [16, 3, 4, 4]


def test_judge_round_trips_and_refuses_a_foreign_sidecar(judged, tmp_path):
    judge, report = judged
    save_judge(tmp_path / "j", judge, TINY, report)
    again = load_judge(tmp_path / "j")
    lat, labels = rendered_set(20, 7, SYNTH, PRE, codec_for(PRE))
    assert all(torch.equal(a, b) for a, b in zip(predict(judge, lat).values(), predict(again, lat).values()))
    assert accuracy(again, lat, labels) == accuracy(judge, lat, labels)
    write_json(tmp_path / "x" / "judge.json", {"kind": "something else"})
    with pytest.raises(ArtifactError, match="x/judge.json: not a judge sidecar"):
        load_judge(tmp_path / "x")


def test_labels_outside_the_judges_values_are_refused():
    rows = [{a: v[0] for a, v in attribute_values().items()}, {**{a: v[0] for a, v in attribute_values().items()},
                                                                "colour": "mauve"}]
    with pytest.raises(ValueError, match="'colour': values \\['mauve'\\]"):
        label_indices(rows, attribute_values())
    assert set(label_indices(rows[:1], attribute_values())) == set(STATED)
