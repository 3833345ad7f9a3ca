//! Giving memory back to the system once encoders close.
//!
//! glibc's malloc keeps what it frees for reuse. After a flood of sessions
//! (each with an x264 encoder, its frames and its threads) the host's RSS
//! stayed where the flood took it: three floods of 128 sessions at
//! 1280x720, all guests gone, left 524, 996, then 1,415 MB. Limiting
//! arenas (M_ARENA_MAX 1 or 2) did not help; a fixed mmap threshold did
//! (160–270 MB) but makes every frame buffer fresh pages (5.2 ms instead of
//! 0.5 ms to fill 8 MB here). `malloc_trim(0)` after the sessions ended
//! brought it back to 69–75 MB every time, in 15–65 ms. So when an encoder
//! closes, a background thread trims, at most once a second, after the
//! closes of a flood have come in.

/// Asks for freed memory to be returned to the system soon.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn trim_soon() {
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::Duration;

    /// Closes that come within this time share one trim.
    const GATHER: Duration = Duration::from_secs(1);

    #[derive(Default)]
    struct Trimmer {
        asked: Mutex<bool>,
        cv: Condvar,
    }
    static TRIMMER: OnceLock<&'static Trimmer> = OnceLock::new();

    let t = TRIMMER.get_or_init(|| {
        let t: &'static Trimmer = Box::leak(Box::default());
        let spawned = std::thread::Builder::new().name("hxfr-trim".into()).spawn(move || {
            loop {
                let mut asked = t.cv.wait_while(t.asked.lock().unwrap(), |asked| !*asked).unwrap();
                *asked = false;
                drop(asked);
                std::thread::sleep(GATHER);
                // SAFETY: malloc_trim only hands free pages back to the
                // kernel; it takes glibc's own locks and is thread-safe.
                unsafe { libc::malloc_trim(0) };
            }
        });
        if let Err(e) = spawned {
            tracing::debug!("no memory trimming: {e}");
        }
        t
    });
    *t.asked.lock().unwrap() = true;
    t.cv.notify_one();
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn trim_soon() {}
