//! Concurrent affinity lookups coalesced into one Redis round trip. Each lookup stays its own
//! `GETEX`, but those that arrive together go out as one pipeline: one write and one read for the
//! proxy and for redis-server, instead of a write per command. (Left to itself the Redis client's
//! driver task runs right after each request that wakes it, tokio's LIFO slot, and writes every
//! command alone.) Each lookup's wait is bounded here, by one timer per pipeline rather than one
//! per request. Knows nothing of routes or of the in-memory fallback.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// Lookups sent in one pipeline at most.
const MAX_BATCH: usize = 256;

struct Lookup {
    key: String,
    ttl_secs: u64,
    queued_at: Instant,
    answer: oneshot::Sender<Result<Option<String>, String>>,
}

pub struct LookupBatcher {
    queue: mpsc::UnboundedSender<Lookup>,
}

impl LookupBatcher {
    /// Starts the batching task on the current runtime; it ends when the batcher is dropped. A
    /// lookup not answered within `timeout` of being queued fails (waiting included).
    pub fn start(connection: redis::aio::ConnectionManager, timeout: Duration) -> LookupBatcher {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(run(pending, connection, timeout));
        LookupBatcher { queue }
    }

    /// `GETEX key EX ttl_secs`: the value, refreshed for another `ttl_secs`.
    pub async fn getex(&self, key: String, ttl_secs: u64) -> Result<Option<String>, String> {
        let (answer, answered) = oneshot::channel();
        let lookup = Lookup { key, ttl_secs, queued_at: Instant::now(), answer };
        self.queue.send(lookup).map_err(|_| "the lookup task has stopped".to_string())?;
        answered.await.map_err(|_| "the lookup task has stopped".to_string())?
    }
}

async fn run(mut pending: mpsc::UnboundedReceiver<Lookup>, mut connection: redis::aio::ConnectionManager, timeout: Duration) {
    let mut batch: Vec<Lookup> = Vec::new();
    while let Some(first) = pending.recv().await {
        batch.push(first);
        // Let the requests that are ready now run first and queue their lookups too.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(lookup) => batch.push(lookup),
                Err(_) => break,
            }
        }
        // A caller that went away meanwhile (its request was dropped) needs no answer.
        batch.retain(|lookup| !lookup.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        // The oldest lookup (the first: the queue is in order) sets the pipeline's deadline, so
        // none waits longer than `timeout` however long it queued behind a slow pipeline.
        let deadline = batch[0].queued_at + timeout;
        let mut pipeline = redis::Pipeline::with_capacity(batch.len());
        for lookup in &batch {
            // Sized up front (four arguments; a u64 has at most 20 digits): grown argument by
            // argument, each command's buffers were reallocated several times per lookup.
            let mut getex = redis::Cmd::with_capacity(4, "GETEX".len() + lookup.key.len() + "EX".len() + 20);
            getex.arg("GETEX").arg(&lookup.key).arg("EX").arg(lookup.ttl_secs);
            pipeline.add_command(getex);
        }
        let answered = tokio::time::timeout_at(deadline.into(), pipeline.query_async::<Vec<Option<String>>>(&mut connection)).await;
        let Ok(answered) = answered else {
            fail_all(&mut batch, "no answer in time");
            continue;
        };
        match answered {
            Ok(values) if values.len() == batch.len() => {
                for (lookup, value) in batch.drain(..).zip(values) {
                    let _ = lookup.answer.send(Ok(value));
                }
            }
            Ok(values) => {
                let why = format!("redis answered {} of {} lookups", values.len(), batch.len());
                fail_all(&mut batch, &why);
            }
            Err(err) => fail_all(&mut batch, &err.to_string()),
        }
    }
}

fn fail_all(batch: &mut Vec<Lookup>, why: &str) {
    for lookup in batch.drain(..) {
        let _ = lookup.answer.send(Err(why.to_string()));
    }
}
