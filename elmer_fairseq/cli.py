"""`elmer-generate`: raw text in (a file or stdin, one input per line), generated text out.

    elmer-generate --path checkpoints/demo-soft --data data/xsum/bin --bpe-dir data/xsum < articles.txt
"""
import argparse
import sys

from tqdm import tqdm


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="elmer-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="checkpoint file, or the --save-dir of a fine-tuning run")
    p.add_argument("--data", required=True, help="the binarized data folder the model was trained on (its dictionary)")
    p.add_argument("--bpe-dir", help="folder with vocab.json and merges.txt of the byte-level BPE (--bpe byte_bpe_ids), "
                                     "or with the tokenizer.json of a converted checkpoint (--bpe wordpiece)")
    p.add_argument("--input", default="-", help="input file, one input per line (default: stdin)")
    p.add_argument("--exit-threshold", type=float,
                   help="hard exit's delta (hard-exit checkpoints only; default: the checkpoint's)")
    p.add_argument("--exit-thresholds", help="hard exit: calibrated per-layer thresholds (elmer-calibrate's JSON)")
    p.add_argument("--length-cut", type=int, metavar="MARGIN",
                   help="after layer 1, decode only the positions its predictions say the outputs need, plus "
                        "MARGIN (default: every layer decodes all T positions, the paper's)")
    p.add_argument("--ramp-shortlist", type=int, metavar="K",
                   help="soft exit: the middle layers' off-ramps score only the union of layer 1's K most likely "
                        "tokens per position (faster on CPU; outputs can differ; default: the whole vocabulary)")
    p.add_argument("--ramp-precision", choices=["fp32", "bf16"], default="fp32",
                   help="the off-ramps' products in bf16 (faster on CPUs with bf16 instructions and on GPUs; "
                        "outputs can differ where two tokens are close; default: fp32, the paper's)")
    p.add_argument("--max-exit-layer", type=positive_int, metavar="K",
                   help="decoder layers 1..K only: every position exits by layer K (soft exit writes layer K's "
                        "off-ramp's prediction); faster, outputs can differ (default: all layers, the paper's)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def read_lines(raw: bytes, where: str):
    lines = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise SystemExit(f"{where}:{lineno}: not UTF-8 ({e})")
        if not text:
            raise SystemExit(f"{where}:{lineno}: empty input line")
        lines.append(text)
    return lines


def main(argv=None):
    args = parse_args(argv)
    from . import ELMER  # after argument parsing: --help should not wait for torch and fairseq

    where = "stdin" if args.input == "-" else args.input
    lines = read_lines(sys.stdin.buffer.read() if args.input == "-" else open(args.input, "rb").read(), where)
    if not lines:
        print(f"elmer-generate: {where} holds no input lines; nothing to do", file=sys.stderr)
        return
    model = ELMER.from_pretrained(args.path, data=args.data, bpe_dir=args.bpe_dir, device=args.device)
    step = args.batch_size
    with tqdm(total=len(lines), unit="line", disable=len(lines) <= step, file=sys.stderr) as progress:
        for start in range(0, len(lines), step):
            chunk = lines[start: start + step]
            names = [f"{where}:{start + i + 1}" for i in range(len(chunk))]  # read_lines kept every line
            for text in model.generate(chunk, exit_threshold=args.exit_threshold, exit_thresholds=args.exit_thresholds,
                                       length_cut=args.length_cut, shortlist=args.ramp_shortlist,
                                       ramp_precision=args.ramp_precision, max_exit_layer=args.max_exit_layer,
                                       batch_size=step, names=names):
                print(text, flush=False)
            progress.update(len(chunk))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
