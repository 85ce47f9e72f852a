"""fairseq's distributed training on CPU (gloo, one process per rank): 2 processes train like 1 on
the same global batch (elmer_translation soft and hard exit, elmer_lplm); the launcher
(`python -m elmer_fairseq.launch`); bad distributed options fail fast, naming the option.

The 2-process runs and their 1-process twins run under a probe (`python -m rank_probe`, written
below): fairseq-train itself, recording after every update each rank's sub-batches (sample ids and
loss) and its parameters. Same global batch: fairseq shuffles the batches with the seed alone,
then gives rank r the batches r, r + W, r + 2W, ... (ShardedIterator); one process with
--update-freq 2 takes batches 2u and 2u + 1 in update u, which are exactly what ranks 0 and 1 take
in update u. nat_loss's sample_size is 1 per batch in both cases, so the gradient is the mean of
the two batches' gradients either way.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fairseq import options

from conftest import BIN, ROOT, USER_DIR, XSUM_TINY, setup_task, tiny_options, update_losses
from elmer_fairseq.distributed import check_distributed_options, rendezvous
from elmer_fairseq import launch as launcher
from elmer_fairseq.launch import free_port

UPDATES = 4
TIMEOUT = 300  # seconds for one training run: a hang fails the test instead of CI
# Parameters: soft and hard exit come out bit-identical, checked with torch.equal (the two batches'
# gradients are summed once either way, and halving is exact). For LPLM, |2 processes - 1 process|
# <= PARAM_ATOL + PARAM_RTOL * |1 process|: with --lplm-chunk 1 it sums four backward passes per
# update, (a + b) + (c + d) on two ranks vs ((a + b) + c) + d in one process: fp32 rounding differences of 1 ulp, which Adam (a
# division by sqrt(v)) amplifies most where the gradient is ~0 anyway (attention key biases, whose
# gradient is zero up to rounding: softmax ignores a shift shared by all keys). Measured after 4
# updates: at most 8e-6 absolute (a key bias), 4e-7 elsewhere; parameters moved up to 4e-3.
PARAM_ATOL, PARAM_RTOL = 5e-5, 1e-4
LOSS_RTOL = 1e-5  # loss of the same batch, per rank: measured <= 1.4e-7 relative
LOGGED_ATOL = 1.1e-3  # fairseq logs losses rounded to 3 decimals

PROBE = '''"""fairseq-train, saving after every update each rank's sub-batches (ids, loss) and parameters."""
import os

import fairseq_cli.train as train  # first: it sets up logging as fairseq-train does
import torch
from fairseq.trainer import Trainer

OUT = os.environ["RANK_PROBE_OUT"]
_train_step = Trainer.train_step


def save(trainer, steps):
    params = {n: p.detach().clone() for n, p in trainer.get_model().named_parameters()}
    name = f"rank{trainer.data_parallel_rank}-update{trainer.get_num_updates()}.pt"
    torch.save({"steps": steps, "params": params}, os.path.join(OUT, name))


def train_step(self, samples, raise_oom=False):
    if self.get_num_updates() == 0:
        save(self, [])
    steps, task_step = [], self.task.train_step

    def recording(sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        out = task_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)
        steps.append({"ids": sample["id"].tolist(), "loss": float(out[0]), "dummy": bool(ignore_grad)})
        return out

    self.task.train_step = recording
    try:
        result = _train_step(self, samples, raise_oom)
    finally:
        del self.task.train_step
    save(self, steps)
    return result


Trainer.train_step = train_step

if __name__ == "__main__":
    train.cli_main()
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    (folder / "rank_probe.py").write_text(PROBE, encoding="utf-8")
    return folder


def environment(probe=None, out=None, **extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # checkpoints must load safely
    if probe is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(probe), *filter(None, [env.get("PYTHONPATH")])])
        env["RANK_PROBE_OUT"] = str(out)
    return env


def run(argv, env, timeout=TIMEOUT):
    return subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def by_hand(rank, world, port, *extra):
    """The flags one rank needs with this fairseq on CPU (what the launcher adds)."""
    return ["--cpu", "--distributed-world-size", world, "--distributed-rank", rank, "--device-id", "0",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", *extra]


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def lplm_data(tmp_path_factory):
    """16 real articles, one whitespace-tokenized sentence per line ('.' its own symbol, the
    full stop), a blank line after each document: 12 train, 4 valid."""
    raw = tmp_path_factory.mktemp("lplm_raw")
    rows = [json.loads(line) for line in XSUM_TINY.read_text(encoding="utf-8").splitlines()][:16]
    docs = [[" ".join(re.findall(r"\w+|[^\w\s]", s.lower()))
             for s in re.split(r"(?<=[.!?])\s+", " ".join(r["document"].split())) if s] for r in rows]
    argv = [BIN / "fairseq-preprocess", "--only-source", "--destdir", raw / "bin", "--workers", "1"]
    for split, part in (("train", docs[:12]), ("valid", docs[12:])):
        (raw / f"{split}.txt").write_text("".join("\n".join(d) + "\n\n" for d in part), encoding="utf-8")
        argv += [f"--{split}pref", raw / f"{split}.txt"]
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    return raw / "bin"


def train_args(config, xsum_tiny, lplm_data):
    common = ["--criterion", "elmer_loss", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "4",
              "--required-batch-size-multiple", "1", "--max-update", UPDATES, "--no-epoch-checkpoints",
              "--num-workers", "0", "--log-format", "simple", "--log-interval", "1", "--dropout", "0",
              "--seed", "3", "--cpu"]
    if config == "lplm":
        return [lplm_data, "--user-dir", USER_DIR, "--task", "elmer_lplm", *tiny_options(3),
                "--lplm-permutations", "2", "--lplm-chunk", "1", "--tokens-per-sample", "64",
                "--shorten-method", "truncate", *common]
    # (soft: no gold-token mixing, whose draws depend on how many batches a process ran before in
    # the update, so that one process and two ranks could not see the same random numbers)
    exit_options = {"soft": ["--exit-mode", "soft", "--gold-mix-prob", "0"],
                    # every position exits at layer 1: the upper layer's output is discarded (zero gradient)
                    "hard": ["--exit-mode", "hard", "--exit-threshold", "20", "--per-layer-off-ramps"]}[config]
    return [xsum_tiny, "--user-dir", USER_DIR, "--task", "elmer_translation", *tiny_options(2),
            "--label-smoothing", "0.1", "--max-target-length", "24", *exit_options, *common]


# ---------------------------------------------------------------- 2 processes vs 1


def records(folder, rank):
    return {int(re.search(r"update(\d+)", p.name).group(1)): torch.load(p, map_location="cpu")
            for p in Path(folder).glob(f"rank{rank}-update*.pt")}


def valid_losses(stdout):
    return [float(v) for v in re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", stdout)]


def max_difference(a, b):
    return max((x - b[name]).abs().max().item() for name, x in a.items())


@pytest.fixture(scope="module")
def runs(probe, xsum_tiny, lplm_data, tmp_path_factory):
    """Per config: one process with --update-freq 2, and two processes with the same global batch
    (soft and lplm through the launcher; hard started by hand, rank 1 with a save dir of its own)."""
    cache = {}

    def get(config):
        if config in cache:
            return cache[config]
        args = train_args(config, xsum_tiny, lplm_data)
        one, two = tmp_path_factory.mktemp(f"{config}_one"), tmp_path_factory.mktemp(f"{config}_two")
        single = run([sys.executable, "-m", "rank_probe", *args, "--update-freq", "2", "--save-dir", one / "ckpt"],
                     environment(probe, one))
        assert single.returncode == 0, single.stdout[-4000:]
        if config == "hard":
            port = free_port("127.0.0.1")
            procs = [subprocess.Popen([sys.executable, "-m", "rank_probe", *map(str, args),
                                       *map(str, by_hand(rank, 2, port, "--save-dir", two / f"ckpt{rank}"))],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                      env=environment(probe, two)) for rank in (0, 1)]
            outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
            assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
            stdout = outputs[0]
        else:
            launched = run([sys.executable, "-m", "elmer_fairseq.launch", "--nproc", "2", "--module", "rank_probe",
                            "--", *args, "--save-dir", two / "ckpt0"], environment(probe, two))
            assert launched.returncode == 0, launched.stdout[-4000:]
            stdout = launched.stdout
        cache[config] = {"one": one, "two": two, "single": single.stdout, "double": stdout}
        return cache[config]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("config", ["soft", "hard", "lplm"])
def test_two_processes_train_like_one_on_the_same_global_batch(runs, config):
    r = runs(config)
    one, ranks = records(r["one"], 0), [records(r["two"], 0), records(r["two"], 1)]
    assert sorted(one) == sorted(ranks[0]) == sorted(ranks[1]) == list(range(UPDATES + 1))
    for n in range(1, UPDATES + 1):
        # the same global batch: update n's two batches of one process are rank 0's and rank 1's
        assert [s["ids"] for s in one[n]["steps"]] == [ranks[0][n]["steps"][0]["ids"], ranks[1][n]["steps"][0]["ids"]]
        assert not set(ranks[0][n]["steps"][0]["ids"]) & set(ranks[1][n]["steps"][0]["ids"])
        for batch, rank in zip(one[n]["steps"], ranks):  # the same corruption and exit layers: the same loss
            assert not rank[n]["steps"][0]["dummy"]
            assert rank[n]["steps"][0]["loss"] == pytest.approx(batch["loss"], rel=LOSS_RTOL)
        # the ranks stay identical (all-reduced gradients, parameters without gradient included)
        for name, value in ranks[0][n]["params"].items():
            assert torch.equal(value, ranks[1][n]["params"][name]), (n, name)
        for name, value in one[n]["params"].items():
            if config == "lplm":
                assert torch.allclose(ranks[0][n]["params"][name], value, rtol=PARAM_RTOL, atol=PARAM_ATOL), (n, name)
            else:  # bit-identical, as the module's docstring says
                assert torch.equal(ranks[0][n]["params"][name], value), (n, name)
    assert max_difference(ranks[0][UPDATES]["params"], one[0]["params"]) > 1e-4  # it did train
    # fairseq's logs: rank 0 logs the losses summed over ranks, the same as one process's
    single, double = update_losses(r["single"]), update_losses(r["double"])
    assert sorted(single) == sorted(double) == list(range(1, UPDATES + 1))
    for n in single:
        assert double[n] == pytest.approx(single[n], abs=LOGGED_ATOL)
    assert len(valid_losses(r["double"])) == 1
    assert valid_losses(r["double"]) == pytest.approx(valid_losses(r["single"]), abs=LOGGED_ATOL)
    assert "bsz=8," in r["double"] and "bsz=8," in r["single"]  # 2 x 4 sentences per update, both ways
    # only rank 0 writes checkpoints; the last one holds rank 0's final parameters
    saved = {p.name for p in (r["two"] / "ckpt0").iterdir()}
    assert saved == {p.name for p in (r["one"] / "ckpt").iterdir()} and "checkpoint_last.pt" in saved
    checkpoint = torch.load(r["two"] / "ckpt0" / "checkpoint_last.pt", map_location="cpu")
    for name, value in ranks[0][UPDATES]["params"].items():
        assert torch.equal(checkpoint["model"][name], value), name
    if config == "hard":  # rank 1 had a save dir of its own: nothing was written there
        assert not (r["two"] / "ckpt1").exists() or not any((r["two"] / "ckpt1").iterdir())
        # every token exited at layer 1: the upper layer's gradient was zero on both ranks, and it stayed put
        upper = [n for n in one[0]["params"] if n.startswith("decoder.layers.1.")]
        assert upper and all(torch.equal(rank[UPDATES]["params"][n], one[0]["params"][n]) for rank in ranks for n in upper)


@pytest.mark.slow
def test_torchrun_on_cpu_trains_like_the_launcher(runs, xsum_tiny, lplm_data, tmp_path):
    """fairseq alone fails under torchrun on CPU (rank modulo the CUDA device count); the plugin
    takes rank and world size from torchrun's environment."""
    proc = run([BIN / "torchrun", "--nproc-per-node", "2", "--master-port", free_port("127.0.0.1"),
                "-m", "fairseq_cli.train", *train_args("soft", xsum_tiny, lplm_data), "--save-dir", tmp_path,
                "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"], environment())
    assert proc.returncode == 0, proc.stdout[-4000:]
    single, double = update_losses(runs("soft")["single"]), update_losses(proc.stdout)
    assert sorted(double) == list(range(1, UPDATES + 1))
    assert all(double[n] == pytest.approx(single[n], abs=LOGGED_ATOL) for n in single)


# ---------------------------------------------------------------- exit layers of LPLM


def lplm_task(lplm_data, *extra):
    args, task = setup_task(lplm_data, "--lplm-permutations", "3", "--tokens-per-sample", "64", "--shorten-method",
                            "truncate", "--cpu", *extra, task="elmer_lplm", decoder_layers=3)
    return task, task.build_model(args)


def test_lplm_exit_layers_depend_on_seed_update_and_document_only(lplm_data):
    task, model = lplm_task(lplm_data)
    task.load_dataset("train")
    dataset = task.dataset("train")
    batch = dataset.collater([dataset[i] for i in range(6)])
    k, bsz, length = 3, 6, batch["target"].size(1)

    def layers(sample, update, seed=1):
        task.cfg.seed = seed
        return task.document_exit_layers(sample, model, update).view(k, sample["target"].size(0), -1)

    full = layers(batch, 5)
    assert full.shape == (k, bsz, length) and full.min() >= 1 and full.max() <= 3
    # the same documents in another batch (another rank, another padding): the same layers
    part = dataset.collater([dataset[i] for i in (4, 1)])
    sub, rows = layers(part, 5), batch["id"].tolist()
    assert part["target"].size(1) < length
    for row, doc in enumerate(part["id"].tolist()):
        n = int(part["target"][row].ne(task.dictionary.pad()).sum())
        assert torch.equal(sub[:, row, :n], full[:, rows.index(doc), :n])
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(layers(batch, 5), full)
    assert not torch.equal(layers(batch, 6), full) and not torch.equal(layers(batch, 5, seed=2), full)
    assert not torch.equal(full[:, 0], full[:, 1]) and not torch.equal(full[0], full[1])  # documents, permutations
    counts = torch.bincount(layers(batch, 7).flatten(), minlength=4)[1:].float()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.1  # uniform in 1..L


# ---------------------------------------------------------------- the launcher


def launch(*argv, env=None, timeout=120):
    return run([sys.executable, "-m", "elmer_fairseq.launch", *argv], env or environment(), timeout=timeout)


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0", "--", "data"], "--nproc must be >= 1, got 0"),
    (["--nproc", "2"], "no fairseq-train arguments: put them after `--`"),
    (["--nproc", "2", "--", "data", "--distributed-world-size", "4"], "--distributed-world-size is set by the launcher"),
    (["--nproc", "2", "--backend", "nccl", "--", "data", "--cpu"], "--backend nccl"),
    (["--nproc", "2", "--backend", "nosuch", "--", "data"], "--backend nosuch is not available on this machine"),
    (["--nproc", "2", "--", "data", "--cpu", "--ddp-backend", "c10d"], "--ddp-backend c10d does not work on CPU"),
    (["--nproc", "2", "--nnodes", "2", "--", "data"], "--port is required with --nnodes > 1"),
])
def test_launcher_refuses_bad_arguments_before_starting_anything(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", None)  # nothing may start
    with pytest.raises(SystemExit) as exit:
        launcher.main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_launcher_ranks_on_cpu_get_sleeping_openmp_threads(monkeypatch):
    """One OpenMP thread per core and rank, and idle threads sleep instead of spinning (a rank
    next to a busy core; docs/speed.md); what the caller sets wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    ranks, env = launcher.plan(launcher.parse_args(["--nproc", "2", "--", "data", "--cpu"]))
    assert len(ranks) == 2 and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert launcher.plan(launcher.parse_args(["--nproc", "2", "--", "data", "--cpu"]))[1]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_launcher_refuses_a_port_in_use(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit) as exit:
            launcher.main(["--nproc", "2", "--port", str(s.getsockname()[1]), "--", "data", "--cpu"])
    assert exit.value.code == 2 and "cannot be used" in capsys.readouterr().err


def test_launcher_stops_the_other_ranks_when_one_fails(tmp_path):
    (tmp_path / "fail_rank1.py").write_text(
        "import sys, time\n"
        "rank = int(sys.argv[sys.argv.index('--distributed-rank') + 1])\n"
        "print('started', flush=True)\n"
        "sys.exit(3) if rank == 1 else time.sleep(600)\n", encoding="utf-8")
    started = time.monotonic()
    proc = launch("--nproc", "2", "--module", "fail_rank1", "--", "data", "--cpu",
                  env=environment(PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 3
    assert "[rank 0] started" in proc.stdout and "[rank 1] started" in proc.stdout
    assert "rank 1 exited with code 3; stopping the other ranks" in proc.stdout
    assert time.monotonic() - started < 60  # rank 0 did not sleep its 600 s


# ---------------------------------------------------------------- bad distributed options


def distributed_cfg(xsum_tiny, *extra):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(xsum_tiny), "--user-dir", str(USER_DIR), "--task", "elmer_translation", *tiny_options(), *map(str, extra)]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


@pytest.mark.parametrize("extra, message", [
    (["--cpu", "--distributed-world-size", "2"], "--distributed-world-size 2 needs a rendezvous address: "
                                                 "pass --distributed-init-method"),
    (["--cpu", "--distributed-world-size", "2", "--distributed-port", "12345"], "needs a rendezvous address"),
    (["--cpu", "--distributed-world-size", "0"], "--distributed-world-size must be >= 1, got 0"),
    (by_hand(2, 2, 12345), "--distributed-rank 2 is not in 0..1"),
    (by_hand(0, 2, 12345)[:-2], "--ddp-backend pytorch_ddp does not work on CPU"),  # fairseq's default
    (by_hand(0, 2, 12345, "--distributed-backend", "nccl"), "--distributed-backend nccl"),
    (by_hand(0, 2, 12345, "--distributed-backend", "nosuch"), "--distributed-backend nosuch is not available"),
    (by_hand(0, 2, ""), "--distributed-init-method tcp://127.0.0.1:: expected tcp://HOST:PORT"),
    ([a for a in by_hand(0, 2, 12345) if a != "--distributed-no-spawn"], "needs --distributed-no-spawn"),
    (by_hand(0, 2, 12345)[:6] + ["1"] + by_hand(0, 2, 12345)[7:], "--device-id 1 with --cpu"),
])
def test_bad_distributed_options_name_the_option(xsum_tiny, extra, message):
    cfg = distributed_cfg(xsum_tiny, *extra)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_distributed_options(cfg)


def test_torchrun_environment_gives_rank_and_world_size_on_cpu(xsum_tiny, monkeypatch):
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "4", "RANK": "3",
                       "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = distributed_cfg(xsum_tiny, "--cpu", "--ddp-backend", "legacy_ddp", "--distributed-backend", "gloo")
    check_distributed_options(cfg)
    dt = cfg.distributed_training
    assert (dt.distributed_init_method, dt.distributed_world_size, dt.distributed_rank, dt.device_id,
            dt.distributed_no_spawn) == ("env://", 4, 3, 0, True)


def test_a_missing_rank_is_an_error_within_the_rendezvous_timeout():
    port = free_port("127.0.0.1")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"only 1 of --distributed-world-size 2 processes joined"):
        rendezvous(f"tcp://127.0.0.1:{port}", 2, 0, timeout=1.0)
    with pytest.raises(RuntimeError, match=r"rank 1 found no rank 0 at --distributed-init-method"):
        rendezvous(f"tcp://127.0.0.1:{port}", 2, 1, timeout=1.0)
    assert time.monotonic() - started < 30


@pytest.mark.slow
@pytest.mark.parametrize("rank, message", [
    (0, "only 1 of --distributed-world-size 2 processes joined at --distributed-init-method tcp://127.0.0.1:"),
    (1, "rank 1 found no rank 0 at --distributed-init-method tcp://127.0.0.1:"),
])
def test_fairseq_train_with_a_rank_missing_fails_instead_of_hanging(xsum_tiny, tmp_path, rank, message):
    """World size 2, one process started: fairseq alone would wait 30 minutes at the rendezvous."""
    argv = [BIN / "fairseq-train", *train_args("soft", xsum_tiny, None), "--save-dir", tmp_path,
            *by_hand(rank, 2, free_port("127.0.0.1"))]
    started = time.monotonic()
    proc = run(argv, environment(ELMER_RENDEZVOUS_TIMEOUT="3"), timeout=120)
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-3000:]
    assert time.monotonic() - started < 90


@pytest.mark.slow
def test_fairseq_train_names_an_unavailable_backend(xsum_tiny, tmp_path):
    argv = [BIN / "fairseq-train", *train_args("soft", xsum_tiny, None), "--save-dir", tmp_path,
            *by_hand(0, 2, free_port("127.0.0.1"), "--distributed-backend", "nccl")]
    proc = run(argv, environment(), timeout=120)
    assert proc.returncode != 0 and "--distributed-backend nccl" in proc.stdout[-3000:], proc.stdout[-3000:]
