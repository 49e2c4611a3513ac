//! The scheduling class of the core's background threads.
//!
//! A thread of Linux's default class that wakes up preempts the thread running on its core when
//! it has waited longer; on a core that serves requests, that lands the background thread's run
//! in the middle of a request's. A thread of the batch class (`SCHED_BATCH`) gets the same fair
//! share of the CPU, but never preempts on waking: it runs when the request threads sleep or their
//! slice ends. While the process leaves CPU to spare they sleep often and it runs within a
//! fraction of a millisecond; on a saturated core each of its wake-ups waits for a slice, several
//! milliseconds. `Chooser` keeps a thread with a deadline in the batch class only while that
//! costs it nothing: the journal's syncer on an interval, whose deadline is the next tick.

use std::io;
use std::time::{Duration, Instant};

/// The share of its cores a process uses from which a `Chooser` keeps its thread in the
/// default class (the ledger writer's threshold too, `gateway/ledger_writer.py`).
pub const BUSY: f64 = 0.85;
/// How long a thread found late stays in the default class.
pub const HOLD: Duration = Duration::from_secs(10);
/// The shortest window the process's CPU use is measured over.
const WINDOW: Duration = Duration::from_millis(100);

/// Picks the class of the thread that owns it, each time it is about to work: the batch class
/// while the process used less than `BUSY` of the cores it may run on (its affinity and cgroup
/// limit, `available_parallelism`) over the last window, the default class while it used more,
/// and for `HOLD` after the thread began its work later than it tolerates (the CPU short in a
/// way the process's own use does not show: other processes, a parent cgroup's limit).
#[derive(Debug)]
pub struct Chooser {
    cores: f64,
    /// When the process's CPU time was last read, and what it was.
    measured: (Instant, Duration),
    busy: bool,
    default_until: Option<Instant>,
    /// The class the thread is in: the batch one, or not.
    batch: bool,
    /// The system refused a change of class once: the thread stays where it is, untried again.
    refused: bool,
}

impl Chooser {
    /// For the calling thread, in the default class until its first `choose`.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            cores: cores as f64,
            measured: (Instant::now(), process_cpu_time()),
            busy: false,
            default_until: None,
            batch: false,
            refused: false,
        }
    }

    /// Moves the calling thread to the class it should work in now, having begun this round of
    /// work `late` after it was due (`tolerance`: how late is late); returns whether it is in
    /// the batch class. A class the system refuses leaves the thread where it is, from then on.
    pub fn choose(&mut self, late: Duration, tolerance: Duration) -> bool {
        let now = Instant::now();
        if let Some(share) = self.sample(now) {
            self.busy = share >= BUSY;
        }
        let batch = self.wanted(now, late, tolerance);
        if batch != self.batch && !self.refused {
            let entered = if batch {
                enter_batch()
            } else {
                enter_default()
            };
            match entered {
                Ok(()) => self.batch = batch,
                Err(error) => {
                    self.refused = true;
                    tracing::info!(%error, batch, "a thread's scheduling class cannot be changed");
                }
            }
        }
        self.batch
    }

    /// The share of its cores the process used since the last sample, once a window has passed
    /// since it.
    fn sample(&mut self, now: Instant) -> Option<f64> {
        let (then, cpu_then) = self.measured;
        let wall = now.saturating_duration_since(then);
        if wall < WINDOW {
            return None;
        }
        let cpu = process_cpu_time();
        self.measured = (now, cpu);
        Some(cpu.saturating_sub(cpu_then).as_secs_f64() / wall.as_secs_f64() / self.cores)
    }

    /// Whether the thread should work in the batch class now, having begun `late`.
    fn wanted(&mut self, now: Instant, late: Duration, tolerance: Duration) -> bool {
        if self.batch && late > tolerance {
            self.default_until = Some(now + HOLD);
        }
        !self.busy && self.default_until.is_none_or(|until| now >= until)
    }
}

impl Default for Chooser {
    fn default() -> Self {
        Self::new()
    }
}

/// The CPU time of every thread of the process so far, those that have ended included.
pub fn process_cpu_time() -> Duration {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

/// Items of a long loop a background thread works through between two offers of its core
/// (`offer_core`): about half a millisecond of a ledger write or of a drain's conversion.
pub const OFFER_EVERY: usize = 256;

/// In a background thread's long loop, at its item `index`: every `OFFER_EVERY` items, lets a
/// thread ready to run on this core have it (`sched_yield`). Where a request thread shares the
/// core with a background one of the same class, the scheduler switches between the two at its
/// tick (4 ms at the usual 250 Hz) unless one sleeps or yields: a ledger write of thousands of
/// events held a request that was ready for that long, the gateway's p99 at saturation. A yield
/// does not change the threads' shares of the core, only the length of the background thread's
/// turns. Costs a system call when it yields, nothing in between.
pub fn offer_core(index: usize) {
    if offers_at(index) {
        std::thread::yield_now();
    }
}

/// Whether `offer_core` yields at item `index`: after every `OFFER_EVERY` items, not before the
/// first.
fn offers_at(index: usize) -> bool {
    index > 0 && index.is_multiple_of(OFFER_EVERY)
}

/// Moves the calling thread to the batch class. Any thread may enter it, and leave it for the
/// default one (`enter_default`); an error (another system, a policy that forbids it) leaves the
/// thread in its class.
pub fn enter_batch() -> io::Result<()> {
    set_class(Class::Batch)
}

/// Moves the calling thread to the default class (`SCHED_OTHER`).
pub fn enter_default() -> io::Result<()> {
    set_class(Class::Default)
}

#[derive(Debug, Clone, Copy)]
enum Class {
    Default,
    Batch,
}

#[cfg(target_os = "linux")]
#[expect(
    unsafe_code,
    reason = "sched_setscheduler has no safe binding in the crates the core uses"
)]
fn set_class(class: Class) -> io::Result<()> {
    let policy = match class {
        Class::Default => libc::SCHED_OTHER,
        Class::Batch => libc::SCHED_BATCH,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the call reads `param`, which lives across it; pid 0 is the calling thread (Linux
    // schedules threads, and applies the class to this one alone).
    let status = unsafe { libc::sched_setscheduler(0, policy, &raw const param) };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_class(_: Class) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The class of thread `tid` of this process (`"thread-self"`: the calling thread), as
/// `sched_getscheduler` numbers them (`libc::SCHED_*`): the kernel's own view.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn class_of(tid: &str) -> io::Result<i32> {
    // The 41st field of the thread's `stat`; the 3rd is the first after the command's `)`.
    stat_field(tid, 41)
}

/// The calling thread's id.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn current_tid() -> io::Result<i32> {
    stat_field("thread-self", 1)
}

#[cfg(all(test, target_os = "linux"))]
fn stat_field(tid: &str, field: usize) -> io::Result<i32> {
    let path = if tid == "thread-self" {
        "/proc/thread-self/stat".to_owned()
    } else {
        format!("/proc/self/task/{tid}/stat")
    };
    let stat = std::fs::read_to_string(path)?;
    let value = match field {
        1 => stat.split_whitespace().next(),
        _ => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(field.checked_sub(3)?)),
    };
    value
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no field {field} in the thread's stat")))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_enters_the_batch_class_and_its_siblings_stay_in_theirs() {
        let before = class_of("thread-self").ok();
        assert!(before.is_some_and(|class| class != libc::SCHED_BATCH));
        let entered = std::thread::spawn(|| {
            enter_batch()?;
            let tid = current_tid()?;
            // Read both ways: by the thread itself, and by its id as another thread would.
            Ok::<_, io::Error>((class_of("thread-self")?, class_of(&tid.to_string())?))
        })
        .join()
        .unwrap_or_else(|_| panic!("the thread panicked"));
        assert_eq!(entered.ok(), Some((libc::SCHED_BATCH, libc::SCHED_BATCH)));
        assert_eq!(class_of("thread-self").ok(), before);
    }

    #[test]
    fn a_chooser_wants_batch_unless_the_process_is_busy_or_the_thread_was_late_lately() {
        let mut chooser = Chooser::new();
        let (now, tolerance) = (Instant::now(), Duration::from_millis(5));
        let on_time = Duration::from_millis(5);
        assert!(chooser.wanted(now, on_time, tolerance));
        chooser.batch = true;
        chooser.busy = true;
        assert!(!chooser.wanted(now, on_time, tolerance), "busy");
        chooser.busy = false;
        assert!(chooser.wanted(now, on_time, tolerance));
        let late = Duration::from_millis(6);
        assert!(!chooser.wanted(now, late, tolerance), "late");
        chooser.batch = false;
        assert!(!chooser.wanted(now + HOLD / 2, on_time, tolerance), "held");
        assert!(
            chooser.wanted(now + HOLD, on_time, tolerance),
            "held no longer"
        );
        // Late in the default class is no news: its lateness is not the batch class's doing.
        assert!(chooser.wanted(now + HOLD, late, tolerance));
    }

    #[test]
    fn a_long_loop_offers_the_core_after_every_offer_every_items() {
        let offered: Vec<usize> = (0..4 * OFFER_EVERY + 1).filter(|&i| offers_at(i)).collect();
        assert_eq!(
            offered,
            vec![
                OFFER_EVERY,
                2 * OFFER_EVERY,
                3 * OFFER_EVERY,
                4 * OFFER_EVERY
            ]
        );
    }

    #[test]
    fn a_chooser_samples_the_process_s_cpu_once_a_window() {
        let mut chooser = Chooser::new();
        let began = chooser.measured.0;
        assert_eq!(chooser.sample(began + WINDOW / 2), None);
        // The process uses half a window of CPU time (this thread spinning, others beside it).
        let until = chooser.measured.1 + WINDOW / 2;
        while process_cpu_time() < until {
            std::hint::black_box(0u64);
        }
        let share = chooser.sample(began + WINDOW);
        assert!(
            share.is_some_and(|share| share * chooser.cores >= 0.5),
            "{share:?}"
        );
        assert_eq!(chooser.sample(began + WINDOW + WINDOW / 2), None);
    }

    #[test]
    fn a_chooser_moves_its_thread_between_the_classes() {
        let classes = std::thread::spawn(|| {
            let mut chooser = Chooser::new();
            let tolerance = Duration::from_millis(5);
            let batch = chooser.choose(Duration::ZERO, tolerance);
            let first = class_of("thread-self").ok();
            chooser.busy = true;
            chooser.measured.0 = Instant::now(); // no new sample
            let busy = chooser.choose(Duration::ZERO, tolerance);
            (batch, first, busy, class_of("thread-self").ok())
        })
        .join()
        .unwrap_or_else(|_| panic!("the thread panicked"));
        // No window has passed by the first choice: the process is not busy yet.
        let (batch, first, busy, last) = classes;
        assert!(batch);
        assert_eq!(first, Some(libc::SCHED_BATCH));
        assert!(!busy);
        assert_eq!(last, Some(libc::SCHED_OTHER));
    }
}
