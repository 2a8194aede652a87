"""Where the first call of a jitted training step goes: trace, lowering and XLA compile, per mode.

    python benchmarks/compile_profile.py [--cases adjoint,backprop,...] [--repeats 2]

The step is ``run.py``'s memory-suite training step on mlp-batch (batch 256, t1 = 1, dopri5,
rtol = atol = 1e-5, ``value_and_grad`` + ``optax.adam``). For each case, in this one process
(each case's functions are fresh, so nothing is reused from a previous case except JAX's
own warm caches of primitives; every case is run ``--repeats`` times in rotation and the
minimum is kept): ``jax.jit(step).trace`` (Python tracing), ``.lower`` (to StableHLO),
``.compile`` (XLA: HLO passes and LLVM code generation), and the size of the program: StableHLO
operations before XLA, HLO instructions after its optimisation, ``while`` loops,
``conditional``s, fusions, custom calls (host callbacks: the failure checks).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as W  # noqa: E402


def _step(case: str):
    """``(train_step, (params, opt_state))`` for one case."""
    import jax
    import jax.numpy as jnp
    import optax
    import peers as P

    import jaxode

    w = W.mlp_batch(W.MLP_BATCH, 1.0)
    z0, ts, params = P.jax_data(w)
    tol = jnp.asarray(w.rtol, jnp.float32)
    lib, _, mode = case.partition(" ")
    if lib == "jaxode" and mode.endswith("throw=False"):
        mode = mode.split()[0]

        def vg(p):
            def loss(p):
                ys = jaxode.odesolve(w.f, z0, ts, p, solver="dopri5", rtol=tol, atol=tol, gradient=mode,
                                     max_steps=P.MAX_STEPS, throw=False)
                return W.mlp_loss(ys), ys

            return jax.value_and_grad(loss, has_aux=True)(p)
    elif lib == "jaxode":
        fn = P.jaxode_grad_fn(w.f, "dopri5", mode)
        vg = lambda p: fn(p, z0, ts, tol, tol)  # noqa: E731
    elif lib == "diffrax":
        fn = P.diffrax_grad_fn(w.f, "dopri5", mode, w.rtol, w.atol)
        vg = lambda p: fn(p, z0, ts)  # noqa: E731
    else:
        fn = P.jax_odeint_grad_fn(w.f, w.rtol, w.atol)
        vg = lambda p: fn(p, z0, ts)  # noqa: E731
    opt = optax.adam(1e-3)

    def train_step(p, state):
        (loss, _), grads = vg(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    return train_step, (params, opt.init(params))


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def profile(case: str) -> dict:
    import jax

    step, args = _step(case)
    t0 = time.perf_counter()
    traced = jax.jit(step).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t4 = time.perf_counter()
    shlo, hlo = lowered.as_text(), compiled.as_text()
    return {
        "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "run_s": t4 - t3,
        "stablehlo_ops": _count(r"^\s*(%\S+ = |\"?stablehlo\.|func\.return)", shlo),
        "hlo_instructions": _count(r"^\s+(ROOT )?%?\S+ = ", hlo),
        "while": _count(r"= .*\bwhile\(", hlo),
        "conditional": _count(r"= .*\bconditional\(", hlo),
        "fusion": _count(r"= .*\bfusion\(", hlo),
        "custom_call": _count(r"= .*\bcustom-call\(", hlo),
        "dot": _count(r"= .*\bdot\(", hlo),
        "loops": loops(hlo),
    }


def loops(hlo: str) -> list[tuple[str, int]]:
    """The top-level ``while`` loops of the entry computation of optimised HLO text, each with the
    number of HLO instructions reachable from its body and condition (nested loops, fusions
    and branches included; each computation counted once per loop), largest first."""
    comps, name, entry = {}, None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            name = m.group(2)
            comps[name] = []
            if m.group(1):
                entry = name
        elif name is not None and re.match(r"^\s+(ROOT )?%?\S+ = ", line):
            comps[name].append(line)

    def callees(lines):
        refs = []
        for ln in lines:
            refs += re.findall(r"(?:body|condition|calls|to_apply|true_computation|false_computation)"
                               r"=%?([\w.\-]+)", ln)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", ln):
                refs += [x.strip().lstrip("%") for x in group.split(",")]
        return [r for r in refs if r in comps]

    def size(root):
        seen, todo, total = set(), [root], 0
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            total += len(comps[c])
            todo += callees(comps[c])
        return total

    out = []
    for ln in comps.get(entry, []):
        if re.search(r"\bwhile\(", ln):
            out.append((ln.split("=")[0].strip(), sum(size(c) for c in callees([ln]))))
    return sorted(out, key=lambda x: -x[1])


CASES = ["jax odeint", "jaxode adjoint", "jaxode adjoint throw=False", "jaxode backprop",
         "jaxode checkpoint", "jaxode checkpoint throw=False", "jaxode reversible",
         "diffrax backsolve", "diffrax recursive"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(4)))
    cases = args.cases.split(",")
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for case in cases:
            r = profile(case)
            key = "compile_s"
            if case not in best or r[key] < best[case][key]:
                best[case] = r
            print(f"  {case}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in r.items() if k != "loops")
                  + f", loops {[n for _, n in r['loops']]}", file=sys.stderr, flush=True)
    cols = ["trace_s", "lower_s", "compile_s", "run_s", "stablehlo_ops", "hlo_instructions", "while",
            "conditional", "fusion", "custom_call", "dot"]
    print("| case | " + " | ".join(cols) + " | top-level loops (HLO instructions) |")
    print("|---" * (len(cols) + 2) + "|")
    for case, r in best.items():
        print(f"| {case} | " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                          for c in cols)
              + " | " + ", ".join(str(n) for _, n in r["loops"]) + " |")


if __name__ == "__main__":
    main()
