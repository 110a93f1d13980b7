//! OS signals, turned into events for `main`.
//!
//! - SIGTERM (Nomad's `kill_signal`, systemd, `docker stop`): graceful drain.
//! - SIGINT (Ctrl-C): the same graceful drain; a second SIGINT or SIGTERM is left to `main`,
//!   which exits at once.
//! - SIGHUP: reload the configuration file.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT.
    Shutdown(&'static str),
    /// SIGHUP.
    Reload,
}

/// Installed signal handlers.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; call it before anything can send a signal.
    ///
    /// # Errors
    /// When the OS refuses a handler.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal. Cancel safe.
    pub async fn recv(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.term.recv() => SignalEvent::Shutdown("SIGTERM"),
            _ = self.int.recv() => SignalEvent::Shutdown("SIGINT"),
            _ = self.hup.recv() => SignalEvent::Reload,
        }
    }
}
