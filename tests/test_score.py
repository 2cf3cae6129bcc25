"""Scoring (``lofa.score``, ``lofa score``): bootstrap intervals on cases with known answers, fixed
per-clip noise, and the command on tiny artifacts (base = zero LoRA, a fitted LoRA scores lower)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lofa import fit
from lofa.artifacts.base import load_base
from lofa.artifacts.loras import lora_path
from lofa.cli import main
from lofa.config import from_dict
from lofa.io import load_tensors, save_tensors
from lofa.lora import LoRAWeights, save_lora
from lofa.score import ScoreConfig, bootstrap_gap, flow_losses
from tiny_artifacts import CAPTION, CLIP_ID, DIT, PARAMS, RANK, write_artifacts, write_clip


def test_bootstrap_gap_is_exact_when_every_clip_closes_the_same_share():
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 2.0, 50)
    oracle = base - rng.uniform(0.1, 0.5, 50)
    method = base - 0.3 * (base - oracle)  # every clip, hence every resample, closes 30% of its gap
    gap, lo, hi = bootstrap_gap(base, method, oracle, resamples=500, seed=1)
    assert (gap, lo, hi) == pytest.approx((0.3, 0.3, 0.3), abs=1e-12)
    assert bootstrap_gap(base, base, oracle)[:3] == (0.0, 0.0, 0.0)
    assert bootstrap_gap(base, oracle, oracle)[1:] == pytest.approx((1.0, 1.0), abs=1e-12)


def test_bootstrap_interval_matches_the_binomial_quantiles():
    """base - oracle = 1 on every clip; half the clips are fully closed, half not at all: the gap of a
    resample is a Binomial(400, 1/2) / 400 draw, whose 2.5% / 97.5% quantiles are 180/400 and 220/400."""
    n = 400
    base, oracle = np.full(n, 2.0), np.full(n, 1.0)
    method = np.where(np.arange(n) % 2 == 0, 1.0, 2.0)
    gap, lo, hi = bootstrap_gap(base, method, oracle, resamples=4000, seed=0)
    assert gap == 0.5
    # the binomial's quantiles are 0.451 and 0.549 (0.5 -/+ 1.96 * 0.025); a 4000-resample percentile lands
    # within a few 1/400 steps of them (Monte Carlo error of a 2.5% quantile: about 0.002 here)
    assert lo == pytest.approx(0.451, abs=0.006) and hi == pytest.approx(0.549, abs=0.006)
    assert bootstrap_gap(base, method, oracle, resamples=4000, seed=0) == (gap, lo, hi)  # seeded


def test_a_clip_scores_the_same_alone_and_in_any_batch(tmp_path):
    base = load_base(write_artifacts(tmp_path)["base"]).dit
    g = torch.Generator().manual_seed(0)
    lat, ctx = torch.randn((5, 16, 2, 4, 4), generator=g), torch.randn((5, 7, DIT.text_dim), generator=g)
    ids = [f"clip{i}" for i in range(5)]
    cfg = ScoreConfig(eval_points=3, batch=2)
    together = flow_losses(base, lat, ctx, ids, None, cfg)
    alone = torch.stack([flow_losses(base, lat[i:i + 1], ctx[i:i + 1], ids[i:i + 1], None, cfg)[0] for i in (4, 0)])
    torch.testing.assert_close(alone, together[[4, 0]], rtol=1e-5, atol=1e-6)  # batched matmuls: rounding only
    assert not torch.allclose(flow_losses(base, lat, ctx, ids, None, ScoreConfig(eval_points=3, seed=1)), together)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    art = write_artifacts(tmp)
    clip = write_clip(tmp / "clip.safetensors")
    base = load_base(art["base"])
    cfg = from_dict(fit.FitConfig, {**PARAMS["fit_loras"], "steps": 30})
    fit.fit_shard(base.dit, [fit.ClipRecord(CLIP_ID, str(clip), CAPTION)], tmp / "fit", cfg, progress=False)
    vocab = base.vocabulary()
    zero = tmp / "zero.safetensors"
    save_lora(zero, [torch.randn(RANK, m.in_features) for m in vocab], [torch.zeros(m.out_features, RANK) for m in vocab],
              vocab, {"prompt": CAPTION, "base_model_hash": base.hash})
    return {"art": art, "clip": clip, "zero": zero, "fitted": lora_path(tmp / "fit", CLIP_ID), "tmp": tmp}


def test_lofa_score_base_equals_a_zero_lora_and_the_fitted_lora_scores_lower(scored, capsys):
    s, out = scored, scored["tmp"] / "score.json"
    assert main(["score", str(s["zero"]), str(s["fitted"]), "--clips", str(s["clip"]), "--base", str(s["art"]["base"]),
                 "--params", str(s["art"]["params"]), "-o", str(out)]) == 0
    assert "scored 1 clip(s)" in capsys.readouterr().out
    r = json.loads(out.read_text())
    losses = {k: v["fm_loss"] for k, v in r["loras"].items()}
    assert r["clips"] == [CLIP_ID] and list(losses) == ["base", str(s["zero"]), str(s["fitted"])]
    assert losses[str(s["zero"])] == losses["base"]  # B = 0 adds exact zeros to every adapted linear
    assert losses[str(s["fitted"])] < 0.97 * losses["base"]  # 30 steps on this clip: measured 0.92x
    assert r["loras"]["base"]["per_clip"][CLIP_ID] == losses["base"]


def test_lofa_score_names_the_bad_lora_file_and_key(scored, tmp_path, capsys):
    t = load_tensors(scored["fitted"])
    key = sorted(t)[0]
    del t[key]
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, t)
    with pytest.raises(SystemExit) as e:
        main(["score", str(bad), "--clips", str(scored["clip"]), "--base", str(scored["art"]["base"]),
              "--params", str(scored["art"]["params"])])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert str(bad) in err and key in err
    with pytest.raises(SystemExit) as e:  # no clips: a usage error before any model loads
        main(["score", str(scored["fitted"]), "--base", str(scored["art"]["base"]), "--params", str(scored["art"]["params"])])
    assert e.value.code == 2 and "no clips" in capsys.readouterr().err


def test_guidance_runs_the_lora_in_the_conditional_branch_only_unless_asked(tmp_path):
    from lofa.sampling import sample
    from lofa.wan import dit_forward

    base = load_base(write_artifacts(tmp_path)["base"])
    vocab, g = base.vocabulary(), torch.Generator().manual_seed(0)
    lora = LoRAWeights.from_factors(vocab, [0.3 * torch.randn((RANK, m.in_features), generator=g) for m in vocab],
                                    [0.3 * torch.randn((m.out_features, RANK), generator=g) for m in vocab])
    noise, ctx = torch.randn((2, 16, 2, 4, 4), generator=g), torch.randn((2, 5, DIT.text_dim), generator=g)
    t = torch.full((2,), 1000.0)
    cond = dit_forward(base.dit, noise, t, ctx, lora=lora)
    for uncond_lora in (False, True):
        unc = dit_forward(base.dit, noise, t, torch.zeros_like(ctx), lora=lora if uncond_lora else None)
        want = noise - (unc + 3.0 * (cond - unc))  # one Euler step from sigma 1 to 0
        got = sample(base.dit, ctx, (16, 2, 4, 4), steps=1, guidance=3.0, noise=noise, lora=lora,
                     lora_uncond=uncond_lora)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # batched (doubled) forward: rounding only
