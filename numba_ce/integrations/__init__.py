"""numba_ce inside other libraries' training code; each subpackage needs its library (an extra).

    numba_ce.integrations.transformers   Hugging Face transformers: the transformers extra
"""
