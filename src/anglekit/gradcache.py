"""GradCache: the loss of a large batch on the activation memory of a small one.

Contrastive terms couple every example of a batch, so the batch cannot simply be split into
accumulation steps. Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (arXiv 2101.06983) split the work instead:

1. embed the batch chunk by chunk without a graph, ``e = f(x)``, recording each chunk's RNG
   state; keep only the ``(R, D)`` embeddings;
2. compute the loss ``L(e)`` on the whole batch and its gradient ``g = dL/de`` (the loss graph
   holds only embeddings, never activations);
3. embed each chunk again with a graph, restoring its RNG state so dropout draws the same
   masks, and back-propagate the surrogate ``sum(e_chunk * g_chunk)``, whose parameter
   gradient is the chunk's share of ``dL/dtheta``.

The parameter gradients equal those of one forward and backward over the whole batch (with the
same dropout masks) up to float rounding, for any loss of the embeddings: every AnglE term
(cosine, in-batch negatives, angle, contrastive with hard negatives) and cross-device gathering.
Peak activation memory is that of one chunk; the price is a second forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

__all__ = ["RngState", "gradcache_backward", "split_rows"]


class RngState:
    """The CPU and current-CUDA-device RNG states at construction, restorable later."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the recorded state; the surrounding RNG stream is preserved."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def split_rows(
    inputs: dict[str, torch.Tensor], rows_per_chunk: int
) -> list[dict[str, torch.Tensor]]:
    """Split a padded batch into chunks of rows, trimming padding columns no row of a chunk uses.

    Only trailing columns are trimmed (right padding), so the positions of real tokens never
    change; the kept length stays a multiple of 8 where the batch's was.
    """
    total, length = inputs["attention_mask"].shape  # (R, T)
    chunks = []
    for start in range(0, total, rows_per_chunk):
        chunk = {k: v[start : start + rows_per_chunk] for k, v in inputs.items()}
        used = chunk["attention_mask"].any(dim=0).nonzero()
        last = int(used.max()) + 1 if used.numel() else 1
        keep = min(length, -(-last // 8) * 8)
        if not bool(chunk["attention_mask"][:, keep:].any()):
            chunk = {k: v[:, :keep] for k, v in chunk.items()}
        chunks.append(chunk)
    return chunks


def gradcache_backward(
    embed: Callable[..., torch.Tensor],
    inputs: dict[str, torch.Tensor],
    rows_per_chunk: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Compute ``loss_fn(embed(**inputs))`` and back-propagate it into the parameters by chunks.

    Args:
        embed: the model: keyword tensors of ``(r, T)`` rows to ``(r, D)`` embeddings.
        inputs: the whole batch, ``input_ids`` and ``attention_mask`` of shape ``(R, T)``.
        rows_per_chunk: rows embedded at once (a multiple of the texts per example keeps whole
            examples together, which only matters for readability of logs).
        loss_fn: ``(R, D)`` float32 embeddings to the scalar loss (already scaled as the
            caller's optimiser expects, e.g. divided by the accumulation steps).
        backward: how to back-propagate a scalar (``accelerator.backward`` under the Trainer,
            for loss scaling); called once per chunk.
        no_sync: a context that defers gradient synchronisation across devices (DDP
            ``no_sync``); every chunk but the last runs under it.

    Returns:
        The detached loss.
    """
    chunks = split_rows(inputs, rows_per_chunk)
    device = inputs["attention_mask"].device
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            cached.append(embed(**chunk).float())  # (r, D)
    reps = torch.cat(cached).requires_grad_()  # (R, D), no activations behind it
    with torch.enable_grad():
        loss = loss_fn(reps)
    (grads,) = torch.autograd.grad(loss, reps)  # (R, D)
    bounds = torch.tensor([c["attention_mask"].shape[0] for c in chunks]).cumsum(0).tolist()
    for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
        grad = grads[(bounds[i - 1] if i else 0) : bounds[i]]  # (r, D)
        last = i == len(chunks) - 1
        with state.replay(), contextlib.nullcontext() if last else no_sync():
            emb = embed(**chunk).float()  # (r, D), with its graph
            backward((emb * grad).sum())
    return loss.detach()
