"""Sparse inference: the TensorFlow-only part of keras_prune.

`sparse_dense.SparseDense` (importable on any backend, so that `.keras`
files holding it can be read), the sparse formats and TensorFlow kernels of
`sparse_ops`, keras_prune's own C++ kernel in `native`, and `backend`, the
gate that raises a clear error where TensorFlow is needed and missing.
Nothing here is imported by the training side.
"""
