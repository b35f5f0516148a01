//! A depot-wide bandwidth cap, shared fairly between connections.
//!
//! Bytes are paid for with permits of a FIFO-fair semaphore (1 permit = 1 KiB) refilled at the
//! configured rate. Each connection asks for one block (at most 64 KiB) at a time and queues
//! behind the others, so connections take turns: a client with many parallel requests gets no
//! more than its share per request, and none starves. Unlimited is the default and costs
//! nothing per block.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

const QUANTUM: u64 = 1024;
const TICK: Duration = Duration::from_millis(10);

#[derive(Debug)]
struct State {
    rate: Option<u64>,
    semaphore: Arc<Semaphore>,
}

/// Cheap to clone; clones share the cap.
#[derive(Debug, Clone)]
pub struct Bandwidth {
    state: Arc<Mutex<State>>,
    /// Wakes the refill task when the cap changes; without a cap it sleeps.
    changed: Arc<Notify>,
}

impl Default for Bandwidth {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Bandwidth {
    pub fn new(rate: Option<u64>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                rate,
                semaphore: Arc::new(Semaphore::new(0)),
            })),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Bytes per second, or `None` for no cap.
    pub fn rate(&self) -> Option<u64> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).rate
    }

    /// Changes the cap at once. Waiters of the old cap are released to re-queue under the new.
    pub fn set_rate(&self, rate: Option<u64>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.rate = rate.filter(|r| *r > 0);
        state.semaphore.close();
        state.semaphore = Arc::new(Semaphore::new(0));
        self.changed.notify_one();
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: usize) {
        let mut remaining = (bytes as u64).div_ceil(QUANTUM);
        while remaining > 0 {
            let (rate, semaphore) = {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                (state.rate, state.semaphore.clone())
            };
            let Some(rate) = rate else { return };
            // Never ask for more than one refill burst can ever hold.
            let burst = burst_permits(rate);
            let ask = remaining.min(burst);
            match semaphore
                .acquire_many(u32::try_from(ask).unwrap_or(u32::MAX))
                .await
            {
                Ok(permit) => {
                    permit.forget();
                    remaining -= ask;
                }
                // The cap changed; queue again under the new one.
                Err(_) => continue,
            }
        }
    }

    /// Refills the current semaphore every tick until `shutdown`; sleeps while there is no cap.
    pub fn spawn_refill(&self, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(TICK);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut carry = 0u64;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let (rate, semaphore) = {
                    let state = this.state.lock().unwrap_or_else(|p| p.into_inner());
                    (state.rate, state.semaphore.clone())
                };
                let Some(rate) = rate else {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = this.changed.notified() => {}
                    }
                    ticker.reset();
                    continue;
                };
                // Whole permits per tick, carrying the remainder so slow rates stay exact.
                let bytes = rate * TICK.as_millis() as u64 / 1000 + carry;
                let permits = bytes / QUANTUM;
                carry = bytes % QUANTUM;
                let room = burst_permits(rate).saturating_sub(semaphore.available_permits() as u64);
                let add = permits.min(room);
                if add > 0 {
                    semaphore.add_permits(add as usize);
                }
            }
        });
    }
}

/// A tenth of a second's worth, and at least one 64 KiB block.
fn burst_permits(rate: u64) -> u64 {
    (rate / 10 / QUANTUM).max(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn caps_throughput_and_can_be_lifted() {
        let shutdown = CancellationToken::new();
        let bw = Bandwidth::new(Some(1024 * 1024));
        bw.spawn_refill(shutdown.clone());
        let started = Instant::now();
        for _ in 0..8 {
            bw.acquire(64 * 1024).await;
        }
        // 512 KiB at 1 MiB/s takes about half a second.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(2),
            "{took:?}"
        );

        bw.set_rate(None);
        let started = Instant::now();
        bw.acquire(100 * 1024 * 1024).await;
        assert!(started.elapsed() < Duration::from_millis(50));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn connections_take_turns() {
        let shutdown = CancellationToken::new();
        let bw = Bandwidth::new(Some(2 * 1024 * 1024));
        bw.spawn_refill(shutdown.clone());
        let counts = Arc::new(Mutex::new([0u32; 2]));
        let mut tasks = Vec::new();
        for who in 0..2 {
            let bw = bw.clone();
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                let until = Instant::now() + Duration::from_millis(800);
                while Instant::now() < until {
                    bw.acquire(64 * 1024).await;
                    counts.lock().unwrap()[who] += 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let [a, b] = *counts.lock().unwrap();
        assert!(a.abs_diff(b) <= 2, "unfair split {a} / {b}");
        shutdown.cancel();
    }
}
