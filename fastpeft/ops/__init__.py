"""The op layer: one module per op family, each holding its autograd Function(s) on the triton kernels
(``fastpeft.kernels``) and the glue they need. ``fastpeft.functional`` picks the backend and calls in here;
nothing in here imports ``functional``.

- ``common``: what the families share (the dropout seed, autocast casting, the frozen layer's dW / db,
  the keys of the timed GEMM choices).
- ``lora``: ``LoRALinearFunction`` (``lora_linear``), and the LoRA GEMM and factor gradients that the
  sparse family reuses.
- ``multi``: ``LoRAMultiFunction`` (``lora_linear_multi``: many adapters in one batch).
- ``sparse``: ``SparseDeltaLinearFunction`` / ``LoRASparseLinearFunction`` (``sparse_delta_linear``,
  ``lora_sparse_linear``) and the plans of a delta's indices (``build_sparse_plan``).
"""
