//! A step's input: the caller's weight and gradient slices, captured once each at the start of
//! the step, however the caller holds them.

use crate::types::StepError;
use core::marker::PhantomData;

/// One tensor of a step: its weights and gradients as pointer and length, taken from the
/// caller's borrows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorRef {
    pub w: *mut f32,
    pub w_len: usize,
    pub g: *const f32,
    pub g_len: usize,
}

// SAFETY: a `TensorRef` only carries addresses; reading them is harmless. Every dereference is
// an `unsafe` block of the step that captured it, while that step still holds the borrows, and
// concurrent tasks of a step touch disjoint elements (see `Engine::dispatch`).
unsafe impl Send for TensorRef {}
// SAFETY: as above.
unsafe impl Sync for TensorRef {}

/// The tensors of one step, each captured once from borrows that outlive `'a`.
///
/// Built on a reused buffer, so capturing allocates nothing once the buffer has grown to the
/// model's tensor count.
#[derive(Debug)]
pub struct TensorList<'a> {
    tensors: Vec<TensorRef>,
    _borrows: PhantomData<(&'a mut [f32], &'a [f32])>,
}

impl<'a> TensorList<'a> {
    /// An empty list on the storage of `buf` (its contents are dropped).
    pub(crate) fn new(mut buf: Vec<TensorRef>) -> Self {
        buf.clear();
        TensorList {
            tensors: buf,
            _borrows: PhantomData,
        }
    }

    /// Appends tensors. A tensor's two slices may have different lengths: the step refuses that.
    pub(crate) fn extend(&mut self, tensors: impl Iterator<Item = (&'a mut [f32], &'a [f32])>) {
        self.tensors.extend(tensors.map(|(w, g)| TensorRef {
            w: w.as_mut_ptr(),
            w_len: w.len(),
            g: g.as_ptr(),
            g_len: g.len(),
        }));
    }

    /// The storage, emptied, for the next step.
    pub(crate) fn into_buf(mut self) -> Vec<TensorRef> {
        self.tensors.clear();
        self.tensors
    }

    /// The captured tensors.
    pub(crate) fn refs(&self) -> &[TensorRef] {
        &self.tensors
    }

    /// Number of tensors.
    pub(crate) fn len(&self) -> usize {
        self.tensors.len()
    }

    /// The weight lengths, in order.
    pub(crate) fn lens(&self) -> impl ExactSizeIterator<Item = usize> + Clone + '_ {
        self.tensors.iter().map(|t| t.w_len)
    }

    /// Tensor `t`'s gradients.
    pub(crate) fn grads(&self, t: usize) -> &[f32] {
        let r = self.tensors[t];
        // SAFETY: `g` and `g_len` come from a `&'a [f32]` (`push`), which outlives `self`.
        unsafe { core::slice::from_raw_parts(r.g, r.g_len) }
    }
}

/// Where a step's tensors come from. Object safe, so that [`Optimizer`](crate::Optimizer) can
/// take any source through one method.
pub trait TensorSource {
    /// Captures every tensor into `list`, in order, each borrowed for `'s`.
    ///
    /// # Errors
    /// [`StepError::GradCount`] if the source has another number of gradient tensors than weight
    /// tensors; nothing is captured then.
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError>;
}

/// The `(weights, grads)` pairs of [`step_many`](crate::Optimizer::step_many).
pub(crate) struct Pairs<'p, 'w, 'g>(pub &'p mut [(&'w mut [f32], &'g [f32])]);

impl TensorSource for Pairs<'_, '_, '_> {
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        list.extend(self.0.iter_mut().map(|(w, g)| (&mut **w, &**g)));
        Ok(())
    }
}

/// The two lists of [`step_all`](crate::Fused::step_all): every weight tensor, then every
/// gradient tensor.
pub(crate) struct Lists<'a, W, G> {
    pub weights: &'a mut [W],
    pub grads: &'a [G],
}

impl<W: AsMut<[f32]>, G: AsRef<[f32]>> TensorSource for Lists<'_, W, G> {
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        if self.weights.len() != self.grads.len() {
            return Err(StepError::GradCount {
                weights: self.weights.len(),
                grads: self.grads.len(),
            });
        }
        // Each `as_mut`/`as_ref` is called once, so what the step checks is what it writes.
        let pairs = self.weights.iter_mut().zip(self.grads);
        list.extend(pairs.map(|(w, g)| (w.as_mut(), g.as_ref())));
        Ok(())
    }
}
