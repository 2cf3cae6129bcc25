"""lofa.kernels.flash: the attention switch, the FA4 custom operators' autograd and checkpoint wiring, and
diffsynth's guard against FA4's ``flash_attn`` namespace.

FA4's kernels need a Hopper GPU (benchmarks/bench_fit.py checks them there against SDPA). Here the
operators run with a reference kernel of FA4's call signature in their place, which tests lofa's
side: the layout, the saved tensors, the backward's argument order and the checkpoint policy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lofa.kernels import flash
from lofa.fit import FitConfig
from lofa.wan import Checkpointing, _checkpoint_kwargs


def _reference_fwd(q, k, v, return_lse=False):
    """FA4's ``_flash_attn_fwd`` contract in plain torch: (N, S, H, D) in, out and lse (N, H, S) out."""
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ vh
    return out.transpose(1, 2).to(q.dtype), lse, None, None, None


def _reference_bwd(q, k, v, out, dout, lse):
    """FA4's ``_flash_attn_bwd`` contract: the softmax backward from the saved output and lse."""
    scale = q.shape[-1] ** -0.5
    qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))
    p = (qh @ kh.transpose(-1, -2) * scale - lse[..., None]).exp()
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    grads = (ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale, p.transpose(-1, -2) @ doh)
    return tuple(g.transpose(1, 2).to(q.dtype) for g in grads)


@pytest.fixture
def reference_kernels(monkeypatch):
    calls = {"fwd": 0}

    def fwd(*args, **kwargs):
        calls["fwd"] += 1
        return _reference_fwd(*args, **kwargs)

    monkeypatch.setattr(flash, "_kernels", lambda: (fwd, _reference_bwd))
    return calls


def test_switch_values_and_cpu_fallback() -> None:
    q = torch.randn(1, 8, 2, 16)
    assert flash.backend() == os.environ.get("LOFA_ATTENTION", "auto")
    with flash.use("auto"):
        assert not flash.wants_fa4(q, 16)  # CPU: SDPA
    with flash.use("fa4"), pytest.raises(flash.FlashUnavailable, match="tensors on cpu"):
        flash.wants_fa4(q, 16)
    with pytest.raises(ValueError, match="'fa3' is not one of"):
        with flash.use("fa3"):
            pass
    with pytest.raises(ValueError, match=r"FitConfig.attention: 'fa3'"):
        FitConfig(attention="fa3")
    assert "attention" not in FitConfig().result_fields()  # speed only: changing it refits nothing


def test_custom_op_matches_sdpa_with_gradients(reference_kernels) -> None:
    g = torch.Generator().manual_seed(0)
    n, s, l, heads, d = 2, 12, 7, 3, 16
    q = torch.randn(n, s, heads * d, generator=g, requires_grad=True)
    k, v = (torch.randn(n, l, heads * d, generator=g, requires_grad=True) for _ in range(2))
    out = flash.attention(q, k, v, heads)
    ref = F.scaled_dot_product_attention(*(t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v)))
    ref = ref.transpose(1, 2).reshape(n, s, heads * d)
    # float32 on both sides; the two differ in summation order only (1e-5 is ~100 ulps of these sums)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    want = torch.autograd.grad(ref, (q, k, v), gout)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_selective_checkpoint_keeps_the_fa4_output(reference_kernels) -> None:
    """With ``save_attention`` the recompute in backward reuses the kernel's output: the forward
    kernel runs once per call, not twice; without it, twice."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 32, generator=g, requires_grad=True)
    w = torch.randn(32, 96, generator=g)

    def block(x):
        q, k, v = (x @ w).split(32, dim=-1)
        return flash.attention(q, k, v, 2).sum()

    for policy, runs in ((Checkpointing(save_attention=True), 1), (Checkpointing(), 2)):
        reference_kernels["fwd"] = 0
        checkpoint(block, x, use_reentrant=False, **_checkpoint_kwargs(policy)).backward()
        assert reference_kernels["fwd"] == runs, policy


@pytest.mark.slow  # a fresh interpreter importing diffsynth (~7 s)
def test_diffsynth_guard_against_fa4_namespace(tmp_path: Path) -> None:
    """A ``flash_attn`` that is only FA4's namespace package must not send diffsynth's blocks to
    FlashAttention 2's missing function."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    script = textwrap.dedent("""
        import torch
        import diffsynth.models.wan_video_dit as m
        assert m.FLASH_ATTN_2_AVAILABLE, "the namespace package should look like FA2 to diffsynth"
        from lofa.wan import WAN_TINY, build_dit, dit_forward
        dit = build_dit(WAN_TINY)
        assert not m.FLASH_ATTN_2_AVAILABLE
        out = dit_forward(dit, torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, 384))
        print("ok", tuple(out.shape))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (1, 16, 2, 8, 8)" in proc.stdout
