"""The minigpt ops as ``torch.library`` ops: one schema per op in every backend's namespace, ``opcheck`` on every
backend that runs on this machine (the Triton interpreter lane: tests/test_triton_kernels.py), one definition of
"active" and of NaN/±inf/±0/subnormal handling shared exactly by every backend, bit-identical reruns, and
``torch.compile(fullgraph=True)`` of a patched model's calibration step without a graph break."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_model
from edge_values import assert_same_stats, edge_grids

from minigpt import ops
from minigpt.models import adapters
from minigpt.ops import reference as R
from minigpt.pipeline import calibration

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in ops.available_backends("cpu")]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def normalized(schema) -> str:
    """A schema without its name and alias-set letters: ``(Tensor(!) acc, ...) -> Tensor``."""
    text = str(schema)
    return re.sub(r"\(\w+!\)", "(!)", text[text.index("("):])


def test_active_min_is_where_the_activation_falls_below_freq_eps():
    for act in ("silu", "gelu", "gelu_tanh"):
        lo = R.active_min(act)
        below = torch.nextafter(torch.tensor(lo), torch.tensor(-1e9)).double()
        assert abs(R.activation_ref(torch.tensor(lo).double(), act)) > R.FREQ_EPS
        assert abs(R.activation_ref(below, act)) <= R.FREQ_EPS
        assert -20 < lo < -4  # "off" is deep in the tail, not at fp32 underflow (about -88)
    assert R.active_min("relu") == 0.0 and R.active_min("identity") == -math.inf


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_registers_the_one_schema(backend):
    for name, schema in ops.SCHEMAS.items():
        assert normalized(ops.get_op(name, backend).default._schema) == normalized(schema)


def _op_samples():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 5, 19, generator=g), torch.randn(2, 5, 19, generator=g)
    stats = lambda: (torch.zeros(3, 19), torch.zeros(19, dtype=torch.int64))
    ids = torch.randint(0, 50, (3, 7), generator=g)
    w = torch.randn(9, 6, generator=g)
    return {
        "act_stats": [(gate, up, "silu", R.active_min("silu"), *stats()),
                      (gate.bfloat16(), None, "relu", 0.0, *stats()),
                      (gate.transpose(0, 1), None, "identity", -math.inf, torch.zeros(3, 19),
                       torch.zeros(19, dtype=torch.int64))],
        "column_stats": [(up, *stats())],
        "token_histogram": [(ids, None, torch.zeros(50, dtype=torch.int64)),
                            (ids, ids > 20, torch.zeros(50, dtype=torch.int64))],
        "gather": [([w, w.half()], [torch.tensor([8, 0, 3]), torch.tensor([5, 1])], [0, 1])],
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck(backend, name):
    for args in _op_samples()[name]:
        torch.library.opcheck(ops.get_op(name, backend).default, args)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
def test_edge_values_agree_with_the_reference(backend, dtype, act):
    """Counts, NaN and ±inf exactly as the reference for every activation over NaN/±inf/±0/subnormals/±3e38 and
    [-30, 30]; h and the statistics exactly for relu/identity, within fp32 rounding otherwise."""
    for gate, up in edge_grids(dtype):
        up_finite = bool(up.isfinite().all())
        for u in (up, None):
            runs = []
            for b in ("torch", backend):
                acc, nnz = torch.zeros(3, gate.shape[1]), torch.zeros(gate.shape[1], dtype=torch.int64)
                runs.append((ops.act_stats(gate, u, act, acc, nnz, backend=b), acc, nnz))
            exact = act in ("relu", "identity")
            assert_same_stats(runs[1], runs[0], u, exact_values=exact, nan_exact=exact or u is None or up_finite)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_column_stats_edge_values(backend, dtype):
    for x, _ in edge_grids(dtype):
        runs = []
        for b in ("torch", backend):
            acc, nnz = torch.zeros(3, x.shape[1]), torch.zeros(x.shape[1], dtype=torch.int64)
            ops.column_stats(x, acc, nnz, backend=b)
            runs.append((x, acc, nnz))
        assert_same_stats(runs[1], runs[0], None, exact_values=False, nan_exact=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_inputs_same_bits(backend):
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(777, 300, generator=g), torch.randn(777, 300, generator=g)
    results = []
    for _ in range(2):
        acc, nnz = torch.zeros(3, 300), torch.zeros(300, dtype=torch.int64)
        h = ops.act_stats(gate, up, "gelu", acc, nnz, backend=backend)
        results.append((h, acc, nnz))
    for x, y in zip(*results):
        assert torch.equal(x.view(torch.int32) if x.is_floating_point() else x,
                           y.view(torch.int32) if y.is_floating_point() else y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_compiled_calibration_step_has_no_graph_break(backend, model_type):
    """``torch.compile(fullgraph=True)`` of a patched model's forward: the statistics op is one opaque node, and the
    compiled step gives the eager step's statistics."""
    model = tiny_model(model_type)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        accums = [calibration._LayerAccumulator(n) for n in adapters.widths(model)]
        with calibration.patched(model, accums, backend), torch.no_grad():
            step = torch.compile(model.base_model, fullgraph=True, backend="eager") if compiled else model.base_model
            step(input_ids=ids, use_cache=False)
        results.append(accums)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled.acc, eager.acc)
        assert torch.equal(compiled.nnz, eager.nnz)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gather_checks_cpu_indices_once_on_the_host(backend):
    w = torch.randn(5, 4)
    keep = torch.tensor([4, 0])
    rows, cols = ops.gather([w, w.t().contiguous()], [keep, keep], [0, 1], backend=backend)
    assert torch.equal(rows, w[[4, 0]]) and torch.equal(cols, w.t()[:, [4, 0]])
    for idx, dim in ((torch.tensor([5]), 0), (torch.tensor([-1]), 1), (torch.tensor([0, 4]), 1)):
        with pytest.raises(IndexError, match="out of range"):
            ops.gather([w], [idx], [dim], backend=backend)
