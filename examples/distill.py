#!/usr/bin/env python
"""Sequence-level knowledge distillation (Kim & Rush 2016), made once: a trained autoregressive
teacher re-writes the training targets with greedy search, and every non-autoregressive system
(ELMER, CMLM, LevT) trains on its outputs instead of the references. Valid and test keep the real
references (linked, not copied). The NAR field's standard first step: one consistent output per
input is easier to learn in one pass than the references' many ways of saying it.

    python examples/distill.py --data data/boolq-minilm64/bin \\
        --teacher results/benchmark-cpu/boolq-warm64/checkpoints/transformer/checkpoint_last.pt \\
        --out data/boolq-minilm64/kd
    python examples/benchmark.py ... --kd-data data/boolq-minilm64/kd --systems elmer-soft-kd cmlm-kd levt-kd
    python examples/distill.py --data data/boolq-minilm64/bin --from examples/boolq/kd-minilm64 --out data/boolq-minilm64/kd

The last form binarizes targets distilled earlier (shipped ones, as the demo's) without the teacher,
after checking that they were made for this very training split (teacher.json's sha256 of train.src).

Writes OUT/train.{src,tgt} (piece ids, as examples/TASK/prepare.py writes them), OUT/bin (binarized
with the data's own dictionaries) and OUT/teacher.json (which checkpoint, after how many updates,
how many targets it changed). An existing OUT is reused as it is, whichever teacher made it.
"""
import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

PLUGIN = Path(__file__).resolve().parent.parent / "elmer_fairseq"


def fairseq_cli(tool):
    """The command of a fairseq console script, run by this interpreter (works without the scripts on PATH)."""
    return [sys.executable, "-m", f"fairseq_cli.{tool}"]


def fairseq(tool, *argv, log: Path):
    with log.open("w") as f:
        proc = subprocess.run([*fairseq_cli(tool), *map(str, argv)], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode}); see {log}")


def distill(data: Path, teacher: Path, out: Path, relabel: list, device_flags=(), batch_size: int = 128) -> Path:
    """OUT/bin: `data`'s training split with its targets re-written by the `teacher` checkpoint, decoded
    with the fairseq-generate options `relabel` (e.g. --task translation --beam 1 --max-len-b 64)."""
    bin_dir = out / "bin"
    if (bin_dir / "train.src-tgt.tgt.idx").exists():
        return bin_dir
    if not teacher.is_file():
        raise FileNotFoundError(f"teacher checkpoint {teacher} not found: train the autoregressive model first")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "generate.log"
    fairseq("generate", data, "--path", teacher, *relabel, "--gen-subset", "train", "--batch-size", batch_size,
            "--required-batch-size-multiple", "1", "--user-dir", PLUGIN, *device_flags, log=log)
    hyps = {int(line[2:].split("\t")[0]): line.rstrip("\n").split("\t")[2:] for line in log.open() if line.startswith("H-")}
    targets = (data.parent / "train.tgt").read_text(encoding="utf-8").splitlines()
    if sorted(hyps) != list(range(len(targets))):
        raise RuntimeError(f"{log}: {len(hyps)} hypotheses for {len(targets)} training pairs")
    # an empty hypothesis would leave a NAT system nothing to learn from: keep the reference there
    empty = [i for i in hyps if not (hyps[i] and hyps[i][0])]
    new = [targets[i] if i in empty else hyps[i][0] for i in range(len(targets))]
    updates = torch.load(teacher, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"]
    return binarize(data, out, new, {"teacher": str(teacher), "updates": updates,
                                     "relabel": [str(a) for a in relabel], "empty_kept_as_reference": len(empty)})


def reuse(data: Path, made: Path, out: Path) -> Path:
    """OUT/bin from the targets of an earlier distillation of the same training split (MADE/train.tgt and
    MADE/teacher.json, e.g. the ones shipped with the demo), without the teacher."""
    bin_dir = out / "bin"
    if (bin_dir / "train.src-tgt.tgt.idx").exists():
        return bin_dir
    try:
        made_by = json.loads((made / "teacher.json").read_text())
        new = (made / "train.tgt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise SystemExit(f"--from {made}: not the output of examples/distill.py ({e})")
    if made_by.get("train_src_sha256") != sha256(data.parent / "train.src"):
        raise SystemExit(f"--from {made}: made for another training split than {data.parent / 'train.src'} "
                         f"(sha256 differs: other data, tokenizer or prepare.py options); distil with --teacher")
    return binarize(data, out, new, {**made_by, "reused_from": str(made)})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def binarize(data: Path, out: Path, new: list, made_by: dict) -> Path:
    """OUT/train.{src,tgt} (`new` targets), OUT/bin with the data's own dictionaries, valid and test
    linked as they are, and OUT/teacher.json (`made_by` and what the targets changed)."""
    bin_dir = out / "bin"
    sources = (data.parent / "train.src").read_text(encoding="utf-8").splitlines()
    targets = (data.parent / "train.tgt").read_text(encoding="utf-8").splitlines()
    if len(new) != len(targets):
        raise SystemExit(f"{len(new)} distilled targets for {len(targets)} training pairs in {data.parent}")
    same = sum(a == b for a, b in zip(new, targets))
    print(f"distilled {len(new)} training targets ({same} equal to the reference)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.src").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (out / "train.tgt").write_text("\n".join(new) + "\n", encoding="utf-8")
    fairseq("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", out / "train",
            "--srcdict", data / "dict.src.txt", "--tgtdict", data / "dict.tgt.txt", "--destdir", bin_dir,
            "--workers", "2", log=out / "preprocess.log")
    for f in data.glob("*"):  # valid and test stay the real references
        if not f.name.startswith("train.") and not (bin_dir / f.name).exists():
            (bin_dir / f.name).symlink_to(f.resolve())
    (out / "teacher.json").write_text(json.dumps({
        **made_by, "pairs": len(new), "equal_to_reference": same,
        "train_src_sha256": sha256(data.parent / "train.src")}, indent=1) + "\n")
    return bin_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="binarized data (examples/TASK/prepare.py's bin/)")
    made = p.add_mutually_exclusive_group(required=True)
    made.add_argument("--teacher", type=Path, help="the autoregressive teacher's checkpoint (fairseq's transformer, "
                                                   "trained on --data)")
    made.add_argument("--from", dest="made", type=Path, metavar="DIR",
                      help="reuse the targets of an earlier run of this command on the same training split (its "
                           "--out, or a copy with train.tgt and teacher.json, e.g. examples/boolq/kd-minilm64): "
                           "no teacher needed; refused when the split differs")
    p.add_argument("--out", type=Path, required=True, help="folder for the distilled training set")
    p.add_argument("--max-target-length", type=int, default=64, help="longest teacher output (--max-len-b)")
    p.add_argument("--beam", type=int, default=1, help="the teacher's beam (default 1: greedy, fairseq's NAT recipe)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_target_length < 1 or args.beam < 1 or args.batch_size < 1:
        p.error("--max-target-length, --beam and --batch-size must be >= 1")
    import elmer_fairseq.checkpoint  # noqa: F401  (the teacher loads with torch's safe default)

    if args.made:
        bin_dir = reuse(args.data, args.made, args.out)
        print(f"distilled training set: {bin_dir}")
        return
    relabel = ["--task", "translation", "--max-len-a", "0", "--max-len-b", args.max_target_length, "--beam", args.beam]
    bin_dir = distill(args.data, args.teacher, args.out, relabel, ["--cpu"] if args.device == "cpu" else [],
                      args.batch_size)
    print(f"distilled training set: {bin_dir} (train on it with fairseq-train {bin_dir} ..., or "
          f"examples/benchmark.py --kd-data {args.out})")


if __name__ == "__main__":
    main()
