//! The execution engine: validation, state, parameter groups, gradient hygiene and thread
//! dispatch. Imports [`crate::simd`], [`crate::types`], [`crate::plan`] and [`crate::tuning`].
//!
//! This is the only place that knows about rayon, chunk lengths and SIMD tiers. An optimizer's
//! rule hands [`Engine::step`] a [`Kernel`] per parameter group holding its per-step scalars; the
//! engine does the rest. A single-tensor `step` is a model with one tensor.
//!
//! # Layout and state
//! The first step of a stateful optimizer fixes the *layout*: the number of tensors and each
//! one's length. Each state buffer (momentum, second moment, ...) is one 64-byte aligned
//! allocation covering every tensor, each tensor's slice starting on a 64-byte boundary
//! ([`State`]).
//!
//! # Plan
//! The elements of all tensors, in order, are cut into *tasks* of about `chunk_len` elements
//! ([`Plan`]): small tensors are packed together into one task, large ones are split on cache-line
//! boundaries. The plan is computed once per layout and chunk length and reused by every step.
//! Tasks run on the caller's rayon pool; a step with a single task, or on a pool with one thread,
//! runs inline without any thread dispatch.
//!
//! # Gradient transforms and hygiene
//! Negation (`maximize`), the loss scale, the clipping coefficient and the L2 weight-decay term
//! are applied by the kernels as they read each gradient ([`GradPrep`]), per parameter group.
//! Clipping and the non-finite check need the global gradient norm first ([`hygiene`]).
//!
//! # Determinism
//! Every tier computes bitwise identical results (see [`crate::simd`]), and the update of an
//! element depends only on that element, so results do not depend on how the work is cut or on
//! the number of threads.

mod groups;
mod hygiene;
mod state;
mod tensors;

pub(crate) use groups::{CommonConfig, GroupHyper, check_groups};
pub(crate) use state::State;
pub(crate) use tensors::{Lists, Pairs, TensorList, TensorRef, TensorSource};

use crate::plan::{Layout, Plan, effective_chunk_len};
use crate::simd::{self, GradPrep, Kernel, Span, Tier};
use crate::tuning;
use crate::types::{ParamGroup, Settings, StepError, StepReport};
use groups::{GroupKernels, Groups};
use hygiene::{GradCheck, GradScale, NormPass};
use rayon::prelude::*;

/// Everything an optimizer needs besides its rule: settings, state, parameter groups, and what
/// steps reuse (plan, norm slices, the capture buffer).
#[derive(Debug)]
pub struct Engine {
    /// The optimizer's name, for its tuned chunk length and in errors.
    name: &'static str,
    /// How steps run; the caller's to change.
    pub(crate) settings: Settings,
    state: State,
    groups: Groups,
    plan: Option<Plan>,
    norm: NormPass,
    /// The storage of each step's [`TensorList`].
    captured: Vec<TensorRef>,
}

impl Engine {
    /// An engine for the optimizer called `name`, with default settings and no state.
    pub(crate) fn new(name: &'static str) -> Self {
        Engine {
            name,
            settings: Settings::default(),
            state: State::default(),
            groups: Groups::default(),
            plan: None,
            norm: NormPass::default(),
            captured: Vec::new(),
        }
    }

    /// The chunk length steps use: the one set, or the (tuned) default.
    pub(crate) fn chunk_len(&self) -> usize {
        match self.settings.chunk_len {
            0 => tuning::default_chunk_len(self.name),
            n => n,
        }
    }

    /// `0` selects the (tuned) default; other values are rounded up to a multiple of 16.
    pub(crate) fn set_chunk_len(&mut self, len: usize) {
        self.settings.chunk_len = if len == 0 {
            0
        } else {
            effective_chunk_len(len)
        };
    }

    /// The state: step count, layout and buffers.
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// The tensor lengths of the layout, once fixed.
    pub(crate) fn layout(&self) -> Option<&[usize]> {
        self.state.layout.as_ref().map(Layout::lens)
    }

    /// Sets per-tensor overrides (empty: none). Checked in full before anything changes.
    ///
    /// # Errors
    /// [`StepError::InvalidGroup`], or [`StepError::GroupCount`] against an existing layout.
    pub(crate) fn set_param_groups(&mut self, groups: &[ParamGroup]) -> Result<(), StepError> {
        check_groups(groups)?;
        if !groups.is_empty()
            && !self.state.buffers.is_empty()
            && let Some(lens) = self.layout()
            && lens.len() != groups.len()
        {
            return Err(StepError::GroupCount {
                groups: groups.len(),
                tensors: lens.len(),
            });
        }
        self.groups = Groups::new(groups);
        Ok(())
    }

    /// The per-tensor overrides; empty when none are set.
    pub(crate) fn param_groups(&self) -> &[ParamGroup] {
        self.groups.per_tensor()
    }

    /// Replaces state and groups with those of a state file (checked by the caller).
    pub(crate) fn restore(&mut self, state: State, groups: &[ParamGroup]) {
        self.state = state;
        self.plan = None;
        self.groups = Groups::new(groups);
    }

    /// Drops all state and the step count; settings and groups are kept.
    pub(crate) fn reset(&mut self) {
        self.state = State::default();
        self.plan = None;
    }

    /// Captures the tensors of `source` and runs `f` on them. The capture reuses storage, so
    /// after the first step it allocates nothing.
    ///
    /// # Errors
    /// Those of [`TensorSource::capture`] and of `f`.
    pub(crate) fn with_tensors<S: TensorSource + ?Sized, R>(
        &mut self,
        source: &mut S,
        f: impl FnOnce(&mut Engine, &TensorList<'_>) -> Result<R, StepError>,
    ) -> Result<R, StepError> {
        let mut list = TensorList::new(std::mem::take(&mut self.captured));
        let result = source.capture(&mut list).and_then(|()| f(self, &list));
        self.captured = list.into_buf();
        result
    }

    /// One step: checks `tensors` against each other and the layout, resolves each parameter
    /// group's hyperparameters and builds its kernel with `make`, checks the gradients, then
    /// applies the kernels to every element of every tensor and counts the step.
    ///
    /// # Errors
    /// Every [`StepError`] of [`Optimizer::step`](crate::Optimizer::step) but an invalid
    /// configuration (the rule's to check). On error nothing is modified.
    pub(crate) fn step<K: Kernel<N> + Copy, const N: usize>(
        &mut self,
        tensors: &TensorList<'_>,
        common: CommonConfig,
        make: impl Fn(GroupHyper) -> K,
    ) -> Result<StepReport, StepError> {
        let mut store = GroupKernels::Empty;
        let kernels = self
            .groups
            .kernels(&common, tensors.len(), make, &mut store)?;
        let stateful = N > 0 || !self.state.buffers.is_empty();
        self.validate(tensors, stateful)?;
        let chunk_len = self.chunk_len();
        let tier = self.settings.backend.tier();
        let check = self.norm.check(
            &self.settings,
            self.name,
            tensors,
            common.maximize,
            tier,
            chunk_len,
        )?;
        let (scale, grad_norm) = match check {
            GradCheck::Apply { scale, grad_norm } => (scale, grad_norm),
            GradCheck::Skip { grad_norm } => {
                return Ok(StepReport {
                    step: self.state.steps,
                    skipped: true,
                    grad_norm: Some(grad_norm),
                });
            }
        };
        self.prepare(tensors, N, chunk_len)?;
        self.dispatch(tensors, kernels, scale, tier);
        self.state.steps += 1;
        Ok(StepReport {
            step: self.state.steps,
            skipped: false,
            grad_norm,
        })
    }

    /// Checks every tensor's weights against its gradients and, where there is state, the
    /// tensors against the layout.
    fn validate(&self, tensors: &TensorList<'_>, stateful: bool) -> Result<(), StepError> {
        for (tensor, t) in tensors.refs().iter().enumerate() {
            if t.w_len != t.g_len {
                return Err(StepError::LengthMismatch {
                    tensor,
                    weights: t.w_len,
                    grads: t.g_len,
                });
            }
        }
        if let (true, Some(lens)) = (stateful, self.layout()) {
            if lens.len() != tensors.len() {
                return Err(StepError::TensorCount {
                    expected: lens.len(),
                    found: tensors.len(),
                });
            }
            for (tensor, (&expected, found)) in lens.iter().zip(tensors.lens()).enumerate() {
                if expected != found {
                    return Err(StepError::TensorLen {
                        tensor,
                        expected,
                        found,
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes layout, `buffers` state buffers and plan ready for the (validated) `tensors`.
    /// Allocation failure is an error and leaves the previous state in place.
    fn prepare(
        &mut self,
        tensors: &TensorList<'_>,
        buffers: usize,
        chunk_len: usize,
    ) -> Result<(), StepError> {
        let state = &mut self.state;
        if !state
            .layout
            .as_ref()
            .is_some_and(|l| l.matches(tensors.lens()))
        {
            // First step, or a stateless optimizer seeing another layout.
            let lens: Vec<usize> = tensors.lens().collect();
            let layout = Layout::new(lens).ok_or(StepError::OutOfMemory {
                elements: usize::MAX,
            })?;
            state.layout = Some(layout);
            self.plan = None;
        }
        let layout = state.layout.as_ref().expect("set above");
        if state.buffers.len() < buffers {
            // All or nothing: the state changes only once every new buffer is allocated.
            let fresh = (state.buffers.len()..buffers)
                .map(|_| state::zeroed_buffer(layout.total()))
                .collect::<Result<Vec<_>, _>>()?;
            state.buffers.extend(fresh);
        }
        if self
            .plan
            .as_ref()
            .is_none_or(|p| p.chunk_len() != chunk_len)
        {
            self.plan = Some(Plan::new(layout.lens(), chunk_len));
        }
        Ok(())
    }

    /// Runs the kernels over every element of the prepared plan, on the current rayon pool.
    fn dispatch<K: Kernel<N>, const N: usize>(
        &mut self,
        tensors: &TensorList<'_>,
        kernels: &[(K, f32)],
        scale: GradScale,
        tier: Tier,
    ) {
        let kernel_index = self.groups.kernel_index();
        let layout = self.state.layout.as_ref().expect("prepared");
        let plan = self.plan.as_ref().expect("prepared");
        let refs = tensors.refs();
        let state: [StatePtr; N] = {
            let mut it = self.state.buffers.iter_mut();
            core::array::from_fn(|_| StatePtr(it.next().expect("prepared").as_mut_ptr()))
        };
        let offsets = layout.offsets();
        let run_task = |t: usize| {
            for seg in plan.task(t) {
                let tensor = refs[seg.tensor];
                let (kernel, wd) = &kernels[kernel_index.get(seg.tensor).map_or(0, |&i| i)];
                let prep = GradPrep {
                    div: scale.div,
                    factor: scale.factor,
                    wd: *wd,
                };
                let at = offsets[seg.tensor] + seg.start;
                // SAFETY: `seg` lies inside tensor `seg.tensor` (the plan was cut from the layout,
                // which `validate` matched against these weight and gradient lengths), and inside
                // that tensor's slice of every state buffer (`offsets` and `total` come from the
                // same lengths). The pointers come from borrows the step holds (`TensorList`).
                // Segments of a plan are disjoint, so concurrent tasks never touch the same
                // element, and the gradients are distinct from the weights (one was a `&`, the
                // other a `&mut`).
                unsafe {
                    let span = Span {
                        w: tensor.w.add(seg.start),
                        g: tensor.g.add(seg.start),
                        s: core::array::from_fn(|j| state[j].0.add(at)),
                        len: seg.len,
                    };
                    simd::update_span(tier, kernel, prep, span);
                }
            }
        };
        let tasks = plan.tasks();
        if tasks <= 1 || rayon::current_num_threads() == 1 {
            (0..tasks).for_each(run_task);
        } else {
            (0..tasks).into_par_iter().for_each(run_task);
        }
    }
}

/// A state buffer's base pointer, shared by the tasks of one step.
#[derive(Debug, Clone, Copy)]
struct StatePtr(*mut f32);
// SAFETY: only dereferenced by tasks of one plan, whose segments are disjoint, while the step
// that created it holds `&mut` of the state buffers.
unsafe impl Send for StatePtr {}
// SAFETY: as above.
unsafe impl Sync for StatePtr {}
