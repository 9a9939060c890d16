"""Memory policy of a training process: how freed CPU memory goes back to the OS, and which activations are kept.

``free_memory`` (``TrainSettings.free_memory``) chooses what glibc does with activation memory once it is freed:

* ``keep``: glibc's default; freed memory stays in malloc's heap for reuse (fastest, highest peak RSS: the heap
  fragments as activations of varying lengths are freed);
* ``trim``: ``malloc_trim`` after every micro-batch's backward and on every 10th decoder-layer call in training
  mode (forward and recompute), which bounds the fragmentation while keeping the reuse inside a layer;
* ``unmap``: allocations of 128 KiB and more are mmapped, so each large tensor goes back to the OS when freed
  (lowest peak RSS; every tensor then costs fresh page faults).

Activation checkpointing recomputes every ``every``-th decoder layer in backward; the first ``selective_layers``
of those keep their matmul and attention outputs (selective activation checkpointing), so their recompute redoes
only cheap elementwise ops. Measurements of both: docs/benchmarks.md, "Memory policy notes".
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _glibc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def free_memory_policy(model, mode: str) -> Callable[[], None]:
    """Apply ``free_memory`` = ``mode`` (keep, trim, unmap; see the module docstring) to a CPU process training
    ``model``; returns what to call after each micro-batch's backward. A no-op on GPUs and off glibc."""
    libc = _glibc()
    if mode == "keep" or libc is None or any(p.is_cuda for p in model.parameters()):
        return lambda: None
    if mode == "unmap":
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        return lambda: None
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]

    def every_tenth_layer(module, args):
        # the heap fragments as variable-length activations are freed; trimming now and then bounds it
        # without giving up the reuse of freed memory inside a layer (which unmap gives up)
        if module.training:
            calls[0] += 1
            if calls[0] % 10 == 0:
                libc.malloc_trim(0)

    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and not getattr(layer, "_alignline_trims", False):
            layer.register_forward_pre_hook(every_tenth_layer)
            layer._alignline_trims = True  # a model trained again (tso mini-batches) keeps one hook
    return lambda: libc.malloc_trim(0)


def _keep_matmul_outputs(ctx, op, *args, **kwargs):
    """Selective-checkpointing policy: keep what is expensive to recompute (matmuls, attention)."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_EXPENSIVE_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)}


def enable_checkpointing(model, *, every: int = 1, selective_layers: int = 0) -> None:
    """Activation checkpointing on every ``every``-th decoder layer; the first ``selective_layers`` of those
    keep matmul and attention outputs (their recompute redoes only elementwise ops)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5 name; older: gradient_...
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    selective = functools.partial(checkpoint, use_reentrant=False, context_fn=functools.partial(
        create_selective_checkpoint_contexts, _keep_matmul_outputs))
    checkpointed = 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
        if layer.gradient_checkpointing:
            if checkpointed < selective_layers:
                layer._gradient_checkpointing_func = selective
            checkpointed += 1
