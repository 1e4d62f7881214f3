//! Per-tensor trust ratios (LAMB, LARS): the norms a rule's kernel measures over each of its
//! tensors ([`Kernel::measure`](crate::simd::Kernel::measure)) before the update. A tensor is
//! measured in the fixed slices of the gradient norm ([`NORM_SLICE`](crate::plan::NORM_SLICE)),
//! whose sums are added in order, so its norms have the same bits for every thread count and
//! chunk length, and whether the tensors came in one list or one at a time.

use crate::plan::NormPlan;
use std::sync::atomic::{AtomicU64, Ordering};

/// The slices of the measuring pass and their sums, kept between steps. Sums and norms are
/// stored as the bits of f64s in atomics, so that the tasks of a step can write theirs.
#[derive(Debug, Default)]
pub(crate) struct TrustPass {
    plan: NormPlan,
    /// The two sums of squares of every slice.
    sums: Vec<[AtomicU64; 2]>,
    /// The two norms of every tensor, once measured.
    norms: Vec<[AtomicU64; 2]>,
}

impl TrustPass {
    /// Prepares the slices of tensors of lengths `lens`.
    pub(crate) fn fit(&mut self, lens: impl ExactSizeIterator<Item = usize> + Clone) {
        let n = lens.len();
        self.plan.fit(lens);
        let slices = self.plan.slices().len();
        self.sums.resize_with(slices, Default::default);
        self.norms.resize_with(n, Default::default);
    }

    /// (tensor, start, len) of every slice, in order.
    pub(crate) fn slices(&self) -> &[(usize, usize, usize)] {
        self.plan.slices()
    }

    /// The indices of tensor `t`'s slices.
    pub(crate) fn tensor_slices(&self, t: usize) -> core::ops::Range<usize> {
        self.plan.tensor_slices(t)
    }

    /// The number of elements of all tensors.
    pub(crate) fn elements(&self) -> usize {
        self.plan.elements()
    }

    /// Records the sums of squares of slice `i`.
    pub(crate) fn store(&self, i: usize, sums: [f64; 2]) {
        for (cell, s) in self.sums[i].iter().zip(sums) {
            cell.store(s.to_bits(), Ordering::Relaxed);
        }
    }

    /// Adds tensor `t`'s slice sums in order and records its two norms.
    pub(crate) fn finish(&self, t: usize) {
        let mut total = [0f64; 2];
        for i in self.tensor_slices(t) {
            for (acc, cell) in total.iter_mut().zip(&self.sums[i]) {
                *acc += f64::from_bits(cell.load(Ordering::Relaxed));
            }
        }
        for (cell, s) in self.norms[t].iter().zip(total) {
            cell.store(s.sqrt().to_bits(), Ordering::Relaxed);
        }
    }

    /// Tensor `t`'s two norms, as [`finish`](TrustPass::finish) recorded them.
    pub(crate) fn norms(&self, t: usize) -> [f64; 2] {
        self.norms[t]
            .each_ref()
            .map(|cell| f64::from_bits(cell.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NORM_SLICE;

    #[test]
    fn norms_add_the_slices_of_their_tensor_in_order() {
        let mut pass = TrustPass::default();
        pass.fit([NORM_SLICE + 1, 3].into_iter());
        assert_eq!(pass.slices().len(), 3);
        pass.store(0, [9.0, 1.0]);
        pass.store(1, [16.0, 3.0]);
        pass.store(2, [4.0, 0.0]);
        pass.finish(0);
        pass.finish(1);
        assert_eq!(pass.norms(0), [5.0, 2.0]);
        assert_eq!(pass.norms(1), [2.0, 0.0]);
        assert_eq!(pass.elements(), NORM_SLICE + 4);
    }
}
