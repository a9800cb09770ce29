//! The same open-loop 1:1 and fan-out runs against the peers: Mosquitto
//! (MQTT 3.1.1, QoS 1: the broker ACKs each publish with PUBACK, and the
//! subscriber's client ACKs each delivery) and nats-server (core NATS:
//! at-most-once, no ACKs at all, so its figures are an upper bound for
//! what a broker without durability does).
//!
//! Topology as for tern: stream `s` is one publishing connection; 1:1
//! receiver `s` subscribes to stream `s` only; in fan-out every receiver
//! subscribes to every group's topic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::clock;
use crate::flow::{Fanout, Flow, Progress, RateRun, next_run_id, wait_drained};
use crate::payload::Stamp;
use crate::procfs::CpuWindow;
use crate::sched::{Pacer, Schedule};

/// One peer run's shape and load.
#[derive(Debug, Clone)]
pub struct PeerRun {
    pub label: String,
    pub fanout: Fanout,
    pub streams: u32,
    pub receivers: u32,
    pub group_size: u32,
    pub rate: f64,
    pub duration: Duration,
    pub payload: usize,
    pub slo_ms: f64,
    pub drain: Duration,
}

impl PeerRun {
    fn topics_of(&self, receiver: u32) -> Vec<u32> {
        match self.fanout {
            Fanout::Pairs => vec![receiver],
            Fanout::Groups => (0..self.streams).collect(),
        }
    }

    fn result(&self, system: &str, flow: &Flow, has_acks: bool, drained: bool, cpu: &CpuWindow) -> RateRun {
        let mut run = RateRun {
            scenario: if self.fanout == Fanout::Pairs { "s3" } else { "s4" }.into(),
            system: system.into(),
            target: system.into(),
            label: self.label.clone(),
            group_size: self.group_size,
            streams: self.streams,
            receivers: self.receivers,
            offered_rate: self.rate,
            payload_bytes: self.payload,
            cpu: cpu.finish(),
            machine_cpu: cpu.machine(),
            ..RateRun::default()
        };
        run.measured(flow, has_acks, drained, self.slo_ms, self.duration);
        run.print();
        run
    }
}

fn mqtt_options(id: String, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    // As many QoS 1 publishes in flight as MQTT allows (packet ids are
    // 16-bit), so the window does not cap an open-loop sender.
    o.set_inflight(u16::MAX);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// One run against Mosquitto on `port`; `pid` is the broker's process.
pub async fn mqtt(port: u16, pid: u32, spec: &PeerRun) -> anyhow::Result<RateRun> {
    let sched = Schedule::new(spec.rate, spec.streams, spec.duration);
    let run_id = next_run_id();
    let topic = |s: u32| format!("tb/{run_id}/{s}");
    let mut tasks = Vec::new();
    let flow_slot: Arc<Mutex<Option<Arc<Flow>>>> = Arc::default();
    let get = |slot: &Arc<Mutex<Option<Arc<Flow>>>>| slot.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // Receivers: subscribe and wait for every SUBACK.
    let (subacked_tx, mut subacked) = tokio::sync::mpsc::channel::<()>(1024);
    let mut receivers = Vec::new();
    for r in 0..spec.receivers {
        let (client, mut events) = AsyncClient::new(mqtt_options(format!("tbr-{run_id}-{r}"), port), 4096);
        for s in spec.topics_of(r) {
            client.subscribe(topic(s), QoS::AtLeastOnce).await?;
        }
        let (slot, subacked_tx) = (flow_slot.clone(), subacked_tx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let (Some(f), Some(stamp)) = (get(&slot), Stamp::decode(&p.payload)) {
                            f.on_delivery(r as usize, &stamp);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subacked_tx.send(()).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(f) = get(&slot) {
                            f.on_error(|| format!("mqtt receiver {r}: {e}"));
                        }
                        break;
                    }
                }
            }
        }));
        receivers.push(client);
    }
    let wanted: usize = (0..spec.receivers).map(|r| spec.topics_of(r).len()).sum();
    for _ in 0..wanted {
        tokio::time::timeout(Duration::from_secs(30), subacked.recv()).await.context("no SUBACK")?;
    }

    // Senders: the n-th outgoing PUBLISH is the n-th publish call, so a
    // FIFO of message indexes maps packet ids back to messages.
    let mut senders = Vec::new();
    let mut pending: Vec<Arc<Mutex<VecDeque<u64>>>> = Vec::new();
    for s in 0..spec.streams {
        let (client, mut events) =
            AsyncClient::new(mqtt_options(format!("tbs-{run_id}-{s}"), port), 16 * 1024);
        let queue: Arc<Mutex<VecDeque<u64>>> = Arc::default();
        let (q, slot) = (queue.clone(), flow_slot.clone());
        tasks.push(tokio::spawn(async move {
            let mut in_flight: HashMap<u16, u64> = HashMap::new();
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(index) = q.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                            in_flight.insert(pkid, index);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let (Some(index), Some(f)) = (in_flight.remove(&ack.pkid), get(&slot)) {
                            f.on_ack(s, index);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(f) = get(&slot) {
                            f.on_error(|| format!("mqtt sender {s}: {e}"));
                        }
                        break;
                    }
                }
            }
        }));
        senders.push(client);
        pending.push(queue);
    }
    // Let the CONNECTs complete.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = clock::now_ns() + 20_000_000;
    let flow = Flow::new(run_id, sched, start, spec.fanout, spec.receivers as usize);
    *flow_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(flow.clone());
    let cpu = CpuWindow::start(&[("mosquitto".into(), pid), ("tern-bench".into(), std::process::id())]);
    let progress = Progress::start(
        format!("{} mosquitto {} {:.0}/s", scenario(spec), spec.label, spec.rate),
        flow.clone(),
    );
    let mut pacer = Pacer::new(sched, start);
    while let Some(due) = pacer.next_due().await {
        for g in due {
            let stamp = flow.stamp(g);
            let s = stamp.stream as usize;
            pending[s].lock().unwrap_or_else(|e| e.into_inner()).push_back(stamp.index);
            if let Err(e) = senders[s]
                .publish(topic(stamp.stream), QoS::AtLeastOnce, false, stamp.encode(spec.payload))
                .await
            {
                flow.on_error(|| format!("mqtt publish: {e}"));
                continue;
            }
            flow.sent.fetch_add(1, Relaxed);
        }
    }
    let drained = wait_drained(&flow, true, spec.drain).await;
    drop(progress);
    let run = spec.result("mosquitto", &flow, true, drained, &cpu);
    // Detach the flow first: the disconnects below are not errors of the run.
    *flow_slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    for c in senders.iter().chain(receivers.iter()) {
        let _ = c.try_disconnect();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for t in tasks {
        t.abort();
    }
    Ok(run)
}

fn scenario(spec: &PeerRun) -> &'static str {
    if spec.fanout == Fanout::Pairs { "s3" } else { "s4" }
}

/// One run against nats-server on `port`.
pub async fn nats(port: u16, pid: u32, spec: &PeerRun) -> anyhow::Result<RateRun> {
    let sched = Schedule::new(spec.rate, spec.streams, spec.duration);
    let start = clock::now_ns() + 500_000_000;
    let run_id = next_run_id();
    let flow = Flow::new(run_id, sched, start, spec.fanout, spec.receivers as usize);
    let subject = |s: u32| format!("tb.{run_id}.{s}");
    let url = format!("nats://127.0.0.1:{port}");
    let options =
        || async_nats::ConnectOptions::new().subscription_capacity(1 << 20).client_capacity(16 * 1024);
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for r in 0..spec.receivers {
        let client = options().connect(&url).await.context("NATS connect")?;
        for s in spec.topics_of(r) {
            let mut sub = client.subscribe(subject(s)).await?;
            let f = flow.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    if let Some(stamp) = Stamp::decode(&m.payload) {
                        f.on_delivery(r as usize, &stamp);
                    }
                }
            }));
        }
        // The server has the subscriptions once the flush returns.
        client.flush().await?;
        receivers.push(client);
    }
    let mut senders = Vec::new();
    for _ in 0..spec.streams {
        senders.push(options().connect(&url).await.context("NATS connect")?);
    }
    let cpu = CpuWindow::start(&[("nats-server".into(), pid), ("tern-bench".into(), std::process::id())]);
    let progress =
        Progress::start(format!("{} nats {} {:.0}/s", scenario(spec), spec.label, spec.rate), flow.clone());
    let mut pacer = Pacer::new(sched, start);
    while let Some(due) = pacer.next_due().await {
        for g in due {
            let stamp = flow.stamp(g);
            let s = stamp.stream as usize;
            if let Err(e) = senders[s].publish(subject(stamp.stream), stamp.encode(spec.payload).into()).await
            {
                flow.on_error(|| format!("nats publish: {e}"));
                continue;
            }
            flow.sent.fetch_add(1, Relaxed);
        }
    }
    for c in &senders {
        let _ = c.flush().await;
    }
    let drained = wait_drained(&flow, false, spec.drain).await;
    drop(progress);
    let run = spec.result("nats", &flow, false, drained, &cpu);
    for t in tasks {
        t.abort();
    }
    drop(senders);
    drop(receivers);
    Ok(run)
}
