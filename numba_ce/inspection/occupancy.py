"""Theoretical occupancy: how many blocks of a kernel one SM holds at once, and what limits it.

For a block of T threads using R registers a thread and S bytes of static shared memory:

    warps a block      W = ceil(T / 32)
    by threads         threads_per_SM // (32 W), at most blocks_per_SM
    by registers       registers_per_SM // (W * ceil(32 R / 256) * 256)   (allocated per warp)
    by shared memory   shared_per_SM // ceil(S + reserved, 128) * 128      (1 KB reserved a block)
    occupancy          blocks * W / (threads_per_SM / 32)   resident warps over the most possible

Latency hiding needs many warps per SM; a 1024-thread block with 64 registers a thread already
fills the 65536-register file, so one such block fits and occupancy is 50%.
"""
from typing import NamedTuple

from .compiler import arch_name

WARP = 32


class SMLimits(NamedTuple):
    registers: int
    threads: int
    blocks: int
    shared_bytes: int
    reserved_shared_per_block: int = 1024
    register_unit: int = 256  # registers are allocated per warp, in units of 256
    shared_unit: int = 128


# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
SM_LIMITS = {
    (8, 0): SMLimits(65536, 2048, 32, 164 * 1024),  # A100
    (8, 6): SMLimits(65536, 1536, 16, 100 * 1024),
    (8, 9): SMLimits(65536, 1536, 24, 100 * 1024),  # L4, L40, RTX 40xx
    (9, 0): SMLimits(65536, 2048, 32, 228 * 1024),  # H100, H200
}


class Occupancy(NamedTuple):
    blocks_per_sm: int
    warps_per_sm: int      # resident warps
    max_warps_per_sm: int
    limited_by: str        # the resource(s) that allow the fewest blocks

    @property
    def fraction(self):
        return self.warps_per_sm / self.max_warps_per_sm


def occupancy(capability, threads, registers, shared_bytes):
    """The :class:`Occupancy` of blocks of ``threads`` threads on an SM of ``capability``."""
    if capability not in SM_LIMITS:
        known = ", ".join(arch_name(c) for c in SM_LIMITS)
        raise ValueError(f"SM limits are known for {known} (got {arch_name(capability)})")
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (got {threads})")
    sm = SM_LIMITS[capability]
    warps = -(-threads // WARP)
    register_warp = -(-registers * WARP // sm.register_unit) * sm.register_unit
    shared_block = -(-(shared_bytes + sm.reserved_shared_per_block) // sm.shared_unit) \
        * sm.shared_unit
    limits = {
        "threads": sm.threads // (warps * WARP),
        "blocks": sm.blocks,
        "registers": sm.registers // (warps * register_warp) if registers else sm.blocks,
        "shared memory": sm.shared_bytes // shared_block,
    }
    blocks = min(limits.values())
    limited_by = " and ".join(name for name, value in limits.items() if value == blocks)
    return Occupancy(blocks, blocks * warps, sm.threads // WARP, limited_by)
