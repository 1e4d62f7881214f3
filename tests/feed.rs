//! Steps fed one tensor at a time (`TensorFeed`): bitwise the results of `step_many`, every
//! option and gradient hygiene included, for any thread count and chunk length; errors of the
//! gradient phase change nothing; the stack does not grow with the tensor count.

use crate::common::*;
use fusedopt::*;
use std::sync::atomic::{AtomicUsize, Ordering};

const LENS: [usize; 7] = [0, 1, 17, 4097, 65_537, 300, 200_003];

/// Every optimizer with options, and each hygiene setting.
fn cases() -> Vec<(OptimizerConfig, usize)> {
    let mut configs: Vec<OptimizerConfig> = configs()
        .into_iter()
        .map(|c| with(unusual(c), "weight_decay=0.01,maximize=true"))
        .collect();
    configs.push("adamw:amsgrad=true,lr=0.01".parse().unwrap());
    configs
        .into_iter()
        .flat_map(|c| (0..3).map(move |h| (c, h)))
        .collect()
}

/// An optimizer of `config` with hygiene setting `h`: none, scale + clip + skip, scale 3 +
/// clip + error.
fn build(config: OptimizerConfig, h: usize) -> Box<dyn Optimizer> {
    let mut opt = config.build();
    if h > 0 {
        opt.set_grad_scale(if h == 1 { 1024.0 } else { 3.0 })
            .unwrap();
        opt.set_max_grad_norm(Some(1.0)).unwrap();
        opt.set_non_finite(if h == 1 {
            NonFinite::Skip
        } else {
            NonFinite::Error
        });
    }
    opt
}

#[test]
fn a_fed_step_equals_step_many() {
    for (config, h) in cases() {
        for (threads, chunk) in [(1, 0), (2, 4096), (3, 1000)] {
            let mut rng = Rng(5);
            let w0: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
            let (mut listed, mut fed) = (build(config, h), build(config, h));
            listed.set_chunk_len(chunk);
            fed.set_chunk_len(chunk);
            let mut ws = w0.clone();
            let mut model = Locked::new(&w0, &[]);
            pool(threads).install(|| {
                for s in 0..4 {
                    let mut gs: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 100.0)).collect();
                    if s == 2 && h == 1 {
                        gs[3][7] = f32::INFINITY; // skipped by both
                    }
                    let a = listed.step_all(&mut ws, &gs).unwrap();
                    model.grads = gs.into_iter().map(Some).collect();
                    let b = fed.step_feed(&model).unwrap();
                    assert_eq!(
                        (a.step, a.skipped, a.grad_norm.map(f32::to_bits)),
                        (b.step, b.skipped, b.grad_norm.map(f32::to_bits)),
                        "{config} h={h}"
                    );
                }
            });
            for (t, w) in model.weights().iter().enumerate() {
                let what = format!("{config} h={h} threads={threads} chunk={chunk} tensor {t}");
                assert_same(w, &ws[t], &what);
            }
        }
    }
}

#[test]
fn an_owned_pool_gives_the_same_bits() {
    let config: OptimizerConfig = "adam".parse().unwrap();
    let mut rng = Rng(6);
    let w0: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let gs: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let mut reference = config.build();
    let mut expected = w0.clone();
    pool(1).install(|| reference.step_all(&mut expected, &gs).unwrap());
    for threads in [1, 2, 4] {
        let mut opt = config.build();
        opt.set_threads(threads).unwrap();
        opt.set_chunk_len(4096);
        assert_eq!(opt.threads(), threads);
        let mut ws = w0.clone();
        opt.step_all(&mut ws, &gs).unwrap();
        let model = Locked::new(&w0, &gs.iter().cloned().map(Some).collect::<Vec<_>>());
        let mut fed = config.build();
        fed.set_threads(threads).unwrap();
        fed.step_feed(&model).unwrap();
        for t in 0..LENS.len() {
            assert_same(
                &ws[t],
                &expected[t],
                &format!("{threads} threads, tensor {t}"),
            );
            assert_same(
                &model.weights()[t],
                &expected[t],
                &format!("fed, {threads} threads"),
            );
        }
    }
    // Back to the caller's pool.
    let mut opt = config.build();
    opt.set_threads(2).unwrap();
    opt.set_threads(0).unwrap();
    assert_eq!(opt.threads(), 0);
}

/// A feed that misbehaves in one way, on one tensor.
struct Faulty {
    inner: Locked,
    tensor: usize,
    fault: Fault,
    updates: AtomicUsize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    GradLength,
    GradError,
    GradNotLent,
    UpdateLength,
    UpdateError,
    UpdateNotLent,
}

impl Faulty {
    /// A model of `LENS` from `seed` whose tensor 3 misbehaves with `fault`, and its weights.
    fn new(fault: Fault, seed: u64) -> (Faulty, Vec<Vec<f32>>) {
        let mut rng = Rng(seed);
        let w0: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
        let gs: Vec<Option<Vec<f32>>> = LENS.iter().map(|&n| Some(rng.vec(n, 1.0))).collect();
        let feed = Faulty {
            inner: Locked::new(&w0, &gs),
            tensor: 3,
            fault,
            updates: AtomicUsize::new(0),
        };
        (feed, w0)
    }
}

impl TensorFeed for Faulty {
    fn tensor_count(&self) -> usize {
        self.inner.tensor_count()
    }
    fn tensor_len(&self, tensor: usize) -> usize {
        self.inner.tensor_len(tensor)
    }
    fn grad(&self, tensor: usize, read: &mut dyn FnMut(Option<&[f32]>)) -> Result<(), FeedError> {
        if tensor == self.tensor {
            match self.fault {
                Fault::GradLength => {
                    read(Some(&self.inner.grads[tensor].as_ref().unwrap()[1..]));
                    return Ok(());
                }
                Fault::GradError => return Err("the device is gone".into()),
                Fault::GradNotLent => return Ok(()),
                _ => {}
            }
        }
        self.inner.grad(tensor, read)
    }
    fn update(
        &self,
        tensor: usize,
        update: &mut dyn FnMut(&mut [f32], &[f32]),
    ) -> Result<(), FeedError> {
        self.updates.fetch_add(1, Ordering::Relaxed);
        if tensor == self.tensor {
            match self.fault {
                Fault::UpdateLength => {
                    let mut w = self.inner.weights[tensor].lock().unwrap();
                    let g = self.inner.grads[tensor].as_deref().unwrap();
                    update(&mut w[1..], &g[1..]);
                    return Ok(());
                }
                Fault::UpdateError => return Err("the lock is poisoned".into()),
                Fault::UpdateNotLent => return Ok(()),
                _ => {}
            }
        }
        self.inner.update(tensor, update)
    }
}

#[test]
fn errors_while_reading_gradients_change_nothing() {
    for fault in [Fault::GradLength, Fault::GradError, Fault::GradNotLent] {
        let (feed, w0) = Faulty::new(fault, 7);
        let mut opt = Adam::new(AdamConfig::default());
        let err = opt.step_feed(&feed).unwrap_err();
        match fault {
            Fault::GradLength => assert_eq!(
                err,
                StepError::LengthMismatch {
                    tensor: 3,
                    weights: 4097,
                    grads: 4096
                }
            ),
            _ => assert!(matches!(err, StepError::Feed { tensor: 3, .. }), "{err}"),
        }
        assert!(err.to_string().contains("tensor 3"), "{err}");
        assert_eq!(feed.updates.load(Ordering::Relaxed), 0, "{fault:?}");
        assert_eq!(feed.inner.weights(), w0);
        assert_eq!((opt.steps(), opt.layout()), (0, None));
    }
}

#[test]
fn errors_while_updating_are_reported_and_keep_the_counts_true() {
    for fault in [
        Fault::UpdateLength,
        Fault::UpdateError,
        Fault::UpdateNotLent,
    ] {
        let (feed, w0) = Faulty::new(fault, 8);
        let mut opt = Adam::new(AdamConfig::default());
        let err = pool(1).install(|| opt.step_feed(&feed)).unwrap_err();
        assert!(
            matches!(err, StepError::Feed { tensor: 3, .. }),
            "{fault:?}: {err}"
        );
        // Tensor 3 was not updated and did not count the step; the tensors before it did.
        assert_eq!(feed.inner.weights()[3], w0[3], "{fault:?}");
        assert_eq!(opt.tensor_steps()[3], 0);
        assert_eq!(opt.tensor_steps()[..3], [1, 1, 1]);
        assert_ne!(feed.inner.weights()[2], w0[2]);
    }
}

#[test]
fn the_tensors_are_checked_against_the_layout_first() {
    let mut opt = Momentum::new(MomentumConfig::default());
    let model = Locked::new(&[vec![1.0; 3]], &[Some(vec![1.0; 3])]);
    opt.step_feed(&model).unwrap();
    let other = Locked::new(&[vec![1.0; 4]], &[Some(vec![1.0; 4])]);
    let err = opt.step_feed(&other).unwrap_err();
    assert_eq!(
        err,
        StepError::TensorLen {
            tensor: 0,
            expected: 3,
            found: 4
        }
    );
    assert_eq!(other.weights(), [vec![1.0; 4]]);
}

#[test]
fn ten_thousand_tensors_on_a_small_stack() {
    // The fed step nests one call per tensor at most: a 256 KiB stack holds 10,000 tensors.
    let handle = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(|| {
            let w0 = vec![vec![0.5f32; 16]; 10_000];
            let gs = vec![Some(vec![0.25f32; 16]); 10_000];
            let model = Locked::new(&w0, &gs);
            let mut opt = Adam::new(AdamConfig::default());
            opt.set_threads(2).unwrap();
            opt.step_feed(&model).unwrap();
            let mut expected = w0.clone();
            let mut listed = Adam::new(AdamConfig::default());
            let gs: Vec<Vec<f32>> = gs.into_iter().flatten().collect();
            listed.step_all(&mut expected, &gs).unwrap();
            assert_eq!(model.weights(), expected);
        })
        .unwrap();
    handle.join().unwrap();
}
