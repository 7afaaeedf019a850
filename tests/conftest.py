"""Shared fixtures: a tiny offline tokenizer, random-initialised checkpoints of every
supported architecture saved with transformers, and transformers as the oracle."""
from __future__ import annotations

import os
import signal

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every process it starts: Python keeps an ignored SIGINT ignored
# instead of raising KeyboardInterrupt, so `serve run` and the test cluster holders would
# never stop on the Ctrl-C the tests send them. Handled here, the children get the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.helpers import ARCH_CONFIGS, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    """{arch name: model dir}, built once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(str(root / name), name) for name in ARCH_CONFIGS}


@pytest.fixture(scope="session")
def llama_dir(checkpoint_dirs):
    return checkpoint_dirs["llama"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for every in-process test that needs Ray (about 5 s to
    start). Two logical CPUs like the CI box: actors reserve fractions of them."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                 log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
