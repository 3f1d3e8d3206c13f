"""numba-cuda 0.30 under NumPy 2.5: two lines of numba-cuda that NumPy 2.5 breaks, mended here.

* ``numba/cuda/np/arrayobj.py`` registers a CUDA overload of ``np.row_stack``, which NumPy 2.5
  removed (deprecated since 2.0), without checking that it exists. Its typing context imports
  that module at the first GPU compile, so every kernel launch and ``cuda.compile_ptx`` raises
  AttributeError. (``import numba.cuda`` and the simulator work; numba 0.68 guards its own copy
  of the line.)
* ``numba/cuda/np/npdatetime_helpers.py`` makes a timedelta64 NaT without a unit, which NumPy 2.5
  deprecates: ``import numba.cuda`` issues a DeprecationWarning, an error under ``python -W
  error`` or pytest's ``filterwarnings = error``. (numba 0.68's copy of the line names a unit.)

The 0.30 line is in maintenance mode, and upstream has declined to fix the first there (issue 17).
So, only where NumPy lacks ``row_stack`` (2.5 on) and numba-cuda is 0.30.x, the module that needs
the name is imported here, with ``np.row_stack`` lent for the duration of the import (it was an
alias of ``np.vstack``) and that one warning ignored; the import brings in ``numba.cuda`` and its
datetime helpers first. Then the name is taken back: NumPy's namespace and the warning filters
are left as they were (numba and numba-cuda install no filter at import, so none is lost). The
first compile would make the import anyway; the simulator, which compiles nothing, pays < 0.1 s.
Nothing else changes. Delete this module when numba-cuda moves past 0.30.
"""
import warnings

import numba_cuda
import numpy as np

if not hasattr(np, "row_stack") and numba_cuda.__version__.startswith("0.30."):
    np.row_stack = np.vstack
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The 'generic' unit for NumPy timedelta",
                                    DeprecationWarning, r"numba\.cuda\.np\.npdatetime_helpers$")
            import numba.cuda.np.arrayobj  # noqa: F401  (its overloads, row_stack's among them)
    finally:
        del np.row_stack
