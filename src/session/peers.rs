//! Jupyter clients attached to a session's kernel (the gateway's WebSocket), routed as Jupyter's own
//! server routes them: every client sees IOPub; a reply on shell, control or stdin goes to the client whose
//! request it answers (by the parent's `msg_id`); a client that reconnects with the same session id gets
//! what arrived while none was attached, and replaces a connection still open with that id.
//!
//! The session's task owns [`Peers`] and is the only one that reads the kernel, so `/v1` executions and
//! attached clients share one kernel connection. Every queue is bounded: a client that does not keep up
//! loses IOPub output first (counted), and is disconnected when a reply or a status would not fit, so one
//! slow client never holds the kernel, the session or another client back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::kernel::relay::Relayed;
use crate::kernel::{Channel, Message};

/// Clients attached to one kernel at once.
pub const MAX_PEERS: usize = 8;
/// Messages waiting for one client.
const PEER_QUEUE: usize = 1024;
/// Bytes waiting for one client.
const PEER_QUEUE_BYTES: usize = 32 << 20;
/// Requests whose replies are routed: the oldest are forgotten first (their replies are then dropped).
const ROUTES: usize = 4096;
/// What is kept for a client that reconnects (messages, bytes); beyond, the newest are dropped.
const REPLAY_MESSAGES: usize = 1024;
const REPLAY_BYTES: usize = 16 << 20;

/// Identifies one attachment within its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(pub u64);

/// What the session's task and one client's writer share.
#[derive(Debug, Default)]
struct Shared {
    queued_bytes: AtomicUsize,
    ended: Mutex<Option<&'static str>>,
    /// Cancelled when the session lets the client go: a write stuck on a client that does not read
    /// stops at once.
    let_go: tokio_util::sync::CancellationToken,
}

/// The task's end of one client.
#[derive(Debug)]
pub struct Peer {
    id: PeerId,
    /// The client's session id (`?session_id=`), or one of our own when it gave none.
    key: String,
    /// Whether the key is the client's, so a reconnect can find what it missed.
    replayable: bool,
    tx: mpsc::Sender<Arc<Relayed>>,
    shared: Arc<Shared>,
    /// IOPub messages this client missed by not keeping up.
    lost: u64,
}

/// The client's end: the messages to write, in order, and why they ended.
#[derive(Debug)]
pub struct PeerOutbox {
    rx: mpsc::Receiver<Arc<Relayed>>,
    shared: Arc<Shared>,
}

impl PeerOutbox {
    /// The next message; `None` once the session has let the client go ([`PeerOutbox::ended`] says why).
    pub async fn recv(&mut self) -> Option<Arc<Relayed>> {
        let msg = self.rx.recv().await?;
        self.shared.queued_bytes.fetch_sub(msg.size(), Ordering::SeqCst);
        Some(msg)
    }

    /// Resolves once the session has let the client go (its queue may still hold messages).
    pub async fn let_go(&self) {
        self.shared.let_go.cancelled().await
    }

    /// Why the session let the client go.
    pub fn ended(&self) -> &'static str {
        self.shared.ended.lock().unwrap().unwrap_or("the kernel's session ended")
    }
}

/// A new attachment's two ends. `session_key` is the client's own session id, if it gave one.
pub fn attachment(id: PeerId, session_key: Option<String>) -> (Peer, PeerOutbox) {
    let (tx, rx) = mpsc::channel(PEER_QUEUE);
    let shared = Arc::new(Shared::default());
    let replayable = session_key.is_some();
    let key = session_key.unwrap_or_else(|| format!("kernelbox-peer-{}", id.0));
    (Peer { id, key, replayable, tx, shared: shared.clone(), lost: 0 }, PeerOutbox { rx, shared })
}

/// What a client sends the session's task.
#[derive(Debug)]
pub enum PeerEvent {
    Attach(Peer),
    Message { from: PeerId, channel: Channel, msg: Box<Message> },
    Detach(PeerId),
}

/// What arrived for a client with a session id while none was attached.
#[derive(Debug)]
struct Replay {
    key: String,
    messages: VecDeque<Arc<Relayed>>,
    bytes: usize,
    dropped: u64,
}

/// The clients of one kernel and where replies go.
#[derive(Debug, Default)]
pub struct Peers {
    peers: Vec<Peer>,
    /// Request `msg_id` → the key of the client that sent it.
    routes: HashMap<String, String>,
    route_order: VecDeque<String>,
    replay: Option<Replay>,
}

/// May a message be dropped for a client that does not keep up? Output may (Jupyter's own server drops
/// IOPub past its rate limits); a reply or a status may not: without it the client would wait forever.
fn droppable(msg: &Relayed) -> bool {
    msg.channel == Channel::IOPub && msg.msg_type != "status"
}

impl Peers {
    /// Whether the kernel must be read for clients: one is attached, or one may come back for its output.
    pub fn is_active(&self) -> bool {
        !self.peers.is_empty() || self.replay.is_some()
    }

    pub fn is_attached(&self, id: PeerId) -> bool {
        self.peers.iter().any(|p| p.id == id)
    }

    /// Attaches a client. One with the same session id replaces the connection open under it; one coming
    /// back gets what arrived meanwhile. Over [`MAX_PEERS`], it is let go at once.
    pub fn attach(&mut self, mut peer: Peer) {
        if let Some(i) = self.peers.iter().position(|p| p.key == peer.key) {
            let old = self.peers.remove(i);
            end(&old, "replaced by a new connection with the same session id");
        }
        if self.peers.len() >= MAX_PEERS {
            end(&peer, "too many connections to this kernel");
            return;
        }
        match self.replay.take() {
            Some(replay) if replay.key == peer.key => {
                if replay.dropped > 0 {
                    tracing::info!(
                        dropped = replay.dropped,
                        "a reconnecting client missed messages over the replay bound"
                    );
                }
                for msg in replay.messages {
                    if !offer(&mut peer, msg) {
                        return;
                    }
                }
            }
            _ => {}
        }
        self.peers.push(peer);
    }

    /// Detaches a client. When the last one with a session id leaves, what follows is kept for its return.
    pub fn detach(&mut self, id: PeerId) {
        if let Some(i) = self.peers.iter().position(|p| p.id == id) {
            let peer = self.peers.remove(i);
            self.left(peer);
        }
    }

    fn left(&mut self, peer: Peer) {
        if self.peers.is_empty() && peer.replayable {
            self.replay = Some(Replay { key: peer.key, messages: VecDeque::new(), bytes: 0, dropped: 0 });
        }
    }

    /// Remembers that `from` sent the request `msg_id`, so its replies go to it.
    pub fn sent(&mut self, from: PeerId, msg_id: &str) {
        let Some(peer) = self.peers.iter().find(|p| p.id == from) else { return };
        if self.routes.insert(msg_id.to_owned(), peer.key.clone()).is_none() {
            self.route_order.push_back(msg_id.to_owned());
            if self.route_order.len() > ROUTES
                && let Some(oldest) = self.route_order.pop_front()
            {
                self.routes.remove(&oldest);
            }
        }
    }

    /// Gives a kernel's message to the clients it is for. Costs nothing when none is attached or expected.
    pub fn deliver(&mut self, channel: Channel, msg: &Message) {
        if !self.is_active() {
            return;
        }
        let for_key = match channel {
            Channel::IOPub => None,
            _ => match msg.parent_msg_id().and_then(|id| self.routes.get(id)) {
                Some(key) => Some(key.clone()),
                // A reply to `/v1`'s own requests, or to a client forgotten: nobody here asked.
                None => return,
            },
        };
        self.send(Arc::new(Relayed::new(channel, msg)), for_key.as_deref());
    }

    /// Tells every client the kernel's state (`restarting`, `dead`) as an IOPub status.
    pub fn status(&mut self, state: &str) {
        if self.is_active() {
            self.send(Arc::new(Relayed::status(state)), None);
        }
    }

    /// Lets every client go (the session ends), saying why.
    pub fn close_all(&mut self, why: &'static str) {
        for peer in self.peers.drain(..) {
            end(&peer, why);
        }
        self.replay = None;
    }

    /// Sends to every client (`key` None) or to the one with that key, or keeps it for its return.
    fn send(&mut self, msg: Arc<Relayed>, key: Option<&str>) {
        let mut gone = Vec::new();
        let mut delivered = false;
        for peer in self.peers.iter_mut().filter(|p| key.is_none_or(|k| p.key == k)) {
            delivered = true;
            if !offer(peer, msg.clone()) {
                gone.push(peer.id);
            }
        }
        for id in gone {
            self.detach(id);
        }
        if let Some(replay) = self.replay.as_mut()
            && !delivered
            && key.is_none_or(|k| k == replay.key)
        {
            if replay.messages.len() < REPLAY_MESSAGES && replay.bytes + msg.size() <= REPLAY_BYTES {
                replay.bytes += msg.size();
                replay.messages.push_back(msg);
            } else {
                replay.dropped += 1;
            }
        }
    }
}

/// Queues `msg` for `peer`. False when the peer is gone: it closed, or it fell too far behind for a message
/// that may not be dropped.
fn offer(peer: &mut Peer, msg: Arc<Relayed>) -> bool {
    if peer.tx.is_closed() {
        return false;
    }
    let size = msg.size();
    let room = peer.shared.queued_bytes.load(Ordering::SeqCst) + size <= PEER_QUEUE_BYTES;
    let droppable = droppable(&msg);
    if room {
        peer.shared.queued_bytes.fetch_add(size, Ordering::SeqCst);
        match peer.tx.try_send(msg) {
            Ok(()) => return true,
            Err(e) => {
                peer.shared.queued_bytes.fetch_sub(size, Ordering::SeqCst);
                if let mpsc::error::TrySendError::Closed(_) = e {
                    return false;
                }
            }
        }
    }
    if droppable {
        peer.lost += 1;
        metrics::counter!("kernelbox_gateway_messages_dropped_total").increment(1);
        if peer.lost.is_power_of_two() {
            tracing::info!(
                peer = peer.id.0,
                lost = peer.lost,
                "a Jupyter client does not keep up; dropping its IOPub output"
            );
        }
        true
    } else {
        end(peer, "the connection fell behind the kernel's messages");
        false
    }
}

fn end(peer: &Peer, why: &'static str) {
    peer.shared.ended.lock().unwrap().get_or_insert(why);
    peer.shared.let_go.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply_to(request: &str, msg_type: &str) -> Message {
        let mut msg = Message::request(msg_type, "kernel", json!({"status": "ok"}));
        msg.parent_header = json!({"msg_id": request});
        msg
    }

    fn output(text: &str) -> Message {
        Message::request("stream", "kernel", json!({"name": "stdout", "text": text}))
    }

    fn drain(outbox: &mut PeerOutbox) -> Vec<String> {
        let mut got = Vec::new();
        while let Ok(msg) = outbox.rx.try_recv() {
            outbox.shared.queued_bytes.fetch_sub(msg.size(), Ordering::SeqCst);
            got.push(msg.msg_type.clone());
        }
        got
    }

    #[test]
    fn every_client_sees_iopub_and_only_the_asker_gets_its_reply() {
        let mut peers = Peers::default();
        let (a, mut a_out) = attachment(PeerId(1), Some("A".into()));
        let (b, mut b_out) = attachment(PeerId(2), None);
        peers.attach(a);
        peers.attach(b);
        peers.sent(PeerId(1), "req-a");
        peers.deliver(Channel::IOPub, &output("hi"));
        peers.deliver(Channel::Shell, &reply_to("req-a", "execute_reply"));
        peers.deliver(Channel::Shell, &reply_to("someone-elses", "execute_reply"));
        peers.deliver(Channel::Stdin, &reply_to("req-a", "input_request"));
        assert_eq!(drain(&mut a_out), ["stream", "execute_reply", "input_request"]);
        assert_eq!(drain(&mut b_out), ["stream"]);
    }

    #[test]
    fn a_client_coming_back_with_its_session_id_gets_what_it_missed() {
        let mut peers = Peers::default();
        let (a, _a_out) = attachment(PeerId(1), Some("A".into()));
        peers.attach(a);
        peers.sent(PeerId(1), "req-a");
        peers.detach(PeerId(1));
        assert!(peers.is_active(), "the kernel is still read for the client's return");
        peers.deliver(Channel::IOPub, &output("while away"));
        peers.deliver(Channel::Shell, &reply_to("req-a", "execute_reply"));
        let (back, mut back_out) = attachment(PeerId(2), Some("A".into()));
        peers.attach(back);
        assert_eq!(drain(&mut back_out), ["stream", "execute_reply"]);
    }

    #[test]
    fn another_session_id_discards_what_was_kept_and_a_client_without_one_keeps_nothing() {
        let mut peers = Peers::default();
        let (a, _a_out) = attachment(PeerId(1), Some("A".into()));
        peers.attach(a);
        peers.detach(PeerId(1));
        peers.deliver(Channel::IOPub, &output("for A"));
        let (b, mut b_out) = attachment(PeerId(2), Some("B".into()));
        peers.attach(b);
        assert!(drain(&mut b_out).is_empty());
        peers.detach(PeerId(2));
        let (c, _c_out) = attachment(PeerId(3), None);
        peers.attach(c);
        peers.detach(PeerId(3));
        assert!(!peers.is_active(), "nobody can come back for it");
    }

    #[test]
    fn the_same_session_id_replaces_the_open_connection() {
        let mut peers = Peers::default();
        let (a, mut a_out) = attachment(PeerId(1), Some("A".into()));
        peers.attach(a);
        let (again, _again_out) = attachment(PeerId(2), Some("A".into()));
        peers.attach(again);
        assert_eq!(peers.peers.len(), 1);
        assert!(peers.is_attached(PeerId(2)));
        assert_eq!(a_out.ended(), "replaced by a new connection with the same session id");
        let (tx_closed, _) = (a_out.rx.try_recv().is_err(), ());
        assert!(tx_closed);
    }

    #[test]
    fn at_most_max_peers_are_attached() {
        let mut peers = Peers::default();
        let mut outs = Vec::new();
        for i in 0..=MAX_PEERS as u64 {
            let (p, out) = attachment(PeerId(i), None);
            peers.attach(p);
            outs.push(out);
        }
        assert_eq!(peers.peers.len(), MAX_PEERS);
        assert_eq!(outs.last().unwrap().ended(), "too many connections to this kernel");
    }

    #[test]
    fn a_slow_client_loses_output_first_then_is_let_go_when_a_status_cannot_wait() {
        let mut peers = Peers::default();
        let (a, a_out) = attachment(PeerId(1), None);
        peers.attach(a);
        for _ in 0..PEER_QUEUE + 10 {
            peers.deliver(Channel::IOPub, &output("x"));
        }
        assert!(peers.is_attached(PeerId(1)), "output is dropped, the client stays");
        assert_eq!(peers.peers[0].lost, 10);
        peers.status("busy");
        assert!(!peers.is_attached(PeerId(1)), "a status that cannot be queued ends the connection");
        assert_eq!(a_out.ended(), "the connection fell behind the kernel's messages");
    }

    #[test]
    fn the_byte_budget_counts_what_waits_and_frees_what_is_read() {
        let mut peers = Peers::default();
        let (a, mut a_out) = attachment(PeerId(1), None);
        peers.attach(a);
        let big = "y".repeat(PEER_QUEUE_BYTES / 2);
        peers.deliver(Channel::IOPub, &output(&big));
        peers.deliver(Channel::IOPub, &output(&big));
        assert_eq!(peers.peers[0].lost, 1, "the second half does not fit with its headers");
        assert_eq!(drain(&mut a_out).len(), 1);
        peers.deliver(Channel::IOPub, &output(&big));
        assert_eq!(drain(&mut a_out).len(), 1, "room again once read");
    }

    #[test]
    fn replies_are_routed_for_the_newest_requests_only() {
        let mut peers = Peers::default();
        let (a, mut a_out) = attachment(PeerId(1), None);
        peers.attach(a);
        for i in 0..=ROUTES {
            peers.sent(PeerId(1), &format!("req-{i}"));
        }
        peers.deliver(Channel::Shell, &reply_to("req-0", "execute_reply"));
        peers.deliver(Channel::Shell, &reply_to(&format!("req-{ROUTES}"), "kernel_info_reply"));
        assert_eq!(drain(&mut a_out), ["kernel_info_reply"]);
        assert_eq!(peers.routes.len(), ROUTES);
    }
}
