"""The MLP with GELU epilogues (lofa.kernels.cublaslt): the same values and gradients as the plain MLP."""

from __future__ import annotations

import pytest
import torch

from lofa.kernels import cublaslt
from lofa.hypernet import MLP


def _grads(mlp: MLP, x: torch.Tensor, dy: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = cublaslt.gelu_mlp(x, mlp[0], mlp[2]) if fused else torch.nn.Sequential.forward(mlp, x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in mlp.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_gelu_mlp_function_matches_the_plain_mlp_on_cpu():
    torch.manual_seed(0)
    mlp = MLP(32, 4.0).double()
    x, dy = torch.randn(3, 7, 32, dtype=torch.float64), torch.randn(3, 7, 32, dtype=torch.float64)
    fused, plain = _grads(mlp, x, dy, True), _grads(mlp, x, dy, False)
    for name, a, b in zip(["y", "dx", "dW1", "db1", "dW2", "db2"], fused, plain):
        assert a.shape == b.shape, name
        assert _rel(a, b) < 1e-10, name
    # the GELU gradient is the tanh approximation's, not the exact GELU's
    h = torch.linspace(-4, 4, 101, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(h, approximate="tanh").sum().backward()
    assert torch.allclose(cublaslt._gelu_grad(h.detach()).double(), h.grad, atol=1e-6)
    assert not torch.allclose(cublaslt._gelu_grad(h.detach()).double(),
                              torch.autograd.grad(torch.nn.functional.gelu(h).sum(), h)[0], atol=1e-4)


@pytest.mark.slow  # torch.compile (~9 s)
def test_gelu_mlp_function_compiles_on_cpu():
    torch.manual_seed(1)
    mlp = MLP(16, 2.0)
    x, dy = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    eager = _grads(mlp, x, dy, True)
    compiled_fn = torch.compile(lambda t: cublaslt.gelu_mlp(t, mlp[0], mlp[2]), fullgraph=True)
    mlp.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_(True)
    compiled_fn(xc).backward(dy)
    for a, b in zip([xc.grad] + [p.grad for p in mlp.parameters()], eager[1:]):
        assert _rel(a, b) < 1e-5


def test_the_plain_mlp_is_used_off_cuda():
    assert not cublaslt.available(torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt epilogues need CUDA")
@pytest.mark.parametrize("rows, d", [(61680, 768), (1000, 64), (37, 36)])  # d = 36: the torch path
def test_cublaslt_mlp_matches_the_plain_mlp_on_cuda(rows, d):
    torch.manual_seed(2)
    assert cublaslt.available(torch.device("cuda"), torch.bfloat16)
    mlp = MLP(d, 4.0).cuda()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(rows, d, device="cuda")
    dy = torch.randn(rows, d, device="cuda") * 1e-2
    ref = _grads(mlp.double(), x.double(), dy.double(), False)
    mlp.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = _grads(mlp, x, dy, True)
        plain = _grads(mlp, x, dy, False)
    for name, a, b, r in zip(["y", "dx", "dW1", "db1", "dW2", "db2"], fused, plain, ref):
        err_fused, err_plain = _rel(a, r), _rel(b, r)
        assert a.dtype == b.dtype, name
        assert err_fused < max(2 * err_plain, 5e-3), (name, err_fused, err_plain)
    # the module takes this path by itself under autograd and autocast on CUDA
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(mlp(x.view(1, rows, d)).view(rows, d), fused[0])


def test_operands_cublaslt_cannot_take_go_the_torch_way():
    # the checks are about layout, which CPU tensors show as well; only CUDA ones pass them
    base = torch.zeros(64, 64)
    assert not cublaslt._served(base.bfloat16())  # not CUDA
    if torch.cuda.is_available():
        cuda = torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16)
        assert cublaslt._served(cuda)
        assert not cublaslt._served(cuda.float())  # dtype
        assert not cublaslt._served(cuda.t())  # not contiguous
        assert not cublaslt._served(cuda.view(-1)[1:-63].view(63, 64))  # 2-byte offset: misaligned
        assert not cublaslt._served(cuda[:, :60].contiguous())  # leading dimension not divisible by 8


def test_sublayers_split_into_inner_and_out_compute_the_module():
    """What the residual epilogue runs, out(inner(...)), is each sublayer's own forward; and the
    residual op's torch path is the sum it stands for."""
    from lofa.hypernet import CrossAttention, SelfAttention

    torch.manual_seed(3)
    x = torch.randn(4, 9, 32)
    attn, cross, mlp = SelfAttention(32, 4, True, 1e-6), CrossAttention(32, 4, True, 1e-6), MLP(32, 4.0)
    k, v = cross.context(torch.randn(2, 5, 32))
    with torch.no_grad():
        for module, args in ((attn, (x,)), (cross, (x, k, v, None)), (mlp, (x,))):
            torch.testing.assert_close(module.out(module.inner(*args)), module(*args), rtol=0, atol=0)
        h, w, b = torch.randn(36, 16), torch.randn(32, 16), torch.randn(32)
        r = torch.randn(36, 32)
        torch.testing.assert_close(cublaslt.addmm_residual(h, w, b, r), r + h @ w.t() + b)
        lin = torch.nn.Linear(16, 32)
        torch.testing.assert_close(cublaslt.linear_residual(h.view(4, 9, 16), lin, r.view(4, 9, 32)),
                                   r.view(4, 9, 32) + lin(h.view(4, 9, 16)))
