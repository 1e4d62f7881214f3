"""Drop-ins for ``torch.optim`` on CPU float32 tensors, run by the fusedopt engine.

``SGD``, ``Adagrad``, ``RMSprop``, ``Adam`` and ``AdamW`` subclass ``torch.optim.Optimizer`` with
torch's constructor signatures and defaults, and follow torch's formulas: replacing
``torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)`` by
``fusedopt.torch.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)`` is the whole change.

* Hyperparameters are read from ``param_groups`` at every step, so ``torch.optim.lr_scheduler``
  schedulers (which write ``lr``, and for some ``betas``/``momentum``) and hand edits work.
  ``lr`` and ``weight_decay`` may differ between groups; the other hyperparameters must be
  the same in every group.
* Parameters whose ``.grad`` is ``None`` are skipped: their weights and state are left alone
  and they keep their own step count (Adam's bias correction uses it), as in torch.
* The whole model, every group, is one engine step, on ``fusedopt.get_num_threads()`` threads,
  with the GIL released. Weights are updated and gradients read in place, through their own
  memory.
* ``state_dict()`` has torch's structure and keys (``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``; ``momentum_buffer``; ``sum``; ``square_avg``, ``grad_avg``) and its tensors view the
  engine's memory (no copy per call); ``optimizer.state[p]`` gives the same views.
  ``load_state_dict()`` takes a dict written by this class or by the same ``torch.optim``
  class (and ``torch.optim`` loads ours); a dict that does not fit raises and changes nothing.
  ``add_param_group`` works before and after the first step (the new parameters start fresh).
  ``torch.distributed.optim.ZeroRedundancyOptimizer(..., optimizer_class=fusedopt.torch.AdamW)``
  shards the state across processes.
* Every option of these classes is implemented but the CUDA-only and autograd ones:
  ``foreach=True``, ``capturable=True`` and ``differentiable=True`` raise ``ValueError`` when
  the optimizer is built (``fused`` is accepted: the engine is fused). Tensors must be CPU, float32, dense and
  contiguous; anything else raises before anything is modified.
* ``flat_grads=True`` (keyword-only, every class) keeps all gradients as views of one flat
  buffer, as apex and DeepSpeed do: ``zero_grad()`` zeroes the buffer instead of dropping the
  gradients, backward accumulates into the views, and a step checks only that each ``.grad``
  is still its view (the parameters' addresses are checked by ``zero_grad``, and their memory
  is held). It removes most of the per-tensor Python work of a step, which dominates for
  models of many small tensors. In this mode ``zero_grad`` behaves as
  ``zero_grad(set_to_none=False)``: every parameter that requires grad has a (zero) gradient
  and is stepped. A ``.grad`` replaced by other code is copied into the buffer at the next step.
* Low precision (keyword-only, every class): ``state_format="bf16"`` keeps the state in
  bfloat16 with stochastic rounding, ``state_format="q8"`` in 8 bits per value (blocks of 256
  with a float32 scale each); ``master_weights=True`` steps bfloat16 or float16 parameters
  (and gradients), keeping float32 master weights in the state and writing the parameters
  rounded to nearest. ``state_dict()`` then carries the state decoded to float32 tensors
  (copies, taken at the call) and the master weights under the key ``"master"``, so
  ``load_state_dict`` resumes exactly; a dict without ``"master"`` (``torch.optim``'s) starts
  the master weights from the parameters.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Callable, Optional, Union

import torch
from torch.autograd.graph import increment_version

from ._engine import Engine, rules

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]

_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous

Params = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]

#: The dtypes the engine steps, by the names it knows them by.
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_HALF = (torch.bfloat16, torch.float16)


def _flat_numpy(t: torch.Tensor) -> Any:
    """A state tensor's values as a flat, contiguous float32 numpy array."""
    return t.detach().reshape(-1).contiguous().numpy()


def _describe(kind: str, i: int, group: int, t: torch.Tensor) -> str:
    return f"{kind} {i} (group {group}, shape {tuple(t.shape)})"


class _EngineState(MutableMapping):
    """``optimizer.state`` of the fusedopt.torch classes: each parameter's state as torch
    keeps it (``step`` and the class's buffers), its tensors viewing the engine's memory.
    Reading builds the dict; assigning ``state[p] = {...}`` loads one parameter's state
    (checked as ``load_state_dict`` checks it); ``del state[p]`` starts it afresh."""

    def __init__(self, optimizer: "_FusedOptimizer") -> None:
        self._opt = optimizer

    def _index(self, p: Any) -> int:
        i = self._opt._index_of().get(id(p))
        if i is None:
            raise KeyError(p)
        return i

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        i = self._index(p)
        state = self._opt._param_state(i, p)
        if state is None:
            raise KeyError(p)
        return state

    def items(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:  # type: ignore[override]
        """Every parameter with state and its state, built in one pass."""
        opt = self._opt
        engine = opt._engine
        steps = [] if engine is None else engine.tensor_steps
        held = [] if engine is None else engine.state_names
        out = []
        for i, p in enumerate(opt._param_list()):
            state = opt._param_state(i, p, steps, held)
            if state is not None:
                out.append((p, state))
        return out

    def values(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [state for _, state in self.items()]

    def __iter__(self) -> Iterator[torch.Tensor]:
        opt = self._opt
        params = opt._param_list()
        engine = opt._engine
        if opt._eager_state:
            return iter(params)
        if engine is None or not opt._all_keys(opt.param_groups[0]):
            return iter(())
        steps = engine.tensor_steps
        return iter([p for p, s in zip(params, steps) if s > 0])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, p: object) -> bool:
        return any(q is p for q in self)

    def __setitem__(self, p: torch.Tensor, value: Mapping[str, Any]) -> None:
        self._opt._set_param_state(self._index(p), value)

    def __delitem__(self, p: torch.Tensor) -> None:
        if p not in self:
            raise KeyError(p)
        self._opt._set_param_state(self._index(p), {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} parameters with state)"


class _FusedOptimizer(torch.optim.Optimizer):
    """What the five classes share: the engine, the tensor checks and the step."""

    #: (argument, the values the engine implements) pairs checked in every group.
    _unsupported: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    #: Hyperparameters that must be equal in every group (besides lr and weight_decay).
    _shared: tuple[str, ...] = ()

    def __init__(
        self,
        params: Params,
        defaults: dict[str, Any],
        flat_grads: bool,
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        name = type(self).__name__
        if not isinstance(flat_grads, bool):
            raise TypeError(f"{name}: flat_grads must be True or False")
        if not isinstance(master_weights, bool):
            raise TypeError(f"{name}: master_weights must be True or False")
        if not isinstance(state_format, str):
            raise TypeError(f"{name}: state_format must be a str, not {type(state_format).__name__}")
        Engine("sgd").set_settings(state_format=state_format)  # ValueError for an unknown one
        self._state_format = state_format
        self._master = master_weights
        self._dtype: Optional[torch.dtype] = None
        self._engine: Optional[Engine] = None
        self._flat = flat_grads
        self._reset_cache()
        super().__init__(params, defaults)
        self.state = _EngineState(self)  # type: ignore[assignment]
        if flat_grads:
            self._bind()  # the views exist before the first backward, which fills them

    def _reset_cache(self) -> None:
        self._state_cache: Optional[tuple[Any, list[str], list[Optional[dict[str, Any]]]]] = None
        self._params: Optional[list[torch.Tensor]] = None
        self._group_of: list[int] = []
        self._weight_ptrs: list[int] = []
        self._lens: list[int] = []
        self._config: Optional[tuple[str, dict[str, Any]]] = None
        self._group_hyper: Optional[tuple[list[float], list[float]]] = None
        self._buffer: Optional[torch.Tensor] = None
        self._views: list[Optional[torch.Tensor]] = []
        self._view_ptrs: list[int] = []

    # -- copying and pickling --------------------------------------------------------------

    #: What ``_reset_cache`` and ``_bind`` rebuild, and ``state`` (made from the engine):
    #: left out of copies and pickles.
    _TRANSIENT = (
        "state",
        "_state_cache",
        "_params",
        "_group_of",
        "_weight_ptrs",
        "_lens",
        "_config",
        "_group_hyper",
        "_buffer",
        "_views",
        "_view_ptrs",
        "_storages",
        "_index_cache",
    )

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: the groups, the defaults and the engine
        with its state (torch's own ``__getstate__`` would drop the engine). Hooks are dropped,
        as torch drops them."""
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in self._TRANSIENT and not k.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_cache()
        self.state = _EngineState(self)  # type: ignore[assignment]
        if self._flat:
            self._bind()  # the copied parameters get views of a new flat buffer

    # -- building ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group, as torch's. Once the optimizer holds state, the state of
        the parameters it had is kept and the new parameters start fresh."""
        stateful = getattr(self, "_engine", None) is not None and self._engine.layout is not None
        kept = self._collect_state() if stateful else {}
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], self.param_groups[0])
            if stateful:
                self._install(self.param_groups, kept)
        except BaseException:
            self.param_groups.pop()
            raise
        if hasattr(self, "_params") and not stateful:
            self._reset_cache()

    def _check_group(self, group: dict[str, Any], first: dict[str, Any]) -> None:
        """Refuses a group with an argument the engine does not implement, or whose shared
        hyperparameters differ from ``first``'s."""
        name = type(self).__name__
        for key, ok in self._unsupported:
            value = group.get(key, ok[0])
            if not any(value is v if v is None else value == v for v in ok):
                shown = " or ".join(f"{key}={v!r}" for v in ok)
                raise ValueError(
                    f"{name}: {key}={value!r} is not implemented by fusedopt (supported: {shown})"
                )
        for key in self._shared:
            if group.get(key) != first.get(key):
                raise ValueError(
                    f"{name}: {key} differs between parameter groups ({first.get(key)!r} and "
                    f"{group.get(key)!r}); fusedopt steps every group with one {key}, only lr "
                    "and weight_decay may differ"
                )

    def _hyper(self, group: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The engine's optimizer for ``group``'s shared hyperparameters, and those
        hyperparameters as the engine names them (``lr`` 1: each group's lr is its scale)."""
        raise NotImplementedError

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Performs one optimization step over every parameter group, and returns the
        closure's loss if a closure (re-evaluating the model) is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._flat and self._params is not None:
            # flat_grads: the weights' addresses are checked by zero_grad and whenever a
            # gradient is not its view; their storages are held, so memory stays valid.
            params = self._params
            if all(map(operator.is_, map(_grad_of, params), self._views)):
                grad_ptrs = None  # the views, bound to the engine once
            else:
                params = self._bind()
                grad_ptrs = self._attach_views(params)
        else:
            params = self._bind()
            grad_ptrs = self._flat_grad_ptrs(params) if self._flat else self._grad_ptrs(params)
        self._sync_hyper()
        assert self._engine is not None
        self._engine.step_bound(grad_ptrs)
        increment_version(params)
        return loss

    def _bind(self) -> list[torch.Tensor]:
        """The parameters, bound to the engine; rechecked when one's memory moved."""
        params = self._params
        if params is not None and list(map(_data_ptr, params)) == self._weight_ptrs:
            return params
        params, group_of = [], []
        for k, group in enumerate(self.param_groups):
            params.extend(group["params"])
            group_of.extend([k] * len(group["params"]))
        dtype = self._param_dtype(params, group_of)
        ptrs, lens = list(map(_data_ptr, params)), list(map(_numel, params))
        if self._engine is None:
            self._engine = self._new_engine(self.param_groups[0])
        self._engine.bind_weights(ptrs, lens, _DTYPE_NAMES[dtype])
        self._dtype = dtype
        self._params, self._group_of, self._weight_ptrs, self._lens = params, group_of, ptrs, lens
        if self._flat:
            self._storages = [p.untyped_storage() for p in params]
        self._group_hyper = None
        if self._flat:
            self._install_views()
        return params

    def _new_engine(self, group: dict[str, Any]) -> Engine:
        rule, hyper = self._hyper(group)
        engine = Engine(rule, **hyper)
        engine.set_settings(state_format=self._state_format)
        return engine

    def _param_dtype(self, params: list[torch.Tensor], group_of: list[int]) -> torch.dtype:
        """Checks every parameter and returns their one dtype: float32, or bfloat16/float16
        with ``master_weights=True``."""
        name = type(self).__name__
        dtype: Optional[torch.dtype] = None
        for i, p in enumerate(params):
            what = _describe("parameter", i, group_of[i], p)
            if isinstance(p, torch.Tensor) and dtype is not None and p.dtype != dtype:
                raise TypeError(
                    f"{name}: {what} is {p.dtype} and parameter 0 {dtype}: fusedopt steps "
                    "parameters of one dtype"
                )
            if isinstance(p, torch.Tensor) and p.dtype in _HALF and not self._master:
                raise TypeError(
                    f"{name}: {what} is {p.dtype}: pass master_weights=True for the optimizer "
                    "to keep float32 master weights and write the parameters rounded to nearest"
                )
            if isinstance(p, torch.Tensor) and p.dtype == torch.float32 and self._master:
                raise TypeError(
                    f"{name}: {what} is float32, and master_weights=True keeps float32 master "
                    "copies of bfloat16 or float16 parameters: cast the model (model.bfloat16()) "
                    "or drop master_weights"
                )
            self._check_tensor(name, what, p, p.dtype if isinstance(p, torch.Tensor) else None)
            dtype = p.dtype
        return torch.float32 if dtype is None else dtype

    def _check_tensor(self, name: str, what: str, t: Any, dtype: Optional[torch.dtype] = None) -> None:
        """Refuses what the engine cannot step: not a dense, contiguous CPU tensor of
        ``dtype`` (by default the parameters' dtype)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{name}: {what} is {t.layout}; fusedopt steps dense tensors")
        want = dtype or self._dtype or torch.float32
        if t.dtype != want or want not in _DTYPE_NAMES:
            raise TypeError(
                f"{name}: {what} is {t.dtype}; fusedopt.torch steps float32 tensors (bfloat16 "
                f"or float16 with master_weights=True), here {want}"
            )
        if not t.is_cpu:
            raise ValueError(f"{name}: {what} is on {t.device}; fusedopt.torch steps CPU tensors")
        if not t.is_contiguous():
            raise ValueError(f"{name}: {what} is not contiguous; fusedopt steps contiguous tensors")

    def _sync_hyper(self) -> None:
        """Pushes the groups' hyperparameters to the engine where they changed."""
        assert self._engine is not None
        groups = self.param_groups
        first = groups[0]
        for group in groups[1:]:
            for key in self._shared:
                if group.get(key) != first.get(key):
                    raise ValueError(
                        f"{type(self).__name__}: {key} differs between parameter groups "
                        f"({first.get(key)!r} and {group.get(key)!r}); only lr and "
                        "weight_decay may differ"
                    )
        config = self._hyper(first)
        if config != self._config:
            rule, hyper = config
            if rule != self._engine.name:
                raise ValueError(
                    f"{type(self).__name__}: the hyperparameters now ask for the engine's {rule!r} "
                    f"optimizer, and this one runs {self._engine.name!r}; build the optimizer "
                    "with the settings it will use"
                )
            self._engine.set_hyper(**hyper)
            self._config = config
        hyper = (
            [float(g["lr"]) for g in groups],
            [float(g.get("weight_decay", 0.0)) for g in groups],
        )
        if hyper != self._group_hyper:
            group_of = self._group_of if self._group_hyper is None else None
            self._engine.set_groups(group_of, hyper[0], hyper[1])
            self._group_hyper = hyper

    def _grad_ptrs(self, params: list[torch.Tensor]) -> list[int]:
        """Every gradient's address (0 for none), after checking them all."""
        grads = list(map(_grad_of, params))
        if any(map(operator.is_, grads, [None] * len(grads))):
            return self._sparse_grad_ptrs(params, grads)
        # One C-level pass per property, the fewest that make every address safe to read:
        # torch keeps a .grad on its parameter's device (the setter and AccumulateGrad check
        # it), is_contiguous raises for a sparse gradient, and numel catches a .grad.data
        # of another size. When anything is off, the one-at-a-time path checks everything and
        # names the gradient.
        try:
            ok = (
                set(map(_dtype_of, grads)) == {self._dtype}
                and all(map(_is_contiguous, grads))
                and list(map(_numel, grads)) == self._lens
            )
        except RuntimeError:  # a sparse gradient
            ok = False
        if ok:
            return list(map(_data_ptr, grads))
        return self._sparse_grad_ptrs(params, grads)  # finds and names the bad one

    def _sparse_grad_ptrs(self, params: list[torch.Tensor], grads: list[Any]) -> list[int]:
        """The same, one gradient at a time (some are None, or one is bad)."""
        name = type(self).__name__
        ptrs = []
        for i, (g, n) in enumerate(zip(grads, self._lens)):
            if g is None:
                ptrs.append(0)
                continue
            what = "the grad of " + _describe("parameter", i, self._group_of[i], params[i])
            self._check_tensor(name, what, g)
            if g.numel() != n:
                raise ValueError(f"{name}: {what} has {g.numel()} elements, not {n}")
            ptrs.append(g.data_ptr())
        return ptrs

    # -- flat gradients ----------------------------------------------------------------------

    def _install_views(self) -> None:
        """Makes every gradient a view of one flat buffer (flat_grads=True)."""
        params = self._params
        assert params is not None
        total = sum(n for p, n in zip(params, self._lens) if p.requires_grad)
        if self._buffer is None or self._buffer.numel() != total or self._buffer.dtype != self._dtype:
            self._buffer = torch.zeros(total, dtype=self._dtype)
        views: list[Optional[torch.Tensor]] = []
        offset = 0
        for p, n in zip(params, self._lens):
            if not p.requires_grad:
                views.append(None)
                continue
            views.append(self._buffer[offset : offset + n].view_as(p))
            offset += n
        self._views = views
        self._view_ptrs = [0 if v is None else v.data_ptr() for v in views]
        assert self._engine is not None
        self._engine.bind_grads(self._view_ptrs)
        self._attach_views(params)

    def _attach_views(self, params: list[torch.Tensor]) -> list[int]:
        """Points each ``.grad`` back at its view, copying a gradient other code put there
        (and zeroing the view of one it dropped); returns the gradient addresses (0 where a
        parameter has none this step)."""
        ptrs = []
        name = type(self).__name__
        for i, (p, v) in enumerate(zip(params, self._views)):
            g = p.grad
            if g is v:
                ptrs.append(0 if v is None else self._view_ptrs[i])
                continue
            if g is None:
                # No gradient this step (other code dropped it): skip the parameter, and
                # give it back a zeroed view for the next backward to fill.
                if v is not None:
                    v.zero_()
                    p.grad = v
                ptrs.append(0)
                continue
            if v is None:  # a gradient on a parameter that does not require grad
                what = "the grad of " + _describe("parameter", i, self._group_of[i], p)
                self._check_tensor(name, what, g)
                ptrs.append(g.data_ptr())
                continue
            what = "the grad of " + _describe("parameter", i, self._group_of[i], p)
            self._check_tensor(name, what, g)
            v.copy_(g)
            p.grad = v
            ptrs.append(self._view_ptrs[i])
        return ptrs

    def _flat_grad_ptrs(self, params: list[torch.Tensor]) -> Optional[list[int]]:
        if all(map(operator.is_, map(_grad_of, params), self._views)):
            return None  # the views, bound to the engine once
        return self._attach_views(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's ``zero_grad``. With ``flat_grads=True`` the flat buffer is zeroed and
        the gradients stay (``set_to_none`` is ignored)."""
        if not self._flat:
            super().zero_grad(set_to_none)
            return
        params = self._bind()
        assert self._buffer is not None
        self._buffer.zero_()
        self._attach_views(params)

    # -- state ---------------------------------------------------------------------------------

    #: torch's per-parameter state keys besides ``step``, each with the engine buffer it is
    #: (set per class by ``_state_keys``).
    _keeps_step = True
    #: Whether torch creates the state of every parameter at construction (Adagrad).
    _eager_state = False
    #: The hyperparameters every group of this class has (to recognise another class's dict).
    _group_keys: tuple[str, ...] = ()

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """(torch key, engine buffer) pairs of a parameter's state under ``group``'s settings."""
        raise NotImplementedError

    def _initial_value(self, key: str) -> float:
        """The value state ``key`` starts from (0 but for Adagrad's ``sum``)."""
        return 0.0

    def _derived_state(self, group: Mapping[str, Any], step: int) -> dict[str, float]:
        """The scalars torch keeps per parameter that the engine derives from the step, by
        state key (none by default)."""
        return {}

    def _all_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """``_state_keys`` and, with master weights, ``("master", "master")``."""
        keys = self._state_keys(group)
        return keys + (("master", "master"),) if self._master else keys

    def _param_list(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _index_of(self) -> dict[int, int]:
        """Each parameter's index (by ``id``), cached while the groups' lists stay the same."""
        key = [(id(g["params"]), len(g["params"])) for g in self.param_groups]
        cached = getattr(self, "_index_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, {id(p): i for i, p in enumerate(self._param_list())})
            self._index_cache = cached
        return cached[1]

    def _param_state(
        self,
        i: int,
        p: torch.Tensor,
        steps: Optional[list[int]] = None,
        held: Optional[list[str]] = None,
    ) -> Optional[dict[str, Any]]:
        """Parameter ``i``'s state as torch keeps it, its tensors viewing the engine's buffers;
        ``None`` when it has none. ``steps`` and ``held``: the engine's ``tensor_steps`` (empty
        before it has state) and ``state_names``, when the caller has them."""
        engine = self._engine
        if steps is None:
            steps = [] if engine is None else engine.tensor_steps
        keys = self._all_keys(self.param_groups[0])
        if engine is None or not steps:
            if not self._eager_state:
                return None
            state: dict[str, Any] = {"step": torch.tensor(0.0)}
            state.update(
                (key, torch.full_like(p, self._initial_value(key), dtype=torch.float32))
                for key, _ in keys
            )
            return state
        step = steps[i]
        if step == 0 and not self._eager_state:
            return None
        held = engine.state_names if held is None else held
        # The dicts are kept, as torch keeps its state dicts: later calls give the same views
        # and update the same step tensor.
        cache = self._state_cache
        if cache is None or cache[0] is not engine or cache[1] != held or len(cache[2]) != len(steps):
            cache = (engine, list(held), [None] * len(steps))
            self._state_cache = cache
        state = cache[2][i]
        derived = self._derived_state(self.param_groups[0], step)
        if state is not None:
            if self._keeps_step:
                state["step"].fill_(float(step))
            for key, value in derived.items():
                state[key].fill_(value)
            return state
        state = {"step": torch.tensor(float(step))} if self._keeps_step else {}
        state.update((k, torch.tensor(v, dtype=torch.float32)) for k, v in derived.items())
        # float32 state is viewed; compact state is decoded into new tensors at every call.
        complete = self._state_format == "f32"
        for key, buffer in keys:
            if buffer in held and (complete or buffer == "master"):
                state[key] = torch.from_numpy(engine.state_array(buffer, i)).view(p.shape)
            elif buffer in held:
                state[key] = torch.from_numpy(engine.read_state(buffer, i)).view(p.shape)
            else:  # a buffer the engine creates at its next step (AMSGrad turned on)
                state[key] = torch.zeros_like(p, dtype=torch.float32)
                complete = False
        if not state:
            return None
        if complete:
            cache[2][i] = state
        return state

    def _collect_state(self) -> dict[int, tuple[int, dict[str, torch.Tensor]]]:
        """Every parameter's state, by index: (step, {engine buffer: tensor})."""
        out = {}
        for p, state in self.state.items():
            i = self._index_of()[id(p)]
            step = int(state.get("step", 1))
            buffers = {b: state[k] for k, b in self._all_keys(self.param_groups[0]) if k in state}
            out[i] = (step, buffers)
        return out

    def _install(
        self,
        groups: list[dict[str, Any]],
        states: Mapping[int, tuple[int, Mapping[str, torch.Tensor]]],
    ) -> None:
        """Builds an engine for ``groups`` holding ``states`` (parameter index: (step, {engine
        buffer: values})), and makes it the optimizer's. Everything that can fail happens
        before the switch; the old engine stays alive as long as views of it do."""
        name = type(self).__name__
        params, group_of = [], []
        for k, group in enumerate(groups):
            params.extend(group["params"])
            group_of.extend([k] * len(group["params"]))
        dtype = self._param_dtype(params, group_of)
        lens = list(map(_numel, params))
        engine = self._new_engine(groups[0])
        engine.bind_weights(list(map(_data_ptr, params)), lens, _DTYPE_NAMES[dtype])
        engine.set_groups(
            group_of,
            [float(g["lr"]) for g in groups],
            [float(g.get("weight_decay", 0.0)) for g in groups],
        )
        engine.init_state(lens)
        steps = [0] * len(params)
        for i, (step, buffers) in states.items():
            for buffer, values in buffers.items():
                engine.write_state(buffer, i, _flat_numpy(values))
            steps[i] = step
        engine.set_tensor_steps(steps)
        # Switch.
        self._engine = engine
        self._dtype = dtype
        self._params = None  # rebinds (and reattaches flat gradients) at the next step
        self._config = None
        self._group_hyper = None
        if self._flat:
            self._bind()

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a state dict written by ``state_dict()`` of this class or of the same
        ``torch.optim`` class: the hyperparameters of every group, and each parameter's state
        (``step`` and the class's buffers). Everything is checked before anything changes: a
        dict of another class, another number or shape of parameters, missing or extra keys,
        another dtype or device raise ``ValueError`` or ``TypeError`` and leave the optimizer
        as it was."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{name}: a state dict is a dict, not {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"{name}: the state dict has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if not isinstance(saved_groups, list) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved_groups
        ):
            raise ValueError(f"{name}: 'param_groups' must be a list of dicts with 'params'")
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"{name}: 'state' must be a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: the state dict has {len(saved_groups)} parameter groups, the "
                f"optimizer {len(self.param_groups)}"
            )
        for k, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{name}: parameter group {k} of the state dict has {len(sg['params'])} "
                    f"parameters, the optimizer's has {len(g['params'])}"
                )
        # The groups to install: the saved hyperparameters, with this optimizer's parameters.
        groups = []
        for g, sg in zip(self.param_groups, saved_groups):
            missing = [key for key in self._group_keys if key not in sg]
            if missing:
                raise ValueError(
                    f"{name}: the state dict's parameter groups lack {', '.join(missing)}: it "
                    f"was not written by {name} or torch.optim.{name}"
                )
            group = {key: copy.deepcopy(v) for key, v in sg.items() if key != "params"}
            for key, default in self.defaults.items():
                group.setdefault(key, default)
            self._fix_loaded_group(group)
            group["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                group["param_names"] = g["param_names"]
            groups.append(group)
        for group in groups:
            self._check_group(group, groups[0])
        # Each saved index is a position in the saved groups, as torch maps them.
        index_of: dict[Any, int] = {}
        for position, key in enumerate(k for sg in saved_groups for k in sg["params"]):
            index_of[key] = position
        params = [p for g in groups for p in g["params"]]
        states: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        for key, value in saved_state.items():
            if key not in index_of:
                raise ValueError(
                    f"{name}: the state dict has state for parameter {key!r}, which none of "
                    "its parameter groups lists"
                )
            i = index_of[key]
            checked = self._check_param_state(key, value, params[i], groups[0])
            if checked is not None:
                states[i] = checked
        self._install(groups, states)
        self.param_groups = groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_param_state(
        self, key: Any, value: Any, p: torch.Tensor, group: Mapping[str, Any]
    ) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        """A parameter's loaded state, checked against ``p`` and the settings of ``group``:
        (step, {engine buffer: tensor}), or ``None`` for no state yet."""
        name = type(self).__name__
        keys = self._all_keys(group)
        expected = ({"step"} if self._keeps_step else set()) | {k for k, _ in keys}
        expected |= set(self._derived_state(group, 0))
        if self._master and "master" not in value:
            # A dict without master weights (torch.optim's): they start from the parameters.
            keys = self._state_keys(group)
            expected.discard("master")
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: the state of parameter {key!r} is not a dict")
        if not value or (
            not self._keeps_step
            and value.get("momentum_buffer") is None
            and value.get("master") is None
        ):
            if set(value) - {"momentum_buffer"}:
                extra = sorted(set(value) - {"momentum_buffer"})
                raise ValueError(
                    f"{name}: the state of parameter {key!r} has {', '.join(extra)}, which "
                    f"{name} does not keep"
                )
            return None  # no state yet
        found = set(value)
        if found != expected:
            parts = []
            if expected - found:
                parts.append("lacks " + ", ".join(sorted(expected - found)))
            if found - expected:
                parts.append("has " + ", ".join(sorted(found - expected)))
            raise ValueError(
                f"{name}: the state of parameter {key!r} {' and '.join(parts)}: {name} with "
                f"these settings keeps {', '.join(sorted(expected)) or 'no state'}"
            )
        step = self._loaded_step(name, key, value.get("step", 1))
        buffers = {}
        for state_key, buffer in keys:
            t = value[state_key]
            what = f"state {state_key!r} of parameter {key!r}"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: {what} is a {type(t).__name__}, not a tensor")
            if t.dtype != torch.float32:
                raise TypeError(f"{name}: {what} is {t.dtype}, fusedopt keeps float32 state")
            if not t.is_cpu or t.layout != torch.strided:
                raise ValueError(
                    f"{name}: {what} is a {t.layout} tensor on {t.device}; fusedopt keeps "
                    "dense CPU state (load with map_location='cpu')"
                )
            if t.shape != p.shape:
                raise ValueError(
                    f"{name}: {what} has shape {tuple(t.shape)}, its parameter "
                    f"{tuple(p.shape)}"
                )
            buffers[buffer] = t
        return step, buffers

    def _set_param_state(self, i: int, value: Mapping[str, Any]) -> None:
        """``state[p] = value``: loads parameter ``i``'s state (``{}``: starts it afresh)."""
        params = self._param_list()
        checked = self._check_param_state(i, value, params[i], self.param_groups[0])
        step, buffers = checked if checked is not None else (0, {})
        engine = self._engine
        if engine is None or engine.layout is None:
            self._install(self.param_groups, {i: (step, buffers)} if buffers or step else {})
            return
        self._bind()
        engine.init_state(self._lens)
        for _, buffer in self._all_keys(self.param_groups[0]):
            if buffer in buffers:
                engine.write_state(buffer, i, _flat_numpy(buffers[buffer]))
            elif buffer == "master":
                params_i = params[i].detach().reshape(-1).float()
                engine.write_state(buffer, i, params_i.numpy())
            else:
                engine.write_state(buffer, i, torch.zeros(self._lens[i]).numpy())
        steps = engine.tensor_steps
        steps[i] = step
        engine.set_tensor_steps(steps)

    @staticmethod
    def _loaded_step(name: str, key: Any, step: Any) -> int:
        if isinstance(step, torch.Tensor):
            if step.numel() != 1:
                raise ValueError(f"{name}: the step of parameter {key!r} is not one number")
            step = step.item()
        try:
            value = float(step)
        except (TypeError, ValueError):
            raise TypeError(
                f"{name}: the step of parameter {key!r} is a {type(step).__name__}"
            ) from None
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            raise ValueError(f"{name}: the step of parameter {key!r} is {step!r}")
        return int(value)

    def _fix_loaded_group(self, group: dict[str, Any]) -> None:
        """Adjusts a loaded group as torch's ``__setstate__`` does for this class."""

    # -- engine extras -----------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Steps taken by the engine (each parameter's own count is in ``tensor_steps``)."""
        return 0 if self._engine is None else self._engine.steps

    @property
    def tensor_steps(self) -> list[int]:
        """Each parameter's own step count, in group order."""
        return [] if self._engine is None else self._engine.tensor_steps


class SGD(_FusedOptimizer):
    """``torch.optim.SGD`` on the fusedopt engine: ``b = momentum * b + (1 - dampening) * g``
    (``b = g`` at a parameter's first step), ``w -= lr * b`` (nesterov: ``w -= lr * (g + momentum * b)``), L2 ``weight_decay`` and
    ``maximize`` as torch's. The current ``lr`` applies to the whole buffer, as in torch."""

    _unsupported = (
        ("foreach", (None, False)),
        ("differentiable", (False,)),
        ("fused", (None, True)),
    )
    _shared = ("momentum", "dampening", "nesterov", "maximize")
    _keeps_step = False
    _group_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Union[float, torch.Tensor] = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        flat_grads: bool = False,
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        defaults = _torch_defaults(locals())
        _check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self._momentum_rule = momentum != 0
        super().__init__(params, defaults, flat_grads, state_format, master_weights)

    def _hyper(self, group: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        momentum = float(group["momentum"])
        maximize = bool(group["maximize"])
        if not self._momentum_rule:
            if momentum != 0:
                raise ValueError(
                    "SGD: momentum changed from 0 after the optimizer was built; build it "
                    "with the momentum it will use"
                )
            return "sgd", {"lr": 1.0, "maximize": maximize}
        if group["nesterov"]:
            return "nag", {"lr": 1.0, "momentum": momentum, "form": "buffer", "maximize": maximize}
        hyper = {"lr": 1.0, "momentum": momentum, "form": "buffer", "maximize": maximize}
        return "momentum", dict(hyper, dampening=float(group["dampening"]))

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        return (("momentum_buffer", "v"),) if float(group["momentum"]) != 0 else ()

    def _install(
        self,
        groups: list[dict[str, Any]],
        states: Mapping[int, tuple[int, Mapping[str, torch.Tensor]]],
    ) -> None:
        # A loaded state dict may bring momentum to an SGD built without it, or take it away.
        before = self._momentum_rule
        self._momentum_rule = float(groups[0]["momentum"]) != 0
        try:
            super()._install(groups, states)
        except BaseException:
            self._momentum_rule = before
            raise


class Adagrad(_FusedOptimizer):
    """``torch.optim.Adagrad`` on the fusedopt engine: ``h += g * g``,
    ``w -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(h) + eps)``, ``h`` starting at
    ``initial_accumulator_value``, L2 ``weight_decay`` and ``maximize`` as torch's."""

    _unsupported = (
        ("foreach", (None, False)),
        ("differentiable", (False,)),
        ("fused", (None, True)),
    )
    _shared = ("eps", "maximize", "lr_decay", "initial_accumulator_value")
    _eager_state = True
    _group_keys = ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value")

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        flat_grads: bool = False,
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        defaults = _torch_defaults(locals())
        _check_nonnegative(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )
        super().__init__(params, defaults, flat_grads, state_format, master_weights)

    def _hyper(self, group: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        return "adagrad", {
            "lr": 1.0,
            "eps": float(group["eps"]),
            "maximize": bool(group["maximize"]),
            "lr_decay": float(group["lr_decay"]),
            "initial_accumulator_value": float(group["initial_accumulator_value"]),
        }

    def _initial_value(self, key: str) -> float:
        return float(self.param_groups[0]["initial_accumulator_value"])

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        return (("sum", "h"),)


class RMSprop(_FusedOptimizer):
    """``torch.optim.RMSprop`` on the fusedopt engine: ``h = alpha * h + (1 - alpha) * g * g``,
    ``w -= lr * g / (sqrt(h) + eps)``; ``centered`` (``sqrt(h - g_avg ** 2)``, with the mean
    gradient ``grad_avg``), ``momentum`` (through ``momentum_buffer``), L2 ``weight_decay`` and
    ``maximize`` as torch's."""

    _unsupported = (
        ("capturable", (False,)),
        ("foreach", (None, False)),
        ("differentiable", (False,)),
    )
    _shared = ("alpha", "eps", "maximize", "momentum", "centered")
    _group_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        flat_grads: bool = False,
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        defaults = _torch_defaults(locals())
        _check_nonnegative(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha)
        super().__init__(params, defaults, flat_grads, state_format, master_weights)

    def _hyper(self, group: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        return "rmsprop", {
            "lr": 1.0,
            "decay_rate": float(group["alpha"]),
            "eps": float(group["eps"]),
            "maximize": bool(group["maximize"]),
            "momentum": float(group["momentum"]),
            "centered": bool(group["centered"]),
        }

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        keys = [("square_avg", "h")]
        if float(group["momentum"]) > 0:
            keys.append(("momentum_buffer", "b"))
        if group["centered"]:
            keys.append(("grad_avg", "g_avg"))
        return tuple(keys)


class Adam(_FusedOptimizer):
    """``torch.optim.Adam`` on the fusedopt engine: torch's Adam (eps added to the
    bias-corrected ``sqrt(v_hat)``), with ``weight_decay`` (L2, or decoupled with
    ``decoupled_weight_decay=True``), ``amsgrad`` and ``maximize``. ``betas`` are read from
    the groups at every step (OneCycleLR cycles ``betas[0]``)."""

    _unsupported = (
        ("foreach", (None, False)),
        ("capturable", (False,)),
        ("differentiable", (False,)),
        ("fused", (None, True)),
    )
    _shared = ("betas", "eps", "amsgrad", "maximize", "decoupled_weight_decay")
    _group_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _decoupled_default = False

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        flat_grads: bool = False,
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        defaults = _torch_defaults(locals())
        _check_adam(lr, betas, eps, weight_decay)
        super().__init__(params, defaults, flat_grads, state_format, master_weights)

    def _hyper(self, group: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        beta1, beta2 = group["betas"]
        return "adam", {
            "lr": 1.0,
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(group["eps"]),
            "amsgrad": bool(group["amsgrad"]),
            "maximize": bool(group["maximize"]),
            "decoupled_weight_decay": bool(group["decoupled_weight_decay"]),
            "eps_mode": "sqrt_v_hat",
        }

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        keys = (("exp_avg", "m"), ("exp_avg_sq", "v"))
        return keys + (("max_exp_avg_sq", "v_max"),) if group["amsgrad"] else keys


class AdamW(Adam):
    """``torch.optim.AdamW`` on the fusedopt engine: Adam with decoupled weight decay,
    ``w *= 1 - lr * weight_decay`` (default 1e-2)."""

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        flat_grads: bool = False,
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            flat_grads=flat_grads,
            state_format=state_format,
            master_weights=master_weights,
        )

    def _fix_loaded_group(self, group: dict[str, Any]) -> None:
        group["decoupled_weight_decay"] = True  # as torch.optim.AdamW


def _torch_defaults(args: Mapping[str, Any]) -> dict[str, Any]:
    """A class's parameter-group defaults from the ``locals()`` its ``__init__`` starts with:
    torch's arguments in torch's order (``fused=True`` kept as ``None``: fusedopt is fused),
    without ``self``, ``params`` and fusedopt's own options."""
    defaults = {k: v for k, v in args.items() if k not in ("self", "params", "__class__") and k not in _EXTRAS}
    if defaults.get("fused") is True:
        defaults["fused"] = None
    return defaults


def _check_nonnegative(**values: Any) -> None:
    """torch.optim's checks of arguments that must be ``>= 0``, with its messages."""
    for name, value in values.items():
        if float(value) < 0.0:
            what = {"lr": "learning rate", "eps": "epsilon value"}.get(name, f"{name} value")
            raise ValueError(f"Invalid {what}: {value}")


def _check_adam(lr: Any, betas: Any, eps: float, weight_decay: float) -> None:
    _check_nonnegative(lr=lr, eps=eps)
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    _check_nonnegative(weight_decay=weight_decay)


# -- every other optimizer of the engine -------------------------------------------------------

#: torch.optim's arguments that select an implementation; fusedopt is one (fused) of its own.
_IMPLEMENTATION = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}
#: fusedopt's keyword-only options of every class.
_EXTRAS = {"flat_grads": False, "state_format": "f32", "master_weights": False}


class _RuleOptimizer(_FusedOptimizer):
    """A ``torch.optim.Optimizer`` for an optimizer of the engine that has no class above, made
    by ``_rule_class``: its arguments are the engine's hyperparameters with the engine's
    defaults (``beta1``/``beta2`` as torch's ``betas``), its state keys the engine's buffers."""

    _rule: str = ""
    #: The state keys that are not the engine's buffer names (torch's, where torch has the
    #: optimizer), by buffer.
    _state_key_names: dict[str, str] = {}
    #: The engine's hyperparameters the groups hold besides lr and weight_decay (``betas`` for
    #: beta1 and beta2).
    _fields: tuple[str, ...] = ()
    #: How many ``beta`` fields ``betas`` holds.
    _betas = 2
    _unsupported = (
        ("foreach", (None, False)),
        ("capturable", (False,)),
        ("differentiable", (False,)),
        ("fused", (None, True)),
    )

    def __init__(self, params: Params, *args: Any, **kwargs: Any) -> None:
        bound = type(self).__signature__.bind(params, *args, **kwargs)  # type: ignore[attr-defined]
        bound.apply_defaults()
        args = bound.arguments
        defaults = _torch_defaults(args)
        # Ranges and types, checked by the engine now, as torch's constructors check theirs.
        checked = dict(self._engine_hyper(defaults), lr=defaults["lr"])
        if "weight_decay" in defaults:
            checked["weight_decay"] = defaults["weight_decay"]
        Engine(self._rule, **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in checked.items()})
        super().__init__(params, defaults, args["flat_grads"], args["state_format"], args["master_weights"])

    @classmethod
    def _engine_hyper(cls, group: Mapping[str, Any]) -> dict[str, Any]:
        hyper: dict[str, Any] = {"lr": 1.0}
        for key in cls._fields:
            value = group[key]
            if key == "betas":
                betas = tuple(value)
                if len(betas) != cls._betas:
                    raise ValueError(
                        f"{cls.__name__}: betas must hold {cls._betas} values, not {len(betas)}"
                    )
                hyper.update((f"beta{k + 1}", float(b)) for k, b in enumerate(betas))
            else:
                hyper[key] = float(value) if isinstance(value, torch.Tensor) else value
        return hyper

    def _derived_state(self, group: Mapping[str, Any], step: int) -> dict[str, float]:
        derive = _DERIVED_STATE.get(self._rule, {})
        return {key: f(self._engine_hyper(group), step) for key, f in derive.items()}

    def _hyper(self, group: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        return self._rule, self._engine_hyper(group)

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        hyper = self._engine_hyper(group)
        key = tuple(sorted(hyper.items()))
        cached = getattr(self, "_buffers_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, Engine(self._rule, **hyper).buffer_names)
            self._buffers_cache = cached
        return tuple((self._state_key_names.get(b, b), b) for b in cached[1])


class _ScheduleFreeOptimizer(_RuleOptimizer):
    """A schedule-free optimizer (``facebookresearch/schedule_free``'s ``AdamWScheduleFree`` and
    ``SGDScheduleFree``): ``eval()`` moves the parameters to the average ``x`` to evaluate or
    save the model at, ``train()`` back to ``y``, where gradients are taken; ``step`` raises
    ``RuntimeError`` in eval mode. Unlike the reference, a new optimizer starts in train mode
    (before the first step the two points are one, so the reference's first ``train()`` is a
    no-op here too). The state dict's parameter groups carry the averaging's ``k``, ``lr_max``,
    ``weight_sum`` and ``train_mode`` as the reference's do; the per-parameter state is ``d``
    (``z − y``) and, for AdamW, ``exp_avg_sq``. The averaging weights come from the base
    learning rate, in the engine as in the reference; a group's ``lr`` scales its steps."""

    _SCALARS = ("k", "lr_max", "weight_sum")

    @torch.no_grad()
    def eval(self) -> None:
        """Moves every parameter to the evaluation point ``x``; a no-op in eval mode."""
        self._shift(True)

    @torch.no_grad()
    def train(self) -> None:
        """Moves every parameter back to the training point ``y``; a no-op in train mode."""
        self._shift(False)

    @property
    def is_eval(self) -> bool:
        """Whether ``eval()`` left the parameters at the evaluation point."""
        return self._engine is not None and self._engine.is_eval

    def _shift(self, to_eval: bool) -> None:
        params = self._bind()
        assert self._engine is not None
        if self._dtype != torch.float32:
            raise TypeError(
                f"{type(self).__name__}: eval() and train() move float32 parameters; these are "
                f"{self._dtype}"
            )
        arrays = [p.detach().numpy().reshape(-1) for p in params]
        self._engine.shift_arrays(arrays, [f"parameter {i}" for i in range(len(arrays))], to_eval)
        increment_version(params)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the averaging's ``k``, ``lr_max`` and ``weight_sum`` and
        the ``train_mode`` in every parameter group, as the reference writes them."""
        state = super().state_dict()
        values = dict(self._engine.scalar_state) if self._engine is not None else {}
        for group in state["param_groups"]:
            group["k"] = int(values.get("k", 0.0))
            group["lr_max"] = values.get("lr_max", 0.0)
            group["weight_sum"] = values.get("weight_sum", 0.0)
            group["train_mode"] = not self.is_eval
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As the other classes', plus the averaging and the mode of the first parameter
        group (checked before anything changes). The mode is recorded, the parameters are not
        moved: load the model's weights saved with it."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{name}: a state dict is a dict, not {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        groups = state_dict.get("param_groups")
        extra: dict[str, Any] = {}
        if isinstance(groups, list) and groups and all(isinstance(g, Mapping) for g in groups):
            extra = {k: groups[0][k] for k in (*self._SCALARS, "train_mode") if k in groups[0]}
            state_dict["param_groups"] = [
                {k: v for k, v in g.items() if k not in (*self._SCALARS, "train_mode", "scheduled_lr")}
                for g in groups
            ]
        values = []
        for key in self._SCALARS:
            value = extra.get(key, 0.0)
            if key == "lr_max":
                value = max(value, 0.0)  # the reference starts it at -1
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: the state dict's {key} = {value!r} is not a number >= 0")
            values.append(float(value))
        if values[0] != int(values[0]):
            raise ValueError(f"{name}: the state dict's k = {values[0]!r} is not a whole number")
        train_mode = extra.get("train_mode", True)
        if not isinstance(train_mode, bool):
            raise ValueError(f"{name}: the state dict's train_mode = {train_mode!r} is not a bool")
        super().load_state_dict(state_dict)
        if self._engine is None:
            self._bind()
        assert self._engine is not None
        self._engine.set_scalar_state(values)
        self._engine.set_eval_mode(not train_mode)


def _rule_class(rule: str, name: str) -> type:
    """The ``torch.optim``-style class of the engine's optimizer ``rule``, called ``name``:
    ``(params, lr, betas?, <numeric hyperparameters>, *, <flags and choices>, foreach,
    capturable, differentiable, fused, flat_grads, state_format, master_weights)`` with the
    engine's defaults."""
    import inspect

    info = next(r for r in rules() if r["name"] == rule)
    hyper = info["hyper"]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("params", positional)]
    flags = []
    fields: list[str] = []
    betas = tuple(hyper[f"beta{k}"] for k in range(1, 4) if f"beta{k}" in hyper)
    for field, default in hyper.items():
        if field.startswith("beta") and field != "beta1" and len(betas) > 1:
            continue
        if field == "beta1" and len(betas) > 1:
            field, default = "betas", betas
        if field not in ("lr", "weight_decay"):
            fields.append(field)
        if isinstance(default, (bool, str)):
            flags.append(inspect.Parameter(field, keyword, default=default))
        else:
            params.append(inspect.Parameter(field, positional, default=default))
    params += flags
    params += [inspect.Parameter(k, keyword, default=v) for k, v in {**_IMPLEMENTATION, **_EXTRAS}.items()]
    group_keys = ("lr", *fields) + (("weight_decay",) if "weight_decay" in hyper else ())
    namespace = {
        "_rule": rule,
        "_state_key_names": _STATE_KEY_NAMES.get(rule, {}),
        "_fields": tuple(fields),
        "_betas": len(betas),
        "_shared": tuple(fields),
        "_group_keys": group_keys,
        "__signature__": inspect.Signature(params),
        "__doc__": f"The engine's {rule!r} optimizer as a ``torch.optim.Optimizer``.\n\n"
        "    Arguments (the engine's defaults): "
        + ", ".join(f"``{p.name}={p.default!r}``" for p in params[1:])
        + ". ``lr`` and ``weight_decay`` may differ between parameter groups; the state keys "
        "are "
        + ", ".join(f"``{k}``" for k in [*_STATE_KEY_NAMES.get(rule, {}).values()] or ["the engine's buffers"])
        + " (``optimizer.state[p]``) and ``step``.",
        "__module__": __name__,
        "__qualname__": name,
    }
    base = _ScheduleFreeOptimizer if rule.endswith("_schedulefree") else _RuleOptimizer
    return type(name, (base,), namespace)


#: State keys as torch.optim (Adamax) and the reference implementations (Lion's lion-pytorch,
#: timm's Lamb and Lars) name them, so that their state dicts load into each other.
_STATE_KEY_NAMES = {
    "adamax": {"m": "exp_avg", "u": "exp_inf"},
    "lion": {"m": "exp_avg"},
    "radam": {"m": "exp_avg", "v": "exp_avg_sq"},
    "nadam": {"m": "exp_avg", "v": "exp_avg_sq"},
    "ademamix": {"m1": "exp_avg", "m2": "exp_avg_slow", "nu": "exp_avg_sq"},
    "adamw_schedulefree": {"v": "exp_avg_sq"},
    "lamb": {"m": "exp_avg", "v": "exp_avg_sq"},
    "lars": {"b": "momentum_buffer"},
}


def _nadam_mu_product(hyper: Mapping[str, Any], step: int) -> float:
    """torch.optim.NAdam's ``mu_product`` after ``step`` steps, ``prod(beta1 * (1 - 0.5 *
    0.96 ** (k * momentum_decay)) for k in 1..step)``, from a series whose length does not grow
    with ``step`` (the engine's ``NAdamConfig::mu_product``)."""
    beta1, psi = float(hyper["beta1"]), float(hyper["momentum_decay"])
    if step == 0:
        return 1.0
    if beta1 == 0.0:
        return 0.0
    ln_q = psi * math.log(0.96)
    if ln_q == 0.0:
        total = step * math.log(0.5)
    else:
        total, half = 0.0, 1.0
        for k in range(1, 65):
            half *= 0.5
            total -= half / k * math.exp(k * ln_q) * math.expm1(k * step * ln_q) / math.expm1(k * ln_q)
    return math.exp(step * math.log(beta1) + total)


#: Per-parameter state that torch keeps and the engine derives from the step (NAdam's
#: ``mu_product``): written into state dicts for torch, accepted and not needed on loading.
_DERIVED_STATE = {"nadam": {"mu_product": _nadam_mu_product}}

#: The engine's optimizers that the classes above run.
_COVERED = {"sgd", "momentum", "nag", "adagrad", "rmsprop", "adam"}
for _info in rules():
    if _info["name"] not in _COVERED:
        globals()[_info["type_name"]] = _rule_class(_info["name"], _info["type_name"])
        __all__.append(_info["type_name"])
del _info

#: The names ``facebookresearch/schedule_free`` gives them.
AdamWScheduleFree = ScheduleFreeAdamW  # type: ignore[name-defined]  # noqa: F821
SGDScheduleFree = ScheduleFreeSgd  # type: ignore[name-defined]  # noqa: F821
__all__ += ["AdamWScheduleFree", "SGDScheduleFree"]
