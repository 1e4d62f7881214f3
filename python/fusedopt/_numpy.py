"""The numpy optimizers: the reference code's classes, run by the fusedopt engine, and a class
for every other optimizer the engine has.

Every class is made from the engine's list of optimizers (``_engine.rules()``) by ``_rule_class``:
its keywords are the optimizer's hyperparameters with the engine's defaults (``learning_rate``
for ``lr``, as in the reference), and the engine checks every value. The six reference classes
keep the reference's names, positional keywords and defaults; an optimizer added to the engine
gets a class named after it (its ``type_name``) with every hyperparameter keyword-only.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

from ._engine import Engine, rules

PathLike = Union[str, "os.PathLike[str]"]

#: The single-array form's layout marker (``update(weight, grad)``).
_SINGLE = ("<array>",)

#: The engine's optimizers, by name.
_RULES = {rule["name"]: rule for rule in rules()}

#: The options every class takes, keyword-only, with their defaults.
_OPTIONS = {
    "grad_scale": 1.0,
    "max_grad_norm": None,
    "non_finite": "propagate",
    "state_format": "f32",
    "master_weights": False,
}


def _keyword(field: str) -> str:
    """A hyperparameter's keyword: the reference's ``learning_rate`` for ``lr``."""
    return "learning_rate" if field == "lr" else field


class Optimizer:
    """Base of the numpy optimizers: an engine optimizer with the reference code's interface.

    ``update`` changes the weight arrays in place, as the reference does; the optimizer state
    is allocated at the first call, and the arrays' number, order and shapes are fixed from
    then on. Every hyperparameter is an attribute (``opt.momentum = 0.95``), checked by the
    engine when set. Optimizers copy (``copy.deepcopy``) and pickle with their state.
    """

    #: The engine's name of the optimizer.
    _rule: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = type(self).__signature__.bind(*args, **kwargs)  # TypeError for a bad call
        given = dict(bound.arguments)
        options = {k: given.pop(k, v) for k, v in _OPTIONS.items()}
        hyper = {("lr" if k == "learning_rate" else k): v for k, v in given.items()}
        master = options.pop("master_weights")
        if not isinstance(master, (bool, np.bool_)):
            raise TypeError(f"{type(self).__name__}: master_weights must be True or False")
        self._engine = Engine(self._rule, **hyper)  # TypeError/ValueError naming the field
        self._engine.set_settings(**options)
        self._master = bool(master)
        self._keys: Optional[tuple[Any, ...]] = None
        self._labels: list[tuple[str, str]] = []

    # -- hyperparameters and settings ----------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate, readable and writable between updates (the engine keeps it as
        float32)."""
        return self._engine.hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self._engine.set_hyper(lr=value)

    @property
    def hyper(self) -> dict[str, Any]:
        """Every hyperparameter with its value (the engine's names: ``lr``, ``beta1``, ...)."""
        return self._engine.hyper

    @property
    def state_format(self) -> str:
        """The format of the optimizer state: ``"f32"``, ``"bf16"`` or ``"q8"``."""
        return self._engine.settings["state_format"]

    @property
    def master_weights(self) -> bool:
        """Whether the weights are float16 with float32 master weights in the state."""
        return self._master

    @property
    def state_bytes(self) -> int:
        """Bytes of memory the optimizer state holds (master weights included)."""
        return self._engine.state_bytes

    @property
    def settings(self) -> dict[str, Any]:
        """The engine's settings: ``backend``, ``chunk_len``, ``grad_scale``,
        ``max_grad_norm``, ``non_finite``, ``state_format``."""
        return self._engine.settings

    def set_settings(self, **settings: Any) -> None:
        """Changes several settings at once (keywords as in :attr:`settings`), validated
        together by the engine: a value of the wrong type or out of range raises
        ``TypeError`` / ``ValueError`` naming it, and nothing changes."""
        self._engine.set_settings(**settings)

    @property
    def grad_scale(self) -> float:
        """The loss scale gradients are divided by as they are read (default 1)."""
        return self._engine.settings["grad_scale"]

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        self._engine.set_settings(grad_scale=value)

    @property
    def max_grad_norm(self) -> Optional[float]:
        """The global norm gradients are clipped to, or ``None`` (the default)."""
        return self._engine.settings["max_grad_norm"]

    @max_grad_norm.setter
    def max_grad_norm(self, value: Optional[float]) -> None:
        self._engine.set_settings(max_grad_norm=value)

    @property
    def non_finite(self) -> str:
        """What a NaN or infinite gradient does: ``"propagate"`` (default), ``"skip"`` the
        update, or ``"error"`` (raise ``ValueError``, nothing modified)."""
        return self._engine.settings["non_finite"]

    @non_finite.setter
    def non_finite(self, value: str) -> None:
        self._engine.set_settings(non_finite=value)

    # -- the reference interface -------------------------------------------------------------

    def update(
        self,
        params: Union[np.ndarray, Mapping[Any, np.ndarray]],
        grads: Union[np.ndarray, Mapping[Any, np.ndarray]],
    ) -> None:
        """Applies one step in place.

        ``update(weight, grad)`` takes one C-contiguous, writable float32 array of any shape
        and its gradient (float32, same shape). ``update(params, grads)`` takes two dicts of
        such arrays with the same keys, the reference networks' ``params``/``grads``; the
        whole dict is one engine step, in the order of ``params`` at the first call.

        Raises ``TypeError`` for arrays that are not float32 ndarrays, and ``ValueError`` for
        non-contiguous or read-only arrays, shapes that differ, keys that do not match, a
        layout other than the first call's, or an array passed twice. A refused update
        modifies nothing.
        """
        if isinstance(params, Mapping) or isinstance(grads, Mapping):
            if not (isinstance(params, Mapping) and isinstance(grads, Mapping)):
                raise TypeError(
                    "update takes two arrays (weight, grad) or two dicts (params, grads), "
                    f"not {type(params).__name__} and {type(grads).__name__}"
                )
            keys = self._dict_keys(params, grads)
            weights = [params[k] for k in keys]
            grad_list = [grads[k] for k in keys]
            labels = self._labels if keys is self._keys else _labels_of(keys)
        else:
            if self._keys is not None and self._keys != _SINGLE:
                raise ValueError(
                    "the layout changed: this optimizer updates a dict of "
                    f"{len(self._keys)} arrays, not a single array"
                )
            keys = _SINGLE
            weights, grad_list, labels = [params], [grads], [("weight", "grad")]
        self._check_master(weights, labels)
        self._engine.step_arrays(weights, grad_list, labels)
        if self._keys is None:
            self._fix_layout(keys, labels)

    def _check_master(self, weights: list[Any], labels: list[tuple[str, str]]) -> None:
        """float16 weights go with ``master_weights=True``, and it with them."""
        owner = type(self).__name__
        for w, (label, _) in zip(weights, labels):
            half = getattr(w, "dtype", None) == np.float16
            if half and not self._master:
                raise TypeError(
                    f"{owner}: {label} is float16: pass master_weights=True for the optimizer "
                    "to keep float32 master weights and write the float16 ones rounded"
                )
            if self._master and not half and isinstance(w, np.ndarray):
                raise TypeError(
                    f"{owner}: {label} is {w.dtype}, and master_weights=True keeps float32 "
                    "master copies of float16 weights: pass float16 weights, or drop "
                    "master_weights"
                )

    def _dict_keys(self, params: Mapping[Any, Any], grads: Mapping[Any, Any]) -> tuple[Any, ...]:
        """The keys in engine order, after checking both dicts against each other and the
        layout."""
        for k in params:
            if k not in grads:
                raise ValueError(f"grads has no entry for params[{k!r}]")
        for k in grads:
            if k not in params:
                raise ValueError(f"grads[{k!r}] has no matching entry in params")
        if self._keys is not None:
            if self._keys == _SINGLE:
                raise ValueError(
                    "the layout changed: this optimizer updates a single array, not a dict"
                )
            if len(params) != len(self._keys) or any(k not in params for k in self._keys):
                missing = [k for k in self._keys if k not in params]
                extra = [k for k in params if k not in self._keys]
                raise ValueError(
                    f"the layout changed: params lacks {missing} and has new keys {extra} "
                    f"(the optimizer state was created for {list(self._keys)})"
                )
            return self._keys
        names = self._engine.tensor_names
        if names:  # loaded from a state file: the file's order
            by_name = {str(k): k for k in params}
            if sorted(by_name) != sorted(names):
                raise ValueError(
                    f"params has keys {sorted(by_name)}, the loaded state is for {sorted(names)}"
                )
            return tuple(by_name[n] for n in names)
        return tuple(params)

    def _fix_layout(self, keys: tuple[Any, ...], labels: list[tuple[str, str]]) -> None:
        self._keys, self._labels = keys, labels
        if keys != _SINGLE and not self._engine.tensor_names:
            try:  # names guard state files; keys that cannot be names just go unnamed
                self._engine.set_tensor_names([str(k) for k in keys])
            except ValueError:
                pass

    @property
    def steps(self) -> int:
        """Updates applied so far (a skipped update does not count)."""
        return self._engine.steps

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last update, when clipping (``max_grad_norm``) or a
        non-finite check (``non_finite="skip"`` or ``"error"``) computed it; else ``None``."""
        return self._engine.last_grad_norm

    @property
    def last_skipped(self) -> bool:
        """Whether the last update was skipped for a non-finite gradient (``non_finite="skip"``)."""
        return self._engine.last_skipped

    def eval(self, params: Union[np.ndarray, Mapping[Any, np.ndarray]]) -> None:
        """Moves the weights (the array, or the dict of arrays, that ``update`` takes) to the
        point to evaluate the model at: for the schedule-free optimizers, from ``y``, where
        gradients are taken, to the average ``x``. Updates raise ``RuntimeError`` until
        ``train``. Does nothing when the weights are there already, and for the other
        optimizers (whose two points are one)."""
        self._shift(params, True)

    def train(self, params: Union[np.ndarray, Mapping[Any, np.ndarray]]) -> None:
        """Moves the weights back to the point gradients are taken at, after ``eval``."""
        self._shift(params, False)

    @property
    def is_eval(self) -> bool:
        """Whether ``eval`` left the weights at the evaluation point."""
        return self._engine.is_eval

    def _shift(self, params: Any, to_eval: bool) -> None:
        if isinstance(params, Mapping):
            keys = self._keys if self._keys not in (None, _SINGLE) else tuple(params)
            missing = [k for k in keys if k not in params]
            if missing or len(params) != len(keys):
                raise ValueError(
                    f"params must hold the arrays the optimizer updates: {list(keys)}, not "
                    f"{list(params)}"
                )
            weights, labels = [params[k] for k in keys], [f"params[{k!r}]" for k in keys]
        else:
            weights, labels = [params], ["weight"]
        self._engine.shift_arrays(weights, labels, to_eval)

    def save_state(self, path: PathLike) -> None:
        """Writes the optimizer state (moments, step counts, hyperparameters, array names) to
        ``path``: the Rust crate's checksummed safetensors state file, written atomically."""
        self._engine.save_state(os.fspath(path))

    def load_state(self, path: PathLike) -> None:
        """Reads a state file written by ``save_state`` (here or from Rust). Raises
        ``ValueError`` if it is for another optimizer or other arrays, ``OSError`` if it cannot
        be read; then nothing changes. The file's hyperparameters replace this optimizer's."""
        self._engine.load_state(os.fspath(path))
        if self._keys is None or self._keys == _SINGLE:
            return
        names = self._engine.tensor_names
        if names and [str(k) for k in self._keys] != names:
            by_name = {str(k): k for k in self._keys}
            self._keys = tuple(by_name[n] for n in names)
            self._labels = _labels_of(self._keys)

    def __repr__(self) -> str:
        shown = ", ".join(f"{_keyword(k)}={v!r}" for k, v in self._engine.hyper.items())
        return f"{type(self).__name__}({shown})"


def _labels_of(keys: tuple[Any, ...]) -> list[tuple[str, str]]:
    return [(f"params[{k!r}]", f"grads[{k!r}]") for k in keys]


def _field(field: str) -> property:
    """The attribute of hyperparameter ``field``: read from the engine, set through it."""

    def get(self: Optimizer) -> Any:
        return self._engine.hyper[field]

    def set_(self: Optimizer, value: Any) -> None:
        self._engine.set_hyper(**{field: value})

    return property(get, set_, doc=f"The hyperparameter {field!r} (checked by the engine when set).")


_COMMON_DOC = """
    Keyword-only options (all optimizers): ``grad_scale`` (divide gradients by a loss scale),
    ``max_grad_norm`` (clip by the global norm of all arrays of an update), ``non_finite``
    (``"propagate"``, ``"skip"`` or ``"error"``); ``state_format`` (``"f32"``, ``"bf16"`` with
    stochastic rounding, or ``"q8"``, 8-bit block-wise), chosen at construction;
    ``master_weights`` (float16 weight arrays, with float32 master weights kept in the optimizer
    state and the float16 ones written rounded to nearest). Gradients may be float16 in every
    mode.
"""


def _rule_class(
    rule: str,
    name: str,
    positional: tuple[str, ...] = ("learning_rate",),
    doc: str = "",
    base: type = Optimizer,
) -> type:
    """The numpy class of the engine's optimizer ``rule``, called ``name``: its keywords are
    the rule's hyperparameters with their defaults, ``positional`` of them also by position,
    then the options every class has."""
    info = _RULES[rule]
    params = []
    for field, default in info["hyper"].items():
        keyword = _keyword(field)
        kind = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if keyword in positional
            else inspect.Parameter.KEYWORD_ONLY
        )
        params.append(inspect.Parameter(keyword, kind, default=default))
    params.sort(key=lambda p: (p.kind, positional.index(p.name) if p.name in positional else 0))
    params += [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in _OPTIONS.items()
    ]
    fields = {f: _field(f) for f in info["hyper"] if f != "lr"}
    namespace = dict(
        fields,
        _rule=rule,
        __signature__=inspect.Signature(params),
        __doc__=(doc or f"The engine's {rule!r} optimizer.")
        + "\n\n    Hyperparameters (the engine's defaults): "
        + ", ".join(f"``{_keyword(f)}={v!r}``" for f, v in info["hyper"].items())
        + ".\n"
        + _COMMON_DOC,
        __module__=__name__,
        __qualname__=name,
    )
    return type(name, (base,), namespace)


SGD = _rule_class("sgd", "SGD", doc="Stochastic gradient descent: ``w -= learning_rate * g``.")
Momentum = _rule_class(
    "momentum",
    "Momentum",
    ("learning_rate", "momentum"),
    "Momentum SGD: ``v = momentum * v - learning_rate * g; w += v``.",
)
Nesterov = _rule_class(
    "nag",
    "Nesterov",
    ("learning_rate", "momentum"),
    "Nesterov's accelerated gradient, in the reference's form: "
    "``w += momentum**2 * v - (1 + momentum) * learning_rate * g`` then "
    "``v = momentum * v - learning_rate * g`` (that is, ``w += momentum * v_new - lr * g``).",
    base=Momentum,
)
AdaGrad = _rule_class(
    "adagrad",
    "AdaGrad",
    doc="AdaGrad: ``h += g * g; w -= learning_rate * g / (sqrt(h) + eps)``, eps 1e-7.",
)
RMSProp = _rule_class(
    "rmsprop",
    "RMSProp",
    ("learning_rate", "decay_rate"),
    "RMSProp: ``h = decay_rate * h + (1 - decay_rate) * g * g; "
    "w -= learning_rate * g / (sqrt(h) + eps)``, eps 1e-7.",
)
Adam = _rule_class(
    "adam",
    "Adam",
    ("learning_rate", "beta1", "beta2"),
    "Adam, as the reference writes it: ``lr_t = learning_rate * sqrt(1 - beta2**t) / "
    "(1 - beta1**t)``, ``m += (1 - beta1) * (g - m)``, ``v += (1 - beta2) * (g*g - v)``, "
    "``w -= lr_t * m / (sqrt(v) + eps)``, eps 1e-7. Keyword-only extras: "
    "``decoupled_weight_decay`` (AdamW), ``amsgrad``, and ``eps_mode``: ``\"sqrt_v\"`` (the "
    "reference: eps added to sqrt(v)) or ``\"sqrt_v_hat\"`` (PyTorch: eps added to the "
    "bias-corrected sqrt(v_hat)).",
)

#: The classes above, by the engine's name of their optimizer.
_BY_RULE = {cls._rule: cls for cls in (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam)}

#: A class for every other optimizer of the engine, named after it.
for _name, _info in _RULES.items():
    if _name not in _BY_RULE:
        _BY_RULE[_name] = globals()[_info["type_name"]] = _rule_class(_name, _info["type_name"])
del _name, _info

__all__ = ["Optimizer"] + [cls.__name__ for cls in _BY_RULE.values()]
