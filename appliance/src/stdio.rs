//! Standard output and error for the command-line tools, without the panic of `println!`.
//!
//! `println!` panics when standard output is a pipe whose reader has gone
//! (`atlasmesh image status | head -1`), and `eprintln!` likewise for standard error. The tools
//! write through [`outln!`] and [`errln!`] instead:
//! - a failed write to standard output is an error ([`StdoutError`]) that the command returns
//!   like any other, so a report that was not delivered (a full disk, say) never exits 0; a
//!   reader that has gone is recognised by `main`, which then exits quietly with status 141
//!   (128 + SIGPIPE), as a shell shows for coreutils in the same place;
//! - a failed write to standard error is ignored: there is nowhere left to report it.
//!
//! Rust ignores SIGPIPE, so these are plain `EPIPE` errors; the process is never killed half
//! way through work such as a flash because its output went unread.

use std::fmt;
use std::io::{self, Write};

/// Writing to standard output failed.
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct StdoutError(#[source] pub io::Error);

impl StdoutError {
    /// The reader of the pipe has gone: not worth a message, nobody reads it.
    pub fn is_broken_pipe(&self) -> bool {
        self.0.kind() == io::ErrorKind::BrokenPipe
    }
}

/// Writes `args` to standard output and flushes, so an error shows here and not at exit.
pub fn out(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(StdoutError)
}

/// Writes `args` to standard error, ignoring failure.
pub fn err(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// Whether `err` is (or was caused by) a write to standard output whose reader has gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<StdoutError>()
            .is_some_and(StdoutError::is_broken_pipe)
    })
}

/// `println!` that returns `Result<(), StdoutError>` instead of panicking; see the module docs.
#[macro_export]
macro_rules! outln {
    () => { $crate::stdio::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::stdio::out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that returns `Result<(), StdoutError>` instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdio::out(format_args!($($arg)*)) };
}

/// `eprintln!` that ignores a closed standard error instead of panicking.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::stdio::err(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that ignores a closed standard error instead of panicking.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::stdio::err(format_args!($($arg)*)) };
}

/// `err` and its causes joined by `: `, as anyhow's `{:#}` shows them, but each said once.
/// Our library errors name their cause in their own message, so that they read whole when
/// shown alone; `{:#}` then repeats it ("writing /dev/sdb: No space left on device (os error
/// 28): No space left on device (os error 28)").
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::causes;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("writing /dev/sdb: {source}")]
    struct Write {
        source: io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once_and_others_are_added() {
        let full = io::Error::new(io::ErrorKind::StorageFull, "No space left on device");
        let err = anyhow::Error::new(Write { source: full }).context("flashing depot.img");
        assert_eq!(
            causes(err.as_ref()),
            "flashing depot.img: writing /dev/sdb: No space left on device"
        );
        // What anyhow alone shows, for contrast: the cause twice.
        assert!(format!("{err:#}").ends_with("device: No space left on device"));
    }
}
