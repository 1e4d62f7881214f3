//! A step's input: the caller's weight and gradient slices, captured once each at the start of
//! the step ([`TensorList`]), or lent one tensor at a time ([`TensorFeed`]).

use crate::types::{Dtype, Element, StepError};
use core::marker::PhantomData;

/// One tensor of a step: its weights and gradients as pointer and length (in elements of their
/// dtypes), taken from the caller's borrows. `g` is null where the tensor has no gradient this
/// step. The pointers are typed `f32` but point to elements of `w_dtype` and `g_dtype`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorRef {
    pub w: *mut f32,
    pub w_len: usize,
    pub g: *const f32,
    pub g_len: usize,
    pub w_dtype: Dtype,
    pub g_dtype: Dtype,
}

/// A tensor's gradients as the norm pass reads them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GradView<'a> {
    F32(&'a [f32]),
    /// Half-precision bits and their format.
    Half(Dtype, &'a [u16]),
}

impl TensorRef {
    /// Whether the tensor has a gradient this step.
    pub(crate) fn has_grad(&self) -> bool {
        !self.g.is_null()
    }
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
    _borrows: PhantomData<(&'a mut [u8], &'a [u8])>,
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

    /// Appends tensors, `None` for one without a gradient. A tensor's two slices may have
    /// different lengths: the step refuses that.
    pub(crate) fn extend(
        &mut self,
        tensors: impl Iterator<Item = (&'a mut [f32], Option<&'a [f32]>)>,
    ) {
        self.extend_typed(tensors);
    }

    /// Appends tensors of any element types, `None` for one without a gradient.
    pub(crate) fn extend_typed<W: Element, G: Element>(
        &mut self,
        tensors: impl Iterator<Item = (&'a mut [W], Option<&'a [G]>)>,
    ) {
        self.tensors.extend(tensors.map(|(w, g)| TensorRef {
            w: w.as_mut_ptr().cast(),
            w_len: w.len(),
            g: g.map_or(core::ptr::null(), |g| g.as_ptr().cast()),
            g_len: g.map_or(0, <[G]>::len),
            w_dtype: W::DTYPE,
            g_dtype: G::DTYPE,
        }));
    }

    /// Appends tensors given by address.
    ///
    /// # Safety
    /// Each tensor's pointers must be valid for `'a` as the borrows of
    /// [`extend_typed`](TensorList::extend_typed) are: non-null, aligned, `w_len` elements of
    /// `w_dtype` (read and written by the step only) and `g_len` of `g_dtype` (null: no
    /// gradient; read only), the weights overlapping no other buffer of the step.
    pub(crate) unsafe fn extend_refs(&mut self, tensors: impl Iterator<Item = TensorRef>) {
        self.tensors.extend(tensors);
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

    /// Tensor `t`'s gradients, if it has any.
    pub(crate) fn grads(&self, t: usize) -> Option<GradView<'_>> {
        let r = self.tensors[t];
        if !r.has_grad() {
            return None;
        }
        // SAFETY: a non-null `g` and `g_len` come from a `&'a [G]` of `g_dtype` elements
        // (`extend_typed`), which outlives `self`; half-precision types are 16-bit numbers.
        Some(unsafe {
            match r.g_dtype {
                Dtype::F32 => GradView::F32(core::slice::from_raw_parts(r.g, r.g_len)),
                kind => GradView::Half(kind, core::slice::from_raw_parts(r.g.cast(), r.g_len)),
            }
        })
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
        list.extend(self.0.iter_mut().map(|(w, g)| (&mut **w, Some(&**g))));
        Ok(())
    }
}

/// The two lists of [`step_all`](crate::Fused::step_all): every weight tensor, then every
/// gradient tensor.
pub(crate) struct Lists<'a, W, G> {
    pub weights: &'a mut [W],
    pub grads: &'a [G],
}

/// The number of weight tensors against the number of gradient slots.
fn check_counts(weights: usize, grads: usize) -> Result<(), StepError> {
    if weights == grads {
        Ok(())
    } else {
        Err(StepError::GradCount { weights, grads })
    }
}

impl<W: AsMut<[f32]>, G: AsRef<[f32]>> TensorSource for Lists<'_, W, G> {
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        check_counts(self.weights.len(), self.grads.len())?;
        // Each `as_mut`/`as_ref` is called once, so what the step checks is what it writes.
        let pairs = self.weights.iter_mut().zip(self.grads);
        list.extend(pairs.map(|(w, g)| (w.as_mut(), Some(g.as_ref()))));
        Ok(())
    }
}

/// The lists of [`step_partial`](crate::Fused::step_partial): every weight tensor, and a
/// gradient for each or `None`.
pub(crate) struct PartialLists<'a, W, G> {
    pub weights: &'a mut [W],
    pub grads: &'a [Option<G>],
}

impl<W: AsMut<[f32]>, G: AsRef<[f32]>> TensorSource for PartialLists<'_, W, G> {
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        check_counts(self.weights.len(), self.grads.len())?;
        let pairs = self.weights.iter_mut().zip(self.grads);
        list.extend(pairs.map(|(w, g)| (w.as_mut(), g.as_ref().map(AsRef::as_ref))));
        Ok(())
    }
}

/// [`Lists`] of any element types: weights of `E`, gradients of `F`.
pub(crate) struct TypedLists<'a, E, F, W, G> {
    pub weights: &'a mut [W],
    pub grads: &'a [G],
    pub types: PhantomData<(E, F)>,
}

impl<E: Element, F: Element, W: AsMut<[E]>, G: AsRef<[F]>> TensorSource
    for TypedLists<'_, E, F, W, G>
{
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        check_counts(self.weights.len(), self.grads.len())?;
        let pairs = self.weights.iter_mut().zip(self.grads);
        list.extend_typed(pairs.map(|(w, g)| (w.as_mut(), Some(g.as_ref()))));
        Ok(())
    }
}

/// [`PartialLists`] of any element types.
pub(crate) struct TypedPartialLists<'a, E, F, W, G> {
    pub weights: &'a mut [W],
    pub grads: &'a [Option<G>],
    pub types: PhantomData<(E, F)>,
}

impl<E: Element, F: Element, W: AsMut<[E]>, G: AsRef<[F]>> TensorSource
    for TypedPartialLists<'_, E, F, W, G>
{
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        check_counts(self.weights.len(), self.grads.len())?;
        let pairs = self.weights.iter_mut().zip(self.grads);
        list.extend_typed(pairs.map(|(w, g)| (w.as_mut(), g.as_ref().map(AsRef::as_ref))));
        Ok(())
    }
}

/// What stops a [`TensorFeed`] from lending a tensor.
pub type FeedError = Box<dyn std::error::Error + Send + Sync>;

/// A model's tensors lent one at a time, for [`Optimizer::step_feed`](crate::Optimizer::step_feed):
/// for trainers that can reach a tensor's memory only inside a call (a lock guard, a callback),
/// so that no step needs every tensor borrowed at once.
///
/// A fed step reads every gradient first, each through one call of
/// [`grad`](TensorFeed::grad) (to check lengths before anything changes, learn which tensors
/// have none, and take the global norm where clipping or the non-finite check needs it), then
/// updates each tensor that has one through one call of [`update`](TensorFeed::update). Both
/// phases run tasks of tensors on several threads at once (small tensors packed into one task),
/// and a large tensor's work is split across threads inside its call.
///
/// ```
/// use fusedopt::{Adam, AdamConfig, FeedError, Optimizer, TensorFeed};
/// use std::sync::Mutex;
///
/// /// Tensors behind locks: each is reachable only while its lock is held.
/// struct Locked {
///     weights: Vec<Mutex<Vec<f32>>>,
///     grads: Vec<Option<Vec<f32>>>,
/// }
///
/// impl TensorFeed for Locked {
///     fn tensor_count(&self) -> usize {
///         self.weights.len()
///     }
///     fn tensor_len(&self, tensor: usize) -> usize {
///         self.weights[tensor].lock().unwrap().len()
///     }
///     fn grad(&self, tensor: usize, read: &mut dyn FnMut(Option<&[f32]>)) -> Result<(), FeedError> {
///         read(self.grads[tensor].as_deref());
///         Ok(())
///     }
///     fn update(&self, tensor: usize, update: &mut dyn FnMut(&mut [f32], &[f32])) -> Result<(), FeedError> {
///         let grad = self.grads[tensor].as_deref().ok_or("no gradient")?;
///         update(&mut self.weights[tensor].lock().unwrap(), grad);
///         Ok(())
///     }
/// }
///
/// let model = Locked {
///     weights: vec![Mutex::new(vec![1.0; 4]), Mutex::new(vec![1.0; 2])],
///     grads: vec![Some(vec![0.5; 4]), None], // the second tensor has no gradient this step
/// };
/// let mut opt = Adam::new(AdamConfig::default());
/// opt.step_feed(&model)?;
/// assert!(model.weights[0].lock().unwrap()[0] < 1.0);
/// assert_eq!(*model.weights[1].lock().unwrap(), [1.0, 1.0]);
/// assert_eq!(opt.tensor_steps(), [1, 0]);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub trait TensorFeed: Sync {
    /// The number of tensors.
    fn tensor_count(&self) -> usize;

    /// The number of elements of tensor `tensor` (its weights).
    fn tensor_len(&self, tensor: usize) -> usize;

    /// Lends tensor `tensor`'s gradient to `read`, or `None` when the tensor has no gradient this
    /// step. Called once per tensor per step, possibly from several threads at once for
    /// different tensors.
    ///
    /// # Errors
    /// Whatever keeps the feed from lending it; the step is then refused and nothing is
    /// modified.
    fn grad(&self, tensor: usize, read: &mut dyn FnMut(Option<&[f32]>)) -> Result<(), FeedError>;

    /// Lends tensor `tensor`'s weights, mutably, and the same gradient as [`grad`](TensorFeed::grad)
    /// did, to `update`. Called once per step for every tensor that has a gradient, possibly from
    /// several threads at once for different tensors.
    ///
    /// # Errors
    /// Whatever keeps the feed from lending it. The update phase cannot be undone: tensors
    /// updated before the error stay updated, and the step reports the error.
    fn update(
        &self,
        tensor: usize,
        update: &mut dyn FnMut(&mut [f32], &[f32]),
    ) -> Result<(), FeedError>;
}
