"""Triton kernels (framework-free @triton.jit functions plus thin launch wrappers on torch tensors).

    na2d   2-D neighborhood attention forward / backward (NATTEN semantics)
    patch  patch merge / patch split GEMMs with the block regrouping in their loads and stores

Installed as megamed.kernels.triton; megamed.ops._triton registers them as backend `triton`.
Importing a submodule imports triton (`pip install megamed[triton]`); this package itself does not.
"""
