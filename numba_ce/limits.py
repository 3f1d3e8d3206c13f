"""The largest thread block, which every kernel is built for.

numba_ce.launcher compiles each kernel with this launch bound (``.maxntid 1024, 1, 1`` in its
PTX: numba_ce.ptx_edits), so ptxas keeps to 65536 / MAX_THREADS = 64 registers a thread and 1024
threads (two blocks of 512, or one of 1024) fit a multiprocessor; the block reductions size their
per-warp shared slots by it; numba_ce.launch never asks for a larger block.
"""
MAX_THREADS = 1024
