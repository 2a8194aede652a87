"""Every Python snippet in README.md runs, in order, and does what its comments claim."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippets_run_and_hold():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
        if "t_data" in block:  # the training snippet fits the oscillator
            assert float(namespace["value"]) < 0.05
    assert namespace["ys"].shape == (101, 2)
    assert int(namespace["info"].status) == 0
    assert namespace["message"].startswith("jaxode: the solve took max_steps")
    adjoint = namespace["jax"].grad(namespace["loss"])(namespace["p"], "adjoint")
    backprop = namespace["jax"].grad(namespace["loss"])(namespace["p"], "backprop")
    np.testing.assert_allclose(adjoint, backprop, rtol=1e-6)
    assert float(namespace["value"]) < 0.5 * float(namespace["first"])  # the NeuralODE trains
    assert namespace["one_state"].shape == (101, 3, 2)
    np.testing.assert_allclose(namespace["per_sample"], namespace["batched"], rtol=1e-12)
    one_state = np.swapaxes(namespace["one_state"], 0, 1)
    np.testing.assert_allclose(one_state, namespace["batched"], rtol=1e-4, atol=1e-5)
