//! Large buffers go back to the operating system when freed.
//!
//! glibc's allocator serves a block of 128 KiB or more with its own `mmap`
//! at first, but it raises that threshold each time such a block is freed
//! (up to 32 MiB). After that, the pages of large reads and event payloads
//! come from the heap arenas, one per thread, which keep what is freed.
//! A burst of large reads then leaves the process's resident memory tens of
//! megabytes above what it holds. With the threshold fixed, each large
//! block is unmapped when freed.
//!
//! glibc takes the fixed threshold only from its environment at start
//! (`MALLOC_MMAP_THRESHOLD_`), and this crate has no unsafe code to call
//! `mallopt`. So the process starts itself again once, first thing, with
//! the variable set, unless it is set already (to any value: an operator's
//! choice is kept).

/// The threshold: glibc's own default before it starts to adjust it.
const THRESHOLD: &str = "131072";
const VARIABLE: &str = "MALLOC_MMAP_THRESHOLD_";

/// On Linux with glibc, replaces the process with itself (same pid,
/// arguments and streams) with the threshold fixed; returns only if that
/// is not needed or not possible (then it says why on stderr). Call it
/// before any thread is started.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn fix_mmap_threshold() {
    use std::os::unix::process::CommandExt;

    if std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("eventfold: cannot find its own executable ({e}): freed large buffers may stay resident");
            return;
        }
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let error = std::process::Command::new(&exe).arg0(arg0).args(args).env(VARIABLE, THRESHOLD).exec();
    eprintln!("eventfold: cannot restart with {VARIABLE} set ({error}): freed large buffers may stay resident");
}

/// The command `command` without the variable: programs eventfold starts
/// (the private PostgreSQL) keep their own allocator's behaviour.
pub(crate) fn without_threshold(command: &mut std::process::Command) -> &mut std::process::Command {
    command.env_remove(VARIABLE)
}

/// Elsewhere the allocator is not glibc's: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn fix_mmap_threshold() {}
