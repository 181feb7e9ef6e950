"""linear_logprob: outputs and gradients against the dense oracle (naive.py), bad input, and peak memory.

Two paths are compared with the fp32 dense oracle: the Triton kernels (under TRITON_INTERPRET=1
on CPU) and the chunked torch CPU path. Tolerances are relative to a same-dtype torch run: a path
may be off from the fp32 reference by at most twice what the dense reference itself is off when it
runs in that dtype, plus a small floor.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from trace_kernels.linear_logprob import MIN_TEMPERATURE, LinearLogprobFunction, _merge_splits, linear_logprob
from trace_kernels.linear_logprob.naive import linear_logprob_reference

# the package re-exports the function `linear_logprob`, which shadows the module attribute
op_module = importlib.import_module("trace_kernels.linear_logprob")
checks_module = importlib.import_module("trace_kernels.linear_logprob.checks")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 floor is generous for TF32-free kernels; 16-bit floors cover one rounding of the output.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def small_chunks(monkeypatch):
    """Backward / chunked-forward blocks of 5 tokens x 128 vocab: several blocks in every test shape."""
    monkeypatch.setattr(op_module, "TOKEN_CHUNK", 5)
    monkeypatch.setattr(op_module, "VOCAB_CHUNK", 128)


def make_case(
    n_rows=13,
    hidden_size=40,
    vocab=300,
    n_pairs=29,
    *,
    dtype=torch.float32,
    with_bias=True,
    scale=1.0,
    seed=0,
    index_dtype=torch.int64,
):
    """Random inputs with M > N, repeated rows and 3 rows nobody uses (rows 0, 5, N-1).

    V=300 is no multiple of any block size (16/32/64/128) used here.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, hidden_size, generator=gen) * scale
    weight = torch.randn(vocab, hidden_size, generator=gen) / math.sqrt(hidden_size)
    bias = torch.randn(vocab, generator=gen) * 0.5 if with_bias else None
    usable = torch.tensor([r for r in range(n_rows) if r not in (0, 5, n_rows - 1)])
    rows = usable[torch.randint(0, usable.numel(), (n_pairs,), generator=gen)]
    rows[:4] = usable[1]  # one row with several labels, like a branch point with four children
    labels = torch.randint(0, vocab, (n_pairs,), generator=gen)
    labels[:2] = 7  # the same (row, label) pair twice
    grad_logprob = torch.randn(n_pairs, generator=gen)
    grad_entropy = torch.randn(n_rows, generator=gen)
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)
    return {
        "hidden": cast(hidden),
        "weight": cast(weight),
        "bias": cast(bias),
        "rows": rows.to(DEVICE, index_dtype),
        "labels": labels.to(DEVICE, index_dtype),
        "grad_logprob": grad_logprob.to(DEVICE),
        "grad_entropy": grad_entropy.to(DEVICE),
    }


def run(fn, case, *, dtype=None, temperature=1.0, return_entropy=True, use_logprob_grad=True, **kwargs):
    """Outputs and gradients (hidden, weight, bias) of fn for the case's upstream gradients."""
    leaves = {}
    for name in ("hidden", "weight", "bias"):
        t = case[name]
        leaves[name] = None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
    out = fn(
        leaves["hidden"],
        leaves["weight"],
        case["rows"],
        case["labels"],
        temperature=temperature,
        bias=leaves["bias"],
        return_entropy=return_entropy,
        **kwargs,
    )
    logprob, entropy = out if return_entropy else (out, None)
    loss = (logprob * case["grad_logprob"]).sum() if use_logprob_grad else 0.0
    if entropy is not None:
        loss = loss + (entropy * case["grad_entropy"]).sum()
    wrt = [t for t in leaves.values() if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    result = {"logprob": logprob.detach(), "entropy": None if entropy is None else entropy.detach()}
    result.update(zip([n for n, t in leaves.items() if t is not None], grads))
    return result


def assert_matches_reference(got, case, dtype, floor_factor=1.0, **kwargs):
    """Every output/gradient within 2x the same-dtype dense run's error from the fp32 dense run (+ floor)."""
    exact = run(linear_logprob_reference, case, dtype=torch.float32, **kwargs)
    same_dtype = run(linear_logprob_reference, case, **kwargs)
    assert set(got) == set(exact)
    for name, want in exact.items():
        if want is None:
            assert got[name] is None
            continue
        have = got[name]
        assert have.dtype == (torch.float32 if name in ("logprob", "entropy") else dtype), name
        scale = want.abs().max().clamp_min(1.0)
        budget = 2 * (same_dtype[name].float() - want).abs().max() + floor_factor * FLOOR[dtype] * scale
        err = (have.float() - want).abs().max()
        assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} ({dtype})"
    assert (got["logprob"] <= 0).all(), "log-probabilities must never be positive"


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_with_branch_points(backend, dtype, small_chunks):
    """M > N, repeated and unused rows, V % block != 0, temperature != 1, bias, both upstream grads."""
    case = make_case(dtype=dtype)
    got = run(linear_logprob, case, temperature=0.7, backend=backend)
    assert_matches_reference(got, case, dtype, temperature=0.7)
    # Rows no pair uses (0, 5, N-1 at least): entropy reported as 0 and no gradient flows into them.
    used = torch.zeros(case["hidden"].shape[0], dtype=torch.bool, device=DEVICE)
    used[case["rows"]] = True
    assert not used[[0, 5, -1]].any()
    assert torch.all(got["entropy"][~used] == 0) and torch.all(got["hidden"][~used] == 0)
    assert torch.all(got["entropy"][used] > 0)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])  # "reference": the old name of "cpu"
def test_logprob_only_without_bias_default_blocks(backend):
    """One block (default chunk sizes), no bias, temperature 1, only logprob returned."""
    case = make_case(with_bias=False, seed=1)
    got = run(linear_logprob, case, return_entropy=False, backend=backend)
    assert set(got) == {"logprob", "entropy", "hidden", "weight"}
    assert_matches_reference(got, case, torch.float32, return_entropy=False)


def test_entropy_gradient_alone(small_chunks):
    """Only the entropy bonus has an upstream gradient (logprob's grad is None inside backward)."""
    case = make_case(seed=2)
    got = run(linear_logprob, case, temperature=1.3, use_logprob_grad=False)
    assert_matches_reference(got, case, torch.float32, temperature=1.3, use_logprob_grad=False)


def test_peaked_distribution_keeps_logprob_nonpositive(small_chunks):
    """Huge logits (near-certain labels) in fp32: still <= 0 and equal to the reference.

    Logits reach ~200 here, so fp32 rounding of a logit is ~200x larger than at unit scale and the
    softmax amplifies it: the floor is widened 50x (still 1e-3 relative)."""
    case = make_case(scale=60.0, seed=3)
    w = case["weight"]
    case["labels"] = (case["hidden"][case["rows"].long()] @ w.T).argmax(dim=1)  # the argmax label
    got = run(linear_logprob, case)
    assert_matches_reference(got, case, torch.float32, floor_factor=50.0)
    assert got["logprob"].max() > -1e-3  # the setup really is near-certain


def test_int32_indices_and_partial_requires_grad(small_chunks):
    """int32 rows/labels; weight frozen (only hidden and bias get gradients)."""
    case = make_case(index_dtype=torch.int32, seed=4)
    hidden = case["hidden"].clone().requires_grad_()
    bias = case["bias"].clone().requires_grad_()
    logprob = linear_logprob(hidden, case["weight"], case["rows"], case["labels"], bias=bias)
    (logprob * case["grad_logprob"]).sum().backward()
    ref_case = dict(case, rows=case["rows"].long(), labels=case["labels"].long())
    want = run(linear_logprob_reference, ref_case, return_entropy=False)
    torch.testing.assert_close(logprob.detach(), want["logprob"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, want["hidden"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, want["bias"], atol=2e-5, rtol=1e-5)


def test_no_pairs_gives_empty_logprob_and_zero_gradients():
    case = make_case(seed=5)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    hidden = case["hidden"].clone().requires_grad_()
    logprob, entropy = linear_logprob(hidden, case["weight"], empty, empty, return_entropy=True)
    assert logprob.shape == (0,) and torch.all(entropy == 0)
    (logprob.sum() + entropy.sum()).backward()
    assert torch.all(hidden.grad == 0)


def test_vocab_split_merge_equals_logsumexp():
    """The forward's per-split partials merge to the exact log-sum-exp and entropy of the whole row."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(7, 300, generator=gen) * 4
    splits = [z[:, i : i + 64] for i in range(0, 300, 64)]  # 5 splits, the last one short
    part_max = torch.stack([s.amax(1) for s in splits])
    part_sum = torch.stack([(s - m[:, None]).exp().sum(1) for s, m in zip(splits, part_max)])
    part_ent = torch.stack([((s - m[:, None]).exp() * (s - m[:, None])).sum(1) for s, m in zip(splits, part_max)])
    lse, entropy = _merge_splits(part_max, part_sum, part_ent)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1))
    log_p = torch.log_softmax(z, 1)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(1))


def test_triton_forward_really_splits_the_vocabulary():
    """The Triton forward cuts the vocabulary into several splits (so the merge above is exercised),
    and its merged partials are the exact log-sum-exp and entropy of each row.

    Splits are whole multiples of SPLIT_GRANULE (64 interpreted, 256 on a GPU, whatever vocab tile
    the autotuner picks), so a V above two granules always gives >= 3 splits, the last one short:
    V=300 here (5 splits), 556 on a GPU."""
    from trace_kernels.linear_logprob.triton import SPLIT_GRANULE, row_stats_partials_triton

    case = make_case(seed=7, vocab=max(300, 2 * SPLIT_GRANULE + 44))
    hidden, weight = case["hidden"], case["weight"]
    part_max, part_sum, part_ent = row_stats_partials_triton(hidden, weight, None, 1.0, True)
    assert part_max.shape[0] >= 3
    lse, entropy = _merge_splits(part_max, part_sum, part_ent)
    log_p = torch.log_softmax(hidden.double() @ weight.double().T, dim=1)
    torch.testing.assert_close(lse, torch.logsumexp(hidden.double() @ weight.double().T, dim=1).float())
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(1).float())


# ---------------------------------------------------------------------------------------------
# Bad input: every user error names the argument, in the op and in the reference alike.


def _bad_cases():
    c = make_case(seed=8)
    h, w, b, r, l = c["hidden"], c["weight"], c["bias"], c["rows"], c["labels"]
    nan_h = h.clone()
    nan_h[2, 3] = float("nan")
    inf_h = h.clone()
    inf_h[4, 0] = float("inf")
    nan_b = b.clone()
    nan_b[9] = float("nan")
    nan_w, inf_w = w.clone(), w.clone()
    nan_w[250, 7] = float("nan")
    inf_w[3, 39] = -float("inf")
    with_label = lambda v: torch.cat([l[:-1], l.new_tensor([v])])
    with_row = lambda v: torch.cat([r[:-1], r.new_tensor([v])])
    V, N = w.shape[0], h.shape[0]
    return [
        (
            "label_too_big",
            dict(labels=with_label(V)),
            ValueError,
            r"labels must lie in \[0, V=300\).*labels\[28\] = 300",
        ),
        ("label_negative", dict(labels=with_label(-1)), ValueError, r"labels must lie in \[0, V=300\).*= -1"),
        ("row_too_big", dict(rows=with_row(N)), ValueError, r"rows must lie in \[0, N=13\).*rows\[28\] = 13"),
        ("row_negative", dict(rows=with_row(-2)), ValueError, r"rows must lie in \[0, N=13\)"),
        ("nan_hidden", dict(hidden=nan_h), ValueError, r"hidden contains a non-finite value.*\(2, 3\)"),
        ("inf_hidden", dict(hidden=inf_h), ValueError, r"hidden contains a non-finite value.*\(4, 0\)"),
        ("nan_bias", dict(bias=nan_b), ValueError, r"bias contains a non-finite value.*\(9,\)"),
        # issue 19: weight was not checked; a tiny temperature overflowed fp32 logits to NaN
        ("nan_weight", dict(weight=nan_w), ValueError, r"weight contains a non-finite value.*\(250, 7\)"),
        ("inf_weight", dict(weight=inf_w), ValueError, r"weight contains a non-finite value.*\(3, 39\)"),
        ("temperature_tiny", dict(temperature=1e-38), ValueError, r"temperature 1e-38 is below the supported minimum"),
        ("temperature_below_floor", dict(temperature=MIN_TEMPERATURE / 2), ValueError, r"below the supported minimum"),
        ("hidden_1d", dict(hidden=h[0]), ValueError, r"hidden must be 2-D \[N, H\]"),
        ("hidden_empty_h", dict(hidden=h[:, :0]), ValueError, r"hidden must have a hidden size H >= 1"),
        ("weight_wrong_h", dict(weight=w[:, :-1]), ValueError, r"weight must be 2-D \[V, H=40\]"),
        ("weight_empty_v", dict(weight=w[:0], bias=None), ValueError, r"weight must have at least one vocabulary row"),
        ("bias_wrong_v", dict(bias=b[:-1]), ValueError, r"bias must be 1-D \[V=300\]"),
        ("rows_2d", dict(rows=r[None]), ValueError, r"rows must be 1-D \[M\]"),
        ("labels_2d", dict(labels=l[None]), ValueError, r"labels must be 1-D \[M\]"),
        ("length_mismatch", dict(labels=l[:-1]), ValueError, r"labels must have the same length M as rows"),
        ("hidden_int", dict(hidden=h.long()), TypeError, r"hidden must be float32, float16 or bfloat16"),
        ("hidden_float64", dict(hidden=h.double()), TypeError, r"hidden must be float32, float16 or bfloat16"),
        ("weight_dtype", dict(weight=w.half()), TypeError, r"weight dtype torch.float16 must match hidden dtype"),
        ("bias_dtype", dict(bias=b.half()), TypeError, r"bias dtype torch.float16 must match hidden dtype"),
        ("rows_float", dict(rows=r.float()), TypeError, r"rows must be int32 or int64"),
        ("labels_int16", dict(labels=l.short()), TypeError, r"labels must be int32 or int64"),
        ("weight_not_tensor", dict(weight=w.tolist()), TypeError, r"weight must be a torch.Tensor"),
        ("weight_on_meta", dict(weight=w.to("meta")), ValueError, r"weight is on meta but hidden is on"),
        ("temperature_zero", dict(temperature=0.0), ValueError, r"temperature must be finite and > 0, got 0.0"),
        ("temperature_negative", dict(temperature=-1.0), ValueError, r"temperature must be finite and > 0"),
        ("temperature_nan", dict(temperature=float("nan")), ValueError, r"temperature must be finite and > 0"),
        ("temperature_str", dict(temperature="1"), TypeError, r"temperature must be a real number"),
        ("temperature_bool", dict(temperature=True), TypeError, r"temperature must be a real number"),
    ]


@pytest.mark.parametrize("fn", [linear_logprob, linear_logprob_reference], ids=["op", "reference"])
@pytest.mark.parametrize("name, override, error, message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_naming_the_argument(fn, name, override, error, message):
    c = make_case(seed=8)
    args = {
        "hidden": c["hidden"],
        "weight": c["weight"],
        "rows": c["rows"],
        "labels": c["labels"],
        "temperature": 1.0,
        "bias": c["bias"],
    }
    args.update(override)
    with pytest.raises(error, match=message):
        fn(args.pop("hidden"), args.pop("weight"), args.pop("rows"), args.pop("labels"), **args)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over a NaN row
def test_value_checks_can_be_switched_off():
    """check_inputs=False skips the data checks: a NaN hidden row then flows through to its logprobs."""
    c = make_case(seed=9)
    hidden = c["hidden"].clone()
    hidden[c["rows"][0]] = float("nan")
    with pytest.raises(ValueError, match="hidden contains a non-finite value"):
        linear_logprob(hidden, c["weight"], c["rows"], c["labels"])
    logprob = linear_logprob(hidden, c["weight"], c["rows"], c["labels"], check_inputs=False)
    affected = c["rows"] == c["rows"][0]
    assert torch.isnan(logprob[affected]).all() and torch.isfinite(logprob[~affected]).all()


def test_weight_check_scans_in_blocks_and_can_be_switched_off(monkeypatch):
    c = make_case(seed=9)
    weight = c["weight"].clone()
    weight[-1, -1] = float("inf")  # in the last of many blocks
    monkeypatch.setattr(checks_module, "_CHECK_BLOCK_ELEMENTS", 3 * weight.shape[1])
    with pytest.raises(ValueError, match=rf"weight contains a non-finite value.*\({weight.shape[0] - 1}, 39\)"):
        linear_logprob(c["hidden"], weight, c["rows"], c["labels"])
    linear_logprob(c["hidden"], weight, c["rows"], c["labels"], check_inputs=False, backend="cpu")  # no check


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_the_smallest_temperature_stays_finite(backend):
    # at MIN_TEMPERATURE every logit is scaled by 1e4: finite logprobs (issue 19: 1e-38 gave NaN)
    c = make_case(seed=11)
    hidden = (c["hidden"] * 30).requires_grad_(True)
    logprob, entropy = linear_logprob(
        hidden, c["weight"], c["rows"], c["labels"], temperature=MIN_TEMPERATURE, return_entropy=True, backend=backend
    )
    assert torch.isfinite(logprob).all() and torch.isfinite(entropy).all() and (logprob <= 0).all()
    (grad,) = torch.autograd.grad(logprob.sum(), hidden)
    assert torch.isfinite(grad).all()


def test_forcing_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = make_case(seed=10)
    if DEVICE == "cuda":
        pytest.skip("Triton can run on CUDA")
    with pytest.raises(RuntimeError, match="Triton path was forced"):
        linear_logprob(c["hidden"], c["weight"], c["rows"], c["labels"], backend="triton")


def test_function_is_the_public_autograd_op():
    assert issubclass(LinearLogprobFunction, torch.autograd.Function)


# ---------------------------------------------------------------------------------------------
# Peak memory, measured as the process's peak resident memory (VmHWM, reset through
# /proc/self/clear_refs) in a fresh interpreter with glibc's mmap threshold pinned low, so freed
# blocks go back to the OS and every large allocation shows up in the peak.

_MEMORY_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch
    import importlib
    op_module = importlib.import_module("trace_kernels.linear_logprob")
    from trace_kernels.linear_logprob import linear_logprob
    from trace_kernels.linear_logprob.naive import linear_logprob_reference

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large blocks via mmap, unmapped on free
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD: give freed heap back promptly
    op_module.TOKEN_CHUNK, op_module.VOCAB_CHUNK = 128, 1024
    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def extra_peak(fn, n_rows, vocab, hidden_size=32):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(n_rows, hidden_size, generator=gen).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=gen) / 8).requires_grad_()
        rows = torch.arange(n_rows)
        labels = torch.randint(0, vocab, (n_rows,), generator=gen)
        kwargs = {"backend": "cpu"} if fn is linear_logprob else {}
        libc.malloc_trim(0)  # release free heap pages earlier calls left resident
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident size
        before = status("VmRSS")
        logprob, entropy = fn(hidden, weight, rows, labels, return_entropy=True, **kwargs)
        (logprob.sum() + entropy.sum()).backward()
        return status("VmHWM") - before

    out = {}
    for n_rows, vocab in json.loads(sys.argv[1]):
        for name, fn in (("reference", linear_logprob_reference), ("chunked", linear_logprob)):
            extra_peak(fn, 64, 1024)  # warm-up: first-call allocations are not part of the op
            out[f"{name}/{n_rows}/{vocab}"] = extra_peak(fn, n_rows, vocab)
    print(json.dumps(out))
    """
)


def _measure_peaks(shapes):
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, json.dumps(shapes)], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_extra_memory_does_not_grow_with_tokens_times_vocab():
    """N x V grows 8x twice (once through N, once through V). The dense reference's extra peak
    grows by at least one fp32 [N, V] tensor; the chunked path's grows by far less than that (what
    it does grow by is the O(N H + V H) gradients and per-row statistics)."""
    small_n, big_n, small_v, big_v = (256, 8192), (2048, 8192), (512, 4096), (512, 32768)
    peaks = _measure_peaks([small_n, big_n, small_v, big_v])
    print("peak extra memory (CPU, RSS): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peaks.items()))
    for small, big in ((small_n, big_n), (small_v, big_v)):
        grown_nv_bytes = 4 * (big[0] * big[1] - small[0] * small[1])  # 56 MiB of fp32 logits
        ref_growth = peaks[f"reference/{big[0]}/{big[1]}"] - peaks[f"reference/{small[0]}/{small[1]}"]
        chunk_growth = peaks[f"chunked/{big[0]}/{big[1]}"] - peaks[f"chunked/{small[0]}/{small[1]}"]
        detail = f"{small}->{big}: reference +{ref_growth / 2**20:.1f} MiB, chunked +{chunk_growth / 2**20:.1f} MiB"
        assert ref_growth >= grown_nv_bytes, detail  # the meter sees the dense logits
        assert chunk_growth <= 0.2 * grown_nv_bytes, detail
        assert peaks[f"chunked/{big[0]}/{big[1]}"] <= 0.25 * peaks[f"reference/{big[0]}/{big[1]}"], detail


# ---------------------------------------------------------------------------------------------
# CUDA: realistic sizes (several autotuned blocks, default chunking) against the fp32 reference.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_reference_at_model_scale(dtype):
    case = make_case(n_rows=1500, hidden_size=512, vocab=50_000 + 17, n_pairs=1800, dtype=dtype, seed=11)
    got = run(linear_logprob, case, temperature=0.9)
    assert_matches_reference(got, case, dtype, temperature=0.9)
