"""elmer-check: the report that tells a user of an existing environment what is missing."""
import subprocess
import sys

from conftest import run_cli


def test_ready_environment_passes_and_names_versions():
    out = run_cli("elmer-check").stdout
    assert "ok       fairseq 0.12" in out and "ok       torch 2." in out
    assert "elmer_fairseq plugin: fairseq-train/-generate --user-dir" in out


def test_missing_fairseq_fails_naming_it_and_the_install_command():
    code = "import sys; sys.modules['fairseq'] = None; from elmer_fairseq.check import main; main([])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "MISSING  fairseq" in proc.stdout and "fairseq-fixed==0.12.3.1" in proc.stdout
    assert "a requirement is missing" in proc.stderr
