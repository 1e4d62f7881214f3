//! Chunk-length tuner: sweeps chunk lengths (and thread counts), prints GB/s, writes a tuning file.
//!
//! ```text
//! cargo run --release --example tune -- --optimizer adam --size 16M
//! cargo run --release --example tune -- --optimizer sgd --size 64M --threads 64 --out my.tune
//! FUSEDOPT_TUNING=fusedopt.tune cargo run --release --example train   # use it
//! ```
//!
//! Without `--threads`, thread counts 1, 2, 4, … up to the number of cores are swept and the
//! chunk length that is best at the largest count is recorded. The result is merged into the
//! tuning file (`--out`, default `fusedopt.tune`) as `chunk_len.<optimizer> = N`; the engine reads
//! it when `FUSEDOPT_TUNING` names the file, or after `fusedopt::Tuning::load(path)?.install()`.

mod common;

use clap::Parser;
use common::roofline::{SameStream, bytes_per_param};
use common::{data, median, parse_size};
use fusedopt::*;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

/// Sweep chunk lengths and thread counts for one optimizer and size; write the best to a file.
#[derive(Debug, Parser)]
struct Args {
    /// Optimizer to tune: sgd, momentum, nag, adagrad, rmsprop, adam or adamw, with optional
    /// overrides (`adam:amsgrad=true`); the tuning file keys the result by the optimizer's name.
    #[arg(long, default_value = "adam")]
    optimizer: OptimizerConfig,
    /// Parameters per step (K = 1024, M = 1024²).
    #[arg(long, default_value = "16M")]
    size: String,
    /// Tune for this thread count only [default: sweep 1, 2, 4, … cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Chunk lengths to try, comma-separated [default: 4K … 1M in powers of two].
    #[arg(long, value_delimiter = ',')]
    chunks: Vec<String>,
    /// Timed steps per measurement (the median is used).
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Tuning file to update.
    #[arg(long, default_value = "fusedopt.tune")]
    out: PathBuf,
    /// Print the table but do not write the file.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let n = parse_size(&args.size)?;
    let chunks: Vec<usize> = if args.chunks.is_empty() {
        (12..=20).map(|p| 1usize << p).collect()
    } else {
        args.chunks
            .iter()
            .map(|c| parse_size(c))
            .collect::<Result<_, _>>()?
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = match args.threads {
        Some(t) => vec![t.max(1)],
        None => {
            let mut v: Vec<usize> = std::iter::successors(Some(1), |&t| Some(t * 2))
                .take_while(|&t| t < cores)
                .collect();
            v.push(cores);
            v
        }
    };
    let name = args.optimizer.name();
    let make = || args.optimizer.build();
    let states = make().state_buffers();
    let bytes = (bytes_per_param(states) * n) as f64;
    println!(
        "tuning {} at {} parameters ({:.0} MB per step), {} kernels, threads {:?}",
        args.optimizer,
        args.size,
        bytes / 1e6,
        simd_level(),
        threads
    );
    let (w0, g) = data(n);
    let bar = ProgressBar::new((threads.len() * (chunks.len() + 1)) as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} {msg} [{elapsed}<{eta}]",
    )?);
    // gbps[t][c]; the last column is the same-stream reference.
    let mut gbps = vec![vec![0.0; chunks.len() + 1]; threads.len()];
    for (ti, &t) in threads.iter().enumerate() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
        pool.install(|| -> Result<(), StepError> {
            for (ci, &chunk) in chunks.iter().enumerate() {
                bar.set_message(format!("{t} threads, chunk {chunk}"));
                let mut opt = make();
                opt.set_chunk_len(chunk);
                let mut w = w0.clone();
                opt.step(&mut w, &g)?;
                let times: Vec<f64> = (0..args.reps)
                    .map(|_| {
                        let start = Instant::now();
                        opt.step(&mut w, &g).map(|_| start.elapsed().as_secs_f64())
                    })
                    .collect::<Result<_, _>>()?;
                gbps[ti][ci] = bytes / median(times) / 1e9;
                bar.inc(1);
            }
            bar.set_message(format!("{t} threads, same-stream reference"));
            let mut reference = SameStream::new(states, n);
            let mut w = w0.clone();
            reference.pass(&mut w, &g)?;
            let times: Vec<f64> = (0..args.reps)
                .map(|_| {
                    let start = Instant::now();
                    reference
                        .pass(&mut w, &g)
                        .map(|_| start.elapsed().as_secs_f64())
                })
                .collect::<Result<_, _>>()?;
            gbps[ti][chunks.len()] = bytes / median(times) / 1e9;
            bar.inc(1);
            Ok(())
        })?;
    }
    bar.finish_and_clear();

    print!("{:>10}", "chunk");
    for t in &threads {
        print!(" {:>12}", format!("{t} thr GB/s"));
    }
    println!();
    let best: Vec<usize> = gbps
        .iter()
        .map(|row| {
            (0..chunks.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0)
        })
        .collect();
    for (ci, chunk) in chunks.iter().enumerate() {
        print!("{chunk:>10}");
        for (ti, row) in gbps.iter().enumerate() {
            let mark = if best[ti] == ci { '*' } else { ' ' };
            print!(" {:>11.1}{mark}", row[ci]);
        }
        println!();
    }
    print!("{:>10}", "reference");
    for row in &gbps {
        print!(" {:>11.1} ", row[chunks.len()]);
    }
    println!("\n(* best per thread count; reference = same-stream loop, the attainable speed)");

    let (tl, chosen) = (threads.len() - 1, chunks[best[threads.len() - 1]]);
    println!(
        "best for {name} at {} threads: chunk_len {} ({:.1} GB/s, {:.2} of the reference)",
        threads[tl],
        chosen,
        gbps[tl][best[tl]],
        gbps[tl][best[tl]] / gbps[tl][chunks.len()]
    );
    if args.dry_run {
        return Ok(());
    }
    let mut tuning = if args.out.exists() {
        Tuning::load(&args.out)?
    } else {
        Tuning::default()
    };
    tuning.per_optimizer.insert(name.to_string(), chosen);
    let comment = format!(
        "fusedopt tuning, written by examples/tune.rs\nlast run: {} at {} parameters, {} threads, {} kernels",
        args.optimizer,
        args.size,
        threads[tl],
        simd_level()
    );
    tuning.save(&args.out, &comment)?;
    println!(
        "wrote {} (use it with {}={} or fusedopt::Tuning::load)",
        args.out.display(),
        TUNING_ENV,
        args.out.display()
    );
    Ok(())
}
