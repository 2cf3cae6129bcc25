"""The LoFA hypernetwork: shapes from the vocabulary, zero-B init, text K/V once per
prompt, checkpointing gradients, fp32 weights under autocast, the stage-I ablation."""

from __future__ import annotations

import copy

import pytest
import torch

from lofa.config import ConfigError, from_dict
from lofa.hypernet import HyperNet, HyperNetConfig, MatrixGroup, group_by_shape
from lofa.layers import Vocabulary

TINY = dict(d_model=32, num_heads=4, num_blocks=2, patch_size=8, rank=4, text_dim=24, cross_stage1_after=(0, 1))
VOCAB = Vocabulary.from_dims(32, 48, 2)  # 16 square matrices of 32x32


def _cfg(**kw) -> HyperNetConfig:
    return HyperNetConfig(**{**TINY, **kw})


def _weights(vocab: Vocabulary, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(m.out_features, m.in_features, generator=g) for m in vocab]


def _groups(vocab, weights, mids, pids) -> list[MatrixGroup]:
    mids, pids = torch.as_tensor(mids), torch.as_tensor(pids)
    return [MatrixGroup(torch.stack([weights[j] for j in mids[pos].tolist()]), mids[pos], pids[pos])
            for _, pos in group_by_shape(vocab, mids, pids)]


def _text(p: int, length: int = 6, dim: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(p, length, dtype=torch.bool)
    for i in range(p):
        mask[i, length - 1 - i % (length - 1):] = False  # different lengths, all >= 1
    return torch.randn(p, length, dim, generator=g) * mask[..., None], mask


def test_config_rejects_bad_values_and_unknown_keys():
    assert from_dict(HyperNetConfig, {"d_model": 64, "num_heads": 4, "cross_stage1_after": [1]}).cross_stage1_after == (1,)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(HyperNetConfig, {"dmodel": 64})
    with pytest.raises(ConfigError, match="not divisible"):
        HyperNetConfig(d_model=30, num_heads=4)
    with pytest.raises(ConfigError, match="cross_stage1_after"):
        HyperNetConfig(num_blocks=4, stage=2, cross_stage1_after=(3, 7))
    assert HyperNetConfig(num_blocks=4, stage=1, cross_stage1_after=(3, 7)).stage == 1  # unused in stage I
    with pytest.raises(ConfigError, match="stage must be 1 or 2"):
        HyperNetConfig(stage=3)
    with pytest.raises(ConfigError, match="max_blocks"):
        HyperNet(_cfg(max_blocks=1), VOCAB)


@pytest.mark.parametrize("rank,num_blocks,patch", [(4, 2, 8), (3, 1, 7), (8, 3, 16)])
def test_shapes_rectangular_any_rank_blocks_and_padding(rank, num_blocks, patch):
    vocab = Vocabulary.from_dims(32, 48, 3, modules=("self_attn.q", "cross_attn.o", "ffn.0", "ffn.2"))
    cfg = _cfg(rank=rank, num_blocks=num_blocks, patch_size=patch, cross_stage1_after=())
    model = HyperNet(cfg, vocab)
    assert sorted(model.heads) == ["32x32", "32x48", "48x32"]
    w = _weights(vocab)
    mids = list(range(len(vocab)))
    groups = _groups(vocab, w, mids + mids, [0] * len(mids) + [1] * len(mids))
    outs = model(groups, *_text(2))
    grid = lambda n: -(-n // patch)  # noqa: E731
    for g, out in zip(groups, outs):
        o, i = g.shape
        n = g.weight.shape[0]
        assert out.A.shape == (n, rank, i) and out.B.shape == (n, o, rank)
        assert out.tokens.shape == (n, 1 + grid(o) * grid(i), cfg.d_model)
        assert out.alpha is None and out.delta().shape == (n, o, i)
        assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    assert model.row_embed.shape[0] == grid(48) and model.col_embed.shape[0] == grid(48)


def test_zero_b_head_gives_zero_delta_in_stage2_and_alpha_init():
    model = HyperNet(_cfg(stage=2, alpha_init=0.7, use_stage1=False), VOCAB)
    assert all((h.B.weight == 0).all() for h in model.heads.values())
    assert all((h.A.weight != 0).any() for h in model.heads.values())
    groups = _groups(VOCAB, _weights(VOCAB), range(16), [0] * 16)
    out = model(groups, *_text(1))[0]
    assert torch.equal(out.delta(), torch.zeros(16, 32, 32))
    assert torch.allclose(out.alpha, torch.full((16,), 0.7))
    # stage I's default B init is tiny but non-zero (B = 0 is a stationary point of any |BA| loss)
    s1 = HyperNet(_cfg(), VOCAB)
    d = s1(groups, *_text(1))[0].delta()
    w = torch.stack(_weights(VOCAB))
    assert 0 < (d.abs() / w.abs()).median() < 1e-3


def test_text_kv_once_per_prompt_and_equal_to_per_matrix_reference():
    torch.manual_seed(0)
    model = HyperNet(_cfg(), VOCAB).eval()
    w = _weights(VOCAB)
    text, mask = _text(3)
    calls: dict[str, list[int]] = {}

    def hook(name):
        return lambda mod, args, out: calls.setdefault(name, []).append(args[0].shape[0])

    handles = [model.text_proj.register_forward_hook(hook("text_proj"))]
    handles += [b.cross.kv.register_forward_hook(hook(f"kv{i}")) for i, b in enumerate(model.blocks)]
    mids = [0, 5, 9, 15, 2, 0, 7, 3, 3, 12, 1, 4]
    layouts = {"blocked": [0] * 4 + [1] * 4 + [2] * 4, "shuffled": [2, 0, 1, 0, 2, 1, 1, 2, 0, 0, 1, 2]}
    with torch.no_grad():
        for pids in layouts.values():
            calls.clear()
            out = model(_groups(VOCAB, w, mids, pids), text, mask)[0]
            assert calls == {"text_proj": [3], "kv0": [3], "kv1": [3]}  # once per forward, P = 3 rows
            order = torch.argsort(torch.tensor(pids), stable=True).tolist()
            for row, pos in enumerate(order):  # reference: each matrix alone with its prompt alone
                p, j = pids[pos], mids[pos]
                ref = model([MatrixGroup(w[j][None], torch.tensor([j]), torch.tensor([0]))],
                            text[p:p + 1], mask[p:p + 1])[0]
                torch.testing.assert_close(out.A[row], ref.A[0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(out.B[row], ref.B[0], rtol=1e-5, atol=1e-9)
                torch.testing.assert_close(out.tokens[row], ref.tokens[0], rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()


def _grads(model, groups, text, mask, stage1_tokens=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    outs = model(groups, text, mask, stage1_tokens)
    sum(o.A.pow(2).sum() + o.B.sum() + o.tokens.sin().sum() + o.alpha.sum() for o in outs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = _cfg(stage=2, b_init_std=0.02)
    plain = HyperNet(cfg, VOCAB)
    ckpt = HyperNet(_cfg(stage=2, b_init_std=0.02, grad_checkpointing=True), VOCAB)
    ckpt.load_state_dict(plain.state_dict())
    groups = _groups(VOCAB, _weights(VOCAB), list(range(16)) * 2, [0] * 16 + [1] * 16)
    text, mask = _text(2)
    s1 = [torch.randn(g.weight.shape[0], 17, 32) for g in groups]
    runs = []
    handle = ckpt.blocks[0].register_forward_pre_hook(lambda *a: runs.append(1))
    g_ckpt = _grads(ckpt, groups, text, mask, s1)
    handle.remove()
    assert len(runs) == 2  # forward + recompute in backward: checkpointing is active
    g_plain = _grads(plain, groups, text, mask, s1)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) == len(list(plain.parameters()))
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-6, atol=1e-9, msg=name)


def test_params_stay_fp32_under_bf16_autocast_and_norm_gains_move():
    from lofa.objectives import HyperBatch, LoraGroup, stage1_loss

    torch.manual_seed(0)
    model = HyperNet(_cfg(), VOCAB)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    groups = _groups(VOCAB, _weights(VOCAB), range(16), [0] * 16)
    g = torch.Generator().manual_seed(3)
    batch = HyperBatch(*_text(1), tuple(LoraGroup(m, 0.1 * torch.randn(16, 2, 32, generator=g),
                                                  0.01 * torch.randn(16, 32, 2, generator=g)) for m in groups))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(batch.matrix_groups, batch.text, batch.text_mask)
        assert outs[0].A.dtype == torch.bfloat16
        loss, _ = stage1_loss(model, batch)
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = model.state_dict()
    for name in ("blocks.0.norm1.weight", "blocks.1.cross.q_norm.weight", "patch_norm.weight", "norm.weight"):
        assert not torch.equal(after[name], before[name]), name


def test_bf16_model_matches_fp32():
    torch.manual_seed(0)
    model = HyperNet(_cfg(stage=2, b_init_std=0.02, use_stage1=False), VOCAB).eval()
    groups = _groups(VOCAB, _weights(VOCAB), range(16), [0] * 16)
    text, mask = _text(1)
    with torch.no_grad():
        ref = model(groups, text, mask)[0].delta()
        low = copy.deepcopy(model).to(torch.bfloat16)
        bgroups = [MatrixGroup(g.weight.bfloat16(), g.matrix_ids, g.prompt_ids) for g in groups]
        got = low(bgroups, text.bfloat16(), mask)[0].delta().float()
    assert (got - ref).norm() / ref.norm() < 3e-2


def test_stage2_ablation_has_no_stage1_blocks():
    full = HyperNet(_cfg(stage=2), VOCAB)
    ablation = HyperNet(_cfg(stage=2, use_stage1=False), VOCAB)
    assert len(full.stage1_blocks) == 2 and len(ablation.stage1_blocks) == 0
    assert not any("stage1" in n for n, _ in ablation.named_parameters())
    n_extra = sum(p.numel() for p in full.stage1_blocks.parameters())
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in ablation.parameters()) == n_extra
    groups = _groups(VOCAB, _weights(VOCAB), range(16), [0] * 16)
    text, mask = _text(1)
    assert ablation(groups, text, mask)[0].alpha.shape == (16,)
    with pytest.raises(ValueError, match="stage1_tokens"):
        ablation(groups, text, mask, [torch.zeros(16, 17, 32)])
    with pytest.raises(ValueError, match="stage1_tokens"):
        full(groups, text, mask)
    with pytest.raises(ValueError, match="no valid text token"):
        full(groups, text, torch.zeros_like(mask), [torch.zeros(16, 17, 32)])


@pytest.mark.slow  # the whole benchmark script, compile included (~11 s)
def test_benchmark_tiny_smoke(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.delenv("OUT", raising=False)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hypernet.py"
    spec = importlib.util.spec_from_file_location("bench_hypernet", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--tiny", "--out", str(tmp_path / "b.json")])
    assert report["errors"] == {} and {"ceiling", "predict", "train1"} <= set(report["results"])
    assert report["results"]["predict"]["vs_fp32"]["dW"] < 3e-2
    # the user's API (Predictor, bf16 weights) over a real tiny Wan DiT's matrices
    pr = report["results"]["predictor"]
    assert pr["factors"] == {"dtype": "torch.float32", "matrices": 16, "device": "cpu"}
    # 16 text tokens: the full text, and shorter prompts all padded to 16 with a mask
    assert pr["graphs"] == [[16, False], [16, True]] and pr["short_prompts"]["text_tokens"] == [1, 2, 3]
    assert (tmp_path / "b.json").is_file()
    # the FLOP count at the Wan2.1-1.3B shapes: about 31 TFLOP for stage I + stage II
    vocab = Vocabulary.from_dims(1536, 8960, 30)
    total = sum(bench.forward_flops(HyperNetConfig(stage=s), vocab, 1, 512) for s in (1, 2))
    assert 31e12 < total < 32e12


def test_embedded_groups_give_the_same_prediction():
    torch.manual_seed(0)
    s1 = HyperNet(_cfg(), VOCAB).eval()
    s2 = HyperNet(_cfg(stage=2, b_init_std=0.02), VOCAB).eval()
    groups = _groups(VOCAB, _weights(VOCAB), range(16), [0] * 16)
    text, mask = _text(1)
    with torch.no_grad():
        t1 = [o.tokens for o in s1(groups, text, mask)]
        ref = s2(groups, text, mask, t1)[0]
        e1, e2 = [s1.embed(g) for g in groups], [s2.embed(g) for g in groups]
        t1e = [o.tokens for o in s1(e1, text, mask)]
        got = s2(e2, text, mask, t1e)[0]
        torch.testing.assert_close(got.delta(), ref.delta())
        torch.testing.assert_close(got.alpha, ref.alpha)
        with pytest.raises(ValueError, match="another model"):
            s2(e1, text, mask, t1e)


def test_query_chunked_cross_attention_gives_the_same_outputs_and_gradients(monkeypatch):
    from lofa.kernels import dispatch as hn

    torch.manual_seed(0)
    model = HyperNet(_cfg(stage=2, b_init_std=0.02), VOCAB)
    groups = _groups(VOCAB, _weights(VOCAB), list(range(16)) * 2, [0] * 16 + [1] * 16)  # m = 16 per prompt
    text, mask = _text(2)
    s1 = [torch.randn(g.weight.shape[0], 17, 32) for g in groups]
    seen: list[int] = []
    sdpa = hn.F.scaled_dot_product_attention
    monkeypatch.setattr(hn.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(q.shape[0]) or sdpa(q, k, v, **kw))
    whole = _grads(model, groups, text, mask, s1)  # 16 matrices x 17 tokens < 4096 rows: one chunk
    assert hn._query_chunks(16, 17) == 1 and 2 in seen and 8 not in seen
    monkeypatch.setattr(hn, "BWD_QUERY_CHUNK", 68)  # 4 matrices per chunk -> 4 chunks per prompt
    assert hn._query_chunks(16, 17) == 4
    seen.clear()
    chunked = _grads(model, groups, text, mask, s1)
    assert 8 in seen  # P x chunks = 2 x 4 rows of queries, each with its own copy of K / V
    for name in whole:
        # summation order differs (atol: an fp32 kernel of another CPU once gave 1.5e-6 on a 4e-3 entry)
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():  # inference keeps one sequence per prompt
        seen.clear()
        model(groups, text, mask, s1)
        assert 8 not in seen


@pytest.mark.parametrize("use_stage1", [True, False])
def test_prediction_graph_schedule_matches_the_model(use_stage1):
    """PredictionGraph's two-stream schedule (stage II's first blocks beside stage I, then the
    rest) gives exactly what the two models' own forwards give; text must be trimmed and
    embedded groups must be the models' own, for one prompt."""
    from lofa.serving.predict_graph import PredictionGraph

    vocab = Vocabulary.from_dims(32, 48, 2, modules=("self_attn.q", "ffn.0", "ffn.2"))
    w = _weights(vocab)
    torch.manual_seed(0)
    s1 = HyperNet(_cfg(stage=1), vocab).eval()
    s2 = HyperNet(_cfg(stage=2, b_init_std=0.02, cross_stage1_after=(1,) if use_stage1 else (),
                       use_stage1=use_stage1), vocab).eval()
    groups = _groups(vocab, w, range(len(vocab)), [0] * len(vocab))
    text, mask = _text(1)
    text, mask = text[:, : int(mask.sum())], mask[:, : int(mask.sum())]
    with torch.no_grad():
        tokens = [o.tokens for o in s1(groups, text, mask)] if use_stage1 else None
        want = s2(groups, text, mask, tokens)
        e1, e2 = [s1.embed(g) for g in groups], [s2.embed(g) for g in groups]
    graph = PredictionGraph(s1 if use_stage1 else None, s2, e1 if use_stage1 else None, e2, text.shape[1])
    assert graph.graph is None  # CPU: the same schedule, not captured
    got = graph(text)
    assert len(got) == len(want) == 3
    torch.testing.assert_close(graph.replay(text)[0].A, got[0].A)
    # padded with garbage and the padding masked: the same prediction
    padded = PredictionGraph(s1 if use_stage1 else None, s2, e1 if use_stage1 else None, e2, text.shape[1] + 3,
                             masked=True)
    pad_text = torch.cat([text, 5 * torch.randn(1, 3, text.shape[2])], dim=1)
    pad_mask = torch.arange(text.shape[1] + 3)[None] < text.shape[1]
    for a, b in zip(padded(pad_text, pad_mask), got):
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.B_scaled, b.B_scaled, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="key mask"):
        padded(pad_text)
    with pytest.raises(ValueError, match="key mask"):
        graph(text, torch.ones(1, text.shape[1], dtype=torch.bool))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.B_scaled, b.B_scaled, rtol=1e-5, atol=1e-7)
        assert a.B_scaled.abs().sum() > 0
    with pytest.raises(ValueError, match="captured for text"):
        graph(text[:, :-1])
    with pytest.raises(ValueError, match="another model"):
        PredictionGraph(s1 if use_stage1 else None, s2, e2 if use_stage1 else None, e1, text.shape[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine)")
@pytest.mark.parametrize("autocast", [False, True])
def test_prediction_graph_replays_on_cuda_like_the_models(autocast):
    """Captured and replayed for new texts, the graph gives the models' own forwards."""
    from contextlib import nullcontext

    from lofa.serving.predict_graph import PredictionGraph

    vocab = Vocabulary.from_dims(32, 48, 2, modules=("self_attn.q", "ffn.0", "ffn.2"))
    w = [t.cuda() for t in _weights(vocab)]
    torch.manual_seed(0)
    s1 = HyperNet(_cfg(stage=1), vocab).cuda().eval()
    s2 = HyperNet(_cfg(stage=2, b_init_std=0.02, cross_stage1_after=(0, 1)), vocab).cuda().eval()
    ids = torch.arange(len(vocab), device="cuda")
    groups = [MatrixGroup(torch.stack([w[j] for j in pos.tolist()]), ids[pos.cuda()], torch.zeros_like(pos).cuda())
              for _, pos in group_by_shape(vocab, ids.cpu(), torch.zeros(len(vocab), dtype=torch.long))]
    ctx = (lambda: torch.autocast("cuda", torch.bfloat16, cache_enabled=False)) if autocast else nullcontext
    with torch.no_grad(), ctx():
        e1, e2 = [s1.embed(g) for g in groups], [s2.embed(g) for g in groups]
    graph = PredictionGraph(s1, s2, e1, e2, 5, context=ctx)
    assert graph.graph is not None
    padded = PredictionGraph(s1, s2, e1, e2, 8, masked=True, context=ctx, pool=graph.pool)  # 3 keys masked
    tol = dict(rtol=2e-2, atol=1e-4) if autocast else dict(rtol=1e-4, atol=1e-6)
    for seed in (1, 2, 3):
        text = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(seed)).cuda()
        mask = torch.ones(1, 5, dtype=torch.bool, device="cuda")
        with torch.no_grad(), ctx():
            want = s2(groups, text, mask, [o.tokens for o in s1(groups, text, mask)])
        got = graph(text)
        pad_text = torch.cat([text, 5 * torch.randn(1, 3, 24, device="cuda")], dim=1)
        pad_mask = torch.arange(8, device="cuda")[None] < 5
        for outs in (got, padded(pad_text, pad_mask)):
            for a, b in zip(outs, want):
                torch.testing.assert_close(a.A.float(), b.A.float(), **tol)
                torch.testing.assert_close(a.B_scaled.float(), b.B_scaled.float(), **tol)
    # replay: the graph's own outputs (the same buffers every call, no copies); a call copies them
    own = graph.replay(text)
    assert own[0].A.data_ptr() == graph.replay(text)[0].A.data_ptr() != graph(text)[0].A.data_ptr()
    torch.testing.assert_close(own[0].A, got[0].A)


_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (run on the lent GPU machine)")


def _cuda_world(d_model: int, prompts: int) -> tuple[HyperNet, HyperNet, list[MatrixGroup]]:
    """Stage-I and stage-II models (fp32) on CUDA, and their matrices grouped by shape, every
    matrix once per prompt (consecutive per prompt; prompt ids on the host)."""
    vocab = Vocabulary.from_dims(32, 48, 2, modules=("self_attn.q", "ffn.0", "ffn.2"))
    w = [t.cuda() for t in _weights(vocab)]
    torch.manual_seed(0)
    s1 = HyperNet(_cfg(stage=1, d_model=d_model), vocab).cuda().eval()
    s2 = HyperNet(_cfg(stage=2, d_model=d_model, b_init_std=0.02, cross_stage1_after=(0, 1)), vocab).cuda().eval()
    ids = torch.arange(len(vocab))
    groups = [MatrixGroup(torch.stack([w[j] for j in pos.tolist()]).repeat(prompts, 1, 1),
                          ids[pos].repeat(prompts).cuda(), torch.arange(prompts).repeat_interleave(len(pos)))
              for _, pos in group_by_shape(vocab, ids, torch.zeros(len(vocab), dtype=torch.long))]
    return s1, s2, groups


def _predict(s1: HyperNet, s2: HyperNet, groups: list, text: torch.Tensor, mask: torch.Tensor) -> list:
    """Stage I then stage II (on stage I's tokens) without autograd."""
    with torch.no_grad():
        return s2(groups, text, mask, [o.tokens for o in s1(groups, text, mask)])


def _assert_same_prediction(fused: list, plain: list, what: object = None) -> None:
    """A, B and the tokens of each output agree to bf16 rounding (2% relative)."""
    for a, b in zip(fused, plain):
        for x, y in ((a.A, b.A), (a.B_scaled, b.B_scaled), (a.tokens, b.tokens)):
            assert ((x.float() - y.float()).norm() / y.float().norm()).item() < 2e-2, what


@_needs_cuda
def test_fused_attention_kernel_gives_the_plain_prediction(monkeypatch):
    """Without autograd on CUDA in bf16 every attention runs one of lofa.kernels.attention's kernels (the q
    norm inside; head_dim 16, the smallest they take). Attention to a matrix's own tokens (self,
    and stage II's to the stage-I tokens) runs the short-sequence kernel with the k norm inside
    where the tokens are a whole tile + CLS (32x32 matrices: 16 + 1), else the general one. The
    prediction is the plain one (norms and SDPA) up to bf16 rounding."""
    from lofa.kernels import attention

    s1, s2, groups = _cuda_world(d_model=64, prompts=1)
    s1, s2 = s1.bfloat16(), s2.bfloat16()
    groups = [MatrixGroup(g.weight.bfloat16(), g.matrix_ids, g.prompt_ids) for g in groups]
    text = torch.randn(1, 5, 24, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 5, dtype=torch.bool)
    calls = []
    for name in ("launch", "launch_short"):
        fn = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, fn=fn, name=name, **k: (calls.append(name), fn(*a, **k))[1])

    def predict():
        return _predict(s1, s2, groups, text, mask)
    fused = predict()
    # every attention: self and cross to the text in each trunk block, cross to the stage-I tokens
    own = s1.cfg.num_blocks + s2.cfg.num_blocks + len(s2.stage1_blocks)  # attentions to a matrix's own tokens
    assert len(calls) == len(groups) * (own + s1.cfg.num_blocks + s2.cfg.num_blocks)
    tokens = [1 + -(-g.shape[0] // 8) * -(-g.shape[1] // 8) for g in groups]
    assert 17 in tokens and 25 in tokens  # both kernels are exercised
    assert calls.count("launch_short") == own * sum(t == 17 for t in tokens)
    monkeypatch.setattr(attention, "ENABLED", False)
    calls.clear()
    plain = predict()
    assert not calls
    _assert_same_prediction(fused, plain)


@_needs_cuda
def test_fused_attention_under_dynamic_compile_with_text_masks(monkeypatch):
    """The kernel inside compiled regions with dynamic shapes (as the training stages compile, where
    stage II runs the frozen stage I without autograd): prompts of different lengths, some keys
    masked, batches of changing text length; each equals the eager prediction with the kernel off."""
    from lofa.kernels import attention

    model, _, groups = _cuda_world(d_model=64, prompts=2)
    compiled = copy.deepcopy(model).compile_regions(dynamic=None)
    for length, valid in ((7, (7, 4)), (12, (9, 12)), (5, (2, 5))):
        text = torch.randn(2, length, 24, device="cuda")
        mask = torch.arange(length)[None, :] < torch.tensor(valid)[:, None]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fused = compiled(groups, text, mask)
            with monkeypatch.context() as m:
                m.setattr(attention, "ENABLED", False)
                plain = model(groups, text, mask)
        _assert_same_prediction(fused, plain, length)


def test_moving_a_group_or_batch_leaves_the_host_read_metadata_on_the_host():
    """MatrixGroup.to / HyperBatch.to keep prompt ids and the text mask on the host, where the model
    reads them (which prompt's K / V, which text columns) without a GPU sync."""
    from lofa.objectives import HyperBatch, LoraGroup

    g = MatrixGroup(torch.zeros(2, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 0]))
    moved = g.to("meta")
    assert moved.weight.is_meta and moved.matrix_ids.is_meta and moved.prompt_ids.device.type == "cpu"
    batch = HyperBatch(torch.zeros(1, 3, 5), torch.ones(1, 3, dtype=torch.bool),
                       (LoraGroup(g, torch.zeros(2, 1, 4), torch.zeros(2, 4, 1)),)).to("meta")
    assert batch.text.is_meta and batch.text_mask.device.type == "cpu"
    assert batch.groups[0].lora_A.is_meta and batch.groups[0].matrices.prompt_ids.device.type == "cpu"


@pytest.mark.slow  # torch.compile (~12 s)
def test_compiled_regions_give_the_same_prediction():
    """HyperNet.compile_regions (the blocks, the embedding, the text K / V and the heads through
    torch.compile; what Predictor(compile=True) and the GPU benchmark use) changes no output."""
    torch.manual_seed(0)
    vocab = Vocabulary.from_dims(32, 48, 1, modules=("self_attn.q", "ffn.0"))
    s2 = HyperNet(_cfg(stage=2, b_init_std=0.02, use_stage1=False, num_blocks=1, cross_stage1_after=()),
                  vocab).eval()
    groups = _groups(vocab, _weights(vocab), range(len(vocab)), [0] * len(vocab))
    text, mask = _text(1)
    with torch.no_grad():
        want = s2(groups, text, mask)
        compiled = copy.deepcopy(s2).compile_regions()
        got = compiled(groups, text, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.A, b.A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.B_scaled, b.B_scaled, rtol=1e-4, atol=1e-7)
    assert a.B_scaled.abs().sum() > 0
