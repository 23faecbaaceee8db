"""torch.compile on a loaded int4 model: no graph break, the same tokens as eager, no recompilation per step."""

from __future__ import annotations

import pytest
import torch

from hubtool.kernels import cpu
from hubtool.runtime.loader import load_quantized
from tests.test_formats import exported

pytestmark = pytest.mark.slow  # compiling takes tens of seconds on 2 cores


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory):
    """The tiny Llama's hubtool export, loaded (kernel layouts made at load)."""
    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"), formats=["hubtool"])
    return load_quantized(ex.dirs["hubtool"], dtype=torch.bfloat16)


def test_the_quantizer_says_compileable_and_a_forward_traces_whole(model):
    """One graph, no break, for a forward over the int4 layers and the 16-bit head's kernel."""
    assert model.hf_quantizer.is_compileable
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(input_ids=torch.tensor([[1, 5, 9, 11, 40]]))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_static_cache_decode_compiles_once_and_gives_eager_tokens(model):
    """transformers' auto-compile of the decode step (static cache) runs on the CPU with hubtool's layers:
    the greedy tokens are eager's, and a second generate of the same length compiles nothing new."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, dynamic=False)
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless asked
    ids = torch.tensor([[1, 5, 9, 11, 40, 7, 3, 12]])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.inference_mode():
        eager = model.generate(input_ids=ids, **kw)
        first = model.generate(input_ids=ids, cache_implementation="static", compile_config=cc, **kw)
        assert hasattr(model, "_compiled_call")  # generate took the compiled path
        torch._dynamo.utils.counters.clear()
        second = model.generate(input_ids=ids, cache_implementation="static", compile_config=cc, **kw)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) == 0  # no recompilation


def test_sliding_window_model_compiles_once_past_its_window(tmp_path_factory):
    """Gemma 3 (sliding-window layers): transformers' static sliding layer would recompile at every step;
    with full static layers (``runtime.compile_cache``) one graph serves every step, a second generate
    compiles nothing, and the tokens equal eager's (dynamic cache) past the window (fp32: no near-ties)."""
    from transformers import CompileConfig
    from transformers.cache_utils import StaticLayer

    from tests import tiny

    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    src = tiny.build_text_model("gemma3", tmp_path_factory.mktemp("g3sw"), sliding_window=8)
    ex = exported("gemma3", src, tmp_path_factory.mktemp("exports"), formats=["hubtool"])
    model = load_quantized(ex.dirs["hubtool"], dtype=torch.float32)
    assert "sliding_attention" in model.config.layer_types
    cc = CompileConfig(fullgraph=True, dynamic=False)
    cc._compile_all_devices = True
    ids = torch.tensor([[1, 5, 9, 11, 40, 7]])
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = model.generate(input_ids=ids, **kw)
        torch._dynamo.utils.counters.clear()
        first = model.generate(input_ids=ids, cache_implementation="static", compile_config=cc, **kw)
        graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
        torch._dynamo.utils.counters.clear()
        out = model.generate(
            input_ids=ids,
            cache_implementation="static",
            compile_config=cc,
            return_dict_in_generate=True,
            **kw,
        )
    assert hasattr(model, "_compiled_call")
    assert all(type(layer) is StaticLayer for layer in out.past_key_values.layers)
    assert graphs == 1  # transformers' sliding layer: a recompile per step, then FailOnRecompileLimitHit
    assert torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) == 0
    assert torch.equal(first, eager) and torch.equal(out.sequences, eager)
