"""fusedopt: fused, multi-threaded, deterministic optimizer steps on the CPU.

The optimizer step of a training loop as fast as the memory bus allows: one pass over the
weights, gradients and state, with SIMD kernels on every core, bitwise identical for any thread
count. The engine is the Rust crate ``fusedopt``; this package reaches it from Python.

Two ways in:

* ``fusedopt.SGD``, ``Momentum``, ``Nesterov``, ``AdaGrad``, ``RMSProp`` and ``Adam``: the numpy
  optimizers of the reference code (same classes, keywords, defaults and in-place ``update``),
  and a class for every other optimizer the engine has (``rules()`` lists them)::

      import numpy as np, fusedopt
      opt = fusedopt.Adam(learning_rate=0.001)
      params = {"W1": np.zeros((784, 50), np.float32), "b1": np.zeros(50, np.float32)}
      grads = {"W1": np.ones((784, 50), np.float32), "b1": np.ones(50, np.float32)}
      opt.update(params, grads)  # params updated in place

* ``fusedopt.torch``: ``SGD``, ``Adagrad``, ``RMSprop``, ``Adam`` and ``AdamW``, drop-ins for
  ``torch.optim`` on CPU float32 tensors (imports torch; this module does not).

Threads: every step uses ``get_num_threads()`` threads and releases the GIL. The default is
every core, shared out among the processes of a machine when ``LOCAL_WORLD_SIZE`` says how
many there are (``torchrun`` sets it): each of N ranks gets cores/N. ``set_num_threads``
overrides it.
"""

from . import _numpy
from ._engine import __version__, get_num_threads, rules, set_num_threads, simd_level
from ._numpy import SGD, AdaGrad, Adam, Momentum, Nesterov, Optimizer, RMSProp

# The classes of the engine's other optimizers, made from its list.
globals().update({name: getattr(_numpy, name) for name in _numpy.__all__})

__all__ = ["__version__", "simd_level", "set_num_threads", "get_num_threads", "rules"]
__all__ += _numpy.__all__
