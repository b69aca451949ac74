//! Log lines a test can read back: the gateway's tracing output on the
//! test's thread, captured while a guard lives.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

/// Log lines written while the guard lives (current-thread tests only).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Sends this thread's log lines to `logs` while the guard lives.
pub fn capture(logs: &Captured) -> tracing::subscriber::DefaultGuard {
    let writer = logs.clone();
    tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
}
