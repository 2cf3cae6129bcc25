"""Batched multi-LoRA path, LoRA files (export/diffsynth/peft keys), response maps."""

from __future__ import annotations

import copy

import pytest
import torch

from lofa.io import load_tensors, read_metadata, save_tensors
from lofa.layers import ALL_MODULES, Vocabulary
from lofa.lora import (LoRAFormatError, LoRALinear, LoRAWeights, apply_lora, base_weights, load_lora,
                       lora_delta, response_map, response_stats, save_lora, wrap_linears)
from lofa.wan import Checkpointing, WanDiTConfig, build_dit, dit_forward

CFG = WanDiTConfig(dim=96, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
VOCAB = Vocabulary.from_dit_config(CFG)
RANK = 4



@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(2)
    return build_dit(CFG)


def _lora(k: int, vocab: Vocabulary = VOCAB, seed: int = 0, scale: float | torch.Tensor = 0.5) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(k, RANK, m.in_features, generator=g) * 0.2 for m in vocab]
    B = [torch.randn(k, m.out_features, RANK, generator=g) * 0.2 for m in vocab]
    return LoRAWeights(vocab, tuple(A), tuple(B), scale)


def _inputs(b: int):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(b, 16, 2, 8, 8, generator=g), torch.tensor([100.0, 600.0, 900.0][:b]),
            torch.randn(b, 6, 32, generator=g))


def test_lora_delta_per_sample_and_broadcast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)
    A, B = torch.randn(3, 2, 8, generator=g), torch.randn(3, 6, 2, generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0])
    got = lora_delta(x, A, B, scale)
    for k in range(3):
        torch.testing.assert_close(got[k], scale[k] * (x[k] @ A[k].T @ B[k].T))
    torch.testing.assert_close(lora_delta(x, A[:1], B[:1], 0.5), 0.5 * (x @ A[0].T @ B[0].T))
    with pytest.raises(ValueError, match="2 LoRAs for a batch of 3"):
        lora_delta(x, A[:2], B[:2], 1.0)


def test_wrapping_keeps_keys_parameters_and_output(dit):
    d = copy.deepcopy(dit)
    x, t, c = _inputs(1)
    with torch.no_grad():
        before = dit_forward(d, x, t, c)
    keys = list(d.state_dict())
    q = d.blocks[0].self_attn.q.weight
    mods = wrap_linears(d, VOCAB)
    assert len(mods) == len(VOCAB) == 16 and all(isinstance(m, LoRALinear) for m in mods)
    assert d.blocks[0].self_attn.q.weight is q and list(d.state_dict()) == keys
    assert wrap_linears(d, VOCAB)[0] is mods[0]  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(dit_forward(d, x, t, c), before, rtol=0, atol=0)


def test_batched_lora_equals_each_sample_alone(dit):
    d = copy.deepcopy(dit)
    x, t, c = _inputs(3)
    lora = _lora(3, scale=torch.tensor([0.5, 1.0, 2.0]))
    with torch.no_grad():
        batched = dit_forward(d, x, t, c, lora=lora)
        for k in range(3):
            one = LoRAWeights(VOCAB, tuple(a[k:k + 1] for a in lora.A), tuple(b[k:k + 1] for b in lora.B),
                              lora.scale_of(k))
            torch.testing.assert_close(batched[k:k + 1], dit_forward(d, x[k:k + 1], t[k:k + 1], c[k:k + 1], lora=one),
                                       rtol=1e-5, atol=1e-5)
        with apply_lora(d, lora):
            assert d.blocks[1].cross_attn.v.adapter is not None
        assert all(m.adapter is None for m in wrap_linears(d, VOCAB))  # unbound after exit
        base = dit_forward(d, x, t, c)
        assert (batched - base).abs().mean() > 1e-3
        shared = _lora(1)
        torch.testing.assert_close(
            dit_forward(d, x, t, c, lora=shared)[2:],
            dit_forward(d, x[2:], t[2:], c[2:], lora=shared), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_loras_and_survive_checkpointing(dit):
    d = copy.deepcopy(dit).requires_grad_(False)
    x, t, c = _inputs(2)
    grads = []
    policies = (False, True, Checkpointing(blocks=1), Checkpointing(save_attention=True))
    for ckpt in policies:
        lora = _lora(2, seed=3)
        for p in lora.parameters():
            p.requires_grad_(True)
        dit_forward(d, x, t, c, lora=lora, grad_checkpointing=ckpt).pow(2).sum().backward()
        grads.append([p.grad for p in lora.parameters()])
    assert all(p.grad is None for p in d.parameters())
    for i, (g0, *others) in enumerate(zip(*grads)):
        assert g0 is not None and g0.abs().sum() > 0, VOCAB[i % len(VOCAB)].prefix
        for policy, g in zip(policies[1:], others):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6, msg=f"{policy}")


def test_bf16_base_with_fp32_lora(dit):
    d = copy.deepcopy(dit).to(torch.bfloat16).requires_grad_(False)
    x, t, c = _inputs(2)
    lora = _lora(2)
    for p in lora.parameters():
        p.requires_grad_(True)
    out = dit_forward(d, x, t, c, lora=lora)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert lora.A[0].grad.dtype == torch.float32 and lora.A[0].grad.abs().sum() > 0


def test_matches_peft_lora(dit):
    from peft import LoraConfig, inject_adapter_in_model
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    lora = _lora(1, scale=2.0)
    ref = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=2.0 * RANK, target_modules=[m.prefix for m in VOCAB]), copy.deepcopy(dit))
    with torch.no_grad():
        for i, m in enumerate(VOCAB):
            mod = ref.get_submodule(m.prefix)
            mod.lora_A["default"].weight.copy_(lora.A[i][0])
            mod.lora_B["default"].weight.copy_(lora.B[i][0])
        x, t, c = _inputs(2)
        want = model_fn_wan_video(dit=ref, latents=x, timestep=t, context=c)
        torch.testing.assert_close(dit_forward(copy.deepcopy(dit), x, t, c, lora=lora), want, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    lora = _lora(1, scale=0.25)
    A, B = lora.factors(0)
    path = tmp_path / "clip.safetensors"
    save_lora(path, A, B, VOCAB, {"prompt": "a man waves", "base_model_hash": "abc123"}, scale=2.0)
    raw = load_tensors(path)
    assert set(raw) == set(VOCAB.lora_keys("export"))
    assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in raw
    meta = read_metadata(path)
    assert meta["prompt"] == "a man waves" and meta["base_model_hash"] == "abc123"
    assert meta["rank"] == str(RANK) and meta["producer"].startswith("lofa ")
    got = load_lora(path, VOCAB)
    assert got.key_format == "export" and got.rank == RANK
    for i in range(len(VOCAB)):
        torch.testing.assert_close(got.A[i], lora.A[i][0])
        torch.testing.assert_close(got.B[i], lora.B[i][0] * 0.25 * 2.0)  # both scales folded into B
    sa, sb = got.stacked()
    assert sa.shape == (16, RANK, 96) and sb.shape == (16, 96, RANK)
    with pytest.raises(ValueError, match="lacks"):
        save_lora(path, A, B, VOCAB, {"prompt": "x"})


def test_reads_diffsynth_and_peft_keys(tmp_path):
    lora = _lora(1)
    A, B = lora.factors(0)
    export = {k: v for m, a, b in zip(VOCAB, A, B) for k, v in zip(m.lora_keys("export"), (a, b))}
    for fmt in ("diffsynth", "peft"):
        path = tmp_path / f"{fmt}.safetensors"
        save_tensors(path, VOCAB.convert_keys(export, "export", fmt))
        got = load_lora(path, VOCAB)
        assert got.key_format == fmt
        torch.testing.assert_close(got.B[5], B[5])


def _write(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_tensors(path, tensors)
    return path


def test_load_errors_name_file_and_first_mismatch(tmp_path):
    A, B = _lora(1).factors(0)
    good = {k: v for m, a, b in zip(VOCAB, A, B) for k, v in zip(m.lora_keys("export"), (a, b))}
    cases = []
    missing = dict(good)
    del missing["diffusion_model.blocks.0.self_attn.k.lora_B.weight"]
    cases.append((missing, r"bad\.safetensors: missing key 'diffusion_model\.blocks\.0\.self_attn\.k\.lora_B"))
    cases.append((dict(good, **{"diffusion_model.blocks.7.self_attn.q.lora_A.weight": A[0].clone()}),
                  r"unexpected key 'diffusion_model\.blocks\.7"))
    cases.append((dict(good, **{"diffusion_model.blocks.1.ffn.0.lora_A.weight": A[0].clone()}),
                  r"unexpected key 'diffusion_model\.blocks\.1\.ffn"))
    shape = dict(good)
    shape["diffusion_model.blocks.1.self_attn.v.lora_A.weight"] = torch.zeros(RANK, 95)
    cases.append((shape, r"'diffusion_model\.blocks\.1\.self_attn\.v\.lora_A\.weight' has shape \(4, 95\)"))
    dtype = dict(good)
    dtype["diffusion_model.blocks.0.cross_attn.q.lora_B.weight"] = torch.zeros(96, RANK, dtype=torch.int32)
    cases.append((dtype, r"cross_attn\.q\.lora_B\.weight' has dtype torch\.int32"))
    nan = dict(good)
    nan["diffusion_model.blocks.1.cross_attn.o.lora_A.weight"] = A[0].clone().fill_(float("nan"))
    cases.append((nan, r"cross_attn\.o\.lora_A\.weight' contains NaN"))
    cases.append(({"foo.weight": A[0]}, r"no LoRA key of the formats.*'foo\.weight'"))
    for tensors, pattern in cases:
        with pytest.raises(LoRAFormatError, match=pattern):
            load_lora(_write(tmp_path, tensors), VOCAB)
    with pytest.raises(LoRAFormatError, match=r"expected \(8, 96\) \(rank 8\)"):
        load_lora(_write(tmp_path, good), VOCAB, rank=8)


def test_general_lora_loader_fuses_to_the_functional_output(tmp_path, dit):
    from diffsynth.utils.lora import GeneralLoRALoader

    lora = _lora(1, scale=0.7)
    A, B = lora.factors(0)
    path = tmp_path / "export.safetensors"
    save_lora(path, A, B, VOCAB, {"prompt": "p", "base_model_hash": "h"})
    fused = copy.deepcopy(dit)
    GeneralLoRALoader().fuse_lora_to_base_model(fused, load_tensors(path), alpha=1.0)
    x, t, c = _inputs(2)
    with torch.no_grad():
        want = dit_forward(fused, x, t, c)
        got = dit_forward(copy.deepcopy(dit), x, t, c, lora=load_lora(path, VOCAB).to_weights())
        assert (want - dit_forward(dit, x, t, c)).abs().mean() > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_response_map_by_hand():
    A = torch.tensor([[1.0, 0.0, 2.0]])  # (r=1, in=3)
    B = torch.tensor([[0.1], [0.0]])  # (out=2, r=1) -> dW = [[0.1, 0, 0.2], [0, 0, 0]]
    W = torch.tensor([[1.0, 0.0, 20.0], [0.0, 1.0, 1.0]])
    R = response_map(A, B, W, tau=0.02)
    # |dW/W|: 0.1 > .02 yes; 0/0 no; 0.2/20=0.01 no; row 2 all zero
    assert R.tolist() == [[True, False, False], [False, False, False]]
    assert response_map(A, B, torch.zeros(2, 3), tau=0.02).tolist() == [[True, False, True], [False, False, False]]


def test_response_stats_by_depth_and_type(dit):
    vocab = Vocabulary.from_dit_config(CFG, modules=ALL_MODULES)
    W = base_weights(dit, vocab)
    A = [torch.ones(1, m.in_features) for m in vocab]
    B = [torch.zeros(m.out_features, 1) if m.block == 0 else torch.full((m.out_features, 1), 10.0) for m in vocab]
    stats = response_stats(A, B, W, vocab)
    assert stats["by_block"] == [0.0, pytest.approx(1.0, abs=1e-3)]
    assert set(stats["by_module"]) == set(ALL_MODULES)
    assert stats["by_module"]["ffn.0"] == pytest.approx(0.5, abs=1e-3)
    assert stats["fraction"] == pytest.approx(0.5, abs=1e-3)
