use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, DedupRecord, DedupStore, OfflineEntry, OfflineStore, SequenceStore};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/work/bench-tmp".into());
    let _ = std::fs::remove_dir_all(&dir);
    let b = Arc::new(EmbeddedBackends::open(std::path::Path::new(&dir)).unwrap());
    for (name, n) in [
        ("bus", 100_000u64),
        ("seq", 100_000),
        ("offline", 100_000),
        ("dedup", 100_000),
    ] {
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let conc = 2000u64;
        for w in 0..conc {
            let b = b.clone();
            set.spawn(async move {
                let mut i = w;
                while i < n {
                    match name {
                        "bus" => b
                            .bus
                            .publish("t", Bytes::from_static(b"k"), Bytes::from(vec![0u8; 200]))
                            .await
                            .unwrap(),
                        "seq" => {
                            b.sequences.incr(&format!("c{}", i % 1000)).await.unwrap();
                        }
                        "dedup" => b
                            .dedup
                            .put(
                                "s",
                                &format!("c{i}"),
                                DedupRecord {
                                    msg_id: i,
                                    seq: i,
                                    sent_at_ms: 0,
                                },
                                Duration::from_millis(1),
                            )
                            .await
                            .unwrap(),
                        _ => b
                            .offline
                            .insert(
                                &[format!("u{}", i % 1000)],
                                &OfflineEntry {
                                    msg_id: i,
                                    payload: Bytes::from(vec![0u8; 200]),
                                },
                            )
                            .await
                            .unwrap(),
                    }
                    i += conc;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        let el = t.elapsed();
        println!(
            "{name}: {n} ops in {el:?} = {:.0}/s",
            n as f64 / el.as_secs_f64()
        );
    }
    let mut c = b.bus.subscribe("t", "g").await.unwrap();
    let t = Instant::now();
    let mut got = 0;
    while got < 100_000 {
        got += c.poll(1000, Duration::from_secs(1)).await.unwrap().len();
    }
    println!("consume 100k in {:?}", t.elapsed());
}
