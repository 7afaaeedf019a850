"""`raylm generate` and `python -m raylm`."""
import subprocess
import sys


def test_generate_cli(llama_dir):
    r = subprocess.run([sys.executable, "-m", "raylm", "generate", "The quick", "--model", llama_dir,
                        "--max-tokens", "4", "--dtype", "float32", "--max-model-len", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The quick")


def test_generate_cli_bad_input(llama_dir):
    r = subprocess.run([sys.executable, "-m", "raylm", "generate", "x", "--model", llama_dir,
                        "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max_tokens" in r.stderr
