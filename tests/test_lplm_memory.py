"""LPLM's memory, counted in tensors rather than measured in RSS: every tensor that an aten op
allocates during a step is tracked until its storage is freed, which gives the step's peak of
live tensor bytes exactly and the same on every machine. The [k*B, T, V] logits dominate it:
validation holds them once (and --lplm-chunk c of k permutations holds c/k of them), where
fairseq's nat_loss held three copies (the logits, their masked copy and its log-softmax)."""
import os
import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from elmer_fairseq.criterions import elmer_loss
from fairseq.criterions.nat_loss import LabelSmoothedDualImitationCriterion as NatLoss
from conftest import ROOT, run_cli
from test_lplm import Backward, corpus, lplm_task, one_thread, pretrain_args  # noqa: F401  (fixtures)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that aten ops allocate while the mode is on: `peak` (live at once)
    and `largest` (one storage). A storage counts from the op that returns it to its release
    (torch keeps one Python object per storage: its finalizer runs when the memory goes)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.largest, self.storages = 0, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.storages:  # a view, an in-place result
                continue
            self.storages.add(key)
            self.live += size
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
            weakref.finalize(storage, self.free, key, size)
        return out

    def free(self, key, size):
        self.storages.discard(key)
        self.live -= size


@pytest.fixture(scope="module")
def lplm5(corpus):  # noqa: F811
    """A tiny ELMER (1+3 layers) built by elmer_lplm with k = 5 permutations, its criterion with
    label smoothing, and a valid batch of 4 documents."""
    args, task = lplm_task(corpus, "--lplm-permutations", "5", "--label-smoothing", "0.1")
    torch.manual_seed(0)
    model = task.build_model(args)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return task, model, task.build_criterion(args), dataset.collater([dataset[i] for i in range(4)])


def logits_bytes(task, batch, permutations):
    """Bytes of [permutations * B, T, V] fp32 logits."""
    return 4 * permutations * batch["target"].numel() * len(task.dictionary)


def step(task, model, criterion, batch, train, chunk=0):
    """(loss, logging output, tracker) of one train_step or valid_step with --lplm-chunk `chunk`."""
    task.cfg.lplm_chunk = chunk
    sample = {**batch, "net_input": dict(batch["net_input"])}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    try:
        with LiveTensorBytes() as tracker:
            if train:
                loss, _, log = task.train_step(sample, model, criterion, Backward, 0)
            else:
                loss, _, log = task.valid_step(sample, model, criterion)
    finally:
        task.cfg.lplm_chunk = 0
    return loss.detach(), log, tracker


@pytest.fixture
def small_blocks(lplm5, monkeypatch):
    """Loss blocks of 1/8 of one permutation's logits, so that the blocks, not the whole, show."""
    task, _, _, batch = lplm5
    block = logits_bytes(task, batch, 1) // 8
    monkeypatch.setattr(elmer_loss, "LOSS_BLOCK_BYTES", block)
    return block


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_validation_holds_the_logits_of_one_chunk_once(lplm5, small_blocks, chunk):
    task, model, criterion, batch = lplm5
    _, _, tracker = step(task, model, criterion, batch, train=False, chunk=chunk)
    k = task.cfg.lplm_permutations
    logits = logits_bytes(task, batch, chunk or k)  # one pass's logits: c (or all k) permutations
    assert tracker.largest == logits
    # the logits, two blocks of rows (their logits and log-softmax), and the small activations
    assert logits + 2 * small_blocks <= tracker.peak < logits + 2 * small_blocks + logits_bytes(task, batch, 1) // 4


def test_fairseqs_loss_held_three_copies_of_the_logits_in_validation(lplm5, monkeypatch):
    """The cause, kept as a check of the counter: nat_loss's _compute_loss without a gradient."""
    task, model, criterion, batch = lplm5
    monkeypatch.setattr(type(criterion), "_compute_loss", NatLoss._compute_loss)
    _, _, tracker = step(task, model, criterion, batch, train=False)
    logits = logits_bytes(task, batch, task.cfg.lplm_permutations)
    kept = batch["target"].ne(task.dictionary.pad()).float().mean().item()  # the masked copy drops pads
    assert tracker.peak >= (1 + 2 * kept) * logits > 2.5 * logits


@pytest.mark.parametrize("chunk", [0, 2])
def test_validation_is_leaner_than_training(lplm5, chunk):
    task, model, criterion, batch = lplm5
    _, _, train = step(task, model, criterion, batch, train=True, chunk=chunk)
    _, _, valid = step(task, model, criterion, batch, train=False, chunk=chunk)
    assert valid.largest <= train.largest
    assert valid.peak < train.peak / 2  # training keeps the log-softmax for backward, and its gradients


@pytest.mark.parametrize("chunk", [0, 2])
def test_blockwise_validation_loss_is_fairseqs(lplm5, small_blocks, monkeypatch, chunk):
    task, model, criterion, batch = lplm5
    loss, log, _ = step(task, model, criterion, batch, train=False, chunk=chunk)
    monkeypatch.setattr(type(criterion), "_compute_loss", NatLoss._compute_loss)
    reference, reference_log, _ = step(task, model, criterion, batch, train=False, chunk=chunk)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for key in ("nll_loss", "lplm-loss"):
        assert float(log[key]) == pytest.approx(float(reference_log[key]), rel=1e-6)
    assert log["ntokens"] == reference_log["ntokens"]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_blockwise_loss_equals_nat_loss_with_padding_and_blocks_of_any_size(smoothing):
    torch.manual_seed(0)
    outputs = torch.randn(9, 6, 50, dtype=torch.float64).transpose(0, 1)  # [B, T, V], as the decoder's
    targets, masks = torch.randint(0, 50, (6, 9)), torch.rand(6, 9) > 0.3
    expected = NatLoss._compute_loss(None, outputs, targets, masks, smoothing, "x", 0.5)
    for block_rows in (1, 7, 54, 1000):
        got = elmer_loss.blockwise_loss(outputs, targets, masks, smoothing, "x", 0.5, block_bytes=block_rows * 50 * 8)
        assert got["name"] == "x" and got["factor"] == 0.5
        # nat_loss averages in float32; the blocks sum in float64
        for key in ("loss", "nll_loss"):
            assert got[key].item() == pytest.approx(expected[key].item(), rel=1e-6, abs=1e-7)
    empty = elmer_loss.blockwise_loss(outputs, targets, torch.zeros_like(masks), smoothing)
    assert empty["loss"].item() == empty["nll_loss"].item() == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the RSS high-water mark of Linux")
def test_train_memory_reports_training_and_validation_apart(corpus, tmp_path):  # noqa: F811
    """examples/train_memory.py, the command docs/pretraining.md measured its peaks with."""
    argv = [a for a in pretrain_args(corpus["bin"], corpus, tmp_path, 2) if a != "--disable-validation"]
    proc = run_cli("python", ROOT / "examples" / "train_memory.py", *argv, "--no-save")
    vocab = len(lplm_task(corpus)[1].dictionary)
    train = re.search(r"peak RSS train: ([\d.]+) GiB over 2 steps .*largest logits \[\d+, \d+, (\d+)\]", proc.stdout)
    valid = re.search(r"peak RSS valid: ([\d.]+) GiB over (\d+) steps .*largest logits \[\d+, \d+, (\d+)\]", proc.stdout)
    assert train and valid, proc.stdout[-3000:]
    assert int(valid[2]) >= 1 and int(train[2]) == int(valid[3]) == vocab
    assert float(train[1]) > 0 and float(valid[1]) > 0
