"""``python -m tdd_fx``: the ``tdd-fx`` command line (see ``tdd_fx.cli``)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m tdd_fx"))
