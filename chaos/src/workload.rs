//! The simulated users: who talks to whom, the devices that send and show
//! messages, and the constant-rate scheduler that hands out sends.
//!
//! Every user sends from its first device; some users have a second device
//! that only shows messages (it is owed every message of its user's
//! conversations, including the user's own sends from the first device).
//! Each user talks 1:1 with its two neighbours and in one small group.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_proto::{group_conversation_key, single_conversation_key};
use tern_sdk::pb::{self, ConversationKind};
use tern_sdk::{Client, ClientConfig, Event, TlsMode};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ledger::{Acked, Ledger, Shown};

const PASSWORD: &str = "chaos-password";

#[derive(Debug, Clone)]
pub enum Conversation {
    Single { a: usize, b: usize },
    Group { id: String, members: Vec<usize> },
}

/// Who exists and who talks to whom.
pub struct Topology {
    pub users: Vec<String>,
    /// (user index, device id) per device.
    pub devices: Vec<(usize, String)>,
    /// Device indices of each user; the first one sends.
    pub user_devices: Vec<Vec<usize>>,
    pub conversations: Vec<Conversation>,
    /// Conversation indices each user sends in.
    pub by_user: Vec<Vec<usize>>,
}

impl Topology {
    /// `users` users (at least 3), every third with a second device, pairs
    /// of neighbours, groups of `group_size`.
    pub fn new(run: &str, users: usize, group_size: usize) -> Topology {
        let names: Vec<String> = (0..users).map(|i| format!("{run}u{i:03}")).collect();
        let mut devices = Vec::new();
        let mut user_devices = Vec::new();
        for user in 0..users {
            let mut mine = vec![devices.len()];
            devices.push((user, "phone".to_owned()));
            if user % 3 == 0 {
                mine.push(devices.len());
                devices.push((user, "desk".to_owned()));
            }
            user_devices.push(mine);
        }
        let mut conversations = Vec::new();
        let mut by_user = vec![Vec::new(); users];
        for a in 0..users {
            let b = (a + 1) % users;
            by_user[a].push(conversations.len());
            by_user[b].push(conversations.len());
            conversations.push(Conversation::Single { a: a.min(b), b: a.max(b) });
        }
        let group_size = group_size.max(2);
        for (g, chunk) in (0..users).collect::<Vec<_>>().chunks(group_size).enumerate() {
            if chunk.len() < 2 {
                continue;
            }
            for &member in chunk {
                by_user[member].push(conversations.len());
            }
            conversations.push(Conversation::Group { id: format!("{run}g{g:03}"), members: chunk.to_vec() });
        }
        Topology { users: names, devices, user_devices, conversations, by_user }
    }

    pub fn conversation_key(&self, conversation: &Conversation) -> String {
        match conversation {
            Conversation::Single { a, b } => single_conversation_key(&self.users[*a], &self.users[*b]),
            Conversation::Group { id, .. } => group_conversation_key(id),
        }
    }

    /// The devices a message from `sender`'s sending device is owed to:
    /// every device of every other participant, and the sender's other
    /// devices.
    pub fn owed_to(&self, conversation: &Conversation, sender: usize) -> Vec<usize> {
        let participants: Vec<usize> = match conversation {
            Conversation::Single { a, b } => vec![*a, *b],
            Conversation::Group { members, .. } => members.clone(),
        };
        let sending_device = self.user_devices[sender][0];
        participants
            .into_iter()
            .flat_map(|user| self.user_devices[user].iter().copied())
            .filter(|device| *device != sending_device)
            .collect()
    }
}

/// The conversation key of a received message, as the server keys it.
fn key_of(message: &pb::Message) -> String {
    if message.kind == ConversationKind::Group as i32 {
        group_conversation_key(&message.group_id)
    } else {
        single_conversation_key(&message.sender, &message.receiver)
    }
}

/// The connected devices of a run.
pub struct Fleet {
    pub topology: Arc<Topology>,
    clients: Vec<Client>,
    receivers: JoinSet<()>,
}

impl Fleet {
    /// Logs every device in (creating the accounts), starts a task per
    /// device that records what it shows, and creates the groups.
    pub async fn connect(
        topology: Topology,
        auth_url: &str,
        ca: &std::path::Path,
        ledger: Arc<Ledger>,
    ) -> anyhow::Result<Fleet> {
        let topology = Arc::new(topology);
        let mut clients = Vec::with_capacity(topology.devices.len());
        let mut receivers = JoinSet::new();
        for (index, (user, device)) in topology.devices.iter().enumerate() {
            let mut config =
                ClientConfig::new(auth_url, &topology.users[*user], PASSWORD, TlsMode::CaFile(ca.to_owned()));
            config.device_id = device.clone();
            config.register_if_missing = true;
            config.request_timeout = Duration::from_secs(5);
            // A user's app keeps trying while the server is restarting:
            // about five minutes of retries at the 5 s backoff cap.
            config.send_attempts = 60;
            let (client, mut events) = Client::connect(config)
                .await
                .with_context(|| format!("connecting {}/{device}", topology.users[*user]))?;
            clients.push(client);
            let ledger = ledger.clone();
            receivers.spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        Event::Message(message) => ledger.record_shown(
                            index,
                            Shown {
                                msg_id: message.msg_id,
                                seq: message.seq,
                                conversation: key_of(&message),
                                content: message.content,
                            },
                        ),
                        Event::Reconnected => {
                            ledger.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        Event::Kicked(_) => {
                            ledger.kicked.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Event::Skipped { missing, .. } => {
                            let seqs: u64 = missing.iter().map(|r| r.end() - r.start() + 1).sum();
                            ledger.skipped_seqs.fetch_add(seqs, Ordering::Relaxed);
                        }
                        Event::Disconnected(_) => {}
                    }
                }
            });
        }
        for conversation in &topology.conversations {
            if let Conversation::Group { id, members } = conversation {
                let creator = &clients[topology.user_devices[members[0]][0]];
                let others: Vec<&str> = members[1..].iter().map(|m| topology.users[*m].as_str()).collect();
                creator
                    .create_group(id, id, &others)
                    .await
                    .with_context(|| format!("creating group {id}"))?;
            }
        }
        Ok(Fleet { topology, clients, receivers })
    }

    /// Sends at `rate` messages per second, spread over random users, until
    /// `stop` is cancelled; returns when every send handed out has finished
    /// (acknowledged or given up).
    pub async fn send_until(&self, rate: u32, seed: u64, ledger: Arc<Ledger>, stop: CancellationToken) {
        let users = self.topology.users.len();
        let mut queues = Vec::with_capacity(users);
        let mut senders = JoinSet::new();
        for user in 0..users {
            // A short queue: a user whose sends are stuck (the server is
            // down) drops offers instead of building a backlog.
            let (tx, mut rx) = mpsc::channel::<()>(4);
            queues.push(tx);
            let client = self.clients[self.topology.user_devices[user][0]].clone();
            let topology = self.topology.clone();
            let ledger = ledger.clone();
            let mut rng = StdRng::seed_from_u64(seed ^ (user as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            senders.spawn(async move {
                let mut counter = 0u64;
                while rx.recv().await.is_some() {
                    let mine = &topology.by_user[user];
                    let conversation = &topology.conversations[mine[rng.random_range(0..mine.len())]];
                    counter += 1;
                    let content = format!("chaos {} #{counter}", topology.users[user]).into_bytes();
                    let result = match conversation {
                        Conversation::Single { a, b } => {
                            let peer = if *a == user { *b } else { *a };
                            client.send_single(&topology.users[peer], content.clone()).await
                        }
                        Conversation::Group { id, .. } => client.send_group(id, content.clone()).await,
                    };
                    match result {
                        Ok(ack) => ledger.record_acked(Acked {
                            msg_id: ack.msg_id,
                            seq: ack.seq,
                            conversation: topology.conversation_key(conversation),
                            content,
                            owed_to: topology.owed_to(conversation, user),
                        }),
                        Err(e) => {
                            tracing::warn!(user = %topology.users[user], error = %e, "send given up");
                            ledger.gave_up.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            ledger.offered.fetch_add(1, Ordering::Relaxed);
            if queues[rng.random_range(0..users)].try_send(()).is_err() {
                ledger.dropped_offers.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(queues);
        while senders.join_next().await.is_some() {}
    }

    /// Closes every client (their last ACKs land first).
    pub async fn close(mut self) {
        for client in &self.clients {
            client.close().await;
        }
        self.receivers.shutdown().await;
    }
}
