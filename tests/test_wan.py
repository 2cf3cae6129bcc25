"""The Wan DiT adapter: config, loading through diffsynth, forward pinned to
diffsynth's model_fn_wan_video, and flow matching against diffsynth's scheduler."""

from __future__ import annotations

import copy

import pytest
import torch

from lofa.config import ConfigError, from_dict
from lofa.io import ArtifactError, save_tensors
from lofa.wan import (WAN21_T2V_1_3B, WAN_TINY, Checkpointing, WanDiTConfig, add_noise, base_model_hash, build_dit,
                      dit_config, dit_forward, expected_file_hash, flow_loss, flow_schedule, fused_rms_norm, load_dit,
                      register_dit_config, sample_timesteps, training_target, training_weight)

TINY3 = WanDiTConfig(dim=96, ffn_dim=128, num_heads=2, num_layers=3, text_dim=32)  # head_dim 48



@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(1)
    return build_dit(TINY3)


def _inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 16, 3, 8, 8, generator=g), torch.randn(b, 7, 32, generator=g),
            torch.tensor([37.0, 512.0, 960.0, 250.0][:b]))


def test_config_validates_head_dim():
    for dim, heads in ((128, 4), (96, 2), (192, 2), (256, 2)):  # head_dim 32, 48, 96, 128
        WanDiTConfig(dim=dim, ffn_dim=64, num_heads=heads, num_layers=1, text_dim=8)
    with pytest.raises(ValueError, match="head_dim = dim / num_heads = 64"):
        WanDiTConfig(dim=128, ffn_dim=64, num_heads=2, num_layers=1, text_dim=8)
    with pytest.raises(ValueError, match="not divisible"):
        WanDiTConfig(dim=100, ffn_dim=64, num_heads=3, num_layers=1, text_dim=8)
    assert (WAN21_T2V_1_3B.dim, WAN21_T2V_1_3B.ffn_dim, WAN21_T2V_1_3B.num_heads,
            WAN21_T2V_1_3B.num_layers, WAN21_T2V_1_3B.text_dim) == (1536, 8960, 12, 30, 4096)
    cfg = from_dict(WanDiTConfig, {"dim": 128, "ffn_dim": 256, "num_heads": 4, "num_layers": 2,
                                   "text_dim": 384, "patch_size": [1, 2, 2]})
    assert cfg == WAN_TINY
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(WanDiTConfig, {"dim": 128, "heads": 4})


def test_real_config_hash_is_diffsynths():
    # diffsynth's MODEL_CONFIGS entry for Wan2.1-T2V-1.3B
    assert expected_file_hash(WAN21_T2V_1_3B) == "9269f8db9040a9d860eaca435be61814"
    assert register_dit_config(WAN21_T2V_1_3B) == "9269f8db9040a9d860eaca435be61814"


def test_build_and_config_round_trip(dit):
    assert dit_config(dit) == TINY3
    assert dit_config(build_dit(WAN_TINY)) == WAN_TINY


def test_forward_matches_model_fn_wan_video(dit):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    lat, ctx, t = _inputs(3)
    with torch.no_grad():
        one = dit_forward(dit, lat[:1], t[:1], ctx[:1])
        torch.testing.assert_close(one, model_fn_wan_video(dit=dit, latents=lat[:1], timestep=t[:1], context=ctx[:1]),
                                   rtol=0, atol=0)
        batched = dit_forward(dit, lat, t, ctx)
        torch.testing.assert_close(batched, model_fn_wan_video(dit=dit, latents=lat, timestep=t, context=ctx),
                                   rtol=0, atol=0)
        singles = torch.cat([dit_forward(dit, lat[i:i + 1], t[i:i + 1], ctx[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, 16, 3, 8, 8)
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    assert (batched[0] - batched[1]).abs().mean() > 1e-3  # per-sample timesteps act


def test_forward_checkpointing_same_gradients(dit):
    lat, ctx, t = _inputs(2)
    d = copy.deepcopy(dit).requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        d.zero_grad()
        dit_forward(d, lat, t[:2], ctx, grad_checkpointing=ckpt).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in d.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_load_dit_round_trip(tmp_path, dit):
    from diffsynth.configs import MODEL_CONFIGS

    path = tmp_path / "dit.safetensors"
    save_tensors(path, dit.state_dict())
    loaded = load_dit(path, TINY3)
    assert any(c["model_hash"] == expected_file_hash(TINY3) for c in MODEL_CONFIGS)
    for (n, a), (_, b) in zip(dit.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert base_model_hash(loaded) == base_model_hash(dit)
    lat, ctx, t = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(dit_forward(loaded, lat, t, ctx), dit_forward(dit, lat, t, ctx), rtol=0, atol=0)
    assert load_dit(path, TINY3, dtype=torch.bfloat16).blocks[0].self_attn.q.weight.dtype == torch.bfloat16


def test_load_dit_errors_name_the_file(tmp_path, dit):
    path = tmp_path / "dit.safetensors"
    save_tensors(path, dit.state_dict())
    with pytest.raises(ArtifactError, match=r"dit\.safetensors.*do not match"):
        load_dit(path, WAN_TINY)
    with pytest.raises(ArtifactError, match="not found"):
        load_dit(tmp_path / "missing.safetensors", TINY3)
    (tmp_path / "dit.pt").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"dit\.pt.*safetensors"):
        load_dit(tmp_path / "dit.pt", TINY3)
    sd = dict(dit.state_dict())
    sd["blocks.1.ffn.0.weight"] = sd["blocks.1.ffn.0.weight"].clone()
    sd["blocks.1.ffn.0.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_tensors(bad, sd)
    with pytest.raises(ArtifactError, match=r"nan\.safetensors.*blocks\.1\.ffn\.0\.weight"):
        load_dit(bad, TINY3)


def test_base_model_hash_is_content(dit):
    other = copy.deepcopy(dit)
    assert base_model_hash(other) == base_model_hash(dit)
    with torch.no_grad():
        other.blocks[0].self_attn.q.weight[0, 0] += 1e-3
    assert base_model_hash(other) != base_model_hash(dit)


def _diffsynth_scheduler():
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    s = FlowMatchScheduler("Wan")
    s.set_timesteps(1000, training=True)
    return s


def test_schedule_matches_diffsynth():
    ref = _diffsynth_scheduler()
    sched = flow_schedule()
    torch.testing.assert_close(sched.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(sched.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(sched.weights, ref.linear_timesteps_weights, rtol=1e-6, atol=1e-6)
    ids = torch.tensor([0, 1, 250, 500, 777, 999])
    for t in ref.timesteps[ids]:
        torch.testing.assert_close(training_weight(t[None])[0], ref.training_weight(t), rtol=1e-5, atol=1e-6)
    x0, noise = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 2, 4, 4)
    ts = ref.timesteps[torch.tensor([100, 800])]
    mine = add_noise(x0, noise, ts)
    for i in range(2):
        torch.testing.assert_close(mine[i], ref.add_noise(x0[i], noise[i], ts[i]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(training_target(x0, noise), ref.training_target(x0, noise, ts[0]))
    assert float(training_weight(torch.tensor([1000.0]))[0]) == pytest.approx(0.0, abs=1e-6)


def test_sample_timesteps_on_grid_and_bounded():
    grid = flow_schedule().timesteps
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, g)
    assert torch.isin(t, grid).all() and t.shape == (4000,)
    assert len(torch.unique(t)) > 900  # uniform over 1000 ids
    lo = sample_timesteps(2000, g, min_boundary=0.5, max_boundary=1.0)
    assert float(lo.max()) <= float(grid[500]) and float(lo.min()) >= float(grid[999])
    assert torch.equal(sample_timesteps(5, torch.Generator().manual_seed(3)),
                       sample_timesteps(5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="min_boundary"):
        sample_timesteps(1, g, min_boundary=0.7, max_boundary=0.3)


def test_flow_loss_matches_diffsynth_loss(dit):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    ref = _diffsynth_scheduler()
    lat, ctx, _ = _inputs(3)
    ts = ref.timesteps[torch.tensor([50, 400, 900])]
    noise = torch.randn_like(lat)
    with torch.no_grad():
        losses = flow_loss(dit, lat, ctx, ts, noise)
        for i in range(3):  # FlowMatchSFTLoss, one sample at a time
            noisy = ref.add_noise(lat[i:i + 1], noise[i:i + 1], ts[i])
            pred = model_fn_wan_video(dit=dit, latents=noisy, timestep=ts[i:i + 1], context=ctx[i:i + 1])
            want = torch.nn.functional.mse_loss(pred, ref.training_target(lat[i:i + 1], noise[i:i + 1], ts[i]))
            torch.testing.assert_close(losses[i], want * ref.training_weight(ts[i]), rtol=1e-5, atol=1e-7)
        assert float(flow_loss(dit, lat, ctx, ts, noise, reduction="mean")) == pytest.approx(float(losses.mean()))
        assert float(flow_loss(dit, lat, ctx, ts, noise, reduction="sum")) == pytest.approx(float(losses.sum()))
    with pytest.raises(ValueError, match="unknown reduction"):
        flow_loss(dit, lat, ctx, ts, noise, reduction="max")


def test_save_attention_skips_attention_in_recompute(dit):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += "scaled_dot_product" in str(func) and "backward" not in str(func)
            return func(*args, **(kwargs or {}))

    lat, ctx, t = _inputs(1)
    d = copy.deepcopy(dit).requires_grad_(True)
    recomputed = {}
    for policy in (Checkpointing(), Checkpointing(save_attention=True), Checkpointing(blocks=1)):
        out = dit_forward(d, lat, t, ctx, grad_checkpointing=policy)
        with CountAttention() as counter:
            out.pow(2).mean().backward()
        recomputed[policy] = counter.calls
    # 3 blocks x (self + cross) attention; checkpointing only block 0 recomputes its 2
    assert recomputed == {Checkpointing(): 6, Checkpointing(save_attention=True): 0, Checkpointing(blocks=1): 2}


def test_fused_rms_norm_same_function_and_restored(dit):
    lat, ctx, t = _inputs(2)
    with torch.no_grad():
        ref = dit_forward(dit, lat, t[:2], ctx)
        with fused_rms_norm(dit):
            assert dit.blocks[0].self_attn.norm_q.use_torch_norm
            fused = dit_forward(dit, lat, t[:2], ctx)
    assert not dit.blocks[0].self_attn.norm_q.use_torch_norm
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- fused block

def _rand_lora(vocab, k: int, seed: int, scale=0.5):
    from lofa.lora import LoRAWeights

    g = torch.Generator().manual_seed(seed)
    A = tuple((torch.randn(k, 4, m.in_features, generator=g) * 0.2).requires_grad_(True) for m in vocab)
    B = tuple((torch.randn(k, m.out_features, 4, generator=g) * 0.2).requires_grad_(True) for m in vocab)
    return LoRAWeights(vocab, A, B, scale)


def _loss_and_grads(dit, lat, ctx, t, noise, lora, **kw):
    for p in lora.parameters():
        p.grad = None
    loss = flow_loss(dit, lat, ctx, t, noise, lora=lora, **kw)
    loss.sum().backward()
    return loss.detach(), [p.grad.clone() for p in lora.parameters()]


def _assert_same_fit(got, ref, rtol=1e-5):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=1e-7)
    for a, b in zip(got[1], ref[1]):
        assert float((a - b).norm() / b.norm()) < 10 * rtol


def test_fused_block_matches_diffsynth(dit):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    from lofa.layers import ALL_MODULES, Vocabulary

    lat, ctx, t = _inputs(3)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model_fn_wan_video(dit=dit, latents=lat, timestep=t, context=ctx)
        torch.testing.assert_close(dit_forward(dit, lat, t, ctx, block_impl="fused"), ref, rtol=1e-5, atol=1e-5)
    d = copy.deepcopy(dit).requires_grad_(False)
    subset = ("self_attn.q", "self_attn.v", "cross_attn.k", "ffn.2")  # q, v fused around a plain k
    for modules, k, scale in ((ALL_MODULES, 3, torch.tensor([0.5, 1.0, 2.0])), (subset, 3, 0.5),
                              (subset, 1, torch.tensor([2.0]))):
        lora = _rand_lora(Vocabulary.from_dit_config(TINY3, modules), k, seed=k)
        ref = _loss_and_grads(d, lat, ctx, t, noise, lora)
        got = _loss_and_grads(d, lat, ctx, t, noise, lora, block_impl="fused")
        assert float(ref[0].min()) > 0 and all(float(g.abs().max()) > 0 for g in ref[1])
        _assert_same_fit(got, ref)
    policy = Checkpointing(blocks=2, save_attention=True)
    _assert_same_fit(_loss_and_grads(d, lat, ctx, t, noise, lora, block_impl="fused", grad_checkpointing=policy),
                     _loss_and_grads(d, lat, ctx, t, noise, lora, block_impl="fused"))


def test_rope_matches_diffsynth(dit, monkeypatch):
    from diffsynth.models.wan_video_dit import rope_apply

    from lofa.wan import _rope_freqs
    from lofa.kernels.wan_fast import rope

    table = _rope_freqs(dit, 3, 4, 4, torch.device("cpu"))  # (48, 1, 24) complex128, as diffsynth's
    assert table.dtype == torch.complex128
    cos, sin = table.real.float(), table.imag.float()
    x = torch.randn(2, 48, 96) * 3
    for compiling in (False, True):  # the eager (complex64) and compiled (real) formulas
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        torch.testing.assert_close(rope(x, cos, sin, 2), rope_apply(x, table, 2), rtol=1e-6, atol=1e-6)
        xb = x.bfloat16()  # one rounding of the float64 result: at most one bf16 step apart
        diff = (rope(xb, cos, sin, 2).float() - rope_apply(xb, table, 2).float()).abs()
        assert float((diff / rope_apply(xb, table, 2).float().abs().clamp_min(1e-3)).max()) <= 2 ** -7


@pytest.mark.slow  # torch.compile tracing (~10 s)
def test_compiled_block_one_graph_for_all_blocks_and_shapes(dit, monkeypatch):
    """The compiled path traced (aot_eager: dynamo + autograd tracing, no code generation on this
    CPU): one graph serves every block, clip count and resolution; K = 1 adds one."""
    from torch._dynamo.utils import counters

    from lofa.kernels import wan_fast
    from lofa.layers import Vocabulary

    torch._dynamo.reset()
    counters.clear()  # process-wide: graphs compiled by earlier tests count too
    fn = torch.compile(wan_fast.block_forward, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(wan_fast, "compiled_block_forward", lambda: fn)
    d = copy.deepcopy(dit).requires_grad_(False)
    vocab = Vocabulary.from_dit_config(TINY3)
    g = torch.Generator().manual_seed(4)
    for k, frames, hw in ((2, 3, 8), (3, 2, 12), (1, 3, 8)):
        lat, ctx = torch.randn(k, 16, frames, hw, hw, generator=g), torch.randn(k, 7, 32, generator=g)
        t, noise = torch.rand(k, generator=g) * 1000, torch.randn(k, 16, frames, hw, hw, generator=g)
        lora = _rand_lora(vocab, k, seed=10 + k)
        _assert_same_fit(_loss_and_grads(d, lat, ctx, t, noise, lora, block_impl="compiled"),
                         _loss_and_grads(d, lat, ctx, t, noise, lora, block_impl="fused"))
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_block_impl_errors(dit):
    from lofa.layers import Vocabulary
    from lofa.lora import apply_lora

    lat, ctx, t = _inputs(2)
    with pytest.raises(ValueError, match="unknown block_impl 'fast'"):
        dit_forward(dit, lat, t[:2], ctx, block_impl="fast")
    d = copy.deepcopy(dit)
    lora = _rand_lora(Vocabulary.from_dit_config(TINY3), 2, seed=1)
    with apply_lora(d, lora), pytest.raises(ValueError, match="bound by apply_lora"):
        dit_forward(d, lat, t[:2], ctx, block_impl="fused")
    with pytest.raises(ValueError, match="3 LoRAs for a batch of 2"):
        dit_forward(d, lat, t[:2], ctx, lora=_rand_lora(Vocabulary.from_dit_config(TINY3), 3, seed=2),
                    block_impl="fused")
