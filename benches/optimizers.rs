//! GB/s per optimizer, tier and size, next to the same-stream reference; thread scaling.
//!
//! ```text
//! cargo bench                    # everything (about 5 minutes on 2 cores)
//! cargo bench -- adam/           # one optimizer
//! cargo bench -- 'adam/avx2'     # one tier
//! cargo bench -- threads/        # thread scaling
//! cargo bench -- models/         # whole-model steps: GPT-2 small and 10,000 x 1024 vs one flat tensor
//! cargo bench -- hygiene/        # Adam plain vs clipping + non-finite check vs AdamW + AMSGrad
//! cargo bench -- formats/        # Adam with bf16 / 8-bit state, bf16 gradients, bf16 master weights
//! ```
//!
//! The `formats` group's throughput is each mode's own byte count (28, 20, 16 + 1/16, 14 + 1/16
//! and 30 bytes per parameter), so its GB/s compare with the roofline, and its times with each
//! other.
//!
//! Throughput is `Throughput::BytesDecimal` with the byte model of `common::roofline::bytes_per_param`
//! (SGD 12, Momentum/NAG/AdaGrad/RMSProp 20, Adam 28 bytes per parameter), so criterion reports
//! GB/s. Each group holds `reference/<size>`: the same streams with trivial arithmetic, the speed
//! the memory system allows.

#[path = "../examples/common/mod.rs"]
mod common;

use common::roofline::{SameStream, bytes_per_param};
use common::{data, gpt2_small};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fusedopt::*;
use std::time::Duration;

const SIZES: [(usize, &str); 5] = [
    (1 << 12, "4K"),
    (1 << 16, "64K"),
    (1 << 20, "1M"),
    (1 << 24, "16M"),
    (1 << 26, "64M"),
];
/// Lower tiers only where they can differ from the memory bound (in cache).
const TIER_SIZES: usize = 3;

fn optimizers(c: &mut Criterion) {
    for name in OPTIMIZER_NAMES {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1200));
        for (si, &(n, label)) in SIZES.iter().enumerate() {
            let states = optimizer_by_name(name).expect("known name").state_buffers();
            group.throughput(Throughput::BytesDecimal(
                (bytes_per_param(states) * n) as u64,
            ));
            let (mut w, g) = data(n);
            let mut tiers: Vec<SimdLevel> = SimdLevel::available().collect();
            if si >= TIER_SIZES {
                tiers = vec![SimdLevel::detect()];
            }
            for level in tiers {
                let mut opt = optimizer_by_name(name).expect("known name");
                opt.set_backend(Backend::Level(level));
                group.bench_function(BenchmarkId::new(level.name(), label), |b| {
                    b.iter(|| opt.step(&mut w, &g).unwrap())
                });
            }
            let mut reference = SameStream::new(states, n);
            group.bench_function(BenchmarkId::new("reference", label), |b| {
                b.iter(|| reference.pass(&mut w, &g).unwrap())
            });
        }
        group.finish();
    }
}

fn threads(c: &mut Criterion) {
    let n = 1 << 24;
    let mut group = c.benchmark_group("threads");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
    group.throughput(Throughput::BytesDecimal((bytes_per_param(2) * n) as u64));
    let (mut w, g) = data(n);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for t in 1..=cores {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap();
        let mut opt = Adam::new(AdamConfig::default());
        group.bench_function(BenchmarkId::new("adam-16M", t), |b| {
            b.iter(|| pool.install(|| opt.step(&mut w, &g).unwrap()))
        });
        let mut reference = SameStream::new(2, n);
        group.bench_function(BenchmarkId::new("reference-16M", t), |b| {
            b.iter(|| pool.install(|| reference.pass(&mut w, &g).unwrap()))
        });
    }
    group.finish();
}

/// Whole-model Adam steps (`step_all` over separately allocated tensors) next to one flat
/// tensor of the same total size.
fn models(c: &mut Criterion) {
    let mut group = c.benchmark_group("models");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for (name, layout) in [
        ("gpt2-small", gpt2_small()),
        ("10000x1024", vec![1024; 10_000]),
    ] {
        let total: usize = layout.iter().sum();
        group.throughput(Throughput::BytesDecimal(
            (bytes_per_param(2) * total) as u64,
        ));
        {
            let mut ws: Vec<Vec<f32>> = layout.iter().map(|&n| data(n).0).collect();
            let gs: Vec<Vec<f32>> = layout.iter().map(|&n| data(n).1).collect();
            let mut opt = Adam::new(AdamConfig::default());
            group.bench_function(BenchmarkId::new("step_many", name), |b| {
                b.iter(|| opt.step_all(&mut ws, &gs).unwrap())
            });
        }
        let (mut w, g) = data(total);
        let mut opt = Adam::new(AdamConfig::default());
        group.bench_function(BenchmarkId::new("flat", name), |b| {
            b.iter(|| opt.step(&mut w, &g).unwrap())
        });
    }
    group.finish();
}

/// The cost of gradient hygiene and of Adam's options: plain Adam, Adam with a loss scale,
/// global-norm clipping and the non-finite check (one extra read of the gradients), and AdamW
/// with AMSGrad (a third state buffer). Throughput counts plain Adam's 28 bytes per parameter for
/// all three, so the GB/s ratio is the time ratio.
fn hygiene(c: &mut Criterion) {
    let mut group = c.benchmark_group("hygiene");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for (n, label) in [(1 << 20, "1M"), (1 << 24, "16M"), (1 << 26, "64M")] {
        group.throughput(Throughput::BytesDecimal((bytes_per_param(2) * n) as u64));
        let (mut w, g) = data(n);
        let mut plain = Adam::new(AdamConfig::default());
        group.bench_function(BenchmarkId::new("adam", label), |b| {
            b.iter(|| plain.step(&mut w, &g).unwrap())
        });
        let mut clipped = Adam::new(AdamConfig::default());
        clipped.set_grad_scale(1024.0).unwrap();
        clipped.set_max_grad_norm(Some(1.0)).unwrap();
        clipped.set_non_finite(NonFinite::Skip);
        group.bench_function(BenchmarkId::new("adam+scale+clip+check", label), |b| {
            b.iter(|| clipped.step(&mut w, &g).unwrap())
        });
        let mut adamw = Adam::new(AdamConfig {
            amsgrad: true,
            ..AdamConfig::adamw()
        });
        group.bench_function(BenchmarkId::new("adamw+amsgrad", label), |b| {
            b.iter(|| adamw.step(&mut w, &g).unwrap())
        });
    }
    group.finish();
}

/// Adam with compact state and half-precision tensors against the all-f32 step.
fn formats(c: &mut Criterion) {
    use fusedopt::half::bf16;
    let mut group = c.benchmark_group("formats");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for (n, label) in [(1 << 16, "64K"), (1 << 20, "1M"), (1 << 26, "64M")] {
        let (w0, g) = data(n);
        let g16: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
        let adam = |format: StateFormat| {
            let mut o = Adam::new(AdamConfig::default());
            o.set_state_format(format).unwrap();
            o
        };
        let bytes = |b: f64| Throughput::BytesDecimal((b * n as f64) as u64);
        for (name, format, per_param) in [
            ("f32", StateFormat::F32, 28.0),
            ("bf16-state", StateFormat::Bf16, 20.0),
            ("q8-state", StateFormat::Q8, 16.0 + 1.0 / 16.0),
        ] {
            group.throughput(bytes(per_param));
            let (mut o, mut w) = (adam(format), w0.clone());
            group.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| o.step(&mut w, &g).unwrap())
            });
        }
        group.throughput(bytes(14.0 + 1.0 / 16.0));
        let (mut o, mut w) = (adam(StateFormat::Q8), w0.clone());
        group.bench_function(BenchmarkId::new("bf16-grads+q8-state", label), |b| {
            b.iter(|| o.step_typed(&mut w, &g16).unwrap())
        });
        group.throughput(bytes(30.0));
        let mut o = adam(StateFormat::F32);
        let mut wh: Vec<bf16> = w0.iter().map(|&x| bf16::from_f32(x)).collect();
        group.bench_function(BenchmarkId::new("bf16-master-weights", label), |b| {
            b.iter(|| o.step_typed(&mut wh, &g16).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, optimizers, threads, models, hygiene, formats);
criterion_main!(benches);
