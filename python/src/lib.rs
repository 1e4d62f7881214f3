//! `fusedopt._engine`: the fusedopt engine for Python, a thin PyO3 layer over the `fusedopt`
//! crate. The Python package (`fusedopt`, `fusedopt.torch`) is written against this module;
//! the core crate knows nothing of Python.
//!
//! One class, `Engine`, holds a `Box<dyn Optimizer>` and steps it over either numpy arrays
//! (borrowed through rust-numpy, which refuses an array passed twice) or memory the caller
//! vouches for by address (torch tensors, checked by `fusedopt.torch`). Every step releases the
//! GIL. Errors become Python exceptions that say what was wrong; a refused step modifies nothing.

use fusedopt::{
    Element, NonFinite, Optimizer, OptimizerConfig, ParamGroup, StateError, StateFormat, StepError,
};
use half::{bf16, f16};
use numpy::ndarray::ArrayView1;
use numpy::{
    BorrowError, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyWeakrefMethods, PyWeakrefReference};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// A refused step, as the Python exception that fits it.
fn step_error(e: StepError) -> PyErr {
    match e {
        StepError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
        StepError::ThreadPool { .. } => PyRuntimeError::new_err(e.to_string()),
        e => PyValueError::new_err(e.to_string()),
    }
}

/// A state file that could not be written or read, as a Python exception.
fn state_error(e: StateError) -> PyErr {
    match &e {
        StateError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        StateError::Io { .. } => PyOSError::new_err(e.to_string()),
        StateError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// The non-finite policy's Python name.
fn policy_name(policy: NonFinite) -> &'static str {
    match policy {
        NonFinite::Skip => "skip",
        NonFinite::Error => "error",
        _ => "propagate",
    }
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

/// A dtype of memory lent by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn parse(name: &str) -> PyResult<Dtype> {
        match name {
            "float32" => Ok(Dtype::F32),
            "bfloat16" => Ok(Dtype::Bf16),
            "float16" => Ok(Dtype::F16),
            _ => Err(PyValueError::new_err(format!(
                "dtype {name:?}: fusedopt steps float32, bfloat16 or float16 memory"
            ))),
        }
    }

    fn size(self) -> usize {
        if self == Dtype::F32 { 4 } else { 2 }
    }
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

/// Memory a caller lends by address: `len` values of `size` bytes from `addr` (any address
/// when `len` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    addr: usize,
    len: usize,
    size: usize,
}

impl Span {
    /// One past the last byte.
    fn end(self) -> usize {
        self.addr + self.len * self.size
    }
}

/// Checks that `addr`/`len` can be a slice of `dtype`: not null, aligned, not wrapping the
/// address space.
fn check_span(addr: usize, len: usize, dtype: Dtype, what: &dyn Fn() -> String) -> PyResult<Span> {
    let size = dtype.size();
    if len == 0 {
        return Ok(Span { addr: 0, len, size });
    }
    let fits = len
        .checked_mul(size)
        .and_then(|bytes| addr.checked_add(bytes))
        .is_some_and(|end| end <= isize::MAX as usize);
    if addr == 0 || !addr.is_multiple_of(size) || !fits {
        return Err(PyValueError::new_err(format!(
            "{}: address {addr:#x} with {len} {dtype:?} values is not a valid buffer",
            what()
        )));
    }
    Ok(Span { addr, len, size })
}

/// The weights and gradients of one `step_bound`, as slices of `E` (the caller vouches for the
/// memory, see `Engine::step_bound`).
///
/// # Safety
/// Every non-empty span must be live, aligned memory of `len` values of `E`, the weight spans
/// disjoint from each other and from every gradient span, not otherwise accessed during the
/// returned borrows' lifetime.
unsafe fn bound_slices<'a, E: Element>(
    weights: &[Span],
    grads: &[Option<Span>],
) -> (Vec<&'a mut [E]>, Vec<Option<&'a [E]>>) {
    let w = weights
        .iter()
        .map(|s| match s.len {
            0 => &mut [][..],
            // SAFETY: the caller's contract.
            n => unsafe { std::slice::from_raw_parts_mut(s.addr as *mut E, n) },
        })
        .collect();
    let g = grads
        .iter()
        .map(|g| {
            g.map(|g| match g.len {
                0 => &[][..],
                // SAFETY: the caller's contract.
                n => unsafe { std::slice::from_raw_parts(g.addr as *const E, n) },
            })
        })
        .collect();
    (w, g)
}

/// The fusedopt engine: one optimizer (any of the six, from a configuration string) with its
/// state, stepped over numpy arrays or over memory lent by address.
///
/// This is the layer under `fusedopt`'s numpy classes and `fusedopt.torch`; use those.
#[pyclass(module = "fusedopt._engine")]
struct Engine {
    opt: Mutex<Box<dyn Optimizer>>,
    /// The thread count the optimizer's pool was last set to (0: not yet).
    threads: usize,
    /// The shapes of the numpy arrays of the first successful step, fixed from then on.
    shapes: Option<Vec<Vec<usize>>>,
    /// The weights lent by address with `bind_weights`, in tensor order.
    bound: Vec<Span>,
    /// The same, non-empty ones only, by address (for overlap checks).
    by_addr: Vec<(Span, usize)>,
    /// The gradients lent by address with `bind_grads`, in tensor order (`None`: no gradient).
    bound_grads: Vec<Option<Span>>,
    /// The dtype of the bound weights and of the gradients `step_bound` reads.
    dtype: Dtype,
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

    /// The optimizer, borrowed exclusively.
    fn opt(&mut self) -> &mut Box<dyn Optimizer> {
        self.opt.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the global thread count if it changed since the last step.
    fn sync_threads(&mut self) -> PyResult<()> {
        let want = get_num_threads();
        if want != self.threads {
            self.opt().set_threads(want).map_err(step_error)?;
            self.threads = want;
        }
        Ok(())
    }
}

#[pymethods]
impl Engine {
    /// Builds the optimizer from a configuration string, `name[:field=value,...]`
    /// (for example `"adam:lr=3e-4,weight_decay=0.1"`).
    #[new]
    fn new(config: &str) -> PyResult<Self> {
        let config: OptimizerConfig = config
            .parse()
            .map_err(|e: fusedopt::ParseConfigError| PyValueError::new_err(e.to_string()))?;
        config.validate().map_err(step_error)?;
        Ok(Engine {
            opt: Mutex::new(config.build()),
            threads: 0,
            dtype: Dtype::F32,
            shapes: None,
            bound: Vec::new(),
            by_addr: Vec::new(),
            bound_grads: Vec::new(),
            group_of: Vec::new(),
            last: None,
            owner: None,
        })
    }

    /// The optimizer's name: `"sgd"`, `"momentum"`, `"nag"`, `"adagrad"`, `"rmsprop"` or
    /// `"adam"`.
    #[getter]
    fn name(&mut self) -> &'static str {
        self.opt().name()
    }

    /// The configuration, as a string that `Engine(...)` and `set_config` read.
    #[getter]
    fn config(&mut self) -> String {
        self.opt().config().to_string()
    }

    /// Replaces the hyperparameters (same optimizer), keeping the state.
    fn set_config(&mut self, config: &str) -> PyResult<()> {
        let config: OptimizerConfig = config
            .parse()
            .map_err(|e: fusedopt::ParseConfigError| PyValueError::new_err(e.to_string()))?;
        self.opt().set_config(config).map_err(step_error)
    }

    /// The learning rate.
    #[getter]
    fn get_lr(&mut self) -> f32 {
        self.opt().lr()
    }

    /// Sets the learning rate (finite and >= 0).
    #[setter]
    fn set_lr(&mut self, lr: f32) -> PyResult<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "lr = {lr} is invalid, expected finite and >= 0"
            )));
        }
        self.opt().set_lr(lr);
        Ok(())
    }

    /// Steps taken (not counting skipped ones).
    #[getter]
    fn steps(&mut self) -> u64 {
        self.opt().steps()
    }

    /// Each tensor's own step count.
    #[getter]
    fn tensor_steps(&mut self) -> Vec<u64> {
        self.opt().tensor_steps().to_vec()
    }

    /// The tensor lengths the state was created for, or `None` before the first step.
    #[getter]
    fn layout(&mut self) -> Option<Vec<usize>> {
        self.opt().layout().map(<[usize]>::to_vec)
    }

    /// The gradient norm the last step computed (with clipping or a non-finite check on), else
    /// `None`.
    #[getter]
    fn last_grad_norm(&self) -> Option<f32> {
        self.last.and_then(|(_, norm)| norm)
    }

    /// Whether the last step was skipped for a non-finite gradient.
    #[getter]
    fn last_skipped(&self) -> bool {
        self.last.is_some_and(|(skipped, _)| skipped)
    }

    /// The loss scale gradients are divided by.
    #[getter]
    fn get_grad_scale(&mut self) -> f32 {
        self.opt().grad_scale()
    }

    /// Sets the loss scale (finite and > 0).
    #[setter]
    fn set_grad_scale(&mut self, scale: f32) -> PyResult<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(PyValueError::new_err(format!(
                "grad_scale = {scale} is invalid, expected finite and > 0"
            )));
        }
        self.opt().set_grad_scale(scale);
        Ok(())
    }

    /// The global gradient norm gradients are clipped to, or `None`.
    #[getter]
    fn get_max_grad_norm(&mut self) -> Option<f32> {
        self.opt().max_grad_norm()
    }

    /// Sets the clipping norm (finite and > 0), or `None` for no clipping.
    #[setter]
    fn set_max_grad_norm(&mut self, max: Option<f32>) -> PyResult<()> {
        if let Some(m) = max.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(PyValueError::new_err(format!(
                "max_grad_norm = {m} is invalid, expected finite and > 0, or None"
            )));
        }
        self.opt().set_max_grad_norm(max);
        Ok(())
    }

    /// What a NaN or infinite gradient does: `"propagate"`, `"skip"` or `"error"`.
    #[getter]
    fn get_non_finite(&mut self) -> &'static str {
        policy_name(self.opt().non_finite())
    }

    /// Sets the non-finite policy.
    #[setter]
    fn set_non_finite(&mut self, policy: &str) -> PyResult<()> {
        let policy = match policy {
            "propagate" => NonFinite::Propagate,
            "skip" => NonFinite::Skip,
            "error" => NonFinite::Error,
            other => {
                return Err(PyValueError::new_err(format!(
                    "non_finite = {other:?} is invalid, expected 'propagate', 'skip' or 'error'"
                )));
            }
        };
        self.opt().set_non_finite(policy);
        Ok(())
    }

    /// Gives each tensor its group's learning rate and weight decay: `group_of[i]` is tensor
    /// `i`'s group (kept from the last call when `None`), `lr[k]` and `weight_decay[k]` group
    /// `k`'s values. The optimizer's own `lr` multiplies them (set it to 1 for absolute rates).
    #[pyo3(signature = (group_of, lr, weight_decay))]
    fn set_groups(
        &mut self,
        group_of: Option<Vec<u32>>,
        lr: Vec<f32>,
        weight_decay: Vec<Option<f32>>,
    ) -> PyResult<()> {
        if lr.len() != weight_decay.len() {
            return Err(PyValueError::new_err(format!(
                "set_groups: {} learning rates but {} weight decays",
                lr.len(),
                weight_decay.len()
            )));
        }
        let group_of = group_of.unwrap_or_else(|| self.group_of.clone());
        let groups = group_of
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let k = k as usize;
                match (lr.get(k), weight_decay.get(k)) {
                    (Some(&lr_scale), Some(&weight_decay)) => Ok(ParamGroup {
                        lr_scale,
                        weight_decay,
                    }),
                    _ => Err(PyValueError::new_err(format!(
                        "set_groups: tensor {i} is in group {k}, but there are {} groups",
                        lr.len()
                    ))),
                }
            })
            .collect::<PyResult<Vec<_>>>()?;
        self.opt().set_param_groups(&groups).map_err(step_error)?;
        self.group_of = group_of;
        Ok(())
    }

    /// Names the tensors; state files then refuse a model whose tensors differ.
    fn set_tensor_names(&mut self, names: Vec<String>) -> PyResult<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.opt().set_tensor_names(&names).map_err(step_error)
    }

    /// The tensor names (empty if none were set).
    #[getter]
    fn tensor_names(&mut self) -> Vec<String> {
        self.opt().tensor_names().to_vec()
    }

    /// Writes the optimizer state to `path` (atomically; the Rust crate's state file).
    fn save_state(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let opt = self.opt();
        py.detach(move || opt.save_state(&path))
            .map_err(state_error)
    }

    /// Reads the optimizer state from `path`; on error nothing changes. Refused while arrays
    /// from `state_array` are alive.
    fn load_state(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.check_unshared(py, "load a state file")?;
        let opt = self.opt();
        py.detach(move || opt.load_state(&path))
            .map_err(state_error)
    }

    /// Forgets the state, the step counts and the layout. Refused while arrays from
    /// `state_array` are alive.
    fn reset(&mut self, py: Python<'_>) -> PyResult<()> {
        self.check_unshared(py, "reset")?;
        self.opt().reset();
        self.shapes = None;
        self.last = None;
        Ok(())
    }

    /// The names of the state buffers held, in order (`m`, `v`, `v_max` for Adam, `v` for
    /// Momentum and NAG, `h` for AdaGrad and RMSProp); empty before the first step.
    #[getter]
    fn state_names(&mut self) -> Vec<&'static str> {
        self.opt().state_names()
    }

    /// The bytes of memory the state buffers hold (padding included); 0 before the first step.
    #[getter]
    fn state_bytes(&mut self) -> usize {
        self.opt().state_bytes()
    }

    /// Creates the state a first step over tensors of lengths `lens` creates (zeroed, every
    /// tensor at step 0) without stepping; kept as it is if it exists for this layout.
    fn init_state(&mut self, lens: Vec<usize>) -> PyResult<()> {
        self.opt().init_state(&lens).map_err(step_error)
    }

    /// Sets each tensor's step count (the engine's `steps` becomes the largest).
    fn set_tensor_steps(&mut self, steps: Vec<u64>) -> PyResult<()> {
        self.opt().set_tensor_steps(&steps).map_err(step_error)
    }

    /// The format of the optimizer state: `"f32"`, `"bf16"` or `"q8"`.
    #[getter]
    fn get_state_format(&mut self) -> String {
        self.opt().state_format().to_string()
    }

    /// Chooses the format of the state, before the first step: `"f32"`, `"bf16"` (stochastic
    /// rounding) or `"q8"` (8-bit, block-wise).
    #[setter]
    fn set_state_format(&mut self, format: &str) -> PyResult<()> {
        let format: StateFormat = format.parse().map_err(|_| {
            PyValueError::new_err(format!(
                "state_format {format:?}: choose one of {}",
                StateFormat::ALL
                    .iter()
                    .map(|f| format!("{:?}", f.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        self.opt().set_state_format(format).map_err(step_error)
    }

    /// Tensor `tensor`'s values of state buffer `name` (or `"master"`, the float32 master
    /// weights) as a new float32 array, decoded from the state format.
    fn read_state<'py>(
        &mut self,
        py: Python<'py>,
        name: &str,
        tensor: usize,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        match self.opt().read_tensor_state(name, tensor) {
            Some(values) => Ok(PyArray1::from_vec(py, values)),
            None => Err(self.no_state(name, tensor)),
        }
    }

    /// Sets tensor `tensor`'s values of state buffer `name` (or `"master"`) from a float32
    /// array of its length, encoded in the state format.
    fn write_state(
        &mut self,
        name: &str,
        tensor: usize,
        values: PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        let values = values.as_slice().map_err(|_| {
            PyValueError::new_err("write_state: the values must be a contiguous float32 array")
        })?;
        if name != "master" && !self.opt().state_names().contains(&name) {
            return Err(self.no_state(name, tensor));
        }
        self.opt()
            .write_tensor_state(name, tensor, values)
            .map_err(step_error)
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
        let mut this = slf.borrow_mut();
        let found = this
            .opt()
            .tensor_state_mut(name, tensor)
            .map(|values| (values.as_mut_ptr(), values.len()));
        let (ptr, len) = match found {
            Some(found) => found,
            None if name != "master" && this.opt().state_format() != StateFormat::F32 => {
                return Err(PyValueError::new_err(format!(
                    "state buffer {name:?} is kept as {}, which no float32 array can view: \
                     use read_state / write_state",
                    this.opt().state_format()
                )));
            }
            None => return Err(this.no_state(name, tensor)),
        };
        let live = this.owner.as_ref().and_then(|w| w.bind(py).upgrade());
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
                this.owner = Some(PyWeakrefReference::new(&owner)?.unbind());
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
        &mut self,
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
                return Err(PyTypeError::new_err(format!(
                    "{label} is {} and the first of the {kind} {}: the {kind} of one update \
                     share one dtype",
                    if is_f32(&pairs[other]) {
                        "float32"
                    } else {
                        "float16"
                    },
                    if is_f32(first) { "float32" } else { "float16" },
                )));
            }
        }
        let shapes: Vec<Vec<usize>> = pairs
            .iter()
            .map(|(w, _)| w.untyped().shape().to_vec())
            .collect();
        if let Some(held) = &self.shapes {
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
        self.sync_threads()?;
        let opt = self.opt.get_mut().unwrap_or_else(|e| e.into_inner());
        let wl: Vec<&str> = labels.iter().map(|l| l.0.as_str()).collect();
        let gl: Vec<&str> = labels.iter().map(|l| l.1.as_str()).collect();
        macro_rules! typed {
            ($w:ident, $g:ident) => {{
                let ws: Vec<_> = pairs
                    .iter()
                    .map(|p| match &p.0 {
                        FloatArray::$w(a) => *a,
                        _ => unreachable!("checked above"),
                    })
                    .collect();
                let gs: Vec<_> = pairs
                    .iter()
                    .map(|p| match &p.1 {
                        FloatArray::$g(a) => *a,
                        _ => unreachable!("checked above"),
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
        self.last = Some((report.skipped, report.grad_norm));
        if self.shapes.is_none() {
            self.shapes = Some(shapes);
        }
        Ok(())
    }

    /// Lends the weights by address for `step_bound`: tensor `i` is `lens[i]` float32 values
    /// at `addrs[i]`. Refuses null or misaligned addresses, weights that share memory, and
    /// lengths other than the state's.
    ///
    /// The caller vouches that the memory stays valid, float32 and not otherwise accessed
    /// during each `step_bound`, as `fusedopt.torch` does for CPU tensors it has checked.
    #[pyo3(signature = (addrs, lens, dtype = "float32"))]
    fn bind_weights(&mut self, addrs: Vec<usize>, lens: Vec<usize>, dtype: &str) -> PyResult<()> {
        let dtype = Dtype::parse(dtype)?;
        if addrs.len() != lens.len() {
            return Err(PyValueError::new_err(format!(
                "bind_weights: {} addresses but {} lengths",
                addrs.len(),
                lens.len()
            )));
        }
        let bound = addrs
            .iter()
            .zip(&lens)
            .enumerate()
            .map(|(i, (&a, &n))| check_span(a, n, dtype, &|| format!("parameter {i}")))
            .collect::<PyResult<Vec<_>>>()?;
        let mut by_addr: Vec<(Span, usize)> = bound
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, s)| s.len > 0)
            .map(|(i, s)| (s, i))
            .collect();
        by_addr.sort_unstable_by_key(|(s, _)| s.addr);
        if let Some(pair) = by_addr.windows(2).find(|p| p[0].0.end() > p[1].0.addr) {
            let (a, b) = (pair[0].1.min(pair[1].1), pair[0].1.max(pair[1].1));
            return Err(PyValueError::new_err(format!(
                "parameters {a} and {b} share memory: each parameter must own its memory"
            )));
        }
        if let Some(layout) = self.opt().layout()
            && layout != lens.as_slice()
        {
            return Err(PyValueError::new_err(format!(
                "the layout changed: the optimizer state holds {} tensors of lengths \
                 {layout:?}, the parameters now have {lens:?}",
                layout.len()
            )));
        }
        self.bound = bound;
        self.by_addr = by_addr;
        self.dtype = dtype;
        self.bound_grads.clear();
        Ok(())
    }

    /// Lends gradients by address for every later `step_bound(None)` (one flat buffer's views,
    /// which stay the same): checked as `step_bound` checks them, once.
    fn bind_grads(&mut self, grads: Vec<usize>) -> PyResult<()> {
        self.bound_grads = self.grad_spans(&grads)?;
        Ok(())
    }

    /// One step over the bound weights: `grads[i]` is the address of tensor `i`'s float32
    /// gradient (its bound length), or 0 when it has none this step (its weights, state and
    /// step count are left alone); `None` steps with the gradients of `bind_grads`. Refuses a
    /// gradient that overlaps a weight.
    ///
    /// The caller vouches for the gradients as for the weights (`bind_weights`).
    #[pyo3(signature = (grads))]
    fn step_bound(&mut self, py: Python<'_>, grads: Option<Vec<usize>>) -> PyResult<()> {
        let fresh;
        let g_spans = match &grads {
            Some(grads) => {
                fresh = self.grad_spans(grads)?;
                &fresh
            }
            None if self.bound_grads.len() == self.bound.len() => &self.bound_grads,
            None => {
                return Err(PyValueError::new_err(
                    "step_bound: no gradients bound for these parameters (bind_grads)",
                ));
            }
        };
        let want = get_num_threads();
        let opt = self.opt.get_mut().unwrap_or_else(|e| e.into_inner());
        if want != self.threads {
            opt.set_threads(want).map_err(step_error)?;
            self.threads = want;
        }
        // SAFETY (each arm): `bind_weights` checked every weight span non-null, aligned for the
        // bound dtype and disjoint from every other; `grad_spans` checked every gradient span
        // the same way and disjoint from every weight; the caller vouches that they are live
        // memory of that dtype that nothing else accesses during this call.
        let report = match self.dtype {
            Dtype::F32 => {
                let (mut w, g) = unsafe { bound_slices::<f32>(&self.bound, g_spans) };
                py.detach(|| opt.step_partial(&mut w, &g))
            }
            Dtype::Bf16 => {
                let (mut w, g) = unsafe { bound_slices::<bf16>(&self.bound, g_spans) };
                py.detach(|| opt.step_partial_typed(&mut w, &g))
            }
            Dtype::F16 => {
                let (mut w, g) = unsafe { bound_slices::<f16>(&self.bound, g_spans) };
                py.detach(|| opt.step_partial_typed(&mut w, &g))
            }
        }
        .map_err(step_error)?;
        self.last = Some((report.skipped, report.grad_norm));
        Ok(())
    }

    fn __repr__(&mut self) -> String {
        format!("Engine({:?})", self.opt().config().to_string())
    }
}

impl Engine {
    /// The error for a state buffer or tensor the optimizer does not hold.
    fn no_state(&mut self, name: &str, tensor: usize) -> PyErr {
        let held = self.opt().state_names();
        PyValueError::new_err(format!(
            "no state buffer {name:?} for tensor {tensor} (buffers held: {held:?}, tensors: {})",
            self.opt().layout().map_or(0, <[usize]>::len)
        ))
    }

    /// Checks gradient addresses against the bound weights: one per weight, of its length,
    /// non-null, aligned and disjoint from every weight (0: no gradient).
    fn grad_spans(&self, grads: &[usize]) -> PyResult<Vec<Option<Span>>> {
        if grads.len() != self.bound.len() {
            return Err(PyValueError::new_err(format!(
                "{} gradients for {} bound parameters",
                grads.len(),
                self.bound.len()
            )));
        }
        let mut g_spans = Vec::with_capacity(grads.len());
        for (i, (&addr, w)) in grads.iter().zip(&self.bound).enumerate() {
            if addr == 0 {
                g_spans.push(None);
                continue;
            }
            let g = check_span(addr, w.len, self.dtype, &|| {
                format!("the gradient of parameter {i}")
            })?;
            if g.len > 0 {
                // The last weight starting before the gradient's end is the only candidate.
                let k = self.by_addr.partition_point(|(s, _)| s.addr < g.end());
                if let Some(&(s, j)) = k.checked_sub(1).map(|k| &self.by_addr[k])
                    && s.end() > g.addr
                {
                    return Err(PyValueError::new_err(format!(
                        "the gradient of parameter {i} shares memory with parameter {j}"
                    )));
                }
            }
            g_spans.push(Some(g));
        }
        Ok(g_spans)
    }
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
) -> PyResult<fusedopt::StepReport>
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
        .map_err(step_error)
}

/// A refused borrow of an array, as a `ValueError` naming it.
fn borrow_error(e: BorrowError, label: &str) -> PyErr {
    let why = match e {
        BorrowError::NotWriteable => "is read-only (its WRITEABLE flag is off)",
        _ => "shares memory with another array of this update: pass each array once",
    };
    PyValueError::new_err(format!("{label} {why}"))
}

/// The module: `Engine`, the thread count and the SIMD level.
#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Engine>()?;
    m.add_class::<StateOwner>()?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    Ok(())
}
