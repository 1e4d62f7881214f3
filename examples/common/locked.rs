//! A model whose tensors sit behind locks, for `TensorFeed`: shared by the `perf` example and the
//! tests.

use fusedopt::{FeedError, TensorFeed};

/// A model whose tensors sit behind locks, lent one at a time through `TensorFeed`, as a
/// framework that owns its tensors lends them.
pub struct Locked {
    pub weights: Vec<std::sync::Mutex<Vec<f32>>>,
    pub grads: Vec<Option<Vec<f32>>>,
    /// Each tensor's length, known without taking its lock (as a framework knows shapes).
    lens: Vec<usize>,
}

impl Locked {
    pub fn new(weights: &[Vec<f32>], grads: &[Option<Vec<f32>>]) -> Locked {
        Locked {
            weights: weights
                .iter()
                .map(|w| std::sync::Mutex::new(w.clone()))
                .collect(),
            grads: grads.to_vec(),
            lens: weights.iter().map(Vec::len).collect(),
        }
    }

    pub fn weights(&self) -> Vec<Vec<f32>> {
        self.weights
            .iter()
            .map(|w| w.lock().unwrap().clone())
            .collect()
    }
}

impl TensorFeed for Locked {
    fn tensor_count(&self) -> usize {
        self.weights.len()
    }
    fn tensor_len(&self, tensor: usize) -> usize {
        self.lens[tensor]
    }
    fn grad(&self, tensor: usize, read: &mut dyn FnMut(Option<&[f32]>)) -> Result<(), FeedError> {
        read(self.grads[tensor].as_deref());
        Ok(())
    }
    fn update(
        &self,
        tensor: usize,
        update: &mut dyn FnMut(&mut [f32], &[f32]),
    ) -> Result<(), FeedError> {
        let grad = self.grads[tensor].as_deref().ok_or("no gradient")?;
        update(&mut self.weights[tensor].lock().unwrap(), grad);
        Ok(())
    }
}
