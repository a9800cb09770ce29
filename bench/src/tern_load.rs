//! S3 (1:1) and S4 (group fan-out) against tern: long-lived sender and
//! receiver connections, one pacer task for all senders, one reader task
//! per connection. Receivers ACK every push (batched per read burst), as a
//! real client must, so the server's offline store is cleared as it goes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
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
/// it is a duplicate.
#[derive(Default)]
struct Seen {
    run: Option<u32>,
    pushed: HashSet<u64>,
    pulled: HashSet<u64>,
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
    let Seen { run, pushed, pulled } = seen;
    // What this connection was pushed in the current run.
    let mut pushed_here: HashSet<u64> = HashSet::new();
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
        current(rx, flow);
        let flow = &*flow;
        if flow.as_ref().map(|f| f.run) != *run {
            *run = flow.as_ref().map(|f| f.run);
            pushed.clear();
            pulled.clear();
            pushed_here.clear();
        }
        let mut pull_after: Option<u64> = None;
        for frame in batch {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return format!("read failed: {e}"),
            };
            match frame.kind() {
                Some(RequestType::PushMessage) => {
                    let Ok(message) = frame.decode::<pb::Message>() else { continue };
                    ids.push(message.msg_id);
                    if pulled.contains(&message.msg_id) {
                        continue;
                    }
                    let first = pushed.insert(message.msg_id);
                    let again_here = !pushed_here.insert(message.msg_id);
                    if !first && !again_here {
                        // Pushed before the reconnect, not ACKed in time,
                        // pushed again: the SDK drops it by id too.
                        continue;
                    }
                    if let (Some(f), Some(stamp)) = (&flow, Stamp::decode(&message.content)) {
                        f.on_delivery(receiver, &stamp);
                    }
                }
                Some(RequestType::PullOffline) if pulling == Some(frame.sequence) => {
                    pulling = None;
                    let Ok(page) = frame.decode::<pb::PullOfflineResponse>() else { continue };
                    for message in &page.messages {
                        ids.push(message.msg_id);
                        if pushed.contains(&message.msg_id) || !pulled.insert(message.msg_id) {
                            continue;
                        }
                        if let (Some(f), Some(stamp)) = (&flow, Stamp::decode(&message.content)) {
                            f.on_delivery(receiver, &stamp);
                        }
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
                    } else if let Some(f) = &flow {
                        f.on_error(|| format!("receiver {receiver}: notice {:?} {}", n.kind, n.reason));
                    }
                }
                Some(RequestType::Error) => {
                    let e: pb::ErrorBody = frame.decode().unwrap_or_default();
                    if let Some(f) = &flow {
                        f.on_error(|| format!("receiver {receiver}: error {} {}", e.code, e.message));
                    }
                }
                _ => {}
            }
        }
        for chunk in ids.chunks(1000) {
            // Sequence 0: an ACK the server does not answer (as the SDK's).
            let ack = wire::encode(
                RequestType::AckMessages,
                0,
                &pb::AckMessagesRequest { msg_ids: chunk.to_vec() },
            );
            if tx.send(ack).await.is_err() {
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
