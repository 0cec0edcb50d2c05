//! Background work of one gateway on one tracker: the charge-journal writer, the reservation
//! sweeper, WAL checkpoints, the release of dropped reservations and the reload watchers (on the
//! blocking pool: a reload compiles components and policies) are spawned here, never with
//! a bare `tokio::spawn`, so that a graceful shutdown can stop them and wait until each has
//! finished its last step (the journal writer moves what is journaled into the ledger first).

use std::future::Future;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// The tracker and the stop signal of a gateway's background tasks. Cheap to clone.
#[derive(Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `task` in the background, on the current runtime, tracked.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Run blocking work (a loop that waits on a channel, CPU-heavy reloads) on the runtime's
    /// blocking pool, tracked.
    pub fn spawn_blocking<F>(&self, task: F)
    where
        F: FnOnce() + Send + 'static,
    {
        self.tracker.spawn_blocking(task);
    }

    /// Run `task` on `handle` (from code that may not be inside the runtime, such as a `Drop`).
    pub fn spawn_on<F>(&self, handle: &tokio::runtime::Handle, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, handle);
    }

    /// Resolves when the gateway asks its background tasks to finish.
    pub fn stopping(&self) -> WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// Ask every task to finish its last step and wait until all have.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_waits_for_every_task_to_finish_its_last_step() {
        let bg = Background::new();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..3 {
            let (stopping, done) = (bg.stopping(), done.clone());
            bg.spawn(async move {
                stopping.await;
                tokio::task::yield_now().await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        bg.stop().await;
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
