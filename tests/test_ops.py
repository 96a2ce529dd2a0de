"""The public ops against eager PyTorch, for every CPU-capable backend.

Eager compositions (tests/eager.py) are the ground truth here, never the package's own code:
values, switches (through switches_to_indices, against max_pool2d's indices where the output is
> 0 and the window is not near-tied), and every gradient.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import drmm_kernels as dk
from drmm_kernels import reference

import eager

BACKENDS = ["reference", "cpu"]
if os.environ.get("DRMM_REQUIRE_EXTENSION") != "1" and not dk.available_backends()["cpu"]:
    BACKENDS = ["reference"]  # outside `make test` the extension may legitimately be absent


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":  # a strided view with the same values
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


@st.composite
def conv_cases(draw, max_size=33):
    n = draw(st.integers(1, 8))
    cin = draw(st.integers(1, 16))
    cout = draw(st.integers(1, 16))
    k = draw(st.sampled_from([1, 3, 5]))
    padding = draw(st.sampled_from([0, 1, 2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    pool = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(5, max_size))
    w = draw(st.integers(5, max_size))
    hc, wc = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    assume(hc >= pool and wc >= pool)
    return dict(n=n, cin=cin, cout=cout, k=k, padding=padding, stride=stride, pool=pool, h=h, w=w,
                slope=draw(st.sampled_from([0.0, 0.1])), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "noncontig"])),
                affine=draw(st.sampled_from(["none", "shift", "scale_shift"])), seed=draw(st.integers(0, 2**16)))


def _make(case, requires_grad=True):
    g = torch.Generator().manual_seed(case["seed"])
    dt = case["dtype"]
    x = torch.randn(case["n"], case["cin"], case["h"], case["w"], generator=g, dtype=dt)
    w = torch.randn(case["cout"], case["cin"], case["k"], case["k"], generator=g, dtype=dt) / case["k"]
    scale = shift = None
    if case["affine"] in ("shift", "scale_shift"):
        shift = torch.randn(case["cout"], generator=g, dtype=dt) * 0.5
    if case["affine"] == "scale_shift":
        scale = torch.randn(case["cout"], generator=g, dtype=dt)  # negative entries included
    x = _layout(x, case["layout"])
    leaves = [t for t in (x, w, scale, shift) if t is not None]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return x, w, scale, shift


def _kwargs(case):
    return dict(stride=case["stride"], padding=case["padding"], pool=case["pool"], negative_slope=case["slope"])


def _check_switches(sw, y_e, idx_e, v, case):
    tol = eager.TOL[case["dtype"]]
    conv_hw = v.shape[-2:]
    idx = dk.switches_to_indices(sw, pool=case["pool"], conv_size=tuple(conv_hw))
    gap = eager.window_gap(v.detach(), case["pool"])
    clear = gap > 1e3 * tol["atol"]
    # PyTorch's index is comparable wherever the output is > 0 (ReLU) or for any clear window (leaky).
    comparable = clear & ((y_e > 0) if case["slope"] == 0 else torch.ones_like(clear))
    assert torch.equal(idx[comparable], idx_e[comparable])
    # The a bit is the sign of the window max of the pre-activation; bits 4-6 are zero.
    pooled = F.max_pool2d(v.detach(), case["pool"])
    margin = pooled.abs() > tol["atol"]
    assert torch.equal(((sw & 0x80) != 0)[margin], (pooled > 0)[margin])
    assert int((sw & 0x70).max()) == 0
    assert int((sw & 0x0F).max()) < case["pool"] ** 2


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases())
def test_conv_relu_pool_matches_eager(backend, case):
    x, w, scale, shift = _make(case)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, **_kwargs(case))
    y_e, idx_e, v = eager.conv_relu_pool(x, w, scale, shift, case["stride"], case["padding"], case["pool"],
                                         case["slope"])
    tol = eager.TOL[case["dtype"]]
    assert y.shape == y_e.shape and sw.shape == y.shape and sw.dtype == torch.uint8
    torch.testing.assert_close(y, y_e, **tol)
    _check_switches(sw, y_e, idx_e, v, case)

    # Every gradient against autograd through the eager composition.
    gy = torch.randn_like(y_e)
    leaves = [t for t in (x, w, scale, shift) if t is not None]
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    grads_e = torch.autograd.grad((y_e * gy).sum(), leaves)
    for name, a, b in zip(("x", "weight", "scale", "shift"), grads, grads_e):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases())
def test_render_is_the_eager_input_gradient(backend, case):
    """render(g, switches, w, scale) == d/dx of <g, max_pool2d(act(conv2d(x)*scale+shift))>, eager autograd."""
    x, w, scale, shift = _make(case)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x.detach(), w.detach(), None if scale is None else scale.detach(),
                                  None if shift is None else shift.detach(), **_kwargs(case))
        g = torch.randn_like(y)
        x_hat = dk.render(g, sw, w.detach(), None if scale is None else scale.detach(), stride=case["stride"],
                          padding=case["padding"], pool=case["pool"], out_size=x.shape[-2:],
                          negative_slope=case["slope"])
    y_e, idx_e, v = eager.conv_relu_pool(x, w, scale, shift, case["stride"], case["padding"], case["pool"],
                                         case["slope"])
    # Only where both implementations picked the same window position is the gradient comparable.
    idx = dk.switches_to_indices(sw, pool=case["pool"], conv_size=tuple(v.shape[-2:]))
    assume(torch.equal(idx, idx_e))
    gx_e, = torch.autograd.grad(y_e, x, g)
    torch.testing.assert_close(x_hat, gx_e, **eager.TOL[case["dtype"]])


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=conv_cases())
def test_render_matches_unpool_mask_conv_transpose(backend, case):
    """The top-down pass (raw weight, no scale) and its gradients against max_unpool2d + mask + conv_transpose2d."""
    x, w, scale, shift = _make(case, requires_grad=False)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, **_kwargs(case))
    conv_hw = reference.conv_size(tuple(x.shape[-2:]), (case["k"], case["k"]), case["stride"], case["padding"])
    idx = dk.switches_to_indices(sw, pool=case["pool"], conv_size=conv_hw)
    dt = case["dtype"]
    a = torch.where((sw & 0x80) != 0, torch.tensor(1.0, dtype=dt), torch.tensor(case["slope"], dtype=dt))
    mu = torch.randn_like(y).requires_grad_(True)
    w = w.clone().requires_grad_(True)
    s = None if scale is None else scale.clone().requires_grad_(True)
    with dk.backend(backend):
        out = dk.render(mu, sw, w, s, stride=case["stride"], padding=case["padding"], pool=case["pool"],
                        out_size=x.shape[-2:], negative_slope=case["slope"])
    out_e = eager.render(mu, idx, w, x.shape[-2:], a, s, case["stride"], case["padding"], case["pool"], conv_hw)
    tol = eager.TOL[case["dtype"]]
    torch.testing.assert_close(out, out_e, **tol)
    go = torch.randn_like(out_e)
    leaves = [t for t in (mu, w, s) if t is not None]
    for name, a_, b_ in zip(("mu", "weight", "scale"), torch.autograd.grad((out * go).sum(), leaves),
                            torch.autograd.grad((out_e * go).sum(), leaves)):
        torch.testing.assert_close(a_, b_, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@given(case=conv_cases(max_size=17))
def test_conv_bn_relu_pool_matches_eager(backend, training, case):
    x, w, _, _ = _make(case)
    c, dt = case["cout"], case["dtype"]
    assume(not training or case["n"] * ((case["h"] + 2 * case["padding"] - case["k"]) // case["stride"] + 1) > 1)
    gamma = (torch.rand(c, dtype=dt) + 0.5) * torch.where(torch.arange(c) % 3 == 2, -1.0, 1.0).to(dt)
    gamma.requires_grad_(True)
    beta = (torch.randn(c, dtype=dt) * 0.3).requires_grad_(True)
    rm, rv = torch.randn(c, dtype=dt) * 0.1, torch.rand(c, dtype=dt) + 0.5
    rm_e, rv_e = rm.clone(), rv.clone()
    kw = _kwargs(case)
    with dk.backend(backend):
        y, sw = dk.conv_bn_relu_pool(x, w, gamma, beta, rm, rv, training=training, momentum=0.2, eps=1e-5, **kw)
    z = F.conv2d(x, w, None, case["stride"], case["padding"])
    v = F.batch_norm(z, rm_e, rv_e, gamma, beta, training, 0.2, 1e-5)
    y_e, idx_e = F.max_pool2d(eager.act(v, case["slope"]), case["pool"], case["pool"], return_indices=True)
    tol = eager.TOL[dt]
    torch.testing.assert_close(y, y_e, **tol)
    torch.testing.assert_close(rm, rm_e, **tol)
    torch.testing.assert_close(rv, rv_e, **tol)
    _check_switches(sw, y_e, idx_e, v, case)
    gy = torch.randn_like(y_e)
    leaves = [x, w, gamma, beta]
    for name, a, b in zip(("x", "weight", "bn_weight", "bn_bias"), torch.autograd.grad((y * gy).sum(), leaves),
                          torch.autograd.grad((y_e * gy).sum(), leaves)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")


# --------------------------------------------------------------------------- gradcheck, opcheck, compile

def _small(dtype=torch.float64, seed=0, cin=2, cout=3, h=7, w=6, n=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype, requires_grad=True)
    wt = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    scale = torch.randn(cout, generator=g, dtype=dtype, requires_grad=True)
    shift = torch.randn(cout, generator=g, dtype=dtype, requires_grad=True)
    return x, wt, scale, shift


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_gradcheck_conv_relu_pool(backend, slope):
    x, w, scale, shift = _small()
    with dk.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: dk.conv_relu_pool(*a, padding=1, negative_slope=slope)[0], (x, w, scale, shift))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_scale", [False, True])
def test_gradcheck_pointwise_unpooled(backend, use_scale):
    # 1x1 / stride 1 / no padding / pool 1: the backward is written as batched matrix products there
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(4, dtype=torch.float64, requires_grad=True) if use_scale else None
    shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
    args = (x, w, scale, shift) if use_scale else (x, w, shift)

    def f(*a):
        if not use_scale:
            a = (a[0], a[1], None, a[2])
        return dk.conv_relu_pool(*a, pool=1, negative_slope=0.1)[0]

    with dk.backend(backend):
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_render(backend, stride):
    x, w, scale, shift = _small()
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, stride=stride, padding=1, negative_slope=0.1)
        mu = torch.randn_like(y).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda m, wt, s: dk.render(m, sw, wt, s, stride=stride, padding=1, out_size=x.shape[-2:],
                                       negative_slope=0.1), (mu, w, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_conv_bn_relu_pool(backend, training):
    x, w, gamma, beta = _small()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with dk.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: dk.conv_bn_relu_pool(*a, None if training else rm, None if training else rv,
                                            training=training, padding=1)[0], (x, w, gamma, beta))


def _opcheck_samples():
    x, w, scale, shift = _small(torch.float32)
    y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
    mu = torch.randn_like(y).requires_grad_(True)
    ops = torch.ops.drmm
    return [
        (ops.conv_relu_pool.default, (x, w, scale, shift, 1, 1, 2, 0.0)),
        (ops.conv_relu_pool.default, (x, w, None, None, 2, 0, 1, 0.1)),
        (ops.render.default, (mu, sw, w, scale, 1, 1, 2, 7, 6, 0.1)),
        (ops.render.default, (mu, sw, w, None, 1, 1, 2, 7, 6, 0.0)),
        (ops.gather_conv.default, (x, w, sw, 1, 1, 2)),
        (ops.render_wgrad.default, (x, mu, sw, scale, 1, 1, 2, 0.0, 3, 3)),
        (ops.masked_values.default, (mu, sw, scale, 0.1)),
        (ops.masked_values.default, (mu, sw, None, 0.0)),
        (ops.conv_bn_relu_pool.default, (x, w, scale, shift, None, None, True, 1e-5, 1, 1, 2, 0.0)),
        (ops.conv_bn_relu_pool.default, (x, w, scale, shift, torch.zeros(3), torch.ones(3), False, 1e-5, 1, 1, 2,
                                         0.0)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with dk.backend(backend):
        for op, args in _opcheck_samples():
            torch.library.opcheck(op, args)


def _train_step(x, w, scale, shift, bn_w, bn_b):
    y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
    x_hat = dk.render(y, sw, w, stride=1, padding=1, out_size=x.shape[-2:])
    y2, _ = dk.conv_bn_relu_pool(x, w, bn_w, bn_b, None, None, training=True, padding=1)
    return (x_hat - x).pow(2).mean() + y.sum() + y2.square().sum()


# aot_eager for every backend; Inductor once (on the fastest backend) to keep CI inside its budget.
@pytest.mark.parametrize("backend, compiler", [(b, "aot_eager") for b in BACKENDS] + [(BACKENDS[-1], "inductor")])
def test_torch_compile_fullgraph(backend, compiler):
    x, w, scale, shift = _small(torch.float32)
    bn_w, bn_b = scale.detach().clone().requires_grad_(True), shift.detach().clone().requires_grad_(True)
    leaves = (x, w, scale, shift, bn_w, bn_b)
    torch._dynamo.reset()
    with dk.backend(backend):
        expected = torch.autograd.grad(_train_step(*leaves), leaves)
        compiled = torch.compile(_train_step, backend=compiler, fullgraph=True)
        got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_pick_first_maximum(backend, dtype):
    # A 1x1 identity conv makes v = x exactly; ties inside windows must resolve to the first (row-major).
    x = torch.tensor([[[[1.0, 1.0, 2.0, 0.5],
                        [1.0, 0.0, 2.0, 2.0],
                        [-1.0, -1.0, 0.0, 0.0],
                        [-1.0, -1.0, 0.0, 0.0]]]], dtype=dtype)
    w = torch.ones(1, 1, 1, 1, dtype=dtype)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
    _, idx_e = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(dk.switches_to_indices(sw, pool=2, conv_size=(4, 4)), idx_e)
    assert sw.flatten().tolist() == [0x80, 0x80 | 0, 0, 0]
    assert y.flatten().tolist() == [1.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_windows_record_offset_and_off_bit(backend):
    x = torch.tensor([[[[-3.0, -1.0], [-2.0, -5.0]]]])
    w = torch.ones(1, 1, 1, 1)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
        y_l, sw_l = dk.conv_relu_pool(x, w, negative_slope=0.1)
    assert sw.item() == 1 and y.item() == 0.0          # offset of the max (-1.0), a bit off
    assert sw_l.item() == 1 and y_l.item() == pytest.approx(-0.1)
    assert F.max_pool2d(x, 2, return_indices=True)[1].item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_max_pool2d(backend):
    x = torch.tensor([[[[1.0, float("nan"), 5.0, 2.0],
                        [3.0, 4.0, 1.0, 0.0]]]])
    w = torch.ones(1, 1, 1, 1)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
    y_e, idx_e = F.max_pool2d(x, 2, return_indices=True)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isnan(y_e[0, 0, 0, 0])
    assert torch.equal(dk.switches_to_indices(sw, pool=2, conv_size=(2, 4)), idx_e)
    assert (sw[0, 0, 0, 0] & 0x80) == 0 and y[0, 0, 0, 1] == 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_drop_trailing_rows_and_render_zeros_them(backend):
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64)
    w = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
        out = dk.render(torch.ones_like(y), sw, torch.eye(3, 2, dtype=torch.float64).view(3, 2, 1, 1),
                        out_size=(7, 9))
    assert y.shape == (1, 3, 3, 4)
    assert out[..., 6, :].abs().sum() == 0 and out[..., :, 8].abs().sum() == 0


# --------------------------------------------------------------------------- bad input

def _base():
    return torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda x, w: (x[0], w, {}), ValueError, ["x", "4-D", "3x8x8"]),
    (lambda x, w: (x, w[:, :2], {}), ValueError, ["weight", "input channels", "4x2x3x3", "2x3x8x8"]),
    (lambda x, w: (x, w.double(), {}), TypeError, ["weight", "float64", "float32"]),
    (lambda x, w: (x.int(), w, {}), TypeError, ["x", "floating", "int32"]),
    (lambda x, w: (x, w, {"pool": 5}), ValueError, ["pool", "[1, 4]", "5"]),
    (lambda x, w: (x, w, {"pool": 0}), ValueError, ["pool"]),
    (lambda x, w: (x, w, {"negative_slope": 1.5}), ValueError, ["negative_slope", "[0, 1)"]),
    (lambda x, w: (x, w, {"stride": 0}), ValueError, ["stride"]),
    (lambda x, w: (x, w, {"padding": -1}), ValueError, ["padding"]),
    (lambda x, w: (x, w, {"stride": 1.5}), TypeError, ["stride", "int"]),
    (lambda x, w: (x[..., :2, :2], w, {"padding": 0}), ValueError, ["smaller than the kernel"]),
    (lambda x, w: (x[..., :4, :4], w, {"pool": 4}), ValueError, ["pooled size is zero", "pool=4"]),
    (lambda x, w: (x, w, {"scale": torch.ones(3)}), ValueError, ["scale", "4 elements", "(3)"]),
    (lambda x, w: (x, w, {"shift": torch.ones(4, dtype=torch.float64)}), TypeError, ["shift", "float64"]),
])
def test_conv_relu_pool_bad_input(mutate, exc, words):
    x, w, kw = mutate(*_base())
    scale, shift = kw.pop("scale", None), kw.pop("shift", None)
    with pytest.raises(exc) as info:
        dk.conv_relu_pool(x, w, scale, shift, **kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_render_bad_input():
    x, w = _base()
    y, sw = dk.conv_relu_pool(x, w, padding=1)
    cases = [
        (dict(switches=sw.long()), TypeError, ["switches", "uint8", "int64"]),
        (dict(switches=sw[:, :2]), ValueError, ["switches shape", "2x2x4x4", "mu shape", "2x4x4x4"]),
        (dict(weight=w[:3]), ValueError, ["weight", "3 output channels", "mu has 4 channels"]),
        (dict(out_size=(12, 12)), ValueError, ["out_size (12, 12)", "(6, 6)", "(4, 4)"]),
        (dict(out_size=5), ValueError, ["out_size", "(H, W)"]),
        (dict(mu=y[0]), ValueError, ["mu", "4-D"]),
        (dict(scale=torch.ones(2)), ValueError, ["scale", "4 elements"]),
    ]
    for change, exc, words in cases:
        args = dict(mu=y, switches=sw, weight=w, scale=None, out_size=(8, 8))
        args.update(change)
        with pytest.raises(exc) as info:
            dk.render(args["mu"], args["switches"], args["weight"], args["scale"], padding=1,
                      out_size=args["out_size"])
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_bn_and_switch_helpers_bad_input():
    x, w = _base()
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        dk.conv_bn_relu_pool(x, w, None, None, None, None, training=False)
    with pytest.raises(ValueError, match="bn_weight must have 4 elements"):
        dk.conv_bn_relu_pool(x, w, torch.ones(5), None, None, None, training=True)
    with pytest.raises(ValueError, match="more than one value per channel"):
        dk.conv_bn_relu_pool(x[:1, :, :3, :3], w, None, None, None, None, training=True, pool=1)
    sw = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        dk.switches_to_indices(sw.int(), pool=2, conv_size=(4, 4))
    with pytest.raises(ValueError, match=r"conv_size \(6, 6\) with pool 2 gives pooled size \(3, 3\)"):
        dk.switches_to_indices(sw, pool=2, conv_size=(6, 6))


def test_backend_selection():
    status = dk.available_backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"} and status["reference"].available
    for name, st_ in status.items():
        assert isinstance(st_.reason, str) and st_.reason
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dk.set_backend("nope")
    unavailable = [n for n, s in status.items() if not s.available]
    for name in unavailable:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: "):
            dk.set_backend(name)
    with dk.backend("reference"):
        assert dk.get_backend() == "reference"
    assert dk.get_backend() == "auto"


def test_environment_variable_selects_backend(tmp_path):
    import subprocess
    import sys
    code = "import drmm_kernels as dk; print(dk.get_backend())"
    env = dict(os.environ, DRMM_KERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DRMM_KERNELS_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "DRMM_KERNELS_BACKEND='bogus'" in bad.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    x, w, scale, shift = _small(cin=1, cout=2, h=5, w=4, n=1)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1, negative_slope=0.1)
        assert torch.autograd.gradgradcheck(
            lambda *a: dk.conv_relu_pool(*a, padding=1, negative_slope=0.1)[0], (x, w, scale, shift))
        mu = torch.randn_like(y).requires_grad_(True)
        assert torch.autograd.gradgradcheck(
            lambda m, wt, s: dk.render(m, sw, wt, s, padding=1, out_size=x.shape[-2:], negative_slope=0.1),
            (mu, w, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [1, 2])
def test_gradgradcheck_conv_bn_relu_pool_training(backend, pool):
    # The training backward unpools through the internal unpool op (its own backward gathers); pool=1 skips it.
    x, w, gamma, beta = _small(cin=1, cout=2, h=5, w=4, n=2)
    with dk.backend(backend):
        assert torch.autograd.gradgradcheck(
            lambda *a: dk.conv_bn_relu_pool(*a, None, None, training=True, padding=1, pool=pool,
                                            negative_slope=0.1)[0], (x, w, gamma, beta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_conv_bn_relu_pool_pointwise(backend):
    # 1x1 / stride 1 / no padding: on CPU the conv and its backward are batched matrix products
    torch.manual_seed(5)
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(*a):
        return dk.conv_bn_relu_pool(*a, None, None, training=True, pool=1, negative_slope=0.1)[0]

    with dk.backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, gamma, beta))
        assert torch.autograd.gradgradcheck(f, (x, w, gamma, beta))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eager_fast_path_matches_the_custom_op(backend):
    """Plain eager calls skip the torch.library round trip (ops._CustomOp); the custom op (what compile, fake
    tensors and opcheck use) must give bitwise the same values, switches and gradients, first and second order."""
    if not dk.available_backends()[backend].available:
        pytest.skip(f"{backend} backend not available")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    results = []
    with dk.backend(backend):
        for via_op in (False, True):
            xx = x.clone().requires_grad_()
            ww, bb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())  # as in a model: fast path too
            if via_op:
                y, sw = torch.ops.drmm.conv_relu_pool(xx, ww, None, bb, 1, 1, 2, 0.1)
                assert "function" not in type(y.grad_fn).__name__
            else:
                y, sw = dk.conv_relu_pool(xx, ww, None, bb, padding=1, pool=2, negative_slope=0.1)
                assert type(y.grad_fn).__name__.startswith("conv_relu_pool_function")
            gx, gw = torch.autograd.grad((y * y).sum(), (xx, ww), create_graph=True)
            ggw, = torch.autograd.grad(gx.pow(2).sum(), ww)
            with torch.no_grad():
                r = dk.render(y, sw, ww, padding=1, pool=2, out_size=(9, 9), negative_slope=0.1) if not via_op \
                    else torch.ops.drmm.render(y, sw, ww, None, 1, 1, 2, 9, 9, 0.1)
            results.append((y, sw, gx, gw, ggw, r))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_fast_path_steps_aside_under_functorch_transforms():
    # Inside torch.func transforms even plain tensors and Parameters must go through the custom op: the eager
    # fast path's autograd.Function has no setup_context, which functorch requires.
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    x = torch.randn(2, 3, 8, 8)
    y_ref = dk.conv_relu_pool(x, w, padding=1)[0].sum()

    def f(s):
        return dk.conv_relu_pool(x, w, padding=1)[0].sum() * s

    torch.testing.assert_close(torch.func.grad(f)(torch.tensor(2.0)), y_ref.detach())
    torch.testing.assert_close(torch.func.vmap(f)(torch.tensor([1.0, 2.0])).detach(),
                               torch.stack([y_ref, 2 * y_ref]).detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool", [1, 2])
def test_conv_bn_relu_pool_training_backward_half(dtype, pool):
    # Half-precision z with float32 statistics: ATen's batch-norm backward needs the weight in the statistics' dtype.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=True)
    gamma = (torch.rand(4) + 0.5).to(dtype).requires_grad_(True)
    beta = torch.zeros(4, dtype=dtype, requires_grad=True)
    y, _ = dk.conv_bn_relu_pool(x, w, gamma, beta, None, None, training=True, padding=1, pool=pool)
    grads = torch.autograd.grad(y.float().sum(), (x, w, gamma, beta))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, w, gamma, beta)]
    y_ref, _ = dk.conv_bn_relu_pool(*ref_leaves, None, None, training=True, padding=1, pool=pool)
    refs = torch.autograd.grad(y_ref.sum(), ref_leaves)
    for g, r in zip(grads, refs):
        assert g.dtype == dtype
        scale = r.abs().max().item() + 1e-3
        assert (g.double() - r).abs().max().item() <= 0.1 * scale
