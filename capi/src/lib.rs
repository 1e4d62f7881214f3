//! # The fusedopt C ABI
//!
//! `libfusedopt.so` / `libfusedopt.a` and the header `include/fusedopt.h` (generated from this
//! file by cbindgen, see `tests/header.rs`): the fusedopt optimizers for trainers written in C or
//! C++. A thin layer over the Rust crate's `fusedopt::Optimizer`: it checks what a C caller
//! can get wrong (NULL pointers, misaligned or oversized buffers, overlapping weights and
//! gradients, out-of-range settings), turns every error into a status code and a thread-local
//! message, and never lets a Rust panic cross the boundary.
//!
//! ```c
//! fusedopt_optimizer *opt;
//! if (fusedopt_new("adamw:lr=3e-4,weight_decay=0.1", &opt) != FUSEDOPT_OK) {
//!     fprintf(stderr, "%s\n", fusedopt_last_error());
//!     return 1;
//! }
//! for (int step = 0; step < 100; step++) {
//!     compute_gradients(weights, grads, n);
//!     if (fusedopt_step(opt, weights, n, grads, n) != FUSEDOPT_OK) { /* ... */ }
//! }
//! fusedopt_free(opt);
//! ```
//!
//! ## Conventions
//! - Every function that can fail returns a `fusedopt_status`; `FUSEDOPT_OK`
//!   is 0. On failure nothing was modified (weights, state and settings are as before the call)
//!   and `fusedopt_last_error` gives a message naming the problem.
//! - Lengths are element counts. `float` buffers must be 4-byte aligned, `uint16_t` (bf16/f16)
//!   buffers 2-byte aligned.
//! - Strings are NUL-terminated UTF-8 (paths: any bytes, as the OS takes them).
//!
//! ## Threads
//! A handle is used by one thread at a time; calls on different handles are independent and may
//! run concurrently. Two calls overlapping on one handle are detected where they collide (the
//! second returns `FUSEDOPT_ERROR_BUSY` and changes nothing), but a handle must not be freed while
//! another thread uses it. A step runs on the optimizer's own pool of threads
//! (`fusedopt_set_threads`) or, by default, on the process-wide pool (one thread per core);
//! freeing a handle stops its threads before it returns.

// The C names are the contract (`fusedopt_optimizer`, `fusedopt_status`, ...).
#![allow(non_camel_case_types)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use fusedopt::raw::{RawError, RawTensors};
use fusedopt::{
    Backend, Dtype, NonFinite, Optimizer, OptimizerConfig, ParamGroup, Settings, SimdLevel,
    StateError, StateFormat, StepError, StepReport,
};
use std::cell::{RefCell, UnsafeCell};
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// The result of a call. `FUSEDOPT_OK` (0) is success; on any other value nothing was modified
/// and `fusedopt_last_error` says what was wrong.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fusedopt_status {
    /// Success.
    FUSEDOPT_OK = 0,
    /// A handle or a pointer argument was NULL.
    FUSEDOPT_ERROR_NULL = 1,
    /// An argument is malformed or out of range: a configuration string that does not parse, a
    /// hyperparameter or setting out of its range, an unknown enum value, a misaligned or
    /// oversized buffer, a string that is not UTF-8, an unusable tensor name.
    FUSEDOPT_ERROR_INVALID_ARGUMENT = 2,
    /// Lengths that must agree do not: a tensor's weights and gradients, or the number of
    /// parameter groups or tensor names and the number of tensors.
    FUSEDOPT_ERROR_LENGTH_MISMATCH = 3,
    /// The tensors differ from the layout the optimizer state was created for (another tensor
    /// count or tensor length), or a state file's layout or tensor names differ from the
    /// optimizer's; `fusedopt_reset` starts over with a new layout.
    FUSEDOPT_ERROR_LAYOUT = 4,
    /// A weight buffer overlaps another weight buffer or a gradient buffer.
    FUSEDOPT_ERROR_OVERLAP = 5,
    /// A gradient holds a NaN or an infinity under `FUSEDOPT_NON_FINITE_ERROR`.
    FUSEDOPT_ERROR_NON_FINITE = 6,
    /// A state file could not be used: not a fusedopt state file, damaged (checksum), or of
    /// another format version, optimizer kind or state format.
    FUSEDOPT_ERROR_STATE_FILE = 7,
    /// The file system refused to read or write a state file.
    FUSEDOPT_ERROR_IO = 8,
    /// Memory or threads could not be obtained.
    FUSEDOPT_ERROR_RESOURCES = 9,
    /// Another thread is using the handle.
    FUSEDOPT_ERROR_BUSY = 10,
    /// An internal error (a Rust panic, caught at the boundary). The handle may be
    /// inconsistent: every later call on it returns this code; free it.
    FUSEDOPT_ERROR_INTERNAL = 11,
}

use fusedopt_status::*;

/// The floating-point format of a buffer: `FUSEDOPT_DTYPE_F32`, `FUSEDOPT_DTYPE_BF16` or
/// `FUSEDOPT_DTYPE_F16` (half-precision values passed as `uint16_t` bit patterns).
pub type fusedopt_dtype = i32;
/// IEEE single precision (`float`).
pub const FUSEDOPT_DTYPE_F32: fusedopt_dtype = 0;
/// bfloat16, as `uint16_t` bit patterns.
pub const FUSEDOPT_DTYPE_BF16: fusedopt_dtype = 1;
/// IEEE half precision, as `uint16_t` bit patterns.
pub const FUSEDOPT_DTYPE_F16: fusedopt_dtype = 2;

/// What a step does with a NaN or an infinity in a gradient (`fusedopt_set_non_finite`).
pub type fusedopt_non_finite = i32;
/// No check: NaN and infinities flow into weights and state (the default, and the fastest).
pub const FUSEDOPT_NON_FINITE_PROPAGATE: fusedopt_non_finite = 0;
/// Modify nothing and do not count the step; the report says `skipped` (dynamic loss scaling).
pub const FUSEDOPT_NON_FINITE_SKIP: fusedopt_non_finite = 1;
/// Refuse the step with `FUSEDOPT_ERROR_NON_FINITE`; nothing is modified.
pub const FUSEDOPT_NON_FINITE_ERROR: fusedopt_non_finite = 2;

/// Which kernels run (`fusedopt_settings.backend`). Every backend gives bitwise the same
/// results; they differ in speed only.
pub type fusedopt_backend = i32;
/// The fastest SIMD tier of this CPU (the default).
pub const FUSEDOPT_BACKEND_SIMD: fusedopt_backend = 0;
/// The plain scalar reference kernel.
pub const FUSEDOPT_BACKEND_SCALAR: fusedopt_backend = 1;
/// The portable SIMD kernel.
pub const FUSEDOPT_BACKEND_PORTABLE: fusedopt_backend = 2;
/// The AVX2 kernel (where the CPU lacks it, the best tier below it).
pub const FUSEDOPT_BACKEND_AVX2: fusedopt_backend = 3;

/// The format the optimizer state is kept in (`fusedopt_settings.state_format`).
pub type fusedopt_state_format = i32;
/// 32-bit floats (the default).
pub const FUSEDOPT_STATE_F32: fusedopt_state_format = 0;
/// bfloat16 with stochastic rounding: half the state memory.
pub const FUSEDOPT_STATE_BF16: fusedopt_state_format = 1;
/// 8-bit codes in blocks of 256 with a float scale each: a quarter of the state memory.
pub const FUSEDOPT_STATE_Q8: fusedopt_state_format = 2;

/// The version of `fusedopt_settings` this header declares: set `version` to it before
/// `fusedopt_get_settings`. A later library keeps reading and writing the fields of every earlier
/// version, so a program built against this header keeps working.
pub const FUSEDOPT_SETTINGS_VERSION: u32 = 1;

/// How an optimizer's steps run, and their gradient hygiene: the Rust crate's `Settings`, read
/// with `fusedopt_get_settings` and replaced, checked in full, with `fusedopt_set_settings`.
///
/// ```c
/// fusedopt_settings s = {.version = FUSEDOPT_SETTINGS_VERSION};
/// fusedopt_get_settings(opt, &s);
/// s.grad_scale = 1024.0f;
/// s.clip = 1;
/// s.max_grad_norm = 1.0f;
/// if (fusedopt_set_settings(opt, &s) != FUSEDOPT_OK) fprintf(stderr, "%s\n", fusedopt_last_error());
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct fusedopt_settings {
    /// `FUSEDOPT_SETTINGS_VERSION`, set by the caller: which fields follow.
    pub version: u32,
    /// Which kernels run: a `fusedopt_backend` (default `FUSEDOPT_BACKEND_SIMD`).
    pub backend: fusedopt_backend,
    /// Threads of the optimizer's own pool; 0 (the default) runs steps on the process-wide pool.
    pub threads: usize,
    /// Elements per task of a step; 0 (the default) for the tuned default. Other values are
    /// rounded up to a multiple of 16.
    pub chunk_len: usize,
    /// The loss scale gradients are divided by (default 1). Finite and `> 0`.
    pub grad_scale: f32,
    /// Nonzero: clip by global norm to `max_grad_norm`, as `torch.nn.utils.clip_grad_norm_`.
    pub clip: i32,
    /// The clipping norm, when `clip`. Finite and `>= 0`.
    pub max_grad_norm: f32,
    /// What a NaN or infinite gradient does: a `fusedopt_non_finite`.
    pub non_finite: fusedopt_non_finite,
    /// The format new state is created in: a `fusedopt_state_format`. Another format than that
    /// of state already held is refused.
    pub state_format: fusedopt_state_format,
}

/// One tensor's overrides of the configuration (`fusedopt_set_param_groups`): PyTorch's
/// parameter groups, one entry per tensor.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fusedopt_param_group {
    /// Multiplies the configured learning rate for this tensor (1: none). Finite and `>= 0`.
    pub lr_scale: f32,
    /// Replaces the configured weight decay for this tensor when `override_weight_decay` is
    /// nonzero. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Nonzero: use `weight_decay`; 0: keep the configuration's.
    pub override_weight_decay: i32,
}

/// What the last successful step did (`fusedopt_last_report`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct fusedopt_report {
    /// The optimizer's step count after the step (unchanged by a skipped step).
    pub step: u64,
    /// Nonzero: the step found a NaN or an infinity under `FUSEDOPT_NON_FINITE_SKIP` and
    /// modified nothing.
    pub skipped: i32,
    /// Nonzero: `grad_norm` holds the gradients' global L2 norm (taken when clipping or the
    /// non-finite check ran).
    pub has_grad_norm: i32,
    /// The global L2 norm of the unscaled gradients before clipping, when `has_grad_norm`.
    pub grad_norm: f32,
}

/// An optimizer: one of fusedopt's, with its settings and state. Opaque; made by
/// `fusedopt_new`, freed by `fusedopt_free`.
pub struct fusedopt_optimizer {
    /// Set while a call uses the handle.
    busy: AtomicBool,
    inner: UnsafeCell<Handle>,
}

/// What a handle holds.
struct Handle {
    opt: Box<dyn Optimizer>,
    /// The last successful step's report.
    last: fusedopt_report,
    /// A call panicked: the handle is no longer trusted.
    poisoned: bool,
    /// The buffers of the last step, checked: a trainer passes the same buffers every step,
    /// and those need no new check.
    raw: RawTensors,
}

/// A failed call: its status and message.
#[derive(Debug)]
struct Error {
    status: fusedopt_status,
    message: String,
}

impl Error {
    fn new(status: fusedopt_status, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

impl From<StepError> for Error {
    fn from(e: StepError) -> Error {
        let status = match e {
            StepError::LengthMismatch { .. }
            | StepError::GroupCount { .. }
            | StepError::GradCount { .. }
            | StepError::NameCount { .. } => FUSEDOPT_ERROR_LENGTH_MISMATCH,
            StepError::TensorCount { .. } | StepError::TensorLen { .. } => FUSEDOPT_ERROR_LAYOUT,
            StepError::NonFiniteGrad { .. } => FUSEDOPT_ERROR_NON_FINITE,
            StepError::ThreadPool { .. } | StepError::OutOfMemory { .. } => {
                FUSEDOPT_ERROR_RESOURCES
            }
            _ => FUSEDOPT_ERROR_INVALID_ARGUMENT,
        };
        Error::new(status, e.to_string())
    }
}

impl From<RawError> for Error {
    fn from(e: RawError) -> Error {
        let status = match e {
            RawError::Null { .. } => FUSEDOPT_ERROR_NULL,
            RawError::Overlap { .. } => FUSEDOPT_ERROR_OVERLAP,
            RawError::Count { .. } | RawError::Length { .. } => FUSEDOPT_ERROR_LENGTH_MISMATCH,
            _ => FUSEDOPT_ERROR_INVALID_ARGUMENT,
        };
        Error::new(status, e.to_string())
    }
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Error {
        let status = match e {
            StateError::Io { .. } => FUSEDOPT_ERROR_IO,
            StateError::OutOfMemory { .. } => FUSEDOPT_ERROR_RESOURCES,
            StateError::Layout { .. } | StateError::Names { .. } => FUSEDOPT_ERROR_LAYOUT,
            _ => FUSEDOPT_ERROR_STATE_FILE,
        };
        Error::new(status, e.to_string())
    }
}

thread_local! {
    /// The message of this thread's last failed call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `e` as this thread's last error and returns its status.
fn fail(e: Error) -> fusedopt_status {
    let message = CString::new(e.message.replace('\0', "\u{FFFD}")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
    e.status
}

/// Runs `f`, turning its error or panic into a status.
fn guarded(f: impl FnOnce() -> Result<()>) -> fusedopt_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FUSEDOPT_OK,
        Ok(Err(e)) => fail(e),
        Err(payload) => fail(Error::new(
            FUSEDOPT_ERROR_INTERNAL,
            format!("internal error: {}", panic_message(&*payload)),
        )),
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic"
    }
}

/// Runs `f` on the handle `opt` with exclusive access, turning errors and panics into a status;
/// a panic poisons the handle.
///
/// # Safety
/// `opt` is NULL or a live handle from `fusedopt_new`.
unsafe fn with_handle(
    opt: *const fusedopt_optimizer,
    f: impl FnOnce(&mut Handle) -> Result<()>,
) -> fusedopt_status {
    // SAFETY: the caller's contract; only a shared reference is formed before the handle is
    // claimed.
    let Some(handle) = (unsafe { opt.as_ref() }) else {
        return fail(Error::new(
            FUSEDOPT_ERROR_NULL,
            "the optimizer handle is NULL",
        ));
    };
    if handle
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return fail(Error::new(
            FUSEDOPT_ERROR_BUSY,
            "the optimizer handle is in use by another thread",
        ));
    }
    /// Releases the claim, also when `f` panics.
    struct Release<'a>(&'a AtomicBool);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _release = Release(&handle.busy);
    // SAFETY: the `busy` flag, claimed above, makes this the only access to `inner` until it is
    // released.
    let inner = unsafe { &mut *handle.inner.get() };
    if inner.poisoned {
        return fail(Error::new(
            FUSEDOPT_ERROR_INTERNAL,
            "an earlier call on this handle failed with an internal error; free it",
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| f(inner))) {
        Ok(Ok(())) => FUSEDOPT_OK,
        Ok(Err(e)) => fail(e),
        Err(payload) => {
            inner.poisoned = true;
            fail(Error::new(
                FUSEDOPT_ERROR_INTERNAL,
                format!("internal error: {}", panic_message(&*payload)),
            ))
        }
    }
}

/// Writes `value` to the out-pointer `out`.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, what: &str, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::new(FUSEDOPT_ERROR_NULL, format!("{what} is NULL")));
    }
    // SAFETY: non-null, and valid for a write by the caller's contract.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

/// The string at `s`, as UTF-8.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string.
unsafe fn utf8<'a>(s: *const c_char, what: &str) -> Result<&'a str> {
    if s.is_null() {
        return Err(Error::new(FUSEDOPT_ERROR_NULL, format!("{what} is NULL")));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(s) };
    s.to_str().map_err(|e| {
        Error::new(
            FUSEDOPT_ERROR_INVALID_ARGUMENT,
            format!("{what} is not UTF-8: {e}"),
        )
    })
}

/// The path at `s`.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string.
unsafe fn path(s: *const c_char) -> Result<PathBuf> {
    if s.is_null() {
        return Err(Error::new(FUSEDOPT_ERROR_NULL, "the path is NULL"));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(s) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::new(
            FUSEDOPT_ERROR_INVALID_ARGUMENT,
            "the path is empty",
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        // SAFETY: as above.
        unsafe { utf8(s, "the path") }.map(PathBuf::from)
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// An `INVALID_ARGUMENT` error for an enum value that is none of its constants.
fn unknown(what: &str, value: i32, expected: &str) -> Error {
    Error::new(
        FUSEDOPT_ERROR_INVALID_ARGUMENT,
        format!("unknown {what} {value}, expected {expected}"),
    )
}

/// The crate's dtype of `dtype`.
fn dtype(dtype: fusedopt_dtype, what: &str) -> Result<Dtype> {
    match dtype {
        FUSEDOPT_DTYPE_F32 => Ok(Dtype::F32),
        FUSEDOPT_DTYPE_BF16 => Ok(Dtype::Bf16),
        FUSEDOPT_DTYPE_F16 => Ok(Dtype::F16),
        other => Err(unknown(
            &format!("dtype of {what}"),
            other,
            "FUSEDOPT_DTYPE_F32 (0), FUSEDOPT_DTYPE_BF16 (1) or FUSEDOPT_DTYPE_F16 (2)",
        )),
    }
}

/// The crate's policy of `policy`.
fn non_finite(policy: fusedopt_non_finite) -> Result<NonFinite> {
    match policy {
        FUSEDOPT_NON_FINITE_PROPAGATE => Ok(NonFinite::Propagate),
        FUSEDOPT_NON_FINITE_SKIP => Ok(NonFinite::Skip),
        FUSEDOPT_NON_FINITE_ERROR => Ok(NonFinite::Error),
        other => Err(unknown(
            "non-finite policy",
            other,
            "FUSEDOPT_NON_FINITE_PROPAGATE (0), _SKIP (1) or _ERROR (2)",
        )),
    }
}

/// `policy` as a `fusedopt_non_finite`.
fn non_finite_code(policy: NonFinite) -> fusedopt_non_finite {
    match policy {
        NonFinite::Skip => FUSEDOPT_NON_FINITE_SKIP,
        NonFinite::Error => FUSEDOPT_NON_FINITE_ERROR,
        _ => FUSEDOPT_NON_FINITE_PROPAGATE,
    }
}

/// The crate's settings of `s` (a version checked by the caller).
fn settings_of(s: &fusedopt_settings) -> Result<Settings> {
    let backend = match s.backend {
        FUSEDOPT_BACKEND_SIMD => Backend::Simd,
        FUSEDOPT_BACKEND_SCALAR => Backend::Scalar,
        // The tiers, in the order of SimdLevel::ALL, after the scalar one.
        b => match usize::try_from(b)
            .ok()
            .and_then(|b| SimdLevel::ALL.get(b - 1))
        {
            Some(&level) => Backend::Level(level),
            None => {
                let last = SimdLevel::ALL.len() as i32;
                return Err(unknown("backend", b, &format!("0 to {last}")));
            }
        },
    };
    let state_format = match usize::try_from(s.state_format)
        .ok()
        .and_then(|f| StateFormat::ALL.get(f))
    {
        Some(&f) => f,
        None => {
            return Err(unknown(
                "state format",
                s.state_format,
                "FUSEDOPT_STATE_F32 (0), _BF16 (1) or _Q8 (2)",
            ));
        }
    };
    Ok(Settings::default()
        .with_backend(backend)
        .with_threads(s.threads)
        .with_chunk_len(s.chunk_len)
        .with_grad_scale(s.grad_scale)
        .with_max_grad_norm((s.clip != 0).then_some(s.max_grad_norm))
        .with_non_finite(non_finite(s.non_finite)?)
        .with_state_format(state_format))
}

/// `s` as a `fusedopt_settings` of the current version.
fn settings_struct(s: &Settings) -> fusedopt_settings {
    let index_of = |level| SimdLevel::ALL.iter().position(|&l| l == level);
    let backend = match s.backend {
        Backend::Simd => FUSEDOPT_BACKEND_SIMD,
        Backend::Scalar => FUSEDOPT_BACKEND_SCALAR,
        Backend::Level(level) => index_of(level).map_or(FUSEDOPT_BACKEND_SIMD, |i| i as i32 + 1),
    };
    let format = StateFormat::ALL.iter().position(|&f| f == s.state_format);
    fusedopt_settings {
        version: FUSEDOPT_SETTINGS_VERSION,
        backend,
        threads: s.threads,
        chunk_len: s.chunk_len,
        grad_scale: s.grad_scale,
        clip: s.max_grad_norm.is_some().into(),
        max_grad_norm: s.max_grad_norm.unwrap_or(0.0),
        non_finite: non_finite_code(s.non_finite),
        state_format: format.map_or(FUSEDOPT_STATE_F32, |f| f as i32),
    }
}

/// Refuses a `fusedopt_settings` version this library does not know.
fn check_version(version: u32) -> Result<()> {
    if version == FUSEDOPT_SETTINGS_VERSION {
        return Ok(());
    }
    Err(Error::new(
        FUSEDOPT_ERROR_INVALID_ARGUMENT,
        format!(
            "fusedopt_settings version {version}: this library reads version \
             {FUSEDOPT_SETTINGS_VERSION} (set .version = FUSEDOPT_SETTINGS_VERSION)"
        ),
    ))
}

/// Replaces the settings of `opt` with `change` of them.
///
/// # Safety
/// `opt` is NULL or a live handle.
unsafe fn change_settings(
    opt: *mut fusedopt_optimizer,
    change: impl FnOnce(Settings) -> Result<Settings>,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        let settings = change(*h.opt.settings())?;
        Ok(h.opt.set_settings(settings)?)
    };
    // SAFETY: the caller's contract.
    unsafe { with_handle(opt, call) }
}

/// Writes `read` of the settings of `opt` to `out`.
///
/// # Safety
/// `opt` is NULL or a live handle; `out` is NULL or valid for a write.
unsafe fn read_setting<T>(
    opt: *const fusedopt_optimizer,
    out: *mut T,
    what: &str,
    read: impl FnOnce(&Settings) -> T,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: `out` is NULL or valid for a write (the caller's contract).
        unsafe { put(out, what, read(h.opt.settings())) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// Tensor `i`'s entry of the array `ptrs`, as an address.
///
/// # Safety
/// `ptrs` holds at least `i + 1` pointers.
unsafe fn nth<T>(ptrs: *const *const T, i: usize) -> usize {
    // SAFETY: the caller's contract.
    unsafe { ptrs.add(i).read() as usize }
}

/// One step of the handle over the buffers it holds, checked.
///
/// # Safety
/// The buffers are live memory of their lengths, not otherwise accessed during the call.
unsafe fn step_held(h: &mut Handle) -> Result<()> {
    // SAFETY: the caller's contract; `RawTensors` checked alignment, extent and overlap.
    let report = unsafe { h.raw.step(&mut *h.opt) }?;
    h.last = report_of(&report);
    Ok(())
}

/// A many-tensor step of any dtypes (`partial`: a NULL gradient is none this step).
///
/// # Safety
/// As `fusedopt_step_many_typed`.
#[allow(clippy::too_many_arguments)]
unsafe fn step_arrays(
    opt: *mut fusedopt_optimizer,
    weight_dtype: fusedopt_dtype,
    weights: *const *const c_void,
    grad_dtype: fusedopt_dtype,
    grads: *const *const c_void,
    lens: *const usize,
    count: usize,
    partial: bool,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        let (wd, gd) = (
            dtype(weight_dtype, "the weights")?,
            dtype(grad_dtype, "the gradients")?,
        );
        for (array, name) in [
            (weights as *const c_void, "the array of weight pointers"),
            (grads as *const c_void, "the array of gradient pointers"),
            (lens as *const c_void, "the array of lengths"),
        ] {
            if array.is_null() && count > 0 {
                return Err(Error::new(FUSEDOPT_ERROR_NULL, format!("{name} is NULL")));
            }
        }
        // SAFETY: each array holds `count` entries (the caller's contract), and `i < count`.
        let len = |i: usize| unsafe { lens.add(i).read() };
        // SAFETY: as above.
        let w = (0..count).map(|i| (unsafe { nth(weights, i) }, len(i)));
        // SAFETY: as above.
        let g = (0..count).map(|i| (unsafe { nth(grads, i) }, len(i)));
        h.raw.set_weights(wd, w)?;
        h.raw.set_grads(gd, g, partial)?;
        // SAFETY: the buffers are live and not otherwise accessed (the caller's contract).
        unsafe { step_held(h) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// The report before any step, or after a load or reset: at step `step`, not skipped, no norm.
fn report_at(step: u64) -> fusedopt_report {
    fusedopt_report {
        step,
        skipped: 0,
        has_grad_norm: 0,
        grad_norm: 0.0,
    }
}

fn report_of(r: &StepReport) -> fusedopt_report {
    fusedopt_report {
        step: r.step,
        skipped: r.skipped.into(),
        has_grad_norm: r.grad_norm.is_some().into(),
        grad_norm: r.grad_norm.unwrap_or(0.0),
    }
}

// ---------------------------------------------------------------------------------------------
// The functions
// ---------------------------------------------------------------------------------------------

/// The library's version, for example `"0.1.0"`. A static string.
#[unsafe(no_mangle)]
pub extern "C" fn fusedopt_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("the version holds no NUL"),
        };
    VERSION.as_ptr()
}

/// The SIMD tier the kernels run on this CPU: `"avx2"`, `"portable"` or `"scalar"`. A static
/// string.
#[unsafe(no_mangle)]
pub extern "C" fn fusedopt_simd_level() -> *const c_char {
    match fusedopt::SimdLevel::detect() {
        fusedopt::SimdLevel::Avx2 => c"avx2".as_ptr(),
        fusedopt::SimdLevel::Portable => c"portable".as_ptr(),
        _ => c"scalar".as_ptr(),
    }
}

/// The message of the last failed call on this thread (`""` if none has failed). Successful
/// calls leave it unchanged. The string stays valid until the next failed call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn fusedopt_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code, for example `"FUSEDOPT_ERROR_NULL"`; `"unknown status"` for a
/// value that is none. A static string.
#[unsafe(no_mangle)]
pub extern "C" fn fusedopt_status_name(status: i32) -> *const c_char {
    let name = match status {
        0 => c"FUSEDOPT_OK",
        1 => c"FUSEDOPT_ERROR_NULL",
        2 => c"FUSEDOPT_ERROR_INVALID_ARGUMENT",
        3 => c"FUSEDOPT_ERROR_LENGTH_MISMATCH",
        4 => c"FUSEDOPT_ERROR_LAYOUT",
        5 => c"FUSEDOPT_ERROR_OVERLAP",
        6 => c"FUSEDOPT_ERROR_NON_FINITE",
        7 => c"FUSEDOPT_ERROR_STATE_FILE",
        8 => c"FUSEDOPT_ERROR_IO",
        9 => c"FUSEDOPT_ERROR_RESOURCES",
        10 => c"FUSEDOPT_ERROR_BUSY",
        11 => c"FUSEDOPT_ERROR_INTERNAL",
        _ => c"unknown status",
    };
    name.as_ptr()
}

/// Creates an optimizer from a configuration string, `name[:field=value,...]`: one of `sgd`,
/// `momentum`, `nag`, `adagrad`, `rmsprop`, `adam`, `adamw`, with the fields of its Rust
/// configuration (for example `"adamw:lr=3e-4,weight_decay=0.1"`,
/// `"momentum:lr=0.1,momentum=0.9"`). Unset fields keep their defaults. On success `*out` is a
/// new handle, to be freed with `fusedopt_free`; on failure `*out` is left alone.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL` for a NULL `config` or `out`; `FUSEDOPT_ERROR_INVALID_ARGUMENT`
/// for a string that is not UTF-8, an unknown optimizer or field, a malformed value or one out of
/// range.
///
/// # Safety
/// `config` is NULL or a NUL-terminated string; `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_new(
    config: *const c_char,
    out: *mut *mut fusedopt_optimizer,
) -> fusedopt_status {
    guarded(|| {
        if out.is_null() {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "the out-pointer is NULL"));
        }
        // SAFETY: the caller's contract.
        let text = unsafe { utf8(config, "the configuration string")? };
        let config: OptimizerConfig = text.parse().map_err(|e| {
            Error::new(
                FUSEDOPT_ERROR_INVALID_ARGUMENT,
                format!("configuration {text:?}: {e}"),
            )
        })?;
        let handle = Box::new(fusedopt_optimizer {
            busy: AtomicBool::new(false),
            inner: UnsafeCell::new(Handle {
                opt: config.build(),
                last: report_at(0),
                poisoned: false,
                raw: RawTensors::default(),
            }),
        });
        // SAFETY: non-null, valid for a write (the caller's contract).
        unsafe { out.write_unaligned(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a handle and its state, stopping its threads first. NULL is accepted and does nothing.
///
/// # Errors
/// `FUSEDOPT_ERROR_BUSY` if another thread is using the handle (it is not freed).
///
/// # Safety
/// `opt` is NULL or a live handle from `fusedopt_new`; it is dangling afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_free(opt: *mut fusedopt_optimizer) -> fusedopt_status {
    if opt.is_null() {
        return FUSEDOPT_OK;
    }
    guarded(|| {
        // SAFETY: live (the caller's contract).
        let handle = unsafe { &*opt };
        if handle
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(Error::new(
                FUSEDOPT_ERROR_BUSY,
                "the optimizer handle is in use by another thread",
            ));
        }
        // SAFETY: made by `Box::into_raw` in `fusedopt_new`, and claimed above.
        drop(unsafe { Box::from_raw(opt) });
        Ok(())
    })
}

/// Applies one update to one tensor: `weights_len` weights and `grads_len` gradients (equal).
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_LENGTH_MISMATCH` if the lengths differ;
/// `FUSEDOPT_ERROR_LAYOUT` if the optimizer's state was made for another layout;
/// `FUSEDOPT_ERROR_OVERLAP` if the buffers overlap; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for a
/// misaligned buffer or a setting out of range; `FUSEDOPT_ERROR_NON_FINITE` under
/// `FUSEDOPT_NON_FINITE_ERROR`; `FUSEDOPT_ERROR_RESOURCES` if the state cannot be allocated.
///
/// # Safety
/// `opt` is NULL or a live handle; `weights` is NULL or valid for reads and writes of
/// `weights_len` floats, `grads` NULL or valid for reads of `grads_len` floats, neither accessed
/// by anything else during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_step(
    opt: *mut fusedopt_optimizer,
    weights: *mut f32,
    weights_len: usize,
    grads: *const f32,
    grads_len: usize,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        h.raw
            .set_weights(Dtype::F32, [(weights as usize, weights_len)])?;
        h.raw
            .set_grads(Dtype::F32, [(grads as usize, grads_len)], false)?;
        // SAFETY: the buffers are live and not otherwise accessed (the caller's contract).
        unsafe { step_held(h) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Applies one update to a whole model in one dispatch: tensor `i` has `lens[i]` weights at
/// `weights[i]` and as many gradients at `grads[i]`. Bitwise the same as stepping the tensors
/// one optimizer each, and faster for many small tensors.
///
/// # Errors
/// As `fusedopt_step`; `FUSEDOPT_ERROR_LAYOUT` also for another tensor count than the
/// state's.
///
/// # Safety
/// `opt` is NULL or a live handle; each array is NULL or holds `count` entries; every buffer is
/// NULL or valid for `lens[i]` floats (weights: reads and writes), none accessed by anything
/// else during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_step_many(
    opt: *mut fusedopt_optimizer,
    weights: *const *mut f32,
    grads: *const *const f32,
    lens: *const usize,
    count: usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe {
        step_arrays(
            opt,
            FUSEDOPT_DTYPE_F32,
            weights.cast(),
            FUSEDOPT_DTYPE_F32,
            grads.cast(),
            lens,
            count,
            false,
        )
    }
}

/// `fusedopt_step_many` where some tensors have no gradient this step: a NULL entry of `grads`
/// leaves its tensor (weights, state, step count) alone, as PyTorch skips parameters whose
/// `grad` is `None`.
///
/// # Safety
/// As `fusedopt_step_many`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_step_partial(
    opt: *mut fusedopt_optimizer,
    weights: *const *mut f32,
    grads: *const *const f32,
    lens: *const usize,
    count: usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe {
        step_arrays(
            opt,
            FUSEDOPT_DTYPE_F32,
            weights.cast(),
            FUSEDOPT_DTYPE_F32,
            grads.cast(),
            lens,
            count,
            true,
        )
    }
}

/// `fusedopt_step_many` with weights and gradients in any `fusedopt_dtype`. Half-precision
/// gradients step bitwise as their `float` values. Half-precision weights are master-weight
/// training: the optimizer keeps `float` copies in its state (taken from the weights at a
/// tensor's first half-precision step, and again after a step with `float` weights), updates
/// them, and writes the weights back rounded to nearest even.
///
/// # Errors
/// As `fusedopt_step_many`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for an unknown dtype or a buffer
/// not aligned to its elements.
///
/// # Safety
/// As `fusedopt_step_many`, with buffers of `lens[i]` values of their dtype.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_step_many_typed(
    opt: *mut fusedopt_optimizer,
    weight_dtype: fusedopt_dtype,
    weights: *const *mut c_void,
    grad_dtype: fusedopt_dtype,
    grads: *const *const c_void,
    lens: *const usize,
    count: usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe {
        step_arrays(
            opt,
            weight_dtype,
            weights.cast(),
            grad_dtype,
            grads,
            lens,
            count,
            false,
        )
    }
}

/// `fusedopt_step_partial` with weights and gradients in any `fusedopt_dtype` (see
/// `fusedopt_step_many_typed`).
///
/// # Safety
/// As `fusedopt_step_many_typed`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_step_partial_typed(
    opt: *mut fusedopt_optimizer,
    weight_dtype: fusedopt_dtype,
    weights: *const *mut c_void,
    grad_dtype: fusedopt_dtype,
    grads: *const *const c_void,
    lens: *const usize,
    count: usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe {
        step_arrays(
            opt,
            weight_dtype,
            weights.cast(),
            grad_dtype,
            grads,
            lens,
            count,
            true,
        )
    }
}

/// Sets the learning rate of later steps (a schedule calls this between steps; parameter groups'
/// `lr_scale` multiply it).
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for a value out of the
/// optimizer's range (negative, NaN or infinite); the learning rate is then unchanged.
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_lr(opt: *mut fusedopt_optimizer, lr: f32) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        let old = h.opt.lr();
        h.opt.set_lr(lr);
        if let Err(e) = h.opt.config().validate() {
            h.opt.set_lr(old);
            return Err(e.into());
        }
        Ok(())
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Reads the learning rate into `*lr`.
///
/// # Safety
/// `opt` is NULL or a live handle; `lr` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_lr(
    opt: *const fusedopt_optimizer,
    lr: *mut f32,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: the out-pointer is NULL or valid for a write (the caller's contract).
        unsafe { put(lr, "lr", h.opt.lr()) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Writes the configuration, in the syntax `fusedopt_new` reads with every field, as a
/// NUL-terminated string into `buf` of `cap` bytes, and its length (without the NUL) into
/// `*len` when `len` is not NULL. With `buf` NULL (or too small) only `*len` is written, so a
/// caller can ask for the size first.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL` if both `buf` and `len` are NULL;
/// `FUSEDOPT_ERROR_INVALID_ARGUMENT` if `buf` is not NULL and `cap` is not more than the length
/// (`buf` is then left alone).
///
/// # Safety
/// `opt` is NULL or a live handle; `buf` is NULL or valid for `cap` bytes; `len` is NULL or
/// valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_config(
    opt: *const fusedopt_optimizer,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        if buf.is_null() && len.is_null() {
            return Err(Error::new(
                FUSEDOPT_ERROR_NULL,
                "both the buffer and the length pointer are NULL",
            ));
        }
        let text = h.opt.config().to_string();
        if !len.is_null() {
            // SAFETY: valid for a write (the caller's contract).
            unsafe { len.write_unaligned(text.len()) };
        }
        if buf.is_null() {
            return Ok(());
        }
        if cap <= text.len() {
            return Err(Error::new(
                FUSEDOPT_ERROR_INVALID_ARGUMENT,
                format!(
                    "the buffer of {cap} bytes cannot hold the configuration's {} bytes \
                     and a NUL",
                    text.len()
                ),
            ));
        }
        // SAFETY: `buf` is valid for `cap > text.len()` bytes (the caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
            buf.add(text.len()).write(0);
        }
        Ok(())
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Reads the settings into `*settings`, whose `version` the caller sets first (to
/// `FUSEDOPT_SETTINGS_VERSION`): the fields of that version are written.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for a version this library does not
/// know (`*settings` is then left alone).
///
/// # Safety
/// `opt` is NULL or a live handle; `settings` is NULL or valid for reads and writes of a
/// `fusedopt_settings` of its version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_settings(
    opt: *const fusedopt_optimizer,
    settings: *mut fusedopt_settings,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        if settings.is_null() {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "the settings are NULL"));
        }
        // SAFETY: non-null and valid for reads (the caller's contract); the version comes first
        // in every version of the struct.
        check_version(unsafe { settings.cast::<u32>().read_unaligned() })?;
        // SAFETY: valid for a write of this version (the caller's contract).
        unsafe { put(settings, "the settings", settings_struct(h.opt.settings())) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Replaces the settings of later steps with `*settings`, checked in full first (ranges, enum
/// values, the state format against state already held); a new thread count starts the
/// optimizer's own pool. The per-setting functions below are shorthands for it.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for an unknown version or enum
/// value, a value out of range, or another state format than that of the state held;
/// `FUSEDOPT_ERROR_RESOURCES` if the threads cannot be started. Nothing changes on error.
///
/// # Safety
/// `opt` is NULL or a live handle; `settings` is NULL or valid for reads of a
/// `fusedopt_settings` of its version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_settings(
    opt: *mut fusedopt_optimizer,
    settings: *const fusedopt_settings,
) -> fusedopt_status {
    let change = |_: Settings| -> Result<Settings> {
        if settings.is_null() {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "the settings are NULL"));
        }
        // SAFETY: non-null and valid for reads (the caller's contract); the version comes first.
        check_version(unsafe { settings.cast::<u32>().read_unaligned() })?;
        // SAFETY: a struct of this version (the caller's contract).
        settings_of(&unsafe { settings.read_unaligned() })
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { change_settings(opt, change) }
}

/// Runs later steps on a pool of `threads` threads that the optimizer owns; 0 (the default)
/// runs them on the process-wide pool (one thread per core). A step whose tensors fit in one
/// chunk runs on the calling thread either way. Results are bitwise the same for any count.
/// The `threads` field of `fusedopt_set_settings`.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_RESOURCES` if the threads cannot be started
/// (the previous setting stays).
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_threads(
    opt: *mut fusedopt_optimizer,
    threads: usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { change_settings(opt, |s| Ok(s.with_threads(threads))) }
}

/// Reads the thread count set by `fusedopt_set_threads` into `*threads`.
///
/// # Safety
/// `opt` is NULL or a live handle; `threads` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_threads(
    opt: *const fusedopt_optimizer,
    threads: *mut usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { read_setting(opt, threads, "threads", |s| s.threads) }
}

/// Sets the chunk length: steps cut tensors into chunks of this many elements, the unit of work
/// of a thread. 0 selects the tuned default; other values are rounded up to a multiple of 16.
/// Results are bitwise the same for any chunk length. The `chunk_len` field of
/// `fusedopt_set_settings`.
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_chunk_len(
    opt: *mut fusedopt_optimizer,
    chunk_len: usize,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { change_settings(opt, |s| Ok(s.with_chunk_len(chunk_len))) }
}

/// Reads the chunk length in effect (the tuned default when 0 was set) into `*chunk_len`.
///
/// # Safety
/// `opt` is NULL or a live handle; `chunk_len` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_chunk_len(
    opt: *const fusedopt_optimizer,
    chunk_len: *mut usize,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: the out-pointer is NULL or valid for a write (the caller's contract).
        unsafe { put(chunk_len, "chunk_len", h.opt.chunk_len()) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Sets the loss scale of later steps (default 1): gradients are divided by it as they are read,
/// so a mixed-precision trainer passes its scaled gradients unchanged. The `grad_scale` field
/// of `fusedopt_set_settings`.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` unless finite and `> 0`.
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_grad_scale(
    opt: *mut fusedopt_optimizer,
    scale: f32,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { change_settings(opt, |s| Ok(s.with_grad_scale(scale))) }
}

/// Reads the loss scale into `*scale`.
///
/// # Safety
/// `opt` is NULL or a live handle; `scale` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_grad_scale(
    opt: *const fusedopt_optimizer,
    scale: *mut f32,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { read_setting(opt, scale, "scale", |s| s.grad_scale) }
}

/// Clips later steps by global norm, as `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the
/// L2 norm of all gradients of a step (unscaled) gives the coefficient
/// `min(1, max_norm / (norm + 1e-6))`, applied inside the update.
/// `fusedopt_clear_max_grad_norm` turns clipping off. The `clip` and `max_grad_norm` fields of
/// `fusedopt_set_settings`.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` unless finite and `>= 0`.
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_max_grad_norm(
    opt: *mut fusedopt_optimizer,
    max_norm: f32,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { change_settings(opt, |s| Ok(s.with_max_grad_norm(Some(max_norm)))) }
}

/// Turns clipping off (the default).
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_clear_max_grad_norm(
    opt: *mut fusedopt_optimizer,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { change_settings(opt, |s| Ok(s.with_max_grad_norm(None))) }
}

/// Reads whether steps clip into `*enabled` (0 or 1) and the clipping norm into `*max_norm`
/// (0 when off).
///
/// # Safety
/// `opt` is NULL or a live handle; `enabled` and `max_norm` are NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_max_grad_norm(
    opt: *const fusedopt_optimizer,
    enabled: *mut i32,
    max_norm: *mut f32,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        if enabled.is_null() || max_norm.is_null() {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "an out-pointer is NULL"));
        }
        let s = settings_struct(h.opt.settings());
        // SAFETY: non-null, valid for a write (the caller's contract).
        unsafe {
            put(enabled, "enabled", s.clip)?;
            put(max_norm, "max_norm", s.max_grad_norm)
        }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Chooses what later steps do with a NaN or an infinity in a gradient: one of
/// `FUSEDOPT_NON_FINITE_PROPAGATE` (the default), `FUSEDOPT_NON_FINITE_SKIP`,
/// `FUSEDOPT_NON_FINITE_ERROR`. The `non_finite` field of `fusedopt_set_settings`.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for another value.
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_non_finite(
    opt: *mut fusedopt_optimizer,
    policy: fusedopt_non_finite,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { change_settings(opt, |s| Ok(s.with_non_finite(non_finite(policy)?))) }
}

/// Reads the non-finite policy into `*policy`.
///
/// # Safety
/// `opt` is NULL or a live handle; `policy` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_non_finite(
    opt: *const fusedopt_optimizer,
    policy: *mut fusedopt_non_finite,
) -> fusedopt_status {
    // SAFETY: the caller's contract.
    unsafe { read_setting(opt, policy, "policy", |s| non_finite_code(s.non_finite)) }
}

/// Sets the format the optimizer state is kept in, by name: `"f32"` (the default), `"bf16"`
/// (stochastic rounding) or `"q8"` (8-bit codes in blocks of 256 with an f32 scale). Only before
/// the first step (or after `fusedopt_reset`), or to the format already in use. The
/// `state_format` field of `fusedopt_set_settings`.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for another name, or when
/// the state is already held in another format.
///
/// # Safety
/// `opt` is NULL or a live handle; `format` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_state_format(
    opt: *mut fusedopt_optimizer,
    format: *const c_char,
) -> fusedopt_status {
    let change = |s: Settings| -> Result<Settings> {
        // SAFETY: the caller's contract.
        let name = unsafe { utf8(format, "the state format")? };
        let format: StateFormat = name
            .parse()
            .map_err(|e: String| Error::new(FUSEDOPT_ERROR_INVALID_ARGUMENT, e))?;
        Ok(s.with_state_format(format))
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { change_settings(opt, change) }
}

/// Gives the tensors of later steps their own learning-rate scale and weight decay: `groups[i]`
/// is tensor `i`'s (a step must then have `count` tensors). `count` 0 removes the groups
/// (`groups` may then be NULL).
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for a value out of range;
/// `FUSEDOPT_ERROR_LENGTH_MISMATCH` if the optimizer's state holds another number of tensors.
///
/// # Safety
/// `opt` is NULL or a live handle; `groups` is NULL or holds `count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_param_groups(
    opt: *mut fusedopt_optimizer,
    groups: *const fusedopt_param_group,
    count: usize,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        if groups.is_null() && count > 0 {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "the groups array is NULL"));
        }
        let groups: Vec<ParamGroup> = (0..count)
            .map(|i| {
                // SAFETY: `groups` holds `count` entries (the caller's contract).
                let g = unsafe { groups.add(i).read_unaligned() };
                ParamGroup {
                    lr_scale: g.lr_scale,
                    weight_decay: (g.override_weight_decay != 0).then_some(g.weight_decay),
                }
            })
            .collect();
        Ok(h.opt.set_param_groups(&groups)?)
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Names the tensors (`names[i]` is tensor `i`'s): state files then record the names, and
/// loading one into an optimizer whose tensors are named otherwise is refused. `count` 0
/// removes the names.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for a name that is empty,
/// not UTF-8, repeated, or holds a comma or a line break; `FUSEDOPT_ERROR_LENGTH_MISMATCH` if the optimizer's
/// state holds another number of tensors.
///
/// # Safety
/// `opt` is NULL or a live handle; `names` is NULL or holds `count` pointers, each NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_set_tensor_names(
    opt: *mut fusedopt_optimizer,
    names: *const *const c_char,
    count: usize,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        if names.is_null() && count > 0 {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "the names array is NULL"));
        }
        let names: Vec<&str> = (0..count)
            // SAFETY: `names` holds `count` pointers, each NULL or a string.
            .map(|i| unsafe { utf8(names.add(i).read(), &format!("the name of tensor {i}")) })
            .collect::<Result<_>>()?;
        Ok(h.opt.set_tensor_names(&names)?)
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Reads the optimizer's step count into `*steps` (steps taken, skipped ones excluded).
///
/// # Safety
/// `opt` is NULL or a live handle; `steps` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_get_steps(
    opt: *const fusedopt_optimizer,
    steps: *mut u64,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: the out-pointer is NULL or valid for a write (the caller's contract).
        unsafe { put(steps, "steps", h.opt.steps()) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Reads the report of the last successful step into `*report` (before any step: the current
/// step count, not skipped, no norm).
///
/// # Safety
/// `opt` is NULL or a live handle; `report` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_last_report(
    opt: *const fusedopt_optimizer,
    report: *mut fusedopt_report,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: the out-pointer is NULL or valid for a write (the caller's contract).
        unsafe { put(report, "report", h.last) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Saves the optimizer state (buffers, step counts, layout, groups, tensor names,
/// hyperparameters) to `path`, atomically: a temporary file is written, synced and renamed over
/// `path`. The file is the Rust crate's and Python package's state file.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_INVALID_ARGUMENT` for an empty path;
/// `FUSEDOPT_ERROR_IO` if the file cannot be written (a previous file at `path` is intact).
///
/// # Safety
/// `opt` is NULL or a live handle; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_save_state(
    opt: *const fusedopt_optimizer,
    path: *const c_char,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: the caller's contract.
        let path = unsafe { self::path(path)? };
        Ok(h.opt.save_state(&path)?)
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Replaces the optimizer state with the one saved at `path`: continuing gives bitwise the
/// results of the uninterrupted run. Settings that are not state (threads, chunk length, loss
/// scale, clipping, non-finite policy) are kept. Everything is checked first: on error the
/// optimizer is untouched.
///
/// # Errors
/// `FUSEDOPT_ERROR_NULL`; `FUSEDOPT_ERROR_IO` if the file cannot be read;
/// `FUSEDOPT_ERROR_STATE_FILE` for a file that is not a fusedopt state file, is damaged, or holds
/// another optimizer kind or state format; `FUSEDOPT_ERROR_LAYOUT` for another layout or other
/// tensor names than this optimizer's;
/// `FUSEDOPT_ERROR_RESOURCES` if the state cannot be allocated.
///
/// # Safety
/// `opt` is NULL or a live handle; `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_load_state(
    opt: *mut fusedopt_optimizer,
    path: *const c_char,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        // SAFETY: the caller's contract.
        let path = unsafe { self::path(path)? };
        h.opt.load_state(&path)?;
        h.last = report_at(h.opt.steps());
        Ok(())
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// Forgets all state and the step count, as if newly created (a new layout is then accepted);
/// settings are kept.
///
/// # Safety
/// `opt` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_reset(opt: *mut fusedopt_optimizer) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        h.opt.reset();
        h.last = report_at(0);
        Ok(())
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

/// For measuring this ABI's overhead, and not in the header (the benchmark of
/// `tests/test_capi.c` declares it): runs `iterations` steps of the one tensor `weights` /
/// `grads` (`len` floats each) through the Rust API directly (`Optimizer::step` on the handle's
/// optimizer, no conversion of this layer) and writes the elapsed seconds into `*seconds`. The
/// steps are real: weights and state change as with `fusedopt_step`.
///
/// # Errors
/// As `fusedopt_step`, from the first failing step (earlier steps stay applied).
///
/// # Safety
/// As `fusedopt_step`; `seconds` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fusedopt_time_rust_steps(
    opt: *mut fusedopt_optimizer,
    weights: *mut f32,
    grads: *const f32,
    len: usize,
    iterations: u64,
    seconds: *mut f64,
) -> fusedopt_status {
    let call = |h: &mut Handle| -> Result<()> {
        if seconds.is_null() {
            return Err(Error::new(FUSEDOPT_ERROR_NULL, "seconds is NULL"));
        }
        // The checks of `fusedopt_step`, once.
        let mut checked = RawTensors::default();
        checked.set_weights(Dtype::F32, [(weights as usize, len)])?;
        checked.set_grads(Dtype::F32, [(grads as usize, len)], false)?;
        let (w, g): (&mut [f32], &[f32]) = match len {
            0 => (&mut [], &[]),
            // SAFETY: checked above (non-null, aligned, disjoint); live and not otherwise
            // accessed (the caller's contract).
            n => unsafe {
                (
                    std::slice::from_raw_parts_mut(weights, n),
                    std::slice::from_raw_parts(grads, n),
                )
            },
        };
        let start = std::time::Instant::now();
        for _ in 0..iterations {
            let report = h.opt.step(w, g)?;
            h.last = report_of(&report);
        }
        let elapsed = start.elapsed().as_secs_f64();
        // SAFETY: NULL or valid for a write (the caller's contract).
        unsafe { put(seconds, "seconds", elapsed) }
    };
    // SAFETY: `opt` is NULL or a live handle (the caller's contract).
    unsafe { with_handle(opt, call) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: a NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(fusedopt_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_is_caught_and_poisons_the_handle() {
        let mut opt = std::ptr::null_mut();
        // SAFETY: valid string and out-pointer.
        let status = unsafe { fusedopt_new(c"sgd".as_ptr(), &mut opt) };
        assert_eq!(status, FUSEDOPT_OK);
        // SAFETY: a live handle.
        let status = unsafe { with_handle(opt, |_| panic!("deliberate")) };
        assert_eq!(status, FUSEDOPT_ERROR_INTERNAL);
        assert!(last_error().contains("deliberate"), "{}", last_error());
        let mut steps = 7;
        // SAFETY: a live handle and a valid out-pointer.
        let status = unsafe { fusedopt_get_steps(opt, &mut steps) };
        assert_eq!((status, steps), (FUSEDOPT_ERROR_INTERNAL, 7));
        assert!(last_error().contains("free it"));
        // SAFETY: a live handle, freed once.
        assert_eq!(unsafe { fusedopt_free(opt) }, FUSEDOPT_OK);
    }

    #[test]
    fn a_claimed_handle_is_busy() {
        let mut opt = std::ptr::null_mut();
        // SAFETY: valid string and out-pointer.
        let status = unsafe { fusedopt_new(c"adam".as_ptr(), &mut opt) };
        assert_eq!(status, FUSEDOPT_OK);
        let inner_status = std::cell::Cell::new(FUSEDOPT_OK);
        // SAFETY: a live handle; the nested call sees it claimed, as another thread would.
        let status = unsafe {
            with_handle(opt, |_| {
                inner_status.set(fusedopt_set_lr(opt, 0.5));
                Ok(())
            })
        };
        assert_eq!(
            (status, inner_status.get()),
            (FUSEDOPT_OK, FUSEDOPT_ERROR_BUSY)
        );
        let mut lr = 0.0;
        // SAFETY: a live handle, released, and a valid out-pointer.
        assert_eq!(unsafe { fusedopt_get_lr(opt, &mut lr) }, FUSEDOPT_OK);
        assert_eq!(lr, 0.001);
        // SAFETY: a live handle, freed once.
        assert_eq!(unsafe { fusedopt_free(opt) }, FUSEDOPT_OK);
    }
}
