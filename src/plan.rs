//! How a step's elements are laid out and cut into work: tensor [`Layout`]s, the [`Plan`] of
//! tasks (and the [`FeedPlan`] of a fed step), the chunk-length constants and the fixed slices
//! of the gradient-norm pass. Imports nothing else of the crate.

/// Alignment unit of state slices and of cuts inside a tensor, in elements: one 64-byte cache
/// line of `f32`.
pub(crate) const LINE: usize = 16;

/// Default number of elements per task.
///
/// 65,536 elements (256 KiB of each stream): measured best or within noise of best for every
/// optimizer on a 2-core Zen 3 from 64K to 64M parameters (see the README's Performance
/// section). `examples/tune.rs` measures another machine and writes a [`Tuning`](crate::Tuning)
/// file that replaces this default.
pub const DEFAULT_CHUNK_LEN: usize = 1 << 16;

/// A requested chunk length rounded up to a multiple of [`LINE`] (`0` becomes [`LINE`]).
pub(crate) fn effective_chunk_len(len: usize) -> usize {
    len.div_ceil(LINE).clamp(1, usize::MAX / LINE) * LINE
}

/// Whether `lens` equals the sequence `other`.
fn same_lens(lens: &[usize], other: impl ExactSizeIterator<Item = usize>) -> bool {
    lens.len() == other.len() && lens.iter().copied().eq(other)
}

/// Tensor lengths and where each tensor's slice starts in the state buffers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    lens: Vec<usize>,
    offsets: Vec<usize>,
    /// Length of every state buffer (sum of lengths, each rounded up to `unit`).
    total: usize,
    /// What every slice starts on, in elements: [`LINE`], or a block of 8-bit state.
    unit: usize,
}

impl Layout {
    /// The layout of tensors of lengths `lens`, each slice starting on a cache line; `None` if
    /// the buffers could not be addressed (more than `isize::MAX` bytes).
    #[cfg(test)]
    pub(crate) fn new(lens: Vec<usize>) -> Option<Layout> {
        Layout::aligned(lens, LINE)
    }

    /// The same, each slice starting on a multiple of `unit` elements (a multiple of [`LINE`]).
    pub(crate) fn aligned(lens: Vec<usize>, unit: usize) -> Option<Layout> {
        debug_assert!(unit > 0 && unit.is_multiple_of(LINE));
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &len in &lens {
            offsets.push(total);
            total = total.checked_add(len.checked_next_multiple_of(unit)?)?;
        }
        (total <= isize::MAX as usize / size_of::<f32>()).then_some(Layout {
            lens,
            offsets,
            total,
            unit,
        })
    }

    /// What every slice starts on, in elements.
    pub(crate) fn unit(&self) -> usize {
        self.unit
    }

    /// The tensor lengths.
    pub(crate) fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Where each tensor's slice starts in a state buffer.
    pub(crate) fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The length of a state buffer for this layout.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Tensor `t`'s elements in a state buffer.
    pub(crate) fn range(&self, t: usize) -> core::ops::Range<usize> {
        self.offsets[t]..self.offsets[t] + self.lens[t]
    }

    /// Whether tensors of lengths `lens` have this layout.
    pub(crate) fn matches(&self, lens: impl ExactSizeIterator<Item = usize>) -> bool {
        same_lens(&self.lens, lens)
    }
}

/// One contiguous run of one tensor inside a task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Segment {
    pub tensor: usize,
    pub start: usize,
    pub len: usize,
}

/// The tasks of one layout at one chunk length.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    chunk_len: usize,
    segments: Vec<Segment>,
    /// `segments[bounds[t]..bounds[t + 1]]` is task `t`.
    bounds: Vec<usize>,
}

/// Fixed cost of a segment, in elements, when packing small tensors into tasks: keeps a task
/// made of many tiny tensors from carrying thousands of kernel calls.
const SEGMENT_COST: usize = 64;

impl Plan {
    /// Cuts tensors of lengths `lens` into tasks of about `chunk_len` elements (a multiple of
    /// [`LINE`]): small tensors are packed together, large ones split on [`LINE`] boundaries.
    #[cfg(test)]
    pub(crate) fn new(lens: &[usize], chunk_len: usize) -> Plan {
        Plan::cut(lens, chunk_len, LINE)
    }

    /// The same, cutting inside a tensor only at multiples of `unit` elements (a multiple of
    /// [`LINE`] that divides `chunk_len`).
    pub(crate) fn cut(lens: &[usize], chunk_len: usize, unit: usize) -> Plan {
        debug_assert!(chunk_len > 0 && chunk_len.is_multiple_of(unit) && unit.is_multiple_of(LINE));
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
                    // a multiple of `unit`, so cuts inside a tensor stay on `unit` boundaries.
                    left.min(chunk_len)
                } else if left + SEGMENT_COST <= room {
                    left
                } else {
                    room.saturating_sub(SEGMENT_COST) / unit * unit
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

    /// The chunk length the plan was cut for.
    pub(crate) fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// The number of tasks.
    pub(crate) fn tasks(&self) -> usize {
        self.bounds.len() - 1
    }

    /// The segments of task `t`.
    pub(crate) fn task(&self, t: usize) -> &[Segment] {
        &self.segments[self.bounds[t]..self.bounds[t + 1]]
    }
}

/// Elements per slice of the gradient-norm pass. Slices are cut per tensor at multiples of this
/// length, whatever the chunk length and thread count, and their sums are added in order: that
/// fixes the order of every addition, so the norm has the same bits in every configuration.
pub(crate) const NORM_SLICE: usize = 8192;

/// The slices of the gradient-norm pass for one list of tensor lengths.
#[derive(Debug, Default)]
pub(crate) struct NormPlan {
    lens: Vec<usize>,
    /// (tensor, start, len) of every slice, in order.
    slices: Vec<(usize, usize, usize)>,
    /// Tensor `t`'s slices are `slices[first[t]..first[t + 1]]`.
    first: Vec<usize>,
}

impl NormPlan {
    /// Makes the slices those of tensors of lengths `lens`, recomputing only when they differ.
    pub(crate) fn fit(&mut self, lens: impl ExactSizeIterator<Item = usize> + Clone) {
        if same_lens(&self.lens, lens.clone()) && !self.first.is_empty() {
            return;
        }
        self.lens.clear();
        self.lens.extend(lens);
        self.slices.clear();
        self.first.clear();
        for (t, &len) in self.lens.iter().enumerate() {
            self.first.push(self.slices.len());
            self.slices.extend(
                (0..len)
                    .step_by(NORM_SLICE)
                    .map(|s| (t, s, NORM_SLICE.min(len - s))),
            );
        }
        self.first.push(self.slices.len());
    }

    /// (tensor, start, len) of every slice, in summation order.
    pub(crate) fn slices(&self) -> &[(usize, usize, usize)] {
        &self.slices
    }

    /// The indices in [`slices`](NormPlan::slices) of tensor `t`'s slices.
    pub(crate) fn tensor_slices(&self, t: usize) -> core::ops::Range<usize> {
        self.first[t]..self.first[t + 1]
    }

    /// The total number of elements.
    pub(crate) fn elements(&self) -> usize {
        self.lens.iter().sum()
    }
}

/// The tasks of a step fed one tensor at a time ([`TensorFeed`](crate::TensorFeed)): runs of
/// whole tensors, since a fed tensor can only be reached inside its own call. Small tensors are
/// packed into a task of about `chunk_len` elements; a larger tensor is a task of its own, which
/// its update splits into chunks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeedPlan {
    chunk_len: usize,
    lens: Vec<usize>,
    /// Task `t` is tensors `bounds[t]..bounds[t + 1]`.
    bounds: Vec<usize>,
}

impl FeedPlan {
    /// The tasks for tensors of lengths `lens` at `chunk_len` (a multiple of [`LINE`]).
    pub(crate) fn new(lens: &[usize], chunk_len: usize) -> FeedPlan {
        let mut bounds = vec![0];
        let mut filled = 0;
        for (t, &len) in lens.iter().enumerate() {
            let cost = len + SEGMENT_COST;
            if filled > 0 && (filled + cost > chunk_len || len > chunk_len) {
                bounds.push(t);
                filled = 0;
            }
            filled += cost;
        }
        if *bounds.last().unwrap() != lens.len() {
            bounds.push(lens.len());
        }
        FeedPlan {
            chunk_len,
            lens: lens.to_vec(),
            bounds,
        }
    }

    /// Whether the plan was cut for tensors of lengths `lens`.
    pub(crate) fn fits(&self, lens: impl ExactSizeIterator<Item = usize>) -> bool {
        same_lens(&self.lens, lens)
    }

    /// The chunk length the plan was cut for.
    pub(crate) fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// The number of tasks.
    pub(crate) fn tasks(&self) -> usize {
        self.bounds.len() - 1
    }

    /// The tensors of task `t`.
    pub(crate) fn task(&self, t: usize) -> core::ops::Range<usize> {
        self.bounds[t]..self.bounds[t + 1]
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
            for chunk in [LINE, 64, 100 * LINE, 1 << 12, DEFAULT_CHUNK_LEN] {
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
            assert_eq!(s.start % LINE, 0);
        }
    }

    #[test]
    fn block_plans_cut_tensors_on_blocks() {
        let lens = [1000, 3, 70_000, 256, 257];
        for chunk in [256, 512, 4096, DEFAULT_CHUNK_LEN] {
            let plan = Plan::cut(&lens, chunk, 256);
            covered(&plan, &lens);
            assert!(plan.segments.iter().all(|s| s.start % 256 == 0));
        }
        let l = Layout::aligned(vec![3, 0, 300], 256).unwrap();
        assert_eq!(
            (l.offsets(), l.total(), l.unit()),
            (&[0, 256, 256][..], 768, 256)
        );
    }

    #[test]
    fn layout_offsets_are_line_aligned() {
        let l = Layout::new(vec![3, 0, 17, 16]).unwrap();
        assert_eq!(l.offsets(), [0, 16, 16, 48]);
        assert_eq!(l.total(), 64);
        assert_eq!(l.range(2), 16..33);
        assert!(l.matches([3, 0, 17, 16].into_iter()));
        assert!(!l.matches([3, 0, 17].into_iter()));
    }

    #[test]
    fn impossible_layouts_are_refused() {
        assert!(Layout::new(vec![usize::MAX, 16]).is_none());
        assert!(Layout::new(vec![isize::MAX as usize / 4 + 1]).is_none());
        assert!(Layout::new(vec![]).is_some());
    }

    #[test]
    fn norm_slices_cover_each_tensor_in_order() {
        let mut plan = NormPlan::default();
        plan.fit([NORM_SLICE + 1, 0, 3].into_iter());
        assert_eq!(
            plan.slices(),
            [(0, 0, NORM_SLICE), (0, NORM_SLICE, 1), (2, 0, 3)]
        );
        assert_eq!(plan.elements(), NORM_SLICE + 4);
        assert_eq!([0, 1, 2].map(|t| plan.tensor_slices(t)), [0..2, 2..2, 2..3]);
    }

    #[test]
    fn feed_plans_pack_small_tensors_and_isolate_large_ones() {
        let lens = [100, 100, 100, 5000, 10, 0, 10, 300];
        let plan = FeedPlan::new(&lens, 512);
        let tasks: Vec<_> = (0..plan.tasks()).map(|t| plan.task(t)).collect();
        assert_eq!(tasks, [0..3, 3..4, 4..7, 7..8]);
        let plan = FeedPlan::new(&[], 512);
        assert_eq!(plan.tasks(), 0);
        let plan = FeedPlan::new(&[1 << 20; 3], 1 << 16);
        assert_eq!(plan.tasks(), 3);
    }

    #[test]
    fn chunk_len_is_clamped() {
        assert_eq!(effective_chunk_len(0), LINE);
        assert_eq!(effective_chunk_len(1), LINE);
        assert_eq!(effective_chunk_len(LINE + 1), 2 * LINE);
        assert_eq!(effective_chunk_len(usize::MAX) % LINE, 0);
    }
}
