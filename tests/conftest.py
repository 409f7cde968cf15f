import os

import pytest

os.environ.setdefault("PITLM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' tensors are tiny: one intra-op thread is faster than two (thread start-up and sync cost more than they
# save), and a 2-rank torchrun test then uses one core per rank instead of oversubscribing the machine's cores.
# Set before torch is imported; a user's OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # pitlm's Triton kernels run on CPU tensors under Triton's interpreter (tests/test_kernels_routed.py);
    # it has to be chosen before triton is first imported, when triton's own library functions are jitted
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _unpatch_modeling_functions():
    """pitlm.kernels patches module-level functions of transformers' modeling modules (the conv, the rotary
    embedding), for the process; a test that installs them must not leave them to the next test."""
    yield
    import sys

    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or module is None:
            continue
        for fn in ("causal_conv1d_fn", "apply_rotary_pos_emb"):
            f = getattr(module, fn, None)
            if getattr(f, "_pitlm_fast", False) and hasattr(f, "__wrapped__"):
                setattr(module, fn, f.__wrapped__)


@pytest.fixture
def interpret(monkeypatch):
    """pitlm's Triton kernels on CPU tensors under Triton's interpreter (chosen above on machines without a GPU)."""
    from pitlm.kernels import triton_util

    if not triton_util.interpreting():
        pytest.skip("Triton's interpreter is chosen by conftest on machines without a GPU")
    monkeypatch.setenv(triton_util.CPU_ENV, "1")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh PITLM_HOME for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("PITLM_HOME", str(h))
    return h


def run_cli(*args: str):
    """Run the real CLI in-process: returns (exit_code, stdout, stderr)."""
    import sys
    from io import StringIO

    from pitlm import cli as cli_mod

    out, err = StringIO(), StringIO()
    old = sys.stdout, sys.stderr, sys.argv
    sys.stdout, sys.stderr, sys.argv = out, err, ["pitlm", *args]
    code = 0
    try:
        cli_mod.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout, sys.stderr, sys.argv = old
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli(home):
    """Run the real CLI in-process: returns (exit_code, stdout, stderr)."""
    return run_cli
