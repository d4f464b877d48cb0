"""Cross-device in-batch negatives: all-gather a batch's embeddings with gradients.

Under data-parallel training each device embeds its own ``B`` examples. Without gathering, the
in-batch negative and contrastive terms compare each text with the ``2B - 1`` texts of its own
device only. :func:`gather_batch` all-gathers the ``(B, K, D)`` embeddings (and labels) of all
``W`` devices, so every device computes the loss of the whole ``W * B`` global batch and each
text meets ``2 W B - 1`` others.

Gradient convention: every device computes the *same* global loss ``L``. The backward of
``torch.distributed.nn.functional.all_gather`` sums, over devices, the gradients of ``L`` with
respect to each device's slice, so a device's local embeddings receive ``W * dL/de``. DDP then
averages parameter gradients over the ``W`` devices, which cancels the factor: the update equals
that of one process computing ``L`` on the concatenated batch.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["end_process_group", "gather_batch", "world_size"]


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def end_process_group() -> None:
    """Close the default group (a launcher's, e.g. torchrun's) if there is one: left to the
    interpreter's shutdown, its communication threads can outlive it and abort the process
    after a finished run."""
    import torch.distributed as dist

    if _initialized():
        dist.destroy_process_group()


def gather_batch(
    embeddings: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All-gather every device's batch, keeping the graph to this device's embeddings.

    Devices may hold different numbers of examples (duplicate dropping shrinks some batches):
    each batch is padded to the largest one for the collective and the padding removed after.

    Args:
        embeddings: ``(B_r, K, D)`` this device's embeddings.
        labels: ``(B_r,)`` its labels, or ``None`` for data without labels.

    Returns:
        ``(sum_r B_r, K, D)`` embeddings and ``(sum_r B_r,)`` labels (or ``None``), in rank
        order. Gradients flow back to ``embeddings`` only through this device's own rows.
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if world_size() == 1:
        return embeddings, labels
    n = embeddings.shape[0]
    sizes = [
        torch.zeros(1, dtype=torch.long, device=embeddings.device) for _ in range(world_size())
    ]
    dist.all_gather(sizes, torch.tensor([n], device=embeddings.device))
    counts = [int(s.item()) for s in sizes]
    most = max(counts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros((most - n, *x.shape[1:]))]) if most > n else x

    with warnings.catch_warnings():  # its successor lacks a gloo backward; this one has one
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(pad(embeddings))  # W x (most, K, D), differentiable
    gathered = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    if labels is None:
        return gathered, None
    label_parts = [torch.empty_like(pad(labels)) for _ in counts]
    dist.all_gather(label_parts, pad(labels).contiguous())
    return gathered, torch.cat([p[:c] for p, c in zip(label_parts, counts, strict=True)])
