"""lofa.kernels.attention: the prediction attention kernel (QK norms inside) against the torch math.

On a CPU the Triton kernel runs under Triton's interpreter (in a subprocess: the interpreter
is chosen when Triton is imported), in fp32 and fp16 (the interpreter has no bf16); on CUDA
(skipped in CI) the compiled kernel runs in bf16 at the Wan2.1-1.3B shapes and inside the
hypernetwork's prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lofa.kernels import attention

triton = pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_INTERPRETED = textwrap.dedent("""
    import json, torch
    from lofa.kernels import attention as A
    torch.manual_seed(0)
    worst = {}
    cases = [(70, 37, False), (65, 65, False), (64, 33, True), (33, 70, True), (129, 66, True),
             (5, 3, False), (33, 33, True), (17, 17, False), (257, 65, True)]
    for dtype in (torch.float32, torch.float16):
        for rows, keys, masked in cases:
            B, H, hd = 2, 2, 32
            q = torch.randn(B, rows, 3, H, hd, dtype=dtype)[:, :, 0].transpose(1, 2)   # strided, as from qkv
            k = torch.randn(B, keys, H, hd, dtype=dtype).transpose(1, 2)
            v = torch.randn(B, keys, 2 * H * hd, dtype=dtype)[..., :H * hd].reshape(B, keys, H, hd).transpose(1, 2)
            mask = None
            if masked:
                mask = torch.rand(B, keys) > 0.3
                mask[:, 0] = True
            qg = torch.rand(hd) + 0.5
            for q_gain in (qg, None):
                ref = A.reference(q.double(), k.double(), v.double(), mask,
                                  None if q_gain is None else q_gain.double(), 1e-6).transpose(1, 2)
                for bm, bn, tails in [(32, 32, True), (16, 32, False), (32, 16, True), (16, 16, True)]:
                    out = torch.full((B, rows, H, hd), float("nan"), dtype=dtype)
                    A.launch(q, k, v, mask, q_gain, 1e-6, out.transpose(1, 2), bm, bn, tails=tails)
                    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                    key = str(dtype)
                    worst[key] = max(worst.get(key, 0.0), err if err == err else float("inf"))
    # the short-sequence kernel: keys one whole tile (+1), both norms inside, every query tile
    for dtype in (torch.float32, torch.float16):
        for rows, keys in [(70, 33), (65, 65), (33, 16), (5, 17), (129, 64), (257, 65)]:
            B, H, hd = 2, 2, 32
            q = torch.randn(B, rows, 3, H, hd, dtype=dtype)[:, :, 0].transpose(1, 2)
            k = (3 * torch.randn(B, keys, 2, H, hd, dtype=dtype))[:, :, 1].transpose(1, 2)
            v = torch.randn(B, keys, H, hd, dtype=dtype).transpose(1, 2)
            kg = torch.rand(hd) + 0.5
            for q_gain in (torch.rand(hd) + 0.5, None):
                ref = A.reference(q.double(), k.double(), v.double(), None,
                                  None if q_gain is None else q_gain.double(), 1e-6, kg.double()).transpose(1, 2)
                for bm in (16, 32):
                    out = torch.full((B, rows, H, hd), float("nan"), dtype=dtype)
                    A.launch_short(q, k, v, q_gain, kg, 1e-6, out.transpose(1, 2), block_m=bm)
                    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                    key = "short " + str(dtype)
                    worst[key] = max(worst.get(key, 0.0), err if err == err else float("inf"))
    print(json.dumps(worst))
""")


_OLD_INTERPRETER = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8)


@pytest.mark.slow  # Triton's interpreter in a subprocess (~45 s)
@pytest.mark.skipif(_OLD_INTERPRETER, reason="Triton < 3.8's interpreter fails on a loop bounded by a kernel "
                                               "argument under numpy 2 (int() of a 1-element array)")
def test_kernel_matches_the_torch_math_under_the_interpreter():
    """Every tiling path: whole tiles, a masked last tile, the shifted last query tile, one key
    on vectors, a key mask, with and without the q norm; fp32 to 1e-6 and fp16 to its rounding.
    And the short-sequence kernel (k normalised inside, one program per head): whole key tiles
    and one more key, query rows under, at and over a tile, the last tile shifted."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    assert worst["torch.float32"] < 1e-6 and worst["short torch.float32"] < 1e-6, worst
    assert worst["torch.float16"] < 3e-3 and worst["short torch.float16"] < 3e-3, worst


def test_torch_path_equals_the_hypernet_attention_math():
    """The op's torch path (CPU) is the RMS-normed q against k, v, heads merged."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    qg = torch.rand(16, dtype=torch.float64)
    out = attention.attention(q, k, v, None, qg, 1e-6)
    qn = torch.nn.functional.rms_norm(q, (16,), qg, 1e-6)
    ref = torch.softmax(qn @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    assert out.shape == (3, 9, 2, 16) and out.is_contiguous()
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-10, atol=1e-10)
    kg = torch.rand(16, dtype=torch.float64)
    out = attention.attention(q, k, v, None, qg, 1e-6, kg)
    kn = torch.nn.functional.rms_norm(k, (16,), kg, 1e-6)
    ref = torch.softmax(qn @ kn.transpose(-1, -2) / 4.0, dim=-1) @ v
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_short_kernel_takes_only_what_it_can():
    """One whole power-of-two tile of 16..256 keys, or one more; k normalised; no key mask."""
    gain = torch.ones(16)
    assert all(attention.short_applies(n, None, gain) for n in (16, 17, 64, 65, 256, 257))
    assert not any(attention.short_applies(n, None, gain) for n in (15, 18, 100, 258, 512, 513))
    assert not attention.short_applies(257, torch.ones(1, 257, dtype=torch.bool), gain)
    assert not attention.short_applies(257, None, None)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="launch_short takes"):
        attention.launch_short(q, torch.randn(1, 1, 100, 16), torch.randn(1, 1, 100, 16), None, gain, 1e-6,
                               torch.empty(1, 1, 8, 16))


def test_bad_shapes_are_refused():
    q = torch.randn(2, 3, 5, 16)
    with pytest.raises(ValueError, match="disagree"):
        attention.reference(q, torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), None, None, 1e-6)
    with pytest.raises(ValueError, match="mask"):
        attention.reference(q, q, q, torch.ones(2, 4, dtype=torch.bool), None, 1e-6)


def _assert_as_close_as_sdpa(q, k, v, q_gain, k_gain=None):
    """The op's output is within bf16 rounding of an fp64 reference, about as close as SDPA's."""
    out = attention.attention(q, k, v, None, q_gain, 1e-6, k_gain)
    ref = attention.reference(q.double(), k.double(), v.double(), None, q_gain.double(), 1e-6,
                              None if k_gain is None else k_gain.double()).transpose(1, 2)
    sdpa = attention.reference(q, k, v, None, q_gain, 1e-6, k_gain).transpose(1, 2).double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    err_sdpa = ((sdpa - ref).norm() / ref.norm()).item()
    assert err < 1.5 * err_sdpa + 1e-3, (err, err_sdpa)


@cuda
def test_kernel_at_the_wan_shapes_in_bf16():
    """240 matrices x 257 tokens x 12 heads x 64 (the self-attention of a prediction), q strided in a
    qkv product's output: within bf16 rounding of an fp64 reference, about as close as SDPA."""
    torch.manual_seed(0)
    n, s, h, hd = 240, 257, 12, 64
    qkv = torch.randn(n, s, 3 * h * hd, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(n, s, h, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    qg = (torch.rand(hd, device="cuda") + 0.5).bfloat16()
    _assert_as_close_as_sdpa(q, k, v, qg)
    # k normalised too: the short-sequence kernel (k read raw, where the product wrote it)
    _assert_as_close_as_sdpa(q, 3 * k, v, qg, (torch.rand(hd, device="cuda") + 0.5).bfloat16())


@cuda
def test_kernel_at_the_text_cross_attention_shape_in_bf16():
    """One prompt's queries (a slice of the 61,680) against 512 text keys: whole key tiles, where the
    softmax scale rides on the q norm's gain; as close to fp64 as SDPA."""
    torch.manual_seed(0)
    rows, keys, h, hd = 8 * 257, 512, 12, 64
    q = torch.randn(1, rows, h, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2) * 3
    kv = torch.randn(1, keys, 2 * h * hd, device="cuda", dtype=torch.bfloat16)
    k, v = (t.view(1, keys, h, hd).transpose(1, 2) for t in kv.chunk(2, dim=-1))
    _assert_as_close_as_sdpa(q, k, v, (torch.rand(hd, device="cuda") + 0.5).bfloat16())
