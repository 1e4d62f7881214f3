//! Parameter groups: per-tensor overrides of the learning rate and weight decay, and the kernels
//! a step builds for them, one per distinct group.

use crate::types::{ParamGroup, StepError};
use std::collections::HashMap;

/// What every optimizer's configuration says about the parts of a step the engine fuses in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CommonConfig {
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

/// The hyperparameters of one parameter group, resolved from the [`CommonConfig`] and the
/// group's overrides: what an optimizer builds a kernel from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GroupHyper {
    /// Learning rate of the group.
    pub lr: f32,
    /// Weight decay of the group.
    pub weight_decay: f32,
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

    /// For each tensor, its kernel's index in [`kernels`](Groups::kernels); empty without groups
    /// (every tensor uses kernel 0).
    pub(crate) fn kernel_index(&self) -> &[usize] {
        &self.index
    }

    /// Builds the kernel of every distinct group (one when none are set) with `make`, from its
    /// resolved hyperparameters, with the L2 decay that `common` asks for, into `store`.
    ///
    /// # Errors
    /// [`StepError::GroupCount`] if groups are set for another number of tensors than the step's
    /// `tensors`; [`StepError::InvalidGroup`] if a group's `lr · lr_scale` overflows.
    pub(crate) fn kernels<'s, K: Copy>(
        &self,
        common: &CommonConfig,
        tensors: usize,
        make: impl Fn(GroupHyper) -> K,
        store: &'s mut GroupKernels<K>,
    ) -> Result<&'s [(K, f32)], StepError> {
        let build = |h: GroupHyper| {
            let l2 = if common.l2_decay { h.weight_decay } else { 0.0 };
            (make(h), l2)
        };
        if self.per_tensor.is_empty() {
            *store = GroupKernels::One([build(GroupHyper {
                lr: common.lr,
                weight_decay: common.weight_decay,
            })]);
            return Ok(store.as_slice());
        }
        if self.per_tensor.len() != tensors {
            return Err(StepError::GroupCount {
                groups: self.per_tensor.len(),
                tensors,
            });
        }
        let kernel = |g: &ParamGroup| {
            let lr = common.lr * g.lr_scale;
            if !lr.is_finite() {
                let tensor = self.per_tensor.iter().position(|p| p == g).unwrap_or(0);
                return Err(StepError::InvalidGroup {
                    tensor,
                    field: "lr_scale",
                    value: g.lr_scale,
                    expected: "such that lr·lr_scale is finite",
                });
            }
            Ok(build(GroupHyper {
                lr,
                weight_decay: g.weight_decay.unwrap_or(common.weight_decay),
            }))
        };
        if self.distinct.len() > INLINE_GROUPS {
            *store =
                GroupKernels::Heap(self.distinct.iter().map(kernel).collect::<Result<_, _>>()?);
        } else {
            let first = kernel(&self.distinct[0])?;
            *store = GroupKernels::Inline([first; INLINE_GROUPS], self.distinct.len());
            if let GroupKernels::Inline(inline, _) = store {
                for (slot, g) in inline.iter_mut().zip(&self.distinct).skip(1) {
                    *slot = kernel(g)?;
                }
            }
        }
        Ok(store.as_slice())
    }
}
