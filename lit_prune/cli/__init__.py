"""The ``lit-prune`` Hydra app (``app``) and what it trains.

``digits`` and ``demos`` hold the shipped data and networks, ``causal_lm`` the tiny HF causal LMs;
``torch_loop`` is the engine in a plain torch loop.
"""
