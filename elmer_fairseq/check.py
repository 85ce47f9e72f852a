"""`elmer-check` (or `python -m elmer_fairseq.check`): is this environment ready for ELMER?

Lists what the plugin needs next to what is installed, with the pip command for anything missing
or of an untested version, and exits non-zero when a requirement is missing. Run it after
`pip install elmer-fairseq` into an environment that already has torch and fairseq.
"""
import argparse
import importlib
import logging
import os
import sys
from importlib import metadata

FAIRSEQ_HINT = ("pip install --no-build-isolation fairseq-fixed==0.12.3.1 (Python >= 3.11) or "
                "fairseq==0.12.2 (Python <= 3.10); fairseq compiles against the installed torch")
# (import name, distribution names to read the version from, version prefix it was tested with, how to install)
REQUIRED = [
    ("torch", ("torch",), "2.", "pip install torch (a CPU build: pip install torch --index-url .../cpu)"),
    ("fairseq", ("fairseq-fixed", "fairseq", "ve-fairseq"), "0.12", FAIRSEQ_HINT),
    ("tokenizers", ("tokenizers",), "", "pip install tokenizers"),
]
OPTIONAL = [  # (import name, what needs it, how to install)
    ("rouge_score", "ROUGE in the benchmark and the demo", "pip install rouge-score"),
    ("sacrebleu", "BLEU in the benchmark, fairseq --scoring sacrebleu", "pip install sacrebleu"),
    ("safetensors", "elmer-convert of .safetensors checkpoints", "pip install safetensors"),
    ("tensorboardX", "fairseq-train --tensorboard-logdir", "pip install tensorboardX"),
    ("ninja", "building the fused off-ramp extension (else the PyTorch reference runs)", "pip install ninja"),
]


def version_of(names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def importable(module: str):
    """None when `module` imports, else the error's first line."""
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 (any failure to import is what we report)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def report(build: bool = False):
    """(lines, ok): one line per requirement; ok is False when a required one is missing."""
    lines, ok = [f"python {sys.version.split()[0]}"], True
    for module, dists, tested, hint in REQUIRED:
        error, version = importable(module), version_of(dists)
        if error:
            ok = False
            lines.append(f"MISSING  {module}: {error}\n         -> {hint}")
        elif not (version or "").startswith(tested):
            lines.append(f"WARNING  {module} {version}: tested with {tested}x only\n         -> {hint}")
        else:
            lines.append(f"ok       {module} {version}")
    for module, purpose, hint in OPTIONAL:
        error = importable(module)
        lines.append(f"ok       {module}" if not error else f"optional {module} not found ({purpose}) -> {hint}")
    if ok:
        lines.append(f"ok       elmer_fairseq plugin: fairseq-train/-generate --user-dir {plugin_dir()}")
        lines.append(off_ramp_backend(build))
    return lines, ok


def plugin_dir():
    import elmer_fairseq

    return os.path.dirname(elmer_fairseq.__file__)


def off_ramp_backend(build: bool) -> str:
    import torch

    from .ops import _ext

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    if not build:
        return (f"info     off-ramp op: the fused {kind} extension builds on first use "
                f"(elmer-check --build tries it now)")
    try:
        _ext.load_extension(kind, strict=True)
    except RuntimeError as e:
        return f"WARNING  off-ramp op: {str(e)[:500]}\n         -> decoding falls back to the PyTorch reference"
    return f"ok       off-ramp op: the fused {kind} extension is built"


def main(argv=None):
    p = argparse.ArgumentParser(prog="elmer-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true",
                   help="also build (or load from the cache) the fused off-ramp extension and say which backend runs")
    args = p.parse_args(argv)
    logging.getLogger("elmer_fairseq.patches").setLevel(logging.INFO)  # its debug lines are not this report
    lines, ok = report(args.build)
    print("\n".join(lines))
    if not ok:
        print("elmer-check: a requirement is missing (see MISSING above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
