"""Block offload (``aqsearch.capture.blocks_on``, ``polish(device=, dtype=)``): the model stays on the host,
one block at a time visits the device. On this CPU the "device" copy is told apart from the host copy by
its dtype: the host blocks are bf16, a block on its turn is fp32."""

import copy

import torch

from aqsearch.config import Plan
from aqsearch.data import TokenSet
from aqsearch.models import BLOCK_LINEARS, decoder_blocks
from aqsearch.polish import polish
from aqsearch.training import TrainSettings
from tinymodels import tiny_model


def _fp32_blocks(model) -> list[int]:
    return [i for i, b in enumerate(decoder_blocks(model)) if any(p.dtype == torch.float32 for p in b.parameters())]


def test_offloaded_polish_equals_the_plain_one_with_one_block_on_the_device_at_a_time():
    """Blocks bf16 on the host (embedding and norms fp32, so RoPE and the stream are exactly those of the
    reference), each cast to fp32 on its turn: the trained tensors equal those of the same values held in
    fp32 all along, bit for bit. Catches: a polish that ignores ``device``/``dtype`` (bf16 weights meet the
    fp32 stream and fail, or train other codes); one that moves every block first (``model.to(device)``:
    more than one block resident when a block runs); one that leaves blocks on the device afterwards (fp32
    blocks after the call)."""
    m = tiny_model(num_hidden_layers=3)
    host = copy.deepcopy(m)
    for b in decoder_blocks(host):
        b.to(torch.bfloat16)
    ref = copy.deepcopy(host)
    for b in decoder_blocks(ref):
        b.to(torch.float32)  # the same (bf16-representable) values, in fp32 from the start
    before = {k: v.clone() for k, v in host.state_dict().items()}

    seen: list[tuple[int, list[int]]] = []  # (block called, blocks "on the device" then)
    for i, b in enumerate(decoder_blocks(host)):
        b.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, _fp32_blocks(host))))
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    calib = TokenSet(windows, "random", "test-offload")
    ts = TrainSettings(steps=6, batch=4)
    plan = Plan.uniform("w3g32")
    q_ref, _ = polish(ref, plan, calib, ts)
    q_off, st = polish(host, plan, calib, ts, device="cpu", dtype=torch.float32)

    assert set(q_off) == set(q_ref) == {f"model.layers.{i}.{s}" for i in range(3) for s in BLOCK_LINEARS}
    for k in q_ref:
        assert torch.equal(q_off[k].codes, q_ref[k].codes), k
        assert torch.equal(q_off[k].scale, q_ref[k].scale) and torch.equal(q_off[k].zero, q_ref[k].zero), k
    # the capture's embedding passes stop at block 0's door before anything moves; then every call of a
    # block finds exactly that block on the device, and each block gets its turn
    n_capture = next(k for k, (_, res) in enumerate(seen) if res)
    assert n_capture == len(windows) and all(res == [] and i == 0 for i, res in seen[:n_capture])
    assert all(res == [i] for i, res in seen[n_capture:]), seen
    assert {i for i, _ in seen[n_capture:]} == {0, 1, 2}
    assert _fp32_blocks(host) == []  # all back home, as bf16 ...
    after = host.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())  # ... unchanged
    assert st["steps"] == 3 * ts.steps
