"""SignRound and opt-rtn on tiny models: losses, determinism, resume, VLMs, asymmetric, the fused gradient."""

from __future__ import annotations

import json

import pytest
import torch

from hubtool.core.intweight import FP16_TINY
from hubtool.core.intweight import fp16_exact as _fp16_round
from hubtool.core.kquant import two_level
from hubtool.core.spec import QuantSpec
from hubtool.errors import HubtoolError
from hubtool.quant.calib import load_calibration
from hubtool.quant.driver import ProgressEvent, quantize_model
from hubtool.quant.layers import plan_layers
from hubtool.quant.signround import TunedLinear, sign_sgd
from hubtool.quant.spec import make_recipe
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run on one thread

SYM = QuantSpec()
KQ = QuantSpec(4, 32, False, kquant=True)  # llama.cpp's Q4_K parameterization
RECIPE = make_recipe("light", iters=16, nsamples=8, seqlen=48, batch_size=4, seed=7)


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _calib(tok, recipe=RECIPE):
    return load_calibration(
        "builtin",
        tok,
        nsamples=recipe.nsamples,
        seqlen=recipe.seqlen,
        seed=recipe.seed,
        is_vlm=False,
        batch_size=recipe.batch_size,
    )


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].q, b[k].q)
        and torch.equal(a[k].scale, b[k].scale)
        and torch.equal(a[k].zero, b[k].zero)
        for k in a
    )


@pytest.fixture(scope="module")
def llama(tiny_models):
    return _load(tiny_models("llama"))


def test_signround_beats_rtn_on_every_block_and_is_deterministic(llama):
    model, tok = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_layers(model, SYM)
    events: list[ProgressEvent] = []
    a = quantize_model(model, plan, SYM, "signround", RECIPE, _calib(tok), progress=events.append)
    assert set(a.weights) == set(plan.linear_names())
    assert len(a.block_losses) == len(plan.blocks)
    for bl in a.block_losses:
        assert bl.tuned < bl.rtn, bl
    done = [e for e in events if e.done]
    assert [e.index for e in done] == list(range(len(plan.blocks)))
    assert any(not e.done and e.iteration == 10 and e.loss is not None for e in events)
    b = quantize_model(model, plan, SYM, "signround", RECIPE, _calib(tok))
    assert _same(a.weights, b.weights)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    w = next(iter(a.weights.values()))
    assert w.q.dtype == torch.uint8 and int(w.q.max()) <= 15 and torch.equal(w.scale, w.scale.half().float())
    assert (w.scale < 0).any() and (w.scale > 0).any()  # full range: the sign follows the larger end


def _output_error(w: torch.Tensor, iw, h: torch.Tensor) -> float:
    """sum over groups of e H_g e^T: the linear's output error on the calibration X^T X (diagonal blocks)."""
    g = h.shape[-1]
    e = (w.float() - iw.dequantize()).reshape(w.shape[0], -1, g).transpose(0, 1)  # (G#, N, G)
    return float((torch.bmm(e, h.float()) * e).sum())


def test_optrtn_not_worse_than_rtn(llama, monkeypatch):
    """The clipping search by itself beats RTN: every block's final codes are the search's (not the keep-RTN
    fallback's) with a lower block loss than RTN's, and each linear's output error on X^T X is lower."""
    from hubtool.quant import blockquant
    from hubtool.quant.optrtn import quantize_clipped
    from hubtool.quant.rtn import quantize_rtn

    model, tok = llama
    plan = plan_layers(model, SYM)
    names = {model.get_submodule(n).weight.data_ptr(): n for n in plan.linear_names()}
    searched = {}
    real = blockquant.search_clip

    def spy(weight, h, spec):
        clip = real(weight, h, spec)
        searched[names[weight.data_ptr()]] = (weight.detach().clone(), h, clip)
        return clip

    monkeypatch.setattr(blockquant, "search_clip", spy)
    res = quantize_model(model, plan, SYM, "opt-rtn", RECIPE, _calib(tok))
    assert set(searched) == set(plan.linear_names())
    assert all(bl.tuned < bl.rtn for bl in res.block_losses), res.block_losses
    for name, (w, h, clip) in searched.items():
        assert _same({name: res.weights[name]}, {name: quantize_clipped(w, SYM, clip)}), name  # no fallback
        assert (clip < 1).any(), name
        assert _output_error(w, res.weights[name], h) < _output_error(w, quantize_rtn(w, SYM), h), name


def test_resume_after_interruption_gives_the_same_bytes(tmp_path):
    folder = tiny.build_text_model("qwen2", tmp_path / "m", layers=3)
    model, tok = _load(folder)
    plan = plan_layers(model, SYM)
    calib = _calib(tok)
    full = quantize_model(model, plan, SYM, "signround", RECIPE, calib)

    def stop_after_block_1(ev):
        if ev.done and ev.index == 1:
            raise KeyboardInterrupt

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(
            model, plan, SYM, "signround", RECIPE, calib, work_dir=work, progress=stop_after_block_1
        )
    assert json.loads((work / "state.json").read_text())["done"] == 2
    assert not list(work.glob("*.pkl")) and not list(work.glob("*.pt"))
    seen = []
    resumed = quantize_model(
        model, plan, SYM, "signround", RECIPE, calib, work_dir=work, resume=True, progress=seen.append
    )
    assert _same(full.weights, resumed.weights)
    assert [bl.tuned for bl in resumed.block_losses] == [bl.tuned for bl in full.block_losses]
    assert [e.index for e in seen if e.done] == [0, 1, 2]
    other = make_recipe("light", iters=8, nsamples=8, seqlen=48, batch_size=4, seed=7)
    with pytest.raises(HubtoolError, match="other settings"):
        quantize_model(model, plan, SYM, "signround", other, calib, work_dir=work, resume=True)


def test_asymmetric(tiny_models):
    model, tok = _load(tiny_models("phi3"))
    spec = QuantSpec(sym=False)
    plan = plan_layers(model, spec)
    res = quantize_model(model, plan, spec, "signround", RECIPE, _calib(tok))
    assert all(bl.tuned < bl.rtn for bl in res.block_losses)
    w = next(iter(res.weights.values()))
    assert (w.scale > 0).all() and len(torch.unique(w.zero)) > 1 and int(w.zero.min()) >= 1


def _visible(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Which keys each query sees, (B, L, L), under an attention mask as a block gets it (None: causal)."""
    if mask is None:
        return torch.ones(length, length, dtype=torch.bool).tril().expand(batch, -1, -1)
    m = mask[:, 0]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def test_gemma3_sliding_window_layers():
    """Gemma 3's sliding-window layers get their banded mask and local rotary embedding, its full layers the
    causal mask: in the captured arguments, and in every forward of the block while it is tuned."""
    from transformers import AutoModelForCausalLM

    from hubtool.quant.capture import capture

    cfg = tiny._text_config("gemma3", layers=2)
    cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    tiny._scale_init(model)
    recipe = make_recipe("light", iters=4, nsamples=4, seqlen=96, batch_size=2, seed=1)
    calib = _calib(tiny.make_tokenizer(), recipe)
    length, window = recipe.seqlen, cfg.sliding_window
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    band = causal & ~causal.tril(-window)  # key j visible from query i when i - window < j <= i
    assert length > window and band.sum() < causal.sum()
    expected = [band, causal]

    layers = list(model.model.layers)
    cap, _ = capture(model, layers, calib, 2, keep_hidden=False)
    kwargs = [cap.arguments(j, [0, 1], torch.device("cpu"))[1] for j in range(2)]
    for j in range(2):
        assert torch.equal(
            _visible(kwargs[j].get("attention_mask"), 2, length), expected[j].expand(2, -1, -1)
        )
    cos0, cos1 = kwargs[0]["position_embeddings"][0], kwargs[1]["position_embeddings"][0]
    assert not torch.equal(cos0, cos1)  # local and global rotary bases

    seen: list[list[torch.Tensor]] = [[], []]
    for j, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, j=j: seen[j].append(
                _visible(kw.get("attention_mask"), kw["hidden_states"].shape[0], length)
            ),
            with_kwargs=True,
        )
    res = quantize_model(model, plan_layers(model, SYM), SYM, "signround", recipe, calib)
    for j in range(2):
        assert len(seen[j]) > recipe.iters  # the passes over the samples and every tuning iteration
        assert all(torch.equal(v, expected[j].expand(len(v), -1, -1)) for v in seen[j])
    assert all(bl.tuned < bl.rtn for bl in res.block_losses)


def test_needs_calibration(llama):
    model, _ = llama
    with pytest.raises(HubtoolError, match="needs calibration"):
        quantize_model(model, plan_layers(model, SYM), SYM, "signround", RECIPE, None)


def test_llava_image_text_and_vision_blocks(tiny_models, tmp_path, monkeypatch):
    """Image-text calibration reaches every block: the vision blocks get the images' patch embeddings and are
    tuned (codes unlike RTN's); the language blocks get the projected image features at the image tokens,
    on the quantized path through the quantized vision tower."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hubtool.quant import runner
    from hubtool.quant.rtn import quantize_rtn

    folder = tiny_models("llava")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
    proc = AutoProcessor.from_pretrained(folder)
    recs = []
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 20, 255 - 50 * i)).save(tmp_path / f"{i}.png")
        recs.append({"image": f"{i}.png", "text": f"Picture number {i} shows a colored square. " * (i + 1)})
    (tmp_path / "vl.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    recipe = make_recipe("light", iters=8, nsamples=4, seqlen=128, batch_size=2, seed=3)
    calib = load_calibration(
        str(tmp_path / "vl.jsonl"),
        proc,
        nsamples=4,
        seqlen=128,
        seed=3,
        is_vlm=True,
        image_text=True,
        batch_size=2,
    )
    ids = torch.cat([s["input_ids"] for s in calib.samples])
    pixels = torch.cat([s["pixel_values"] for s in calib.samples])
    at_image = ids == model.config.image_token_id
    assert at_image.any(dim=1).all()
    with torch.no_grad():
        patches = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[0]
        features = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    captured = []  # (first block of the chain, its inputs) for every capture with inputs
    real = runner.capture

    def spy(model_, blocks, calib_, batch_size, keep_hidden):
        cap, hidden = real(model_, blocks, calib_, batch_size, keep_hidden)
        if hidden is not None:
            captured.append((blocks[0], hidden.clone()))  # the run writes each block's outputs over it
        return cap, hidden

    monkeypatch.setattr(runner, "capture", spy)
    text_layer0 = model.get_submodule("model.language_model.layers.0")
    vision_layer0 = model.get_submodule("model.vision_tower.encoder.layers.0")

    # language tower only: its inputs hold the 16-bit image features at the image tokens
    text_plan = plan_layers(model, SYM)
    res = quantize_model(model, text_plan, SYM, "signround", recipe, calib)
    assert {bl.block.rsplit(".", 1)[0] for bl in res.block_losses} == {"model.language_model.layers"}
    assert all(bl.tuned < bl.rtn for bl in res.block_losses)
    assert [b for b, _ in captured] == [text_layer0]
    assert torch.equal(captured[0][1][at_image], features)

    # --quantize-vision: the vision blocks first, on the images' patch embeddings, then the language model
    # fed through them: its quantized-path inputs differ from the 16-bit ones exactly at the image tokens
    captured.clear()
    plan = plan_layers(model, SYM, quantize_vision=True)
    assert {b.tower for b in plan.blocks} == {"vision", "text"}
    res = quantize_model(model, plan, SYM, "signround", recipe, calib)
    assert set(res.weights) == set(plan.linear_names())
    assert all(bl.tuned < bl.rtn for bl in res.block_losses)
    assert [b for b, _ in captured] == [vision_layer0, text_layer0, text_layer0]
    (_, vision_in), (_, text_fp), (_, text_q) = captured
    assert torch.equal(vision_in, patches) and not torch.equal(vision_in[0], vision_in[1])
    assert torch.equal(text_fp[at_image], features)
    assert torch.equal(text_q[~at_image], text_fp[~at_image])
    assert (text_q[at_image] != text_fp[at_image]).any(dim=-1).all()
    for b in plan.blocks:
        if b.tower == "vision":
            for n in b.full_names():
                rtn = quantize_rtn(model.get_submodule(n).weight.detach(), SYM)
                assert not torch.equal(res.weights[n].q, rtn.q), n  # tuned, not RTN's codes

    # a text calibration set for the VLM's language model: no image in its inputs
    captured.clear()
    text_calib = load_calibration("builtin", proc, nsamples=4, seqlen=32, seed=3, is_vlm=True, batch_size=2)
    assert "pixel_values" not in text_calib.samples[0]
    res = quantize_model(model, text_plan, SYM, "opt-rtn", recipe, text_calib)
    assert [b for b, _ in captured] == [text_layer0]
    assert all(bl.tuned < bl.rtn for bl in res.block_losses)


def test_device_map_on_the_cpu_dispatches_each_block_and_gives_the_plain_codes(llama, monkeypatch):
    """--device-map cpu,cpu runs every block through accelerate's dispatch (hooks on its children, removed
    after: the model is left as it was) and gives the codes of the plain CPU run."""
    import accelerate

    model, tok = llama
    plan = plan_layers(model, SYM)
    plain = quantize_model(model, plan, SYM, "signround", RECIPE, _calib(tok))
    own_forward = [m for m in model.modules() if "forward" in m.__dict__]
    dispatched = []
    real = accelerate.dispatch_model

    def spy(block, device_map, **kwargs):
        out = real(block, device_map=device_map, **kwargs)
        children = [c for _, c in block.named_children()]
        dispatched.append((block, dict(device_map), all(hasattr(c, "_hf_hook") for c in children)))
        return out

    monkeypatch.setattr(accelerate, "dispatch_model", spy)
    spread = quantize_model(model, plan, SYM, "signround", RECIPE, _calib(tok), device_map="cpu,cpu")
    blocks = [model.get_submodule(b.name) for b in plan.blocks]
    assert [b for b, _, _ in dispatched] == blocks
    for block, device_map, hooked in dispatched:
        assert hooked and set(device_map.values()) == {"cpu"}
        assert set(device_map) == {n for n, _ in block.named_children()}
    assert _same(plain.weights, spread.weights)
    assert [bl.tuned for bl in spread.block_losses] == [bl.tuned for bl in plain.block_losses]
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert [m for m in model.modules() if "forward" in m.__dict__] == own_forward
    assert not any("hf_device_map" in b.__dict__ for b in blocks)


def _reference_weight(st: TunedLinear, v, alpha, beta) -> torch.Tensor:
    """The fake-quantized weight with plain autograd ops (straight-through rounding)."""
    spec = st.spec
    a, b = st.wmin * alpha, st.wmax * beta
    if spec.kquant:  # s and mn on their 6-bit two-level grids, straight through
        s, mn = (b - a) / 15, -a
        s = (s + (two_level(s.detach())[2] - s).detach()).unsqueeze(-1)
        mn = (mn + (two_level(mn.detach())[2] - mn).detach()).unsqueeze(-1)
        x = (st.wg + mn) / s + v
        q = torch.clamp(x + (torch.round(x) - x).detach(), 0, 15)
        return (s * q - mn).reshape(st.rows, -1)
    if spec.sym:
        s = torch.where((-a) >= b, a, b) / -spec.sym_zero
        s = (s + (_fp16_round(s.detach()) - s).detach()).unsqueeze(-1)
        x = st.wg / s + v
        q = torch.clamp(x + (torch.round(x) - x).detach(), -spec.sym_zero, spec.sym_zero - 1)
        return (s * q).reshape(st.rows, -1)
    s = ((b - a) / spec.qmax).clamp(min=1e-9)
    s = s + (_fp16_round(s.detach()) - s).detach()
    z = -a / s
    z = (z + (torch.round(z) - z).detach()).clamp(1, spec.qmax)
    s3, z3 = s.unsqueeze(-1), z.unsqueeze(-1)
    x = st.wg / s3 + v
    q = torch.clamp(x + (torch.round(x) - x).detach() + z3, 0, spec.qmax)
    return (s3 * (q - z3)).reshape(st.rows, -1)


@pytest.mark.parametrize("spec", [QuantSpec(sym=True), QuantSpec(sym=False), KQ], ids=["sym", "asym", "q4_k"])
def test_hand_written_gradients_match_autograd(spec):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.05
    st = TunedLinear("x", w, spec, torch.rand(16, 256 // spec.group_size) * 0.5 + 0.5)
    st.v.uniform_(-0.5, 0.5)
    g = torch.randn(16, 256)
    out = torch.empty(16, 256)
    st.forward_into(out)
    st.backward_from(g)  # outside sign_sgd: gradients are stored, nothing steps
    v, alpha, beta = (t.clone().requires_grad_(True) for t in (st.v, st.alpha, st.beta))
    ref = _reference_weight(st, v, alpha, beta)
    torch.testing.assert_close(ref, out, rtol=0, atol=0)
    (ref * g).sum().backward()
    for mine, theirs in zip(st.grads, (v.grad, alpha.grad, beta.grad), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    st.keep_best()
    assert torch.equal(st.int_weight().dequantize(), out)  # the stored codes are what was tuned
    before = st.v.clone()
    with sign_sgd([st], 0.1):
        st.backward_from(g)
    assert st.step_lr is None  # the step size lives as long as the step
    step = (st.v - before).abs()
    assert step.max() <= 0.1 + 1e-6 and (step > 0).any() and st.v.abs().max() <= 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("spec", [QuantSpec(sym=True), QuantSpec(sym=False), KQ], ids=["sym", "asym", "q4_k"])
def test_fused_cpu_step_equals_the_torch_reference(spec, dtype, monkeypatch):
    """The C++ forward/backward give the reference's weights, codes and V steps bit for bit (Q4_K: its
    torch forward, then the C++ backward against the torch one)."""
    from hubtool.kernels import cpu
    from hubtool.quant import scales

    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    torch.manual_seed(1)
    k = 512
    w = (torch.randn(24, k) * 0.05).to(dtype)
    clip = torch.rand(24, k // spec.group_size) * 0.5 + 0.5
    states = [TunedLinear("x", w, spec, clip) for _ in range(2)]
    v0 = torch.rand(states[0].v.shape) - 0.5
    for st in states:
        st.v.copy_(v0)
    outs = [torch.empty(24, k, dtype=dtype) for _ in range(2)]
    for step in range(3):
        g = torch.randn(24, k).to(dtype)
        for fused, st, out in zip((True, False), states, outs, strict=True):
            monkeypatch.setitem(scales._FUSED, "ok", fused)
            st.forward_into(out)
            with sign_sgd([st], 0.01):
                st.backward_from(g)
        a, b = states
        assert torch.equal(outs[0], outs[1]), f"step {step}: fake weights differ"
        assert torch.equal(a.q, b.q) and torch.equal(a.inside, b.inside)
        assert torch.equal(a.v, b.v)
        # alpha/beta step on the signs of group sums added in another order: equal unless a sum is ~0
        assert (a.alpha == b.alpha).float().mean() > 0.95 and (a.beta == b.beta).float().mean() > 0.95
        a.alpha.copy_(b.alpha), a.beta.copy_(b.beta)  # the next step starts from the same state


def test_fused_symmetric_scale_and_clip_step_equal_the_torch_code(monkeypatch):
    """The C++ scale (zero, tiny and fp16-overflowing groups included) and alpha/beta step, bit for bit."""
    from hubtool.kernels import cpu
    from hubtool.quant import scales

    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    spec = QuantSpec(sym=True)
    g = torch.Generator().manual_seed(3)
    wmin, wmax = -torch.rand(64, 4, generator=g) * 0.1, torch.rand(64, 4, generator=g) * 0.1
    wmin[0], wmax[0] = 0.0, 0.0
    wmin[1, 0], wmax[1, 0] = -1e-9, 1e-10
    wmax[2, 0], wmin[2, 1] = 1e7, -1e7
    alpha, beta = torch.rand(64, 4, generator=g), torch.rand(64, 4, generator=g)
    results = []
    for fused in (True, False):
        monkeypatch.setitem(scales._FUSED, "ok", fused)
        results.append(scales.sym_scale(wmin, wmax, alpha, beta, spec))
    (s, sel), (s_ref, sel_ref) = results
    assert torch.equal(s, s_ref) and torch.equal(sel, sel_ref)
    assert s[0].eq(FP16_TINY).all() and s[2, 0].isinf() and sel[2, 1] and not sel[2, 0]

    sums = torch.randn(4, 64, 4, generator=g)
    a, b = alpha.clone(), beta.clone()
    torch.ops.hubtool.sym_clip_step(sums, s, sel, wmin, wmax, a, b, spec.sym_zero, 0.01)
    dmax = (sums[1] - sums[0] / s) / -spec.sym_zero
    zero = torch.zeros_like(dmax)
    a_ref = (alpha - 0.01 * torch.where(sel, dmax * wmin, zero).sign()).clamp(0, 1)
    b_ref = (beta - 0.01 * torch.where(sel, zero, dmax * wmax).sign()).clamp(0, 1)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref) and not torch.equal(a, alpha)


def test_int8_weight_gradient_keeps_the_signs_that_matter(monkeypatch):
    """dL/dW as an int8 matmul: per-column codes, the exact step for its value, the bf16 step's signs."""
    from hubtool.kernels import cpu
    from hubtool.quant import scales, signround
    from hubtool.quant.qlinear import QLinear

    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    g = torch.Generator().manual_seed(0)
    # per-column int8 codes: scale = absmax / 127, every value within half a step, outlier columns alone
    x = torch.randn(300, 64, generator=g)
    x[7, 5] = 900.0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        xd = x.to(dtype)
        q, scale = torch.ops.hubtool.quantize_cols_i8(xd)
        assert torch.allclose(scale, xd.float().abs().amax(0) / 127, rtol=1e-6, atol=0)
        assert ((q.float() * scale - xd.float()).abs() <= scale * 0.5 * (1 + 1e-5)).all()
        assert q[7, 5] == 127 and q[:, 4].abs().max() == 127

    # the fused step on acc * row * col is the torch step on that float gradient, bit for bit
    spec = QuantSpec(sym=True)
    w = (torch.randn(32, 256, generator=g) * 0.05).to(torch.bfloat16)
    a, b = (TunedLinear("x", w, spec) for _ in range(2))
    acc = torch.randint(-(2**20), 2**20, (32, 256), generator=g, dtype=torch.int32)
    row, col = torch.rand(32, generator=g) * 1e-3, torch.rand(256, generator=g) * 1e-3
    for fused, st in ((True, a), (False, b)):
        monkeypatch.setitem(scales._FUSED, "ok", fused)
        st.forward_into(torch.empty(32, 256, dtype=torch.bfloat16))
        with sign_sgd([st], 0.01):
            if fused:
                st.backward_from(acc, (row, col))
            else:
                st.backward_from(acc.float() * (row[:, None] * col[None, :]))
    assert torch.equal(a.v, b.v) and (a.v != 0).any()
    assert (a.alpha == b.alpha).float().mean() > 0.95

    # in a block's backward: the int8 dL/dW steps V the way the exact one does wherever |dL/dW| matters
    monkeypatch.setitem(scales._FUSED, "ok", True)
    lin = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    xin = torch.randn(4, 64, 256, generator=g).to(torch.bfloat16)
    xin[:, 0] *= 30  # a token with much larger activations, as the first token of real models
    target = torch.randn(4, 64, 96, generator=g)
    steps = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(signround.INT8_GRAD_ENV, mode)
        q = QLinear(lin)
        st = TunedLinear("x", lin.weight, spec)
        q.group.use_states([st])
        with sign_sgd([st], 1.0):
            ((q(xin).float() - target) ** 2).mean().backward()
        steps[mode] = -st.v.reshape(96, 256)  # V - lr * sign(dL/dW * s), clamped: the sign step
    exact = torch.func.grad(lambda wt: ((xin.float() @ wt.T - target) ** 2).mean())(
        st.int_weight(best=False).dequantize(torch.float32)
    )
    weight = exact.abs()
    agree = (torch.sign(steps["1"]) == torch.sign(steps["0"])).float()
    assert (agree * weight).sum() / weight.sum() > 0.99  # weighted by |dL/dW|: the steps that matter agree
    assert agree.mean() > 0.9


def test_result_records_the_weight_gradient_precision(llama, monkeypatch):
    """The record says how dL/dW was taken: int8 on the CPU with the kernels, the dtype otherwise."""
    from hubtool.kernels import cpu
    from hubtool.quant import signround

    model, tok = llama
    plan = plan_layers(model, SYM)
    res = quantize_model(model, plan, SYM, "signround", RECIPE, _calib(tok))
    assert res.weight_grad == ("int8" if cpu.load() else "bfloat16")
    monkeypatch.setenv(signround.INT8_GRAD_ENV, "0")
    assert quantize_model(model, plan, SYM, "signround", RECIPE, _calib(tok)).weight_grad == "bfloat16"
    assert quantize_model(model, plan, SYM, "opt-rtn", RECIPE, _calib(tok)).weight_grad is None


@pytest.mark.parametrize("sym", [True, False])
def test_fused_clip_search_chooses_what_the_torch_code_chooses(sym, monkeypatch):
    """The clipping search's C++ weight error is the torch code's, bit for bit: the same clipping per group."""
    from hubtool.kernels import cpu
    from hubtool.quant import scales
    from hubtool.quant.optrtn import search_clip

    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(96, 384, generator=g) * 0.05).to(torch.bfloat16)
    w[3, :128] *= 20  # a group with an outlier row: clipping matters
    x = torch.randn(512, 384, generator=g) * torch.rand(384, generator=g) * 3
    xg = x.reshape(512, 3, 128).transpose(0, 1)
    h = torch.bmm(xg.transpose(1, 2), xg)
    spec = QuantSpec(sym=sym)
    found = {}
    for fused in (True, False):
        monkeypatch.setitem(scales._FUSED, "ok", fused)
        found[fused] = (search_clip(w, h, spec), search_clip(w, None, spec))
    for a, b in zip(found[True], found[False], strict=True):
        assert torch.equal(a, b)
        assert (a < 1).any()  # some groups were clipped: the comparison is not trivial


def test_masked_squared_error_and_its_gradient():
    """The tuning loss: fp32 sum of squared errors over valid positions, and its gradient, as autograd gives."""
    from hubtool.quant.runner import squared_error as _sq_err

    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 5, 8, generator=g).to(torch.bfloat16).requires_grad_()
    ref = torch.randn(2, 5, 8, generator=g).to(torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for m, count in ((None, 80), (mask, 64)):
        se, cnt = _sq_err(out, ref, m)
        (grad,) = torch.autograd.grad(se, out)
        weight = m.float().unsqueeze(-1) if m is not None else torch.ones(())
        expected = ((out.float() - ref.float()) ** 2 * weight).sum()
        (expected_grad,) = torch.autograd.grad(expected, out)
        assert cnt == count and grad.dtype == torch.bfloat16
        torch.testing.assert_close(se, expected, rtol=1e-6, atol=0)
        assert torch.equal(grad, expected_grad)
    out32 = out.detach().float().requires_grad_()  # an fp32 model: its output must not be touched
    before = out32.detach().clone()
    _sq_err(out32, ref, mask)[0].backward()
    assert torch.equal(out32.detach(), before) and out32.grad.dtype == torch.float32
