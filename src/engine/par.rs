//! Where a step's parallel work runs: the caller's rayon pool, or the optimizer's own.

use rayon::prelude::*;
use std::thread::JoinHandle;

/// A pool of threads that an optimizer owns. Dropping it joins them, so that no thread of the
/// optimizer outlives it (a C caller may unload the library next, and leak checkers see every
/// thread's memory returned).
#[derive(Debug)]
pub(crate) struct OwnPool {
    pool: Option<rayon::ThreadPool>,
    threads: Vec<JoinHandle<()>>,
}

impl OwnPool {
    /// Starts `threads` threads named `fusedopt-<i>`.
    pub(crate) fn new(threads: usize) -> Result<OwnPool, rayon::ThreadPoolBuildError> {
        let mut handles = Vec::with_capacity(threads);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .spawn_handler(|thread| {
                let handle = std::thread::Builder::new()
                    .name(format!("fusedopt-{}", thread.index()))
                    .spawn(|| thread.run())?;
                handles.push(handle);
                Ok(())
            })
            .build()?;
        Ok(OwnPool {
            pool: Some(pool),
            threads: handles,
        })
    }

    /// The pool, for [`Par::Pool`].
    pub(crate) fn pool(&self) -> &rayon::ThreadPool {
        self.pool.as_ref().expect("present until dropped")
    }
}

impl Drop for OwnPool {
    fn drop(&mut self) {
        // Dropping a rayon pool only asks its threads to stop; then wait until they have. (A
        // pool's threads never drop the optimizer that owns it, so this cannot wait on itself.)
        drop(self.pool.take());
        for thread in self.threads.drain(..) {
            // A thread that panicked has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

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
