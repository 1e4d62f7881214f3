//! Memory lent by address: what the bindings (the C ABI, the Python package) share to step
//! buffers they know only as an address and a length. (In the crate's layers: above the
//! `Optimizer` trait, on which it builds.)
//!
//! [`RawTensors`] holds a model's weight and gradient buffers, checked once when they are set
//! (not null, aligned to their elements, inside the address space, no weights overlapping each
//! other or a gradient), and steps any [`Optimizer`] over them. Setting the same buffers again
//! checks nothing, so a trainer that passes the same memory every step pays for the checks once.
//!
//! ```
//! use fusedopt::raw::{RawError, RawTensors};
//! use fusedopt::{Dtype, Optimizer, OptimizerConfig};
//!
//! let mut opt = "sgd:lr=0.5".parse::<OptimizerConfig>()?.build();
//! let (mut w, g) = (vec![1.0f32; 4], vec![1.0f32; 4]);
//! let mut raw = RawTensors::default();
//! raw.set_weights(Dtype::F32, [(w.as_mut_ptr() as usize, w.len())])?;
//! raw.set_grads(Dtype::F32, [(g.as_ptr() as usize, g.len())], false)?;
//! // SAFETY: the buffers are live, of their dtype, and nothing else touches them during the step.
//! unsafe { raw.step(opt.as_mut())? };
//! assert_eq!(w, [0.5; 4]);
//!
//! // A gradient inside the weights is refused, and the buffers set before are kept.
//! let inside = w.as_ptr() as usize + 4;
//! let err = raw.set_grads(Dtype::F32, [(inside, 4)], false).unwrap_err();
//! assert!(matches!(err, RawError::Overlap { .. }), "{err}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::engine::{TensorList, TensorRef, TensorSource};
use crate::optimizer::Optimizer;
use crate::types::{Dtype, StepError, StepReport};
use core::fmt;

/// Which buffer of a tensor an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Its weights.
    Weights,
    /// Its gradients.
    Gradients,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Weights => "weights",
            Role::Gradients => "gradients",
        })
    }
}

/// Why buffers were refused by [`RawTensors::set_weights`] or [`RawTensors::set_grads`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RawError {
    /// A non-empty buffer is at address 0 (NULL).
    Null {
        /// The tensor.
        tensor: usize,
        /// Which of its buffers.
        role: Role,
    },
    /// A buffer's address is not a multiple of its elements' size.
    Misaligned {
        /// The tensor.
        tensor: usize,
        /// Which of its buffers.
        role: Role,
        /// The address.
        addr: usize,
        /// The size of an element, in bytes.
        size: usize,
    },
    /// A buffer would end beyond the address space (`isize::MAX` bytes).
    TooLarge {
        /// The tensor.
        tensor: usize,
        /// Which of its buffers.
        role: Role,
        /// The address.
        addr: usize,
        /// The number of elements.
        len: usize,
    },
    /// Tensor `tensor`'s weights share memory with `other`'s weights or gradients (gradients
    /// may share memory with each other: they are only read).
    Overlap {
        /// The tensor whose weights overlap.
        tensor: usize,
        /// What of `other` they overlap.
        other_role: Role,
        /// The other tensor.
        other: usize,
    },
    /// Another number of gradient buffers than weight buffers.
    Count {
        /// Weight buffers.
        weights: usize,
        /// Gradient buffers.
        grads: usize,
    },
    /// A tensor's gradient buffer has another length than its weights.
    Length {
        /// The tensor.
        tensor: usize,
        /// Its number of weights.
        weights: usize,
        /// Its number of gradients.
        grads: usize,
    },
}

impl fmt::Display for RawError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RawError::Null { tensor, role } => {
                write!(f, "the {role} of tensor {tensor} are NULL (address 0)")
            }
            RawError::Misaligned {
                tensor,
                role,
                addr,
                size,
            } => write!(
                f,
                "the {role} of tensor {tensor} at {addr:#x} are not aligned to their {size}-byte \
                 elements"
            ),
            RawError::TooLarge {
                tensor,
                role,
                addr,
                len,
            } => write!(
                f,
                "the {role} of tensor {tensor}, {len} elements at {addr:#x}, exceed the address \
                 space"
            ),
            RawError::Overlap {
                tensor,
                other_role,
                other,
            } => write!(
                f,
                "the weights of tensor {tensor} overlap the {other_role} of tensor {other} (they \
                 share memory): every tensor must own its weights"
            ),
            RawError::Count { weights, grads } => write!(
                f,
                "{grads} gradient buffers were given for {weights} weight buffers"
            ),
            RawError::Length {
                tensor,
                weights,
                grads,
            } => write!(
                f,
                "tensor {tensor}: weights have {weights} elements but grads have {grads}"
            ),
        }
    }
}

impl std::error::Error for RawError {}

/// One buffer: `len` elements of `size` bytes from `addr`. Address 0 is a missing gradient (or
/// an empty buffer).
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

    /// Whether the two share a byte.
    fn overlaps(self, other: Span) -> bool {
        self.len > 0 && other.len > 0 && self.addr < other.end() && other.addr < self.end()
    }

    /// The buffer at `addr` of `len` elements of `dtype`, checked.
    fn checked(
        tensor: usize,
        role: Role,
        addr: usize,
        len: usize,
        dtype: Dtype,
    ) -> Result<Span, RawError> {
        let size = dtype.size();
        if len == 0 {
            return Ok(Span { addr, len, size });
        }
        if addr == 0 {
            return Err(RawError::Null { tensor, role });
        }
        if !addr.is_multiple_of(size) {
            return Err(RawError::Misaligned {
                tensor,
                role,
                addr,
                size,
            });
        }
        let fits = len
            .checked_mul(size)
            .and_then(|bytes| addr.checked_add(bytes))
            .is_some_and(|end| end <= isize::MAX as usize);
        if !fits {
            return Err(RawError::TooLarge {
                tensor,
                role,
                addr,
                len,
            });
        }
        Ok(Span { addr, len, size })
    }

    /// The pointer a step reads or writes: a dangling, aligned one for an empty buffer.
    fn ptr(self) -> usize {
        if self.len == 0 { self.size } else { self.addr }
    }
}

/// A model's weight and gradient buffers, lent by address, checked, and stepped by
/// [`step`](RawTensors::step). See the [module documentation](self).
#[derive(Debug, Clone, Default)]
pub struct RawTensors {
    weight_dtype: Dtype,
    grad_dtype: Dtype,
    weights: Vec<Span>,
    /// The non-empty weights sorted by address, with their tensor.
    by_addr: Vec<(Span, usize)>,
    /// The gradients of the weights held (`None`: the tensor has none this step); empty until
    /// set for them.
    grads: Vec<Option<Span>>,
}

impl RawTensors {
    /// Sets the weight buffers: tensor `i` is `weights[i] = (address, length)`, in elements of
    /// `dtype`. Checked in full unless they are the buffers held already; gradients set for
    /// other weights are dropped.
    ///
    /// ```
    /// use fusedopt::{Dtype, raw::RawTensors};
    /// let mut raw = RawTensors::default();
    /// assert!(raw.set_weights(Dtype::Bf16, [(0x1001, 4)]).is_err()); // odd address
    /// raw.set_weights(Dtype::F32, [(0x1000, 4), (0x2000, 0)])?;
    /// assert_eq!(raw.lens().collect::<Vec<_>>(), [4, 0]);
    /// # Ok::<(), fusedopt::raw::RawError>(())
    /// ```
    ///
    /// # Errors
    /// [`RawError::Null`], [`RawError::Misaligned`], [`RawError::TooLarge`] for a bad buffer,
    /// [`RawError::Overlap`] for weights sharing memory; the buffers held are then kept.
    pub fn set_weights(
        &mut self,
        dtype: Dtype,
        weights: impl IntoIterator<Item = (usize, usize), IntoIter: ExactSizeIterator + Clone>,
    ) -> Result<(), RawError> {
        let weights = weights.into_iter();
        let size = dtype.size();
        let same = dtype == self.weight_dtype
            && weights.len() == self.weights.len()
            && weights
                .clone()
                .zip(&self.weights)
                .all(|((addr, len), s)| s.addr == addr && s.len == len && s.size == size);
        if same {
            return Ok(());
        }
        let spans = weights
            .enumerate()
            .map(|(i, (addr, len))| Span::checked(i, Role::Weights, addr, len, dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let mut by_addr: Vec<(Span, usize)> = spans
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, s)| s.len > 0)
            .map(|(i, s)| (s, i))
            .collect();
        by_addr.sort_unstable_by_key(|(s, _)| s.addr);
        if let Some(pair) = by_addr.windows(2).find(|p| p[0].0.overlaps(p[1].0)) {
            let (i, j) = (pair[0].1, pair[1].1);
            return Err(RawError::Overlap {
                tensor: i.min(j),
                other_role: Role::Weights,
                other: i.max(j),
            });
        }
        self.weight_dtype = dtype;
        self.weights = spans;
        self.by_addr = by_addr;
        self.grads.clear();
        Ok(())
    }

    /// Sets the gradient buffers of the weights held: tensor `i`'s is `grads[i] = (address,
    /// length)` in elements of `dtype`. With `missing`, address 0 means that the tensor has no
    /// gradient this step (it is left alone, as [`step_partial`](crate::OptimizerExt::step_partial)
    /// does); without, a non-empty buffer at 0 is an error. Checked in full unless they are the
    /// buffers held already.
    ///
    /// ```
    /// use fusedopt::{Dtype, raw::{RawError, RawTensors}};
    /// let mut raw = RawTensors::default();
    /// raw.set_weights(Dtype::F32, [(0x1000, 4), (0x2000, 4)])?;
    /// raw.set_grads(Dtype::F32, [(0x3000, 4), (0, 4)], true)?; // the second has none
    /// let err = raw.set_grads(Dtype::F32, [(0x3000, 4), (0x1008, 4)], true).unwrap_err();
    /// assert_eq!(err.to_string(), "the weights of tensor 0 overlap the gradients of tensor 1 \
    ///     (they share memory): every tensor must own its weights");
    /// # Ok::<(), RawError>(())
    /// ```
    ///
    /// # Errors
    /// [`RawError::Count`] unless there is one per weight buffer, [`RawError::Length`] for a
    /// length other than its weights', [`RawError::Null`], [`RawError::Misaligned`],
    /// [`RawError::TooLarge`] for a bad buffer, [`RawError::Overlap`] for a gradient that
    /// shares memory with any weights; the buffers held are then kept.
    pub fn set_grads(
        &mut self,
        dtype: Dtype,
        grads: impl IntoIterator<Item = (usize, usize), IntoIter: ExactSizeIterator + Clone>,
        missing: bool,
    ) -> Result<(), RawError> {
        let grads = grads.into_iter();
        let size = dtype.size();
        // Whether the tensor has a gradient this step.
        let wanted = |addr: usize| !(missing && addr == 0);
        let same = dtype == self.grad_dtype
            && grads.len() == self.grads.len()
            && grads
                .clone()
                .zip(&self.grads)
                .all(|((addr, len), held)| match held {
                    None => !wanted(addr),
                    Some(s) => wanted(addr) && s.addr == addr && s.len == len && s.size == size,
                });
        if same {
            return Ok(());
        }
        if grads.len() != self.weights.len() {
            return Err(RawError::Count {
                weights: self.weights.len(),
                grads: grads.len(),
            });
        }
        let mut spans = Vec::with_capacity(grads.len());
        for (tensor, ((addr, len), w)) in grads.zip(&self.weights).enumerate() {
            if !wanted(addr) {
                spans.push(None);
                continue;
            }
            if len != w.len {
                return Err(RawError::Length {
                    tensor,
                    weights: w.len,
                    grads: len,
                });
            }
            let g = Span::checked(tensor, Role::Gradients, addr, len, dtype)?;
            // The last weights starting before the gradient ends are the only candidates: the
            // weights are disjoint and sorted.
            let before = self.by_addr.partition_point(|(s, _)| s.addr < g.end());
            if let Some(&(s, i)) = before.checked_sub(1).map(|k| &self.by_addr[k])
                && s.overlaps(g)
            {
                return Err(RawError::Overlap {
                    tensor: i,
                    other_role: Role::Gradients,
                    other: tensor,
                });
            }
            spans.push(Some(g));
        }
        self.grad_dtype = dtype;
        self.grads = spans;
        Ok(())
    }

    /// The number of weight buffers held.
    ///
    /// ```
    /// assert_eq!(fusedopt::raw::RawTensors::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether no weight buffers are held.
    ///
    /// ```
    /// assert!(fusedopt::raw::RawTensors::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The lengths of the weight buffers held, in elements.
    ///
    /// ```
    /// assert_eq!(fusedopt::raw::RawTensors::default().lens().count(), 0);
    /// ```
    pub fn lens(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.weights.iter().map(|s| s.len)
    }

    /// One step of `opt` over the buffers held, as
    /// [`step_partial_typed`](crate::OptimizerExt::step_partial_typed) over slices of them.
    ///
    /// # Safety
    /// Every buffer held must be live memory of its length in its dtype for the whole call,
    /// the weights not read or written and the gradients not written by anything else during
    /// it (the checks made when they were set cover the rest: alignment, extent, overlap).
    ///
    /// # Errors
    /// [`StepError::GradCount`] if no gradients were set for the weights held; then those of
    /// [`step_many`](Optimizer::step_many). On error nothing is modified.
    pub unsafe fn step(&self, opt: &mut dyn Optimizer) -> Result<StepReport, StepError> {
        opt.step_source(&mut Source(self))
    }
}

/// The buffers of a [`RawTensors`] as a step's tensors.
struct Source<'r>(&'r RawTensors);

impl TensorSource for Source<'_> {
    fn capture<'s>(&'s mut self, list: &mut TensorList<'s>) -> Result<(), StepError> {
        let raw = self.0;
        if raw.grads.len() != raw.weights.len() {
            return Err(StepError::GradCount {
                weights: raw.weights.len(),
                grads: raw.grads.len(),
            });
        }
        let refs = raw.weights.iter().zip(&raw.grads).map(|(w, g)| TensorRef {
            w: w.ptr() as *mut f32,
            w_len: w.len,
            g: g.map_or(core::ptr::null(), |g| g.ptr() as *const f32),
            g_len: g.map_or(0, |g| g.len),
            w_dtype: raw.weight_dtype,
            g_dtype: raw.grad_dtype,
        });
        // SAFETY: the caller of `RawTensors::step`, the only user of this source, vouches that
        // the buffers are live and unaliased for the step; they were checked aligned, inside the
        // address space and without weights overlapping anything when they were set.
        unsafe { list.extend_refs(refs) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(list: &[(usize, usize)]) -> Result<RawTensors, RawError> {
        let mut raw = RawTensors::default();
        raw.set_weights(Dtype::F32, list.iter().copied())?;
        Ok(raw)
    }

    fn grads(raw: &mut RawTensors, list: &[(usize, usize)]) -> Result<(), RawError> {
        raw.set_grads(Dtype::F32, list.iter().copied(), true)
    }

    #[test]
    fn overlaps_are_found_wherever_they_are() {
        let w = [(4000, 10), (1000, 10), (2000, 10)];
        let mut raw = weights(&w).unwrap();
        assert!(grads(&mut raw, &[(5000, 10), (6000, 10), (7000, 10)]).is_ok());
        // Gradients may share memory with each other.
        assert!(grads(&mut raw, &[(5000, 10), (5000, 10), (5004, 10)]).is_ok());
        // Touching is not overlapping.
        assert!(grads(&mut raw, &[(4040, 10), (960, 10), (1040, 10)]).is_ok());
        let overlap = |tensor, other_role, other| RawError::Overlap {
            tensor,
            other_role,
            other,
        };
        let e = grads(&mut raw, &[(5000, 10), (6000, 10), (2036, 10)]).unwrap_err();
        assert_eq!(e, overlap(2, Role::Gradients, 2));
        let e = grads(&mut raw, &[(992, 10), (6000, 10), (7000, 10)]).unwrap_err();
        assert_eq!(e, overlap(1, Role::Gradients, 0));
        // A gradient spanning other tensors' weights.
        let mut raw = weights(&[(1000, 2), (1100, 2), (5000, 100)]).unwrap();
        let e = grads(&mut raw, &[(2000, 2), (3000, 2), (996, 100)]).unwrap_err();
        assert_eq!(e, overlap(1, Role::Gradients, 2));
        let e = weights(&[(1000, 10), (1036, 10)]).unwrap_err();
        assert_eq!(e, overlap(0, Role::Weights, 1));
        // Empty buffers overlap nothing, and may be anywhere, NULL included.
        let mut raw = weights(&[(1000, 0), (1000, 10), (0, 0)]).unwrap();
        assert!(grads(&mut raw, &[(1000, 0), (5000, 10), (0, 0)]).is_ok());
    }

    #[test]
    fn bad_buffers_are_named() {
        assert_eq!(
            weights(&[(64, 1), (0, 3)]).unwrap_err(),
            RawError::Null {
                tensor: 1,
                role: Role::Weights
            }
        );
        let mut raw = RawTensors::default();
        let e = raw.set_weights(Dtype::Bf16, [(0x1001, 2)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the weights of tensor 0 at 0x1001 are not aligned to their 2-byte elements"
        );
        let e = weights(&[(64, usize::MAX / 4)]).unwrap_err();
        assert!(matches!(e, RawError::TooLarge { .. }), "{e}");
        let mut raw = weights(&[(64, 4)]).unwrap();
        assert_eq!(
            grads(&mut raw, &[(128, 4), (256, 4)]).unwrap_err(),
            RawError::Count {
                weights: 1,
                grads: 2
            }
        );
        assert_eq!(
            grads(&mut raw, &[(128, 3)]).unwrap_err(),
            RawError::Length {
                tensor: 0,
                weights: 4,
                grads: 3
            }
        );
        // Without `missing`, address 0 is NULL, not "no gradient".
        let e = raw.set_grads(Dtype::F32, [(0, 4)], false).unwrap_err();
        assert_eq!(
            e,
            RawError::Null {
                tensor: 0,
                role: Role::Gradients
            }
        );
    }

    #[test]
    fn a_refused_set_keeps_what_was_held() {
        let mut raw = weights(&[(64, 4)]).unwrap();
        grads(&mut raw, &[(128, 4)]).unwrap();
        assert!(raw.set_weights(Dtype::F32, [(64, 4), (66, 4)]).is_err());
        assert!(grads(&mut raw, &[(66, 4)]).is_err());
        assert_eq!((raw.len(), raw.grads[0].map(|g| g.addr)), (1, Some(128)));
        // New weights drop the gradients set for the old ones.
        raw.set_weights(Dtype::F32, [(64, 4), (4096, 4)]).unwrap();
        assert!(raw.grads.is_empty());
    }

    #[test]
    fn steps_go_through_the_optimizer() {
        let mut opt = crate::OptimizerConfig::default_for("sgd").unwrap().build();
        let (mut w, g) = ([1.0f32, 2.0, 3.0], [1.0f32; 3]);
        let mut raw = RawTensors::default();
        raw.set_weights(Dtype::F32, [(w.as_mut_ptr() as usize, 3), (8, 0)])
            .unwrap();
        // SAFETY: no gradients are set: the step is refused before any buffer is touched.
        let err = unsafe { raw.step(opt.as_mut()) }.unwrap_err();
        assert_eq!(
            err,
            StepError::GradCount {
                weights: 2,
                grads: 0
            }
        );
        raw.set_grads(Dtype::F32, [(g.as_ptr() as usize, 3), (0, 0)], true)
            .unwrap();
        // SAFETY: `w` and `g` are live and untouched during the step.
        unsafe { raw.step(opt.as_mut()) }.unwrap();
        assert_eq!(w, [0.99, 1.99, 2.99]);
        assert_eq!(opt.tensor_steps(), [1, 0]); // the empty tensor had no gradient
    }
}
