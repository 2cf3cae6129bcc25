"""Prompt -> LoRA file (lofa.serving.predict) on tiny artifacts: the file loads in DiffSynth, diffusers and
ComfyUI's key convention with the predicted numbers, mismatches are refused, the matrix-token
cache and batching change nothing, generation is deterministic and the LoRA matters."""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

import lofa
from lofa import fit
from lofa.hypernet import MatrixGroup, group_by_shape
from lofa.io import load_tensors, read_metadata, save_tensors
from lofa.lora import LoRAFormatError, base_weights
from lofa.objectives import predicted_lora
from lofa.artifacts.loras import load_user_lora
from lofa.serving.predict import (PredictError, Predictor, codec_for, generate_video, load_preprocess, text_bucket,
                                  write_videos)
from lofa.wan import dit_forward
from tiny_artifacts import DIT, RANK, hypernet_config, write_artifacts, write_base, write_clip, write_hypernet

PROMPTS = ["a small red figure waves quickly", "the large figure in yellow claps while facing left",
           "une petite silhouette bleue saute, façon 跳舞 🙂"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return write_artifacts(tmp_path_factory.mktemp("art"))


@pytest.fixture(scope="module")
def predictor(art) -> Predictor:
    return Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])


@pytest.fixture(scope="module")
def saved(predictor, tmp_path_factory):
    pred = predictor.predict(PROMPTS[0])
    return pred, predictor.save(pred, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(b, 16, 2, 8, 8, generator=g), torch.tensor([200.0, 700.0][:b]),
            torch.randn(b, 16, DIT.text_dim, generator=g))


def test_file_fuses_in_diffsynth_like_the_in_memory_prediction(predictor, saved):
    from diffsynth.utils.lora import GeneralLoRALoader

    pred, path = saved
    assert max(float(b.abs().max()) for b in pred.B) > 1e-3  # a non-zero B (perturbed stage-II head)
    dit = predictor.base.dit
    fused = copy.deepcopy(dit)
    GeneralLoRALoader().fuse_lora_to_base_model(fused, load_tensors(path), alpha=1.0)
    x, t, c = _inputs()
    with torch.no_grad():
        plain = dit_forward(dit, x, t, c)
        want = dit_forward(dit, x, t, c, lora=pred.to_weights())  # lofa.lora.apply_lora per block
        got = dit_forward(fused, x, t, c)
    assert (want - plain).abs().mean() > 1e-3 * plain.abs().mean()  # the LoRA changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_header_holds_prompt_base_hash_rank_and_producer(predictor, saved):
    pred, path = saved
    meta = read_metadata(path)
    assert meta["prompt"] == PROMPTS[0]
    assert meta["base_model_hash"] == predictor.base.hash
    assert meta["rank"] == str(RANK) and meta["producer"] == f"lofa {lofa.__version__}"
    assert meta["hypernet_hash"] and float(meta["predict_seconds"]) == pytest.approx(pred.seconds, abs=1e-5)
    keys = set(load_tensors(path))
    assert len(keys) == 2 * len(pred.vocab) == 2 * 8 * DIT.num_layers
    assert all(re.fullmatch(r"diffusion_model\.blocks\.\d+\.(self|cross)_attn\.[qkvo]\.lora_[AB]\.weight", k)
               for k in keys)


def test_keys_pass_diffusers_wan_conversion_and_comfyui_prefix(predictor, saved):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    pred, path = saved
    converted = WanLoraLoaderMixin.lora_state_dict(str(path), use_safetensors=True)
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    want = {}
    for m, a, b in zip(pred.vocab, pred.A, pred.B):
        attn, proj = m.module.split(".")
        target = f"blocks.{m.block}.{'attn1' if attn == 'self_attn' else 'attn2'}.{names[proj]}"
        want[target] = b @ a
    assert set(converted) == {f"transformer.{t}.lora_{x}.weight" for t in want for x in "AB"}
    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=DIT.num_heads, attention_head_dim=DIT.dim // DIT.num_heads,
                                  text_dim=DIT.text_dim, ffn_dim=DIT.ffn_dim, num_layers=DIT.num_layers)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="lofa")
    for target, delta in want.items():
        layer = model.get_submodule(target)
        got = layer.lora_B["lofa"].weight @ layer.lora_A["lofa"].weight * layer.scaling["lofa"]
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-7)
    # ComfyUI (comfy/lora.py, model_lora_keys_unet): "diffusion_model." + a weight's name minus ".weight"
    comfy = {f"diffusion_model.{k[:-len('.weight')]}" for k in predictor.base.dit.state_dict() if k.endswith(".weight")}
    lora_layers = {k.rsplit(".lora_", 1)[0] for k in load_tensors(path)}
    assert lora_layers <= comfy and len(lora_layers) == len(pred.vocab)


def test_mismatched_files_are_refused_naming_the_first_mismatch(predictor, saved, tmp_path):
    _, path = saved
    good = load_tensors(path)
    k = "diffusion_model.blocks.0.self_attn.k.lora_A.weight"
    cases = [({n: v for n, v in good.items() if n != k}, f"missing key '{re.escape(k)}'"),
             ({**good, k: torch.zeros(RANK, DIT.dim + 1)}, f"'{re.escape(k)}' has shape \\(4, 65\\)"),
             ({**good, "diffusion_model.blocks.2.self_attn.q.lora_A.weight": good[k].clone()},
              r"unexpected key 'diffusion_model\.blocks\.2\.self_attn\.q\.lora_A\.weight'")]
    for i, (tensors, pattern) in enumerate(cases):
        bad = tmp_path / f"bad{i}.safetensors"
        save_tensors(bad, tensors)
        with pytest.raises(LoRAFormatError, match=f"{re.escape(str(bad))}: {pattern}"):
            load_user_lora(bad, predictor.base)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAFormatError, match="junk.safetensors: not a valid safetensors"):
        load_user_lora(tmp_path / "junk.safetensors", predictor.base)
    other = dataclasses.replace(predictor.base, hash="0123")
    with pytest.warns(UserWarning, match="made for base model .* applied to 0123"):
        assert load_user_lora(path, other).rank == RANK


def test_cache_and_batching_match_an_uncached_forward(predictor):
    calls = []
    for model in (predictor.stage1, predictor.stage2):  # spy on the embedding (the real method runs)
        real = model._embed
        model._embed = lambda g, real=real: calls.append(1) or real(g)
    try:
        batch = predictor.predict_batch(PROMPTS)
        single = [predictor.predict(p) for p in PROMPTS]
    finally:
        for model in (predictor.stage1, predictor.stage2):
            del model._embed
    assert calls == []  # the matrix tokens were embedded once, at construction
    vocab = predictor.vocab
    W = [w.detach().float() for w in base_weights(predictor.base.dit, vocab)]
    mids = torch.arange(len(vocab)).repeat(len(PROMPTS))
    pids = torch.arange(len(PROMPTS)).repeat_interleave(len(vocab))
    groups = [MatrixGroup(torch.stack([W[j] for j in mids[pos].tolist()]), mids[pos], pids[pos])
              for _, pos in group_by_shape(vocab, mids, pids)]
    emb = predictor.encoder.encode(PROMPTS)
    with torch.no_grad():
        tokens = [o.tokens for o in predictor.stage1(groups, emb.tokens, emb.mask)]
        ref = predicted_lora(vocab, groups, predictor.stage2(groups, emb.tokens, emb.mask, tokens), len(PROMPTS))
    for k, (b, s) in enumerate(zip(batch, single)):
        assert b.prompt == s.prompt == PROMPTS[k]
        for j in range(len(vocab)):
            torch.testing.assert_close(b.A[j], ref.A[j][k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.B[j], ref.B[j][k], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s.B[j], b.B[j], rtol=1e-5, atol=1e-7)
    assert not torch.equal(batch[0].B[0], batch[1].B[0])  # the prompt matters


def test_bfloat16_predictor_runs_bf16_weights_close_to_float32(art, predictor):
    """dtype="bfloat16" casts the hypernetworks once (no autocast: no per-call weight casts) and
    predicts what the fp32 predictor does, to bf16's precision, one prompt or several."""
    p16 = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"], dtype="bfloat16")
    assert {p.dtype for m in (p16.stage1, p16.stage2) for p in m.parameters()} == {torch.bfloat16}
    assert {e.tokens.dtype for es in p16._embedded.values() for e in es} == {torch.bfloat16}
    single, batch = p16.predict(PROMPTS[1]), p16.predict_batch(PROMPTS[:2])[1]
    ref = predictor.predict(PROMPTS[1])
    for got in (single, batch):
        assert all(a.dtype == torch.float32 for a in (*got.A, *got.B))
        d = torch.stack([b @ a for a, b in zip(got.A, got.B)])
        d_ref = torch.stack([b @ a for a, b in zip(ref.A, ref.B)])
        err = float((d - d_ref).norm() / d_ref.norm())
        assert 0 < err < 0.03, err  # bf16 rounding, not another computation


class _WordText:
    """A TextEncoder without weights (the GPU machines lack MiniLM's): a seeded vector per word."""

    def __init__(self, dim: int, max_length: int, device: str):
        self.dim, self.max_length, self.device = dim, max_length, device

    def encode(self, captions):
        import zlib

        from lofa.encoders.text import TextEmbedding

        tokens = torch.zeros(len(captions), self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for i, c in enumerate(captions):
            for j, w in enumerate(c.split()[: self.max_length]):
                tokens[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
                mask[i, j] = True
        return TextEmbedding(tokens.to(self.device), mask.to(self.device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_predictions_are_the_callers_own(art, dtype):
    """On a GPU the one-prompt path replays a captured graph whose outputs the next call overwrites:
    a returned prediction must not change with later calls, and matches the CPU predictor."""
    from lofa.artifacts.base import load_base
    from lofa.artifacts.hypernets import load_stage

    def make(device: str, dtype: str) -> Predictor:
        s1, s2 = load_stage(art["stage1"], 1)[0], load_stage(art["stage2"], 2)[0]
        return Predictor(load_base(art["base"], device), s2, s1, _WordText(s2.cfg.text_dim, 16, device),
                         dtype=dtype)

    p = make("cuda", dtype)
    first = p.predict(PROMPTS[0])
    kept = [t.clone() for t in (*first.A, *first.B)]
    p.predict(PROMPTS[2])
    p.predict(" ".join(PROMPTS[0].split()[:3]))
    assert all(torch.equal(a, b) for a, b in zip((*first.A, *first.B), kept))
    assert p._graphs and all(g.graph is not None for g in p._graphs.values())
    ref = make("cpu", "float32").predict(PROMPTS[0])
    got, want = torch.cat([b.cpu().flatten() for b in first.B]), torch.cat([b.flatten() for b in ref.B])
    assert float(want.norm()) > 0
    assert float((got - want).norm() / want.norm()) < (1e-3 if dtype == "float32" else 3e-2)


def test_text_buckets():
    assert [text_bucket(n, 512) for n in (1, 20, 64, 65, 128, 129, 300, 512)] == [64, 64, 64, 128, 128, 256, 512, 512]
    assert text_bucket(10, 16) == text_bucket(16, 16) == 16 and text_bucket(600, 1024) == 600
    for n, m in ((0, 16), (17, 16)):
        with pytest.raises(ValueError, match="not in"):
            text_bucket(n, m)


def test_prompts_of_any_length_share_the_graph_of_their_bucket(art, predictor):
    """One-prompt predictions pad the trimmed text to its bucket and mask the padding: prompts of
    different lengths share one graph (and one compile), and each predicts what the model's own
    forward does on its unpadded text (test_cache_and_batching_match_an_uncached_forward)."""
    p = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])
    short = ["a figure waves", "a small red figure waves quickly", "the tall figure jumps high"]
    lengths = [int(p.encoder.encode([q]).mask.sum()) for q in short]
    assert len(set(lengths)) == 3 and max(lengths) < 16  # the encoder's max_length: every one padded
    got = [p.predict(q) for q in short]
    assert list(p._graphs) == [(16, True)]
    ref = predictor.predict(short[1])  # a predictor whose graphs saw other lengths first
    for a, b in zip(got[1].B, ref.B):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    long = "the large figure in yellow claps both hands above its head, then turns around slowly and bows"
    assert int(p.encoder.encode([long]).mask.sum()) == 16
    p.predict(long)  # truncated to the full 16 tokens: no padding, no mask
    assert list(p._graphs) == [(16, True), (16, False)]


def test_prompt_checks_truncation_and_non_ascii(predictor):
    for bad, pattern in (("", "the prompt is empty"), ("  \n", "the prompt is empty"),
                         ([PROMPTS[0], " "], "prompt 2 of 2 is empty"), ([], "no prompt given")):
        with pytest.raises(PredictError, match=pattern):
            predictor.predict_batch([bad] if isinstance(bad, str) else bad)
    long = " ".join(["a tall figure waves"] * 200)
    assert predictor.encoder.encode([long]).mask.sum() == predictor.encoder.max_length  # truncated
    head = " ".join(long.split()[:40])  # the same first tokens: the same truncated prompt
    torch.testing.assert_close(predictor.predict(long).B[3], predictor.predict(head).B[3])
    pred = predictor.predict(PROMPTS[2])
    assert all(torch.isfinite(b).all() for b in pred.B)


def test_artifact_mismatches_are_refused(art, tmp_path):
    write_base(tmp_path / "other", seed=7)  # same shapes, other weights
    with pytest.raises(PredictError, match=r"stage2 was trained on base model \w+; .*other holds \w+"):
        Predictor.from_dirs(tmp_path / "other", art["stage1"], art["stage2"], art["params"])
    with pytest.raises(lofa.io.ArtifactError, match=r"missing/stage1: stage-I directory not found"):
        Predictor.from_dirs(art["base"], tmp_path / "missing/stage1", art["stage2"], art["params"])
    wide = tmp_path / "wide"
    write_hypernet(wide, hypernet_config(2, use_stage1=False), "", dit=type(DIT)(**{**DIT.__dict__, "num_layers": 3}))
    with pytest.raises(PredictError, match=r"matrix 16 is AdaptedMatrix\(block=2.* None in the base model"):
        Predictor.from_dirs(art["base"], None, wide, art["params"])


def test_ablation_without_stage1(art, tmp_path):
    naive = tmp_path / "naive"
    write_hypernet(naive, hypernet_config(2, use_stage1=False), "", seed=3)
    p = Predictor.from_dirs(art["base"], None, naive, art["params"])
    assert p.stage1 is None and p.predict(PROMPTS[0]).rank == RANK


def test_generate_is_deterministic_and_the_lora_matters(predictor, art, tmp_path):
    pre = load_preprocess(art["params"])
    codec = codec_for(pre)
    context = predictor.encoder.encode([PROMPTS[0]]).tokens
    lora = predictor.predict(PROMPTS[0]).to_weights()
    kw = dict(frames=pre.num_frames, height=pre.height, width=pre.width, steps=4, guidance=3.0)
    lat, video = generate_video(predictor.base, codec, context, lora=lora, seed=3, **kw)
    assert lat.shape == (1, 16, 2, 4, 4) and video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    _, again = generate_video(predictor.base, codec, context, lora=lora, seed=3, **kw)
    _, other_seed = generate_video(predictor.base, codec, context, lora=lora, seed=4, **kw)
    plain_lat, _ = generate_video(predictor.base, codec, context, lora=None, seed=3, **kw)
    assert np.array_equal(video, again) and not np.array_equal(video, other_seed)
    assert (lat - plain_lat).abs().mean() > 1e-3 * plain_lat.abs().mean()
    paths = write_videos(tmp_path / "v.mp4", video, fps=pre.fps, upscale=2)
    import imageio.v3 as iio

    for p in paths:
        frames = iio.imread(p, index=None)
        assert frames.shape[:3] == (5, 64, 64), p
    with pytest.raises(PredictError, match="frames must be 4k\\+1"):
        generate_video(predictor.base, codec, context, frames=6, height=32, width=32)
    with pytest.raises(PredictError, match="must end in .mp4 or .gif"):
        write_videos(tmp_path / "v.avi", video, fps=8)


def test_refine_from_a_prediction_and_from_zero(predictor, tmp_path):
    from lofa.refine import load_clip_file, refine

    dit = predictor.base.dit
    _, _, latents, context = load_clip_file(write_clip(tmp_path / "clip.safetensors", predictor.encoder))
    lat, ctx = latents[None], context[None]
    cfg = fit.FitConfig(rank=RANK, alpha=2.0 * RANK, steps=4, lr=5e-3, eval_points=2)
    start = predictor.predict(PROMPTS[0]).to_weights()
    # fit_batch is prefix-consistent from a given start: the 2-step run is the 4-step run's start
    runs = [fit.fit_batch(dit, start.vocab, lat, ctx, dataclasses.replace(cfg, steps=n), [11], init=start)
            for n in (2, 4)]
    torch.testing.assert_close(runs[0].losses, runs[1].losses[:, :2])
    fresh = fit.fit_batch(dit, start.vocab, lat, ctx, cfg, [11])  # the clip's fit from zero: the oracle
    lora, report = refine(dit, start, lat, ctx, cfg, 11, clip_id="c", oracle=fresh.lora)
    assert report.eval_steps == [0, 1, 2, 4] and len(report.refined.losses) == 4
    assert report.refined.eval_losses[0] == pytest.approx(float(fit.eval_loss(dit, lat, ctx, [11], cfg, start)[0]))
    assert report.refined.eval_losses[2] == pytest.approx(float(runs[0].final_loss[0]))
    assert report.fresh.eval_losses[0] == pytest.approx(report.base_loss)  # B = 0 at a fresh start
    assert report.fresh.eval_losses[-1] == pytest.approx(report.oracle_loss)  # the same fit, reproduced
    assert report.fresh_steps_to_oracle in (1, 2, 4) and report.refined.losses != report.fresh.losses
    A0, B0 = start.factors(0)
    A1, B1 = lora.factors(0)
    assert all((b1 @ a1 - b0 @ a0).abs().max() > 0 for a0, b0, a1, b1 in zip(A0, B0, A1, B1))
    _, again = refine(dit, start, lat, ctx, cfg, 11, oracle=start, eval_steps=[2])
    assert again.eval_steps == [0, 2, 4] and again.steps_to_oracle == 0  # it starts at its own loss

