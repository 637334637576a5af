"""The two attention paths (fused kernel, plain batched products) compute the textbook function and its
gradients, for one branch and for the K branches of a parallel stage, with and without the per-key score term
of folded models; capturing the weights leaves the logits bit for bit; ``attn_impl="auto"`` measures once per
(device, dtype, shape, grad mode), caches its choice and leaves the run's random streams alone; an explicit
``attn_impl`` wins."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vitbn.config import ModelConfig
from vitbn.models import attention, create_model
from vitbn.models.attention import _softmax, attend, attention_choices, choice_key

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


@pytest.fixture
def measured(monkeypatch):
    """``"auto"`` unpinned, an empty cache, and a fake measurement: ``measured.seconds`` per path, every call
    recorded in ``measured.calls`` (each path is run once, so that what is timed is known to run)."""

    class Fake:
        seconds = {"fused": 2.0, "plain": 1.0}
        calls: list[set[str]] = []

        def __call__(self, calls, device):
            for call in calls.values():
                call()
            self.calls.append(set(calls))
            return dict(self.seconds)

    fake = Fake()
    monkeypatch.delenv(attention.AUTO_ENV, raising=False)
    monkeypatch.setattr(attention, "measure_paths", fake)
    monkeypatch.setattr(attention, "_CHOICES", {})
    return fake


def textbook(qkv: torch.Tensor, heads: int, dim_head: int, key_term: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """vit-pytorch's formulation on every branch of (K, B, N, 3*H*Dh [+ H]): chunk, (B, H, N, Dh) heads, matmul
    -> (+ per-key term) -> softmax -> matmul; branch outputs concatenated, weights (B, K*H, N, N)."""
    outs, maps = [], []
    inner = heads * dim_head
    for branch in qkv:
        b, n, _ = branch.shape
        q, k, v = (t.reshape(b, n, heads, dim_head).transpose(1, 2) for t in branch[..., : 3 * inner].chunk(3, -1))
        scores = q @ k.transpose(-1, -2) * dim_head**-0.5
        if key_term:
            scores = scores + branch[..., 3 * inner :].transpose(1, 2)[:, :, None, :]  # (B, H, 1, N)
        weights = scores.softmax(dim=-1)
        outs.append((weights @ v).transpose(1, 2).reshape(b, n, -1))
        maps.append(weights)
    return torch.cat(outs, dim=-1), torch.cat(maps, dim=1)


@pytest.mark.parametrize("path", ["fused", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("key_term", [False, True])
def test_paths_match_the_textbook_formulation(path, dtype, branches, key_term):
    width = 3 * 2 * 8 + (2 if key_term else 0)
    qkv = torch.randn(branches, 3, 17, width, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 17, branches * 16, dtype=dtype)
    out, weights = attend(qkv, 2, 8, 8**-0.5, torch.nn.Identity(), path=path, dropout_p=0.0, return_attn=True,
                          key_term=key_term)  # fmt: skip
    (g,) = torch.autograd.grad(out, qkv, grad)
    ref_out, ref_weights = textbook(qkv, 2, 8, key_term)
    (ref_g,) = torch.autograd.grad(ref_out, qkv, grad)
    assert_close(out, ref_out)
    assert_close(g, ref_g)
    assert_close(weights, ref_weights)
    assert attend(qkv, 2, 8, 8**-0.5, torch.nn.Identity(), path=path, dropout_p=0.0)[1] is None


def test_an_unknown_path_is_refused():
    qkv = torch.randn(1, 2, 5, 48)
    with pytest.raises(ValueError, match="path='sdpa' is not one of 'fused', 'plain'"):
        attend(qkv, 2, 8, 0.35, torch.nn.Identity(), path="sdpa", dropout_p=0.0)


@pytest.mark.parametrize("impl", ["fused", "plain", "auto"])
@pytest.mark.parametrize("parallel", [1, 2])
def test_capturing_the_weights_leaves_the_logits_bit_for_bit(impl, parallel, measured):
    measured.seconds = {"fused": 1.0, "plain": 2.0}  # auto: the fused kernel, whose output is not the plain path's
    model = create_model("vitbn", **TINY, parallel=parallel, attn_impl=impl).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
        captured, maps = model.forward_with_attn(x)
    assert_close(captured, logits, rtol=0, atol=0)
    assert maps[0].shape == (3, parallel * 2, 17, 17)
    assert_close(maps[0].sum(-1), torch.ones(3, parallel * 2, 17))


@pytest.mark.parametrize("parallel", [1, 3])
def test_the_two_paths_train_alike_in_fp32_and_bf16(parallel):
    fused = create_model("vit", **TINY, parallel=parallel, attn_impl="fused")
    plain = create_model("vit", **TINY, parallel=parallel, attn_impl="plain")
    plain.load_state_dict(fused.state_dict())
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    results = {}
    for name, model in (("fused", fused), ("plain", plain)):
        for dtype in (torch.float32, torch.bfloat16):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            results[name, dtype] = loss.detach(), [p.grad.clone() for p in model.parameters()]
    for dtype, tol in ((torch.float32, {}), (torch.bfloat16, dict(rtol=0.05, atol=0.02))):
        (loss_f, grads_f), (loss_p, grads_p) = results["fused", dtype], results["plain", dtype]
        assert_close(loss_p, loss_f, **tol)
        for g_p, g_f in zip(grads_p, grads_f):
            assert_close(g_p, g_f, **tol)
    # and bf16 against fp32, with a bf16 tolerance
    assert_close(results["plain", torch.bfloat16][0], results["plain", torch.float32][0], rtol=0.05, atol=0.05)


def test_half_precision_softmax_is_the_rounded_fp32_softmax():
    scores = (torch.randn(5, 17, 17) * 4).bfloat16()
    out = _softmax(scores)
    assert out.dtype == torch.bfloat16
    assert_close(out, scores.float().softmax(-1).bfloat16(), rtol=0, atol=0)
    assert_close(_softmax(scores.float()), scores.float().softmax(-1), rtol=0, atol=0)


# --- "auto" ------------------------------------------------------------------------------------------------------


def test_auto_measures_once_per_device_dtype_shape_and_grad_mode(measured):
    model = create_model("vitbn", **TINY)  # attn_impl="auto" by default
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        model(x)
        model(x)  # same key: the cache answers
        assert len(measured.calls) == 1 and measured.calls[0] == {"fused", "plain"}
        model(x[:3])  # another batch size: another shape
        assert len(measured.calls) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another dtype
            model(x)
        assert len(measured.calls) == 3
    model(x)  # grad mode: measured with backward
    assert len(measured.calls) == 4
    model(x)
    assert len(measured.calls) == 4
    assert attention_choices(model) == {
        "cpu bfloat16 1x4x2x17x8 no_grad": "plain",
        "cpu float32 1x3x2x17x8 no_grad": "plain",
        "cpu float32 1x4x2x17x8 grad": "plain",
        "cpu float32 1x4x2x17x8 no_grad": "plain",
    }
    other = create_model("vitbn", **TINY).eval()  # another module, same key: the process's cache answers
    with torch.no_grad():
        other(x)
    assert len(measured.calls) == 4 and attention_choices(other) == {"cpu float32 1x4x2x17x8 no_grad": "plain"}


@pytest.mark.parametrize(("seconds", "chosen"), [({"fused": 2.0, "plain": 1.0}, "plain"),
                                                 ({"fused": 1.0, "plain": 2.0}, "fused")])  # fmt: skip
def test_auto_takes_the_faster_path_and_an_explicit_impl_wins(seconds, chosen, measured):
    measured.seconds = seconds
    x = torch.randn(2, 1, 28, 28)
    models = {impl: create_model("vitbn", **TINY, attn_impl=impl).eval() for impl in ("auto", "fused", "plain")}
    for model in models.values():
        model.load_state_dict(models["auto"].state_dict())
    with torch.no_grad():
        out = {impl: model(x) for impl, model in models.items()}
    assert len(measured.calls) == 1  # "fused" and "plain" never measure
    assert_close(out["auto"], out[chosen], rtol=0, atol=0)
    assert attention_choices(models["fused"]) == {} == attention_choices(models["plain"])


def test_pinned_auto_does_not_measure_and_a_bad_pin_is_one_line(measured, monkeypatch):
    model = create_model("vit", **TINY).eval()
    monkeypatch.setenv(attention.AUTO_ENV, "plain")
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert measured.calls == [] and attention_choices(model) == {"cpu float32 1x2x2x17x8 no_grad": "plain"}
    monkeypatch.setenv(attention.AUTO_ENV, "flash")
    with pytest.raises(ValueError, match=r"^VITBN_ATTN_AUTO='flash' is not one of 'fused', 'plain'$"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace: what export_torchscript uses
def test_auto_is_the_fused_kernel_in_a_captured_inference_graph(measured):
    model = create_model("vitbn", **TINY).eval()
    fused = create_model("vitbn", **TINY, attn_impl="fused").eval()
    fused.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)  # nothing timed or recorded into the graph
        assert measured.calls == [] and attention_choices(model) == {}
        assert_close(traced(x), fused(x), rtol=0, atol=0)


def test_measuring_leaves_the_random_streams_and_the_gradients_alone(monkeypatch):
    """The real measurement (no speed asserted): a training forward with dropout that measures first gives the
    numbers, gradients and random state of the same forward that finds its choice cached."""
    monkeypatch.delenv(attention.AUTO_ENV, raising=False)
    monkeypatch.setattr(attention, "_CHOICES", {})
    model = create_model("vitbn", **TINY, dropout=0.2).train()
    x = torch.randn(4, 1, 28, 28)
    runs = []
    for _ in range(2):  # measured, then cached
        torch.manual_seed(3)
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()))
    assert len(attention._CHOICES) == 1
    (out0, grads0, rng0), (out1, grads1, rng1) = runs
    assert_close(out1, out0, rtol=0, atol=0)
    assert_close(grads1, grads0, rtol=0, atol=0)
    assert torch.equal(rng1, rng0)


def test_choice_key_names_device_dtype_shape_and_grad_mode():
    qkv = torch.zeros(3, 5, 17, 3 * 4 * 8, dtype=torch.float64)
    assert choice_key(qkv, 4, 8) == "cpu float64 3x5x4x17x8 no_grad"
    assert choice_key(qkv.requires_grad_(), 4, 8) == "cpu float64 3x5x4x17x8 grad"
    with torch.no_grad():
        assert choice_key(qkv, 4, 8) == "cpu float64 3x5x4x17x8 no_grad"


def test_earlier_names_are_aliases():
    assert ModelConfig(attn_impl="sdpa").attn_impl == "fused" and ModelConfig(attn_impl="explicit").attn_impl == "plain"
    with pytest.raises(ValueError, match=r"attn_impl='flash' is not one of 'auto', 'fused', 'plain'"):
        ModelConfig(attn_impl="flash")


@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("key_term", [False, True])
@pytest.mark.parametrize("head_major", [False, True])
def test_split_heads_backward_writes_autograds_gradient_without_stacking(branches, key_term, head_major):
    from vitbn.bench.roofline import ByteCounter
    from vitbn.models.attention import _split, split_heads

    heads, dim_head, b, n = 2, 4, 3, 5
    width = 3 * heads * dim_head + (heads if key_term else 0)
    qkv = torch.randn(branches, b, n, width, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(b, branches * heads, n, dim_head, dtype=torch.float64) for _ in range(3)]
    weights.append(torch.randn(b, branches * heads, 1, n, dtype=torch.float64))

    def loss(parts):
        return sum((p * w).sum() for p, w in zip(parts, weights) if p is not None)

    (expected,) = torch.autograd.grad(loss(_split(qkv, heads, dim_head, key_term, head_major)), qkv)
    parts = split_heads(qkv, heads, dim_head, key_term, head_major=head_major)
    for got, ref in zip(parts, _split(qkv, heads, dim_head, key_term, head_major)):
        assert (got is None and ref is None) or torch.equal(got, ref)
    counter = ByteCounter()
    with counter:
        (grad,) = torch.autograd.grad(loss(parts), qkv)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)  # the same values, only written in place
    # the one copy per part into the projection's layout, no stack of the three gradients (autograd's way)
    copies = 3 * b * branches * heads * n * dim_head * 8 * 2 + (b * branches * heads * n * 8 * 2 if key_term else 0)
    assert counter.layout == copies
    # second derivatives (Hessian-vector products of the analysis) pass through it
    assert torch.autograd.gradgradcheck(
        lambda x: split_heads(x, heads, dim_head, key_term, head_major=head_major)[0], (qkv,)
    )


@pytest.mark.parametrize("impl", ["fused", "plain", "auto"])
def test_a_compiled_training_step_is_one_graph(impl):
    """Nothing in the attention breaks the graph of a compiled training step (fullgraph=True raises on a break)."""
    model = create_model("vit", depth=1, dim=16, heads=2, dim_head=8, mlp_dim=32, attn_impl=impl).train()
    net = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(4, 1, 28, 28)
    net(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_captured_path_is_plain_for_training_on_a_cpu_and_fused_otherwise():
    from vitbn.models.attention import captured_path

    assert [captured_path(d, g) for d in ("cpu", "cuda") for g in (True, False)] == ["plain", "fused", "fused", "fused"]
    model = create_model("vit", **TINY).train()  # attn_impl="auto"
    plain = create_model("vit", **TINY, attn_impl="plain").train()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 28, 28)
    counts = {}

    def backend(gm, inputs):  # the ops of the captured training graph
        for node in gm.graph.nodes:
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return gm.forward

    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    assert any("baddbmm" in k for k in counts) and not any("scaled_dot_product" in k for k in counts)
    assert_close(out, plain(x))
