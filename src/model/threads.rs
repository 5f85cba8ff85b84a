//! A small persistent thread pool for the forward pass (std only, no dependencies).
//!
//! [`ThreadPool::run`] runs one closure on every thread of the pool — the calling thread takes
//! index 0, the `threads - 1` workers take `1..threads` — and returns once all of them are done.
//! A forward pass calls it a few hundred times per token, so a call must cost microseconds:
//! the job is published through an atomic generation counter, workers spin on it for a short
//! while ([`SPIN_TIME`]) after each job and only then sleep on a condition variable, and no call
//! allocates.
//!
//! A panic inside the closure, on any thread, is caught; `run` still waits for every thread
//! and then panics on the caller (with the caller's own payload when the caller panicked), so a
//! worker panic never deadlocks the caller and the pool stays usable afterwards.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker (and a caller waiting for workers) spins before it sleeps (yields).
pub const SPIN_TIME: Duration = Duration::from_micros(100);

/// The job type: called as `f(thread_index, thread_count)`.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync + 'a);

struct Shared {
    /// Bumped once per `run` (and once at shutdown); workers wait for it to change.
    generation: AtomicUsize,
    /// Points at a [`Job`] on the stack of the thread inside `run`, valid while a job is out.
    job: AtomicPtr<()>,
    /// Workers that have not finished the current job yet.
    pending: AtomicUsize,
    /// Some worker's job panicked during the current `run`.
    panicked: AtomicBool,
    /// Set by `Drop`: workers exit at the next generation.
    shutdown: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Total threads including the caller.
    threads: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fixed set of worker threads that run one closure at a time on all threads.
///
/// `ThreadPool` is `Sync`; if `run` is entered while another `run` on the same pool is in
/// progress (from another thread, or nested inside a job), the second call runs its closure
/// inline on its own thread as `f(0, 1)` instead of waiting, so it never deadlocks.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: AtomicBool,
}

impl ThreadPool {
    /// A pool of `threads` threads in total, the caller included (`0` is taken as `1`; `1`
    /// starts no workers and runs every job inline). If the OS refuses to start a worker the
    /// pool keeps the ones it got.
    pub fn new(threads: usize) -> ThreadPool {
        let wanted = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            threads: wanted,
        });
        let mut workers = Vec::with_capacity(wanted - 1);
        for index in 1..wanted {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("kvcache-worker-{index}"))
                .spawn(move || worker(s, index));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(_) => break,
            }
        }
        if workers.len() + 1 != wanted {
            // Some spawns failed: shut down the ones we got and start over with that many.
            let got = workers.len() + 1;
            drop(ThreadPool {
                shared,
                workers,
                busy: AtomicBool::new(false),
            });
            return ThreadPool::new(got.min(wanted - 1));
        }
        ThreadPool {
            shared,
            workers,
            busy: AtomicBool::new(false),
        }
    }

    /// A pool with one thread per available CPU (`std::thread::available_parallelism`).
    pub fn with_available_parallelism() -> ThreadPool {
        ThreadPool::new(thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Threads in the pool, the caller included (≥ 1).
    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `f(index, threads)` once on every thread of the pool (the caller is index 0) and
    /// returns when all calls have returned. Panics (after every thread is done) if any call
    /// panicked.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.threads;
        if n == 1 || self.busy.swap(true, Ordering::Acquire) {
            f(0, 1);
            return;
        }
        let shared = &*self.shared;
        let job: Job<'_> = f;
        shared.panicked.store(false, Ordering::Relaxed);
        shared.pending.store(n - 1, Ordering::Relaxed);
        shared
            .job
            .store(&job as *const Job<'_> as *mut (), Ordering::Relaxed);
        // Publishes `job` and `pending` (SeqCst also orders it before the `sleepers` check).
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock();
            shared.wake.notify_all();
        }

        let mine = panic::catch_unwind(AssertUnwindSafe(|| f(0, n)));

        // Wait for every worker: `job` points into this frame and must outlive their use.
        let start = Instant::now();
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 && start.elapsed() > SPIN_TIME {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let worker_panicked = shared.panicked.load(Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);
        if let Err(payload) = mine {
            panic::resume_unwind(payload);
        }
        if worker_panicked {
            panic!("a kvcache thread-pool worker panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _guard = self.shared.lock();
            self.shared.wake.notify_all();
        }
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.shared.threads)
            .finish()
    }
}

/// Waits until the generation differs from `seen` and returns the new value.
fn wait_for_job(shared: &Shared, seen: usize) -> usize {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let g = shared.generation.load(Ordering::Acquire);
        if g != seen {
            return g;
        }
        spins = spins.wrapping_add(1);
        if spins % 64 == 0 && start.elapsed() > SPIN_TIME {
            break;
        }
        std::hint::spin_loop();
    }
    // Sleep. `run` bumps the generation and then reads `sleepers` (both SeqCst); we raise
    // `sleepers` under the lock and then read the generation (both SeqCst). Either we see the
    // new generation, or `run` sees us and notifies under the lock, which it can only take once
    // we are inside `wait` — no lost wake-up.
    let mut guard = shared.lock();
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        let g = shared.generation.load(Ordering::SeqCst);
        if g != seen {
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            return g;
        }
        guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
}

fn worker(shared: Arc<Shared>, index: usize) {
    let mut seen = 0usize;
    loop {
        seen = wait_for_job(&shared, seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let ptr = shared.job.load(Ordering::Relaxed) as *const Job<'static>;
        // SAFETY: the generation changed (Acquire), so `job` holds the pointer `run` stored
        // before bumping it: a `Job` on `run`'s stack frame. `run` does not return (nor unwind)
        // before `pending` reaches zero, and we decrement `pending` only after our last use of
        // the job below, so the pointee and the closure it borrows are alive for this call.
        // The `'static` lifetime is never observed beyond that window.
        let job: Job<'static> = unsafe { *ptr };
        let result = panic::catch_unwind(AssertUnwindSafe(|| job(index, shared.threads)));
        if result.is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}
