//! The events stream: every decision of the proxy, one JSON line each (`link::Event`), to the service's
//! one subscriber. A newer subscriber replaces the older (which is closed): the service reconnects after a
//! hiccup, and only one service owns a proxy. Connections never wait on it: events go through a bounded
//! queue, dropped (and counted, logged now and then) when it is full; while no one subscribes they wait
//! in the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::egress::link::{self, Event};

/// Events waiting for the subscriber.
pub const QUEUE: usize = 4096;
/// How long one line may take to write before the subscriber is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often dropped events are reported (when there are new ones).
const DROP_REPORT: Duration = Duration::from_secs(60);

/// The sending side, shared by every connection.
#[derive(Debug, Clone)]
pub struct EventsHub {
    events: mpsc::Sender<Event>,
    subscribers: mpsc::Sender<TcpStream>,
    /// Events dropped because the queue was full, since the start.
    dropped: Arc<AtomicU64>,
}

impl EventsHub {
    /// Starts the writer, which stops with `stop`.
    pub fn start(tracker: &TaskTracker, stop: CancellationToken) -> EventsHub {
        let (events, events_rx) = mpsc::channel(QUEUE);
        let (subscribers, subscribers_rx) = mpsc::channel(4);
        let dropped = Arc::new(AtomicU64::new(0));
        tracker.spawn(write_events(events_rx, subscribers_rx, dropped.clone(), stop));
        EventsHub { events, subscribers, dropped }
    }

    /// Queues an event; never waits.
    pub fn emit(&self, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes `stream` the subscriber (the older one is closed).
    pub async fn subscribe(&self, stream: TcpStream) {
        let _ = self.subscribers.send(stream).await;
    }
}

/// What the writer does next.
enum Step {
    Stop,
    Subscriber(TcpStream),
    Event(Event),
    Written,
    SubscriberGone,
    Report,
}

/// The writer: one subscriber at a time, one line at a time.
async fn write_events(
    mut events: mpsc::Receiver<Event>,
    mut subscribers: mpsc::Receiver<TcpStream>,
    dropped: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut current: Option<TcpStream> = None;
    // A line taken from the queue and not yet written whole: it goes to the next subscriber if this one fails.
    let mut pending: Option<Vec<u8>> = None;
    let mut report = tokio::time::interval(DROP_REPORT);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut reported = 0;
    loop {
        let step = match (current.as_mut(), pending.as_deref()) {
            (Some(subscriber), Some(line)) => tokio::select! {
                biased;
                _ = stop.cancelled() => Step::Stop,
                new = subscribers.recv() => new.map_or(Step::Stop, Step::Subscriber),
                written = tokio::time::timeout(WRITE_TIMEOUT, subscriber.write_all(line)) => match written {
                    Ok(Ok(())) => Step::Written,
                    _ => Step::SubscriberGone,
                },
            },
            (subscriber, _) => {
                let subscribed = subscriber.is_some();
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => Step::Stop,
                    new = subscribers.recv() => new.map_or(Step::Stop, Step::Subscriber),
                    () = closed(subscriber), if subscribed => Step::SubscriberGone,
                    event = events.recv(), if subscribed && pending.is_none() => event.map_or(Step::Stop, Step::Event),
                    _ = report.tick() => Step::Report,
                }
            }
        };
        match step {
            Step::Stop => return,
            Step::Subscriber(new) => {
                if current.replace(new).is_some() {
                    tracing::info!("a new egress events subscriber replaces the older");
                }
            }
            Step::Event(event) => pending = Some(link::encode_event(&event)),
            Step::Written => pending = None,
            Step::SubscriberGone => {
                tracing::debug!("the egress events subscriber is gone");
                current = None;
            }
            Step::Report => {
                let now = dropped.load(Ordering::Relaxed);
                if now > reported {
                    tracing::warn!(dropped = now - reported, total = now, "egress events dropped: the queue was full");
                    reported = now;
                }
            }
        }
    }
}

/// Returns when the subscriber closes its side (it sends nothing: whatever it sends is dropped).
async fn closed(subscriber: Option<&mut TcpStream>) {
    let Some(subscriber) = subscriber else { return std::future::pending().await };
    let mut sink = [0u8; 256];
    while let Ok(1..) = subscriber.read(&mut sink).await {}
}
