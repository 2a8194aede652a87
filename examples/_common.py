"""What every example shares: its command line (``--out``, ``--quick``, ``--seed``) and the
writing of its figure. Examples import it as a sibling module (``python examples/NAME.py`` puts
``examples/`` on ``sys.path``; the tests add it)."""

from __future__ import annotations

import argparse
import os

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def parser(doc: str, name: str, quick_help: str = "a few-seconds smoke run",
           out_help: str = "where to write the PNG", seed: bool = True) -> argparse.ArgumentParser:
    """The example's argument parser: its description is ``doc``'s first paragraph, its figure
    goes to ``examples/out/<name>.png`` unless ``--out`` says otherwise."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(OUT_DIR, f"{name}.png"), help=out_help)
    p.add_argument("--quick", action="store_true", help=quick_help)
    if seed:
        p.add_argument("--seed", type=int, default=0)
    return p


def save(fig, out: str, dpi: int) -> None:
    """Writes ``fig`` to ``out`` (its folder created if missing) and closes it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
