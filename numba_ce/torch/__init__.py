"""The PyTorch adapter: fused cross-entropy loss and gradient for torch tensors.

    import numba_ce.torch as nce
    loss = nce.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)  # (N, V), (N,)
    loss.backward()                      # the gradient was computed by the forward's kernel
    per_pixel = nce.cross_entropy(masks, pixels, weight, None, 255, None, "none")  # as torch's:
    # (N, C, H, W), (N, H, W) -> (N, H, W); torch's positional order, numba_ce's options by name
    crit = nce.CrossEntropyLoss(ignore_index=-100, softcap=30.0)
    loss = nce.linear_cross_entropy(hidden, head.weight, target)  # (N, H), (V, H): no N x V logits
    loss = nce.vocab_parallel_cross_entropy(local_logits, target, group=tp_group)  # (N, V / p)

CUDA tensors on a GPU (kernels on torch's current stream, memory from torch's allocator), or CPU
tensors in the CUDA simulator (NUMBA_ENABLE_CUDASIM=1). See :func:`cross_entropy`. The kernels
run as torch.library custom ops (numba_ce::..., registered on import: numba_ce.torch.ops,
numba_ce.torch.linear_ops), which torch.compile traces.
"""
try:
    import torch  # noqa: F401  (the adapter's modules need it: say how to install it first)
except ModuleNotFoundError as missing:
    if missing.name != "torch":
        raise
    raise ModuleNotFoundError("numba_ce.torch needs PyTorch, which is not installed: pip install "
                              "'numba_ce[torch]'", name="torch") from missing

from .functional import cross_entropy
from .linear import linear_cross_entropy
from .module import CrossEntropyLoss, LinearCrossEntropyLoss, VocabParallelCrossEntropyLoss
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "vocab_parallel_cross_entropy", "VocabParallelCrossEntropyLoss",
           "vocab_parallel_linear_cross_entropy"]
