"""Layer layouts: which dims of each prunable weight are its input (reduction) dims.

N:M groups must run along the dim a layer sums over (sparse tensor cores skip the products of a
2:4 group of *inputs*).  PyTorch stores most weights ``[out, in, ...]``, but not all, so each
layer type declares where its input dims are:

* ``nn.Linear`` ``[out, in]``: dim 1; ``nn.Bilinear`` ``[out, in1, in2]``: dims 1, 2;
* ``nn.ConvNd`` ``[out, in/groups, *kernel]``: dim 1 and the kernel dims (the ``[out, in*kh*kw]``
  view, PyTorch's memory order);
* ``nn.ConvTransposeNd`` ``[in, out/groups, *kernel]``: dim 0;
* HF ``transformers`` ``Conv1D`` ``[in, out]``, applied as ``x @ W``: dim 0;
* ``nn.RNN``/``LSTM``/``GRU`` (and their cells) ``weight_ih``/``weight_hh``/``weight_hr``
  ``[gates * hidden, in]``: dim 1;
* ``nn.MultiheadAttention`` ``in_proj_weight`` ``[3 * embed, embed]`` (and ``q/k/v_proj_weight``): dim 1;
* ``nn.Embedding``/``EmbeddingBag`` ``[num, dim]``: none (a lookup table, no reduction).

HF's ``Conv1D`` is recognised by its class name (``transformers.pytorch_utils.Conv1D``, through
the class's MRO): lit_prune never imports ``transformers``.  :func:`register_layer` adds a
user's own layer type (or overrides a built-in one); the layer types registered with
``prune_by_default`` make up the default selection of :mod:`lit_prune.engine.selection`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from lit_prune.config.hparams import HParamsError

__all__ = [
    "InputDims",
    "LayerLayout",
    "is_hf_conv1d",
    "layout_of",
    "nm_input_dims",
    "parameter_owners",
    "register_layer",
    "resolve_input_dims",
    "weight_input_dims",
]

#: A weight's input dims as registered: one dim, consecutive dims, ``slice(d, None)`` (``d`` to
#: the last dim), or ``None`` (no reduction dim: an embedding table).
InputDims = int | tuple[int, ...] | slice | None

HF_CONV1D = "transformers.pytorch_utils.Conv1D"


@dataclass(frozen=True)
class LayerLayout:
    """How one layer type stores its prunable weights.

    ``weights`` maps a parameter name, or a name prefix followed by ``_`` (``"weight"`` also
    covers ``weight_ih_l0``), to its :data:`InputDims`.  ``prune_by_default``: the default
    selection prunes these weights.
    """

    weights: Mapping[str, InputDims]
    prune_by_default: bool = True

    def dims_of(self, param_name: str) -> tuple[bool, InputDims]:
        """``(found, input dims)`` of ``param_name``: the exact entry, else the longest matching prefix."""
        if param_name in self.weights:
            return True, self.weights[param_name]
        prefixes = [k for k in self.weights if param_name.startswith(k + "_")]
        if not prefixes:
            return False, None
        return True, self.weights[max(prefixes, key=len)]


_CONV = slice(1, None)
_REGISTRY: dict[type | str, LayerLayout] = {}


def _key(layer_type: type | str) -> type | str:
    if isinstance(layer_type, str):
        if not layer_type or "." not in layer_type.strip("."):
            raise ValueError(f"layer type {layer_type!r}: give a class, or its full name as 'package.module.ClassName'")
        return layer_type
    if isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
        return layer_type
    raise TypeError(f"layer type must be an nn.Module subclass or 'package.module.ClassName', got {layer_type!r}")


def _check_dims(owner: str, dims: InputDims) -> None:
    if dims is None or (isinstance(dims, (int, slice)) and not isinstance(dims, bool)):
        if isinstance(dims, slice) and (dims.stop is not None or dims.step not in (None, 1)):
            raise ValueError(f"{owner}: a slice of input dims must be slice(d, None) (d to the last dim), got {dims}")
        return
    ints = isinstance(dims, tuple) and dims and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
    if ints and list(dims) == list(range(dims[0], dims[0] + len(dims))):  # type: ignore[index,arg-type]
        return
    raise ValueError(
        f"{owner}: input dims must be an int, a tuple of consecutive ints, slice(d, None) or None "
        f"(no reduction dim), got {dims!r}"
    )


def register_layer(
    layer_type: type[nn.Module] | str,
    input_dims: InputDims | Mapping[str, InputDims],
    *,
    prune_by_default: bool = True,
) -> None:
    """Declare where a layer type's weights keep their input (reduction) dims; N:M groups run along them.

    Registering also adds the layer's weights to the default selection (unless
    ``prune_by_default=False``); registering a type again replaces its entry, and a type's own
    entry wins over a base class's.

    Args:
        layer_type: The ``nn.Module`` subclass, or its full name (``"pkg.module.ClassName"``,
            matched against each class in the MRO without importing the package).
        input_dims: For the parameter ``weight``: the input dim (``1`` for ``[out, in]``, ``0``
            for ``[in, out]``), a tuple of consecutive dims flattened together, ``slice(d, None)``
            for ``d`` to the last dim (conv kernels), or ``None`` if the weight has no reduction
            dim (a lookup table: N:M on it is refused).  A mapping gives this per parameter name
            (a key also covers the names that extend it with ``_...``).
        prune_by_default: Whether the default selection prunes these weights.

    Raises:
        TypeError: ``layer_type`` is neither an ``nn.Module`` subclass nor a dotted name.
        ValueError: malformed input dims (the message names the parameter and the accepted forms).

    Example::

        >>> import torch
        >>> class Dense(nn.Module):  # stores its kernel [in, out], as Keras does
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.kernel = nn.Parameter(torch.zeros(8, 4))
        >>> register_layer(Dense, {"kernel": 0})
        >>> weight_input_dims(Dense(), "kernel", 2)
        (0,)
    """
    key = _key(layer_type)
    weights = dict(input_dims) if isinstance(input_dims, Mapping) else {"weight": input_dims}
    if not weights:
        raise ValueError(f"register_layer({layer_type!r}): the mapping of parameter names to input dims is empty")
    for name, dims in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_layer({layer_type!r}): parameter names must be non-empty strings, got {name!r}")
        _check_dims(f"register_layer({layer_type!r}) parameter {name!r}", dims)
    _REGISTRY[key] = LayerLayout(weights, prune_by_default)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def layout_of(module: nn.Module) -> LayerLayout | None:
    """The registered layout of ``module``'s most specific registered class (by class or by name), if any.

    Example::

        >>> layout_of(nn.Linear(2, 3)).weights
        {'weight': 1}
        >>> layout_of(nn.ReLU()) is None
        True
    """
    for cls in type(module).__mro__:
        found = _REGISTRY.get(cls) or _REGISTRY.get(_qualified(cls))
        if found is not None:
            return found
    return None


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) HF ``transformers.pytorch_utils.Conv1D``, without importing it."""
    return any(_qualified(cls) == HF_CONV1D for cls in type(module).__mro__)


def resolve_input_dims(dims: InputDims, ndim: int) -> tuple[int, ...] | None:
    """Registered input dims made concrete for a weight of ``ndim`` dims: ``()`` for none, ``None`` if out of range.

    Example::

        >>> resolve_input_dims(slice(1, None), 4), resolve_input_dims(0, 2), resolve_input_dims(None, 2)
        ((1, 2, 3), (0,), ())
    """
    if dims is None:
        return ()
    if isinstance(dims, slice):
        out = tuple(range(dims.start or 0, ndim))
    elif isinstance(dims, int):
        out = (dims % ndim,) if -ndim <= dims < ndim else ()
        if not out:
            return None
    else:
        out = tuple(d % ndim if -ndim <= d < ndim else -1 for d in dims)
    if not out or any(d < 0 for d in out) or list(out) != list(range(out[0], out[0] + len(out))):
        return None
    return out


def weight_input_dims(module: nn.Module, param_name: str, ndim: int) -> tuple[int, ...] | None:
    """Input dims of ``module.<param_name>`` (``()``: it has none), or ``None`` if its layout is unknown.

    Example::

        >>> weight_input_dims(nn.Conv2d(3, 8, 3), "weight", 4), weight_input_dims(nn.Embedding(9, 4), "weight", 2)
        ((1, 2, 3), ())
        >>> weight_input_dims(nn.ConvTranspose2d(3, 8, 3), "weight", 4), weight_input_dims(nn.ReLU(), "weight", 2)
        ((0,), None)
    """
    layout = layout_of(module)
    if layout is None:
        return None
    found, dims = layout.dims_of(param_name)
    return resolve_input_dims(dims, ndim) if found else None


def input_size(shape: tuple[int, ...], dims: tuple[int, ...]) -> int:
    """The product of ``shape`` over ``dims`` (the length a weight's N:M groups are cut from)."""
    return math.prod(shape[d] for d in dims)


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``{id(parameter): [(module name, module, attribute), ...]}``: each parameter's modules (tied: several)."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                out.setdefault(id(param), []).append((module_name, module, attr))
    return out


def _registration_hint(owners: list[tuple[str, nn.Module, str]]) -> str:
    _, module, attr = owners[0]
    cls = type(module)
    return (
        f"register its layer with lit_prune.register_layer({cls.__name__}, {{{attr!r}: <input dim>}}) (1 for a "
        "weight stored [out, in], 0 for [in, out]), or leave it out of `nm_sparsity`/`nm_sparsity_map`"
    )


def nm_input_dims(name: str, shape: tuple[int, ...], owners: list[tuple[str, nn.Module, str]]) -> tuple[int, ...]:
    """The input dims N:M groups of weight ``name`` run along, from the layouts of the modules holding it.

    A weight tied to several modules (GPT-2's ``wte``/``lm_head``) takes the input dims of those
    that have one (an embedding has none: its rows are looked up, not summed); they must agree.

    Raises:
        HParamsError: no module holding it has a known layout (the message says how to register
            the layer), the layout has no input dim (an embedding), or tied layouts disagree.

    Example::

        >>> lin = nn.Linear(8, 4)
        >>> nm_input_dims("fc.weight", (4, 8), [("fc", lin, "weight")])
        (1,)
    """
    known = {}
    for module_name, module, attr in owners:
        dims = weight_input_dims(module, attr, len(shape))
        if dims is not None:
            known[f"{module_name or '<model>'} ({type(module).__name__})"] = dims
    if not known:
        _, module, _ = owners[0]
        raise HParamsError(
            f"N:M on weight {name!r} of shape {shape}: the layout of its layer {type(module).__qualname__} is not "
            f"known, so lit_prune cannot tell which dim is its input (reduction) dim; {_registration_hint(owners)}"
        )
    summed = {k: d for k, d in known.items() if d}
    if not summed:
        raise HParamsError(
            f"N:M on weight {name!r} of {', '.join(known)}: an embedding table has no input (reduction) dim for N:M "
            "groups to run along (its rows are looked up, not multiplied); leave it out of N:M with "
            "`nm_sparsity_map` or `exclude_patterns`"
        )
    if len(set(summed.values())) > 1:
        raise HParamsError(
            f"N:M on tied weight {name!r}: its layers disagree on its input dims ({summed}); give N:M to none of them"
        )
    return next(iter(summed.values()))


for _type, _dims in (
    (nn.Linear, 1),
    (nn.Bilinear, _CONV),
    (nn.Conv1d, _CONV),
    (nn.Conv2d, _CONV),
    (nn.Conv3d, _CONV),
    (nn.ConvTranspose1d, 0),
    (nn.ConvTranspose2d, 0),
    (nn.ConvTranspose3d, 0),
    (nn.RNNBase, 1),
    (nn.RNNCellBase, 1),
    (nn.Embedding, None),
    (nn.EmbeddingBag, None),
    (HF_CONV1D, 0),
):
    register_layer(_type, _dims)
register_layer(
    nn.MultiheadAttention, dict.fromkeys(("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"), 1)
)
