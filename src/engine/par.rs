//! Where a step's parallel work runs: the caller's rayon pool, or the optimizer's own.

use rayon::prelude::*;

/// The pool a step's tasks run on (a value, as faer passes its parallelism).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Par<'p> {
    /// The caller's pool: the one `rayon::ThreadPool::install` put the caller in, or the global
    /// one.
    Current,
    /// The optimizer's own pool.
    Pool(&'p rayon::ThreadPool),
}

impl Par<'_> {
    /// The number of threads work is spread over.
    pub(crate) fn threads(self) -> usize {
        match self {
            Par::Current => rayon::current_num_threads(),
            Par::Pool(pool) => pool.current_num_threads(),
        }
    }

    /// Runs `f(i)` for every `i` in `0..n`: on the calling thread when there is one task or one
    /// thread, else spread over the pool.
    pub(crate) fn for_each(self, n: usize, f: impl Fn(usize) + Sync + Send) {
        if n <= 1 || self.threads() == 1 {
            (0..n).for_each(f);
        } else {
            self.install(|| (0..n).into_par_iter().for_each(f));
        }
    }

    /// Runs `f(i, &mut items[i])` for every item, spread over the pool in runs of at least
    /// `min_len` items unless `inline`.
    pub(crate) fn for_each_mut<T: Send>(
        self,
        items: &mut [T],
        min_len: usize,
        inline: bool,
        f: impl Fn(usize, &mut T) + Sync + Send,
    ) {
        if inline || items.len() <= 1 || self.threads() == 1 {
            items.iter_mut().enumerate().for_each(|(i, x)| f(i, x));
        } else {
            self.install(|| {
                items
                    .par_iter_mut()
                    .enumerate()
                    .with_min_len(min_len)
                    .for_each(|(i, x)| f(i, x))
            });
        }
    }

    /// Runs `op` inside the pool (directly when the caller is already one of its threads).
    fn install<R: Send>(self, op: impl FnOnce() -> R + Send) -> R {
        match self {
            Par::Current => op(),
            Par::Pool(pool) => pool.install(op),
        }
    }
}
