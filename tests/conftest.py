"""Eight emulated CPU devices for every test; set before JAX starts its backend.

A persistent compilation cache shared by the session's tests: many tests compile the same
tiny train step, and reading it back from disk is much faster than compiling it again. Token
stores prepared by default go to a cache of the session too (JAXSCALE_CACHE, inherited by the
commands tests start), so the standard library is tokenized once per session, never into ~/.cache.
"""

import os
import tempfile

import jax
import pytest

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxscale-test-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
os.environ["JAXSCALE_CACHE"] = tempfile.mkdtemp(prefix="jaxscale-test-cache-")


@pytest.fixture(scope="module")
def tiny_state():
    """configs/tiny.yaml's freshly initialized state (fp32, seq 32) and its abstract structs, on the 8 test devices."""
    from jaxscale.config import load_config
    from jaxscale.training.setup import setup_run

    cfg = load_config("configs/tiny.yaml", ["train.seq_len=32", "model.compute_dtype=float32"])
    setup = setup_run(cfg, tokenizer_vocab=257)
    return setup.init_state(), setup.state_structs
