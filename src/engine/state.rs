//! What an optimizer holds besides its settings: the step counts, the layout its first step
//! fixed, and the 64-byte aligned state buffers sized to it. A plain value, which state files
//! save and restore.

use crate::plan::Layout;
use crate::simd::BLOCK;
use crate::types::{StateFormat, StepError};
use aligned_vec::{AVec, ConstAlign};

/// One state buffer: every tensor's slice, each starting on a 64-byte boundary. In `f32`
/// format, element `i` of the layout is word `i`; compact formats use the memory as bytes
/// ([`words`]).
pub(crate) type StateBuf = AVec<f32, ConstAlign<64>>;

/// The 4-byte words a buffer of `elements` layout elements takes in `format`: `f32` one each,
/// bf16 half of one, 8-bit a byte each, then one `f32` scale per block of [`BLOCK`] (the layout
/// of 8-bit state is cut in whole blocks).
pub(crate) fn words(format: StateFormat, elements: usize) -> usize {
    match format {
        StateFormat::Bf16 => elements.div_ceil(2),
        StateFormat::Q8 => elements.div_ceil(4) + elements.div_ceil(BLOCK),
        _ => elements,
    }
}

/// The bytes one element's value takes in `format` (8-bit state adds its blocks' scales).
pub(crate) fn bytes_per_element(format: StateFormat) -> usize {
    match format {
        StateFormat::Bf16 => 2,
        StateFormat::Q8 => 1,
        _ => 4,
    }
}

/// The layout unit (what every tensor's slice starts on, in elements) of state in `format`.
pub(crate) fn unit(format: StateFormat) -> usize {
    match format {
        StateFormat::Q8 => BLOCK,
        _ => crate::plan::LINE,
    }
}

/// A rule's running values for the whole optimizer ([`State::sums`]).
pub(crate) type Sums = [f64; 3];

/// An optimizer's state: step counts, layout and state buffers (momentum, moments, ...).
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Steps applied (a step counts here even where some tensors had no gradient).
    pub steps: u64,
    /// Steps each tensor of the layout has taken; empty before the first step.
    pub tensor_steps: Vec<u64>,
    /// The layout, fixed by the first step; `None` before it.
    pub layout: Option<Layout>,
    /// The state buffers, each [`words`]`(format, layout.total())` long, padding zeroed.
    pub buffers: Vec<StateBuf>,
    /// The format of the buffers.
    pub format: StateFormat,
    /// The `f32` master weights of tensors whose trainer weights are half precision (laid out
    /// as a state buffer), once a step has seen such a tensor.
    pub master: Option<StateBuf>,
    /// Which tensors' master weights hold their values (taken from the trainer's weights at
    /// the tensor's first step in half precision).
    pub master_ready: Vec<bool>,
    /// The rule's running values over the steps applied (schedule-free's step count, largest
    /// learning rate and sum of averaging weights); zero for the rules that keep none.
    pub sums: Sums,
    /// Whether the weights were last left at the rule's evaluation point (schedule-free's
    /// average `x`) by [`eval`](crate::Optimizer::eval); steps are refused until
    /// [`train`](crate::Optimizer::train).
    pub eval: bool,
}

impl State {
    /// A state of `buffers` zeroed buffers for `layout`, whose tensors have taken
    /// `tensor_steps` steps, after `steps` steps in all.
    ///
    /// # Errors
    /// [`StepError::OutOfMemory`] if a buffer cannot be allocated.
    pub(crate) fn zeroed(
        layout: Layout,
        buffers: usize,
        format: StateFormat,
        steps: u64,
        tensor_steps: Vec<u64>,
    ) -> Result<State, StepError> {
        debug_assert_eq!(layout.unit(), unit(format));
        let buffers = (0..buffers)
            .map(|_| zeroed_buffer(words(format, layout.total())))
            .collect::<Result<_, _>>()?;
        Ok(State {
            steps,
            tensor_steps,
            layout: Some(layout),
            buffers,
            format,
            master: None,
            master_ready: Vec::new(),
            sums: [0.0; 3],
            eval: false,
        })
    }

    /// Tensor `t`'s bytes in buffer `b`, as stored (native byte order): its values, and for
    /// 8-bit state its blocks' scales (empty otherwise).
    pub(crate) fn tensor_raw(&self, b: usize, t: usize) -> (&[u8], &[u8]) {
        let (values, scales) = self.raw_ranges(t);
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffers[b]);
        (&bytes[values], &bytes[scales])
    }

    /// The same, to fill.
    pub(crate) fn tensor_raw_mut(&mut self, b: usize, t: usize) -> (&mut [u8], &mut [u8]) {
        let (values, scales) = self.raw_ranges(t);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.buffers[b]);
        // The values end before the scales start.
        let (head, tail) = bytes.split_at_mut(scales.start);
        (&mut head[values], &mut tail[..scales.len()])
    }

    /// The byte ranges of tensor `t`'s values and scales in a buffer.
    fn raw_ranges(&self, t: usize) -> (core::ops::Range<usize>, core::ops::Range<usize>) {
        let layout = self
            .layout
            .as_ref()
            .expect("buffers exist only with a layout");
        let (offset, len) = (layout.offsets()[t], layout.lens()[t]);
        let size = bytes_per_element(self.format);
        let values = offset * size..(offset + len) * size;
        let scales = if self.format == StateFormat::Q8 {
            let first = layout.total() + offset / BLOCK * 4;
            first..first + len.div_ceil(BLOCK) * 4
        } else {
            values.end..values.end
        };
        (values, scales)
    }

    /// The step every tensor takes next, if they all take the same one.
    pub(crate) fn common_step(&self) -> Option<u64> {
        match self.tensor_steps.split_first() {
            None => Some(self.steps + 1),
            Some((&first, rest)) => rest.iter().all(|&s| s == first).then_some(first + 1),
        }
    }

    /// Tensor `t`'s slice of `f32` buffer `b`.
    pub(crate) fn tensor(&self, b: usize, t: usize) -> &[f32] {
        debug_assert_eq!(self.format, StateFormat::F32);
        let layout = self
            .layout
            .as_ref()
            .expect("buffers exist only with a layout");
        &self.buffers[b][layout.range(t)]
    }

    /// Tensor `t`'s master weights (it must have some).
    pub(crate) fn master_tensor(&self, t: usize) -> &[f32] {
        let layout = self
            .layout
            .as_ref()
            .expect("master weights exist only with a layout");
        &self.master.as_ref().expect("checked by the caller")[layout.range(t)]
    }

    /// Tensor `t`'s slice of `f32` buffer `b`, to fill.
    pub(crate) fn tensor_mut(&mut self, b: usize, t: usize) -> &mut [f32] {
        debug_assert_eq!(self.format, StateFormat::F32);
        let layout = self
            .layout
            .as_ref()
            .expect("buffers exist only with a layout");
        &mut self.buffers[b][layout.range(t)]
    }
}

/// A zeroed state buffer of `len` elements.
///
/// # Errors
/// [`StepError::OutOfMemory`] if it cannot be allocated.
pub(crate) fn zeroed_buffer(len: usize) -> Result<StateBuf, StepError> {
    let mut buf = StateBuf::new(64);
    buf.try_reserve_exact(len)
        .map_err(|_| StepError::OutOfMemory { elements: len })?;
    buf.resize(len, 0.0);
    Ok(buf)
}
