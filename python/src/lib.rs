//! `fusedopt._engine`: the fusedopt engine for Python, a thin PyO3 layer over the `fusedopt`
//! crate. The Python package (`fusedopt`, `fusedopt.torch`) is written against this module;
//! the core crate knows nothing of Python.
//!
//! This layer only converts: keyword arguments to the crate's typed hyperparameters
//! (`fusedopt::Value`) and `fusedopt::Settings`, numpy arrays and memory lent by address
//! (checked by `fusedopt::raw`) to slices, and the crate's errors to Python exceptions
//! (`PyResultExt`). Every check is the crate's.
//!
//! One class, `Engine`, holds a `Box<dyn Optimizer>` behind a lock: two threads stepping one
//! engine take turns (the waiting one releases the GIL), and every step releases the GIL.
//! Engines pickle and copy (the optimizer state travels as the bytes of a state file).

use fusedopt::raw::{RawError, RawTensors};
use fusedopt::{
    Dtype, Element, Optimizer, OptimizerConfig, OptimizerExt, ParamGroup, ParseConfigError,
    Settings, StateError, StateFormat, StepError, StepReport, Value,
};
use half::f16;
use numpy::ndarray::ArrayView1;
use numpy::{
    BorrowError, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::IntoPyObjectExt;
use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyString, PyWeakrefMethods, PyWeakrefReference};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// The thread count every engine steps with; 0 until `set_num_threads` is called (all cores).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The number of threads steps use: `set_num_threads`'s value; by default the cores shared
/// among the processes of this machine when a launcher says how many there are
/// (`LOCAL_WORLD_SIZE`, set by `torchrun`), else every core.
#[pyfunction]
fn get_num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let ranks = std::env::var("LOCAL_WORLD_SIZE")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or(1);
            (cores / ranks).max(1)
        }
        n => n,
    }
}

/// Sets the number of threads every optimizer's step uses from its next step (`n >= 1`).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(
            "set_num_threads: n must be at least 1",
        ));
    }
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The SIMD tier the kernels run on: `"avx2"` or `"portable"`.
#[pyfunction]
fn simd_level() -> &'static str {
    fusedopt::simd_level()
}

/// Every optimizer the engine has, as dicts: `name` (what `Engine` takes), `type_name` (the
/// name of classes made for it), `hyper` (every hyperparameter with its default) and `buffers`
/// (the state buffers its defaults keep).
#[pyfunction]
fn rules(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    OptimizerConfig::all()
        .iter()
        .map(|config| {
            let rule = PyDict::new(py);
            rule.set_item("name", config.name())?;
            rule.set_item("type_name", config.type_name())?;
            rule.set_item("hyper", values_dict(py, &config.values())?)?;
            rule.set_item("buffers", config.buffer_names())?;
            Ok(rule)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The crate's errors as the Python exceptions that fit them (tokenizers' `ToPyResult`).
trait PyResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> PyResultExt<T> for Result<T, StepError> {
    fn py(self) -> PyResult<T> {
        self.map_err(|e| match e {
            StepError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
            StepError::ThreadPool { .. } | StepError::EvalMode { .. } => {
                PyRuntimeError::new_err(e.to_string())
            }
            e => PyValueError::new_err(e.to_string()),
        })
    }
}

impl<T> PyResultExt<T> for Result<T, StateError> {
    fn py(self) -> PyResult<T> {
        self.map_err(|e| match &e {
            StateError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(e.to_string())
            }
            StateError::Io { .. } => PyOSError::new_err(e.to_string()),
            StateError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
            _ => PyValueError::new_err(e.to_string()),
        })
    }
}

impl<T> PyResultExt<T> for Result<T, ParseConfigError> {
    fn py(self) -> PyResult<T> {
        self.map_err(|e| match e {
            ParseConfigError::Type { .. } => PyTypeError::new_err(e.to_string()),
            e => PyValueError::new_err(e.to_string()),
        })
    }
}

impl<T> PyResultExt<T> for Result<T, RawError> {
    fn py(self) -> PyResult<T> {
        self.map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

impl<T> PyResultExt<T> for Result<T, String> {
    fn py(self) -> PyResult<T> {
        self.map_err(PyValueError::new_err)
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// A Python value as a hyperparameter value: `True`/`False` (and numpy's booleans), a name
/// (`str`), or a number (anything `float()` takes: ints, floats, numpy scalars, one-element
/// tensors).
fn value_of(key: &str, obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    let numpy_bool = || {
        let ty = obj.get_type();
        let module = ty.module().map(|m| m.to_string()).unwrap_or_default();
        let name = ty.name().map(|n| n.to_string()).unwrap_or_default();
        module == "numpy" && (name == "bool" || name == "bool_")
    };
    if obj.is_instance_of::<PyBool>() || numpy_bool() {
        return Ok(Value::Bool(obj.is_truthy()?));
    }
    if let Ok(name) = obj.cast::<PyString>() {
        return Ok(Value::Choice(name.to_string()));
    }
    obj.extract::<f64>().map(Value::Number).map_err(|_| {
        let kind = obj
            .get_type()
            .name()
            .map_or_else(|_| "?".to_string(), |n| n.to_string());
        PyTypeError::new_err(format!(
            "{key} must be a number, True or False, or a name, not {kind}"
        ))
    })
}

/// Hyperparameter values as a dict of Python values.
fn values_dict<'py>(py: Python<'py>, values: &[(&str, Value)]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (field, value) in values {
        let value = match value {
            Value::Number(x) => x.into_bound_py_any(py)?,
            Value::Bool(b) => b.into_bound_py_any(py)?,
            Value::Count(n) => n.into_bound_py_any(py)?,
            Value::Choice(name) => name.into_bound_py_any(py)?,
            _ => py.None().into_bound(py),
        };
        dict.set_item(field, value)?;
    }
    Ok(dict)
}

/// `config` with the keyword arguments `hyper` set, checked (types, then ranges).
fn configured(
    mut config: OptimizerConfig,
    hyper: Option<&Bound<'_, PyDict>>,
) -> PyResult<OptimizerConfig> {
    for (key, value) in hyper.into_iter().flatten() {
        let key = key.cast::<PyString>()?.to_string();
        // A count of steps (a warm-up length) takes None for none, as bitsandbytes' keywords.
        let value = match config.value(&key) {
            Some(Value::Count(_)) if value.is_none() => Value::Count(0),
            _ => value_of(&key, &value)?,
        };
        config.set_value(&key, value).py()?;
    }
    config.validate().py()?;
    Ok(config)
}

/// `settings` with the keyword arguments `changes` applied (not checked: `set_settings` is).
/// The thread count is not among them: `set_num_threads` sets it for every engine.
fn settings_with(mut settings: Settings, changes: &Bound<'_, PyDict>) -> PyResult<Settings> {
    for (key, value) in changes {
        let key = key.cast::<PyString>()?.to_string();
        let text = || -> PyResult<String> {
            value.extract::<String>().map_err(|_| {
                PyTypeError::new_err(format!("{key} must be a str, not {}", value.get_type()))
            })
        };
        match key.as_str() {
            "backend" => settings.backend = parsed(&key, &text()?)?,
            "chunk_len" => settings.chunk_len = value.extract()?,
            "grad_scale" => settings.grad_scale = number(&key, &value)?,
            "max_grad_norm" if value.is_none() => settings.max_grad_norm = None,
            "max_grad_norm" => settings.max_grad_norm = Some(number(&key, &value)?),
            "non_finite" => settings.non_finite = parsed(&key, &text()?)?,
            "state_format" => settings.state_format = parsed(&key, &text()?)?,
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "unknown setting {key:?}: the settings are backend, chunk_len, grad_scale, \
                     max_grad_norm, non_finite and state_format"
                )));
            }
        }
    }
    Ok(settings)
}

/// A setting named by a string, read by the crate's `FromStr` (`ValueError` naming `key`).
fn parsed<T: core::str::FromStr<Err = String>>(key: &str, text: &str) -> PyResult<T> {
    text.parse().map_err(|e| format!("{key}: {e}")).py()
}

/// A numeric setting, refusing what is not a number (`True` included).
fn number(key: &str, value: &Bound<'_, PyAny>) -> PyResult<f32> {
    match value_of(key, value)? {
        Value::Number(x) => Ok(x as f32),
        _ => Err(PyTypeError::new_err(format!(
            "{key} must be a number, not {}",
            value.get_type()
        ))),
    }
}

/// `settings` as a dict.
fn settings_dict<'py>(py: Python<'py>, settings: &Settings) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("backend", settings.backend.name())?;
    dict.set_item("chunk_len", settings.chunk_len)?;
    dict.set_item("grad_scale", settings.grad_scale)?;
    dict.set_item("max_grad_norm", settings.max_grad_norm)?;
    dict.set_item("non_finite", settings.non_finite.name())?;
    dict.set_item("state_format", settings.state_format.name())?;
    Ok(dict)
}

/// A numpy array the engine steps: float32 or float16.
enum FloatArray<'a, 'py> {
    F32(&'a Bound<'py, PyArrayDyn<f32>>),
    F16(&'a Bound<'py, PyArrayDyn<f16>>),
}

impl FloatArray<'_, '_> {
    fn untyped(&self) -> &Bound<'_, PyUntypedArray> {
        match self {
            FloatArray::F32(a) => a.as_untyped(),
            FloatArray::F16(a) => a.as_untyped(),
        }
    }

    fn is_f32(&self) -> bool {
        matches!(self, FloatArray::F32(_))
    }
}

/// `obj` as a float32 or float16 ndarray, or a `TypeError` naming `label` and saying what it
/// is instead.
fn float_array<'a, 'py>(obj: &'a Bound<'py, PyAny>, label: &str) -> PyResult<FloatArray<'a, 'py>> {
    if let Ok(array) = obj.cast::<PyArrayDyn<f32>>() {
        return Ok(FloatArray::F32(array));
    }
    if let Ok(array) = obj.cast::<PyArrayDyn<f16>>() {
        return Ok(FloatArray::F16(array));
    }
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        let dtype = array.dtype().str()?.to_string();
        return Err(PyTypeError::new_err(format!(
            "{label} is a {dtype} array, and fusedopt updates float32 arrays (float16 with \
             master_weights=True): convert it once with .astype(np.float32) and keep training \
             on the float32 array"
        )));
    }
    let kind = obj.get_type().name()?.to_string();
    Err(PyTypeError::new_err(format!(
        "{label} must be a numpy.ndarray of float32, not {kind}"
    )))
}

/// A shape as Python prints it: `(3, 4)`, `(5,)`, `()`.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------------------

/// The fusedopt engine: one optimizer (any of the crate's, by name, with its hyperparameters as
/// keyword arguments) with its state, stepped over numpy arrays or over memory lent by address.
///
/// This is the layer under `fusedopt`'s numpy classes and `fusedopt.torch`; use those.
#[pyclass(module = "fusedopt._engine", frozen)]
struct Engine {
    inner: Mutex<Inner>,
}

/// What an engine holds, behind its lock.
struct Inner {
    opt: Box<dyn Optimizer>,
    /// The thread count the optimizer's pool was last set to (0: not yet).
    threads: usize,
    /// The shapes of the numpy arrays of the first successful step, fixed from then on.
    shapes: Option<Vec<Vec<usize>>>,
    /// The memory lent by address: the weights of `bind_weights`, the gradients of the last
    /// `step_bound`.
    raw: RawTensors,
    /// The dtype of the bound weights and of their gradients.
    dtype: Dtype,
    /// The gradients of `bind_grads` (0: none), for `step_bound(None)`.
    flat_grads: Vec<usize>,
    /// Each tensor's group (`set_groups`), when there are groups.
    group_of: Vec<u32>,
    /// The last step's report: (skipped, grad_norm).
    last: Option<(bool, Option<f32>)>,
    /// A weak reference to the owner of the arrays `state_array` lent, while any is alive.
    owner: Option<Py<PyWeakrefReference>>,
}

/// The base object of the arrays `Engine.state_array` returns: it keeps the engine, and so the
/// state buffers the arrays view, alive.
#[pyclass(module = "fusedopt._engine", weakref, frozen)]
struct StateOwner {
    _engine: Py<Engine>,
}

impl Engine {
    /// An engine over `opt`.
    fn of(opt: Box<dyn Optimizer>) -> Engine {
        Engine {
            inner: Mutex::new(Inner {
                opt,
                threads: 0,
                shapes: None,
                raw: RawTensors::default(),
                dtype: Dtype::F32,
                flat_grads: Vec::new(),
                group_of: Vec::new(),
                last: None,
                owner: None,
            }),
        }
    }

    /// The engine, locked. Another thread's call on it (a step, with the GIL released) is waited
    /// for with the GIL released, so two threads stepping one optimizer take turns.
    fn lock(&self, py: Python<'_>) -> MutexGuard<'_, Inner> {
        loop {
            match self.inner.try_lock() {
                Ok(guard) => return guard,
                // A panic inside a call became a Python exception; the engine itself is
                // consistent (every change is made only once it cannot fail).
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => py.detach(|| {
                    drop(self.inner.lock());
                }),
            }
        }
    }
}

impl Inner {
    /// Refuses to `what` (which would free the state buffers) while arrays from `state_array`
    /// are alive.
    fn check_unshared(&self, py: Python<'_>, what: &str) -> PyResult<()> {
        if self
            .owner
            .as_ref()
            .is_some_and(|w| w.bind(py).upgrade().is_some())
        {
            return Err(PyRuntimeError::new_err(format!(
                "cannot {what}: arrays returned by state_array() (a state_dict()) still view the \
                 state buffers; drop them first"
            )));
        }
        Ok(())
    }

    /// Applies the global thread count if it changed since the last step.
    fn sync_threads(&mut self) -> PyResult<()> {
        let want = get_num_threads();
        if want != self.threads {
            self.opt.set_threads(want).py()?;
            self.threads = want;
        }
        Ok(())
    }

    /// Records a step's report.
    fn report(&mut self, report: StepReport) {
        self.last = Some((report.skipped, report.grad_norm));
    }

    /// The error for a state buffer or tensor the optimizer does not hold.
    fn no_state(&self, name: &str, tensor: usize) -> PyErr {
        PyValueError::new_err(format!(
            "no state buffer {name:?} for tensor {tensor} (buffers held: {:?}, tensors: {})",
            self.opt.state_names(),
            self.opt.layout().map_or(0, <[usize]>::len)
        ))
    }
}

#[pymethods]
impl Engine {
    /// Builds the optimizer called `name` (`"adam"`, `"adamw"`, `"sgd"`, ...; see `rules()`)
    /// with the hyperparameters given as keyword arguments, for example
    /// `Engine("adam", lr=3e-4, weight_decay=0.1, eps_mode="sqrt_v_hat")`.
    #[new]
    #[pyo3(signature = (name, **hyper))]
    fn new(name: &str, hyper: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = name.parse::<OptimizerConfig>().py()?;
        Ok(Engine::of(configured(config, hyper)?.build()))
    }

    /// The optimizer's name: `"sgd"`, `"momentum"`, `"nag"`, `"adagrad"`, `"rmsprop"`,
    /// `"adam"`, ...
    #[getter]
    fn name(&self, py: Python<'_>) -> &'static str {
        self.lock(py).opt.name()
    }

    /// Every hyperparameter with its value, as a new dict.
    #[getter]
    fn hyper<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let values = self.lock(py).opt.config().values();
        values_dict(py, &values)
    }

    /// Sets the hyperparameters given as keyword arguments, keeping the state; checked in full
    /// first (nothing changes on error).
    #[pyo3(signature = (**hyper))]
    fn set_hyper(&self, py: Python<'_>, hyper: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut inner = self.lock(py);
        let config = configured(inner.opt.config(), hyper)?;
        inner.opt.set_config(config).py()
    }

    /// The names of the state buffers the current hyperparameters keep (`m`, `v`, and `v_max`
    /// with AMSGrad, ...), whether or not the state exists yet.
    #[getter]
    fn buffer_names(&self, py: Python<'_>) -> Vec<&'static str> {
        self.lock(py).opt.config().buffer_names()
    }

    /// The settings, as a new dict: `backend`, `chunk_len`, `grad_scale`, `max_grad_norm`,
    /// `non_finite`, `state_format`.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let settings = *self.lock(py).opt.settings();
        settings_dict(py, &settings)
    }

    /// Sets the settings given as keyword arguments (those of `settings`); checked in full
    /// first (nothing changes on error).
    #[pyo3(signature = (**changes))]
    fn set_settings(&self, py: Python<'_>, changes: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut inner = self.lock(py);
        let Some(changes) = changes else {
            return Ok(());
        };
        let settings = settings_with(*inner.opt.settings(), changes)?;
        inner.opt.set_settings(settings).py()
    }

    /// Steps taken (not counting skipped ones).
    #[getter]
    fn steps(&self, py: Python<'_>) -> u64 {
        self.lock(py).opt.steps()
    }

    /// Whether the weights are at the evaluation point (schedule-free's `x`, after
    /// `shift_arrays(..., eval=True)`); always `False` for the optimizers without one.
    #[getter]
    fn is_eval(&self, py: Python<'_>) -> bool {
        self.lock(py).opt.is_eval()
    }

    /// Records where the weights are without moving them (a state restored next to weights
    /// saved apart from it).
    fn set_eval_mode(&self, py: Python<'_>, eval: bool) {
        self.lock(py).opt.set_eval_mode(eval);
    }

    /// Moves the weights (C-contiguous, writable float32 arrays, one per tensor of the layout,
    /// in its order; `labels[i]` names them in messages) to the evaluation point (`eval`) or
    /// back to the training point, as `Optimizer::eval` / `Optimizer::train`.
    fn shift_arrays(
        &self,
        py: Python<'_>,
        weights: Vec<Bound<'_, PyAny>>,
        labels: Vec<String>,
        eval: bool,
    ) -> PyResult<()> {
        let mut arrays = Vec::with_capacity(weights.len());
        for (w, label) in weights.iter().zip(&labels) {
            match float_array(w, label)? {
                FloatArray::F32(a) if a.is_c_contiguous() => arrays.push(a),
                FloatArray::F32(_) => {
                    return Err(PyValueError::new_err(format!(
                        "{label} is not C-contiguous"
                    )));
                }
                FloatArray::F16(_) => {
                    return Err(PyTypeError::new_err(format!(
                        "{label} is float16: the evaluation point is moved in float32 weights only"
                    )));
                }
            }
        }
        let mut borrowed = Vec::with_capacity(arrays.len());
        for (a, label) in arrays.iter().zip(&labels) {
            borrowed.push(a.try_readwrite().map_err(|e| borrow_error(e, label))?);
        }
        let mut slices: Vec<&mut [f32]> = borrowed
            .iter_mut()
            .map(|w| w.as_slice_mut().expect("checked C-contiguous"))
            .collect();
        let mut inner = self.lock(py);
        let opt = &mut inner.opt;
        let result = if eval {
            opt.eval(&mut slices)
        } else {
            opt.train(&mut slices)
        };
        result.py()
    }

    /// The optimizer's values besides buffers and step counts (schedule-free's `k`, `lr_max`,
    /// `weight_sum`), as `(name, value)` pairs.
    #[getter]
    fn scalar_state(&self, py: Python<'_>) -> Vec<(&'static str, f64)> {
        self.lock(py).opt.scalar_state()
    }

    /// Sets the values of `scalar_state`, one per name in its order.
    fn set_scalar_state(&self, py: Python<'_>, values: Vec<f64>) -> PyResult<()> {
        self.lock(py).opt.set_scalar_state(&values).py()
    }

    /// Each tensor's own step count.
    #[getter]
    fn tensor_steps(&self, py: Python<'_>) -> Vec<u64> {
        self.lock(py).opt.tensor_steps().to_vec()
    }

    /// The tensor lengths the state was created for, or `None` before the first step.
    #[getter]
    fn layout(&self, py: Python<'_>) -> Option<Vec<usize>> {
        self.lock(py).opt.layout().map(<[usize]>::to_vec)
    }

    /// The gradient norm the last step computed (with clipping or a non-finite check on), else
    /// `None`.
    #[getter]
    fn last_grad_norm(&self, py: Python<'_>) -> Option<f32> {
        self.lock(py).last.and_then(|(_, norm)| norm)
    }

    /// Whether the last step was skipped for a non-finite gradient.
    #[getter]
    fn last_skipped(&self, py: Python<'_>) -> bool {
        self.lock(py).last.is_some_and(|(skipped, _)| skipped)
    }

    /// Gives each tensor its group's learning rate and weight decay: `group_of[i]` is tensor
    /// `i`'s group (kept from the last call when `None`), `lr[k]` and `weight_decay[k]` group
    /// `k`'s values. The optimizer's own `lr` multiplies them (set it to 1 for absolute rates).
    #[pyo3(signature = (group_of, lr, weight_decay))]
    fn set_groups(
        &self,
        py: Python<'_>,
        group_of: Option<Vec<u32>>,
        lr: Vec<f32>,
        weight_decay: Vec<Option<f32>>,
    ) -> PyResult<()> {
        let mut inner = self.lock(py);
        if lr.len() != weight_decay.len() {
            return Err(PyValueError::new_err(format!(
                "set_groups: {} learning rates but {} weight decays",
                lr.len(),
                weight_decay.len()
            )));
        }
        let group_of = group_of.unwrap_or_else(|| inner.group_of.clone());
        let groups = group_of
            .iter()
            .enumerate()
            .map(
                |(i, &k)| match (lr.get(k as usize), weight_decay.get(k as usize)) {
                    (Some(&lr_scale), Some(&weight_decay)) => Ok(ParamGroup {
                        lr_scale,
                        weight_decay,
                    }),
                    _ => Err(PyValueError::new_err(format!(
                        "set_groups: tensor {i} is in group {k}, but there are {} groups",
                        lr.len()
                    ))),
                },
            )
            .collect::<PyResult<Vec<_>>>()?;
        inner.opt.set_param_groups(&groups).py()?;
        inner.group_of = group_of;
        Ok(())
    }

    /// Names the tensors; state files then refuse a model whose tensors differ.
    fn set_tensor_names(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.lock(py).opt.set_tensor_names(&names).py()
    }

    /// The tensor names (empty if none were set).
    #[getter]
    fn tensor_names(&self, py: Python<'_>) -> Vec<String> {
        self.lock(py).opt.tensor_names().to_vec()
    }

    /// Writes the optimizer state to `path` (atomically; the Rust crate's state file).
    fn save_state(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let mut inner = self.lock(py);
        // `&mut`: the optimizer is `Send`, not `Sync`.
        let opt = &mut inner.opt;
        py.detach(move || {
            let opt: &mut Box<dyn Optimizer> = opt;
            opt.save_state(&path)
        })
        .py()
    }

    /// Reads the optimizer state from `path`; on error nothing changes. Refused while arrays
    /// from `state_array` are alive.
    fn load_state(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let mut inner = self.lock(py);
        inner.check_unshared(py, "load a state file")?;
        let opt = &mut inner.opt;
        py.detach(|| opt.load_state(&path)).py()
    }

    /// Forgets the state, the step counts and the layout. Refused while arrays from
    /// `state_array` are alive.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        let mut inner = self.lock(py);
        inner.check_unshared(py, "reset")?;
        inner.opt.reset();
        inner.shapes = None;
        inner.last = None;
        Ok(())
    }

    /// The names of the state buffers held, in order (`m`, `v`, `v_max` for Adam, `v` for
    /// Momentum and NAG, `h` for AdaGrad and RMSProp); empty before the first step.
    #[getter]
    fn state_names(&self, py: Python<'_>) -> Vec<&'static str> {
        self.lock(py).opt.state_names()
    }

    /// The bytes of memory the state buffers hold (padding included); 0 before the first step.
    #[getter]
    fn state_bytes(&self, py: Python<'_>) -> usize {
        self.lock(py).opt.state_bytes()
    }

    /// Creates the state a first step over tensors of lengths `lens` creates (zeroed, every
    /// tensor at step 0) without stepping; kept as it is if it exists for this layout.
    fn init_state(&self, py: Python<'_>, lens: Vec<usize>) -> PyResult<()> {
        self.lock(py).opt.init_state(&lens).py()
    }

    /// Sets each tensor's step count (the engine's `steps` becomes the largest).
    fn set_tensor_steps(&self, py: Python<'_>, steps: Vec<u64>) -> PyResult<()> {
        self.lock(py).opt.set_tensor_steps(&steps).py()
    }

    /// Tensor `tensor`'s values of state buffer `name` (or `"master"`, the float32 master
    /// weights) as a new float32 array, decoded from the state format.
    fn read_state<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        tensor: usize,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let inner = self.lock(py);
        match inner.opt.read_tensor_state(name, tensor) {
            Some(values) => Ok(PyArray1::from_vec(py, values)),
            None => Err(inner.no_state(name, tensor)),
        }
    }

    /// Sets tensor `tensor`'s values of state buffer `name` (or `"master"`) from a float32
    /// array of its length, encoded in the state format.
    fn write_state(
        &self,
        py: Python<'_>,
        name: &str,
        tensor: usize,
        values: PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        let values = values.as_slice().map_err(|_| {
            PyValueError::new_err("write_state: the values must be a contiguous float32 array")
        })?;
        let mut inner = self.lock(py);
        if name != "master" && !inner.opt.state_names().contains(&name) {
            return Err(inner.no_state(name, tensor));
        }
        inner.opt.write_tensor_state(name, tensor, values).py()
    }

    /// Tensor `tensor`'s slice of state buffer `name`, as a writable 1-D float32 array that
    /// views the engine's memory (no copy): later steps change it, and writing it changes the
    /// state. The array keeps the engine alive; while one is alive, `reset` and `load_state`
    /// are refused.
    fn state_array<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        tensor: usize,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let py = slf.py();
        let mut inner = slf.get().lock(py);
        let found = inner
            .opt
            .tensor_state_mut(name, tensor)
            .map(|values| (values.as_mut_ptr(), values.len()));
        let (ptr, len) = match found {
            Some(found) => found,
            None if name != "master" && inner.opt.state_format() != StateFormat::F32 => {
                return Err(PyValueError::new_err(format!(
                    "state buffer {name:?} is kept as {}, which no float32 array can view: \
                     use read_state / write_state",
                    inner.opt.state_format()
                )));
            }
            None => return Err(inner.no_state(name, tensor)),
        };
        let live = inner.owner.as_ref().and_then(|w| w.bind(py).upgrade());
        let owner = match live {
            Some(owner) => owner,
            None => {
                let owner = Bound::new(
                    py,
                    StateOwner {
                        _engine: slf.clone().unbind(),
                    },
                )?
                .into_any();
                inner.owner = Some(PyWeakrefReference::new(&owner)?.unbind());
                owner
            }
        };
        // SAFETY: `ptr` and `len` are tensor `tensor`'s slice of a state buffer, live memory the
        // engine owns; buffers are freed only by `reset` and `load_state` (refused while the
        // owner is alive) or with the engine, which the owner keeps alive, so the memory
        // outlives the array whose base the owner becomes.
        let view = unsafe { ArrayView1::from_shape_ptr(len, ptr.cast_const()) };
        // SAFETY: as above: the memory stays allocated as long as `owner`, the array's base.
        Ok(unsafe { PyArray1::borrow_from_array(&view, owner) })
    }

    /// One step over numpy arrays: `weights[i]` (C-contiguous, writable float32) is updated in
    /// place from `grads[i]` (float32, the same shape). `labels[i]` names the pair in messages.
    /// The shapes of the first successful step are fixed from then on.
    fn step_arrays(
        &self,
        py: Python<'_>,
        weights: Vec<Bound<'_, PyAny>>,
        grads: Vec<Bound<'_, PyAny>>,
        labels: Vec<(String, String)>,
    ) -> PyResult<()> {
        if weights.len() != grads.len() || weights.len() != labels.len() {
            return Err(PyValueError::new_err(format!(
                "step_arrays: {} weights, {} grads and {} labels",
                weights.len(),
                grads.len(),
                labels.len()
            )));
        }
        // Types, dtypes, contiguity and shapes, before borrowing anything.
        let mut pairs = Vec::with_capacity(weights.len());
        for ((w, g), (wl, gl)) in weights.iter().zip(&grads).zip(&labels) {
            let (w, g) = (float_array(w, wl)?, float_array(g, gl)?);
            for (a, label) in [(w.untyped(), wl), (g.untyped(), gl)] {
                if !a.is_c_contiguous() {
                    return Err(PyValueError::new_err(format!(
                        "{label} is not C-contiguous: fusedopt reads and writes arrays in \
                         place, so pass a contiguous array (np.ascontiguousarray) and keep it"
                    )));
                }
            }
            if w.untyped().shape() != g.untyped().shape() {
                return Err(PyValueError::new_err(format!(
                    "{wl} has shape {} but {gl} has shape {}",
                    shape_text(w.untyped().shape()),
                    shape_text(g.untyped().shape())
                )));
            }
            pairs.push((w, g));
        }
        for (k, kind) in [(0, "weights"), (1, "gradients")] {
            let is_f32 =
                |p: &(FloatArray, FloatArray)| if k == 0 { p.0.is_f32() } else { p.1.is_f32() };
            if let Some(first) = pairs.first()
                && let Some(other) = pairs.iter().position(|p| is_f32(p) != is_f32(first))
            {
                let label = if k == 0 {
                    &labels[other].0
                } else {
                    &labels[other].1
                };
                let name = |f32: bool| if f32 { "float32" } else { "float16" };
                return Err(PyTypeError::new_err(format!(
                    "{label} is {} and the first of the {kind} {}: the {kind} of one update \
                     share one dtype",
                    name(is_f32(&pairs[other])),
                    name(is_f32(first)),
                )));
            }
        }
        let shapes: Vec<Vec<usize>> = pairs
            .iter()
            .map(|(w, _)| w.untyped().shape().to_vec())
            .collect();
        let mut inner = self.lock(py);
        if let Some(held) = &inner.shapes {
            if held.len() != shapes.len() {
                return Err(PyValueError::new_err(format!(
                    "the layout changed: the optimizer state holds {} arrays, this update \
                     passed {}",
                    held.len(),
                    shapes.len()
                )));
            }
            for (shape, (held, (wl, _))) in shapes.iter().zip(held.iter().zip(&labels)) {
                if shape != held {
                    return Err(PyValueError::new_err(format!(
                        "the layout changed: {wl} has shape {}, the optimizer state was \
                         created for {}",
                        shape_text(shape),
                        shape_text(held)
                    )));
                }
            }
        }
        inner.sync_threads()?;
        let opt = &mut inner.opt;
        let wl: Vec<&str> = labels.iter().map(|l| l.0.as_str()).collect();
        let gl: Vec<&str> = labels.iter().map(|l| l.1.as_str()).collect();
        macro_rules! typed {
            ($w:ident, $g:ident) => {{
                let ws: Vec<_> = pairs
                    .iter()
                    .filter_map(|p| match &p.0 {
                        FloatArray::$w(a) => Some(*a),
                        _ => None,
                    })
                    .collect();
                let gs: Vec<_> = pairs
                    .iter()
                    .filter_map(|p| match &p.1 {
                        FloatArray::$g(a) => Some(*a),
                        _ => None,
                    })
                    .collect();
                step_borrowed(py, opt, &ws, &gs, &wl, &gl)
            }};
        }
        let kinds = pairs
            .first()
            .map_or((true, true), |p| (p.0.is_f32(), p.1.is_f32()));
        let report = match kinds {
            (true, true) => typed!(F32, F32),
            (true, false) => typed!(F32, F16),
            (false, true) => typed!(F16, F32),
            (false, false) => typed!(F16, F16),
        }?;
        inner.report(report);
        if inner.shapes.is_none() {
            inner.shapes = Some(shapes);
        }
        Ok(())
    }

    /// Lends the weights by address for `step_bound`: tensor `i` is `lens[i]` values of
    /// `dtype` (`"float32"`, `"bfloat16"` or `"float16"`, the gradients' too) at `addrs[i]`.
    /// Refuses null or misaligned addresses and weights that share memory.
    ///
    /// The caller vouches that the memory stays valid, of that dtype and not otherwise accessed
    /// during each `step_bound`, as `fusedopt.torch` does for CPU tensors it has checked.
    #[pyo3(signature = (addrs, lens, dtype = "float32"))]
    fn bind_weights(
        &self,
        py: Python<'_>,
        addrs: Vec<usize>,
        lens: Vec<usize>,
        dtype: &str,
    ) -> PyResult<()> {
        let dtype = dtype.parse::<Dtype>().py()?;
        if addrs.len() != lens.len() {
            return Err(PyValueError::new_err(format!(
                "bind_weights: {} addresses but {} lengths",
                addrs.len(),
                lens.len()
            )));
        }
        let mut inner = self.lock(py);
        inner
            .raw
            .set_weights(dtype, addrs.into_iter().zip(lens))
            .py()?;
        inner.dtype = dtype;
        inner.flat_grads.clear();
        Ok(())
    }

    /// Lends gradients by address for every later `step_bound(None)` (one flat buffer's views,
    /// which stay the same): `grads[i]` is tensor `i`'s, of its bound length (0: none).
    fn bind_grads(&self, py: Python<'_>, grads: Vec<usize>) -> PyResult<()> {
        let mut inner = self.lock(py);
        let Inner { raw, dtype, .. } = &mut *inner;
        let lens: Vec<usize> = raw.lens().collect();
        raw.set_grads(*dtype, grads.iter().copied().zip(lens), true)
            .py()?;
        inner.flat_grads = grads;
        Ok(())
    }

    /// One step over the bound weights: `grads[i]` is the address of tensor `i`'s gradient (of
    /// its bound length), or 0 when it has none this step (its weights, state and step count
    /// are left alone); `None` steps with the gradients of `bind_grads`. Refuses a gradient that
    /// overlaps a weight.
    ///
    /// The caller vouches for the gradients as for the weights (`bind_weights`).
    #[pyo3(signature = (grads))]
    fn step_bound(&self, py: Python<'_>, grads: Option<Vec<usize>>) -> PyResult<()> {
        let mut guard = self.lock(py);
        let inner = &mut *guard;
        let grads = match grads {
            Some(grads) => grads,
            None if inner.flat_grads.len() == inner.raw.len() => inner.flat_grads.clone(),
            None => {
                return Err(PyValueError::new_err(
                    "step_bound: no gradients bound for these parameters (bind_grads)",
                ));
            }
        };
        let lens: Vec<usize> = inner.raw.lens().collect();
        inner
            .raw
            .set_grads(inner.dtype, grads.into_iter().zip(lens), true)
            .py()?;
        inner.sync_threads()?;
        let (raw, opt) = (&inner.raw, &mut inner.opt);
        // SAFETY: `RawTensors` checked every span (non-null, aligned, inside the address space,
        // weights disjoint from each other and from every gradient); the caller vouches that
        // they are live memory of the bound dtype that nothing else accesses during this call.
        let report = py.detach(|| unsafe { raw.step(&mut **opt) }).py()?;
        inner.report(report);
        Ok(())
    }

    /// Pickling (and `copy`): the optimizer's name, settings and state file, and this layer's
    /// layout and groups. Weights lent by address are not kept: bind them again.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, pyo3::types::PyTuple>)> {
        let py = slf.py();
        let inner = slf.get().lock(py);
        let state = inner.opt.save_state_bytes().py()?;
        let args = (
            inner.opt.name(),
            settings_dict(py, inner.opt.settings())?,
            PyBytes::new(py, &state),
            inner.shapes.clone(),
            inner.group_of.clone(),
            inner.last,
        )
            .into_pyobject(py)?;
        let restore = py.import("fusedopt._engine")?.getattr("_restore")?;
        Ok((restore, args))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!("Engine({:?})", self.lock(py).opt.config().to_string())
    }
}

/// Rebuilds a pickled `Engine` (see `Engine.__reduce__`).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn _restore(
    py: Python<'_>,
    name: &str,
    settings: &Bound<'_, PyDict>,
    state: &[u8],
    shapes: Option<Vec<Vec<usize>>>,
    group_of: Vec<u32>,
    last: Option<(bool, Option<f32>)>,
) -> PyResult<Engine> {
    let mut opt = name.parse::<OptimizerConfig>().py()?.build();
    opt.set_settings(settings_with(*opt.settings(), settings)?)
        .py()?;
    py.detach(|| opt.load_state_bytes(state)).py()?;
    let engine = Engine::of(opt);
    {
        let mut inner = engine.lock(py);
        (inner.shapes, inner.group_of, inner.last) = (shapes, group_of, last);
    }
    Ok(engine)
}

/// Borrows every weight for writing, then every gradient for reading (rust-numpy refuses an
/// array, or an overlapping view of one, already borrowed for writing), and steps them all
/// without the GIL.
fn step_borrowed<E, F>(
    py: Python<'_>,
    opt: &mut Box<dyn Optimizer>,
    weights: &[&Bound<'_, PyArrayDyn<E>>],
    grads: &[&Bound<'_, PyArrayDyn<F>>],
    w_labels: &[&str],
    g_labels: &[&str],
) -> PyResult<StepReport>
where
    E: Element + numpy::Element,
    F: Element + numpy::Element,
{
    let mut ws = Vec::with_capacity(weights.len());
    for (w, label) in weights.iter().zip(w_labels) {
        ws.push(w.try_readwrite().map_err(|e| borrow_error(e, label))?);
    }
    let mut gs = Vec::with_capacity(grads.len());
    for (g, label) in grads.iter().zip(g_labels) {
        gs.push(g.try_readonly().map_err(|e| borrow_error(e, label))?);
    }
    let mut w_slices: Vec<&mut [E]> = ws
        .iter_mut()
        .map(|w| w.as_slice_mut().expect("checked C-contiguous"))
        .collect();
    let g_slices: Vec<&[F]> = gs
        .iter()
        .map(|g| g.as_slice().expect("checked C-contiguous"))
        .collect();
    py.detach(|| opt.step_all_typed(&mut w_slices, &g_slices))
        .py()
}

/// A refused borrow of an array, as a `ValueError` naming it.
fn borrow_error(e: BorrowError, label: &str) -> PyErr {
    let why = match e {
        BorrowError::NotWriteable => "is read-only (its WRITEABLE flag is off)",
        _ => "shares memory with another array of this update: pass each array once",
    };
    PyValueError::new_err(format!("{label} {why}"))
}

/// The module: `Engine`, the optimizers it has, the thread count and the SIMD level.
#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Engine>()?;
    m.add_class::<StateOwner>()?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(rules, m)?)?;
    m.add_function(wrap_pyfunction!(_restore, m)?)?;
    Ok(())
}
