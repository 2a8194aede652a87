"""Writes RESULTS.md and the PNG plots from the results dictionary of ``run.py``."""

from __future__ import annotations

import math
import os

TARGETS = (
    ("T1", "spiral & pendulum forward no slower than jax.experimental.ode.odeint, at equal or "
           "better accuracy (RMS error of ys)"),
    ("T2a", "mlp-batch forward overhead (solve time / (NFE x one f evaluation)) <= 1.1"),
    ("T2b", "mlp-batch forward NFE <= diffrax's with the same tableau"),
    ("T3a", "mlp-batch adjoint gradient time <= 0.75 x diffrax BacksolveAdjoint, gradient error "
            "no worse"),
    ("T3b", "mlp-batch backprop gradient time <= 0.75 x diffrax RecursiveCheckpointAdjoint, "
            "gradient error no worse (jaxode's reverse-mode `checkpoint`; `backprop`, which also "
            "does forward mode, in brackets)"),
    ("T4", "`jax.grad` of the vmapped adjoint solve (per-sample steps, shared parameters, default "
           "options) <= 3 x the batch solved as one state: the README's `NeuralODE` + "
           "`eqx.filter_vmap(model)(z0s)` pattern (128 2-D points) and mlp-batch (`jax.vmap` of the "
           "solve)"),
    ("T5", "first call of a jitted gradient (training) step, per mode, no slower than jax odeint's"),
    ("T6", "adjoint peak memory at the longest horizon within 1.2 x of t1=1"),
    ("T7", "vmapped `gradient=\"backprop\"` gradient time independent of max_steps (256, 1024, 4096; "
           "slowest / fastest <= 1.25), batch under `jax.vmap` and as one state"),
    ("T8", "a repeated eager (un-jitted) `odesolve` call and eager `jax.grad` within 2 x of the same "
           "inside `jax.jit`"),
)


# What profiling found for a target this machine misses (printed for the missed ones only).
CAUSES = {
    "T1": (
        "Fixed costs per step and per output on a 2-state system, where a step costs under a "
        "microsecond. XLA's CPU runtime runs a loop body inline only when all its buffers are "
        "<= 512 bytes or it has <= 8 operations (`ThunkExecutor`), else through a dataflow "
        "executor costing ~1 us more per step; jaxode's step loop now carries only the state "
        "(nested loops, outputs outside: `jaxode/loop.py`), which took spiral from 3.1x to about "
        "parity. Profiled on pendulum (dopri5, rtol = atol = 1e-8): a step costs 0.49 us against "
        "odeint's 0.40 us (jaxode's step also detects failures: non-finite state or error, "
        "step-size underflow, max_steps; and runs Hairer's PI controller), and an output time "
        "~0.8 us against ~0.1 us: each output that falls in a new step is one iteration of the "
        "outer loop, entering and leaving the inner step loop. Pendulum has 1.7 steps per "
        "output, spiral 0.4. The benchmark passes `ts` as an argument of the jitted function; "
        "with `ts` a constant of the program instead, pendulum tsit5 takes 1.07x odeint's time "
        "(0.075 vs 0.070 ms, best of 200, 2026-12-01) against 1.5x with `ts` traced: about "
        "half of that difference is the direction of time, a traced +-1 that multiplies every "
        "field evaluation and time of the loop (fixed to +1 as an experiment: 1.25x), which a "
        "constant `ts` folds away. An outer `lax.scan` over the outputs, as odeint has, was "
        "tried and was slower (pendulum 1.13-1.4x with constant `ts`, spiral 1.02x from 0.82x). "
        "The ratio also depends on the host: on pendulum it was 0.9-1.1x in one run and 1.5-3.4x "
        "in another on the same type of 2-vCPU VM (2026-12-01). A trace (`jax.profiler`) shows "
        "why: XLA runs jaxode's whole solve on one of its worker threads (its runtime hands a "
        "program with parallel operations to its thread pool), where odeint's runs on the "
        "calling thread, so every call pays two thread wake-ups, slow on a VM whose idle vCPU "
        "halts. Pinned to one core (`taskset -c 0`), pendulum took 0.23-0.35 ms against "
        "odeint's 0.23-0.25 ms; unpinned, 0.41-0.62 ms. Wrapping the solve in a top-level "
        "`lax.cond` did not keep it on the calling thread."
    ),
    "T2a": (
        "Per step, beyond the NFE field evaluations: the RK combinations, the error norm and the "
        "dense-output coefficients over the 256x32 state (a few passes over 32 KiB); measured "
        "1.04-1.17 across runs (diffrax 1.12-1.18 in the same runs), so the target sits inside "
        "this machine's run-to-run noise."
    ),
    "T2b": (
        "Not the same error estimate nor controller, though the same 5th-order method. diffrax's "
        "Dopri5 uses Dormand and Prince's other 4th-order embedded weights (b^_1 = 1951/21600, ...), "
        "whose error estimate is exactly 2/3 of the one of Hairer's DOPRI5, scipy's RK45 and "
        "jaxode (e_1 = 71/57600, ...), and integral step control where jaxode uses Hairer's PI "
        "controller (beta = 0.04). Measured on this workload: jaxode takes 26 dopri5 steps (158 "
        "NFE); with the 2/3-scaled estimate, 25; with integral control, 25; with both and "
        "diffrax's dt0 = 0.01 (no first-step probe), 23 steps and 139 NFE, diffrax's numbers "
        "exactly. Tsit5's error weights are identical in both: 29 vs 28 steps is the controller. "
        "jaxode's trajectory error is the smaller one in each case (peers table)."
    ),
    "T3a": (
        "The same algorithm as BacksolveAdjoint, with the time in the MLP's vector-Jacobian "
        "products: ~184 backward evaluations of `vjp(f)` at ~3 f-costs each (~85 ms) plus the "
        "forward solve (~25 ms). jaxode already needs fewer backward evaluations than diffrax "
        "(per-part error norm, started from the forward's last step); 0.75x would need ~35% "
        "fewer again, or cheaper evaluations."
    ),
    "T3b": (
        "jaxode's `checkpoint` mode does what diffrax's RecursiveCheckpointAdjoint does (a "
        "`custom_vjp` around the while loop; states checkpointed, steps recomputed and "
        "differentiated one at a time on the way back) and takes about the same time: the work "
        "is the forward solve plus a `vjp` of every step, i.e. the MLP's forward recomputed "
        "(1 f-cost per stage) and transposed (2 f-costs: input and weight gradients) at ~26 "
        "steps x 6 stages; profiled: forward 25 ms, one `vjp` of f 0.55 ms against 0.17 ms for "
        "f. Here every step is a checkpoint (26 steps < 182 slots), so nothing else is "
        "recomputed. 0.75x would need the forward's MLP intermediates kept instead of recomputed "
        "(~3.6 MB per step here, ~25% of the time) or fewer steps (T2b: 158 vs 139 NFE). "
        "The bracketed floor is JAX's own reverse mode of a bare fixed-step dopri5 in a "
        "`lax.scan` (`peers.scan_floor_grad`: 3 steps per output interval, 30 in all against "
        "jaxode's 26, each under `jax.checkpoint`; no step control, failure checks or "
        "interpolation): the time of the same work with nothing around it. Scaled to jaxode's "
        "number of steps it is the floor of this algorithm at jaxode's step count, and lies "
        "above 0.75x: the target needs fewer steps (T2b) or the field's intermediates kept. "
        "jaxode's time per step is diffrax's, to the run-to-run noise: the ratio was 0.89x in "
        "one full run and 1.11x in the next (2026-12-01, the same code: a host-to-host "
        "difference; an A/B of the two commits in one session gave the same ratio). "
        "`backprop` (nested checkpointed scans, kept for forward mode) pays also for the "
        "skipped blocks of max_steps = 4096."
    ),
    "T4": (
        "`jax.grad` of a vmapped adjoint solve with unbatched parameters runs one backward solve "
        "for the batch with one shared parameter adjoint (a `custom_jvp` whose rule goes through "
        "`custom_vmap` when vmap batches its tangents: `jaxode/adjoint.py`), the same program as "
        "`batched=True`; the per-sample steps remain, so the ratio to one state is the cost of "
        "each sample keeping its own step size (the loop runs until the slowest sample is done, "
        "every step over the whole batch). `jax.vmap` of `jax.grad` (per-sample gradients) or "
        "batched parameters still carry a parameter adjoint per sample."
    ),
    "T5": (
        "Profiled with `python benchmarks/compile_profile.py` (the same training step; "
        "`jax.jit(step).trace`, `.lower`, `.compile` timed apart; the optimised HLO counted per "
        "top-level loop). Tracing and lowering took 0.4 s for jax odeint, 0.8-1.3 s for jaxode's "
        "adjoint, checkpoint and reversible, 3 s for backprop (its nested scans) and 2.7-3.5 s "
        "for diffrax (on 2 cores under a load of ~10, about 3x a quiet machine's times); the "
        "rest is XLA, and its time follows the size of the program: optimised HLO "
        "instructions jax odeint 2061, jaxode "
        "adjoint 3819, reversible 5317, backprop 7591, checkpoint 7976 (diffrax "
        "RecursiveCheckpointAdjoint 4220, BacksolveAdjoint 7757). **adjoint** (1.9x odeint's "
        "HLO): the forward loop is 909 instructions against odeint's 445 (the step also checks "
        "for failure, runs the PI controller, counts and writes the outputs from the dense "
        "coefficients) and the backward loop 1937 with 63 dots against odeint's 1122 with 31: "
        "jaxode's backward step unrolls the vector-Jacobian products of all seven stages (3 "
        "forward and 6 transposed matmuls of the MLP each), odeint loops over its stages. The "
        "failure checks (`throw=True`: two host callbacks and two conditionals, ~100 of the 3819 "
        "instructions) are not the cause: without them the compile changed by 0-30% across "
        "runs, within the noise of a loaded machine. Looping the stages saved ~0.1 s of compile but "
        "made the vmapped adjoint 5x slower, so they stay unrolled. **checkpoint**: three loops "
        "hold a copy of the step: the forward (1360 instructions, with the tape), the segment "
        "recomputation (1186) and the vector-Jacobian product of the step (4327, 54 dots: the "
        "MLP's six stages recomputed and transposed, the transposed masked writes of the "
        "outputs and the step's bookkeeping): that product alone is 54% of the program and "
        "more than twice the adjoint's whole backward step. **backprop**: the checkpointed "
        "scans (7 loops, 11 conditionals: a skip branch per level) hold the differentiated step "
        "in a 4790-instruction loop. **reversible**: 161 dots (the two-state step and its "
        "inversion). Compile time is what the first call misses on; no change that cuts it "
        "without costing the steady state was found."
    ),
    "T7": (
        "The memory `gradient=\"backprop\"` lays out grows like `sqrt(max_steps)` by design "
        "(`jaxode/while_loops.py`: the inputs of all `max_steps / B` blocks, `S` each, and one "
        "block's residuals, `B R`), and so did its time: the scans skip the computation of "
        "finished blocks and groups, but a linearised `lax.cond` outputs the residuals of both "
        "branches, so skipped units still write their (zero) residuals and the reverse pass "
        "reads them back. Profiled on this workload (batch 128, 26 steps; forward and reverse "
        "timed apart, `jax.vjp`): (1) the reverse pass recomputed every block of the group that "
        "ran, the skipped ones included, and each skipped block wrote the zero residuals of its "
        "`B` iterations (`B R`, ~24 MB at B = 7): under `jax.vmap`, 103 ms at max_steps 256 "
        "against 194 ms at 4096, and 410 ms with all 256 blocks in one group. Now the block sits "
        "in a `jax.checkpoint` of its own inside the checkpointed skip branch, so a skipped "
        "block's recomputation writes one block input; the outer recomputation of a running "
        "block is dead code, removed (`test_backprop_gradient_evaluates_a_step_twice_not_three_times`): "
        "reverse pass 103 ms at 4096. (2) The block length `B = sqrt(max_steps S / R)` took `R / "
        "S = s` (the stages): measured at trace time instead (`drivers._step_residual_ratio`: "
        "the field's `jax.vjp` residuals per stage; `S` without the outputs, which the block "
        "checkpoint does not keep), ~100 here, so blocks of 7 steps at 4096 instead of 25. "
        "(3) What remains grows with the memory itself: glibc's `malloc` maps buffers over "
        "its mmap threshold (at most 32 MiB) afresh at every call and the kernel zero-fills "
        "them page by page; with `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 "
        "MALLOC_TOP_PAD_=268435456` (the bracketed run, same code) the spread nearly vanishes. "
        "Before (1)-(2), interleaved on this machine: one state 1.5-1.6x, vmap 1.45-1.5x; with the "
        "same `MALLOC_*` settings 1.30-1.34x. Under `jax.vmap` the gradient cost ~10x the one-state "
        "one until 2026-12-01 (per-element copies of the MLP's weights from the field's "
        "non-finite guard and the masked iteration's batched `lax.cond`; "
        "`test_rejected_overflowing_step_of_one_vmapped_problem`)."
    ),
    "T8": (
        "A repeated eager call compiles nothing: `odesolve` keeps a `jax.jit` of its solve per "
        "key (`f`'s identity, the non-array `params` by type and value, the static options; "
        "array shapes and dtypes are `jax.jit`'s own key). What remains, profiled on the 2-state "
        "systems (a solve of ~0.3 ms): (1) the program differs: the eager call's compiled solve "
        "takes `z0`, `ts` and the tolerances as arguments, where the benchmark's jitted function "
        "closes over them, and XLA folds them into the loop (the direction of time, a traced "
        "+-1, multiplies every field evaluation and time; see T1): the bracketed row runs the "
        "eager call's program under `jax.jit`; (2) Python per call, ~0.1 ms: the options, the "
        "input checks (a `ts` or `z0` JAX array checked before is not transferred to the host "
        "again: `errors._check_values_once`) and the cache lookup (it replaced "
        "`equinox.filter_jit`, ~0.1 ms more per call). An eager `jax.grad` is bounded by JAX "
        "itself: it linearises and transposes the compiled call and differentiates the loss's "
        "own operations eagerly at every call (no un-jitted transformation is cached), so "
        "`jax.grad` of `jax.jit(odesolve)`, with no jaxode Python at all, costs about as much "
        "(bracketed: JAX's floor); the eager `jax.grad` of `mean(p ** 2)` alone took 2.6 ms "
        "here. On mlp-batch, where a solve costs ~25 ms, both are within a few percent of the "
        "jitted call. Put a training step in `jax.jit` (as the README does)."
    ),
}


# ---------------------------------------------------------------------------------------
# formatting


def ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    v = x * 1e3
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def time_cell(row) -> str:
    if "median_s" not in row:
        return "n/a"
    cell = ms(row["median_s"])
    if row.get("samples", 1) > 1:
        cell += f" ({ms(row['min_s'])}–{ms(row['max_s'])})"
    return cell


def sec(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def sci(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def num(x) -> str:
    return "n/a" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def by_label(rows) -> dict:
    return {r["label"]: r for r in rows or []}


def med(row) -> float | None:
    return None if row is None or "error" in row else row.get("median_s")


def failed(result) -> str | None:
    if result is None:
        return "not run"
    return result.get("error")


# ---------------------------------------------------------------------------------------
# targets


def _scan_floor(g: dict, peers: dict, diffrax_row: dict | None) -> list[str]:
    """T3b's bracketed floor (``peers.scan_floor_grad``) against ``diffrax_row``, also at
    jaxode's number of dopri5 steps on mlp-batch (its time per step times those steps)."""
    floor = g.get("JAX scan dopri5 floor")
    if med(floor) is None or med(diffrax_row) is None:
        return []
    text = f"(JAX's floor, {floor['method']}: {ratio(med(floor), med(diffrax_row)):.2f}x"
    forward = by_label((peers.get("mlp-batch") or {}).get("rows"))
    steps = (forward.get("jaxode dopri5") or {}).get("steps")
    if steps and floor.get("steps"):
        at_steps = med(floor) / floor["steps"] * steps
        text += f"; at jaxode's {steps} steps {ratio(at_steps, med(diffrax_row)):.2f}x"
    return [text + ")"]


def evaluate_targets(res: dict) -> list[tuple[str, str, str, str]]:
    out = []
    peers = (res.get("peers") or {}).get("forward", {})
    grads = res.get("gradients") or {}
    g = by_label(grads.get("rows"))
    gv = by_label(grads.get("vmap_rows"))
    over = res.get("overhead") or {}
    mem = (res.get("adjoint") or {}).get("memory") or []
    desc = dict(TARGETS)

    def verdict(ok):
        return "n/a" if ok is None else ("**pass**" if ok else "**miss**")

    # T1
    parts, oks = [], []
    for wl in ("spiral", "pendulum"):
        rows = by_label((peers.get(wl) or {}).get("rows"))
        ref = rows.get("jax odeint dopri5")
        if med(ref) is None:
            parts.append(f"{wl}: jax odeint not measured")
            continue
        wl_ok = False
        for s in ("dopri5", "tsit5"):
            j = rows.get(f"jaxode {s}")
            if med(j) is None:
                continue
            r = ratio(med(j), med(ref))
            acc = j["rms_error"] <= ref["rms_error"]
            wl_ok |= r <= 1.0 and acc
            parts.append(f"{wl} {s}: {r:.2f}x time, error {j['rms_error']:.1e} vs {ref['rms_error']:.1e}")
        oks.append(wl_ok)
    out.append(("T1", desc["T1"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T2a
    rows = by_label((over.get("mlp-batch") or {}).get("rows"))
    parts, oks = [], []
    for s in ("dopri5", "tsit5"):
        r = rows.get(f"jaxode {s}")
        if r:
            parts.append(f"{s}: {r['overhead_in_loop']:.2f}")
            oks.append(r["overhead_in_loop"] <= 1.1)
    d = [f"{s} {rows[f'diffrax {s}']['overhead_in_loop']:.2f}"
         for s in ("dopri5", "tsit5") if f"diffrax {s}" in rows]
    if d:
        parts.append("(diffrax: " + ", ".join(d) + ")")
    out.append(("T2a", desc["T2a"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T2b
    rows = by_label((peers.get("mlp-batch") or {}).get("rows"))
    parts, oks = [], []
    for s in ("dopri5", "tsit5"):
        j, d = rows.get(f"jaxode {s}"), rows.get(f"diffrax {s}")
        if j and d and "nfe" in j and "nfe" in d:
            parts.append(f"{s}: {j['nfe']} vs {d['nfe']} (steps {j.get('steps')} vs {d.get('steps')})")
            oks.append(j["nfe"] <= d["nfe"])
    out.append(("T2b", desc["T2b"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T3a / T3b
    pairs = (("T3a", "adjoint", "BacksolveAdjoint"), ("T3b", "checkpoint", "RecursiveCheckpointAdjoint"))
    for key, mine, theirs in pairs:
        parts, oks = [], []
        for s in ("dopri5", "tsit5"):
            j, d = g.get(f"jaxode {s} {mine}"), g.get(f"diffrax {s} {theirs}")
            if med(j) is None or med(d) is None:
                continue
            r = ratio(med(j), med(d))
            ej, ed = j.get("grad_error"), d.get("grad_error")
            acc = ej is not None and ed is not None and ej <= ed
            parts.append(f"{s}: {r:.2f}x ({ms(med(j))} vs {ms(med(d))} ms), error {sci(ej)} vs {sci(ed)}")
            oks.append(r <= 0.75 and acc)
        also = {"T3a": ("adjoint seminorm", "seminorm"), "T3b": ("backprop", "backprop")}[key]
        for s in ("dopri5", "tsit5"):
            j, d = g.get(f"jaxode {s} {also[0]}"), g.get(f"diffrax {s} {theirs}")
            if med(j) is not None and med(d) is not None:
                parts.append(f"({also[1]} {s}: {ratio(med(j), med(d)):.2f}x)")
        if key == "T3b":
            parts += _scan_floor(g, peers, g.get(f"diffrax dopri5 {theirs}"))
        out.append((key, desc[key], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T4
    parts, oks = [], []
    node = by_label(((res.get("traps") or {}).get("node") or {}).get("rows"))
    one = node.get("adjoint one state")
    r = ratio(med(node.get("adjoint vmap")), med(one))
    if r is not None:
        v = med(node["adjoint vmap"])
        parts.append(f"NeuralODE + filter_vmap: {r:.1f}x ({ms(v)} vs {ms(med(one))} ms)")
        oks.append(r <= 3.0)
    for s in ("dopri5", "tsit5"):
        v, b = gv.get(f"jaxode {s} adjoint vmap"), g.get(f"jaxode {s} adjoint")
        r = ratio(med(v), med(b))
        if r is not None:
            parts.append(f"mlp-batch {s}: {r:.1f}x ({ms(med(v))} vs {ms(med(b))} ms)")
            oks.append(r <= 3.0)
    extras = []
    for lab, name in (("adjoint batched=True", "batched=True"), ("checkpoint vmap", "checkpoint vmap"),
                      ("diffrax BacksolveAdjoint vmap", "diffrax BacksolveAdjoint vmap")):
        rr = ratio(med(node.get(lab)), med(one))
        if rr is not None:
            extras.append(f"{name} {rr:.1f}x")
    if extras:
        parts.append("(NeuralODE: " + ", ".join(extras) + ")")
    extras = []
    for s in ("dopri5", "tsit5"):
        v, b = gv.get(f"jaxode {s} adjoint batched=True"), g.get(f"jaxode {s} adjoint")
        if ratio(med(v), med(b)) is not None:
            extras.append(f"batched=True {s} {ratio(med(v), med(b)):.1f}x")
    v, b = gv.get("jaxode dopri5 checkpoint vmap"), g.get("jaxode dopri5 adjoint")
    if ratio(med(v), med(b)) is not None:
        extras.append(f"checkpoint vmap dopri5 {ratio(med(v), med(b)):.1f}x")
    dv, db = gv.get("diffrax dopri5 BacksolveAdjoint vmap"), g.get("diffrax dopri5 BacksolveAdjoint")
    if ratio(med(dv), med(db)) is not None:
        extras.append(f"diffrax BacksolveAdjoint vmap / its one state {ratio(med(dv), med(db)):.1f}x")
    if extras:
        parts.append("(mlp-batch: " + ", ".join(extras) + ")")
    out.append(("T4", desc["T4"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T5
    def mem_row(lib, mode, t1, seminorm=False):
        for r in mem:
            key = (r.get("library"), r.get("mode"), r.get("t1"), bool(r.get("seminorm")))
            if key == (lib, mode, t1, seminorm):
                return None if "error" in r else r
        return None

    ref = mem_row("jax odeint", "adjoint", 1.0)
    parts, oks = [], []
    if ref:
        for mode in ("adjoint", "backprop", "checkpoint", "reversible"):
            j = mem_row("jaxode", mode, 1.0)
            if j:
                parts.append(f"{mode}: {j['first_s']:.2f} s vs {ref['first_s']:.2f} s")
                oks.append(j["first_s"] <= ref["first_s"])
        for mode in ("backsolve", "recursive"):
            d = mem_row("diffrax", mode, 1.0)
            if d:
                parts.append(f"(diffrax {mode}: {d['first_s']:.2f} s)")
    out.append(("T5", desc["T5"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T6
    horizons = sorted({r.get("t1") for r in mem if r.get("library") == "jaxode"})
    parts, ok = [], None
    if horizons:
        t_max = horizons[-1]
        a, b = mem_row("jaxode", "adjoint", 1.0), mem_row("jaxode", "adjoint", t_max)
        if a and b and a.get("call_peak_mib") and b.get("call_peak_mib") is not None:
            r = b["call_peak_mib"] / a["call_peak_mib"]
            ok = r <= 1.2
            parts.append(f"call peak {b['call_peak_mib']:.1f} MiB at t1={t_max:g} vs "
                         f"{a['call_peak_mib']:.1f} MiB at t1=1: {r:.2f}x")
            if a.get("process_peak_mib") and b.get("process_peak_mib") is not None:
                parts.append(f"process peak (compile incl.) {b['process_peak_mib']:.0f} vs "
                             f"{a['process_peak_mib']:.0f} MiB")
    out.append(("T6", desc["T6"], "; ".join(parts) or "n/a", verdict(ok)))

    # T7
    traps = res.get("traps") or {}

    def spreads(key):
        rows = [r for r in (traps.get(key) or {}).get("rows") or [] if med(r) is not None]
        found = {}
        for pattern in ("vmap", "one state"):
            rs = sorted((r for r in rows if r["pattern"] == pattern), key=lambda r: r["max_steps"])
            if len(rs) > 1:
                times = [med(r) for r in rs]
                found[pattern] = (rs, times, max(times) / min(times))
        return found

    parts, oks = [], []
    kept = spreads("backprop_steps_malloc")
    for pattern, (rs, times, spread) in spreads("backprop_steps").items():
        parts.append(f"{pattern}: " + " / ".join(ms(t) for t in times) + " ms at max_steps "
                     + " / ".join(str(r["max_steps"]) for r in rs) + f" ({spread:.2f}x)")
        oks.append(spread <= 1.25)
    if kept:
        parts.append("(glibc's malloc keeping freed memory, `MALLOC_MMAP_THRESHOLD_` etc.: "
                     + ", ".join(f"{p} {' / '.join(ms(t) for t in times)} ms ({spread:.2f}x)"
                                 for p, (_, times, spread) in kept.items()) + ")")
    out.append(("T7", desc["T7"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))

    # T8
    parts, oks = [], []
    for wl, r in (traps.get("eager") or {}).items():
        if failed(r):
            continue
        rows = by_label(r.get("rows"))
        for what in ("odesolve", "jax.grad"):
            e, j = rows.get(f"eager {what}"), rows.get(f"jit {what}")
            rr = ratio(med(e), med(j))
            if rr is not None:
                parts.append(f"{wl} {what}: {rr:.2f}x ({ms(med(e))} vs {ms(med(j))} ms)")
                oks.append(rr <= 2.0)
        program = ratio(med(rows.get("jit odesolve, z0 and ts as arguments")), med(rows.get("jit odesolve")))
        if program is not None:
            parts.append(f"({wl}: the jitted solve with `z0`, `ts` as arguments, as the eager call runs it, "
                         f"{program:.2f}x the one with them as constants)")
        floor = rows.get("eager jax.grad of jax.jit(odesolve)")
        rr = ratio(med(floor), med(rows.get("jit jax.grad")))
        if rr is not None:
            parts.append(f"({wl}: JAX's floor, eager `jax.grad` of `jax.jit(odesolve)`, {rr:.2f}x)")
    out.append(("T8", desc["T8"], "; ".join(parts) or "n/a", verdict(all(oks) if oks else None)))
    return out


# ---------------------------------------------------------------------------------------
# sections


def section_machine(res: dict) -> str:
    m, v = res.get("machine", {}), res.get("versions", {})
    rows = [
        ["CPU", m.get("cpu", "?")],
        ["cores (logical)", num(m.get("cores"))],
        ["RAM", f"{m.get('ram_gib', '?')} GiB"],
        ["OS", f"{m.get('os', '?')} ({m.get('platform', '?')})"],
        ["Python", m.get("python", "?")],
        ["load average (1, 5, 15 min) at start", ", ".join(f"{x:.2f}" for x in m.get("loadavg", []))],
        ["load average at end", ", ".join(f"{x:.2f}" for x in m.get("loadavg_end", []))],
    ]
    vrows = [[k, val] for k, val in v.items()]
    return ("## Machine\n\n" + table(["", ""], rows) + "\n\n### Versions\n\n"
            + table(["package", "version"], vrows))


def section_adjoint(res: dict, cfg: dict) -> str:
    adj = res.get("adjoint")
    if not adj:
        return ""
    out = [f"## 1. Adjoint vs backprop (mlp-batch, dopri5, batch {cfg['batch']}, float32)\n"]
    grid = adj.get("grid") or {}
    if failed(grid):
        out.append(f"Grid failed: {failed(grid)}\n")
    else:
        out.append("Gradient of `mean(ys**2)` w.r.t. all weights, jitted `value_and_grad`, "
                   "rtol = atol = tol, `ts = linspace(0, t1, 11)`; one process, tolerances and `ts` "
                   "traced (no recompiles), so "
                   "*first call* is the compile + first run of each mode (the first case of its column). "
                   "Steps/NFE: jaxode's `info` (forward) and `adjoint_backward_info` (backward; for backprop "
                   "the reverse pass re-runs the forward steps). Gradient error: `|g - g_ref| / |g_ref|` "
                   "against the float64 reference at that horizon. From t1 = 4 a few trajectories grow "
                   "large and the problem becomes ill-conditioned: every float32 solve, at every "
                   "tolerance, is far from the reference there (final error in tolerances, gradient "
                   "error); nothing is asserted against the reference in this grid, but the "
                   "modes' losses are asserted equal (they share the forward solve).\n")
        rows = []
        for r in grid.get("rows", []):
            rows.append([
                f"{r['t1']:g}", f"{r['tol']:g}", r["label"], time_cell(r), sec(r.get("first_s")),
                f"{num(r.get('fwd_steps'))} / {num(r.get('fwd_nfe'))}",
                f"{num(r.get('bwd_steps'))} / {num(r.get('bwd_nfe'))}" if "bwd_steps" in r else "—",
                sci(r.get("grad_error")), num(r.get("final_scaled_error")), r.get("error", ""),
            ])
        out.append(table(["t1", "tol", "mode", "gradient ms (min–max)", "first call s", "fwd steps / NFE",
                          "bwd steps / NFE", "grad error", "final error (tols)", "error"], rows))
        out.append("\n![gradient time vs tolerance](time_vs_tolerance.png)\n"
                   "![gradient error vs tolerance](grad_error_vs_tolerance.png)\n")
    mem = adj.get("memory") or []
    if mem:
        out.append("### Peak memory and first call (a fresh process per case)\n")
        out.append("A jitted training step (`value_and_grad` + `optax.adam` update) at tol 1e-5. "
                   "*First call*: trace + compile + run in a fresh process (after a trivial jit warms up "
                   "the backend). "
                   "*Call peak*: VmHWM reset (`/proc/self/clear_refs`) just before a second, steady call, "
                   "minus the RSS then: memory the call itself adds. *Process peak*: `ru_maxrss` after the "
                   "first call minus the RSS after imports and data (compilation included).\n")
        rows = []
        for r in mem:
            mode = r.get("mode", "") + (" seminorm" if r.get("seminorm") else "")
            rows.append([
                r.get("library"), mode, f"{r.get('t1', 0):g}", sec(r.get("first_s")), ms(r.get("steady_s")),
                num(r.get("call_peak_mib")), num(r.get("process_peak_mib")),
                f"{num(r.get('fwd_steps'))} / {num(r.get('fwd_nfe'))}" if "fwd_steps" in r else "—",
                f"{num(r.get('bwd_steps'))} / {num(r.get('bwd_nfe'))}" if "bwd_steps" in r else "—",
                r.get("error", ""),
            ])
        out.append(table(["library", "mode", "t1", "first call s", "steady step ms", "call peak MiB",
                          "process peak MiB", "fwd steps / NFE", "bwd steps / NFE", "error"], rows))
        out.append("\n![peak memory vs horizon](memory_vs_horizon.png)\n")
    grads = res.get("gradients") or {}
    if grads.get("vmap_rows"):
        g = by_label(grads.get("rows"))
        out.append("### vmap (per-sample steps) vs batched (one state, one step size)\n")
        out.append("Same loss and weights; `jax.vmap` of the solve over the batch's initial conditions, "
                   "and jaxode's `batched=True` (the same per-sample steps, the parameter adjoints "
                   "summed over the batch inside one backward solve), against the batch solved as one "
                   "state.\n")
        rows = []
        for r in grads["vmap_rows"]:
            base = g.get(r["label"].replace(" vmap", "").replace(" batched=True", ""))
            rows.append([r["label"], time_cell(r), ms(med(base)), num(ratio(med(r), med(base))),
                         sec(r.get("first_s")), sci(r.get("grad_error")), r.get("error", "")])
        out.append(table(["case", "vmap ms (min–max)", "batched ms", "vmap / batched", "first call s",
                          "grad error", "error"], rows))
    return "\n".join(out)


def _same_tableau_jaxode(label: str) -> str:
    return "jaxode tsit5" if "tsit5" in label else "jaxode dopri5"


def section_peers(res: dict, cfg: dict) -> str:
    peers = (res.get("peers") or {}).get("forward")
    grads = res.get("gradients")
    if not peers and not grads:
        return ""
    out = ["## 2. Peers\n",
           "Every library solves the same problem (WORKLOADS.md): same weights, `z0`, `ts`, tolerances, "
           "outputs by its own dense interpolation, first step chosen by the library. Before anything is "
           "timed, each final state is checked against the scipy DOP853 reference: *final error* is the "
           "RMS over elements of `|y - y_ref| / (atol + rtol |y_ref|)` at the last output, asserted "
           "<= 1000 (a case that fails is reported and not timed). *x jaxode*: this row's steady time "
           "over jaxode's with the same tableau (dopri5 for RK45, LSODA and jax odeint), same process. "
           "NFE: evaluations counted by the field itself in a separate run (a `jax.debug.callback` for "
           "JAX libraries; a batched solve's evaluation of the whole batch counts once); scipy reports "
           "its own. *First call*: compile + first run, in a process shared with the other libraries. "
           "torch runs with as many threads as cores; its OpenMP threads suffer much more than XLA's "
           "from other processes on a shared machine, so its numbers are the least reliable here.\n"]
    for wl, res_wl in (peers or {}).items():
        out.append(f"### Forward: {wl}\n")
        if failed(res_wl):
            out.append(f"failed: {failed(res_wl)}\n")
            continue
        rows_by = by_label(res_wl["rows"])
        rows = []
        for r in res_wl["rows"]:
            base = rows_by.get(_same_tableau_jaxode(r["label"]))
            rows.append([
                r["label"], time_cell(r), num(ratio(med(r), med(base))), sec(r.get("first_s")),
                num(r.get("nfe")), num(r.get("steps")), sci(r.get("rms_error")),
                num(r.get("final_scaled_error")),
                r.get("note", "") + (" " + r["error"] if "error" in r else ""),
            ])
        out.append(table(["library / method", "steady ms (min–max)", "x jaxode", "first call s", "NFE",
                          "steps", "RMS error of ys", "final error (tols)", "notes"], rows))
        out.append("")
    if grads:
        out.append(f"### Gradients: mlp-batch (batch {cfg['batch']}, float32, rtol = atol = 1e-5)\n")
        if failed(grads):
            out.append(f"failed: {failed(grads)}\n")
        else:
            out.append("`value_and_grad` of `mean(ys**2)` w.r.t. the six weight arrays (torchdiffeq: "
                       "`loss.backward()`). *f evals*: all evaluations of the field in one gradient call "
                       "(forward + backward, recomputation included; a vjp of f counts as one). *x jaxode*: "
                       "this row's time over the jaxode row with the same tableau and gradient kind "
                       "(adjoint for adjoint methods, checkpoint for the others).\n")
            rows_by = by_label(grads["rows"])
            rows = []
            for r in grads["rows"]:
                lab = r["label"]
                kind = "adjoint" if "adjoint" in lab.lower() and "Recursive" not in lab else "checkpoint"
                tab = "tsit5" if "tsit5" in r["label"] else "dopri5"
                base = rows_by.get(f"jaxode {tab} {kind}")
                rows.append([
                    r["label"], time_cell(r), num(ratio(med(r), med(base))), sec(r.get("first_s")),
                    num(r.get("nfe")), sci(r.get("grad_error")), num(r.get("final_scaled_error")),
                    r.get("error", ""),
                ])
            out.append(table(["library / method", "gradient ms (min–max)", "x jaxode", "first call s",
                              "f evals", "grad error", "final error (tols)", "error"], rows))
        out.append("\n![peers](peers_forward.png)\n")
    return "\n".join(out)


def section_overhead(res: dict) -> str:
    over = res.get("overhead")
    if not over:
        return ""
    out = ["## 3. Overhead\n",
           "Steady solve time / (NFE x time of one evaluation of f), measured in the same process with the "
           "same shapes. *f in loop*: the cost of one evaluation inside a compiled `fori_loop` of 1000 "
           "dependent evaluations (the basis of the target); *f single*: one jitted call, dispatch "
           "included. Overhead 1.0 = the solver costs nothing beyond its field evaluations.\n"]
    rows = []
    for wl, r in over.items():
        if failed(r):
            rows.append([wl, "failed", failed(r)] + [""] * 5)
            continue
        fe = r["f_eval"]
        for row in r["rows"]:
            rows.append([wl, row["label"], time_cell(row), num(row["nfe"]), f"{fe['in_loop_s'] * 1e6:.3g}",
                         f"{fe['single_s'] * 1e6:.3g}", f"{row['overhead_in_loop']:.2f}",
                         f"{row['overhead_single']:.2f}"])
    out.append(table(["workload", "solve", "solve ms (min–max)", "NFE", "f in loop µs", "f single µs",
                      "overhead (in loop)", "overhead (single)"], rows))
    return "\n".join(out)


def section_traps(res: dict) -> str:
    traps = res.get("traps")
    if not traps:
        return ""
    out = ["## 4. Speed traps: the patterns users write (issue 12)\n"]
    node = traps.get("node") or {}
    out.append(f"### NeuralODE + `eqx.filter_vmap` (the README's pattern), batch {node.get('batch', 128)}\n")
    if failed(node):
        out.append(f"failed: {failed(node)}\n")
    elif node:
        out.append("`MLPField(2, width=64, depth=2)` in a `NeuralODE` (tsit5, rtol 1e-3, atol 1e-4, 20 "
                   "outputs in [0, 1]), float32; `eqx.filter_jit(eqx.filter_value_and_grad(loss))` of "
                   "the MSE to `z0 exp(-t)` over the batch. *vmap*: `eqx.filter_vmap(model)(z0s)` (per-"
                   "sample steps; for the adjoint, `jax.grad` of it runs one backward solve with a shared "
                   "parameter adjoint); *batched=True*: `NeuralODE(..., batched=True)(z0s)`; *one state*: "
                   "`model(z0s)`, one step size for the batch; diffrax: `jax.vmap` of `diffeqsolve` with "
                   "`Tsit5`, `PIDController`, `BacksolveAdjoint`, the same field. *grad diff*: "
                   "`|g - g_ref| / |g_ref|` against a one-state `checkpoint` gradient at rtol = atol = "
                   "1e-6.\n")
        rows_by = by_label(node.get("rows"))
        one = rows_by.get("adjoint one state")
        rows = [[r["label"], time_cell(r), num(ratio(med(r), med(one))), sec(r.get("first_s")),
                 sci(r.get("grad_diff")), r.get("error", "")] for r in node.get("rows") or []]
        out.append(table(["case", "gradient ms (min–max)", "x one state", "first call s", "grad diff",
                          "error"], rows))
        out.append("")
    bp = traps.get("backprop_steps") or {}
    if bp:
        out.append(f"### `gradient=\"backprop\"` vs max_steps (mlp-batch, dopri5, batch {bp.get('batch')})\n")
        if failed(bp):
            out.append(f"failed: {failed(bp)}\n")
        else:
            out.append("The same solve (same steps taken) at each `max_steps`: *vmap* is `jax.vmap` of the "
                       "solve over the samples (per-sample steps), *one state* the batch as one ODE. "
                       "The gradients at every `max_steps` are asserted equal (*diff*: against the first "
                       "`max_steps`).\n")
            rows = [[r["label"], time_cell(r), sec(r.get("first_s")), sci(r.get("grad_diff_vs_first")),
                     r.get("error", "")] for r in bp.get("rows") or []]
            out.append(table(["case", "gradient ms (min–max)", "first call s", "diff", "error"], rows))
            out.append("")
    eager = traps.get("eager") or {}
    if eager:
        out.append("### Eager calls vs `jax.jit`\n")
        out.append("`odesolve(f, z0, ts, p, solver=\"dopri5\")` and `jax.grad` of `mean(ys**2)` w.r.t. "
                   "`p`, called outside any `jax.jit` with the same `f` object each time, against the same "
                   "functions under `jax.jit`. An eager `odesolve` runs a compiled solve from a cache "
                   "(`equinox.filter_jit`) keyed on `f` and the non-array parts of `params` (by hash: a "
                   "function by its identity), the shapes and dtypes of the arrays (`z0`, `ts`, `params`, "
                   "the arrays of an Equinox-module `f`) and the static options; tolerances are traced. "
                   "So a fresh `lambda` per call compiles again (*fresh lambda*). An eager `jax.grad` "
                   "re-traces the loss and the solve's differentiation rules in Python at every call "
                   "(JAX does not cache an un-jitted transformation); the compiled pieces are reused.\n")
        rows = []
        for wl, r in eager.items():
            if failed(r):
                rows.append([wl, "failed", failed(r), "", "", "", ""])
                continue
            rows_by = by_label(r.get("rows"))
            for row in r.get("rows") or []:
                what = row["label"].split(" ", 1)[1]
                jit = rows_by.get(f"jit {what}")
                rows.append([wl, row["label"], sec(row.get("first_s")), ms(row.get("second_s")),
                             time_cell(row), num(ratio(med(row), med(jit))), ""])
            rows.append([wl, "eager odesolve, fresh lambda", sec(r.get("fresh_lambda_s")), "", "", "",
                         "compiles again"])
        out.append(table(["workload", "call", "first call s", "second call ms", "steady ms (min–max)",
                          "x jit", "note"], rows))
    return "\n".join(out)


def write(res: dict, path: str) -> None:
    cfg = res.get("config", {"batch": 256})
    lines = ["# jaxode benchmark results\n",
             f"`{res.get('command', 'benchmarks/run.py')}` — started {res.get('started', '?')}, "
             f"{res.get('wall_s', 0):.0f} s wall. Configuration: {cfg}.\n"]
    if cfg.get("quick"):
        lines.append("**Quick smoke run**: batch 64, 1 repeat, fewer cases; not for comparison.\n")
    m = res.get("machine", {})
    start, end = (m.get("loadavg") or [0])[0], (m.get("loadavg_end") or [0])[0]
    # the run itself keeps about one core busy: the end load counts it
    if m.get("cores") and (start > 0.5 * m["cores"] or end > m["cores"]):
        lines.append(f"**Noisy machine**: the load average was {start:.1f} at the start and {end:.1f} at "
                     f"the end on {m['cores']} cores (other work was running): timings are indicative "
                     "only; re-run on a quiet machine.\n")
    lines.append("Times: median over the repeats (min–max in brackets), steady state: after a warm-up call, "
                 "`block_until_ready`; calls under 0.1 s are looped and averaged per sample; calls over 1 s "
                 "get at most 2 samples.\n")
    lines.append(section_machine(res))
    lines.append("\n## Targets\n")
    targets = evaluate_targets(res)
    lines.append(table(["", "target", "measured", "result"], [list(t) for t in targets]))
    missed = [key for key, _, _, verdict in targets if verdict == "**miss**" and key in CAUSES]
    if missed:
        lines.append("\n### Misses: what the profile shows\n")
        lines.extend(f"* **{key}**: {CAUSES[key]}" for key in missed)
    lines.append("")
    for sec_text in (section_adjoint(res, cfg), section_peers(res, cfg), section_overhead(res),
                     section_traps(res)):
        if sec_text:
            lines.append(sec_text)
            lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    try:
        plots(res, os.path.dirname(os.path.abspath(path)))
    except Exception as e:  # a plot must not lose the report
        print(f"plots failed: {e!r}")


# ---------------------------------------------------------------------------------------
# plots


def plots(res: dict, outdir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adj = res.get("adjoint") or {}
    mem = [r for r in adj.get("memory") or [] if "error" not in r]
    if mem:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        keys = sorted({(r["library"], r["mode"], bool(r.get("seminorm"))) for r in mem})
        for key in keys:
            rs = sorted((r for r in mem if (r["library"], r["mode"], bool(r.get("seminorm"))) == key),
                        key=lambda r: r["t1"])
            label = f"{key[0]} {key[1]}" + (" seminorm" if key[2] else "")
            for ax, field in zip(axes, ("call_peak_mib", "process_peak_mib"), strict=True):
                pts = [(r["t1"], max(r[field], 0.1)) for r in rs if r.get(field) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        for ax, title in zip(axes, ("peak RSS added by one steady call", "process peak (compile incl.)"),
                             strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("t1")
            ax.set_ylabel("MiB")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("mlp-batch gradient step: memory vs horizon")
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "memory_vs_horizon.png"), dpi=100)
        plt.close(fig)

    grid = [r for r in (adj.get("grid") or {}).get("rows", []) if "error" not in r]
    if grid:
        labels = list(dict.fromkeys(r["label"] for r in grid))
        for field, name, ylabel in (("median_s", "time_vs_tolerance.png", "gradient time (s)"),
                                    ("grad_error", "grad_error_vs_tolerance.png", "|g - g_ref| / |g_ref|")):
            horizons = sorted({r["t1"] for r in grid if r.get(field) is not None})
            if not horizons:
                continue
            fig, axes = plt.subplots(1, len(horizons), figsize=(4 * len(horizons), 3.6), squeeze=False)
            for ax, t1 in zip(axes[0], horizons, strict=True):
                for label in labels:
                    pts = sorted((r["tol"], r[field]) for r in grid
                                 if r["t1"] == t1 and r["label"] == label and r.get(field) is not None)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", label=f"jaxode {label}")
                if field == "grad_error" and t1 == 1.0:
                    g = (res.get("gradients") or {}).get("rows") or []
                    for r in g:
                        peer = r.get("library") in ("diffrax", "jax odeint", "torchdiffeq")
                        if peer and r.get("grad_error") and "dopri5" in r["label"]:
                                ax.plot([1e-5], [r["grad_error"]], marker="x", linestyle="", label=r["label"])
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.invert_xaxis()
                ax.set_xlabel("rtol = atol")
                ax.set_ylabel(ylabel)
                ax.set_title(f"t1 = {t1:g}")
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=6)
            fig.suptitle(f"mlp-batch dopri5: {ylabel} vs tolerance")
            fig.tight_layout()
            fig.savefig(os.path.join(outdir, name), dpi=100)
            plt.close(fig)

    peers = (res.get("peers") or {}).get("forward") or {}
    ok = {wl: [r for r in (v.get("rows") or []) if med(r) is not None]
          for wl, v in peers.items() if not failed(v)}
    ok = {k: v for k, v in ok.items() if v}
    if ok:
        fig, axes = plt.subplots(1, len(ok), figsize=(5 * len(ok), 3.8), squeeze=False)
        for ax, (wl, rows) in zip(axes[0], ok.items(), strict=True):
            ax.barh([r["label"] for r in rows], [r["median_s"] * 1e3 for r in rows],
                    color=["tab:blue" if r["library"] == "jaxode" else "tab:gray" for r in rows])
            ax.set_xscale("log")
            ax.set_xlabel("steady time (ms)")
            ax.set_title(wl)
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle("forward solve, steady state")
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "peers_forward.png"), dpi=100)
        plt.close(fig)
