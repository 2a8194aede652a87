"""Shared helpers for the forward-solver tests: float64, reference solutions, evaluation recorders."""

from __future__ import annotations

import os
import re
import subprocess
import sys

# Compiling is most of the suite's time (XLA's backend compiles: about 1,030 of its 1,750
# CPU-seconds on a 2-core Intel Xeon), and the tests check what the library computes, not what
# XLA makes of it. So, unless JAX_DISABLE_MOST_OPTIMIZATIONS is set (=0: compile as a user's
# program is compiled), the suite compiles without most of XLA's optimisations (about a quarter
# less wall time); the tests that measure the compiled code itself ask for them (`optimized`).
# The default selection (`-m 'not slow'`) also compiles with XLA's CPU loop emitters instead of
# its newer MLIR fusion emitters (`pytest_configure`), which halves the backend compile: the
# default run took 8 min 0 s instead of 14 min 31 s on that machine. They compute the same
# operations, but two different programs that share a computation (``batched=True`` and
# ``jax.vmap``, say) may then round it differently in the last bits: the default run's tests of
# such equalities use ``assert_same_computation``. `-m slow` keeps XLA's default emitters: some
# of its tests assert more such equalities, where a last-bit difference can grow (a checkpoint
# gradient whose segments are recomputed by another program than the forward's steps: 1.9e-7
# from backprop's under the loop emitters, equal bit for bit under the default ones).
FAST_COMPILE = "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ
_LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA knows ``flag`` (it aborts the process on an unknown one)."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}", JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=300)
    return probe.returncode == 0


def pytest_configure(config):
    """The loop emitters for the default selection, set before JAX starts its backend (collection
    comes later) by the main process only: pytest-xdist's workers, spawned after this, and the
    tests' subprocesses inherit its ``XLA_FLAGS``."""
    flags = os.environ.get("XLA_FLAGS", "")
    default_selection = config.option.markexpr.strip() == "not slow"
    if os.environ.get("PYTEST_XDIST_WORKER") or not (FAST_COMPILE and default_selection):
        return
    if "xla_cpu_use_fusion_emitters" not in flags and _xla_accepts(_LOOP_EMITTERS):
        os.environ["XLA_FLAGS"] = f"{flags} {_LOOP_EMITTERS}".strip()


def loop_emitters() -> bool:
    """Whether this run compiles with XLA's CPU loop emitters."""
    return _LOOP_EMITTERS in os.environ.get("XLA_FLAGS", "")


import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
if FAST_COMPILE:
    jax.config.update("jax_disable_most_optimizations", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

FIXED_SOLVERS = ("euler", "midpoint", "heun", "rk4")
ADAPTIVE_SOLVERS = ("bosh3", "dopri5", "tsit5", "dopri8")
FIXED_ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
STAGES = {"bosh3": 4, "dopri5": 7, "tsit5": 7, "dopri8": 13}
FSAL = {"euler": False, "midpoint": False, "heun": False, "rk4": False,
        "bosh3": True, "dopri5": True, "tsit5": True, "dopri8": True}


@pytest.fixture(scope="module")
def optimized():
    """XLA's optimisations on for the module's tests (costs of the compiled code)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def reference(fun, y0, ts, rtol=1e-13, atol=1e-14):
    """An independent high-accuracy solution: scipy's DOP853, ``fun(t, y)`` in numpy."""
    ts = np.asarray(ts, dtype=np.float64)
    sol = solve_ivp(fun, (ts[0], ts[-1]), np.asarray(y0, dtype=np.float64), method="DOP853",
                    t_eval=ts, rtol=rtol, atol=atol)
    assert sol.success, sol.message
    return sol.y.T


def logistic_exact(t, y0=0.1, r=1.0):
    """The solution of ``y' = r y (1 - y)``, ``y(0) = y0``."""
    return 1.0 / (1.0 + (1.0 / y0 - 1.0) * np.exp(-r * np.asarray(t)))


def assert_same_computation(actual, desired, rtol: float = 1e-13):
    """Two programs that perform the same floating-point operations on the same inputs give the
    same bits under XLA's default CPU code generation: asserted exactly. Under the suite's loop
    emitters (``loop_emitters()``) each program is vectorised on its own and may round in the last
    bits, so there it asserts agreement to ``rtol`` (relative, elementwise)."""
    if loop_emitters():
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=0)
    else:
        np.testing.assert_array_equal(actual, desired)


def failure_cause(exc: BaseException) -> str:
    """The library's own message (the ``jaxode: ...`` line) out of a raised runtime error."""
    m = re.search(r"jaxode:[^\n]*", str(exc))
    assert m is not None, f"no jaxode message in the error: {exc}"
    return m.group(0)


class Recorder:
    """Records the times at which a vector field is really evaluated (a side effect, so it
    counts executions of the compiled program, not traces)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, t):
        self.times.append(float(t))

    def record(self, t):
        """Call inside ``f``: ``recorder.record(t)``."""
        jax.debug.callback(self, t, ordered=True)

    def clear(self):
        self.times = []

    def collect(self) -> np.ndarray:
        jax.effects_barrier()
        return np.asarray(self.times)


@pytest.fixture
def recorder():
    return Recorder()


# Parametrized cases that repeat, at several times the cost, what a sibling case in the default
# run already checks (another gradient mode, solver or size): kept for ``-m slow``, so that the
# default suite stays under 10 minutes on 2 cores (measured by a timed run of the whole suite).
SLOW_CASES = {
    "tests/test_nn.py::test_neural_ode_gradients_equal_direct_odesolve[backprop]",
    "tests/test_nn.py::test_filter_jit_grad_optax_reduces_loss[backprop]",
    "tests/test_batched.py::test_mixed_precision_parameters[checkpoint]",
    "tests/test_batched.py::test_mixed_precision_parameters[backprop]",
    "tests/test_batched.py::test_mixed_precision_parameters[adjoint-batched]",
    "tests/test_adjoint.py::test_adjoint_converges_to_backprop[bosh3]",
    "tests/test_gradient_failures.py::test_grad_of_grad[checkpoint]",
    "tests/test_gradient_failures.py::test_grad_of_grad[backprop]",
    "tests/test_gradient_failures.py::test_hessian[checkpoint]",
    "tests/test_gradient_failures.py::test_throw_under_vmap_of_grad[checkpoint]",
    "tests/test_gradient_failures.py::test_failed_solve_without_throw_has_nan_gradients[backprop-4096]",
    "tests/test_esdirk.py::test_newton_iterations_are_not_differentiated[kvaerno5]",
    "tests/test_esdirk.py::test_gradients_match_finite_differences[kvaerno5-backprop]",
    "tests/test_rosenbrock.py::test_gradient_against_finite_differences[rosenbrock23-backprop]",
    "tests/test_while_loops.py::test_checkpoint_mode_equals_backprop[dopri5]",  # [rk4] stays
    "tests/test_while_loops.py::test_optax_training_step_fits_a_decay_rate[backprop]",  # [adjoint] stays
}
SLOW_TESTS_EVENTS = {  # closed forms through the interpolating adjoint; the pendulum test stays
    "tests/test_events.py::test_interpolating_adjoint_across_resets",
    "tests/test_events.py::test_interpolating_adjoint_gives_the_falling_balls_impact_derivatives",
}
SLOW_BUDGET = {  # the default suite reached 9 min 48 s on a clean clone: costly tests whose
    # property a cheaper default test also pins down (named above each)
    # test_gradient_failures.py::test_grad_of_grad[adjoint]
    "tests/test_while_loops.py::test_hessian_vector_product_of_linear_ode",
    # test_events.py::test_falling_ball_forward_mode_and_second_derivatives
    "tests/test_while_loops.py::test_forward_mode_matches_reverse_mode_and_finite_differences",
    # test_event_costs.py (checkpoint mode under vmap), test_checkpoint_mode_equals_backprop[rk4]
    "tests/test_while_loops.py::test_checkpoint_mode_under_vmap_with_closures_and_pytrees",
    # its [adjoint] and [backprop] cases
    "tests/test_step_control_options.py::test_final_time_on_success_and_failure[checkpoint]",
    "tests/test_events.py::test_falling_ball_impact_time_and_its_derivatives[checkpoint]",
    # its [20.0] case (both paths)
    "tests/test_interpolated_adjoint.py::test_one_resolve_per_interval_equals_the_segmented_backward[1.5]",
    # test_events.py::test_interpolating_adjoint_reads_the_state_before_each_reset (tsit5, interpolating)
    "tests/test_interpolated_adjoint.py::test_gradients_match_backprop[tsit5]",
    # its [rodas5p] case
    "tests/test_interpolated_adjoint.py::test_stiff_method_adjoint_is_the_interpolating_one[kvaerno5]",
}
_REV = "tests/test_reversible_events.py::"
SLOW_REVERSIBLE_EVENTS = {  # each property keeps a default case: the terminal event adaptive, the
    # updates fixed-step (finite differences); closed forms fixed-step; memory: test_reversible.py's
    # flat memory without events
    *(f"{_REV}test_gradient_is_derivative_of_the_reversible_solve[{case}-{wrt}]"
      for case in ("falling-fixed", "bouncing-adaptive") for wrt in ("z0", "ts", "params")),
    f"{_REV}test_falling_ball_impact_time_state_and_derivatives[adaptive]",
    f"{_REV}test_bouncing_ball_heights_bounce_times_and_gradients[adaptive]",
    f"{_REV}test_memory_with_a_terminal_event_does_not_grow_with_the_steps",
    f"{_REV}test_events_fire_as_intended",
    f"{_REV}test_gradient_backwards_in_time[bouncing]",  # test_reversible.py's backwards test stays
}
SLOW_BUDGET_2 = {  # the clean-clone default run reached ~10 min with this session's tests
    # its [adjoint] and [backprop] cases; test_gradients_match_finite_differences[checkpoint]
    "tests/test_events.py::test_bouncing_ball_heights_bounce_times_and_gradients[checkpoint]",
    # its [adjoint] case; test_gradients_match_finite_differences[backprop]
    "tests/test_events.py::test_falling_ball_impact_time_and_its_derivatives[backprop]",
    # test_events.py::test_falling_ball_forward_mode_and_second_derivatives (backprop, both orders)
    "tests/test_checkpointed_while_cost.py::test_backprop_forward_mode_and_second_derivatives_still_exact",
    # its [decreasing-adjoint] and [increasing-backprop] cases
    "tests/test_adjoint.py::test_gradients_match_finite_differences[decreasing-backprop]",
    # its [backprop] and [checkpoint] cases; the closed-form [adjoint] tests of both balls
    "tests/test_events.py::test_gradients_match_finite_differences[adjoint]",
    # test_esdirk.py::test_newton_failure_rejects_the_step (both methods)
    "tests/test_esdirk.py::test_huge_first_step_is_rejected_and_the_solve_recovers[kvaerno3]",
    # test_batched.py::test_mixed_precision_parameters, test_odesolve's pytree states
    "tests/test_adjoint.py::test_pytree_state_and_float32",
    # test_nn.py (NeuralODE and MLPField in every mode)
    "tests/test_adjoint.py::test_equinox_mlp_as_params_and_as_field",
    # test_reversible.py's vmap and batched tests; test_events.py's vmap and batched tests (other modes)
    "tests/test_reversible_events.py::test_vmap_and_batched_equal_a_loop",
    # test_adjoint.py::test_backward_info_counts_and_agrees_with_grad; test_batched's batched adjoint
    "tests/test_options.py::test_adjoint_backward_info_batched_matches_odesolve_batched",
    # its [fixed] case
    "tests/test_reversible.py::test_gradient_wrt_module_weights[adaptive]",
    # its [backprop] case; test_gradient_failures.py::test_grad_of_grad[adjoint]
    "tests/test_gradient_failures.py::test_hessian[adjoint]",
    # test_rosenbrock.py::test_jit_vmap_batched_agree (the implicit methods' shared batch path)
    "tests/test_esdirk.py::test_jit_vmap_and_batched_agree",
    # its [adjoint] and [reversible] cases (the modes with a record; the failure is the loop's)
    "tests/test_events.py::test_max_events[backprop]",
    "tests/test_events.py::test_max_events[checkpoint]",
    # test_reversible_events.py::test_max_events_bounds_the_memory_of_the_reset_record[reversible]
    # (the bound on the record) and test_max_events[adjoint] (the failure, the loop's in every mode)
    "tests/test_events.py::test_max_events[reversible]",
    "tests/test_reversible_events.py::test_max_events_bounds_the_memory_of_the_reset_record[adjoint]",
    # its [adjoint-False] case (both locations, a shared gradient); test_event_costs.py's jaxpr
    # walk (every mode locates after the loop); the closed-form ball tests in every mode
    "tests/test_events.py::test_terminal_events_located_after_the_loop_as_in_it[adjoint-True]",
    "tests/test_events.py::test_terminal_events_located_after_the_loop_as_in_it[checkpoint-True]",
    "tests/test_events.py::test_terminal_events_located_after_the_loop_as_in_it[backprop-False]",
    # its [checkpoint] case; test_bouncing_ball_heights_bounce_times_and_gradients[backprop]
    "tests/test_events.py::test_gradients_match_finite_differences[backprop]",
    # test_esdirk.py::test_forward_mode_backprop_matches_finite_differences (forward mode through
    # an implicit method's LU solves and its step)
    "tests/test_rosenbrock.py::test_gradient_forward_mode_backprop",
    # test_reversible_events.py's terminal-event and reset tests, one event each
    "tests/test_reversible_events.py::test_several_events_resets_then_terminal",
}
SLOW_BUDGET_3 = {  # the default run took 15 min 49 s on a 2-core Intel Xeon (2026-12-01)
    # its [checkpoint] case (the same loop differentiated in reverse) and [adjoint] case
    "tests/test_events.py::test_batched_events_each_problem_its_own_and_exact_gradient[backprop]",
}
SLOW_TESTS = {  # whole tests whose property a cheaper test in the default run also pins down
    "tests/test_adjoint.py::test_seminorm_saves_backward_steps_at_equal_accuracy",
    "tests/test_adjoint.py::test_vmap_of_gradient_equals_loop",
    "tests/test_batched.py::test_vmap_with_batched_parameters_keeps_per_sample_adjoints",
    "tests/test_examples.py::test_resnet_and_odenet_beat_chance",
    "tests/test_examples.py::test_euler_error_is_first_order",
    "tests/test_nn.py::test_batched_option_equals_filter_vmap",
    "tests/test_nn.py::test_gradient_option_passes_through",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        base = item.nodeid.split("[")[0]
        cases = (SLOW_CASES, SLOW_BUDGET, SLOW_BUDGET_2, SLOW_BUDGET_3, SLOW_REVERSIBLE_EVENTS)
        slow_case = any(item.nodeid in ids for ids in cases)
        if slow_case or base in SLOW_TESTS or base in SLOW_TESTS_EVENTS:
            item.add_marker(pytest.mark.slow)
