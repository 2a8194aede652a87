"""The continuous adjoint with events (stub)."""


def solve(*args, **kwargs):
    raise NotImplementedError("events with gradient='adjoint': use 'backprop' or 'checkpoint'")
