"""Type stubs for ``fusedopt._numpy``: the numpy optimizers (made at import from the engine's
list of optimizers; ``tests/test_stubs.py`` checks these signatures against them)."""

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike[str]]

class Optimizer:
    """Base of the numpy optimizers: an engine optimizer with the reference code's interface."""

    lr: float
    grad_scale: float
    max_grad_norm: Optional[float]
    non_finite: str
    @property
    def hyper(self) -> dict[str, Any]: ...
    @property
    def settings(self) -> dict[str, Any]: ...
    def set_settings(self, **settings: Any) -> None: ...
    @property
    def state_format(self) -> str: ...
    @property
    def master_weights(self) -> bool: ...
    @property
    def state_bytes(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def last_grad_norm(self) -> Optional[float]: ...
    @property
    def last_skipped(self) -> bool: ...
    def update(
        self,
        params: Union[np.ndarray, Mapping[Any, np.ndarray]],
        grads: Union[np.ndarray, Mapping[Any, np.ndarray]],
    ) -> None: ...
    def eval(self, params: Union[np.ndarray, Mapping[Any, np.ndarray]]) -> None:
        """Moves the weights to the evaluation point (schedule-free's average ``x``); a no-op
        for the optimizers without one."""
    def train(self, params: Union[np.ndarray, Mapping[Any, np.ndarray]]) -> None:
        """Moves the weights back to the training point after ``eval``."""
    @property
    def is_eval(self) -> bool: ...
    def save_state(self, path: PathLike) -> None: ...
    def load_state(self, path: PathLike) -> None: ...

class SGD(Optimizer):
    weight_decay: float
    maximize: bool
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
    ) -> None: ...

class Momentum(Optimizer):
    momentum: float
    weight_decay: float
    maximize: bool
    form: str
    dampening: float
    def __init__(
        self,
        learning_rate: float = 0.01,
        momentum: float = 0.9,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        form: str = "velocity",
        dampening: float = 0.0,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class Nesterov(Momentum): ...

class AdaGrad(Optimizer):
    eps: float
    weight_decay: float
    maximize: bool
    lr_decay: float
    initial_accumulator_value: float
    def __init__(
        self,
        learning_rate: float = 0.01,
        *,
        eps: float = 1e-07,
        weight_decay: float = 0.0,
        maximize: bool = False,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class RMSProp(Optimizer):
    decay_rate: float
    eps: float
    weight_decay: float
    maximize: bool
    momentum: float
    centered: bool
    def __init__(
        self,
        learning_rate: float = 0.01,
        decay_rate: float = 0.9,
        *,
        eps: float = 1e-07,
        weight_decay: float = 0.0,
        maximize: bool = False,
        momentum: float = 0.0,
        centered: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class Adam(Optimizer):
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    decoupled_weight_decay: bool
    amsgrad: bool
    eps_mode: str
    def __init__(
        self,
        learning_rate: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        *,
        eps: float = 1e-07,
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
    ) -> None: ...

class Adamax(Optimizer):
    """Adamax (``torch.optim.Adamax``): ``u = max(beta2 * u, |g| + eps)``."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    def __init__(
        self,
        learning_rate: float = 0.002,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class Lion(Optimizer):
    """Lion (Chen et al. 2023): ``w = w * (1 - lr * weight_decay) - lr * sign(c)``."""

    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool
    def __init__(
        self,
        learning_rate: float = 0.0001,
        *,
        beta1: float = 0.9,
        beta2: float = 0.99,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class RAdam(Optimizer):
    """RAdam (``torch.optim.RAdam``): Adam rectified once the variance is tractable."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    decoupled_weight_decay: bool
    def __init__(
        self,
        learning_rate: float = 0.001,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class NAdam(Optimizer):
    """NAdam (``torch.optim.NAdam``): Adam with Nesterov momentum and a momentum schedule."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    momentum_decay: float
    maximize: bool
    decoupled_weight_decay: bool
    def __init__(
        self,
        learning_rate: float = 0.002,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        momentum_decay: float = 0.004,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class AdEMAMix(Optimizer):
    """AdEMAMix (Pagliardini et al. 2024, as bitsandbytes): a fast and a slow EMA, mixed by
    ``alpha``; ``t_alpha`` and ``t_beta3`` are warm-up lengths in steps (0 or ``None``: none)."""

    beta1: float
    beta2: float
    beta3: float
    alpha: float
    t_alpha: int
    t_beta3: int
    eps: float
    weight_decay: float
    maximize: bool
    def __init__(
        self,
        learning_rate: float = 0.001,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        beta3: float = 0.9999,
        alpha: float = 5.0,
        t_alpha: Optional[int] = 0,
        t_beta3: Optional[int] = 0,
        eps: float = 1e-08,
        weight_decay: float = 0.01,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class ScheduleFreeAdamW(Optimizer):
    """Schedule-free AdamW (Defazio et al. 2024, as ``facebookresearch/schedule_free``): call
    ``eval(params)`` before evaluating the model and ``train(params)`` before updating again."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    warmup_steps: int
    r: float
    weight_lr_power: float
    maximize: bool
    def __init__(
        self,
        learning_rate: float = 0.0025,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-08,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class ScheduleFreeSgd(Optimizer):
    """Schedule-free SGD (Defazio et al. 2024, as ``facebookresearch/schedule_free``)."""

    momentum: float
    weight_decay: float
    warmup_steps: int
    r: float
    weight_lr_power: float
    maximize: bool
    def __init__(
        self,
        learning_rate: float = 1.0,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        maximize: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class Lamb(Optimizer):
    """LAMB (You et al. 2020, timm's ``Lamb``): ``w = w - lr * (|w| / |u|) * u`` with Adam's
    direction ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` and the norms per tensor."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    bias_correction: bool
    trust_clip: bool
    always_adapt: bool
    def __init__(
        self,
        learning_rate: float = 0.001,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-06,
        weight_decay: float = 0.01,
        maximize: bool = False,
        bias_correction: bool = True,
        trust_clip: bool = False,
        always_adapt: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

class Lars(Optimizer):
    """LARS (You et al. 2017, timm's ``Lars``): SGD with momentum on the gradient scaled per
    tensor by ``trust_coeff * |w| / (|g| + weight_decay * |w| + eps)``."""

    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    trust_coeff: float
    eps: float
    maximize: bool
    trust_clip: bool
    always_adapt: bool
    def __init__(
        self,
        learning_rate: float = 1.0,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-08,
        maximize: bool = False,
        trust_clip: bool = False,
        always_adapt: bool = False,
        grad_scale: float = 1.0,
        max_grad_norm: Optional[float] = None,
        non_finite: str = "propagate",
        state_format: str = "f32",
        master_weights: bool = False,
    ) -> None: ...

def __getattr__(name: str) -> type[Optimizer]:
    """The class of an optimizer the engine has beyond these (``fusedopt.rules()``)."""
