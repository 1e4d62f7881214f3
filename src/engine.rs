//! The execution engine: validation, layout, state buffers, chunk planning and thread dispatch.
//!
//! This is the only place that knows about rayon, chunk lengths and SIMD tier selection. An
//! optimizer hands [`Core::run`] a [`Kernel`] holding its per-step scalars; the engine does the
//! rest. A single-tensor `step` is a model with one tensor.
//!
//! # Layout and state
//! The first step of a stateful optimizer fixes the *layout*: the number of tensors and each
//! one's length. Each state buffer (momentum, second moment, ...) is one 64-byte aligned
//! allocation covering every tensor, each tensor's slice starting on a 64-byte boundary.
//!
//! # Plan
//! The elements of all tensors, in order, are cut into *tasks* of about `chunk_len` elements:
//! small tensors are packed together into one task, large ones are split (at multiples of
//! [`BLOCK`] elements inside the tensor). The plan is computed once per layout and chunk length and
//! reused by every step. Tasks run on the caller's rayon pool; a step with a single task, or on a
//! pool with one thread, runs inline without any thread dispatch.
//!
//! # Gradient transforms and hygiene
//! Negation (`maximize`), the loss scale, the clipping coefficient and the L2 weight-decay term
//! are applied by the kernels as they read each gradient ([`simd::GradPrep`]), per parameter
//! group. Clipping and the non-finite check need the global gradient norm first: one read-only
//! pass over the gradients in fixed blocks ([`NORM_BLOCK`]) whose sums are added in order, so the
//! norm, like everything else, does not depend on threads or chunk length.
//!
//! # Determinism
//! Every tier computes bitwise identical results (see [`crate::simd`]), and the update of an
//! element depends only on that element, so results do not depend on how the work is cut or on
//! the number of threads.

use crate::optimizer::{Backend, NonFinite, ParamGroup, StepError, StepReport};
use crate::simd::{self, GradPrep, Kernel, Run, SimdLevel};
use crate::tuning;
use aligned_vec::{AVec, ConstAlign};
use rayon::prelude::*;
use std::collections::HashMap;

/// Alignment unit of state slices and of cuts inside a tensor, in elements (64 bytes of f32).
pub(crate) const BLOCK: usize = 16;

/// Default number of elements per task.
///
/// 65,536 elements (256 KiB of each stream): measured best or within noise of best for every
/// optimizer on a 2-core Zen 3 from 64K to 64M parameters (see the README's Performance
/// section). `examples/tune.rs` measures another machine and writes a [`Tuning`](crate::Tuning)
/// file that replaces this default.
pub const DEFAULT_CHUNK_LEN: usize = 1 << 16;

/// The per-step input of every optimizer: one `(weights, grads)` pair per tensor.
pub(crate) type Params<'a, 'b> = [(&'a mut [f32], &'b [f32])];

/// One state buffer: every tensor's slice, each starting on a 64-byte boundary.
pub(crate) type StateBuf = AVec<f32, ConstAlign<64>>;

/// Tensor lengths and where each tensor's slice starts in the state buffers.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    lens: Vec<usize>,
    offsets: Vec<usize>,
    /// Length of every state buffer (sum of lengths, each rounded up to [`BLOCK`]).
    total: usize,
}

impl Layout {
    fn new(lens: Vec<usize>) -> Layout {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &len in &lens {
            offsets.push(total);
            total += len.div_ceil(BLOCK) * BLOCK;
        }
        Layout {
            lens,
            offsets,
            total,
        }
    }

    fn matches(&self, params: &Params<'_, '_>) -> bool {
        self.lens.len() == params.len()
            && self
                .lens
                .iter()
                .zip(params)
                .all(|(&l, (w, _))| l == w.len())
    }
}

/// One contiguous run of one tensor inside a task.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    tensor: usize,
    start: usize,
    len: usize,
}

/// The tasks of one layout at one chunk length.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    chunk_len: usize,
    segments: Vec<Segment>,
    /// `segments[bounds[t]..bounds[t + 1]]` is task `t`.
    bounds: Vec<usize>,
}

/// Fixed cost of a segment, in elements, when packing small tensors into tasks: keeps a task
/// made of many tiny tensors from carrying thousands of kernel calls.
const SEGMENT_COST: usize = 64;

impl Plan {
    fn new(lens: &[usize], chunk_len: usize) -> Plan {
        debug_assert!(chunk_len > 0 && chunk_len.is_multiple_of(BLOCK));
        let mut segments = Vec::new();
        let mut bounds = vec![0];
        let mut room = chunk_len;
        for (tensor, &len) in lens.iter().enumerate() {
            let mut start = 0;
            while start < len {
                let left = len - start;
                let open = segments.len() - bounds.last().expect("starts with 0");
                let take = if open == 0 {
                    // An empty task takes a whole chunk, or the rest of the tensor. `chunk_len` is
                    // a multiple of BLOCK, so cuts inside a tensor stay on BLOCK boundaries.
                    left.min(chunk_len)
                } else if left + SEGMENT_COST <= room {
                    left
                } else {
                    room.saturating_sub(SEGMENT_COST) / BLOCK * BLOCK
                };
                if take == 0 {
                    // Not enough room left for a useful piece: close the task.
                    bounds.push(segments.len());
                    room = chunk_len;
                    continue;
                }
                segments.push(Segment {
                    tensor,
                    start,
                    len: take,
                });
                room = room.saturating_sub(take + SEGMENT_COST);
                start += take;
            }
        }
        if *bounds.last().unwrap() != segments.len() {
            bounds.push(segments.len());
        }
        Plan {
            chunk_len,
            segments,
            bounds,
        }
    }

    fn tasks(&self) -> usize {
        self.bounds.len() - 1
    }

    fn task(&self, t: usize) -> &[Segment] {
        &self.segments[self.bounds[t]..self.bounds[t + 1]]
    }
}

/// A raw pointer that may cross threads: the engine guarantees that concurrent tasks touch
/// disjoint elements.
#[derive(Debug, Clone, Copy)]
struct SharedPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced by tasks of one plan, whose segments are disjoint, while
// the step that created it holds the exclusive borrows of every buffer involved.
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedPtr<T> {}

/// What every optimizer's configuration says about the parts of a step the engine fuses in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Base {
    /// The configuration's learning rate.
    pub lr: f32,
    /// The configuration's weight decay.
    pub weight_decay: f32,
    /// Negate the gradients (ascend).
    pub maximize: bool,
    /// Apply weight decay as an L2 term on the gradient (`g ← g + wd·w`). `false` where the kernel
    /// applies it itself (AdamW's decoupled decay).
    pub l2: bool,
}

impl Base {
    /// The usual case: weight decay as an L2 term on the gradient.
    pub(crate) fn l2(lr: f32, weight_decay: f32, maximize: bool) -> Base {
        Base {
            lr,
            weight_decay,
            maximize,
            l2: true,
        }
    }
}

/// The hyperparameters of one parameter group, resolved from the [`Base`] and the group's
/// overrides: what an optimizer builds a kernel from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hyper {
    /// Learning rate of the group.
    pub lr: f32,
    /// Weight decay of the group.
    pub weight_decay: f32,
}

/// Per-tensor [`ParamGroup`]s, stored once per distinct group.
#[derive(Debug, Clone, Default, PartialEq)]
struct Groups {
    /// As set, one per tensor; empty when none are set.
    per_tensor: Vec<ParamGroup>,
    /// The distinct groups of `per_tensor`.
    distinct: Vec<ParamGroup>,
    /// For each tensor, its group's index in `distinct`.
    index: Vec<usize>,
}

impl Groups {
    fn new(per_tensor: &[ParamGroup]) -> Groups {
        let key = |g: &ParamGroup| (g.lr_scale.to_bits(), g.weight_decay.map(f32::to_bits));
        let mut seen = HashMap::new();
        let mut distinct = Vec::new();
        let index = per_tensor
            .iter()
            .map(|g| {
                *seen.entry(key(g)).or_insert_with(|| {
                    distinct.push(*g);
                    distinct.len() - 1
                })
            })
            .collect();
        Groups {
            per_tensor: per_tensor.to_vec(),
            distinct,
            index,
        }
    }
}

/// Gradient hygiene settings: loss scale, clipping, non-finite policy.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hygiene {
    grad_scale: f32,
    max_grad_norm: Option<f32>,
    non_finite: NonFinite,
}

impl Default for Hygiene {
    fn default() -> Self {
        Hygiene {
            grad_scale: 1.0,
            max_grad_norm: None,
            non_finite: NonFinite::Propagate,
        }
    }
}

/// Elements per block of the gradient-norm pass. Blocks are cut per tensor at multiples of this
/// length, whatever the chunk length and thread count, and their sums are added in order: that
/// fixes the order of every addition, so the norm has the same bits in every configuration.
const NORM_BLOCK: usize = 8192;

/// The blocks of the gradient-norm pass for one list of tensor lengths, and their sums.
#[derive(Debug, Default)]
struct NormScratch {
    lens: Vec<usize>,
    /// (tensor, start, len) of every block, in order.
    blocks: Vec<(usize, usize, usize)>,
    sums: Vec<f64>,
}

impl NormScratch {
    /// Makes `blocks` match the lengths of `params`.
    fn fit(&mut self, params: &Params<'_, '_>) {
        if self.lens.len() == params.len()
            && self
                .lens
                .iter()
                .zip(params)
                .all(|(&l, (w, _))| l == w.len())
        {
            return;
        }
        self.lens = params.iter().map(|(w, _)| w.len()).collect();
        self.blocks.clear();
        for (t, &len) in self.lens.iter().enumerate() {
            self.blocks.extend(
                (0..len)
                    .step_by(NORM_BLOCK)
                    .map(|s| (t, s, NORM_BLOCK.min(len - s))),
            );
        }
        self.sums = vec![0.0; self.blocks.len()];
    }
}

/// The result of the gradient check of one step.
enum Check {
    /// Apply the step reading `(g / div)·factor`; the norm if it was computed.
    Apply(f32, f32, Option<f32>),
    /// Skip the step (a non-finite gradient under [`NonFinite::Skip`]); the norm.
    Skip(f32),
}

/// The kernels of one step with their L2 weight decay, one per distinct parameter group. Without
/// groups there is one, and no allocation.
enum Kernels<K> {
    One([(K, f32); 1]),
    Many(Vec<(K, f32)>),
}

impl<K> Kernels<K> {
    fn as_slice(&self) -> &[(K, f32)] {
        match self {
            Kernels::One(k) => k,
            Kernels::Many(k) => k,
        }
    }
}

/// Checks the values of per-tensor overrides.
pub(crate) fn check_groups(groups: &[ParamGroup]) -> Result<(), StepError> {
    for (tensor, g) in groups.iter().enumerate() {
        let bad = |field, value, expected| StepError::InvalidGroup {
            tensor,
            field,
            value,
            expected,
        };
        if !(g.lr_scale.is_finite() && g.lr_scale >= 0.0) {
            return Err(bad("lr_scale", g.lr_scale, "finite and >= 0"));
        }
        if let Some(wd) = g.weight_decay
            && !(wd.is_finite() && wd >= 0.0)
        {
            return Err(bad("weight_decay", wd, "finite and >= 0"));
        }
    }
    Ok(())
}

/// What a state file records of a [`Core`].
pub(crate) struct SavedState<'a> {
    pub steps: u64,
    pub layout: Option<&'a [usize]>,
    /// Where each tensor's slice starts in every buffer.
    pub offsets: &'a [usize],
    pub buffers: Vec<&'a [f32]>,
    pub groups: &'a [ParamGroup],
}

/// Allocates `buffers` state buffers for tensors of lengths `lens`, the padding zeroed, and
/// lets `fill(buffer, tensor, slice)` write each tensor's slice.
pub(crate) fn build_state(
    lens: &[usize],
    buffers: usize,
    fill: impl Fn(usize, usize, &mut [f32]),
) -> Result<Vec<StateBuf>, StepError> {
    let layout = Layout::new(lens.to_vec());
    (0..buffers)
        .map(|b| {
            let mut buf = zeroed(layout.total)?;
            for (t, (&len, &at)) in layout.lens.iter().zip(&layout.offsets).enumerate() {
                fill(b, t, &mut buf[at..at + len]);
            }
            Ok(buf)
        })
        .collect()
}

/// Everything an optimizer needs besides its formula: settings, layout, state, plan, counter.
#[derive(Debug)]
pub struct Core {
    /// The optimizer's name, for its tuned chunk length.
    name: &'static str,
    backend: Backend,
    /// Requested chunk length; 0 means the (tuned) default.
    chunk_len: usize,
    steps: u64,
    layout: Option<Layout>,
    state: Vec<StateBuf>,
    plan: Option<Plan>,
    groups: Groups,
    hygiene: Hygiene,
    /// Reused per step: each tensor's (weights, grads) base pointers.
    ptrs: Vec<(SharedPtr<f32>, SharedPtr<f32>)>,
    /// Reused by the gradient-norm pass.
    norm: NormScratch,
}

impl Core {
    pub(crate) fn new(name: &'static str) -> Self {
        Core {
            name,
            backend: Backend::default(),
            chunk_len: 0,
            steps: 0,
            layout: None,
            state: Vec::new(),
            plan: None,
            groups: Groups::default(),
            hygiene: Hygiene::default(),
            ptrs: Vec::new(),
            norm: NormScratch::default(),
        }
    }
}

/// A requested chunk length rounded up to a multiple of [`BLOCK`] (`0` becomes [`BLOCK`]).
pub(crate) fn effective_chunk_len(len: usize) -> usize {
    len.div_ceil(BLOCK).clamp(1, usize::MAX / BLOCK) * BLOCK
}

impl Core {
    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    /// The chunk length steps use: the one set, or the (tuned) default.
    pub(crate) fn chunk_len(&self) -> usize {
        match self.chunk_len {
            0 => tuning::default_chunk_len(self.name),
            n => n,
        }
    }

    /// `0` selects the (tuned) default; other values are rounded up to a multiple of [`BLOCK`].
    pub(crate) fn set_chunk_len(&mut self, len: usize) {
        self.chunk_len = if len == 0 {
            0
        } else {
            effective_chunk_len(len)
        };
    }

    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    pub(crate) fn layout(&self) -> Option<&[usize]> {
        self.layout.as_ref().map(|l| l.lens.as_slice())
    }

    /// Sets per-tensor overrides (empty: none). Checked in full before anything changes.
    pub(crate) fn set_param_groups(&mut self, groups: &[ParamGroup]) -> Result<(), StepError> {
        check_groups(groups)?;
        if let (false, Some(layout)) = (groups.is_empty() || self.state.is_empty(), &self.layout)
            && layout.lens.len() != groups.len()
        {
            return Err(StepError::GroupCount {
                groups: groups.len(),
                tensors: layout.lens.len(),
            });
        }
        self.groups = Groups::new(groups);
        Ok(())
    }

    /// What a state file records of this core.
    pub(crate) fn saved_state(&self) -> SavedState<'_> {
        SavedState {
            steps: self.steps,
            layout: self.layout(),
            offsets: self.layout.as_ref().map_or(&[], |l| &l.offsets),
            buffers: self.state.iter().map(|b| &b[..]).collect(),
            groups: &self.groups.per_tensor,
        }
    }

    /// Replaces layout, state, step count and groups with those of a loaded state file (checked
    /// by the caller).
    pub(crate) fn restore(
        &mut self,
        layout: Option<Vec<usize>>,
        state: Vec<StateBuf>,
        steps: u64,
        groups: &[ParamGroup],
    ) {
        self.layout = layout.map(Layout::new);
        self.state = state;
        self.steps = steps;
        self.plan = None;
        self.groups = Groups::new(groups);
    }

    pub(crate) fn param_groups(&self) -> &[ParamGroup] {
        &self.groups.per_tensor
    }

    /// Builds the kernel of every distinct parameter group (one when none are set) from its
    /// resolved hyperparameters, with the L2 term the [`Base`] asks for.
    fn kernels<K>(
        &self,
        base: &Base,
        tensors: usize,
        make: impl Fn(Hyper) -> K,
    ) -> Result<Kernels<K>, StepError> {
        let build = |h: Hyper| (make(h), if base.l2 { h.weight_decay } else { 0.0 });
        let groups = &self.groups;
        if groups.per_tensor.is_empty() {
            return Ok(Kernels::One([build(Hyper {
                lr: base.lr,
                weight_decay: base.weight_decay,
            })]));
        }
        if groups.per_tensor.len() != tensors {
            return Err(StepError::GroupCount {
                groups: groups.per_tensor.len(),
                tensors,
            });
        }
        groups
            .distinct
            .iter()
            .map(|g| {
                let lr = base.lr * g.lr_scale;
                if !lr.is_finite() {
                    let tensor = groups.per_tensor.iter().position(|p| p == g).unwrap_or(0);
                    return Err(StepError::InvalidGroup {
                        tensor,
                        field: "lr_scale",
                        value: g.lr_scale,
                        expected: "such that lr·lr_scale is finite",
                    });
                }
                Ok(build(Hyper {
                    lr,
                    weight_decay: g.weight_decay.unwrap_or(base.weight_decay),
                }))
            })
            .collect::<Result<_, _>>()
            .map(Kernels::Many)
    }

    pub(crate) fn set_grad_scale(&mut self, scale: f32) {
        self.hygiene.grad_scale = scale;
    }

    pub(crate) fn grad_scale(&self) -> f32 {
        self.hygiene.grad_scale
    }

    pub(crate) fn set_max_grad_norm(&mut self, max: Option<f32>) {
        self.hygiene.max_grad_norm = max;
    }

    pub(crate) fn max_grad_norm(&self) -> Option<f32> {
        self.hygiene.max_grad_norm
    }

    pub(crate) fn set_non_finite(&mut self, policy: NonFinite) {
        self.hygiene.non_finite = policy;
    }

    pub(crate) fn non_finite(&self) -> NonFinite {
        self.hygiene.non_finite
    }

    /// Checks the hygiene settings, runs the gradient-norm pass where clipping or checking needs
    /// it, and works out the gradient transform of the step: `(div, factor)` such that the kernel
    /// reads `(g / div)·factor`, which is `±(g / scale)·clip`, and bitwise `±g / scale` without
    /// clipping.
    fn check_grads(&mut self, params: &Params<'_, '_>, maximize: bool) -> Result<Check, StepError> {
        let Hygiene {
            grad_scale: scale,
            max_grad_norm,
            non_finite,
        } = self.hygiene;
        let invalid = |field, value, expected| StepError::InvalidConfig {
            optimizer: self.name,
            field,
            value,
            expected,
        };
        if !(scale.is_finite() && scale > 0.0) {
            return Err(invalid("grad_scale", scale, "finite and > 0"));
        }
        if let Some(max) = max_grad_norm
            && !(max.is_finite() && max >= 0.0)
        {
            return Err(invalid("max_grad_norm", max, "finite and >= 0"));
        }
        let mut clip = 1.0f32;
        let mut grad_norm = None;
        if max_grad_norm.is_some() || non_finite != NonFinite::Propagate {
            let (sum, bad_tensor) = self.sum_squares(params);
            // The norm of the unscaled gradients: ‖g‖ / scale.
            let norm = (sum.sqrt() / f64::from(scale)) as f32;
            grad_norm = Some(norm);
            if let Some(tensor) = bad_tensor {
                match non_finite {
                    NonFinite::Propagate => {}
                    NonFinite::Skip => return Ok(Check::Skip(norm)),
                    NonFinite::Error => return Err(StepError::NonFiniteGrad { tensor }),
                }
            }
            if let Some(max) = max_grad_norm {
                // torch.nn.utils.clip_grad_norm_: min(1, max / (norm + 1e-6)); NaN stays NaN.
                let coef = f64::from(max) / (f64::from(norm) + 1e-6);
                clip = if coef.is_nan() {
                    f32::NAN
                } else {
                    coef.min(1.0) as f32
                };
            }
        }
        let sign = if maximize { -1.0f32 } else { 1.0 };
        // A power-of-two scale divides exactly as a multiplication by its (exact) reciprocal does,
        // and folds into `factor`; any other scale is a true division.
        let pow2 = scale.is_normal() && scale.to_bits() & 0x007f_ffff == 0;
        Ok(if pow2 {
            Check::Apply(1.0, sign * clip * (1.0 / scale), grad_norm)
        } else {
            Check::Apply(scale, sign * clip, grad_norm)
        })
    }

    /// The sum of squares of every gradient of the call in f64, in a fixed order
    /// ([`NORM_BLOCK`]), and the first tensor holding a NaN or an infinity.
    fn sum_squares(&mut self, params: &Params<'_, '_>) -> (f64, Option<usize>) {
        let level = self.backend.level();
        let chunk_len = self.chunk_len();
        let scratch = &mut self.norm;
        scratch.fit(params);
        let grads: Vec<&[f32]> = params.iter().map(|(_, g)| &**g).collect();
        let sum_block = |(sum, &(t, start, len)): (&mut f64, &(usize, usize, usize))| {
            *sum = simd::sum_squares(level, &grads[t][start..start + len]);
        };
        let total_len: usize = scratch.lens.iter().sum();
        if total_len <= chunk_len || rayon::current_num_threads() == 1 {
            scratch
                .sums
                .iter_mut()
                .zip(&scratch.blocks)
                .for_each(sum_block);
        } else {
            // One contiguous run of blocks per thread: a read stream that jumps between distant
            // blocks restarts its prefetch lead each time.
            let threads = rayon::current_num_threads();
            let per_task = scratch.blocks.len().div_ceil(threads).max(1);
            scratch
                .sums
                .par_iter_mut()
                .zip(scratch.blocks.par_iter())
                .with_min_len(per_task)
                .for_each(sum_block);
        }
        let total = scratch.sums.iter().fold(0.0, |acc, &s| acc + s);
        let bad = if total.is_finite() {
            None
        } else {
            let first = scratch.sums.iter().position(|s| !s.is_finite());
            first.map(|b| scratch.blocks[b].0)
        };
        (total, bad)
    }

    /// Drops all state and the step counter; settings are kept.
    pub(crate) fn reset(&mut self) {
        self.steps = 0;
        self.layout = None;
        self.state.clear();
        self.plan = None;
    }

    /// Checks `params` against each other and against the layout, without modifying anything.
    fn validate(&self, params: &Params<'_, '_>, stateful: bool) -> Result<(), StepError> {
        for (tensor, (w, g)) in params.iter().enumerate() {
            if w.len() != g.len() {
                return Err(StepError::LengthMismatch {
                    tensor,
                    weights: w.len(),
                    grads: g.len(),
                });
            }
        }
        if let (true, Some(layout)) = (stateful, &self.layout) {
            if layout.lens.len() != params.len() {
                return Err(StepError::TensorCount {
                    expected: layout.lens.len(),
                    found: params.len(),
                });
            }
            for (tensor, (&expected, (w, _))) in layout.lens.iter().zip(params.iter()).enumerate() {
                if expected != w.len() {
                    return Err(StepError::TensorLen {
                        tensor,
                        expected,
                        found: w.len(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes layout, `N` state buffers and plan ready for `params`. Allocation failure is an error
    /// and leaves the previous state in place.
    fn prepare<const N: usize>(&mut self, params: &Params<'_, '_>) -> Result<(), StepError> {
        let stateful = N > 0 || !self.state.is_empty();
        self.validate(params, stateful)?;
        if !self.layout.as_ref().is_some_and(|l| l.matches(params)) {
            // First step, or a stateless optimizer seeing another layout.
            self.layout = Some(Layout::new(params.iter().map(|(w, _)| w.len()).collect()));
            self.plan = None;
        }
        let total = self.layout.as_ref().map_or(0, |l| l.total);
        let mut fresh = Vec::new();
        for _ in self.state.len()..N {
            fresh.push(zeroed(total)?);
        }
        self.state.extend(fresh);
        let chunk_len = self.chunk_len();
        if self.plan.as_ref().is_none_or(|p| p.chunk_len != chunk_len) {
            let lens = &self.layout.as_ref().expect("layout set above").lens;
            self.plan = Some(Plan::new(lens, chunk_len));
        }
        Ok(())
    }

    /// Validates `params`, resolves each parameter group's hyperparameters and builds its kernel
    /// with `make`, then applies the kernels to every element of every tensor and counts the step.
    /// On error nothing is modified.
    pub(crate) fn run<K: Kernel<N>, const N: usize>(
        &mut self,
        params: &mut Params<'_, '_>,
        base: Base,
        make: impl Fn(Hyper) -> K,
    ) -> Result<StepReport, StepError> {
        let kernels = self.kernels(&base, params.len(), make)?;
        let kernels = kernels.as_slice();
        self.validate(params, N > 0 || !self.state.is_empty())?;
        let (div, factor, grad_norm) = match self.check_grads(params, base.maximize)? {
            Check::Apply(div, factor, norm) => (div, factor, norm),
            Check::Skip(norm) => {
                return Ok(StepReport {
                    step: self.steps,
                    skipped: true,
                    grad_norm: Some(norm),
                });
            }
        };
        self.prepare::<N>(params)?;
        let group_of = &self.groups.index;
        let level = self.backend.level();
        let layout = self.layout.as_ref().expect("prepared");
        let plan = self.plan.as_ref().expect("prepared");
        self.ptrs.clear();
        self.ptrs.extend(
            params
                .iter_mut()
                .map(|(w, g)| (SharedPtr(w.as_mut_ptr()), SharedPtr(g.as_ptr().cast_mut()))),
        );
        let ptrs = &self.ptrs;
        let state: [SharedPtr<f32>; N] = {
            let mut it = self.state.iter_mut();
            core::array::from_fn(|_| SharedPtr(it.next().expect("prepared").as_mut_ptr()))
        };
        let offsets = &layout.offsets;
        let run_task = |t: usize| {
            for seg in plan.task(t) {
                let (w, g) = ptrs[seg.tensor];
                let (kernel, wd) = &kernels[group_of.get(seg.tensor).map_or(0, |&i| i)];
                let prep = GradPrep {
                    div,
                    factor,
                    wd: *wd,
                };
                let at = offsets[seg.tensor] + seg.start;
                // SAFETY: `seg` lies inside tensor `seg.tensor` (the plan was built from the lengths
                // that `prepare` checked against `params`), and inside that tensor's slice of every
                // state buffer (`offsets` and `total` come from the same lengths). Segments of a plan
                // are disjoint, so concurrent tasks never touch the same element, and the
                // gradient slices are distinct from the weights (one is `&`, the other `&mut`).
                // `level` comes from `Backend::level`, which only returns available tiers.
                unsafe {
                    let run = Run {
                        w: w.0.add(seg.start),
                        g: g.0.add(seg.start).cast_const(),
                        s: core::array::from_fn(|j| state[j].0.add(at)),
                        len: seg.len,
                    };
                    simd::run(level, kernel, prep, run);
                }
            }
        };
        let tasks = plan.tasks();
        if tasks <= 1 || rayon::current_num_threads() == 1 {
            (0..tasks).for_each(run_task);
        } else {
            (0..tasks).into_par_iter().for_each(run_task);
        }
        self.steps += 1;
        Ok(StepReport {
            step: self.steps,
            skipped: false,
            grad_norm,
        })
    }
}

fn zeroed(len: usize) -> Result<StateBuf, StepError> {
    let mut buf = StateBuf::new(64);
    buf.try_reserve_exact(len)
        .map_err(|_| StepError::OutOfMemory { elements: len })?;
    buf.resize(len, 0.0);
    Ok(buf)
}

impl Backend {
    /// The tier this backend runs on here: `Scalar` for [`Backend::Scalar`], the best available
    /// tier for [`Backend::Simd`], and for [`Backend::Level`] the requested tier or, where the CPU
    /// lacks it, the best available one below it.
    ///
    /// ```
    /// use fusedopt::{Backend, SimdLevel};
    /// assert_eq!(Backend::Scalar.level(), SimdLevel::Scalar);
    /// assert_eq!(Backend::Simd.level(), SimdLevel::detect());
    /// assert_eq!(Backend::Level(SimdLevel::Portable).level(), SimdLevel::Portable);
    /// ```
    pub fn level(self) -> SimdLevel {
        match self {
            Backend::Scalar => SimdLevel::Scalar,
            Backend::Simd => SimdLevel::detect(),
            Backend::Level(l) => l.min(SimdLevel::detect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(plan: &Plan, lens: &[usize]) {
        // Every element of every tensor appears in exactly one segment, in order.
        let mut next = vec![0usize; lens.len()];
        for t in 0..plan.tasks() {
            assert!(!plan.task(t).is_empty(), "empty task {t}");
            for s in plan.task(t) {
                assert_eq!(s.start, next[s.tensor]);
                assert!(s.len > 0);
                next[s.tensor] += s.len;
            }
        }
        assert_eq!(next, lens);
    }

    #[test]
    fn plan_covers_every_element_once() {
        let layouts: [&[usize]; 6] = [
            &[],
            &[0, 0],
            &[1],
            &[100_000],
            &[0, 1, 7, 15, 16, 17, 4097, 65537, 0, 3],
            &[1024; 300],
        ];
        for lens in layouts {
            for chunk in [BLOCK, 64, 100 * BLOCK, 1 << 12, DEFAULT_CHUNK_LEN] {
                let plan = Plan::new(lens, chunk);
                covered(&plan, lens);
            }
        }
    }

    #[test]
    fn plan_packs_small_and_splits_large() {
        let plan = Plan::new(&[1024; 64], 1 << 15);
        assert!(
            plan.tasks() < 4,
            "small tensors were not packed: {} tasks",
            plan.tasks()
        );
        let plan = Plan::new(&[1 << 20], 1 << 15);
        assert!(
            plan.tasks() >= 32,
            "a large tensor was not split: {} tasks",
            plan.tasks()
        );
        for s in &plan.segments {
            assert_eq!(s.start % BLOCK, 0);
        }
    }

    #[test]
    fn layout_offsets_are_block_aligned() {
        let l = Layout::new(vec![3, 0, 17, 16]);
        assert_eq!(l.offsets, vec![0, 16, 16, 48]);
        assert_eq!(l.total, 64);
    }

    #[test]
    fn chunk_len_is_clamped() {
        assert_eq!(effective_chunk_len(0), BLOCK);
        assert_eq!(effective_chunk_len(1), BLOCK);
        assert_eq!(effective_chunk_len(BLOCK + 1), 2 * BLOCK);
        assert_eq!(effective_chunk_len(usize::MAX) % BLOCK, 0);
    }
}
