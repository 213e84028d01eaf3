//! A cell the kernel was running when this run of the service adopted it: its caller was the earlier
//! run's, cut off when that run died. A service restart must not kill long work, so the cell may finish:
//! the session is `busy` until it has, and executions wait in the queue behind it as they wait behind any
//! running execution (their own timeouts start when they run).
//!
//! Its end is the reply to a `kernel_info_request` sent on shell at adoption: a kernel answers shell
//! requests in order. It is bounded like the longest execution the operator allows (`--max-timeout-s`,
//! from the adoption): past it the kernel is interrupted, and restarted if it is still busy after the
//! interrupt grace, as a timed-out execution is.

use std::time::Duration;

use tokio::time::Instant;

use crate::kernel::{Channel, Message};
use crate::session::model::SessionStatus;

use super::Actor;

pub(super) struct Orphan {
    /// The shell request whose reply marks the cell's end.
    marker: String,
    /// When the kernel is interrupted, then (once it was) restarted.
    deadline: Instant,
    interrupted: bool,
}

impl Orphan {
    pub(super) fn new(marker: String, limit: Duration) -> Self {
        Orphan { marker, deadline: Instant::now() + limit, interrupted: false }
    }

    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Actor {
    /// A kernel message while an orphaned cell runs: the marker's reply ends it.
    pub(super) fn orphan_ended(&mut self, channel: Channel, msg: &Message) {
        let Some(orphan) = &self.orphan else { return };
        if channel == Channel::Shell && msg.parent_msg_id() == Some(orphan.marker.as_str()) {
            tracing::info!(session_id = %self.session.id, "the cell running since the adoption has ended");
            self.orphan = None;
            if self.session.snapshot().status == SessionStatus::Busy {
                self.session.set_status(SessionStatus::Idle);
            }
        }
    }

    /// The orphaned cell ran past its bound: interrupt it, then (still running after the grace) restart.
    pub(super) async fn orphan_overdue(&mut self) {
        let Some(orphan) = self.orphan.as_mut() else { return };
        if orphan.interrupted {
            tracing::warn!(session_id = %self.session.id, "the cell running since the adoption ignored the interrupt; restarting");
            let _ = self.restart().await;
            return;
        }
        orphan.interrupted = true;
        orphan.deadline = Instant::now() + self.interrupt_grace;
        tracing::info!(session_id = %self.session.id, "the cell running since the adoption ran past the longest execution allowed; interrupting");
        self.interrupt().await;
    }
}
