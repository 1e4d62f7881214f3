//! The execution engine: validation, state, parameter groups, gradient hygiene and thread
//! dispatch. Imports [`crate::simd`], [`crate::types`], [`crate::plan`] and [`crate::tuning`].
//!
//! This is the only place that knows about rayon, chunk lengths and SIMD tiers. An optimizer's
//! rule hands [`Engine::step`] (a captured list of tensors) or [`Engine::step_feed`] (tensors
//! lent one at a time) a function that builds a [`Kernel`] holding its per-step scalars for a
//! class of tensors; the engine does the rest. A single-tensor `step` is a model with one tensor.
//!
//! # Steps per tensor
//! A tensor without a gradient in a step is left alone, state included, and does not count the
//! step: every tensor keeps its own step count, and tensors at different counts get kernels of
//! their own (Adam's bias correction uses the tensor's count).
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
mod par;
mod state;
mod tensors;
mod trust;

pub(crate) use groups::{CommonConfig, GroupHyper, check_groups};
pub(crate) use state::{State, Sums};
pub(crate) use state::{
    bytes_per_element as state_bytes_per_element, unit as state_unit, zeroed_buffer,
};
pub use tensors::{FeedError, TensorFeed};
pub(crate) use tensors::{
    Lists, Pairs, PartialLists, TensorList, TensorRef, TensorSource, TypedLists, TypedPartialLists,
};

use crate::plan::{FeedPlan, Layout, Plan, effective_chunk_len};
use crate::simd::{self, BLOCK, CompactState, Formats, GradPrep, Kernel, Map, Span, Tier};
use crate::tuning;
use crate::types::{Dtype, ParamGroup, Settings, StateFormat, StepError, StepReport};
use groups::{GroupKernels, Groups, KernelClasses, Kernels, StepNumbers};
use hygiene::{GradCheck, GradScale, NormPass};
use par::{OwnPool, Par};
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use trust::TrustPass;

/// Everything an optimizer needs besides its rule: settings, state, parameter groups, tensor
/// names, its thread pool, and what steps reuse (plans, norm slices, capture buffers).
#[derive(Debug)]
pub struct Engine {
    /// The optimizer's name, for its tuned chunk length and in errors.
    name: &'static str,
    /// How steps run (always valid: [`set_settings`](Engine::set_settings) checks them).
    settings: Settings,
    /// The pool of `settings.threads` threads, when that is not 0.
    pool: Option<OwnPool>,
    state: State,
    groups: Groups,
    /// Per-tensor names; empty when none are set.
    names: Vec<String>,
    plan: Option<Plan>,
    feed_plan: Option<FeedPlan>,
    norm: NormPass,
    /// The per-tensor norms of trust-ratio rules.
    trust: TrustPass,
    classes: KernelClasses,
    /// The storage of each step's [`TensorList`].
    captured: Vec<TensorRef>,
    /// What the gradient phase of a fed step learnt of each tensor.
    fed: Vec<Fed>,
    /// Each state buffer's map in 8-bit format (signed or not), in the rule's order.
    maps: Vec<Map>,
    /// The value each state buffer starts from (0 but for Adagrad's
    /// `initial_accumulator_value`), in the rule's order; set by the rule before each step.
    initial: Vec<f32>,
}

/// One tensor of a fed step.
#[derive(Debug)]
struct Fed {
    /// Its length.
    len: usize,
    /// Whether it has a gradient this step.
    has_grad: AtomicBool,
    /// Whether the update phase updated it.
    updated: AtomicBool,
}

impl Engine {
    /// An engine for the optimizer called `name`, with default settings and no state; `signed`
    /// says of each state buffer of the rule whether its values take both signs.
    pub(crate) fn new(name: &'static str, signed: Vec<bool>) -> Self {
        Engine {
            name,
            settings: Settings::default(),
            pool: None,
            state: State::default(),
            groups: Groups::default(),
            names: Vec::new(),
            plan: None,
            feed_plan: None,
            norm: NormPass::default(),
            trust: TrustPass::default(),
            classes: KernelClasses::default(),
            captured: Vec::new(),
            fed: Vec::new(),
            initial: vec![0.0; signed.len()],
            maps: signed
                .into_iter()
                .map(|s| if s { Map::Signed } else { Map::Unsigned })
                .collect(),
        }
    }

    /// The values new state buffers start from, one per buffer of the rule, to set.
    pub(crate) fn initial_mut(&mut self) -> &mut [f32] {
        &mut self.initial
    }

    /// The chunk length steps use ([`chunk_len_for`]).
    pub(crate) fn chunk_len(&self) -> usize {
        chunk_len_for(self.name, &self.settings)
    }

    /// The settings.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the settings, checked in full first: ranges, the state format against state
    /// held, and a pool of the new thread count started. A chunk length other than 0 is rounded
    /// up to a multiple of 16.
    ///
    /// # Errors
    /// [`StepError::InvalidSetting`], [`StepError::StateFormat`], [`StepError::ThreadPool`];
    /// nothing changes then.
    pub(crate) fn set_settings(&mut self, mut new: Settings) -> Result<(), StepError> {
        new.validate()?;
        if new.chunk_len != 0 {
            new.chunk_len = effective_chunk_len(new.chunk_len);
        }
        if !self.state.buffers.is_empty() && self.state.format != new.state_format {
            return Err(StepError::StateFormat {
                held: self.state.format,
                requested: new.state_format,
            });
        }
        if new.threads != self.settings.threads {
            // Started before anything changes; the old pool's threads are joined when dropped.
            self.pool = match new.threads {
                0 => None,
                threads => Some(OwnPool::new(threads).map_err(|e| StepError::ThreadPool {
                    threads,
                    message: e.to_string(),
                })?),
            };
        }
        if new.state_format != self.settings.state_format {
            self.plan = None;
            self.feed_plan = None;
        }
        self.settings = new;
        Ok(())
    }

    /// The state: step counts, layout and buffers.
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// The rule's running sums (see [`State::sums`]), to advance after an applied step.
    pub(crate) fn sums_mut(&mut self) -> &mut Sums {
        &mut self.state.sums
    }

    /// Whether the weights were last left at the evaluation point ([`State::eval`]).
    pub(crate) fn is_eval(&self) -> bool {
        self.state.eval
    }

    /// Records where the weights are, without moving them.
    pub(crate) fn set_eval(&mut self, eval: bool) {
        self.state.eval = eval;
    }

    /// Moves the weights between a rule's training and evaluation points: `w ← w + c·d` for
    /// every tensor, `d` being state buffer `b` (decoded from its format), and records the mode
    /// `eval`. Nothing to move before the first step (every tensor is at both points then);
    /// a tensor that has not stepped yet has `d = 0` and keeps its weights. Weights are checked
    /// against the layout before any changes; the arithmetic is one rounding per operation,
    /// the same on every tier.
    ///
    /// # Errors
    /// [`StepError::TensorCount`] or [`StepError::TensorLen`] if `weights` are not the layout's
    /// tensors.
    pub(crate) fn shift_weights(
        &mut self,
        weights: &mut [&mut [f32]],
        b: usize,
        c: f32,
        eval: bool,
    ) -> Result<(), StepError> {
        if let Some(lens) = self.layout().filter(|_| b < self.state.buffers.len()) {
            if weights.len() != lens.len() {
                return Err(StepError::TensorCount {
                    expected: lens.len(),
                    found: weights.len(),
                });
            }
            if let Some(t) = (0..lens.len()).find(|&t| weights[t].len() != lens[t]) {
                return Err(StepError::TensorLen {
                    tensor: t,
                    expected: lens[t],
                    found: weights[t].len(),
                });
            }
            for (t, w) in weights.iter_mut().enumerate() {
                let d = self.read_state(b, t).expect("checked against the layout");
                for (w, d) in w.iter_mut().zip(d) {
                    *w += c * d;
                }
            }
        }
        self.state.eval = eval;
        Ok(())
    }

    /// The steps each tensor of the layout has taken; empty before the first step.
    pub(crate) fn tensor_steps(&self) -> &[u64] {
        &self.state.tensor_steps
    }

    /// The tensor lengths of the layout, once fixed.
    pub(crate) fn layout(&self) -> Option<&[usize]> {
        self.state.layout.as_ref().map(Layout::lens)
    }

    /// The layout's tensor count, when the optimizer holds state and `given` per-tensor settings
    /// (0: none) do not match it.
    fn count_mismatch(&self, given: usize) -> Option<usize> {
        let tensors = self
            .layout()
            .filter(|_| !self.state.buffers.is_empty())?
            .len();
        (given != 0 && given != tensors).then_some(tensors)
    }

    /// Sets per-tensor overrides (empty: none). Checked in full before anything changes.
    ///
    /// # Errors
    /// [`StepError::InvalidGroup`], or [`StepError::GroupCount`] against an existing layout.
    pub(crate) fn set_param_groups(&mut self, groups: &[ParamGroup]) -> Result<(), StepError> {
        check_groups(groups)?;
        if let Some(tensors) = self.count_mismatch(groups.len()) {
            let groups = groups.len();
            return Err(StepError::GroupCount { groups, tensors });
        }
        self.groups = Groups::new(groups);
        Ok(())
    }

    /// The per-tensor overrides; empty when none are set.
    pub(crate) fn param_groups(&self) -> &[ParamGroup] {
        self.groups.per_tensor()
    }

    /// Names the tensors (empty: no names). Checked in full before anything changes.
    ///
    /// # Errors
    /// [`StepError::InvalidName`] for an empty name, one with a comma or a line break, or one
    /// given twice; [`StepError::NameCount`] against an existing layout.
    pub(crate) fn set_tensor_names(&mut self, names: &[&str]) -> Result<(), StepError> {
        check_names(names.iter().copied())?;
        if let Some(tensors) = self.count_mismatch(names.len()) {
            let names = names.len();
            return Err(StepError::NameCount { names, tensors });
        }
        self.names = names.iter().map(|n| n.to_string()).collect();
        Ok(())
    }

    /// The tensor names; empty when none are set.
    pub(crate) fn tensor_names(&self) -> &[String] {
        &self.names
    }

    /// Replaces state, groups and names with those of a state file (checked by the caller).
    pub(crate) fn restore(&mut self, state: State, groups: &[ParamGroup], names: Vec<String>) {
        self.state = state;
        self.plan = None;
        self.feed_plan = None;
        self.groups = Groups::new(groups);
        self.names = names;
    }

    /// Creates the state a first step over tensors of `lens` would (the layout, and `buffers`
    /// zeroed buffers, every tensor at step 0) without stepping; buffers already held for this
    /// layout are kept. Checked in full before anything changes.
    ///
    /// # Errors
    /// [`StepError::TensorCount`] or [`StepError::TensorLen`] against a layout the optimizer
    /// holds state for, [`StepError::GroupCount`] or [`StepError::NameCount`] against the
    /// per-tensor settings, [`StepError::OutOfMemory`].
    pub(crate) fn init_state(&mut self, lens: &[usize], buffers: usize) -> Result<(), StepError> {
        self.check_tensors(lens.iter().copied(), buffers)?;
        let groups = self.groups.per_tensor().len();
        if groups != 0 && groups != lens.len() {
            let tensors = lens.len();
            return Err(StepError::GroupCount { groups, tensors });
        }
        let format = self.settings.state_format;
        let fill = (self.initial.as_slice(), self.maps.as_slice());
        if prepare_state(&mut self.state, lens.iter().copied(), buffers, format, fill)? {
            self.plan = None;
            self.feed_plan = None;
        }
        Ok(())
    }

    /// Sets each tensor's step count (the optimizer's count becomes the largest).
    ///
    /// # Errors
    /// [`StepError::TensorCount`] unless there is one count per tensor of the layout (none
    /// before the state exists).
    pub(crate) fn set_tensor_steps(&mut self, steps: &[u64]) -> Result<(), StepError> {
        let expected = self.layout().map_or(0, <[usize]>::len);
        if steps.len() != expected {
            return Err(StepError::TensorCount {
                expected,
                found: steps.len(),
            });
        }
        if expected > 0 {
            self.state.tensor_steps = steps.to_vec();
            self.state.steps = steps.iter().copied().max().unwrap_or(0);
        }
        Ok(())
    }

    /// Tensor `t`'s values of state buffer `b` as `f32`, decoded from a compact format; `None`
    /// if the optimizer holds no such buffer or tensor.
    pub(crate) fn read_state(&self, b: usize, t: usize) -> Option<Vec<f32>> {
        let layout = self.state.layout.as_ref().filter(|l| t < l.lens().len())?;
        if b >= self.state.buffers.len() {
            return None;
        }
        let len = layout.lens()[t];
        let (values, scales) = self.state.tensor_raw(b, t);
        Some(match self.state.format {
            StateFormat::Bf16 => bytemuck::cast_slice::<u8, u16>(values)
                .iter()
                .map(|&v| simd::compact::bf16_to_f32(v))
                .collect(),
            StateFormat::Q8 => {
                let scales: &[f32] = bytemuck::cast_slice(scales);
                let mut out = vec![0f32; len];
                for ((x, codes), &scale) in
                    out.chunks_mut(BLOCK).zip(values.chunks(BLOCK)).zip(scales)
                {
                    simd::compact::dequantize(self.maps[b], codes, scale, x);
                }
                out
            }
            _ => bytemuck::cast_slice::<u8, f32>(values).to_vec(),
        })
    }

    /// Writes tensor `t`'s values of state buffer `b` from `f32`, encoded in the buffer's
    /// format (bf16 rounded to nearest, 8-bit quantized block by block).
    ///
    /// # Errors
    /// [`StepError::NoState`] if the optimizer holds no such buffer or tensor,
    /// [`StepError::TensorLen`] if `values` has another length than the tensor.
    pub(crate) fn write_state(
        &mut self,
        b: usize,
        t: usize,
        values: &[f32],
    ) -> Result<(), StepError> {
        if b >= self.state.buffers.len() {
            return Err(StepError::NoState {
                buffer: b,
                tensor: t,
            });
        }
        self.writable_range(b, t, values.len())?;
        let map = self.maps.get(b).copied().unwrap_or(Map::Signed);
        encode_tensor(&mut self.state, b, t, values, map);
        Ok(())
    }

    /// Tensor `t`'s slice of state buffer `b`, to read and write; `None` if the optimizer holds
    /// no such buffer or tensor.
    pub(crate) fn state_slice_mut(&mut self, b: usize, t: usize) -> Option<&mut [f32]> {
        if self.state.format != StateFormat::F32 {
            return None;
        }
        let range = self
            .state
            .layout
            .as_ref()
            .filter(|l| t < l.lens().len())?
            .range(t);
        Some(&mut self.state.buffers.get_mut(b)?[range])
    }

    /// Tensor `t`'s slice of state buffer `b`; `None` if there is no such buffer or tensor.
    pub(crate) fn state_slice(&self, b: usize, t: usize) -> Option<&[f32]> {
        if self.state.format != StateFormat::F32 {
            return None;
        }
        let range = self
            .state
            .layout
            .as_ref()
            .filter(|l| t < l.lens().len())?
            .range(t);
        Some(&self.state.buffers.get(b)?[range])
    }

    /// Tensor `t`'s range in the layout, for writing `found` values into buffer `b`.
    ///
    /// # Errors
    /// [`StepError::NoState`] before the state exists or for a tensor beyond the layout,
    /// [`StepError::TensorLen`] unless `found` is the tensor's length.
    fn writable_range(
        &self,
        b: usize,
        t: usize,
        found: usize,
    ) -> Result<core::ops::Range<usize>, StepError> {
        let Some(layout) = self.state.layout.as_ref().filter(|l| t < l.lens().len()) else {
            return Err(StepError::NoState {
                buffer: b,
                tensor: t,
            });
        };
        let expected = layout.lens()[t];
        if found != expected {
            return Err(StepError::TensorLen {
                tensor: t,
                expected,
                found,
            });
        }
        Ok(layout.range(t))
    }

    /// Tensor `t`'s `f32` master weights; `None` unless it has stepped with half-precision
    /// weights or had them set ([`write_master`](Engine::write_master)).
    pub(crate) fn master_slice(&self, t: usize) -> Option<&[f32]> {
        let layout = self.state.layout.as_ref().filter(|l| t < l.lens().len())?;
        if !self.state.master_ready.get(t).copied().unwrap_or(false) {
            return None;
        }
        Some(&self.state.master.as_ref()?[layout.range(t)])
    }

    /// [`master_slice`](Engine::master_slice), to change.
    pub(crate) fn master_slice_mut(&mut self, t: usize) -> Option<&mut [f32]> {
        let layout = self.state.layout.as_ref().filter(|l| t < l.lens().len())?;
        if !self.state.master_ready.get(t).copied().unwrap_or(false) {
            return None;
        }
        let range = layout.range(t);
        Some(&mut self.state.master.as_mut()?[range])
    }

    /// Sets tensor `t`'s `f32` master weights (creating the master buffer if needed): its next
    /// step with half-precision weights continues from them instead of taking the weights.
    ///
    /// # Errors
    /// [`StepError::NoState`] (buffer: the rule's buffer count) before the state exists or for
    /// a tensor beyond the layout, [`StepError::TensorLen`] for another length,
    /// [`StepError::OutOfMemory`] if the buffer cannot be allocated; nothing changes on error.
    pub(crate) fn write_master(
        &mut self,
        t: usize,
        values: &[f32],
        buffers: usize,
    ) -> Result<(), StepError> {
        let range = self.writable_range(buffers, t, values.len())?;
        if self.state.master.is_none() {
            let layout = self.state.layout.as_ref().expect("checked above");
            self.state.master = Some(state::zeroed_buffer(layout.total())?);
            self.state.master_ready = vec![false; layout.lens().len()];
        }
        self.state.master.as_mut().expect("set above")[range].copy_from_slice(values);
        self.state.master_ready[t] = true;
        Ok(())
    }

    /// Drops all state and the step counts; settings, groups and names are kept.
    pub(crate) fn reset(&mut self) {
        self.state = State::default();
        self.plan = None;
        self.feed_plan = None;
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

    /// One step over a captured list: checks the tensors against each other and the layout,
    /// takes the gradient norm where hygiene needs it, then [`update`](Engine::update)s every
    /// tensor that has a gradient.
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
        self.check_tensors(tensors.lens(), N)?;
        for (tensor, t) in tensors.refs().iter().enumerate() {
            if t.has_grad() && t.w_len != t.g_len {
                return Err(StepError::LengthMismatch {
                    tensor,
                    weights: t.w_len,
                    grads: t.g_len,
                });
            }
        }
        let (tier, chunk_len) = self.execution();
        let summed = hygiene::needs_norm(&self.settings);
        if summed {
            self.norm.fit(tensors.lens());
            self.norm
                .sum_all(tier, par_of(&self.pool), chunk_len, |t| tensors.grads(t));
        }
        let refs = tensors.refs();
        let stepping = |t: usize| refs[t].has_grad();
        let update = self.update(
            tensors.lens(),
            &stepping,
            Some(refs),
            (common, make),
            summed,
            |run, par, layout, plan| {
                if plan.as_ref().is_none_or(|p| p.chunk_len() != chunk_len) {
                    *plan = Some(Plan::cut(layout.lens(), chunk_len, layout.unit()));
                }
                let plan = plan.as_ref().expect("cut above");
                if K::TRUST {
                    // SAFETY: as for the segments below: every slice lies inside its tensor,
                    // which is borrowed for the step; the pass only reads.
                    unsafe { run.measure_all(par, refs, &stepping, chunk_len) };
                }
                par.for_each(plan.tasks(), |task| {
                    for seg in plan.task(task) {
                        let tensor = refs[seg.tensor];
                        if tensor.has_grad() {
                            // SAFETY: the segment lies inside the tensor (the plan was cut from
                            // the layout, which `check_tensors` matched against these weight
                            // lengths, and the gradients have the same length) and inside its
                            // slice of every state buffer; the pointers come from borrows the
                            // step holds (`TensorList`); segments of a plan are disjoint, and
                            // gradients are distinct from weights (a `&` and a `&mut`).
                            unsafe { run.segment(seg.tensor, tensor, seg.start, seg.len) };
                        }
                    }
                });
            },
        )?;
        Ok(match update {
            Updated::Skipped(report) => report,
            Updated::Applied { grad_norm } => {
                finish(&mut self.state, tensors.len(), stepping, grad_norm)
            }
        })
    }

    /// One step over tensors lent one at a time by `feed`: reads every gradient once (lengths,
    /// which tensors have one, the norm where needed), then [`update`](Engine::update)s by
    /// lending each tensor that has a gradient once more. Both phases run tasks of whole
    /// tensors on the pool ([`FeedPlan`]).
    ///
    /// # Errors
    /// As [`step`](Engine::step), and [`StepError::Feed`] when the feed fails; of several
    /// failing tensors, the first is reported. Errors of the gradient phase modify nothing; an
    /// error of the update phase leaves the tensors already updated as they are (with their step
    /// counted).
    pub(crate) fn step_feed<K: Kernel<N> + Copy, const N: usize>(
        &mut self,
        feed: &dyn TensorFeed,
        common: CommonConfig,
        make: impl Fn(GroupHyper) -> K,
    ) -> Result<StepReport, StepError> {
        let n = feed.tensor_count();
        // Taken out of the engine for the step (and put back), so that the tasks can read them
        // while the step changes the engine.
        let mut fed = std::mem::take(&mut self.fed);
        fed.clear();
        fed.extend((0..n).map(|i| Fed {
            len: feed.tensor_len(i),
            has_grad: AtomicBool::new(false),
            updated: AtomicBool::new(false),
        }));
        let result = self.step_fed(feed, &fed, common, make);
        self.fed = fed;
        result
    }

    /// [`step_feed`](Engine::step_feed) over the tensors `fed` describes.
    fn step_fed<K: Kernel<N> + Copy, const N: usize>(
        &mut self,
        feed: &dyn TensorFeed,
        fed: &[Fed],
        common: CommonConfig,
        make: impl Fn(GroupHyper) -> K,
    ) -> Result<StepReport, StepError> {
        let lens = || fed.iter().map(|f| f.len);
        self.check_tensors(lens(), N)?;
        let (tier, chunk_len) = self.execution();
        let summed = hygiene::needs_norm(&self.settings);
        if summed {
            self.norm.fit(lens());
        }
        if self
            .feed_plan
            .as_ref()
            .is_none_or(|p| p.chunk_len() != chunk_len || !p.fits(lens()))
        {
            self.feed_plan = Some(FeedPlan::new(&lens().collect::<Vec<_>>(), chunk_len));
        }
        let plan = self.feed_plan.take().expect("fitted above");

        // The gradient phase: nothing changes until every gradient has been read.
        let (norm, par) = (&self.norm, par_of(&self.pool));
        let first_error = FirstError::default();
        par.for_each(plan.tasks(), |task| {
            for i in plan.task(task) {
                let mut lent = None;
                let outcome = feed.grad(i, &mut |g| {
                    lent = Some(match g {
                        None => Ok(false),
                        Some(g) if g.len() != fed[i].len => Err(StepError::LengthMismatch {
                            tensor: i,
                            weights: fed[i].len,
                            grads: g.len(),
                        }),
                        Some(g) => {
                            if summed {
                                norm.sum_tensor(tier, par, chunk_len, i, g);
                            }
                            Ok(true)
                        }
                    });
                });
                let has_grad = outcome
                    .map_err(|e| feed_error(i, e.to_string()))
                    .and_then(|()| {
                        lent.unwrap_or_else(|| {
                            Err(feed_error(i, "it did not lend the gradient".into()))
                        })
                    });
                match has_grad {
                    Ok(has) => fed[i].has_grad.store(has, Ordering::Relaxed),
                    Err(e) => first_error.record(i, e),
                }
            }
        });
        let result = first_error.into_result().and_then(|()| {
            let stepping = |t: usize| fed[t].has_grad.load(Ordering::Relaxed);
            // The update phase: after an error, the tensors not yet started are left alone.
            let first_error = FirstError::default();
            let update = self.update(
                lens(),
                &stepping,
                None,
                (common, make),
                summed,
                |run, par, _, _| {
                    par.for_each(plan.tasks(), |task| {
                        for i in plan.task(task) {
                            if !stepping(i) || first_error.is_set() {
                                continue;
                            }
                            let outcome = update_lent(feed, i, fed[i].len, chunk_len, par, run);
                            match outcome {
                                Ok(()) => fed[i].updated.store(true, Ordering::Relaxed),
                                Err(e) => first_error.record(i, e),
                            }
                        }
                    });
                },
            )?;
            Ok(match update {
                Updated::Skipped(report) => report,
                Updated::Applied { grad_norm } => {
                    let updated = |t: usize| fed[t].updated.load(Ordering::Relaxed);
                    let report = finish(&mut self.state, fed.len(), updated, grad_norm);
                    first_error.into_result().map(|()| report)?
                }
            })
        });
        self.feed_plan = Some(plan);
        result
    }

    /// The kernel tier and chunk length of a step.
    fn execution(&self) -> (Tier, usize) {
        (self.settings.backend.tier(), self.chunk_len())
    }

    /// What every step does once its gradients have been read (and summed, where `summed`):
    /// builds a kernel per class of tensors with `make`, decides on the gradients (skip, refuse,
    /// or how to scale them), makes the state ready for tensors of `lens` (and master weights
    /// for `captured` tensors of half-precision weights), then runs `apply` with what a task
    /// needs, the pool, the layout, and the plan of captured steps. The caller counts the step.
    ///
    /// # Errors
    /// Those of the kernels, the gradient check and the state allocation; nothing is modified
    /// then.
    fn update<K: Kernel<N> + Copy, const N: usize>(
        &mut self,
        lens: impl ExactSizeIterator<Item = usize> + Clone,
        stepping: &(dyn Fn(usize) -> bool + Sync),
        captured: Option<&[TensorRef]>,
        (common, make): (CommonConfig, impl Fn(GroupHyper) -> K),
        summed: bool,
        apply: impl FnOnce(&Run<'_, K, N>, Par<'_>, &Layout, &mut Option<Plan>),
    ) -> Result<Updated, StepError> {
        if K::TRUST {
            self.trust.fit(lens.clone());
        }
        let mut store = GroupKernels::Empty;
        let kernels = self.groups.kernels(
            &common,
            lens.len(),
            step_numbers(&self.state, stepping),
            &mut self.classes,
            make,
            &mut store,
        )?;
        let scale = match self.norm.decide(&self.settings, common.maximize, summed)? {
            GradCheck::Apply { scale, grad_norm } => (scale, grad_norm),
            GradCheck::Skip { grad_norm } => {
                return Ok(Updated::Skipped(skipped(&self.state, grad_norm)));
            }
        };
        let format = self.settings.state_format;
        let fill = (self.initial.as_slice(), self.maps.as_slice());
        if prepare_state(&mut self.state, lens, N, format, fill)? {
            self.plan = None;
        }
        match captured {
            Some(tensors) => prepare_master(&mut self.state, tensors, &stepping)?,
            // Fed tensors have `f32` weights: should one step with half-precision weights
            // again, it takes its master weights from them afresh (as in `prepare_master`).
            None => {
                for (i, ready) in self.state.master_ready.iter_mut().enumerate() {
                    *ready &= !stepping(i);
                }
            }
        }
        let compact = CompactRun::new(&mut self.state, &self.maps);
        let master = MasterPtr(
            self.state
                .master
                .as_mut()
                .map_or(core::ptr::null_mut(), |m| m.as_mut_ptr()),
        );
        let state = StatePtrs::new(&mut self.state.buffers);
        let layout = self.state.layout.as_ref().expect("prepared");
        let run = Run {
            tier: self.settings.backend.tier(),
            scale: scale.0,
            kernels,
            state,
            offsets: layout.offsets(),
            compact,
            master,
            trust: &self.trust,
        };
        apply(&run, par_of(&self.pool), layout, &mut self.plan);
        Ok(Updated::Applied { grad_norm: scale.1 })
    }

    /// Checks the tensor count and lengths against the layout (for a stateful optimizer,
    /// `buffers > 0`, or one holding state), and against the groups and names set.
    fn check_tensors(
        &self,
        lens: impl ExactSizeIterator<Item = usize> + Clone,
        buffers: usize,
    ) -> Result<(), StepError> {
        let stateful = buffers > 0 || !self.state.buffers.is_empty();
        if let (true, Some(layout)) = (stateful, self.layout()) {
            if layout.len() != lens.len() {
                return Err(StepError::TensorCount {
                    expected: layout.len(),
                    found: lens.len(),
                });
            }
            for (tensor, (&expected, found)) in layout.iter().zip(lens.clone()).enumerate() {
                if expected != found {
                    return Err(StepError::TensorLen {
                        tensor,
                        expected,
                        found,
                    });
                }
            }
        }
        if !self.names.is_empty() && self.names.len() != lens.len() {
            return Err(StepError::NameCount {
                names: self.names.len(),
                tensors: lens.len(),
            });
        }
        Ok(())
    }
}

/// What [`Engine::update`] did.
enum Updated {
    /// The step was skipped for a non-finite gradient (nothing changed).
    Skipped(StepReport),
    /// The update ran, with this gradient norm to report.
    Applied { grad_norm: Option<f32> },
}

/// The pool of an engine's steps: its own, or the caller's.
fn par_of(pool: &Option<OwnPool>) -> Par<'_> {
    pool.as_ref().map_or(Par::Current, |p| Par::Pool(p.pool()))
}

/// Lends tensor `i` (of `len` elements) from `feed` and updates it with `run`, split into spans
/// of `chunk_len` run on `par`.
///
/// # Errors
/// [`StepError::Feed`] if the feed fails, lends nothing, or lends another length.
fn update_lent<K: Kernel<N> + Copy, const N: usize>(
    feed: &dyn TensorFeed,
    i: usize,
    len: usize,
    chunk_len: usize,
    par: Par<'_>,
    run: &Run<'_, K, N>,
) -> Result<(), StepError> {
    let mut checked = None;
    let lent = feed.update(i, &mut |w, g| {
        if w.len() != len || g.len() != len {
            let message = format!(
                "it lent {} weights and {} gradients, but announced {len}",
                w.len(),
                g.len()
            );
            checked = Some(Err(feed_error(i, message)));
            return;
        }
        let tensor = TensorRef {
            w: w.as_mut_ptr(),
            w_len: len,
            g: g.as_ptr(),
            g_len: len,
            w_dtype: Dtype::F32,
            g_dtype: Dtype::F32,
        };
        if K::TRUST {
            // SAFETY: the tensor's weights and gradients are `len` long (checked above) and
            // borrowed for this call; the pass only reads.
            unsafe { run.measure_tensor(i, tensor, par, chunk_len) };
        }
        par.for_each(len.div_ceil(chunk_len), |s| {
            let start = s * chunk_len;
            // SAFETY: `start..start + len` lies inside the tensor's weights and gradients (both
            // `len` long, checked above), borrowed for this call, and inside its slice of every
            // state buffer (the layout has the same lengths). Spans are disjoint; so are tensors
            // of different tasks. The feed lends the gradient as a `&` beside the `&mut`
            // weights, so they do not overlap.
            unsafe { run.segment(i, tensor, start, chunk_len.min(len - start)) };
        });
        checked = Some(Ok(()));
    });
    lent.map_err(|e| feed_error(i, e.to_string()))
        .and_then(|()| {
            checked.unwrap_or_else(|| Err(feed_error(i, "it did not lend the tensor".into())))
        })
}

/// The chunk length the steps of optimizer `name` use under `settings`: the one set, or the
/// (tuned) default; for 8-bit state, rounded up to whole blocks.
pub(crate) fn chunk_len_for(name: &str, settings: &Settings) -> usize {
    let len = match settings.chunk_len {
        0 => tuning::default_chunk_len(name),
        n => n,
    };
    let unit = state::unit(settings.state_format);
    len.checked_next_multiple_of(unit)
        .unwrap_or(len / unit * unit)
}

/// The report of a step skipped for a non-finite gradient.
fn skipped(state: &State, grad_norm: f32) -> StepReport {
    StepReport {
        step: state.steps,
        skipped: true,
        grad_norm: Some(grad_norm),
    }
}

/// The error of the lowest-numbered tensor among those that failed, from several threads.
#[derive(Default)]
struct FirstError(Mutex<Option<(usize, StepError)>>, AtomicBool);

impl FirstError {
    /// Records tensor `tensor`'s error, kept if no lower tensor failed.
    fn record(&self, tensor: usize, error: StepError) {
        self.1.store(true, Ordering::Relaxed);
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if first.as_ref().is_none_or(|(t, _)| tensor < *t) {
            *first = Some((tensor, error));
        }
    }

    /// Whether a tensor failed.
    fn is_set(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }

    /// The error kept, if any.
    fn into_result(self) -> Result<(), StepError> {
        match self.0.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// Counts an applied step: once in all, and once for each tensor that `stepped`.
fn finish(
    state: &mut State,
    tensors: usize,
    stepped: impl Fn(usize) -> bool,
    grad_norm: Option<f32>,
) -> StepReport {
    state.steps += 1;
    for (t, count) in state.tensor_steps.iter_mut().enumerate().take(tensors) {
        *count += u64::from(stepped(t));
    }
    StepReport {
        step: state.steps,
        skipped: false,
        grad_norm,
    }
}

/// A rule's way into a step, over a captured list or a feed: the rule says how to build its
/// kernel, the runner runs the step.
pub trait StepRunner {
    /// The rule's running values after the steps applied before this one (the schedule-free
    /// rules' step count and averaging weights).
    fn clock(&self) -> Sums;

    /// Runs the step with the kernels `make` builds.
    ///
    /// # Errors
    /// Those of [`Engine::step`] or [`Engine::step_feed`].
    fn run<K: Kernel<N> + Copy, const N: usize>(
        self,
        common: CommonConfig,
        make: impl Fn(GroupHyper) -> K,
    ) -> Result<StepReport, StepError>;
}

/// A step over a captured list.
pub(crate) struct ListStep<'e, 'l, 't>(pub &'e mut Engine, pub &'l TensorList<'t>);

impl StepRunner for ListStep<'_, '_, '_> {
    fn clock(&self) -> Sums {
        self.0.state.sums
    }

    fn run<K: Kernel<N> + Copy, const N: usize>(
        self,
        common: CommonConfig,
        make: impl Fn(GroupHyper) -> K,
    ) -> Result<StepReport, StepError> {
        self.0.step(self.1, common, make)
    }
}

/// A step over a feed.
pub(crate) struct FeedStep<'e, 'f>(pub &'e mut Engine, pub &'f dyn TensorFeed);

impl StepRunner for FeedStep<'_, '_> {
    fn clock(&self) -> Sums {
        self.0.state.sums
    }

    fn run<K: Kernel<N> + Copy, const N: usize>(
        self,
        common: CommonConfig,
        make: impl Fn(GroupHyper) -> K,
    ) -> Result<StepReport, StepError> {
        self.0.step_feed(self.1, common, make)
    }
}

/// A [`StepError::Feed`].
fn feed_error(tensor: usize, message: String) -> StepError {
    StepError::Feed { tensor, message }
}

/// The step numbers of the tensors of `state`, those that step being `stepping`.
fn step_numbers<'a>(
    state: &'a State,
    stepping: &'a (dyn Fn(usize) -> bool + Sync),
) -> StepNumbers<'a> {
    match state.common_step() {
        Some(t) => StepNumbers::Same(t),
        None => StepNumbers::PerTensor {
            done: &state.tensor_steps,
            stepping,
        },
    }
}

/// Writes `values` as tensor `t`'s slice of state buffer `b`, encoded in the state's format
/// (bf16 rounded to nearest, 8-bit quantized block by block with `map`). The caller checks the
/// buffer, the tensor and the length.
fn encode_tensor(state: &mut State, b: usize, t: usize, values: &[f32], map: Map) {
    let format = state.format;
    let (raw, scales) = state.tensor_raw_mut(b, t);
    match format {
        StateFormat::Bf16 => {
            let out: &mut [u16] = bytemuck::cast_slice_mut(raw);
            for (o, &v) in out.iter_mut().zip(values) {
                *o = simd::Half::Bf16.round(v);
            }
        }
        StateFormat::Q8 => {
            let scales: &mut [f32] = bytemuck::cast_slice_mut(scales);
            for ((x, codes), scale) in values.chunks(BLOCK).zip(raw.chunks_mut(BLOCK)).zip(scales) {
                *scale = simd::compact::quantize(map, x, codes);
            }
        }
        _ => bytemuck::cast_slice_mut::<u8, f32>(raw).copy_from_slice(values),
    }
}

/// Makes layout, per-tensor step counts and `buffers` state buffers ready for tensors of
/// lengths `lens` (checked against the layout), and says whether the layout is new. A new
/// buffer `b` starts at `initial[b]` in every tensor's elements (encoded with `maps[b]`; 0 where
/// `initial` has no value), its padding at zero. Allocation failure is an error and leaves the
/// state as it was.
fn prepare_state(
    state: &mut State,
    lens: impl ExactSizeIterator<Item = usize> + Clone,
    buffers: usize,
    format: StateFormat,
    (initial, maps): (&[f32], &[Map]),
) -> Result<bool, StepError> {
    // Buffers held keep their format (`set_state_format` refuses another); a rule without
    // buffers keeps its layout in the plain unit whatever the setting.
    let format = if !state.buffers.is_empty() {
        state.format
    } else if buffers == 0 {
        StateFormat::F32
    } else {
        format
    };
    let unit = state::unit(format);
    let new_layout = !state
        .layout
        .as_ref()
        .is_some_and(|l| l.matches(lens.clone()) && l.unit() == unit);
    if new_layout {
        // First step, or a stateless optimizer seeing another layout: every tensor starts from
        // the steps taken so far (and takes its master weights afresh).
        state.master = None;
        state.master_ready.clear();
        let layout = Layout::aligned(lens.collect(), unit).ok_or(StepError::OutOfMemory {
            elements: usize::MAX,
        })?;
        state.tensor_steps = vec![state.steps; layout.lens().len()];
        state.layout = Some(layout);
    }
    let layout = state.layout.as_ref().expect("set above");
    if state.buffers.len() < buffers {
        // All or nothing: the state changes only once every new buffer is allocated.
        let words = state::words(format, layout.total());
        let first = state.buffers.len();
        let fresh = (first..buffers)
            .map(|_| state::zeroed_buffer(words))
            .collect::<Result<Vec<_>, _>>()?;
        state.buffers.extend(fresh);
        state.format = format;
        for b in first..buffers {
            let value = initial.get(b).copied().unwrap_or(0.0);
            if value != 0.0 {
                let map = maps.get(b).copied().unwrap_or(Map::Signed);
                let lens = state.layout.as_ref().expect("set above").lens().to_vec();
                for (t, len) in lens.into_iter().enumerate() {
                    encode_tensor(state, b, t, &vec![value; len], map);
                }
            }
        }
    }
    Ok(new_layout)
}

/// Makes master weights ready for every tensor `stepping` that has half-precision weights: the
/// master buffer exists, and a tensor's first such step (the first since it last stepped with
/// `f32` weights) copies its weights into it (exactly).
///
/// # Errors
/// [`StepError::OutOfMemory`] if the master buffer cannot be allocated; nothing changes then.
fn prepare_master(
    state: &mut State,
    tensors: &[TensorRef],
    stepping: &impl Fn(usize) -> bool,
) -> Result<(), StepError> {
    // A tensor stepping with f32 weights holds its truth in them: should it step with half
    // weights again, it takes its master weights from them afresh.
    for (i, t) in tensors.iter().enumerate() {
        if t.w_dtype == Dtype::F32
            && stepping(i)
            && let Some(ready) = state.master_ready.get_mut(i)
        {
            *ready = false;
        }
    }
    let half = |(i, t): &(usize, &TensorRef)| t.w_dtype != Dtype::F32 && stepping(*i);
    if !tensors.iter().enumerate().any(|p| half(&p)) {
        return Ok(());
    }
    let layout = state.layout.as_ref().expect("prepared");
    if state.master.is_none() {
        state.master = Some(state::zeroed_buffer(layout.total())?);
        state.master_ready = vec![false; tensors.len()];
    }
    let master = state.master.as_mut().expect("set above");
    for (i, t) in tensors.iter().enumerate() {
        if !half(&(i, t)) || state.master_ready[i] {
            continue;
        }
        let kind = hygiene::half_of(t.w_dtype);
        // SAFETY: `t.w` points to `t.w_len` 16-bit elements borrowed for this step.
        let bits = unsafe { core::slice::from_raw_parts(t.w.cast::<u16>(), t.w_len) };
        for (m, &b) in master[layout.range(i)].iter_mut().zip(bits) {
            *m = kind.to_f32(b);
        }
        state.master_ready[i] = true;
    }
    Ok(())
}

/// Checks tensor names: non-empty, without commas or line breaks (the state file lists them),
/// and distinct.
///
/// # Errors
/// [`StepError::InvalidName`] naming the first offender.
pub(crate) fn check_names<'n>(names: impl Iterator<Item = &'n str>) -> Result<(), StepError> {
    let mut seen = HashSet::new();
    for (tensor, name) in names.enumerate() {
        let bad = |reason| StepError::InvalidName {
            tensor,
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("is empty"));
        }
        if name.contains([',', '\n', '\r']) {
            return Err(bad("holds a comma or a line break"));
        }
        if !seen.insert(name) {
            return Err(bad("is given twice"));
        }
    }
    Ok(())
}

/// Everything a task needs to update a segment of a tensor.
struct Run<'a, K, const N: usize> {
    tier: Tier,
    scale: GradScale,
    kernels: Kernels<'a, K>,
    state: StatePtrs<N>,
    /// Where each tensor's slice starts in every state buffer.
    offsets: &'a [usize],
    /// Where compact state lives, when the state is not `f32`.
    compact: Option<CompactRun<N>>,
    /// The master weights (laid out as a state buffer), or null when no tensor has
    /// half-precision weights.
    master: MasterPtr,
    /// The norms trust-ratio kernels measure.
    trust: &'a TrustPass,
}

/// The master weights' base pointer, shared by the tasks of one step.
#[derive(Clone, Copy)]
struct MasterPtr(*mut f32);

// SAFETY: only dereferenced by the tasks of one step, which touch disjoint elements, while the
// step holds `&mut` of the state.
unsafe impl Send for MasterPtr {}
// SAFETY: as above.
unsafe impl Sync for MasterPtr {}

impl<K: Kernel<N> + Copy, const N: usize> Run<'_, K, N> {
    /// Updates elements `start..start + len` of tensor `tensor`, whose weights and gradients are
    /// `t`; a kernel that measures its tensors runs with the tensor's norms, measured before.
    ///
    /// # Safety
    /// `start..start + len` must lie inside the tensor's weights and gradients, valid for the
    /// call, and inside its slice of every state buffer; no other thread may touch these
    /// elements during the call; weights and gradients must not overlap.
    unsafe fn segment(&self, tensor: usize, t: TensorRef, start: usize, len: usize) {
        let (kernel, wd) = self.kernels.of(tensor);
        let trusted;
        let kernel = if K::TRUST && kernel.measures() {
            trusted = kernel.with_norms(self.trust.norms(tensor));
            &trusted
        } else {
            kernel
        };
        // SAFETY: the caller's contract.
        unsafe {
            let (prep, span, formats) = self.span(tensor, t, start, len, *wd);
            if K::SPLIT && kernel.measures() && formats.all_f32() {
                // The measuring pass updated the state (`simd::measure_span`).
                simd::apply_span(self.tier, kernel, span);
            } else {
                simd::update_span(self.tier, kernel, prep, span, formats);
            }
        }
    }

    /// The sums of squares of the two vectors tensor `tensor`'s kernel measures over elements
    /// `start..start + len` (a slice of the measuring pass); reads only.
    ///
    /// # Safety
    /// As [`segment`](Run::segment), for reads.
    unsafe fn measure(&self, tensor: usize, t: TensorRef, start: usize, len: usize) -> [f64; 2] {
        let (kernel, wd) = self.kernels.of(tensor);
        // SAFETY: the caller's contract.
        unsafe {
            let (prep, span, formats) = self.span(tensor, t, start, len, *wd);
            simd::measure_span(self.tier, kernel, prep, span, formats)
        }
    }

    /// Measures every tensor of `refs` that steps and whose kernel measures, slice by slice,
    /// each thread taking one contiguous run of slices; then records each one's norms.
    ///
    /// # Safety
    /// Every tensor of `refs` with a gradient valid for reads over its length, which is the
    /// layout's.
    unsafe fn measure_all(
        &self,
        par: Par<'_>,
        refs: &[TensorRef],
        stepping: &(dyn Fn(usize) -> bool + Sync),
        chunk_len: usize,
    ) {
        let measured = |t: usize| stepping(t) && self.kernels.of(t).0.measures();
        let slices = self.trust.slices();
        let per_thread = slices.len().div_ceil(par.threads()).max(1);
        let run = |task: usize| {
            let first = task * per_thread;
            for (i, &(t, start, len)) in slices.iter().enumerate().skip(first).take(per_thread) {
                if measured(t) {
                    // SAFETY: the slice lies inside tensor `t` (the plan was cut from the
                    // layout's lengths), valid for reads (caller's contract).
                    let sums = unsafe { self.measure(t, refs[t], start, len) };
                    self.trust.store(i, sums);
                }
            }
        };
        let tasks = slices.len().div_ceil(per_thread);
        if self.trust.elements() <= chunk_len {
            (0..tasks).for_each(run);
        } else {
            par.for_each(tasks, run);
        }
        (0..refs.len())
            .filter(|&t| measured(t))
            .for_each(|t| self.trust.finish(t));
    }

    /// Measures tensor `i` (lent as `tensor`) if its kernel measures, its slices spread over
    /// `par` when it is longer than `chunk_len`, and records its norms.
    ///
    /// # Safety
    /// The tensor valid for reads over its length, which is the layout's.
    unsafe fn measure_tensor(&self, i: usize, tensor: TensorRef, par: Par<'_>, chunk_len: usize) {
        if !self.kernels.of(i).0.measures() {
            return;
        }
        let range = self.trust.tensor_slices(i);
        let slices = &self.trust.slices()[range.clone()];
        let store = |s: usize| {
            let (_, start, len) = slices[s];
            // SAFETY: the slice lies inside the tensor (caller's contract).
            let sums = unsafe { self.measure(i, tensor, start, len) };
            self.trust.store(range.start + s, sums);
        };
        if tensor.w_len <= chunk_len {
            (0..slices.len()).for_each(store);
        } else {
            par.for_each(slices.len(), store);
        }
        self.trust.finish(i);
    }

    /// The gradient transform, span and formats of elements `start..start + len` of tensor
    /// `tensor` (weights and gradients `t`) with L2 decay `wd`.
    ///
    /// # Safety
    /// As [`segment`](Run::segment): the pointers are offset into the tensor and its state.
    unsafe fn span(
        &self,
        tensor: usize,
        t: TensorRef,
        start: usize,
        len: usize,
        wd: f32,
    ) -> (GradPrep, Span<N>, Formats<N>) {
        let prep = GradPrep {
            div: self.scale.div,
            factor: self.scale.factor,
            wd,
        };
        let at = self.offsets[tensor] + start;
        // SAFETY: the caller's contract; the state pointers are offset to the tensor's slice
        // (of `f32` state; compact state is reached through `compact`, at the same element);
        // half-precision weights and gradients hold 16-bit elements; a tensor with
        // half-precision weights has master weights (`prepare_master`).
        unsafe {
            let half = |d: Dtype| (d != Dtype::F32).then(|| hygiene::half_of(d));
            let formats = Formats {
                state: self.compact.map(|c| c.at(at)),
                grads: half(t.g_dtype).map(|k| (k, t.g.cast::<u16>().add(start))),
                weights: half(t.w_dtype).map(|k| (k, t.w.cast::<u16>().add(start))),
            };
            let span = Span {
                w: match formats.weights {
                    None => t.w.add(start),
                    Some(_) => self.master.0.add(at),
                },
                g: match formats.grads {
                    None => t.g.add(start),
                    Some(_) => core::ptr::null(),
                },
                s: match formats.state {
                    None => core::array::from_fn(|j| self.state.0[j].add(at)),
                    Some(_) => [core::ptr::null_mut(); N],
                },
                len,
            };
            (prep, span, formats)
        }
    }
}

/// Compact state of one step: each buffer's memory and map, and the seeds of stochastic
/// rounding.
#[derive(Clone, Copy)]
struct CompactRun<const N: usize> {
    format: StateFormat,
    /// Each buffer's memory, as bytes.
    bases: [*mut u8; N],
    /// Each buffer's block scales (8-bit state: after the codes).
    scales: [*mut f32; N],
    maps: [Map; N],
    /// Each buffer's seed for this step (bf16 state).
    seeds: [u32; N],
}

impl<const N: usize> CompactRun<N> {
    /// The compact state of `state`'s first `N` buffers (prepared), or `None` for `f32` state.
    fn new(state: &mut State, maps: &[Map]) -> Option<Self> {
        if state.format == StateFormat::F32 || N == 0 {
            return None;
        }
        let total = state.layout.as_ref().expect("prepared").total();
        let step = state.steps + 1;
        let mut it = state.buffers.iter_mut();
        let bases: [*mut u8; N] =
            core::array::from_fn(|_| it.next().expect("prepared").as_mut_ptr().cast());
        Some(CompactRun {
            format: state.format,
            bases,
            // SAFETY (of the pointer arithmetic): an 8-bit buffer holds `total` bytes of codes,
            // then the scales; for other formats the pointer is not used (`wrapping_add`).
            scales: bases.map(|b| b.wrapping_add(total).cast()),
            maps: core::array::from_fn(|j| maps.get(j).copied().unwrap_or(Map::Signed)),
            seeds: core::array::from_fn(|j| simd::compact::seed(step, j, 0)),
        })
    }

    /// The compact state of the span starting at layout element `at` (for 8-bit state, on a
    /// block boundary).
    ///
    /// # Safety
    /// `at` must lie inside the layout.
    unsafe fn at(self, at: usize) -> CompactState<N> {
        // SAFETY: the caller's contract; the buffers hold every layout element in their format.
        unsafe {
            match self.format {
                StateFormat::Q8 => CompactState::Q8 {
                    codes: self.bases.map(|b| b.add(at)),
                    scales: self.scales.map(|s| s.add(at / BLOCK)),
                    maps: self.maps,
                },
                _ => CompactState::Bf16 {
                    s: self.bases.map(|b| b.cast::<u16>().add(at)),
                    seeds: self.seeds,
                    index: at as u32,
                },
            }
        }
    }
}

// SAFETY: only dereferenced by the tasks of one step, which touch disjoint elements (and, for
// 8-bit state, disjoint blocks), while the step holds `&mut` of the state buffers.
unsafe impl<const N: usize> Send for CompactRun<N> {}
// SAFETY: as above.
unsafe impl<const N: usize> Sync for CompactRun<N> {}

/// The state buffers' base pointers, shared by the tasks of one step.
#[derive(Clone, Copy)]
struct StatePtrs<const N: usize>([*mut f32; N]);

impl<const N: usize> StatePtrs<N> {
    /// The first `N` buffers of `buffers` (a prepared state has at least `N`).
    fn new(buffers: &mut [state::StateBuf]) -> Self {
        let mut it = buffers.iter_mut();
        StatePtrs(core::array::from_fn(|_| {
            it.next().expect("prepared").as_mut_ptr()
        }))
    }
}

// SAFETY: only dereferenced by the tasks of one step, which touch disjoint elements, while the
// step holds `&mut` of the state buffers.
unsafe impl<const N: usize> Send for StatePtrs<N> {}
// SAFETY: as above.
unsafe impl<const N: usize> Sync for StatePtrs<N> {}
