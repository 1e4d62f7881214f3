//! Measures every optimizer against the same-stream reference, in one run, and checks the targets.
//!
//! ```text
//! cargo run --release --example perf                      # table + target check
//! cargo run --release --example perf -- --write docs      # also writes docs/perf.csv and docs/perf.svg
//! cargo run --release --example perf -- --optimizers adam --sizes 256K,64M --threads 2
//! ```
//!
//! For every optimizer and size the engine step and the reference pass are timed alternately,
//! `--reps` times each; the table shows the medians as GB/s (bytes per parameter × parameters /
//! time) and their ratio.

mod common;

use clap::Parser;
use common::locked::Locked;
use common::roofline::{SameStream, bytes_per_param};
use common::{data, gpt2_small, label, median, parse_size};
use fusedopt::*;
use std::fmt::Write as _;
use std::time::Instant;

/// Measure GB/s of every optimizer next to the same-stream reference.
#[derive(Debug, Parser)]
struct Args {
    /// Optimizers, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sgd,momentum,nag,adagrad,rmsprop,adam"
    )]
    optimizers: Vec<String>,
    /// Sizes in parameters (K = 1024, M = 1024²), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,256K,1M,16M,64M")]
    sizes: Vec<String>,
    /// Threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 0)]
    reps: usize,
    /// Chunk length for the engine (0 = default).
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    /// Write perf.csv and perf.svg into this folder.
    #[arg(long)]
    write: Option<std::path::PathBuf>,
    /// Instead: whole-model Adam steps (GPT-2-small layout, 10,000 × 1024), `step_all` and
    /// `step_feed`, against one flat tensor of the same total size.
    #[arg(long)]
    models: bool,
    /// Instead: the cost of gradient hygiene and trainer options on Adam at each `--sizes` (64M
    /// by default): plain steps against steps with a loss scale, clipping and the non-finite
    /// check, and against AdamW + AMSGrad.
    #[arg(long)]
    hygiene: bool,
    /// Instead: Adam with compact state and half-precision gradients at each `--sizes` (64M by
    /// default), against the all-f32 step.
    #[arg(long)]
    formats: bool,
    /// Instead: LAMB and LARS (trust ratios, adapted) against Adam at each `--sizes` (64M by
    /// default) and on the GPT-2-small layout, with their floors: Adam plus one plain read of
    /// the four streams LAMB measures, and of three.
    #[arg(long)]
    trust: bool,
    /// Instead: the cost of choosing the thread count on a small (4,550-parameter) step:
    /// `pool.install` around each step against the optimizer's own pool (`set_threads`).
    #[arg(long)]
    overhead: bool,
}

struct Row {
    optimizer: String,
    size: usize,
    engine: f64,
    reference: f64,
}

fn main() {
    let args = Args::parse();
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = args.threads {
        pool = pool.num_threads(t);
    }
    let pool = pool.build().unwrap();
    if args.models {
        pool.install(models);
    } else if args.overhead {
        overhead(pool.current_num_threads());
    } else if args.formats {
        let sizes = if args.sizes == Args::parse_from(["perf"]).sizes {
            vec![64 << 20]
        } else {
            args.sizes.iter().map(|s| parse_size(s).unwrap()).collect()
        };
        pool.install(|| formats(&sizes));
    } else if args.trust {
        let sizes = if args.sizes == Args::parse_from(["perf"]).sizes {
            vec![64 << 20]
        } else {
            args.sizes.iter().map(|s| parse_size(s).unwrap()).collect()
        };
        pool.install(|| trust(&sizes));
    } else if args.hygiene {
        let sizes = if args.sizes == Args::parse_from(["perf"]).sizes {
            vec![64 << 20]
        } else {
            args.sizes.iter().map(|s| parse_size(s).unwrap()).collect()
        };
        pool.install(|| hygiene(&sizes));
    } else {
        pool.install(|| run(&args));
    }
}

/// Times every closure of `runs` in turn (the order rotating each repetition, after 2 warm-up
/// rounds) and returns their medians.
fn rotate(reps: usize, runs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut times = vec![Vec::new(); runs.len()];
    for rep in 0..reps + 2 {
        for k in 0..runs.len() {
            let i = (k + rep) % runs.len();
            let t = Instant::now();
            runs[i]();
            if rep >= 2 {
                times[i].push(t.elapsed().as_secs_f64());
            }
        }
    }
    times.into_iter().map(median).collect()
}

/// Whole-model Adam steps over a layout of separately allocated tensors, `step_all` and
/// `step_feed` (each tensor behind a lock), against `step` on one flat tensor of the same total
/// size: alternating, medians.
fn models() {
    println!(
        "whole-model Adam steps: {} threads, {} kernels; GB/s at 28 bytes per parameter, median of rotating runs",
        rayon::current_num_threads(),
        simd_level()
    );
    for (name, layout) in [
        ("gpt2-small", gpt2_small()),
        ("10000x1024", vec![1024; 10_000]),
    ] {
        let total: usize = layout.iter().sum();
        let mut ws: Vec<Vec<f32>> = layout.iter().map(|&n| vec![0.1f32; n]).collect();
        let gs: Vec<Vec<f32>> = layout.iter().map(|&n| vec![0.01f32; n]).collect();
        let fed = Locked::new(&ws, &gs.iter().cloned().map(Some).collect::<Vec<_>>());
        let mut flat_w = vec![0.1f32; total];
        let flat_g = vec![0.01f32; total];
        let (mut many, mut feeder, mut flat) = (
            Adam::new(AdamConfig::default()),
            Adam::new(AdamConfig::default()),
            Adam::new(AdamConfig::default()),
        );
        let reps = if total > 50_000_000 { 21 } else { 101 };
        let t = rotate(
            reps,
            &mut [
                &mut || {
                    flat.step(&mut flat_w, &flat_g).unwrap();
                },
                &mut || {
                    many.step_all(&mut ws, &gs).unwrap();
                },
                &mut || {
                    feeder.step_feed(&fed).unwrap();
                },
            ],
        );
        let bytes = 28.0 * total as f64;
        let gbps = |t: f64| bytes / t / 1e9;
        println!(
            "{name:<11} {:>5} tensors {:>11} params: flat step {:>5.1} GB/s ({:.2} ms), step_all {:>5.1} GB/s ({:.2} ms, {:.3} of flat), step_feed {:>5.1} GB/s ({:.2} ms, {:.3}x step_all)",
            layout.len(),
            total,
            gbps(t[0]),
            t[0] * 1e3,
            gbps(t[1]),
            t[1] * 1e3,
            t[0] / t[1],
            gbps(t[2]),
            t[2] * 1e3,
            t[2] / t[1]
        );
    }
}

/// A small model's step (4,550 parameters in 4 tensors, a 2-layer MLP's size) on a pool of
/// `threads`, three ways: wrapped in `pool.install` per step, on the optimizer's own pool
/// (`set_threads`), and plainly on the global pool.
fn overhead(threads: usize) {
    let layout = [4096usize, 64, 384, 6];
    let gs: Vec<Vec<f32>> = layout.iter().map(|&n| vec![0.01f32; n]).collect();
    let new_weights = || layout.iter().map(|&n| vec![0.1f32; n]).collect::<Vec<_>>();
    let (mut w1, mut w2, mut w3) = (new_weights(), new_weights(), new_weights());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let (mut installed, mut owned, mut plain) = (
        Adam::new(AdamConfig::default()),
        Adam::new(AdamConfig::default()),
        Adam::new(AdamConfig::default()),
    );
    owned.set_threads(threads).unwrap();
    let inner = 200;
    let t = rotate(
        201,
        &mut [
            &mut || {
                for _ in 0..inner {
                    pool.install(|| installed.step_all(&mut w1, &gs).unwrap());
                }
            },
            &mut || {
                for _ in 0..inner {
                    owned.step_all(&mut w2, &gs).unwrap();
                }
            },
            &mut || {
                for _ in 0..inner {
                    plain.step_all(&mut w3, &gs).unwrap();
                }
            },
        ],
    );
    let us = |t: f64| t / inner as f64 * 1e6;
    println!(
        "4,550-parameter Adam step, {threads} threads: pool.install per step {:.2} µs, own pool (set_threads) {:.2} µs, plain call {:.2} µs; saved by set_threads {:.2} µs ({:.1}x)",
        us(t[0]),
        us(t[1]),
        us(t[2]),
        us(t[0]) - us(t[1]),
        t[0] / t[1]
    );
}

/// Times `a` and `b` alternately (`reps` pairs after 2 warm-up pairs) and returns their medians.
fn alternate(reps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    for rep in 0..reps + 2 {
        let (x, y) = if rep % 2 == 0 {
            let x = time(&mut a);
            (x, time(&mut b))
        } else {
            let y = time(&mut b);
            (time(&mut a), y)
        };
        if rep >= 2 {
            ta.push(x);
            tb.push(y);
        }
    }
    (median(ta), median(tb))
}

/// Adam with bf16 and 8-bit state, bf16 gradients, and bf16 master-weight training, against
/// the all-f32 step, all timed in rotation; and the master-weight step against a same-stream
/// pass over its bytes.
fn formats(sizes: &[usize]) {
    println!(
        "Adam state formats and half precision vs the all-f32 step: {} threads, {} kernels; \
         medians of rotating runs",
        rayon::current_num_threads(),
        simd_level()
    );
    // The compute floor: the same steps on 64K parameters (one chunk, L2-resident) on one
    // thread, per parameter, scaled up and shared perfectly among the threads.
    const SMALL: usize = 64 << 10;
    let threads = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let small = one.install(|| format_times(SMALL, 4001));
    for &n in sizes {
        let reps = if n >= 16 << 20 { 21 } else { 101 };
        let times = format_times(n, reps);
        let names = [
            ("f32 weights, grads, state", 28.0),
            ("bf16 state", 20.0),
            ("q8 state", 16.0 + 16.0 / 256.0),
            ("bf16 grads, q8 state", 14.0 + 16.0 / 256.0),
            ("bf16 weights+grads, f32 master", 30.0),
        ];
        // The memory floor: the mode's bytes at the f32 step's bandwidth (which runs at the
        // same-stream roofline at this size).
        let bandwidth = 28.0 * n as f64 / times[0];
        for (((name, bytes), t), ts) in names.iter().zip(&times).zip(&small) {
            let compute = ts * n as f64 / SMALL as f64 / threads as f64;
            let memory = bytes * n as f64 / bandwidth;
            println!(
                "{:>5} {name:<32} {:>8.2} ms  {:.2}x the f32 step  {bytes:>5.2} B/param  {:>6.1} GB/s  \
                 floors: compute {:.2} ms, memory {:.2} ms -> at most {:.2}x",
                label(n),
                t * 1e3,
                times[0] / t,
                bytes * n as f64 / t / 1e9,
                compute * 1e3,
                memory * 1e3,
                times[0] / compute.max(memory)
            );
        }
        println!(
            "{:>5} master-weight step at {:.2} of its same-stream pass ({:.2} ms)",
            label(n),
            times[5] / times[4],
            times[5] * 1e3
        );
    }
}

/// Medians of rotating runs at `n` parameters: the all-f32 Adam step, bf16 state, q8 state, bf16
/// gradients with q8 state, bf16 master-weight mode, and the master-weight same-stream pass.
fn format_times(n: usize, reps: usize) -> Vec<f64> {
    use fusedopt::half::bf16;
    let (w0, g) = data(n);
    let g16: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
    let adam = |format: StateFormat| {
        let mut o = Adam::new(AdamConfig::default());
        o.set_state_format(format).unwrap();
        o
    };
    let (mut o_f32, mut o_bf16, mut o_q8) = (
        adam(StateFormat::F32),
        adam(StateFormat::Bf16),
        adam(StateFormat::Q8),
    );
    let (mut o_g16q8, mut o_master) = (adam(StateFormat::Q8), adam(StateFormat::F32));
    let (mut w1, mut w2, mut w3, mut w4) = (w0.clone(), w0.clone(), w0.clone(), w0.clone());
    let mut wh: Vec<bf16> = w0.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut ws = wh.clone();
    let mut stream = HalfStream::new(n);
    let mut runs: [&mut dyn FnMut(); 6] = [
        &mut || {
            o_f32.step(&mut w1, &g).unwrap();
        },
        &mut || {
            o_bf16.step(&mut w2, &g).unwrap();
        },
        &mut || {
            o_q8.step(&mut w3, &g).unwrap();
        },
        &mut || {
            o_g16q8.step_typed(&mut w4, &g16).unwrap();
        },
        &mut || {
            o_master.step_typed(&mut wh, &g16).unwrap();
        },
        &mut || stream.pass(&mut ws, &g16),
    ];
    rotate(reps, &mut runs)
}

/// The streams of a bf16 master-weight Adam step with trivial arithmetic: read bf16 weights and
/// gradients and f32 master, m and v; write all but the gradients (30 bytes per parameter).
struct HalfStream {
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl HalfStream {
    fn new(n: usize) -> Self {
        HalfStream {
            master: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn pass(&mut self, w: &mut [fusedopt::half::bf16], g: &[fusedopt::half::bf16]) {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(self.master.par_chunks_mut(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK))
            .for_each(|((((w, g), ms), m), v)| {
                for i in 0..w.len() {
                    let gi = f32::from_bits(u32::from(g[i].to_bits()) << 16);
                    m[i] += gi;
                    v[i] += gi;
                    ms[i] += gi + f32::from_bits(u32::from(w[i].to_bits()) << 16);
                    w[i] = fusedopt::half::bf16::from_bits((ms[i].to_bits() >> 16) as u16);
                }
            });
    }
}

/// A plain read-only pass over `g` on the current pool, one contiguous part per thread.
fn plain_floor_pass(g: &[f32], sink: &mut f32) {
    use rayon::prelude::*;
    let part = g.len().div_ceil(rayon::current_num_threads()).max(1);
    *sink += g
        .par_chunks(part)
        .map(|c| {
            let mut acc = [0f32; 16];
            for line in c.chunks_exact(16) {
                for (a, &x) in acc.iter_mut().zip(line) {
                    *a += x * x;
                }
            }
            acc.iter().sum::<f32>()
        })
        .sum::<f32>();
}

/// LAMB and LARS against Adam (each on its own buffers, rotating, medians), over one tensor of
/// each size in `sizes` and over the GPT-2-small layout; and the floor of a rule that measures
/// its tensors first: Adam's step plus a plain read of weights, gradients and both moments (what
/// LAMB reads to measure), and plus a read of three streams (the least any exact per-tensor
/// ratio needs: the measuring pass could write the moments, and the update then not read the
/// gradients again).
fn trust(sizes: &[usize]) {
    println!(
        "LAMB/LARS vs Adam: {} threads, {} kernels; median of rotating runs (time / Adam's time)",
        rayon::current_num_threads(),
        simd_level()
    );
    let cases: Vec<(String, Vec<usize>)> = sizes
        .iter()
        .map(|&n| (label(n), vec![n]))
        .chain([("gpt2-small".to_string(), gpt2_small())])
        .collect();
    for (name, layout) in cases {
        let total: usize = layout.iter().sum();
        let reps = if total >= 16 << 20 { 31 } else { 201 };
        let mut rng_w = data(total).0;
        let split = |v: &[f32]| -> Vec<Vec<f32>> {
            let mut at = 0;
            layout
                .iter()
                .map(|&n| {
                    at += n;
                    v[at - n..at].to_vec()
                })
                .collect()
        };
        let g = split(&data(total).1);
        let w0 = split(&rng_w);
        rng_w.clear();
        let build = |config: &str| {
            let opt = config.parse::<OptimizerConfig>().unwrap().build();
            (opt, w0.clone())
        };
        let (mut adam, mut wa) = build("adamw");
        let (mut lamb, mut wl) = build("lamb");
        let (mut lars, mut wr) = build("lars:lr=0.1,momentum=0.9,weight_decay=1e-4");
        let (mut floor, mut wf) = build("adamw");
        let (mut floor3, mut wf3) = build("adamw");
        // The floor's extra read: four streams as long as the model (w, g, m, v).
        let extra: Vec<Vec<f32>> = (0..4).map(|_| vec![0.5f32; total]).collect();
        let (mut sink, mut sink3) = (0.0f32, 0.0f32);
        let times = rotate(
            reps,
            &mut [
                &mut || {
                    adam.step_all(&mut wa, &g).unwrap();
                },
                &mut || {
                    lamb.step_all(&mut wl, &g).unwrap();
                },
                &mut || {
                    lars.step_all(&mut wr, &g).unwrap();
                },
                &mut || {
                    for e in &extra {
                        plain_floor_pass(e, &mut sink);
                    }
                    floor.step_all(&mut wf, &g).unwrap();
                },
                &mut || {
                    for e in &extra[..3] {
                        plain_floor_pass(e, &mut sink3);
                    }
                    floor3.step_all(&mut wf3, &g).unwrap();
                },
            ],
        );
        std::hint::black_box((sink, sink3));
        let t = times[0];
        println!(
            "{name:>10}: adam {:>8.3} ms; lamb {:.3}x, lars (momentum) {:.3}x; adam + read of 4 streams {:.3}x, of 3 {:.3}x",
            t * 1e3,
            times[1] / t,
            times[2] / t,
            times[3] / t,
            times[4] / t
        );
    }
}

/// Adam with gradient hygiene or options on, against plain Adam on its own buffers.
fn hygiene(sizes: &[usize]) {
    println!(
        "Adam with hygiene/options vs plain Adam: {} threads, {} kernels; median of alternating runs",
        rayon::current_num_threads(),
        simd_level()
    );
    for &n in sizes {
        let reps = if n >= 16 << 20 { 41 } else { 201 };
        let (w0, g) = data(n);
        let mut plain = Adam::new(AdamConfig::default());
        let mut wp = w0.clone();
        type Build = Box<dyn Fn() -> Adam>;
        let variants: [(&str, Build); 3] = [
            (
                "clip + check (Skip)",
                Box::new(|| {
                    let mut o = Adam::new(AdamConfig::default());
                    o.set_max_grad_norm(Some(1.0)).unwrap();
                    o.set_non_finite(NonFinite::Skip);
                    o
                }),
            ),
            (
                "scale 1024 + clip + check",
                Box::new(|| {
                    let mut o = Adam::new(AdamConfig::default());
                    o.set_grad_scale(1024.0).unwrap();
                    o.set_max_grad_norm(Some(1.0)).unwrap();
                    o.set_non_finite(NonFinite::Skip);
                    o
                }),
            ),
            (
                "adamw + amsgrad + wd",
                Box::new(|| {
                    Adam::new(AdamConfig {
                        weight_decay: 0.01,
                        decoupled_weight_decay: true,
                        amsgrad: true,
                        ..AdamConfig::adamw()
                    })
                }),
            ),
        ];
        // The same-stream reference for the norm pass: plain steps followed by a plain read-only
        // pass over the gradients (sixteen f32 accumulators per thread, so it is not
        // latency-bound).
        {
            let mut w = w0.clone();
            let mut second = Adam::new(AdamConfig::default());
            let mut sink = 0.0f32;
            let (tp, tr) = alternate(
                reps,
                || {
                    plain.step(&mut wp, &g).unwrap();
                },
                || {
                    plain_floor_pass(&g, &mut sink);
                    second.step(&mut w, &g).unwrap();
                },
            );
            std::hint::black_box(sink);
            println!(
                "{:>5} {:<26} plain {:>7.3} ms, with {:>7.3} ms: ratio {:.3}",
                label(n),
                "reference: + plain read",
                tp * 1e3,
                tr * 1e3,
                tr / tp
            );
        }
        for (name, build) in variants {
            let mut opt = build();
            let mut w = w0.clone();
            let (tp, to) = alternate(
                reps,
                || {
                    plain.step(&mut wp, &g).unwrap();
                },
                || {
                    opt.step(&mut w, &g).unwrap();
                },
            );
            println!(
                "{:>5} {name:<26} plain {:>7.3} ms, with {:>7.3} ms: ratio {:.3}",
                label(n),
                tp * 1e3,
                to * 1e3,
                to / tp
            );
        }
    }
}

fn run(args: &Args) {
    let sizes: Vec<usize> = args
        .sizes
        .iter()
        .map(|s| parse_size(s).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    println!(
        "fusedopt perf: {} threads, {} kernels, chunk {}; GB/s = 1e9 bytes/s, median of alternating runs",
        rayon::current_num_threads(),
        simd_level(),
        if args.chunk == 0 {
            DEFAULT_CHUNK_LEN
        } else {
            args.chunk
        }
    );
    println!(
        "{:<9} {:>6} {:>11} {:>11} {:>7}",
        "optimizer", "size", "engine", "reference", "ratio"
    );
    let mut rows = Vec::new();
    for name in &args.optimizers {
        for &n in &sizes {
            let mut opt =
                optimizer_by_name(name).unwrap_or_else(|| panic!("unknown optimizer {name}"));
            opt.set_chunk_len(args.chunk);
            let bytes = (bytes_per_param(opt.state_buffers()) * n) as f64;
            let mut reference = SameStream::new(opt.state_buffers(), n);
            let (mut w, g) = data(n);
            let mut w2 = w.clone();
            // Repetitions: about 0.4 s of traffic per side, at least 41.
            let reps = if args.reps > 0 {
                args.reps
            } else {
                (4e9 / bytes).clamp(41.0, 2000.0) as usize
            };
            for _ in 0..3 {
                opt.step(&mut w, &g).unwrap();
                reference.pass(&mut w2, &g).unwrap();
            }
            let (mut te, mut tr) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
            for rep in 0..reps {
                // Alternate which side goes first, so drift and cache state hit both equally.
                let mut time_engine = || {
                    let t = Instant::now();
                    opt.step(&mut w, &g).unwrap();
                    te.push(t.elapsed().as_secs_f64());
                };
                let mut time_reference = || {
                    let t = Instant::now();
                    reference.pass(&mut w2, &g).unwrap();
                    tr.push(t.elapsed().as_secs_f64());
                };
                if rep % 2 == 0 {
                    time_engine();
                    time_reference();
                } else {
                    time_reference();
                    time_engine();
                }
            }
            let row = Row {
                optimizer: name.clone(),
                size: n,
                engine: bytes / median(te) / 1e9,
                reference: bytes / median(tr) / 1e9,
            };
            println!(
                "{:<9} {:>6} {:>7.1} GB/s {:>6.1} GB/s {:>7.3}",
                row.optimizer,
                label(n),
                row.engine,
                row.reference,
                row.engine / row.reference
            );
            rows.push(row);
        }
    }
    small_adam_vs_single_thread();
    if let Some(dir) = &args.write {
        std::fs::create_dir_all(dir).unwrap();
        let mut csv = String::from("optimizer,size,engine_gbps,reference_gbps,ratio\n");
        for r in &rows {
            writeln!(
                csv,
                "{},{},{:.2},{:.2},{:.3}",
                r.optimizer,
                r.size,
                r.engine,
                r.reference,
                r.engine / r.reference
            )
            .unwrap();
        }
        std::fs::write(dir.join("perf.csv"), csv).unwrap();
        std::fs::write(dir.join("perf.svg"), svg(&rows)).unwrap();
        println!("wrote {}/perf.csv and perf.svg", dir.display());
    }
}

/// A 4096-parameter Adam step against a single-thread same-stream loop over the same buffers.
fn small_adam_vs_single_thread() {
    let n = 4096;
    let mut opt = Adam::new(AdamConfig::default());
    let mut reference = SameStream::new(2, n);
    let mut w = vec![0.1f32; n];
    let g = vec![0.01f32; n];
    let inner = 200;
    let (mut te, mut tr) = (Vec::new(), Vec::new());
    for rep in 0..203 {
        let t = Instant::now();
        for _ in 0..inner {
            opt.step(&mut w, &g).unwrap();
        }
        let e = t.elapsed().as_secs_f64() / inner as f64;
        let t = Instant::now();
        for _ in 0..inner {
            reference.pass_single(&mut w, &g).unwrap();
        }
        let r = t.elapsed().as_secs_f64() / inner as f64;
        if rep >= 3 {
            te.push(e);
            tr.push(r);
        }
    }
    let (e, r) = (median(te), median(tr));
    println!(
        "adam 4096: step {:.2} µs, single-thread same-stream loop {:.2} µs, ratio {:.2}× (target ≤ 2.5×)",
        e * 1e6,
        r * 1e6,
        e / r
    );
}

/// GB/s against size, one panel per optimizer, engine and reference lines.
fn svg(rows: &[Row]) -> String {
    let names: Vec<&str> = {
        let mut v: Vec<&str> = rows.iter().map(|r| r.optimizer.as_str()).collect();
        v.dedup();
        v
    };
    let (pw, ph, cols) = (300.0, 220.0, 3usize);
    let panels = names.len().max(1);
    let (width, height) = (pw * cols as f64, ph * panels.div_ceil(cols) as f64 + 30.0);
    let ymax = rows
        .iter()
        .map(|r| r.engine.max(r.reference))
        .fold(1.0, f64::max)
        * 1.1;
    let (smin, smax) = rows.iter().fold((f64::MAX, 0f64), |(a, b), r| {
        (a.min(r.size as f64), b.max(r.size as f64))
    });
    let mut s = String::new();
    writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#).unwrap();
    writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#).unwrap();
    writeln!(s, r##"<text x="10" y="18" font-size="13">GB/s against parameters ({} threads, {} kernels): <tspan fill="#1f77b4">fusedopt</tspan>, <tspan fill="#888">same-stream reference</tspan></text>"##, rayon::current_num_threads(), simd_level()).unwrap();
    for (p, name) in names.iter().enumerate() {
        let (ox, oy) = ((p % cols) as f64 * pw, (p / cols) as f64 * ph + 30.0);
        let (l, r, t, b) = (ox + 45.0, ox + pw - 15.0, oy + 20.0, oy + ph - 35.0);
        let x = |n: f64| l + (n.ln() - smin.ln()) / (smax.ln() - smin.ln()).max(1e-9) * (r - l);
        let y = |v: f64| b - v / ymax * (b - t);
        writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{name}</text>"#,
            l,
            oy + 14.0
        )
        .unwrap();
        writeln!(s, r#"<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{b}" stroke="black"/>"#).unwrap();
        for k in 0..=4 {
            let v = ymax * k as f64 / 4.0;
            writeln!(s, r##"<text x="{}" y="{}" text-anchor="end">{v:.0}</text><line x1="{l}" y1="{}" x2="{r}" y2="{}" stroke="#eee"/>"##, l - 4.0, y(v) + 4.0, y(v), y(v)).unwrap();
        }
        let pts: Vec<&Row> = rows.iter().filter(|r| r.optimizer == *name).collect();
        for rr in &pts {
            writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x(rr.size as f64),
                b + 14.0,
                label(rr.size)
            )
            .unwrap();
        }
        for (field, color) in [(0, "#888"), (1, "#1f77b4")] {
            let poly: Vec<String> = pts
                .iter()
                .map(|rr| {
                    format!(
                        "{:.1},{:.1}",
                        x(rr.size as f64),
                        y(if field == 0 { rr.reference } else { rr.engine })
                    )
                })
                .collect();
            writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                poly.join(" ")
            )
            .unwrap();
        }
    }
    s.push_str("</svg>\n");
    s
}
