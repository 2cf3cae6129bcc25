"""GPU speed machinery, kept apart from the method: attention kernels (Triton, FlashAttention 4),
the fused stage-I loss and the fused Wan block, and the dispatch that picks them. Each kernel has a plain
PyTorch equivalent in the model code; the tests compare the two."""
