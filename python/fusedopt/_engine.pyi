"""Type stubs for ``fusedopt._engine``, the Rust extension under ``fusedopt`` and
``fusedopt.torch``."""

from typing import Any, Optional, Sequence, Union

import numpy as np

__version__: str

def get_num_threads() -> int:
    """The number of threads steps use: ``set_num_threads``'s value; by default every core,
    divided by ``LOCAL_WORLD_SIZE`` (the processes per machine, set by ``torchrun``) when set."""

def set_num_threads(n: int) -> None:
    """Sets the number of threads every optimizer's step uses from its next step (n >= 1)."""

def simd_level() -> str:
    """The SIMD tier the kernels run on: ``"avx2"`` or ``"portable"``."""

def rules() -> list[dict[str, Any]]:
    """Every optimizer the engine has: dicts of ``name`` (what ``Engine`` takes), ``type_name``
    (the name of the classes made for it), ``hyper`` (each hyperparameter with its default)
    and ``buffers`` (the state buffers its defaults keep)."""

def _restore(
    name: str,
    settings: dict[str, Any],
    state: bytes,
    shapes: Optional[list[list[int]]],
    group_of: list[int],
    last: Optional[tuple[bool, Optional[float]]],
) -> Engine:
    """Rebuilds a pickled ``Engine``."""

class Engine:
    """One engine optimizer with its state. Two threads calling one engine take turns (the
    waiting one releases the GIL); engines pickle and copy with their state."""

    def __init__(self, name: str, **hyper: Union[float, bool, str]) -> None:
        """Builds the optimizer ``name`` with hyperparameters as keyword arguments, e.g.
        ``Engine("adam", lr=3e-4, weight_decay=0.1, eps_mode="sqrt_v_hat")``. ``TypeError``
        for a value of the wrong type, ``ValueError`` for one out of range."""
    @property
    def name(self) -> str: ...
    @property
    def hyper(self) -> dict[str, Union[float, bool, str]]:
        """Every hyperparameter with its value."""
    def set_hyper(self, **hyper: Union[float, bool, str]) -> None:
        """Sets hyperparameters, keeping the state; all or nothing."""
    @property
    def buffer_names(self) -> list[str]:
        """The state buffers the current hyperparameters keep."""
    @property
    def settings(self) -> dict[str, Any]:
        """``backend``, ``chunk_len``, ``grad_scale``, ``max_grad_norm``, ``non_finite``,
        ``state_format``."""
    def set_settings(self, **settings: Any) -> None:
        """Sets settings (the keys of ``settings``); all or nothing."""
    @property
    def steps(self) -> int: ...
    @property
    def tensor_steps(self) -> list[int]: ...
    @property
    def is_eval(self) -> bool:
        """Whether the weights are at the evaluation point (schedule-free's ``x``)."""
    def set_eval_mode(self, eval: bool) -> None:
        """Records where the weights are without moving them."""
    def shift_arrays(self, weights: list[np.ndarray], labels: list[str], eval: bool) -> None:
        """Moves float32 weights to the evaluation point (``eval``) or back."""
    @property
    def scalar_state(self) -> list[tuple[str, float]]:
        """The optimizer's values besides buffers and step counts (schedule-free's ``k``,
        ``lr_max``, ``weight_sum``)."""
    def set_scalar_state(self, values: list[float]) -> None:
        """Sets the values of ``scalar_state``, in its order."""
    @property
    def layout(self) -> Optional[list[int]]: ...
    @property
    def last_grad_norm(self) -> Optional[float]: ...
    @property
    def last_skipped(self) -> bool: ...
    @property
    def tensor_names(self) -> list[str]: ...
    def set_groups(
        self, group_of: Optional[Sequence[int]], lr: Sequence[float], weight_decay: Sequence[Optional[float]]
    ) -> None:
        """Gives each tensor its group's learning rate (times ``lr``) and weight decay."""
    def set_tensor_names(self, names: Sequence[str]) -> None: ...
    def save_state(self, path: str) -> None: ...
    def load_state(self, path: str) -> None: ...
    def reset(self) -> None: ...
    @property
    def state_names(self) -> list[str]: ...
    @property
    def state_bytes(self) -> int: ...
    def init_state(self, lens: Sequence[int]) -> None: ...
    def set_tensor_steps(self, steps: Sequence[int]) -> None: ...
    def state_array(self, name: str, tensor: int) -> np.ndarray:
        """A float32 view of tensor ``tensor``'s slice of buffer ``name`` (float32 state, and
        ``"master"`` in every format)."""
    def read_state(self, name: str, tensor: int) -> np.ndarray:
        """A float32 copy of tensor ``tensor``'s values of buffer ``name``, decoded."""
    def write_state(self, name: str, tensor: int, values: np.ndarray) -> None:
        """Sets them from a float32 array, encoded in the state format."""
    def step_arrays(
        self,
        weights: Sequence[np.ndarray],
        grads: Sequence[np.ndarray],
        labels: Sequence[tuple[str, str]],
    ) -> None:
        """One step over numpy arrays, updated in place; ``labels`` name them in errors."""
    def bind_weights(self, addrs: Sequence[int], lens: Sequence[int], dtype: str = "float32") -> None:
        """Lends the weights by address (memory of ``dtype``, ``"float32"``, ``"bfloat16"`` or
        ``"float16"``, the caller vouches for); gradients have the same dtype."""
    def bind_grads(self, grads: Sequence[int]) -> None:
        """Lends gradient addresses for every later ``step_bound(None)``."""
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]: ...
    def step_bound(self, grads: Optional[Sequence[int]]) -> None:
        """One step over the bound weights; ``grads[i]`` is an address, or 0 for none;
        ``None`` uses the gradients of ``bind_grads``."""
