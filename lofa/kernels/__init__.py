"""GPU speed machinery, kept apart from the method: attention kernels (Triton, FlashAttention 4),
cuBLASLt epilogues, the fused stage-I loss and the fused Wan block. Each kernel has a plain
PyTorch equivalent in the model code; the tests compare the two."""
