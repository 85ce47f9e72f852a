"""Pretraining (task elmer_lplm): the corruption, Layer Permutation LM, the command line, and
pretrain -> fine-tune, on real text (the XSum articles in tests/data, one sentence per line)."""
import json
import re
import subprocess
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import BIN, USER_DIR, XSUM_TINY, run_cli, setup_task, tiny_options, update_losses

TINY = tiny_options(decoder_layers=3)  # three layers for LPLM to draw exit layers from
DRAWS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning OpenMP threads on a busy 2-core machine
    can make a 50 ms step take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Backward:
    """The part of a fairseq optimizer that train_step uses."""

    @staticmethod
    def backward(loss):
        loss.backward()


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def binarize_text(raw, dest, **splits):
    """One sentence (as BPE ids) per line, a blank line after each document; fairseq-preprocess --only-source."""
    argv = [BIN / "fairseq-preprocess", "--only-source", "--destdir", dest, "--workers", "1"]
    for split, docs in splits.items():
        (raw / f"{split}.txt").write_text("".join("\n".join(doc) + "\n\n" for doc in docs), encoding="utf-8")
        argv += [f"--{split}pref", raw / f"{split}.txt"]
    subprocess.run(list(map(str, argv)), check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 real articles, a byte-level BPE trained on them, written as ids with a space before every
    sentence (every word starts with a word-start piece); 40 train and 8 valid documents."""
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("lplm_corpus")
    rows = [json.loads(line) for line in XSUM_TINY.read_text(encoding="utf-8").splitlines()]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" " + r["document"] for r in rows] + [" " + r["summary"] for r in rows],
                            vocab_size=1200, min_frequency=2, special_tokens=[])
    tok.save_model(str(root))

    def ids(text):
        return " ".join(map(str, tok.encode(" " + text).ids))

    docs = [[ids(s) for s in sentences(r["document"])] for r in rows]
    binarize_text(root, root / "bin", train=docs[:40], valid=docs[40:])
    return {"root": root, "bin": root / "bin", "docs": docs, "ids": ids, "rows": rows}


def lplm_task(corpus, *extra, data=None):
    return setup_task(data or corpus["bin"], "--criterion", "elmer_loss", "--bpe-dir", corpus["root"], "--dropout", "0",
                      "--cpu", *extra, task="elmer_lplm", decoder_layers=3)


@pytest.fixture(scope="module")
def corruptions(corpus):
    """The training documents' corruption (paper settings), and the same with sentence shuffling only."""
    out = {}
    for name, extra in (("full", []), ("shuffle", ["--mask", "0"])):
        _, task = lplm_task(corpus, *extra)
        task.load_dataset("train")
        out[name] = task.dataset("train").dataset  # the DenoisingDataset inside the ELMER batches
    out["task"] = task
    return out


def draw(dataset, seed, epoch, index):
    dataset.seed = seed
    dataset.set_epoch(epoch)
    return dataset[index]


def split_at_full_stops(tokens, full_stop):
    """Sentences as fairseq's sentence permutation cuts them: each ends at its first full stop, the
    last one at the end of the document."""
    out, current = [], []
    for i, t in enumerate(tokens):
        current.append(t)
        if t == full_stop and (i + 1 == len(tokens) or tokens[i + 1] != full_stop):
            out.append(tuple(current))
            current = []
    return out + ([tuple(current)] if current else [])


def is_sequence_of(tokens, sentences):
    """Whether `tokens` is the concatenation of all `sentences` in some order."""
    if not sentences:
        return not tokens
    return any(tuple(tokens[: len(s)]) == s and is_sequence_of(tokens[len(s):], sentences[:i] + sentences[i + 1:])
               for i, s in enumerate(sentences))


def masked_runs(shuffled, corrupted, mask):
    """Aligns a corrupted source with its uncorrupted (shuffled) text. Returns, for every run of
    consecutive [MASK]s, (first masked position in `shuffled`, number of masked tokens, number of
    [MASK]s); 0 masked tokens is an insertion."""
    pattern, groups = "", []
    for i, t in enumerate(corrupted):
        if t != mask:
            pattern += f"{t} "
        elif i == 0 or corrupted[i - 1] != mask:
            pattern += r"((?:\d+ )*?)"
            groups.append(1)
        else:
            groups[-1] += 1
    text = " ".join(map(str, shuffled)) + " "
    match = re.fullmatch(pattern, text)
    assert match, "the unmasked tokens of the source are not the shuffled document in order"
    return [(text[: match.start(g + 1)].count(" "), len(match.group(g + 1).split()), n)
            for g, n in enumerate(groups)]


# ---------------------------------------------------------------- the corruption


@DRAWS
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(1, 50), index=st.integers(0, 39))
def test_target_is_the_original_document(corpus, corruptions, seed, epoch, index):
    item = draw(corruptions["full"], seed, epoch, index)
    original = [int(t) for sentence in corpus["docs"][index] for t in sentence.split()]
    dictionary = corruptions["task"].dictionary
    assert item["target"].tolist() == [dictionary.index(str(t)) for t in original] + [dictionary.eos()]
    assert item["source"][0] == dictionary.bos() and item["source"][-1] == dictionary.eos()


@DRAWS
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(1, 50), index=st.integers(0, 39))
def test_shuffled_sentences_are_a_permutation_of_the_original_ones(corruptions, seed, epoch, index):
    task = corruptions["task"]
    item = draw(corruptions["shuffle"], seed, epoch, index)
    source, target = item["source"][1:-1].tolist(), item["target"][:-1].tolist()
    assert is_sequence_of(source, split_at_full_stops(target, task.full_stop))
    assert task.mask_idx not in source


@DRAWS
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(1, 50), index=st.integers(0, 39), noise=st.integers(0, 99))
def test_same_seed_epoch_and_index_give_the_same_corruption(corruptions, seed, epoch, index, noise):
    dataset = corruptions["full"]
    first = draw(dataset, seed, epoch, index)["source"]
    torch.manual_seed(noise)  # whatever state the process is in (a data loader worker, a resumed run)
    torch.rand(noise + 1)
    assert torch.equal(draw(dataset, seed, epoch, index)["source"], first)
    assert not torch.equal(draw(dataset, seed, epoch + 1, index)["source"], first)
    assert not torch.equal(draw(dataset, seed + 1, epoch, index)["source"], first)


def test_masking_statistics_whole_words_15_percent_poisson_3_spans(corruptions):
    """Over 400 fixed (seed, epoch, index) draws: masked runs are whole words, they cover ~15% of
    the words, a run is ~3 words long (Poisson(3) spans; zero-length spans insert a [MASK]), and
    sentences get shuffled. Fixed draws: the statistics are exact numbers, they cannot flake."""
    task, full, shuffle = corruptions["task"], corruptions["full"], corruptions["shuffle"]
    word_start = task.word_starts.bool()
    words = masked_words = runs = inserts = shuffled = 0
    for seed in range(5):
        for epoch in (1, 2):
            for index in range(40):
                item = draw(shuffle, seed, epoch, index)
                plain = item["source"].tolist()  # the sentence order of the full corruption, unmasked
                corrupted = draw(full, seed, epoch, index)["source"].tolist()
                shuffled += plain[1:-1] != item["target"][:-1].tolist()
                words += int(word_start[plain[1:-1]].sum())
                for start, length, n_masks in masked_runs(plain, corrupted, task.mask_idx):
                    if length == 0:
                        inserts += n_masks
                        continue
                    assert word_start[plain[start]] and (word_start[plain[start + length]] or start + length == len(plain) - 1), \
                        "a masked run starts and ends at word boundaries"
                    masked_words += int(word_start[plain[start: start + length]].sum())
                    runs += 1
    share, mean_run = masked_words / words, masked_words / runs
    # per document ceil(15% of the words) are drawn as span starts and lengths; overlapping spans
    # mask fewer words, adjacent ones merge into one longer run
    assert 0.13 < share < 0.16, share
    assert 2.6 < mean_run < 3.6, mean_run
    assert inserts > 0, "zero-length spans insert a [MASK]"
    assert shuffled > 0.8 * 400, "most documents come out in another sentence order"


# ---------------------------------------------------------------- Layer Permutation LM


@pytest.fixture(scope="module")
def lplm(corpus):
    """A tiny eval-mode ELMER (1+3 layers, no dropout) built by elmer_lplm, and a batch of 4 documents."""
    args, task = lplm_task(corpus, "--lplm-permutations", "3")
    torch.manual_seed(0)
    model = task.build_model(args).eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return task, model, task.build_criterion(args), dataset.collater([dataset[i] for i in range(4)])


def run(model, batch, exit_layers):
    net = batch["net_input"]
    return model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"],
                 exit_layers=exit_layers)["lplm"]["out"]


def random_exit_layers(batch, k=1, seed=0):
    return torch.randint(1, 4, (k * batch["target"].size(0), batch["target"].size(1)),
                         generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Wraps decoder.run_layer: records every layer's input and output [T, B, C] (where the layer
    ran on the positions in flight only, a frozen one's output is its state); can add a
    perturbation to one layer's output."""

    def __init__(self, decoder, perturb_layer=None):
        self.inputs, self.outputs, self.run, self.perturb_layer = {}, {}, decoder.run_layer, perturb_layer

    def __call__(self, layer, x, encoder_out, rows=None):
        h = self.run(layer, x, encoder_out, rows)
        if layer == self.perturb_layer:
            h = h + torch.randn_like(h)
        full = h if rows is None else x.reshape(-1, x.size(-1)).index_copy(0, rows, h).view_as(x)
        self.inputs[layer], self.outputs[layer] = x.clone(), full.clone()
        return h


@pytest.fixture
def recorder(lplm, monkeypatch):
    def install(perturb_layer=None):
        rec = Recorder(lplm[1].decoder, perturb_layer)
        monkeypatch.setattr(lplm[1].decoder, "run_layer", rec)
        return rec

    return install


def test_a_tokens_loss_is_the_cross_entropy_of_its_exit_layers_off_ramp(lplm, recorder):
    task, model, criterion, batch = lplm
    exit_layers = random_exit_layers(batch)
    rec = recorder()
    logits = run(model, batch, exit_layers)
    states = torch.stack([rec.outputs[l] for l in range(3)]).transpose(1, 2)  # [L, B, T, C]
    at_exit = states.gather(0, (exit_layers - 1)[None, :, :, None].expand(1, *states.shape[1:])).squeeze(0)
    expected = model.decoder.output_layer(at_exit)
    assert torch.allclose(logits, expected, atol=1e-5)
    mask = batch["target"].ne(task.dictionary.pad())
    loss, _, _ = criterion(model, {**batch, "net_input": {**batch["net_input"], "exit_layers": exit_layers}})
    assert loss.item() == pytest.approx(F.cross_entropy(expected[mask], batch["target"][mask]).item(), rel=1e-5)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_perturbing_a_layer_changes_only_the_tokens_that_exit_above_it(lplm, recorder, layer):
    _, model, _, batch = lplm
    exit_layers = random_exit_layers(batch, seed=layer)
    base = run(model, batch, exit_layers)
    recorder(perturb_layer=layer)
    changed = run(model, batch, exit_layers)
    below = exit_layers <= layer  # exited before the perturbed (0-based) layer ran: none for the first
    assert below.any() == (layer > 0) and (~below).any()
    assert torch.equal(changed[below], base[below])
    assert not torch.isclose(changed[~below], base[~below]).all(-1).any()


def test_states_above_the_exit_layer_equal_the_exit_layer_state(lplm, recorder):
    _, model, _, batch = lplm
    exit_layers = random_exit_layers(batch).t()  # [T, B], the decoder's layout
    rec = recorder()
    run(model, batch, exit_layers.t())
    for layer in range(1, 3):
        frozen = exit_layers <= layer  # input of (0-based) `layer` is the state after layer `layer`
        for position in frozen.nonzero().tolist():
            exit_state = rec.outputs[exit_layers[tuple(position)].item() - 1][tuple(position)]
            assert torch.equal(rec.inputs[layer][tuple(position)], exit_state)
        updated = ~frozen  # still travelling: the input is the layer below's output
        assert torch.equal(rec.inputs[layer][updated], rec.outputs[layer - 1][updated])


def test_k_permutations_in_one_batch_equal_k_separate_passes(lplm):
    task, model, _, batch = lplm
    bsz, k = batch["target"].size(0), 3
    exit_layers = random_exit_layers(batch, k)
    batched = F.log_softmax(run(model, batch, exit_layers), -1)
    target = batch["target"].repeat(k, 1)
    mask = target.ne(task.dictionary.pad())
    for j in range(k):
        alone = F.log_softmax(run(model, batch, exit_layers[j * bsz:(j + 1) * bsz]), -1)
        rows = slice(j * bsz, (j + 1) * bsz)
        nll_batched = -batched[rows].gather(-1, target[rows, :, None]).squeeze(-1)[mask[rows]]
        nll_alone = -alone.gather(-1, batch["target"][:, :, None]).squeeze(-1)[mask[rows]]
        assert torch.allclose(nll_batched, nll_alone, atol=1e-5)


def test_per_layer_off_ramps_score_each_token_with_its_exit_layers_own(corpus, monkeypatch):
    """forward_lplm with --per-layer-off-ramps: a token that exits at layer l is scored by off-ramp
    l. Off-ramp l is set to 2^(l-1) x the shared projection, so its logits must be 2^(l-1) x those
    the shared off-ramp gives the same states (a power of two scales a float exactly)."""
    args, task = lplm_task(corpus, "--lplm-permutations", "2", "--per-layer-off-ramps")
    torch.manual_seed(0)
    model = task.build_model(args).eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    batch = dataset.collater([dataset[i] for i in range(4)])
    decoder = model.decoder
    exit_layers = random_exit_layers(batch, k=2)
    assert all(exit_layers.eq(l).any() for l in (1, 2, 3))
    with torch.no_grad():
        for l, ramp in enumerate(decoder.off_ramps):
            ramp.weight.copy_(decoder.output_projection.weight * 2 ** l)
        per_layer = run(model, batch, exit_layers)
        monkeypatch.setattr(decoder, "off_ramps", None)  # the shared off-ramp's branch
        shared = run(model, batch, exit_layers)
    scale = (2.0 ** (exit_layers - 1)).unsqueeze(-1)
    torch.testing.assert_close(per_layer, shared * scale, rtol=1e-5, atol=1e-5)


def train_step(task, model, criterion, batch, chunk, seed=0):
    task.cfg.lplm_chunk = chunk
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # as fairseq does before every step: the same exit layers for every chunking
    loss, _, log = task.train_step({**batch, "net_input": dict(batch["net_input"])}, model, criterion, Backward, 0)
    return loss.detach(), log, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_the_encoder_runs_once_per_batch(lplm, monkeypatch, chunk):
    task, model, criterion, batch = lplm
    calls, decoder_rows = [], []
    hook = model.encoder.register_forward_hook(lambda *_: calls.append(1))
    forward_lplm = model.decoder.forward_lplm
    monkeypatch.setattr(model.decoder, "forward_lplm", lambda prev, enc, exits: decoder_rows.append(len(exits))
                        or forward_lplm(prev, enc, exits))
    try:
        train_step(task, model, criterion, batch, chunk)
    finally:
        hook.remove()
        task.cfg.lplm_chunk = 0
        model.eval()
    bsz = batch["target"].size(0)
    assert len(calls) == 1
    assert decoder_rows == ([3 * bsz] if chunk == 0 else [2 * bsz, bsz] if chunk == 2 else [bsz] * 3)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_permutations_give_the_unchunked_loss_and_gradients(lplm, chunk):
    task, model, criterion, batch = lplm
    try:
        loss, log, grads = train_step(task, model, criterion, batch, 0)
        chunked_loss, chunked_log, chunked_grads = train_step(task, model, criterion, batch, chunk)
    finally:
        task.cfg.lplm_chunk = 0
        model.eval()
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert chunked_log["lplm-loss"] == pytest.approx(log["lplm-loss"], rel=1e-5)
    assert chunked_log["ntokens"] == log["ntokens"] and chunked_log["nsentences"] == log["nsentences"] == 4
    assert grads.keys() == chunked_grads.keys() and any(n.startswith("encoder.layers") for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------- the command line


def pretrain_args(data, corpus, save_dir, updates, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "elmer_lplm", *TINY, "--bpe-dir", corpus["root"],
            "--criterion", "elmer_loss", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1024",
            "--lplm-permutations", "2", "--max-update", updates, "--save-dir", save_dir, "--save-interval-updates", "1",
            "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
            "--disable-validation", *extra]


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """Pretraining stopped after 2 updates and resumed to 4, and an uninterrupted 4-update run."""
    stopped, straight = tmp_path_factory.mktemp("lplm_resumed"), tmp_path_factory.mktemp("lplm_straight")
    first = run_cli("fairseq-train", *pretrain_args(corpus["bin"], corpus, stopped, 2))
    state = torch.load(stopped / "checkpoint_last.pt", map_location="cpu")
    resumed = run_cli("fairseq-train", *pretrain_args(corpus["bin"], corpus, stopped, 4))
    whole = run_cli("fairseq-train", *pretrain_args(corpus["bin"], corpus, straight, 4))
    return {"first": first.stdout, "state": state, "resumed": resumed.stdout, "whole": whole.stdout,
            "checkpoint": stopped / "checkpoint_last.pt"}


def test_pretraining_resumes_from_its_last_checkpoint_with_the_same_data(pretrained):
    assert pretrained["state"]["optimizer_history"][-1]["num_updates"] == 2
    assert "Loaded checkpoint" in pretrained["resumed"]
    resumed, whole = update_losses(pretrained["resumed"]), update_losses(pretrained["whole"])
    assert sorted(resumed) == [3, 4] and sorted(whole) == [1, 2, 3, 4]
    # same batches, corruption and exit layers: the resumed updates repeat the uninterrupted run's
    assert resumed == {n: whole[n] for n in (3, 4)}
    assert update_losses(pretrained["first"]) == {n: whole[n] for n in (1, 2)}
    final = torch.load(pretrained["checkpoint"], map_location="cpu")
    assert final["optimizer_history"][-1]["num_updates"] == 4
    assert final["cfg"]["model"].exit_mode == "lplm"


@pytest.fixture(scope="module")
def xsum_with_pretraining_dict(corpus):
    """The XSum pairs in the pretraining BPE, binarized with the pretraining dict.txt."""
    raw = corpus["root"] / "xsum"
    raw.mkdir()
    for split, rows in (("train", corpus["rows"][:32]), ("valid", corpus["rows"][32:40])):
        for side, key in (("src", "document"), ("tgt", "summary")):
            (raw / f"{split}.{side}").write_text("".join(corpus["ids"](r[key]) + "\n" for r in rows), encoding="utf-8")
    dictionary = corpus["bin"] / "dict.txt"
    subprocess.run([str(BIN / "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                    "--srcdict", str(dictionary), "--tgtdict", str(dictionary), "--trainpref", str(raw / "train"),
                    "--validpref", str(raw / "valid"), "--destdir", str(raw / "bin"), "--workers", "1"],
                   check=True, capture_output=True)
    return raw / "bin"


@pytest.mark.parametrize("mode, extra", [("soft", []), ("hard", []), ("soft", ["--output-loss", "ctc", "--glance", "0.5"]),
                                         ("soft", ["--length-head", "--glance", "0.5"])],
                         ids=["soft", "hard", "soft-ctc-glance", "soft-length-head-glance"])
def test_a_pretrained_checkpoint_initializes_fine_tuning(pretrained, xsum_with_pretraining_dict, tmp_path, mode, extra):
    proc = run_cli("fairseq-train", xsum_with_pretraining_dict, "--user-dir", USER_DIR, "--task", "elmer_translation",
                   *TINY, "--exit-mode", mode, *extra, "--finetune-from-model", pretrained["checkpoint"],
                   "--criterion", "elmer_loss", "--optimizer", "adam", "--lr", "1e-12", "--max-tokens", "2048",
                   "--max-update", "1", "--max-target-length", "24", "--save-dir", tmp_path, "--no-epoch-checkpoints",
                   "--disable-validation", "--cpu", "--num-workers", "0")
    assert "loading pretrained model from" in proc.stdout
    before = torch.load(pretrained["checkpoint"], map_location="cpu")["model"]
    after = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu")
    assert after["cfg"]["model"].exit_mode == mode
    assert after["cfg"]["model"].output_loss == ("ctc" if "ctc" in extra else "ce")
    # the length head is not in the pretrained model: its embedding starts at zero (lr 1e-12: still that)
    assert ("decoder.embed_length.weight" in after["model"]) == ("--length-head" in extra)
    if "--length-head" in extra:
        assert after["model"]["decoder.embed_length.weight"].abs().max() < 1e-9
    weights = after["model"]
    assert any(key.startswith("encoder.layers.") for key in before)
    for key, value in before.items():  # every pretrained weight, encoder and decoder, carried over
        assert torch.allclose(weights[key], value, atol=1e-8), key
    # soft exit's W is not in the pretrained model: it starts as [0 | I], the pretrained layers reading
    # the layer below as they were trained to (lr 1e-12: still that after the update)
    assert "decoder.soft_exit.weight" not in before
    assert ("decoder.soft_exit.weight" in weights) == (mode == "soft")
    if mode == "soft":
        assert "the checkpoint has no soft-exit W: it starts as [0 | I]" in proc.stdout
        dim = weights["decoder.soft_exit.weight"].shape[0]
        expected = torch.cat([torch.zeros(dim, dim), torch.eye(dim)], dim=1)
        assert torch.allclose(weights["decoder.soft_exit.weight"], expected, atol=1e-8)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["--mask", "1.5"], "--mask must be in [0, 1], got 1.5"),
    (["--mask", "-0.1"], "--mask must be in [0, 1]"),
    (["--lplm-permutations", "0"], "--lplm-permutations must be >= 1, got 0"),
    (["--lplm-chunk", "-1"], "--lplm-chunk must be >= 0"),
    (["--tokens-per-sample", "1000"], "lower --tokens-per-sample or raise the positions"),
])
def test_bad_options_are_refused_at_start_up(corpus, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lplm_task(corpus, *extra)


@pytest.mark.parametrize("extra", [["--output-loss", "ctc"], ["--glance", "0.3"]])
def test_ctc_and_glancing_are_refused_in_pretraining(corpus, extra):
    args, task = lplm_task(corpus, *extra)
    with pytest.raises(ValueError, match=f"{extra[0]}: LPLM pretraining trains each token with cross-entropy"):
        task.build_model(args)


def test_bad_option_message_on_the_command_line(corpus, tmp_path):
    proc = run_cli("fairseq-train", *pretrain_args(corpus["bin"], corpus, tmp_path, 1, "--mask", "1.5"), check=False)
    assert proc.returncode != 0 and "--mask must be in [0, 1], got 1.5" in proc.stdout[-2000:]


def test_empty_documents_are_skipped_with_a_warning(corpus, tmp_path, caplog):
    docs = corpus["docs"][:3]
    raw = tmp_path / "train.txt"
    raw.write_text("\n\n" + "\n\n\n".join("\n".join(d) for d in docs) + "\n\n", encoding="utf-8")
    subprocess.run([str(BIN / "fairseq-preprocess"), "--only-source", "--srcdict", str(corpus["bin"] / "dict.txt"),
                    "--trainpref", str(raw), "--destdir", str(tmp_path / "bin"), "--workers", "1"],
                   check=True, capture_output=True)
    _, task = lplm_task(corpus, data=tmp_path / "bin")
    task.load_dataset("train")
    assert "4 empty documents (consecutive blank lines) skipped" in caplog.text
    dataset = task.dataset("train").dataset
    assert len(dataset) == 3 and dataset[2]["target"].numel() == sum(len(s.split()) for s in docs[2]) + 1


def test_a_corpus_without_text_is_an_error(corpus, tmp_path):
    binarize_text(tmp_path, tmp_path / "bin", train=[[], []])
    _, task = lplm_task(corpus, data=tmp_path / "bin")
    with pytest.raises(ValueError, match="train: no non-empty documents"):
        task.load_dataset("train")


def test_a_sentence_longer_than_a_block_needs_shorten_method_truncate(corpus, tmp_path):
    long_sentence = " ".join(corpus["docs"][0])  # a whole article on one line
    binarize_text(tmp_path, tmp_path / "bin", train=corpus["docs"][1:3] + [[long_sentence]])
    _, task = lplm_task(corpus, "--tokens-per-sample", "100", data=tmp_path / "bin")
    with pytest.raises(ValueError, match=r"1 blocks hold a sentence longer than --tokens-per-sample 100; "
                                         r"pass --shorten-method truncate"):
        task.load_dataset("train")
    _, task = lplm_task(corpus, "--tokens-per-sample", "100", "--shorten-method", "truncate", data=tmp_path / "bin")
    task.load_dataset("train")
    dataset = task.dataset("train").dataset
    assert max(len(dataset[i]["source"]) - int(dataset[i]["source"].eq(task.mask_idx).sum()) for i in range(len(dataset))) <= 100
    assert all(len(dataset[i]["target"]) <= 99 for i in range(len(dataset)))
