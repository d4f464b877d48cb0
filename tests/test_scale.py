"""Scaling: GradCache equals the plain batch, cross-device negatives equal one process."""

from __future__ import annotations

import gc
import os
import shutil

import numpy as np
import pytest
import torch

from anglekit import AnglE, fit
from anglekit.batching import AngleCollator, TokenizedDataset
from anglekit.data import DataFormat, Example, TrainData
from anglekit.gradcache import gradcache_backward, split_rows
from anglekit.losses import AngleLoss

from .conftest import WORDS, write_jsonl


def _batch(model: AnglE, fmt: DataFormat) -> tuple[dict[str, torch.Tensor], int]:
    k = len(fmt.text_fields)
    examples = [
        Example(
            tuple(WORDS[(i + j) % len(WORDS)] for j in range(k)),
            float(i % 6) if fmt.has_label else None,
        )
        for i in range(10)
    ]
    data = TrainData(fmt, examples, "mem")
    ds = TokenizedDataset(data, model.tokenize)
    collate = AngleCollator(model.tokenizer.pad_token_id, drop_duplicates=False)
    return collate([ds[i] for i in range(len(ds))]), k


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fmt", [DataFormat.SCORED_PAIRS, DataFormat.TRIPLETS])
def test_gradcache_equals_full_batch_without_dropout(tiny_bert, fmt):
    """Every AnglE term: GradCache by chunks of 3 examples gives the full batch's gradients."""
    model = AnglE.from_pretrained(str(tiny_bert), device="cpu").eval()  # dropout off
    batch, k = _batch(model, fmt)
    labels = batch.pop("labels", None)
    loss_fn = AngleLoss(angle_w=1.0, ibn_threshold=3.0)
    full = loss_fn(model(**batch).view(-1, k, model.embedding_dim), labels)
    full.backward()
    expected = _grads(model)
    loss = gradcache_backward(
        model, batch, 3 * k, lambda e: loss_fn(e.view(-1, k, e.shape[-1]), labels)
    )
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    _assert_same(_grads(model), expected)


def test_gradcache_replays_dropout(tiny_bert):
    """With dropout on, GradCache equals one graph over the same chunks and the same masks."""
    model = AnglE.from_pretrained(str(tiny_bert), device="cpu").train()
    batch, k = _batch(model, DataFormat.SCORED_PAIRS)
    labels = batch.pop("labels")
    loss_fn = AngleLoss(angle_w=1.0, ibn_threshold=3.0)

    def objective(e):
        return loss_fn(e.view(-1, k, e.shape[-1]), labels)

    def reference(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        emb = torch.cat([model(**c) for c in split_rows(batch, 4 * k)])
        objective(emb).backward()
        return _grads(model)

    expected = reference(0)
    torch.manual_seed(0)
    gradcache_backward(model, batch, 4 * k, objective)
    _assert_same(_grads(model), expected)
    other = reference(1)  # other dropout masks: the replay is what makes the match
    assert any(not torch.allclose(other[n], expected[n], atol=1e-4) for n in expected)


def test_split_rows_trims_only_unused_trailing_padding():
    """Chunks keep every real token, drop trailing all-pad columns, stay a multiple of 8."""
    mask = torch.zeros(4, 24, dtype=torch.long)
    mask[0, :20], mask[1, :3], mask[2, :9], mask[3, :2] = 1, 1, 1, 1
    chunks = split_rows({"input_ids": mask * 7, "attention_mask": mask}, 2)
    assert [c["attention_mask"].shape for c in chunks] == [(2, 24), (2, 16)]
    assert sum(int(c["attention_mask"].sum()) for c in chunks) == int(mask.sum())


def _no_dropout_copy(src, dst):
    from transformers import BertModel

    shutil.copytree(src, dst)
    bert = BertModel.from_pretrained(str(dst), hidden_dropout_prob=0.0)
    bert.config.attention_probs_dropout_prob = 0.0
    bert.save_pretrained(str(dst))
    return dst


def test_fit_with_gradcache_and_accumulation_matches_plain(tiny_bert, sts_rows, tmp_path):
    """Through the Trainer (gradient accumulation 2), GradCache trains the same model."""
    model_dir = _no_dropout_copy(tiny_bert, tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", sts_rows)
    common = dict(
        dev_data=None,
        batch_size=6,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        drop_duplicates=False,
        group_by_length=False,
        bf16=False,
        progress=False,
        plots=False,
        ibn_threshold=3.0,
    )
    plain = fit(str(model_dir), str(train), output_dir=str(tmp_path / "plain"), **common)
    cached = fit(
        str(model_dir),
        str(train),
        output_dir=str(tmp_path / "cached"),
        gradcache_chunk_size=2,
        **common,
    )
    a = AnglE.from_pretrained(str(plain.model_dir), device="cpu").encode(WORDS)
    b = AnglE.from_pretrained(str(cached.model_dir), device="cpu").encode(WORDS)
    before = AnglE.from_pretrained(str(model_dir), device="cpu").encode(WORDS)
    moved = np.abs(a - before).max()  # Adam magnifies float rounding: compare to the update
    assert moved > 1e-2 and np.abs(a - b).max() < 0.01 * moved


def test_gradcache_under_bf16_autocast(tiny_bert):
    """Under bf16 autocast GradCache's gradients match the plain batch's up to bf16 rounding."""
    model = AnglE.from_pretrained(str(tiny_bert), device="cpu").eval()
    batch, k = _batch(model, DataFormat.SCORED_PAIRS)
    labels = batch.pop("labels")
    loss_fn = AngleLoss(ibn_threshold=3.0)

    def objective(e):
        return loss_fn(e.view(-1, k, e.shape[-1]), labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective(model(**batch)).backward()
        plain = torch.cat([g.flatten() for g in _grads(model).values()])
        gradcache_backward(model, batch, 2 * k, objective)
        cached = torch.cat([g.flatten() for g in _grads(model).values()])
    assert plain.norm() > 0
    assert torch.nn.functional.cosine_similarity(plain, cached, dim=0) > 0.99
    assert (plain - cached).norm() < 0.1 * plain.norm()


# ---- cross-device negatives on 2 gloo processes -------------------------------------------


def _full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 8, generator=g)  # 6 pairs of 8-d inputs
    labels = torch.tensor([0.0, 5.0, 4.0, 1.0, 4.5, 2.0])
    return x, labels


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))


class _RowEncoder(torch.nn.Module):
    """The encoder behind the model interface GradCache calls: rows of features to vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from anglekit.distributed import gather_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, labels = _full_batch()
    loss_fn = AngleLoss(angle_w=1.0, ibn_threshold=4.0)
    results = {}
    for name, split in (("even", 3), ("uneven", 4)):  # rank 0 holds `split` pairs
        model = DistributedDataParallel(_encoder())
        part = slice(0, split) if rank == 0 else slice(split, None)
        emb, y = gather_batch(model(x[part]), labels[part])  # (6, 2, 16)
        loss = loss_fn(emb, y)
        loss.backward()
        results[name] = (loss.item(), {n: p.grad for n, p in model.module.named_parameters()})
    # GradCache (chunks of 2 rows, DDP sync deferred to the last chunk) with gathering.
    model = DistributedDataParallel(_RowEncoder())
    rows = x[slice(0, 3) if rank == 0 else slice(3, None)].flatten(0, 1)  # (6, 8)
    part_labels = labels[:3] if rank == 0 else labels[3:]
    loss = gradcache_backward(
        model,
        {"input_ids": rows, "attention_mask": torch.ones_like(rows, dtype=torch.long)},
        2,
        lambda e: loss_fn(*gather_batch(e.view(-1, 2, e.shape[-1]), part_labels)),
        no_sync=model.no_sync,
    )
    grads = {n: p.grad for n, p in model.module.net.named_parameters()}
    results["gradcache"] = (loss.item(), grads)
    # Triplets carry no labels.
    model = DistributedDataParallel(_encoder())
    trip = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    emb, y = gather_batch(model(trip[2 * rank : 2 * rank + 2]), None)
    loss = loss_fn(emb, y)
    loss.backward()
    results["triplets"] = (loss.item(), {n: p.grad for n, p in model.module.named_parameters()})
    torch.save(results, f"{out}/rank{rank}.pt")
    # Tear down only when both ranks are done, with no DDP module (and its reducer's pending
    # gloo work) left alive: otherwise a loaded machine can abort one process at exit.
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_gather_across_two_gloo_processes_equals_one_process(tmp_path):
    """Loss and DDP-averaged gradients of 2 processes equal one process on the whole batch,
    with plain and with GradCache backward passes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    loss_fn = AngleLoss(angle_w=1.0, ibn_threshold=4.0)
    x, labels = _full_batch()
    model = _encoder()
    full = loss_fn(model(x), labels)
    full.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    model = _encoder()
    trip = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    full_trip = loss_fn(model(trip), None)
    full_trip.backward()
    expected_trip = {n: p.grad for n, p in model.named_parameters()}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (loss, grads) in got.items():
            want_loss, want = (full_trip, expected_trip) if name == "triplets" else (full, expected)
            assert loss == pytest.approx(want_loss.item(), rel=1e-5), name
            for n in want:
                # float32 sums in another order (two ranks, then the all-reduce)
                torch.testing.assert_close(grads[n], want[n], atol=1e-5, rtol=1e-4)


def test_gather_is_identity_on_one_process():
    """Without a process group the batch passes through unchanged."""
    from anglekit.distributed import gather_batch

    emb, labels = torch.randn(3, 2, 4), torch.rand(3)
    got, y = gather_batch(emb, labels)
    assert got is emb and y is labels
