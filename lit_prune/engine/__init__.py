"""The pruning engine: plain torch, no Lightning, no Hydra.

``selection`` chooses the weights, ``schedule`` says how sparse at each step, ``pruning`` binds
both to a model and runs each mask update as a pipeline over the groups of its plan, whose
arithmetic lives in ``masks``, ``nm`` and ``saliency``; ``layers`` are TF's masked layers and
``strip`` folds masks in for export.
"""
