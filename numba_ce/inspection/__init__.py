"""Kernel inspection: the Python source, PTX, SASS and resource use of every kernel, and a
roofline report. Compiles offline (no GPU needed) for sm_90 by default, or for the visible GPU.

    from numba_ce import inspection
    inspection.kernel_names()  # ['fused', 'loss', 'target_stats', 'probability_stats',
                               #  'reduce_rows', 'scale', 'slice', 'round']
    inspection.ptx("fused", "bfloat16")             # PTX for sm_90, as the GPU path compiles it
    inspection.resources("fused", "bfloat16")       # registers, shared/local memory, occupancy
    inspection.ptx("fused", variant=inspection.Variant(softcap=30.0))  # the softcap specialisation
    inspection.ptx("fused", variant=inspection.Variant(probability_targets=True))  # soft labels
    print(inspection.format_table([inspection.resources(k) for k in inspection.kernel_names()]))

The same from the shell: ``python -m numba_ce inspect --help`` and ``python -m numba_ce roofline
--help``. Compiling needs a process without NUMBA_ENABLE_CUDASIM=1, NVVM and NVRTC, and for
resources and SASS ptxas and nvdisasm: ``pip install 'numba_ce[inspect]'`` installs them all
(see :mod:`numba_ce.inspection.tools`). ``shape`` (N, V) decides what numba_ce.planning plans:
8-byte packed loads when V fills whole words, else one element a load; and the block size.
"""
from .compiler import compiled, default_arch, sass
from .launches import (DEFAULT_SHAPE, DTYPES, KERNELS, PLAIN, Variant, kernel_names,
                       kernel_source, planned_launch)
from .resource_table import Resources, format_table, resources
from .tools import ToolMissing


def ptx(kernel, dtype="bfloat16", arch=None, shape=DEFAULT_SHAPE, variant=PLAIN):
    """The PTX of ``kernel`` (a name from :func:`kernel_names`) as a call on ``shape`` logits of
    ``dtype`` with ``variant``'s options (softcap, label smoothing, class weights) launches it,
    for ``arch`` ('sm_90'; default: the visible GPU, else sm_90)."""
    return compiled(kernel, dtype, arch, shape, variant).ptx


def source(kernel):
    """The Python source of ``kernel``, headed by its file and line."""
    path, line, text = kernel_source(kernel)
    return f"# {path}:{line}\n{text}"


__all__ = ["DEFAULT_SHAPE", "DTYPES", "KERNELS", "PLAIN", "Resources", "ToolMissing", "Variant",
           "compiled", "default_arch", "format_table", "kernel_names", "planned_launch", "ptx",
           "resources", "sass", "source"]
