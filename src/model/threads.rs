//! A small persistent thread pool for the forward pass (std only, no dependencies).
//!
//! [`ThreadPool::run`] calls one closure `f(index, count)` once for every `index < count`
//! (`count` = the pool's threads) and returns once all calls are done; the calling thread runs
//! index 0 itself. [`ThreadPool::run_tasks`] does the same for any number of tasks.
//! A forward pass calls it a few hundred times per token, so a call must cost microseconds:
//! the job is published through an atomic generation counter, workers spin on it for a short
//! while ([`SPIN_TIME`]) after each job and only then sleep on a condition variable, and no call
//! allocates.
//!
//! Indices are *claimed* from an atomic counter rather than tied to threads: on a machine shared
//! with other work, a worker the OS has not scheduled yet does not hold the caller up — the
//! caller (or another worker) runs its index, and a worker that arrives after the job is closed
//! skips it without touching it. Each index still runs exactly once, on one thread, so a
//! partition of work by index gives the same results whichever thread runs it.
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
    /// Bumped once per parallel `run_tasks` (and once at shutdown); workers wait for changes.
    generation: AtomicUsize,
    /// Points at a [`Job`] on the stack of the thread inside `run_tasks`; valid while `open`,
    /// and for as long as any worker that registered (`active`) while it was open runs it.
    job: AtomicPtr<()>,
    /// Task count of the current job.
    tasks: AtomicUsize,
    /// Next task index to claim.
    next: AtomicUsize,
    /// The current job accepts workers.
    open: AtomicBool,
    /// Workers registered on the current job (they may be running it).
    active: AtomicUsize,
    /// Some worker's task panicked during the current job.
    panicked: AtomicBool,
    /// Set by `Drop`: workers exit at the next generation.
    shutdown: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fixed set of worker threads that run one job (a closure over task indices) at a time.
///
/// `ThreadPool` is `Sync`; if `run` is entered while another `run` on the same pool is in
/// progress (from another thread, or nested inside a task), the second call runs all its tasks
/// inline on its own thread instead of waiting, so it never deadlocks.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: AtomicBool,
    /// Total threads including the caller.
    threads: usize,
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
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(wanted - 1);
        for index in 1..wanted {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("kvcache-worker-{index}"))
                .spawn(move || worker(s));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(_) => break,
            }
        }
        // If some spawns failed, the pool is just smaller (tasks are claimed, not assigned).
        let threads = workers.len() + 1;
        ThreadPool {
            shared,
            workers,
            busy: AtomicBool::new(false),
            threads,
        }
    }

    /// A pool with one thread per available CPU (`std::thread::available_parallelism`).
    pub fn with_available_parallelism() -> ThreadPool {
        ThreadPool::new(thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Threads in the pool, the caller included (≥ 1).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(index, threads)` once for every `index < threads` and returns when all calls
    /// have returned; the caller runs index 0. Panics (after all calls are done) if any call
    /// panicked. See [`ThreadPool::run_tasks`].
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        self.run_tasks(self.threads, f);
    }

    /// Calls `f(index, tasks)` exactly once for every `index < tasks`, spread over the pool's
    /// threads (the caller runs index 0, then claims more like the workers do), and returns
    /// when all calls have returned. Panics (after all calls are done) if any call panicked.
    ///
    /// With one thread, one task, or when entered while another `run_tasks` on this pool is in
    /// progress (from another thread, or nested inside a task), the calls run inline on the
    /// calling thread, in index order.
    pub fn run_tasks(&self, tasks: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.threads == 1 || tasks == 1 || self.busy.swap(true, Ordering::Acquire) {
            for i in 0..tasks {
                f(i, tasks);
            }
            return;
        }
        let shared = &*self.shared;
        let job: Job<'_> = f;
        shared.panicked.store(false, Ordering::Relaxed);
        shared.tasks.store(tasks, Ordering::Relaxed);
        shared.next.store(1, Ordering::Relaxed);
        shared
            .job
            .store(&job as *const Job<'_> as *mut (), Ordering::Relaxed);
        // Publishes `job`, `tasks` and `next` to workers that see `open` (SeqCst also orders it
        // with the `active` registrations, see `worker`).
        shared.open.store(true, Ordering::SeqCst);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock();
            shared.wake.notify_all();
        }

        let mine = panic::catch_unwind(AssertUnwindSafe(|| {
            f(0, tasks);
            drain(shared, f, tasks);
        }));

        // Close the job, then wait for every worker that registered while it was open: `job`
        // points into this frame and must outlive their use. Late workers see it closed.
        shared.open.store(false, Ordering::SeqCst);
        let start = Instant::now();
        let mut spins = 0u32;
        while shared.active.load(Ordering::SeqCst) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN_TIME {
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
            panic!("a kvcache thread-pool task panicked on a worker");
        }
    }
}

/// Claims and runs task indices until none are left.
fn drain(shared: &Shared, f: Job<'_>, tasks: usize) {
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            return;
        }
        f(i, tasks);
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
            .field("threads", &self.threads)
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
        if spins.is_multiple_of(64) && start.elapsed() > SPIN_TIME {
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

fn worker(shared: Arc<Shared>) {
    let mut seen = 0usize;
    loop {
        seen = wait_for_job(&shared, seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // Register, then check the job is still open (both SeqCst): either `run_tasks` closes
        // after our registration and then waits for us, or we see it closed and keep away.
        shared.active.fetch_add(1, Ordering::SeqCst);
        if shared.open.load(Ordering::SeqCst) {
            seen = shared.generation.load(Ordering::Relaxed).max(seen);
            let ptr = shared.job.load(Ordering::Relaxed) as *const Job<'static>;
            let tasks = shared.tasks.load(Ordering::Relaxed);
            // SAFETY: `open` was true after we registered in `active`, so `job` holds the
            // pointer `run_tasks` stored before opening this job (made visible by the SeqCst
            // store/load of `open`): a `Job` on `run_tasks`'s stack frame. `run_tasks` does not
            // return (nor unwind) before `active` drops to zero, and we decrement it only after
            // our last use of the job below, so the pointee and the closure it borrows are alive
            // throughout. The `'static` lifetime is never observed beyond that window.
            let job: Job<'static> = unsafe { *ptr };
            // After a panic the task that panicked is over: keep helping with the rest.
            while let Err(payload) =
                panic::catch_unwind(AssertUnwindSafe(|| drain(&shared, job, tasks)))
            {
                shared.panicked.store(true, Ordering::Relaxed);
                // Dropping the payload runs foreign code that may panic again, which would end
                // this worker before it leaves `active` and hang the caller: leak it instead.
                std::mem::forget(payload);
            }
        }
        shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}
