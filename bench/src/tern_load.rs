//! S3 (1:1) and S4 (group fan-out) against tern: long-lived sender and
//! receiver connections, one pacer task for all senders, one reader task
//! per connection. Receivers ACK every push (batched per read burst), as a
//! real client must, so the server's offline store is cleared as it goes.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use prost::encoding::decode_varint;
use tern_proto::{RequestType, pb};
use tern_sdk::{ConnectOptions, Connection, TlsMode};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock;
use crate::flow::{Fanout, Flow, Progress, RateRun, wait_drained};
use crate::payload::Stamp;
use crate::procfs::CpuWindow;
use crate::sched::{Pacer, Schedule};
use crate::servers::Target;
use crate::users::Users;
use crate::wire::{self, Dial, Frames};

type FlowRx = watch::Receiver<Option<Arc<Flow>>>;

/// Frames queued per connection before the pacer waits.
const QUEUE: usize = 16 * 1024;

/// Connections set up for S3 or S4, reused across rate steps.
pub struct TernBed {
    target: Target,
    fanout: Fanout,
    senders: Vec<mpsc::Sender<Bytes>>,
    sequences: Vec<u32>,
    /// Receiver user (1:1) or group id (groups) of each stream.
    destinations: Vec<String>,
    receivers: usize,
    group_size: u32,
    flow_tx: watch::Sender<Option<Arc<Flow>>>,
    /// Distinguishes this process's client message ids from earlier runs
    /// against the same server (the server deduplicates them for 24 h).
    nonce: u64,
    tasks: Vec<JoinHandle<()>>,
}

fn dials(target: &Target) -> anyhow::Result<Vec<Dial>> {
    target.access.iter().map(|a| Dial::new(a, target.ca.as_deref())).collect()
}

async fn open_logged_in(dial: &Dial, token: &str) -> anyhow::Result<(Frames, wire::BoxWrite)> {
    let (read, mut write) = dial.open(None).await?;
    let mut frames = wire::frames(read);
    wire::login(&mut frames, &mut write, token, "bench").await?;
    Ok((frames, write))
}

impl TernBed {
    /// `pairs` sender → receiver pairs.
    pub async fn pairs(target: &Target, users: &Users, pairs: u32) -> anyhow::Result<TernBed> {
        let senders: Vec<String> = (0..pairs).map(|i| format!("tbs{i}")).collect();
        let receivers: Vec<String> = (0..pairs).map(|i| format!("tbr{i}")).collect();
        Self::build(target, users, Fanout::Pairs, senders, receivers.clone(), receivers, 0).await
    }

    /// `groups` groups of `size` members (one sender, `size - 1` receivers;
    /// the receivers are members of every group).
    pub async fn groups(target: &Target, users: &Users, size: u32, groups: u32) -> anyhow::Result<TernBed> {
        anyhow::ensure!(size >= 2, "a group needs a sender and a receiver");
        let owners: Vec<String> = (0..groups).map(|k| format!("tbo{k}")).collect();
        let members: Vec<String> = (0..size - 1).map(|j| format!("tbm{j}")).collect();
        let nonce: u32 = rand_u32();
        let ids: Vec<String> = (0..groups).map(|k| format!("tbg-{nonce:08x}-{size}-{k}")).collect();
        // Accounts first (tokens), then the groups, created by their owners
        // through the SDK as an app would.
        let mut all = owners.clone();
        all.extend(members.iter().cloned());
        let tokens = users.tokens(&all).await?;
        let tls = match &target.ca {
            Some(ca) => TlsMode::CaFile(ca.clone()),
            None => TlsMode::Plain,
        };
        for (k, id) in ids.iter().enumerate() {
            let mut options = ConnectOptions::new(target.access[0].clone(), tls.clone());
            options.request_timeout = Duration::from_secs(60);
            let (conn, _events) = Connection::connect(&options).await.context("SDK connect")?;
            let _: pb::LoginResponse = conn
                .request(
                    RequestType::Login,
                    &pb::LoginRequest { token: tokens[k].clone(), device_id: "setup".into() },
                )
                .await
                .context("SDK login")?;
            let create =
                pb::CreateGroupRequest { group_id: id.clone(), name: id.clone(), members: members.clone() };
            let info: pb::GroupInfo =
                conn.request(RequestType::CreateGroup, &create).await.context("CREATE_GROUP")?;
            anyhow::ensure!(
                info.members.len() == size as usize,
                "group {id} has {} members",
                info.members.len()
            );
            conn.close().await;
        }
        Self::build(target, users, Fanout::Groups, owners, members, ids, size).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn build(
        target: &Target,
        users: &Users,
        fanout: Fanout,
        sender_users: Vec<String>,
        receiver_users: Vec<String>,
        destinations: Vec<String>,
        group_size: u32,
    ) -> anyhow::Result<TernBed> {
        let dials = dials(target)?;
        let sender_tokens = users.tokens(&sender_users).await?;
        let receiver_tokens = users.tokens(&receiver_users).await?;
        let (flow_tx, flow_rx) = watch::channel(None);
        let mut tasks = Vec::new();
        let mut senders = Vec::new();
        eprintln!("  connecting {} sender(s) and {} receiver(s)…", sender_users.len(), receiver_users.len());
        // Receivers first, so nothing is sent before they are there.
        let opened: Vec<anyhow::Result<(Frames, wire::BoxWrite)>> =
            futures::stream::iter(receiver_tokens.iter().enumerate())
                .map(|(r, token)| open_logged_in(&dials[r % dials.len()], token))
                .buffered(32)
                .collect()
                .await;
        for (r, conn) in opened.into_iter().enumerate() {
            let (frames, write) = conn.with_context(|| format!("receiver {}", receiver_users[r]))?;
            let tx = wire::spawn_writer(write, QUEUE);
            tasks.push(tokio::spawn(keep_alive(tx.downgrade())));
            let login = (dials[r % dials.len()].clone(), receiver_tokens[r].clone());
            tasks.push(tokio::spawn(receiver_loop(r, login, frames, tx, flow_rx.clone())));
        }
        for (s, token) in sender_tokens.iter().enumerate() {
            let (frames, write) = open_logged_in(&dials[(s + 1) % dials.len()], token)
                .await
                .with_context(|| format!("sender {}", sender_users[s]))?;
            let tx = wire::spawn_writer(write, QUEUE);
            tasks.push(tokio::spawn(keep_alive(tx.downgrade())));
            senders.push(tx);
            tasks.push(tokio::spawn(sender_loop(s as u32, frames, flow_rx.clone())));
        }
        Ok(TernBed {
            target: target.clone(),
            fanout,
            sequences: vec![1; senders.len()],
            senders,
            destinations,
            receivers: receiver_users.len(),
            group_size,
            flow_tx,
            nonce: u64::from(rand_u32()) << 32 | u64::from(rand_u32()),
            tasks,
        })
    }

    /// One open-loop run at `rate` messages/s (over all senders).
    pub async fn run(
        &mut self,
        label: &str,
        rate: f64,
        duration: Duration,
        payload: usize,
        slo_ms: f64,
        drain: Duration,
    ) -> RateRun {
        let streams = self.senders.len() as u32;
        let sched = Schedule::new(rate, streams, duration);
        // Start a little ahead so the first sends are not already late.
        let start = clock::now_ns() + 20_000_000;
        let flow = Flow::new(crate::flow::next_run_id(), sched, start, self.fanout, self.receivers);
        self.flow_tx.send_replace(Some(flow.clone()));
        let mut procs = self.target.procs.clone();
        procs.push(("tern-bench".into(), std::process::id()));
        let cpu = CpuWindow::start(&procs);
        let scenario = if self.fanout == Fanout::Pairs { "s3" } else { "s4" };
        let progress =
            Progress::start(format!("{scenario} {} {label} {rate:.0}/s", self.target.name), flow.clone());
        let mut pacer = Pacer::new(sched, start);
        let prefix = format!("{:x}-{}-", self.nonce, flow.run);
        'send: while let Some(due) = pacer.next_due().await {
            for g in due {
                let stamp = flow.stamp(g);
                let s = stamp.stream as usize;
                let client_msg_id = format!("{prefix}{}", stamp.index);
                let content = stamp.encode(payload);
                let seq = self.sequences[s];
                self.sequences[s] = seq.checked_add(1).unwrap_or(1);
                let frame = match self.fanout {
                    Fanout::Pairs => wire::encode(
                        RequestType::SendSingle,
                        seq,
                        &pb::SendSingleRequest {
                            client_msg_id,
                            sender: String::new(),
                            receiver: self.destinations[s].clone(),
                            content,
                        },
                    ),
                    Fanout::Groups => wire::encode(
                        RequestType::SendGroup,
                        seq,
                        &pb::SendGroupRequest {
                            client_msg_id,
                            sender: String::new(),
                            group_id: self.destinations[s].clone(),
                            content,
                        },
                    ),
                };
                if self.senders[s].send(frame).await.is_err() {
                    flow.on_error(|| format!("sender {s}: connection closed"));
                    break 'send;
                }
                flow.sent.fetch_add(1, Relaxed);
            }
        }
        let drained = wait_drained(&flow, true, drain).await;
        let elapsed = Duration::from_nanos(clock::now_ns().saturating_sub(start));
        drop(progress);
        let mut run = RateRun {
            scenario: scenario.into(),
            system: "tern".into(),
            target: self.target.name.clone(),
            label: label.into(),
            group_size: self.group_size,
            streams,
            receivers: self.receivers as u32,
            offered_rate: rate,
            payload_bytes: payload,
            cpu: cpu.finish(),
            machine_cpu: cpu.machine(),
            ..RateRun::default()
        };
        run.measured(&flow, true, drained, slo_ms, duration);
        let _ = elapsed;
        run.print();
        if !drained {
            // An overloaded step leaves a backlog in the server; let it clear
            // (not measured) so it does not load the next step.
            eprintln!("  waiting up to 120 s for the server to work off the backlog…");
            wait_drained(&flow, true, Duration::from_secs(120)).await;
        }
        run
    }

    /// Closes every connection.
    pub async fn close(self) {
        // Readers first, so the closing connections are not reported as
        // errors of the last run.
        for t in self.tasks {
            t.abort();
        }
        drop(self.senders);
        drop(self.flow_tx);
    }
}

fn rand_u32() -> u32 {
    // Enough to keep ids of two benchmark processes apart.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u32) ^ std::process::id().rotate_left(16) ^ (clock::now_ns() as u32).rotate_left(7)
}

/// The current flow, refreshed when a new run starts.
fn current(rx: &mut FlowRx, cached: &mut Option<Arc<Flow>>) {
    if rx.has_changed().unwrap_or(false) {
        *cached = rx.borrow_and_update().clone();
    }
}

/// Takes the next request sequence of a connection.
fn next_seq(seq: &mut u32) -> u32 {
    let current = *seq;
    *seq = seq.checked_add(1).unwrap_or(1);
    current
}

/// Heartbeats a connection while its writer is open, so one that has
/// nothing to send between runs (a backlog being worked off, a search
/// step's pause) is not cut by the server's idle timeout.
async fn keep_alive(writer: mpsc::WeakSender<Bytes>) {
    let heartbeat = wire::encode(RequestType::Heartbeat, 0, &pb::Heartbeat {});
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let Some(tx) = writer.upgrade() else { return };
        if tx.send(heartbeat.clone()).await.is_err() {
            return;
        }
    }
}

/// Reads a sender connection: SendAcks and errors.
async fn sender_loop(stream: u32, mut frames: Frames, mut rx: FlowRx) {
    let mut flow: Option<Arc<Flow>> = None;
    while let Some(frame) = frames.next().await {
        let Ok(frame) = frame else { break };
        current(&mut rx, &mut flow);
        let Some(f) = &flow else { continue };
        match frame.kind() {
            Some(RequestType::SendSingle | RequestType::SendGroup) => {
                let Ok(ack) = frame.decode::<pb::SendAck>() else { continue };
                // client_msg_id is "<nonce>-<run>-<index>".
                let mut parts = ack.client_msg_id.rsplitn(3, '-');
                let index = parts.next().and_then(|p| p.parse::<u64>().ok());
                let run = parts.next().and_then(|p| p.parse::<u32>().ok());
                match (run, index) {
                    (Some(run), Some(index)) if run == f.run => {
                        if ack.duplicate {
                            f.on_error(|| format!("sender {stream}: unexpected duplicate ACK"));
                        } else {
                            f.on_ack(stream, index);
                        }
                    }
                    _ => {}
                }
            }
            Some(RequestType::Error) => {
                let e: pb::ErrorBody = frame.decode().unwrap_or_default();
                f.on_error(|| format!("sender {stream}: error {} {}", e.code, e.message));
            }
            Some(RequestType::Notice) => {
                let n: pb::Notice = frame.decode().unwrap_or_default();
                f.on_error(|| format!("sender {stream}: notice {:?} {}", n.kind, n.reason));
            }
            _ => {}
        }
    }
    if let Some(f) = &flow {
        f.on_error(|| format!("sender {stream}: connection closed by the server"));
    }
}

/// Reads a receiver connection: records each push and ACKs what arrived
/// in each read burst with one ACK_MESSAGES. A NOTICE SYNC (sent instead of
/// pushes for a burst of large-group messages, DELIVERY R12) is answered
/// like the SDK does: the offline set is pulled page by page, and what was
/// pulled is recorded and ACKed. A pull can return a message whose push was
/// just recorded (its ACK still on the way), so pulled and pushed ids are
/// told apart per run; a message pushed twice still counts as a duplicate.
///
/// A connection the server ends (its slow-consumer policy closes a receiver
/// that falls a queue behind) is an error of the run. The receiver then
/// does what the SDK does: it logs in again and pulls what it missed, so
/// the next runs are measured on all the receivers.
async fn receiver_loop(
    receiver: usize,
    login: (Dial, String),
    mut frames: Frames,
    mut tx: mpsc::Sender<Bytes>,
    mut rx: FlowRx,
) {
    let mut flow: Option<Arc<Flow>> = None;
    let mut seen = Seen::default();
    let mut resync = false;
    loop {
        let ended = receive(receiver, frames, tx, &mut rx, &mut flow, &mut seen, resync).await;
        current(&mut rx, &mut flow);
        let note = format!("receiver {receiver}: connection ended: {ended}");
        match &flow {
            Some(f) => f.on_error(|| note),
            None => eprintln!("  error: {note}"),
        }
        let (dial, token) = &login;
        match open_logged_in(dial, token).await {
            Ok((read, write)) => {
                frames = read;
                tx = wire::spawn_writer(write, QUEUE);
                tokio::spawn(keep_alive(tx.downgrade()));
                resync = true;
            }
            Err(e) => {
                eprintln!("  error: receiver {receiver}: cannot log in again: {e:#}");
                return;
            }
        }
    }
}

/// The messages a receiver got in the current run, by way of arrival: a
/// message pulled after being pushed (or the reverse) is one delivery, and
/// so is one pushed again after a reconnect; pushed twice on one connection
/// it is a duplicate. Kept as flags per message of the run (its place in
/// the schedule, [`Schedule::global`]): two hash sets of message ids per
/// receiver were the largest part of the generator's own CPU in S4, at a
/// thousand receivers. A receiver of 1:1 pairs gets one stream, so its
/// messages are kept by index in that stream ([`place_in_run`]).
#[derive(Default)]
struct Seen {
    run: Option<u32>,
    marks: Vec<u8>,
}

/// Pushed in this run, on any connection.
const PUSHED: u8 = 1;
/// Pushed on the current connection.
const PUSHED_HERE: u8 = 2;
/// Pulled from the offline set in this run.
const PULLED: u8 = 4;

/// How a message that arrived counts.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// Counted: the first arrival, or a push repeated on one connection
    /// (which the delivery log counts as a duplicate).
    Count,
    /// Already counted by the other way of arrival, or pushed again after
    /// a reconnect: the SDK drops it by id too.
    Skip,
}

impl Seen {
    /// Starts over for `flow`'s run if it is a new one.
    fn follow(&mut self, flow: Option<&Flow>) {
        let run = flow.map(|f| f.run);
        if run != self.run {
            self.run = run;
            self.marks.clear();
            if let Some(f) = flow {
                let places = match f.fanout {
                    Fanout::Pairs => f.sched.total_of(0),
                    Fanout::Groups => f.sched.total(),
                };
                self.marks.resize(places as usize, 0);
            }
        }
    }

    /// A new connection: nothing was pushed on it yet.
    fn reconnected(&mut self) {
        self.marks.iter_mut().for_each(|m| *m &= !PUSHED_HERE);
    }

    /// The message of the run at `global` was pushed.
    fn pushed(&mut self, global: u64) -> Arrival {
        let Some(mark) = self.marks.get_mut(global as usize) else { return Arrival::Count };
        let before = *mark;
        *mark |= PUSHED | PUSHED_HERE;
        let earlier_connection = before & PUSHED != 0 && before & PUSHED_HERE == 0;
        if before & PULLED != 0 || earlier_connection { Arrival::Skip } else { Arrival::Count }
    }

    /// The message of the run at `global` was pulled.
    fn pulled(&mut self, global: u64) -> Arrival {
        let Some(mark) = self.marks.get_mut(global as usize) else { return Arrival::Count };
        let before = *mark;
        *mark |= PULLED;
        if before & (PUSHED | PULLED) != 0 { Arrival::Skip } else { Arrival::Count }
    }
}

/// The place in `flow`'s run of a message carrying `stamp`, if it belongs
/// to that run (a late one from an earlier run is only counted as stale):
/// its index in its stream for pairs (stream 0 sends the most), its place
/// in the whole schedule for groups.
fn place_in_run(flow: Option<&Flow>, stamp: &Stamp) -> Option<u64> {
    let flow = flow?;
    if stamp.run != flow.run || stamp.stream >= flow.sched.streams() {
        return None;
    }
    Some(match flow.fanout {
        Fanout::Pairs => stamp.index,
        Fanout::Groups => flow.sched.global(stamp.stream, stamp.index),
    })
}

/// Records a message with `content` that arrived at `receiver` at `now`
/// (see [`Flow::on_delivery_at`]), if it counts: `mark` notes its arrival
/// (pushed or pulled, [`Seen`]) at its place in the run. One of an earlier
/// run is recorded (as stale) as is.
fn record_arrival(
    flow: Option<&Flow>,
    receiver: usize,
    content: &[u8],
    now: u64,
    mark: impl FnOnce(u64) -> Arrival,
) {
    let (Some(f), Some(stamp)) = (flow, Stamp::decode(content)) else { return };
    if place_in_run(flow, &stamp).map_or(Arrival::Count, mark) == Arrival::Count {
        f.on_delivery_at(receiver, &stamp, now);
    }
}

/// The id (tag 1) and content (tag 7) of a pushed `pb::Message`, read off
/// the frame's body field by field: the other fields are skipped unread
/// and the content stays a slice of the body. `None` if the body is not a
/// well-formed message, or if either field has the wrong wire type (as
/// prost would refuse it). Decoding the whole message validated four
/// strings and copied the content for every delivery, and prost's generic
/// decoding of just these two fields was still a fifth of the generator's
/// CPU in S4.
fn pushed_id_and_content(mut body: &[u8]) -> Option<(u64, &[u8])> {
    let (mut msg_id, mut content): (u64, &[u8]) = (0, &[]);
    while !body.is_empty() {
        let key = decode_varint(&mut body).ok()?;
        let (tag, wire_type) = (key >> 3, key & 7);
        match (tag, wire_type) {
            (0, _) | (1, 1..) | (7, 0 | 1 | 3..) => return None,
            (_, 0) => {
                let value = decode_varint(&mut body).ok()?;
                if tag == 1 {
                    msg_id = value;
                }
            }
            (_, 1) => body = body.get(8..)?,
            (_, 2) => {
                let len = usize::try_from(decode_varint(&mut body).ok()?).ok()?;
                let (value, rest) = body.split_at_checked(len)?;
                if tag == 7 {
                    content = value;
                }
                body = rest;
            }
            (_, 5) => body = body.get(4..)?,
            // Groups (3, 4) are not in tern's protocol; 6 and 7 do not exist.
            _ => return None,
        }
    }
    Some((msg_id, content))
}

/// The loop of [`receiver_loop`] on one connection, pulling the offline
/// set first if `resync`; returns why the connection ended.
async fn receive(
    receiver: usize,
    frames: Frames,
    tx: mpsc::Sender<Bytes>,
    rx: &mut FlowRx,
    flow: &mut Option<Arc<Flow>>,
    seen: &mut Seen,
    resync: bool,
) -> String {
    seen.reconnected();
    let mut seq: u32 = 1;
    let mut bursts = frames.ready_chunks(512);
    let mut ids = Vec::with_capacity(512);
    // The sequence of the pull in flight, and whether a SYNC came meanwhile.
    let mut pulling: Option<u32> = None;
    let mut sync_again = false;
    if resync {
        match request_pull(&tx, &mut seq, 0).await {
            Some(sequence) => pulling = Some(sequence),
            None => return "its writer stopped".into(),
        }
    }
    while let Some(batch) = bursts.next().await {
        // When the burst was read: one clock reading for all its frames (a
        // reading per delivery was 4% of the generator's time in S4).
        let now = clock::now_ns();
        current(rx, flow);
        let flow = flow.as_deref();
        seen.follow(flow);
        let mut pull_after: Option<u64> = None;
        for frame in batch {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return format!("read failed: {e}"),
            };
            match frame.kind() {
                Some(RequestType::PushMessage) => {
                    let Some((msg_id, content)) = pushed_id_and_content(&frame.body) else { continue };
                    ids.push(msg_id);
                    record_arrival(flow, receiver, content, now, |g| seen.pushed(g));
                }
                Some(RequestType::PullOffline) if pulling == Some(frame.sequence) => {
                    pulling = None;
                    let Ok(page) = frame.decode::<pb::PullOfflineResponse>() else { continue };
                    for message in &page.messages {
                        ids.push(message.msg_id);
                        record_arrival(flow, receiver, &message.content, now, |g| seen.pulled(g));
                    }
                    if page.more {
                        pull_after = page.messages.last().map(|m| m.msg_id);
                    } else if std::mem::take(&mut sync_again) {
                        pull_after = Some(0);
                    }
                }
                Some(RequestType::Notice) => {
                    let n: pb::Notice = frame.decode().unwrap_or_default();
                    if n.kind == pb::NoticeKind::Sync as i32 {
                        if pulling.is_some() {
                            sync_again = true;
                        } else {
                            pull_after = Some(0);
                        }
                    } else if let Some(f) = flow {
                        f.on_error(|| format!("receiver {receiver}: notice {:?} {}", n.kind, n.reason));
                    }
                }
                Some(RequestType::Error) => {
                    let e: pb::ErrorBody = frame.decode().unwrap_or_default();
                    if let Some(f) = flow {
                        f.on_error(|| format!("receiver {receiver}: error {} {}", e.code, e.message));
                    }
                }
                _ => {}
            }
        }
        for chunk in ids.chunks(1000) {
            if tx.send(wire::encode_ack(chunk)).await.is_err() {
                return "its writer stopped".into();
            }
        }
        ids.clear();
        if let Some(after) = pull_after {
            match request_pull(&tx, &mut seq, after).await {
                Some(sequence) => pulling = Some(sequence),
                None => return "its writer stopped".into(),
            }
        }
    }
    "closed by the server".into()
}

/// Asks for the page of the offline set after `after`; returns the
/// request's sequence, or `None` if the connection's writer has stopped.
async fn request_pull(tx: &mpsc::Sender<Bytes>, seq: &mut u32, after: u64) -> Option<u32> {
    let sequence = next_seq(seq);
    let pull = pb::PullOfflineRequest { after_msg_id: after, limit: 200 };
    tx.send(wire::encode(RequestType::PullOffline, sequence, &pull)).await.ok()?;
    Some(sequence)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::next_run_id;

    fn stamp(flow: &Flow, stream: u32, index: u64) -> Stamp {
        Stamp { run: flow.run, stream, index, due_ns: 0 }
    }

    #[test]
    fn a_receiver_counts_each_group_message_once_whichever_way_it_came() {
        // 3 groups, 30 messages: 10 per stream.
        let flow =
            Flow::new(next_run_id(), Schedule::new(30.0, 3, Duration::from_secs(1)), 0, Fanout::Groups, 2);
        let mut seen = Seen::default();
        seen.follow(Some(&flow));
        let place =
            |stream, index| place_in_run(Some(&flow), &stamp(&flow, stream, index)).expect("in the run");
        assert_eq!(seen.marks.len(), 30);
        assert_eq!(seen.pushed(place(2, 9)), Arrival::Count);
        // Pushed twice on one connection: counted again, as a duplicate.
        assert_eq!(seen.pushed(place(2, 9)), Arrival::Count);
        // Pulled after the push, or pushed after the pull: once.
        assert_eq!(seen.pulled(place(2, 9)), Arrival::Skip);
        assert_eq!(seen.pulled(place(1, 0)), Arrival::Count);
        assert_eq!(seen.pushed(place(1, 0)), Arrival::Skip);
        assert_eq!(seen.pulled(place(1, 0)), Arrival::Skip);
        // Pushed again after a reconnect: not a duplicate; twice there is.
        assert_eq!(seen.pushed(place(0, 3)), Arrival::Count);
        seen.reconnected();
        assert_eq!(seen.pushed(place(0, 3)), Arrival::Skip);
        assert_eq!(seen.pushed(place(0, 3)), Arrival::Count);
        // Another run, or a stream the run does not have: not placed.
        let old = Stamp { run: flow.run + 1, ..stamp(&flow, 0, 0) };
        assert_eq!(place_in_run(Some(&flow), &old), None);
        assert_eq!(place_in_run(Some(&flow), &stamp(&flow, 3, 0)), None);
        // A new run starts over.
        let next =
            Flow::new(next_run_id(), Schedule::new(30.0, 3, Duration::from_secs(1)), 0, Fanout::Groups, 2);
        seen.follow(Some(&next));
        assert!(seen.marks.iter().all(|&m| m == 0));
    }

    #[test]
    fn a_receiver_of_a_pair_keeps_its_stream_by_index() {
        // 7 messages over 3 pairs: stream 0 sends 3 (indices 0..3).
        let flow =
            Flow::new(next_run_id(), Schedule::new(7.0, 3, Duration::from_secs(1)), 0, Fanout::Pairs, 3);
        let mut seen = Seen::default();
        seen.follow(Some(&flow));
        assert_eq!(seen.marks.len(), 3);
        assert_eq!(place_in_run(Some(&flow), &stamp(&flow, 2, 1)), Some(1));
        assert_eq!(seen.pushed(2), Arrival::Count);
        // Beyond the marks (not sent in this run): counted, never skipped.
        assert_eq!(seen.pushed(5), Arrival::Count);
        assert_eq!(seen.pushed(5), Arrival::Count);
    }

    /// What the receiver reads of a push, decoded by prost.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PushedMessage {
        #[prost(uint64, tag = "1")]
        msg_id: u64,
        #[prost(bytes = "vec", tag = "7")]
        content: Vec<u8>,
    }

    fn by_prost(body: &[u8]) -> Option<(u64, Vec<u8>)> {
        <PushedMessage as prost::Message>::decode(body).ok().map(|m| (m.msg_id, m.content))
    }

    fn by_scan(body: &[u8]) -> Option<(u64, Vec<u8>)> {
        pushed_id_and_content(body).map(|(id, content)| (id, content.to_vec()))
    }

    #[test]
    fn a_push_is_read_as_prost_reads_it() {
        let message = pb::Message {
            msg_id: 7_371_234_567_890_123_456,
            kind: pb::ConversationKind::Group as i32,
            sender: "alice".into(),
            group_id: "g1".into(),
            seq: 300,
            content: vec![1, 2, 3],
            sent_at_ms: 1_790_000_000_000,
            client_msg_id: "c-1".into(),
            ..Default::default()
        };
        let encoded = prost::Message::encode_to_vec(&message);
        assert_eq!(by_scan(&encoded), Some((message.msg_id, vec![1, 2, 3])));
        // Cut anywhere: prost and the scan agree on every prefix (a cut at
        // a field boundary is a shorter message, elsewhere an error).
        for end in 0..encoded.len() {
            assert_eq!(by_scan(&encoded[..end]), by_prost(&encoded[..end]), "cut at {end}");
        }
        // Fields out of order, repeated (the last wins), unknown fields of
        // every wire type, and wrong wire types for the two fields read.
        let mut odd = vec![0x3a, 2, 9, 9, 0x08, 5, 0x50, 0x96, 0x01, 0x59];
        odd.extend_from_slice(&[1; 8]);
        odd.extend_from_slice(&[0x5d, 1, 2, 3, 4, 0x62, 1, 0xff, 0x08, 6, 0x3a, 1, 8]);
        assert_eq!(by_scan(&odd), Some((6, vec![8])));
        assert_eq!(by_scan(&odd), by_prost(&odd));
        for bad in [&[0x09, 0, 0, 0, 0, 0, 0, 0, 0][..], &[0x38, 1], &[0x3d, 0, 0, 0, 0], &[0x00], &[0x0b]] {
            assert_eq!(by_scan(bad), None, "{bad:?}");
            assert_eq!(by_prost(bad), None, "{bad:?}");
        }
        assert_eq!(by_scan(&[]), Some((0, Vec::new())));
    }
}
