"""Text encoders and video codecs of both profiles, behind two factories.

Profiles: ``synthetic`` (MiniLM token embeddings, :class:`SynthCodec`) and
``wan`` (umT5-XXL, Wan2.1 VAE, from local files). Only this package imports
diffsynth's text-encoder and VAE classes, lazily, when a ``wan`` one is built.
"""

from lofa.encoders.text import (PROFILES, MiniLMTextEncoder, T5Dims, TextEmbedding, TextEncoder,
                                WanT5TextEncoder, build_text_encoder, check_profile)
from lofa.encoders.video import (SynthCodec, VideoCodec, WanVAECodec, build_codec, check_latent,
                                 check_video, latent_shape)

__all__ = [
    "PROFILES", "MiniLMTextEncoder", "SynthCodec", "T5Dims", "TextEmbedding", "TextEncoder",
    "VideoCodec", "WanT5TextEncoder", "WanVAECodec", "build_codec", "build_text_encoder",
    "check_latent", "check_profile", "check_video", "latent_shape",
]
