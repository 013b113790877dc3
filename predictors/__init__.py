"""Sparsity predictors: which FFN neurons will fire for a given FFN input.

Knows nothing of the cache or the engine; fits from arrays it is given.
"""
