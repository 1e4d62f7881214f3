//! After the first step, a step allocates nothing: `step_all`, `step_many`, `step`,
//! `step_partial` and `step_feed`, with parameter groups and gradient hygiene on, on a concrete and
//! on a boxed optimizer.
//!
//! Its own test binary, because it replaces the global allocator with one that counts the
//! allocations of the thread that asks it to.

mod common;
use common::*;
use fusedopt::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to `System`, counting on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    COUNT.with(Cell::get)
}

#[test]
fn steps_after_the_first_allocate_nothing() {
    let layout = [5000usize, 0, 70_000, 17];
    let groups = GROUPS;
    let mut rng = Rng(1);
    let grads: Vec<Vec<f32>> = layout.iter().map(|&n| rng.vec(n, 1.0)).collect();
    // One thread, so that the whole step runs on the counting thread.
    pool(1).install(|| {
        for config in configs()
            .into_iter()
            .chain(["adamw:amsgrad=true".parse().unwrap()])
        {
            for hygiene in [false, true] {
                let mut weights: Vec<Vec<f32>> = layout.iter().map(|&n| rng.vec(n, 1.0)).collect();
                let mut opt = config.build();
                opt.set_chunk_len(4096);
                opt.set_param_groups(&groups).unwrap();
                if hygiene {
                    opt.set_grad_scale(3.0).unwrap();
                    opt.set_max_grad_norm(Some(1.0)).unwrap();
                    opt.set_non_finite(NonFinite::Skip);
                }
                opt.step_all(&mut weights, &grads).unwrap();
                let n = allocations(|| {
                    for _ in 0..3 {
                        opt.step_all(&mut weights, &grads).unwrap();
                    }
                    let [a, b, c, d] = &mut weights[..] else {
                        unreachable!()
                    };
                    let mut pairs = [
                        (&mut a[..], &grads[0][..]),
                        (&mut b[..], &grads[1][..]),
                        (&mut c[..], &grads[2][..]),
                        (&mut d[..], &grads[3][..]),
                    ];
                    opt.step_many(&mut pairs).unwrap();
                });
                assert_eq!(n, 0, "{config} (hygiene {hygiene}): {n} allocations");
            }
        }
        // Fed steps and steps with missing gradients, the tensors at different step counts.
        let partial: Vec<Option<Vec<f32>>> = grads
            .iter()
            .enumerate()
            .map(|(t, g)| (t != 2).then(|| g.clone()))
            .collect();
        for hygiene in [false, true] {
            let mut model = Locked::new(
                &layout.iter().map(|&n| rng.vec(n, 1.0)).collect::<Vec<_>>(),
                &partial,
            );
            let mut opt: Box<dyn Optimizer> = Box::new(Adam::new(AdamConfig::default()));
            opt.set_chunk_len(4096);
            opt.set_param_groups(&groups).unwrap();
            if hygiene {
                opt.set_max_grad_norm(Some(1.0)).unwrap();
                opt.set_non_finite(NonFinite::Skip);
            }
            let mut weights: Vec<Vec<f32>> = layout.iter().map(|&n| rng.vec(n, 1.0)).collect();
            opt.step_feed(&model).unwrap();
            opt.step_partial(&mut weights, &partial).unwrap();
            model.grads = grads.iter().cloned().map(Some).collect();
            opt.step_feed(&model).unwrap();
            let n = allocations(|| {
                for _ in 0..3 {
                    opt.step_feed(&model).unwrap();
                    opt.step_partial(&mut weights, &partial).unwrap();
                }
            });
            assert_eq!(
                n, 0,
                "fed and partial steps (hygiene {hygiene}): {n} allocations"
            );
        }
        // A concrete optimizer, and `step` on one tensor.
        let mut adam = Adam::new(AdamConfig::default());
        let mut weights: Vec<Vec<f32>> = layout.iter().map(|&n| rng.vec(n, 1.0)).collect();
        adam.step_all(&mut weights, &grads).unwrap();
        assert_eq!(
            allocations(|| {
                adam.step_all(&mut weights, &grads).unwrap();
            }),
            0
        );
        let mut single = Adam::new(AdamConfig::default());
        let mut w = vec![0.5f32; 1000];
        single.step(&mut w, &grads[0][..1000]).unwrap();
        assert_eq!(
            allocations(|| {
                single.step(&mut w, &grads[0][..1000]).unwrap();
            }),
            0
        );
    });
}

#[test]
fn the_counter_counts() {
    // The test above could not fail if counting did not work.
    let n = allocations(|| {
        std::hint::black_box(vec![1u8; 10]);
    });
    assert_eq!(n, 1);
}
