import sys

from setuptools import find_packages, setup

# fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is a maintained fork with the
# same `fairseq` import name. On older Pythons either distribution works, so we ask for none and
# let an existing fairseq install stand.
fairseq_req = ["fairseq-fixed==0.12.3.1"] if sys.version_info >= (3, 11) else []

setup(
    name="elmer-fairseq",
    version="0.1.0",
    description="ELMER: non-autoregressive pretrained text generation with early exit, for fairseq",
    # csrc/ ships as elmer_fairseq/csrc, where the JIT loader looks when not run from a checkout
    packages=find_packages(include=["elmer_fairseq", "elmer_fairseq.*"]) + ["elmer_fairseq.csrc"],
    package_dir={"elmer_fairseq.csrc": "csrc"},
    package_data={"elmer_fairseq.csrc": ["*.cpp", "*.cu", "*.h"]},
    python_requires=">=3.8",
    install_requires=["torch>=2.0", "rouge-score", "sacrebleu", "tokenizers", "tqdm"] + fairseq_req,
    entry_points={"console_scripts": ["elmer-generate=elmer_fairseq.cli:main",
                                     "elmer-convert=elmer_fairseq.convert:main",
                                     "elmer-check=elmer_fairseq.check:main",
                                     "elmer-calibrate=elmer_fairseq.calibrate:main"]},
)
