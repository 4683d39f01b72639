"""Entry points (top layer): ``ddim-lab`` (``main``: the Hydra app) and ``ddim-lab-prefetch`` (``prefetch``)."""
