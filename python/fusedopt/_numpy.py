"""The numpy optimizers: the reference code's classes, run by the fusedopt engine.

Each class keeps the reference's name, keywords, defaults and in-place ``update``. Every other
engine option is keyword-only.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

from ._engine import Engine

__all__ = ["Optimizer", "SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam"]

PathLike = Union[str, "os.PathLike[str]"]

#: The single-array form's layout marker (``update(weight, grad)``).
_SINGLE = ("<array>",)


def _number(owner: str, name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError naming the keyword."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, not {type(value).__name__}")
    return float(value)


def _flag(owner: str, name: str, value: Any) -> bool:
    """``value`` as a bool, or a TypeError naming the keyword."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be True or False, not {value!r}")
    return bool(value)


def _encode(value: Any) -> str:
    """A hyperparameter in the engine's configuration syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class _Field:
    """A hyperparameter readable and writable as an attribute (``opt.momentum = 0.95``)."""

    def __init__(self, engine_name: str, kind: str, doc: str) -> None:
        self.engine_name = engine_name
        self.kind = kind
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Optional["Optimizer"], owner: type) -> Any:
        if obj is None:
            return self
        return obj._hyper[self.engine_name]

    def __set__(self, obj: "Optimizer", value: Any) -> None:
        obj._set_hyper(self.name, self.engine_name, self.kind, value)


class Optimizer:
    """Base of the numpy optimizers: an engine optimizer with the reference code's interface.

    Subclasses are ``SGD``, ``Momentum``, ``Nesterov``, ``AdaGrad``, ``RMSProp`` and ``Adam``.
    ``update`` changes the weight arrays in place, as the reference does; the optimizer state
    is allocated at the first call, and the arrays' number, order and shapes are fixed from
    then on.
    """

    _rule: str = ""
    #: keyword -> (engine field, "number" | "flag" | "choice")
    _fields: dict[str, tuple[str, str]] = {}

    def __init__(
        self,
        hyper: dict[str, Any],
        *,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        owner = type(self).__name__
        self._hyper: dict[str, Any] = {}
        for keyword, value in hyper.items():
            field, kind = self._fields[keyword]
            self._hyper[field] = self._check(owner, keyword, kind, value)
        self._engine = Engine(self._config_string(self._hyper))
        self._engine.grad_scale = _number(owner, "grad_scale", grad_scale)
        if max_grad_norm is not None:
            self._engine.max_grad_norm = _number(owner, "max_grad_norm", max_grad_norm)
        if not isinstance(non_finite, str):
            raise TypeError(f"{owner}: non_finite must be a str, not {type(non_finite).__name__}")
        self._engine.non_finite = non_finite
        if not isinstance(state_format, str):
            raise TypeError(
                f"{owner}: state_format must be a str, not {type(state_format).__name__}"
            )
        self._engine.state_format = state_format
        self._master = _flag(owner, "master_weights", master_weights)
        self._keys: Optional[tuple[Any, ...]] = None
        self._labels: list[tuple[str, str]] = []

    @staticmethod
    def _check(owner: str, keyword: str, kind: str, value: Any) -> Any:
        if kind == "number":
            return _number(owner, keyword, value)
        if kind == "flag":
            return _flag(owner, keyword, value)
        if not isinstance(value, str):
            raise TypeError(f"{owner}: {keyword} must be a str, not {type(value).__name__}")
        return value

    def _config_string(self, hyper: dict[str, Any]) -> str:
        fields = ",".join(f"{k}={_encode(v)}" for k, v in hyper.items())
        return f"{self._rule}:{fields}" if fields else self._rule

    def _set_hyper(self, keyword: str, field: str, kind: str, value: Any) -> None:
        value = self._check(type(self).__name__, keyword, kind, value)
        hyper = dict(self._hyper, **{field: value})
        self._engine.set_config(self._config_string(hyper))  # ValueError if out of range
        self._hyper = hyper

    # -- the reference interface -------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate, readable and writable between updates (the engine keeps it as
        float32)."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        value = _number(type(self).__name__, "lr", value)
        self._engine.lr = value
        self._hyper["lr"] = value

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

    @property
    def state_format(self) -> str:
        """The format of the optimizer state: ``"f32"``, ``"bf16"`` or ``"q8"``."""
        return self._engine.state_format

    @property
    def master_weights(self) -> bool:
        """Whether the weights are float16 with float32 master weights in the state."""
        return self._master

    @property
    def state_bytes(self) -> int:
        """Bytes of memory the optimizer state holds (master weights included)."""
        return self._engine.state_bytes

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

    @property
    def grad_scale(self) -> float:
        """The loss scale gradients are divided by as they are read (default 1)."""
        return self._engine.grad_scale

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        self._engine.grad_scale = _number(type(self).__name__, "grad_scale", value)

    @property
    def max_grad_norm(self) -> Optional[float]:
        """The global norm gradients are clipped to, or ``None`` (the default)."""
        return self._engine.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: Optional[float]) -> None:
        owner = type(self).__name__
        self._engine.max_grad_norm = None if value is None else _number(owner, "max_grad_norm", value)

    @property
    def non_finite(self) -> str:
        """What a NaN or infinite gradient does: ``"propagate"`` (default), ``"skip"`` the
        update, or ``"error"`` (raise ``ValueError``, nothing modified)."""
        return self._engine.non_finite

    @non_finite.setter
    def non_finite(self, value: str) -> None:
        self._engine.non_finite = value

    def save_state(self, path: PathLike) -> None:
        """Writes the optimizer state (moments, step counts, hyperparameters, array names) to
        ``path``: the Rust crate's checksummed safetensors state file, written atomically."""
        self._engine.save_state(os.fspath(path))

    def load_state(self, path: PathLike) -> None:
        """Reads a state file written by ``save_state`` (here or from Rust). Raises
        ``ValueError`` if it is for another optimizer or other arrays, ``OSError`` if it cannot
        be read; then nothing changes. The file's hyperparameters replace this optimizer's."""
        self._engine.load_state(os.fspath(path))
        config = self._engine.config
        self._hyper = _parse_fields(config)
        if self._keys is None or self._keys == _SINGLE:
            return
        names = self._engine.tensor_names
        if names and [str(k) for k in self._keys] != names:
            by_name = {str(k): k for k in self._keys}
            self._keys = tuple(by_name[n] for n in names)
            self._labels = _labels_of(self._keys)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{kw}={self._hyper[field]!r}" for kw, (field, _) in self._fields.items() if kw != "lr"
        )
        return f"{type(self).__name__}({shown})"


def _labels_of(keys: tuple[Any, ...]) -> list[tuple[str, str]]:
    return [(f"params[{k!r}]", f"grads[{k!r}]") for k in keys]


def _parse_fields(config: str) -> dict[str, Any]:
    """The fields of an engine configuration string, as Python values."""
    _, _, fields = config.partition(":")
    out: dict[str, Any] = {}
    for item in filter(None, fields.split(",")):
        key, _, text = item.partition("=")
        if text in ("true", "false"):
            out[key] = text == "true"
        elif key == "eps_mode":
            out[key] = {"seed": "sqrt_v", "pytorch": "sqrt_v_hat"}.get(text, text)
        else:
            try:
                out[key] = float(text)
            except ValueError:
                out[key] = text
    return out


_COMMON_DOC = """
    Keyword-only options (all optimizers): ``weight_decay`` (L2, ``g += weight_decay * w``),
    ``maximize`` (ascend), ``grad_scale`` (divide gradients by a loss scale), ``max_grad_norm``
    (clip by the global norm of all arrays of an update), ``non_finite`` (``"propagate"``,
    ``"skip"`` or ``"error"``); ``state_format`` (``"f32"``, ``"bf16"`` with stochastic
    rounding, or ``"q8"``, 8-bit block-wise), chosen at construction; ``master_weights``
    (float16 weight arrays, with float32 master weights kept in the optimizer state and the
    float16 ones written rounded to nearest). Gradients may be float16 in every mode.
"""


class SGD(Optimizer):
    """Stochastic gradient descent: ``w -= learning_rate * g``."""

    _rule = "sgd"
    _fields = {
        "learning_rate": ("lr", "number"),
        "weight_decay": ("weight_decay", "number"),
        "maximize": ("maximize", "flag"),
    }
    weight_decay = _Field("weight_decay", "number", "L2 weight decay.")

    def __init__(
        self,
        learning_rate: float = 0.01,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            {"learning_rate": learning_rate, "weight_decay": weight_decay, "maximize": maximize},
            grad_scale=grad_scale,
            max_grad_norm=max_grad_norm,
            non_finite=non_finite,
            state_format=state_format,
            master_weights=master_weights,
        )


class Momentum(Optimizer):
    """Momentum SGD: ``v = momentum * v - learning_rate * g; w += v``."""

    _rule = "momentum"
    _fields = {
        "learning_rate": ("lr", "number"),
        "momentum": ("momentum", "number"),
        "weight_decay": ("weight_decay", "number"),
        "maximize": ("maximize", "flag"),
    }
    momentum = _Field("momentum", "number", "The momentum coefficient, in [0, 1].")
    weight_decay = _Field("weight_decay", "number", "L2 weight decay.")

    def __init__(
        self,
        learning_rate: float = 0.01,
        momentum: float = 0.9,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            {
                "learning_rate": learning_rate,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "maximize": maximize,
            },
            grad_scale=grad_scale,
            max_grad_norm=max_grad_norm,
            non_finite=non_finite,
            state_format=state_format,
            master_weights=master_weights,
        )


class Nesterov(Momentum):
    """Nesterov's accelerated gradient, in the reference's form:
    ``w += momentum**2 * v - (1 + momentum) * learning_rate * g`` then
    ``v = momentum * v - learning_rate * g`` (that is, ``w += momentum * v_new - lr * g``)."""

    _rule = "nag"


class AdaGrad(Optimizer):
    """AdaGrad: ``h += g * g; w -= learning_rate * g / (sqrt(h) + eps)``, eps 1e-7."""

    _rule = "adagrad"
    _fields = {
        "learning_rate": ("lr", "number"),
        "eps": ("eps", "number"),
        "weight_decay": ("weight_decay", "number"),
        "maximize": ("maximize", "flag"),
    }
    eps = _Field("eps", "number", "Added to sqrt(h).")
    weight_decay = _Field("weight_decay", "number", "L2 weight decay.")

    def __init__(
        self,
        learning_rate: float = 0.01,
        *,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            {
                "learning_rate": learning_rate,
                "eps": eps,
                "weight_decay": weight_decay,
                "maximize": maximize,
            },
            grad_scale=grad_scale,
            max_grad_norm=max_grad_norm,
            non_finite=non_finite,
            state_format=state_format,
            master_weights=master_weights,
        )


class RMSProp(Optimizer):
    """RMSProp: ``h = decay_rate * h + (1 - decay_rate) * g * g;
    w -= learning_rate * g / (sqrt(h) + eps)``, eps 1e-7."""

    _rule = "rmsprop"
    _fields = {
        "learning_rate": ("lr", "number"),
        "decay_rate": ("decay_rate", "number"),
        "eps": ("eps", "number"),
        "weight_decay": ("weight_decay", "number"),
        "maximize": ("maximize", "flag"),
    }
    decay_rate = _Field("decay_rate", "number", "The decay of the squared-gradient average.")
    eps = _Field("eps", "number", "Added to sqrt(h).")
    weight_decay = _Field("weight_decay", "number", "L2 weight decay.")

    def __init__(
        self,
        learning_rate: float = 0.01,
        decay_rate: float = 0.9,
        *,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            {
                "learning_rate": learning_rate,
                "decay_rate": decay_rate,
                "eps": eps,
                "weight_decay": weight_decay,
                "maximize": maximize,
            },
            grad_scale=grad_scale,
            max_grad_norm=max_grad_norm,
            non_finite=non_finite,
            state_format=state_format,
            master_weights=master_weights,
        )


class Adam(Optimizer):
    """Adam, as the reference writes it: ``lr_t = learning_rate * sqrt(1 - beta2**t) /
    (1 - beta1**t)``, ``m += (1 - beta1) * (g - m)``, ``v += (1 - beta2) * (g*g - v)``,
    ``w -= lr_t * m / (sqrt(v) + eps)``, eps 1e-7.

    Keyword-only extras: ``decoupled_weight_decay`` (AdamW), ``amsgrad``, and ``eps_mode``:
    ``"sqrt_v"`` (the reference: eps added to sqrt(v)) or ``"sqrt_v_hat"`` (PyTorch: eps added
    to the bias-corrected sqrt(v_hat)).
    """

    _rule = "adam"
    _fields = {
        "learning_rate": ("lr", "number"),
        "beta1": ("beta1", "number"),
        "beta2": ("beta2", "number"),
        "eps": ("eps", "number"),
        "weight_decay": ("weight_decay", "number"),
        "maximize": ("maximize", "flag"),
        "decoupled_weight_decay": ("decoupled_weight_decay", "flag"),
        "amsgrad": ("amsgrad", "flag"),
        "eps_mode": ("eps_mode", "choice"),
    }
    beta1 = _Field("beta1", "number", "The first moment's decay, in [0, 1).")
    beta2 = _Field("beta2", "number", "The second moment's decay, in [0, 1).")
    eps = _Field("eps", "number", "Added to sqrt(v) (or sqrt(v_hat), per eps_mode).")
    weight_decay = _Field("weight_decay", "number", "L2 (or decoupled) weight decay.")

    def __init__(
        self,
        learning_rate: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        *,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        eps_mode: str = "sqrt_v",
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            {
                "learning_rate": learning_rate,
                "beta1": beta1,
                "beta2": beta2,
                "eps": eps,
                "weight_decay": weight_decay,
                "maximize": maximize,
                "decoupled_weight_decay": decoupled_weight_decay,
                "amsgrad": amsgrad,
                "eps_mode": eps_mode,
            },
            grad_scale=grad_scale,
            max_grad_norm=max_grad_norm,
            non_finite=non_finite,
            state_format=state_format,
            master_weights=master_weights,
        )


for _cls in (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam):
    _cls.__doc__ = (_cls.__doc__ or "") + "\n" + _COMMON_DOC
del _cls
