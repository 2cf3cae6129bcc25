"""Self-attention over 257 tokens (240 matrices x 12 heads, head dim 64, bf16) on CUDA: cuDNN at
257 tokens against 256, and the CLS key computed apart and merged through the log-sum-exp
(eager and compiled). Prints JSON. The README quotes one H100 run of it."""
import json, torch, torch.nn.functional as F
torch.manual_seed(0)
n, s, h, hd = 240, 257, 12, 64
dev = "cuda"
qkv = torch.randn(n, s, 3, h, hd, device=dev, dtype=torch.bfloat16)
q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (n, h, s, hd) strided
def t(fn, r=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(r): fn()
    b.record(); b.synchronize()
    return a.elapsed_time(b) / r
res = {}
res["sdpa_257"] = t(lambda: F.scaled_dot_product_attention(q, k, v))
qp, kp, vp = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]
res["sdpa_256_strided"] = t(lambda: F.scaled_dot_product_attention(qp, kp, vp))
out = torch.ops.aten._scaled_dot_product_cudnn_attention(qp, kp, vp, None, True, 0.0, False, False)
res["lse_shape"] = list(out[1].shape); res["lse_dtype"] = str(out[1].dtype); res["out_stride"] = list(out[0].stride())
res["cudnn_lse_256"] = t(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qp, kp, vp, None, True, 0.0, False, False))
def split(q, k, v):
    qp, kp, vp = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qp, kp, vp, None, True, 0.0, False, False)[:2]
    scale = q.shape[-1] ** -0.5
    c = (qp.float() * k[:, :, :1].float()).sum(-1) * scale
    beta = torch.sigmoid(c - lse.reshape(c.shape))
    yp = o.float() + beta[..., None] * (v[:, :, :1].float() - o.float())
    yc = F.scaled_dot_product_attention(q[:, :, :1], k, v)
    return torch.cat([yc, yp.to(q.dtype)], 2).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, -1)
got = split(q, k, v)
res["split_err"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
cs = torch.compile(split, dynamic=False)
got2 = cs(q, k, v)
res["split_compiled_err"] = ((got2.float() - ref.float()).norm() / ref.float().norm()).item()
res["split_eager"] = t(lambda: split(q, k, v))
res["split_compiled"] = t(lambda: cs(q, k, v))
res["sdpa_257_plus_merge_heads"] = t(lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, -1))
print(json.dumps(res, indent=1))
