"""The README's install into an existing environment: `pip install` of this package next to an
installed torch + fairseq, then `elmer-check` and a real fairseq-train with the installed plugin."""
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT, cli_env


@pytest.mark.slow
def test_pip_install_next_to_an_existing_torch_and_fairseq(tmp_path, xsum_tiny):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # "an environment that already has torch and fairseq": this venv sees the test venv's packages,
    # but not its editable install of this checkout (a directory named in a .pth is not scanned for .pth files)
    with open(f"{site}/existing.pth", "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    missing = subprocess.run([python, "-c", "import elmer_fairseq"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0, "the plugin must come from the install below, not from the checkout"
    # a copy of what the package is made of: building in the checkout would write build/ into it
    source = tmp_path / "source"
    shutil.copytree(ROOT / "elmer_fairseq", source / "elmer_fairseq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", source / "csrc")
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    # --no-index: everything it needs is already there, nothing is downloaded
    install = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation", str(source)],
                             capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    check = subprocess.run([env_dir / "bin" / "elmer-check"], capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert check.returncode == 0 and "ok       fairseq 0.12" in check.stdout, check.stdout + check.stderr
    plugin = subprocess.run([python, "-c", "import elmer_fairseq, os; print(os.path.dirname(elmer_fairseq.__file__))"],
                            capture_output=True, text=True, env=cli_env(), cwd=tmp_path).stdout.strip()
    assert plugin.startswith(site) and not plugin.startswith(str(ROOT))
    assert list((env_dir / "lib").glob("*/site-packages/elmer_fairseq/csrc/*.cu")), "the kernel sources ship"
    train = subprocess.run([python, "-m", "fairseq_cli.train", xsum_tiny, "--user-dir", plugin, "--task",
                            "elmer_translation", "--arch", "elmer_tiny", "--encoder-layers", "1", "--decoder-layers",
                            "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--criterion",
                            "elmer_loss", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2048",
                            "--max-update", "2", "--max-target-length", "24", "--save-dir", tmp_path / "ckpt",
                            "--no-epoch-checkpoints", "--cpu", "--num-workers", "0"],
                           capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
