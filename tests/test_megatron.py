"""MiSS on Megatron-core's tensor-parallel linears (TP=2 on CPU, gloo) equals single-device MiSS in every mode."""
from __future__ import annotations

import pytest

from tests.launch_utils import deepspeed_run, result_of

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def result() -> dict:
    proc = deepspeed_run("tests/dist/megatron_equivalence.py", [], ranks=2, timeout=300)
    out = result_of(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["miss", "mini", "bat"])
def test_megatron_tp2_equals_single_device(result, mode):
    """Output, input gradient and both layers' D gradients (the column's split, the row's replicated)."""
    got = result["modes"][mode]
    assert got["types"] == ["MegatronColumnMissLinear", "MegatronRowMissLinear"]
    assert got["trainable"] == ["down.miss_block", "up.miss_block"]
    for name, error in got["errors"].items():
        assert error < 1e-5, (name, error)


def test_sequence_parallel_layer_is_refused_by_name(result):
    message = result["sequence_parallel_error"]
    assert "module '0'" in message and "sequence_parallel=True" in message
