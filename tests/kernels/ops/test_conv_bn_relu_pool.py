"""The conv_bn_relu_pool op, every layer: the public op against eager PyTorch (conv2d -> batch_norm -> act ->
max_pool2d) on every CPU-capable backend, then the kernels it is made of (bn_pool, batch_stats) per backend.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given

import drmm_kernels as dk
from drmm_kernels import reference
from drmm_kernels import testing as eager

import cpu_cases as cpu
import op_cases as oc
import triton_cases as trt
from drmm_kernels.contract import plain_pool  # noqa: E402


# --------------------------------------------------------------------------- public op vs eager, every backend


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@given(case=oc.conv_cases(max_size=17))
def test_conv_bn_relu_pool_matches_eager(backend, training, case):
    x, w, _, _ = oc.make(case)
    c, dt = case["cout"], case["dtype"]
    assume(not training or case["n"] * ((case["h"] + 2 * case["padding"] - case["k"]) // case["stride"] + 1) > 1)
    gamma = (torch.rand(c, dtype=dt) + 0.5) * torch.where(torch.arange(c) % 3 == 2, -1.0, 1.0).to(dt)
    gamma.requires_grad_(True)
    beta = (torch.randn(c, dtype=dt) * 0.3).requires_grad_(True)
    rm, rv = torch.randn(c, dtype=dt) * 0.1, torch.rand(c, dtype=dt) + 0.5
    rm_e, rv_e = rm.clone(), rv.clone()
    kw = oc.kwargs(case)
    with dk.backend(backend):
        y, sw = dk.conv_bn_relu_pool(x, w, gamma, beta, rm, rv, training=training, momentum=0.2, eps=1e-5, **kw)
    z = F.conv2d(x, w, None, case["stride"], case["padding"])
    v = F.batch_norm(z, rm_e, rv_e, gamma, beta, training, 0.2, 1e-5)
    y_e, idx_e = F.max_pool2d(eager.act(v, case["slope"]), case["pool"], case["pool"], return_indices=True)
    tol = eager.TOL[dt]
    torch.testing.assert_close(y, y_e, **tol)
    torch.testing.assert_close(rm, rm_e, **tol)
    torch.testing.assert_close(rv, rv_e, **tol)
    oc.check_switches(sw, y_e, idx_e, v, case)
    gy = torch.randn_like(y_e)
    leaves = [x, w, gamma, beta]
    for name, a, b in zip(
        ("x", "weight", "bn_weight", "bn_bias"),
        torch.autograd.grad((y * gy).sum(), leaves),
        torch.autograd.grad((y_e * gy).sum(), leaves),
    ):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_conv_bn_relu_pool(backend, training):
    x, w, gamma, beta = oc.small()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with dk.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: dk.conv_bn_relu_pool(
                *a, None if training else rm, None if training else rv, training=training, padding=1
            )[0],
            (x, w, gamma, beta),
        )


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("pool", [1, 2])
def test_gradgradcheck_conv_bn_relu_pool_training(backend, pool):
    # The training backward unpools through the internal unpool op (its own backward gathers); pool=1 skips it.
    x, w, gamma, beta = oc.small(cin=1, cout=2, h=5, w=4, n=2)
    with dk.backend(backend):
        assert torch.autograd.gradgradcheck(
            lambda *a: dk.conv_bn_relu_pool(*a, None, None, training=True, padding=1, pool=pool, negative_slope=0.1)[0],
            (x, w, gamma, beta),
        )


@pytest.mark.parametrize("backend", oc.BACKENDS)
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


def test_conv_bn_relu_pool_bad_input():
    x, w = oc.base()
    with pytest.raises(ValueError, match="^drmm_kernels.conv_bn_relu_pool: running_mean and running_var are required"):
        dk.conv_bn_relu_pool(x, w, None, None, None, None, training=False)
    with pytest.raises(ValueError, match="^drmm_kernels.conv_bn_relu_pool: bn_weight must have 4 elements"):
        dk.conv_bn_relu_pool(x, w, torch.ones(5), None, None, None, training=True)
    with pytest.raises(ValueError, match="more than one value per channel"):
        dk.conv_bn_relu_pool(x[:1, :, :3, :3], w, None, None, None, None, training=True, pool=1)
    with pytest.raises(TypeError, match="^drmm_kernels.conv_bn_relu_pool: training must be a bool"):
        dk.conv_bn_relu_pool(x, w, None, None, None, None, training=1)


@pytest.mark.parametrize("training", [True, False])
def test_zero_input_channels_are_refused_in_eager_fake_and_meta_mode(training):
    # As conv_relu_pool: the op refuses the input rather than declare an output shape its kernels would not produce.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(2, 0, 8, 8), torch.randn(4, 0, 3, 3)
    stats = (torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4))
    msg = r"^drmm_kernels.conv_bn_relu_pool: x has no channels \(shape \(2x0x8x8\)\)"
    with pytest.raises(ValueError, match=msg):
        dk.conv_bn_relu_pool(x, w, *stats, training=training, padding=1)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=msg):
        dk.conv_bn_relu_pool(*(mode.from_tensor(t) for t in (x, w, *stats)), training=training, padding=1)
    with pytest.raises(ValueError, match=msg):
        dk.conv_bn_relu_pool(*(t.to("meta") for t in (x, w, *stats)), training=training, padding=1)


# --------------------------------------------------------------------------- cpu kernels


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", [1, 2, 3, 4])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_cpu_bn_pool_vector_paths(dtype, fmt, pool, slope):
    # 37x38 planes and 20 channels: full vectors plus scalar tails on both layouts, dropped trailing rows/cols.
    gen = torch.Generator().manual_seed(pool)
    z = torch.randn(2, 20, 37, 38, generator=gen, dtype=dtype)
    scale = torch.randn(20, generator=gen, dtype=dtype)
    shift = torch.randn(20, generator=gen, dtype=dtype)
    args = dict(scale=scale, shift=shift, **plain_pool(pool), negative_slope=slope)
    y, sw = cpu.kernels.bn_pool(z=cpu.layout(z, fmt), **args)
    yr, swr = reference.bn_pool(z=z, **args)
    torch.testing.assert_close(y, yr, **cpu.TOL[dtype])
    cpu.assert_switches(sw, swr, reference.scale_shift(z, scale, shift), pool, dtype)


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", ["ties", "nans", "negative"])
def test_cpu_bn_pool_ties_nan_negative_exact(dtype, fmt, case):
    z = cpu.exact_cases(dtype)[case]
    ones, zeros = torch.ones(z.shape[1], dtype=dtype), torch.zeros(z.shape[1], dtype=dtype)
    neg_int = -torch.ones(z.shape[1], dtype=dtype)  # exact negative scale flips which value wins
    for pool in (1, 2, 3, 4):
        for slope in (0.0, 0.1):
            for scale in (ones, neg_int):
                args = dict(scale=scale, shift=zeros, **plain_pool(pool), negative_slope=slope)
                y, sw = cpu.kernels.bn_pool(z=cpu.layout(z, fmt), **args)
                yr, swr = reference.bn_pool(z=z, **args)
                torch.testing.assert_close(y, yr, rtol=0, atol=0, equal_nan=True)
                assert torch.equal(sw, swr), (case, pool, slope)


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,offset", [((5, 3, 7, 9), 0.0), ((17, 4, 6, 5), 1000.0), ((2, 40, 33, 31), -3.0)])
def test_cpu_batch_stats_matches_float64(dtype, shape, offset):
    # A large common offset (|mean| >> std) is where one-pass sums of squares lose everything without the shift.
    torch.manual_seed(0)
    z = torch.randn(*shape, dtype=torch.float64) * 0.5 + offset + torch.arange(shape[1]).view(1, -1, 1, 1)
    var_ref, mean_ref = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    z = z.to(dtype)
    mean, var = cpu.kernels.batch_stats(z=z)
    assert mean.dtype == dtype and var.dtype == dtype and mean.shape == (shape[1],)
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(mean.double(), mean_ref, rtol=rel, atol=rel)
    torch.testing.assert_close(var.double(), var_ref, rtol=rel * (1 + abs(offset)), atol=rel)
    # independent of the thread count (fixed chunks summed in order)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.kernels.batch_stats(z=z)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], mean) and torch.equal(one[1], var)
    # channels_last input goes to the reference (ATen) path with the same result
    cl = cpu.kernels.batch_stats(z=z.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl[1].double(), var_ref, rtol=rel * (1 + abs(offset)), atol=rel)


# --------------------------------------------------------------------------- triton kernels


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_triton_bn_pool_and_conv_bn_relu_pool(channels_last, slope):
    case = trt.Case(2, 5, 6, 7, 9, 3, 1, slope=slope, channels_last=channels_last)
    x, w, scale, shift = trt.inputs(case)
    z = F.conv2d(x, w, None, 1, 1)
    y, sw = trt.kernels.bn_pool(z=z, scale=scale, shift=shift, **plain_pool(2), negative_slope=slope)
    v = eager.pre_activation(trt.d(x), trt.d(w), trt.d(scale), trt.d(shift), 1, 1)
    y_ref, sw_ref = reference.pool_switches(v, 2, slope)
    trt.close(y, y_ref, torch.float32, "bn_pool")
    trt.check_switches(sw, sw_ref, v, 2, torch.float32)

    for training in (True, False):
        rm, rv = torch.zeros(6, device=trt.DEV), torch.ones(6, device=trt.DEV)
        outs = {}
        for name in ("triton", "reference"):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
            with dk.backend(name):
                yb, swb = dk.conv_bn_relu_pool(
                    *leaves, rm.clone(), rv.clone(), training=training, padding=1, negative_slope=slope
                )
            (yb * torch.linspace(-1, 1, yb.numel(), device=trt.DEV).view_as(yb)).sum().backward()
            outs[name] = (yb, swb, [t.grad for t in leaves])
        (yt, swt, gt), (yr, swr, gr) = outs["triton"], outs["reference"]
        zd = F.conv2d(trt.d(x), trt.d(w), None, 1, 1)
        vd = F.batch_norm(
            zd,
            None if training else rm.double().cpu(),
            None if training else rv.double().cpu(),
            trt.d(scale),
            trt.d(shift),
            training,
        )
        eager.assert_switches_agree(swt, swr, vd, 2, trt.switch_tol(vd, torch.float32), "conv_bn_relu_pool")
        trt.close(yt, yr, torch.float32, f"conv_bn_relu_pool training={training}")
        if not torch.equal(swt, swr):
            continue  # a switch flipped at a near-tie moves that window's gradient: nothing to compare
        for name, a, b in zip(("x", "weight", "bn_weight", "bn_bias"), gt, gr):
            trt.close(a, b, torch.float32, f"grad {name} training={training}")


def test_training_mode_with_an_empty_batch_is_empty_as_in_pytorch():
    bn = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    before = bn.running_mean.clone(), bn.running_var.clone()
    y, sw = dk.conv_bn_relu_pool(
        x, w, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=True, padding=1, pool=2
    )
    ref = F.max_pool2d(F.relu(bn(F.conv2d(x, w, padding=1))), 2)
    assert y.shape == ref.shape == (0, 4, 4, 4) and sw.shape == y.shape and sw.dtype == torch.uint8
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    y.sum().backward()  # still in the graph: zero gradients, as PyTorch gives
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(bn.weight.grad, torch.zeros(4))
