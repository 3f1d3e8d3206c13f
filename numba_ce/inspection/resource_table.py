"""What a kernel uses per thread and per block, and what that means for occupancy."""
from typing import NamedTuple

from ..floatbits import FORMATS
from . import tools
from .compiler import arch_name, compiled
from .launches import DEFAULT_SHAPE, KERNELS, PLAIN
from .occupancy import SM_LIMITS, occupancy


class Resources(NamedTuple):
    kernel: str
    dtype: str        # the logits' dtype ("-" where the kernel does not depend on it)
    arch: str
    pack: str         # logits elements a load, for the row kernels
    registers: int    # per thread
    shared_bytes: int  # shared memory per block: static and dynamic
    local_bytes: int  # local memory per thread (stack frame, spills included)
    spill_stores: int
    spill_loads: int
    barriers: int
    grid: int
    block: int
    occupancy: object  # an Occupancy, or None where the SM limits of `arch` are not known


def resources(kernel, dtype="bfloat16", arch=None, shape=DEFAULT_SHAPE, variant=PLAIN):
    """The :class:`Resources` of ``kernel`` compiled as in :func:`numba_ce.inspection.ptx`: ptxas's
    report, the launch configuration numba_ce.planning picks for ``shape``, the theoretical
    occupancy."""
    built = compiled(kernel, dtype, arch, shape, variant)
    launch = built.launch
    report = tools.parse_report(built.assembly.report, built.entry)
    # static shared memory (ptxas) plus the dynamic shared memory of the launch
    report = report._replace(shared_bytes=report.shared_bytes + launch.shared)
    spec = KERNELS[kernel]
    per_dtype = spec.per_dtype
    # a packed kernel's first argument is the logits (gradient) as integer words of `pack` elements
    pack = str(launch.signature[0].dtype.bitwidth // FORMATS[dtype][0]) if spec.packed else "-"
    fits = None
    if built.capability in SM_LIMITS:
        fits = occupancy(built.capability, launch.block, report.registers, report.shared_bytes)
    return Resources(kernel, dtype if per_dtype else "-", arch_name(built.capability), pack,
                     *report, launch.grid, launch.block, fits)


COLUMNS = ("kernel", "dtype", "arch", "pack", "registers", "shared", "local", "spills st/ld",
           "barriers", "grid", "block", "blocks/SM", "occupancy", "limited by")


def format_table(rows):
    """A text table of :class:`Resources`, one line each."""
    cells = [COLUMNS]
    for r in rows:
        fits = r.occupancy
        if fits is None:
            occupied = ("?", "?", "SM limits unknown")
        else:
            warps = f"{fits.warps_per_sm}/{fits.max_warps_per_sm} warps"
            occupied = (str(fits.blocks_per_sm), f"{fits.fraction:.0%} ({warps})", fits.limited_by)
        cells.append((
            r.kernel, r.dtype, r.arch, r.pack, str(r.registers), f"{r.shared_bytes} B",
            f"{r.local_bytes} B", f"{r.spill_stores}/{r.spill_loads} B", str(r.barriers),
            str(r.grid), str(r.block), *occupied))
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in cells)
