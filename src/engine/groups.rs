//! Parameter groups: per-tensor overrides of the learning rate and weight decay, and the kernels
//! a step builds for them: one per distinct group, or, once tensors have taken different numbers
//! of steps, one per distinct (group, step number).

use crate::types::{ParamGroup, StepError};
use std::collections::HashMap;

/// What every optimizer's configuration says about the parts of a step the engine fuses in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommonConfig {
    /// The configuration's learning rate.
    pub lr: f32,
    /// The configuration's weight decay.
    pub weight_decay: f32,
    /// Negate the gradients (ascend).
    pub maximize: bool,
    /// Apply weight decay as an L2 term on the gradient (`g ← g + wd·w`). `false` where the
    /// kernel applies it itself (AdamW's decoupled decay).
    pub l2_decay: bool,
}

impl CommonConfig {
    /// The usual case: weight decay as an L2 term on the gradient.
    pub(crate) fn l2(lr: f32, weight_decay: f32, maximize: bool) -> CommonConfig {
        CommonConfig {
            lr,
            weight_decay,
            maximize,
            l2_decay: true,
        }
    }
}

/// What an optimizer builds one kernel from: the hyperparameters of a parameter group, resolved
/// from the [`CommonConfig`] and the group's overrides, and the step number of its tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupHyper {
    /// Learning rate of the group.
    pub lr: f32,
    /// Weight decay of the group.
    pub weight_decay: f32,
    /// The step the tensors take: 1 for their first (Adam's bias correction uses it).
    pub t: u64,
}

/// Checks the values of per-tensor overrides.
///
/// # Errors
/// [`StepError::InvalidGroup`] naming the first tensor whose override is out of range.
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

/// The kernels of a step, and which one each tensor runs.
pub(crate) struct Kernels<'s, K> {
    /// Kernel and L2 decay of every class of tensors.
    kernels: &'s [(K, f32)],
    /// Each tensor's class (empty: all use the first).
    index: &'s [usize],
}

impl<K> Kernels<'_, K> {
    /// The kernel and L2 decay of tensor `tensor`.
    pub(crate) fn of(&self, tensor: usize) -> &(K, f32) {
        &self.kernels[self.index.get(tensor).map_or(0, |&i| i)]
    }
}

/// The step number each tensor of a step takes.
#[derive(Clone, Copy)]
pub(crate) enum StepNumbers<'a> {
    /// Every tensor takes step `t`.
    Same(u64),
    /// Tensor `i` has taken `done[i]` steps, and takes one now if `stepping(i)`.
    PerTensor {
        done: &'a [u64],
        stepping: &'a (dyn Fn(usize) -> bool + Sync),
    },
}

/// The classes of tensors that share a kernel, when tensors are at different steps; kept
/// between steps so that sorting allocates nothing once grown.
#[derive(Debug, Default)]
pub(crate) struct KernelClasses {
    /// Distinct (group, step number) pairs.
    keys: Vec<(Option<usize>, u64)>,
    /// Each tensor's position in `keys` (0 for a tensor that does not step).
    index: Vec<usize>,
    seen: HashMap<(Option<usize>, u64), usize>,
}

impl KernelClasses {
    /// Sorts tensors `0..tensors` into classes by `key`, skipping those that do not step.
    fn sort(
        &mut self,
        tensors: usize,
        key: impl Fn(usize) -> (Option<usize>, u64),
        stepping: &dyn Fn(usize) -> bool,
    ) {
        self.keys.clear();
        self.seen.clear();
        self.index.clear();
        for i in 0..tensors {
            let class = if stepping(i) {
                *self.seen.entry(key(i)).or_insert_with(|| {
                    self.keys.push(key(i));
                    self.keys.len() - 1
                })
            } else {
                0
            };
            self.index.push(class);
        }
    }
}

/// Per-tensor [`ParamGroup`]s, stored once per distinct group.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Groups {
    /// As set, one per tensor; empty when none are set.
    per_tensor: Vec<ParamGroup>,
    /// The distinct groups of `per_tensor`.
    distinct: Vec<ParamGroup>,
    /// For each tensor, its group's index in `distinct`.
    index: Vec<usize>,
}

/// How many distinct parameter groups a step builds kernels for without allocating.
pub(crate) const INLINE_GROUPS: usize = 32;

/// Storage for the kernels of one step with their L2 weight decay, one per distinct parameter
/// group: one without groups, up to [`INLINE_GROUPS`] in place, more on the heap. The step owns
/// it on its stack and [`Groups::kernels`] fills it, so nothing large is moved.
pub(crate) enum GroupKernels<K> {
    Empty,
    One([(K, f32); 1]),
    Inline([(K, f32); INLINE_GROUPS], usize),
    Heap(Vec<(K, f32)>),
}

impl<K> GroupKernels<K> {
    /// Kernel and L2 weight decay of every distinct group.
    fn as_slice(&self) -> &[(K, f32)] {
        match self {
            GroupKernels::Empty => &[],
            GroupKernels::One(k) => k,
            GroupKernels::Inline(k, len) => &k[..*len],
            GroupKernels::Heap(k) => k,
        }
    }
}

impl Groups {
    /// The groups `per_tensor` (checked by the caller with [`check_groups`]).
    pub(crate) fn new(per_tensor: &[ParamGroup]) -> Groups {
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

    /// The groups as set, one per tensor; empty when none are set.
    pub(crate) fn per_tensor(&self) -> &[ParamGroup] {
        &self.per_tensor
    }

    /// The learning rate and weight decay of distinct group `g`, or the configuration's
    /// without groups (`None`).
    fn resolve(&self, common: &CommonConfig, g: Option<usize>) -> Result<(f32, f32), StepError> {
        let Some(g) = g.map(|g| self.distinct[g]) else {
            return Ok((common.lr, common.weight_decay));
        };
        let lr = common.lr * g.lr_scale;
        if !lr.is_finite() {
            let tensor = self.per_tensor.iter().position(|p| *p == g).unwrap_or(0);
            return Err(StepError::InvalidGroup {
                tensor,
                field: "lr_scale",
                value: g.lr_scale,
                expected: "such that lr·lr_scale is finite",
            });
        }
        Ok((lr, g.weight_decay.unwrap_or(common.weight_decay)))
    }

    /// Builds, into `store`, the kernel of every class of tensors that share hyperparameters: one
    /// per distinct group (one when none are set) while every tensor is at the same step
    /// (`steps`), else one per distinct (group, step) among the tensors that step (`classes`).
    /// Returns the kernels with their L2 decay, and each tensor's kernel (empty: all use the
    /// first).
    ///
    /// # Errors
    /// [`StepError::GroupCount`] if groups are set for another number of tensors than the step's
    /// `tensors`; [`StepError::InvalidGroup`] if a group's `lr · lr_scale` overflows.
    pub(crate) fn kernels<'s, K: Copy>(
        &'s self,
        common: &CommonConfig,
        tensors: usize,
        steps: StepNumbers<'_>,
        classes: &'s mut KernelClasses,
        make: impl Fn(GroupHyper) -> K,
        store: &'s mut GroupKernels<K>,
    ) -> Result<Kernels<'s, K>, StepError> {
        if !self.per_tensor.is_empty() && self.per_tensor.len() != tensors {
            return Err(StepError::GroupCount {
                groups: self.per_tensor.len(),
                tensors,
            });
        }
        let build = |g: Option<usize>, t: u64| {
            let (lr, weight_decay) = self.resolve(common, g)?;
            let l2 = if common.l2_decay { weight_decay } else { 0.0 };
            Ok((
                make(GroupHyper {
                    lr,
                    weight_decay,
                    t,
                }),
                l2,
            ))
        };
        let group = |tensor: usize| (!self.index.is_empty()).then(|| self.index[tensor]);
        let (keys, index): (&[(Option<usize>, u64)], &[usize]) = match steps {
            StepNumbers::Same(t) if self.per_tensor.is_empty() => {
                *store = GroupKernels::One([build(None, t)?]);
                return Ok(Kernels {
                    kernels: store.as_slice(),
                    index: &[],
                });
            }
            StepNumbers::Same(t) => {
                classes.keys.clear();
                classes
                    .keys
                    .extend((0..self.distinct.len()).map(|g| (Some(g), t)));
                (&classes.keys, &self.index)
            }
            StepNumbers::PerTensor { done, stepping } => {
                classes.sort(tensors, |i| (group(i), done[i] + 1), stepping);
                (&classes.keys, &classes.index)
            }
        };
        if keys.len() > INLINE_GROUPS {
            let kernels = keys.iter().map(|&(g, t)| build(g, t));
            *store = GroupKernels::Heap(kernels.collect::<Result<_, _>>()?);
        } else if let Some(&(g, t)) = keys.first() {
            *store = GroupKernels::Inline([build(g, t)?; INLINE_GROUPS], keys.len());
            if let GroupKernels::Inline(inline, _) = store {
                for (slot, &(g, t)) in inline.iter_mut().zip(keys).skip(1) {
                    *slot = build(g, t)?;
                }
            }
        }
        Ok(Kernels {
            kernels: store.as_slice(),
            index,
        })
    }
}
