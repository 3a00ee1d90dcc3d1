"""tools/traffic.py's analytic model against DeepSpeed's comms logger on a 4-rank CPU run (TP=2 x DP=2, ZeRO-1).

One launch runs a few steps of a tiny Llama with miss_ds and with the frozen TP base alone, the comms logger on;
the model must give the steady step's TP and DP bytes, and MiSS must add nothing to the base's forward.
"""
from __future__ import annotations

from tests.launch_utils import deepspeed_run, result_of
from tools import traffic

TINY = ["model.config.hidden_size=128", "model.config.intermediate_size=352", "model.config.num_hidden_layers=2",
        "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "model.config.head_dim=32",
        "model.config.vocab_size=512", "model.config.max_position_embeddings=64", "model.dtype=float32",
        "data.seq_len=64", "train.micro_batch_size=2", "miss.r=16"]
#: What the model leaves out: the gradient-norm scalars of the optimizer step, one all-reduce per group (fp32 or
#: fp64). Every other byte must match exactly: the tensors the model counts are at least r*hidden*4 = 8 KiB here,
#: so a missing, extra or wrongly sized collective would exceed this by far.
SCALAR_BYTES = 8


def test_model_matches_comms_logger_and_miss_adds_no_forward_bytes():
    proc = deepspeed_run("tools/traffic.py", ["worker", "--layouts", "miss-z1,frozen-z1", "--tp", "2", "--steps", "2",
                                              *[a for s in TINY for a in ("--set", s)]], ranks=4, timeout=300)
    run = result_of(proc)
    assert proc.returncode == 0
    miss, frozen = run["layouts"]
    measured, differing = traffic.steady(miss)
    assert differing == 0, "every rank of a TP x DP layout moves the same bytes"
    model = traffic.modelled(run, miss)
    for phase in traffic.PHASES:
        for group in ("tp", "dp"):
            got = sum(measured.get(phase, {}).get(group, {}).values())
            want = sum(model.get(phase, {}).get(group, {}).values())
            slack = SCALAR_BYTES if phase == "step" else 0
            assert want <= got <= want + slack, f"{phase} {group}: measured {got} B, model {want} B"
    assert traffic.by_group(model)["dp"] > 0 and traffic.by_group(model)["tp"] > 0
    assert measured["forward"] == traffic.steady(frozen)[0]["forward"], "MiSS adds no forward collective bytes"
