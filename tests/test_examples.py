"""Each example runs in its --quick mode, writes its PNG and delivers what it claims.

The examples are scripts (``examples/NAME.py``), imported here by path; each exposes
``main(argv) -> dict`` with the numbers it prints.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.append(EXAMPLES)  # the examples import their sibling ``_common``, as when run as scripts


def load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Equinox modules (dataclasses) look their module up there
    spec.loader.exec_module(module)
    return module


def run_quick(name, tmp_path, module=None):
    out = tmp_path / "sub" / f"{name}.png"  # a directory that does not exist yet
    result = (module or load(name)).main(["--quick", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 1000
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["out"] == str(out)
    return result


def test_pendulum_matches_odeint(tmp_path):
    """The reported nfe is the number of evaluations of the field the solve really made
    (counted by a callback inside it, which runs once per evaluation executed)."""
    module = load("pendulum")
    field, calls = module.pendulum, []

    def counted(y, t, params):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return field(y, t, params)

    module.pendulum = counted
    r = run_quick("pendulum", tmp_path, module)
    jax.effects_barrier()
    assert r["dtype"] == "float64"
    assert r["max_abs_diff"] < 1e-6
    assert r["nfe"] == len(calls) and r["num_steps"] > 0


def test_spiral_loss_falls_tenfold(tmp_path):
    r = run_quick("spiral", tmp_path)
    assert r["final_loss"] * 10 <= r["initial_loss"], r


def test_resnet_and_odenet_beat_chance(tmp_path):
    r = run_quick("resnet_vs_odenet", tmp_path)
    for model in ("resnet", "odenet"):
        assert r[model]["test_accuracy"] > 2 * r["chance"], (model, r[model])
        assert r[model]["params"] > 0
    assert r["resnet"]["nfe"] == 6  # K blocks
    assert r["odenet"]["nfe"] > 6  # adaptive tsit5: at least one step of 6 stages + first-step choice
    # the ODE-Net's field has one block's architecture (plus the time input): fewer parameters
    assert r["odenet"]["params"] < r["resnet"]["params"]


def test_euler_error_is_first_order(tmp_path):
    r = run_quick("euler_is_a_resnet", tmp_path)
    assert 0.7 <= r["slope"] <= 1.3, r["slope"]
    errors = r["errors"]
    assert all(b < a for a, b in zip(errors, errors[1:]))  # falls with h
    assert r["resnet_vs_euler"] < 1e-12  # Euler's steps are the residual blocks
    assert r["final_loss"] < r["initial_loss"]


@pytest.mark.slow
def test_stiff_kinetics_recovers_rates(tmp_path):
    """Robertson's rate constants, started 10x off, are fitted through rodas5p's adjoint; the
    identifiability the example claims holds; tsit5 runs out of max_steps."""
    r = run_quick("stiff_kinetics", tmp_path)
    assert r["final_loss"] * 100 < r["initial_loss"], (r["initial_loss"], r["final_loss"])
    start_off = np.abs(np.log(r["k_start"] / r["k_true"]))  # log 10 each
    fit_off = np.abs(np.log(r["k_fit"] / r["k_true"]))
    assert np.all(fit_off < 0.2 * start_off), r["k_fit"]  # each within 1.6x of the truth, from 10x
    assert np.all(r["rel_std"] < 0.05), r["rel_std"]  # weighted: all three identified
    # unweighted: only k2/k3^2 is identified (log k2, log k3 free along one perfectly correlated line)
    assert r["rel_std_unweighted"][1] > 10 and r["rel_std_unweighted"][2] > 5, r["rel_std_unweighted"]
    assert r["corr_unweighted"][1, 2] > 0.999
    tsit5 = r["tsit5"]
    assert tsit5["status"] == 1 and tsit5["final_time"] < 1e3, tsit5  # max_steps, far from t = 1e5
    assert 0 < r["rodas5p_steps"] < 1000


@pytest.mark.slow  # ~45 s of compilation and training on 2 cores
def test_cnf_toy_learns_a_normalised_density(tmp_path):
    r = run_quick("cnf_toy", tmp_path)
    for name in ("plain", "regularised"):
        m = r[name]
        assert m["nll"] < r["initial_nll"] - 0.5, (name, m["nll"], r["initial_nll"])  # it learns
        # a normalised model cannot beat the true density (held-out NLL >= entropy, up to noise)
        assert m["nll"] > r["true_nll"] - 0.05, (name, m["nll"], r["true_nll"])
        assert m["gap"] == pytest.approx(m["nll"] - r["true_nll"])
        assert m["nfe_per_step"] > 7  # adaptive tsit5 with the trace: more than one step
        losses = r["loss_history"][name]
        assert sum(losses[-10:]) < sum(losses[:10]), name
    assert 2.7 < r["true_nll"] < 3.0  # ≈ log 8 + 1 + log(2π σ²) = 2.84 for separated modes


@pytest.mark.slow  # ~50 s on 2 cores
def test_latent_ode_and_rnn_losses_fall(tmp_path):
    r = run_quick("latent_ode", tmp_path)
    assert list(r["results"]) == [30]
    m = r["results"][30]
    for model in ("latent_ode", "rnn"):
        losses = m[f"{model}_loss"]
        assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), model
        assert 0 < m[f"{model}_rmse"] < 10, (model, m)
    assert 0 < m["latent_ode_recon_rmse"] < 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pendulum", "spiral", "resnet_vs_odenet", "euler_is_a_resnet",
                                  "cnf_toy", "latent_ode", "stiff_kinetics"])
def test_example_runs_as_a_script_at_default_size(name, tmp_path):
    out = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 1000
    assert "wrote" in proc.stdout


@pytest.mark.slow  # ~20 s alone, ~60 s on 2 busy cores
def test_bouncing_ball_learns_gravity_and_restitution_and_aims(tmp_path):
    r = run_quick("bouncing_ball", tmp_path)
    assert r["num_events"] == 3 and r["bounce_times_error"] < 1e-9  # the geometric series in e
    assert r["final_loss"] < r["initial_loss"] / 100
    assert abs(r["g"] / r["g_true"] - 1) < 0.05 and abs(r["e"] / r["e_true"] - 1) < 0.05
    assert r["miss"] < 1e-6  # Newton's method through the terminal event's derivative
