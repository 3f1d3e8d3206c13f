"""Benchmark harness for numba_ce against PyTorch eager, torch.compile and Liger-Kernel.

    python -m bench.run [--quick] [--providers ...] [--shapes NxV,...] [--out DIR]
    python -m bench.run --smoke --out DIR      # CPU only: the CUDA simulator, a tiny shape
    python -m bench.table                      # markdown tables of the latest run in the CSV
    python -m bench.plot                       # PNG: effective TB/s against V

Modules: :mod:`bench.cases` (what is measured: shapes, options, modes, inputs),
:mod:`bench.harness` (timers, byte model, peak memory, copy ceiling),
:mod:`bench.providers` (one class per implementation), :mod:`bench.results` (the CSV and the
environment it records), :mod:`bench.run` (the command line). See bench/NOTES.md.
"""
