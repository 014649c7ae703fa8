"""Test setup: 8 fake CPU devices before JAX starts, f32 matmuls everywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny programs whose time is XLA:CPU compilation, most of it LLVM optimisation: level 0
# compiles the toy run ~25% faster with identical losses (inherited by the CLI subprocesses).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One persistent XLA compilation cache for the whole test session, shared with the CLI
# subprocesses the tests start: the same tiny programs compile once, not once per process.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sorajax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def wan_ckpt(tmp_path_factory):
    """tests/fixtures/wan_pipeline_tiny (a tiny random Wan 2.1 diffusers pipeline) converted by
    scripts/convert_diffusers.py: an imported checkpoint, as users make from the real weights."""
    from tests.helpers import run_cli

    d = tmp_path_factory.mktemp("conv") / "ckpt"
    r = run_cli(["scripts/convert_diffusers.py", "--src", str(FIXTURES / "wan_pipeline_tiny"), "--dst", str(d),
                 "--frames", "9", "--height", "32", "--width", "48", "--max-length", "16"])
    assert r.returncode == 0, r.stderr[-3000:]
    return d


# The most expensive files first (measured with --durations), so that with `-n 2 --dist
# loadfile --no-loadscope-reorder` the two workers finish together instead of one of them
# starting a two-minute file at the end. The others follow in collection order.
HEAVY_FIRST = ("test_multihost.py", "test_cli.py", "test_train.py", "test_reliability.py",
               "test_configs.py", "test_pods.py", "test_convert.py", "test_vae_sharded.py", "test_cli_fuzz.py",
               "test_prepare.py", "test_experiments.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
