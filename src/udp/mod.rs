//! UDP routes (`match.transport: 'udp' | 'all'`): one socket per port, and a flow per client
//! address and port, with a connected upstream socket of its own, so the backend tells clients
//! apart by source port and answers reach the client they belong to. A flow starts with its first
//! datagram (route, IP lists, per-IP and per-route limits decide it once); on a port with QUIC
//! passthrough routes, with the datagrams that carried the client's ClientHello, whose SNI picks
//! the route (`quic::initial`) and which are then relayed untouched. It ends when no
//! datagram passed either way for the route's `sessionTimeout`, or at stop. Flows are bounded in
//! number for the engine (each holds a socket, an ephemeral port and a task: a flood of spoofed
//! sources must not exhaust the host's), and per client IP and route. Datagrams are never queued
//! deep: a full queue drops the datagram, as the network would.
//!
//! Datagrams move in batches (`batch`): the port reads what is waiting in one call and sends each
//! run of a relay flow's datagrams straight on that flow's upstream socket in one call, without a
//! hop through the flow's task; only the datagrams that arrive while a flow's upstream socket is
//! being opened (and those for JavaScript handlers) are queued for its task. Answers come back the
//! same way, a batch per call each way.

mod batch;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use socket2::{SockAddr, SockRef, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::Lease;
use crate::hooks::{DatagramDelivery, Scripts};
use crate::listener::{bind_dual_stack, BindError};
use crate::metrics::EngineMetrics;
use crate::quic::initial::{read_datagram, CryptoAssembly, InitialRead};
use crate::routing::table::{Route, RouteTable};
use crate::tls::client_hello::ClientHelloInfo;
use crate::security::{IpPolicy, RouteGuard};
use batch::RecvBatch;

/// Flows the engine keeps at most, well below the host's ephemeral ports and descriptors.
const MAX_FLOWS: u64 = 16_384;
/// Batches of answers a flow sends on in one go before it lets other tasks of its thread run.
const ANSWER_BATCHES_PER_TURN: usize = 2;
/// Datagrams a flow holds for its upstream socket before dropping more.
const FLOW_QUEUE: usize = 64;

/// Counters of `getStatistics().udp`.
#[derive(Debug, Default)]
pub struct UdpStats {
    active: AtomicU64,
    total: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UdpStatsSnapshot {
    pub sessions_total: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped: u64,
}

impl UdpStats {
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> UdpStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        UdpStatsSnapshot {
            sessions_total: load(&self.total),
            datagrams_in: load(&self.datagrams_in),
            datagrams_out: load(&self.datagrams_out),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            dropped: load(&self.dropped),
        }
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the ports' relays share with the engine.
pub struct UdpEnv {
    pub table: Arc<RwLock<Arc<RouteTable>>>,
    pub global_policy: IpPolicy,
    pub metrics: Arc<EngineMetrics>,
    pub stats: Arc<UdpStats>,
    /// Live flows per route and client IP, across the route's ports (`maxSessionsPerIP`).
    pub per_ip: Mutex<HashMap<(Arc<str>, IpAddr), u32>>,
    /// Datagram handlers (JavaScript) of `socket-handler` routes.
    pub scripts: Scripts,
    /// Where handlers' replies find their port's socket and flows.
    pub replies: Arc<UdpReplies>,
}

impl UdpEnv {
    pub fn new(table: Arc<RwLock<Arc<RouteTable>>>, global_policy: IpPolicy, metrics: Arc<EngineMetrics>, stats: Arc<UdpStats>, scripts: Scripts, replies: Arc<UdpReplies>) -> UdpEnv {
        UdpEnv { table, global_policy, metrics, stats, per_ip: Mutex::default(), scripts, replies }
    }

    fn release_ip(&self, route: &Arc<str>, ip: IpAddr) {
        let mut per_ip = self.per_ip.lock();
        let key = (route.clone(), ip);
        if let Some(count) = per_ip.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&key);
            }
        }
    }
}

struct Listening {
    stop: CancellationToken,
    task: JoinHandle<()>,
    tasks: TaskTracker,
    replies: Arc<UdpReplies>,
}

/// The bound ports' sockets and flows, by port, for datagram handlers' replies (which come from
/// the JavaScript thread, not from a flow's task).
#[derive(Default)]
pub struct UdpReplies {
    ports: RwLock<HashMap<u16, (Arc<UdpSocket>, Arc<Mutex<Flows>>)>>,
}

impl UdpReplies {
    /// Sends a handler's reply from `port` to `client`, if that client has a handler flow there.
    pub fn reply(&self, port: u16, client: SocketAddr, data: &[u8], stats: &UdpStats, metrics: &EngineMetrics) -> bool {
        let client = canonical(client);
        let Some((socket, flows)) = self.ports.read().get(&port).cloned() else { return false };
        let activity = match flows.lock().by_client.get(&client) {
            Some(Flow { activity, handler: true, .. }) => activity.clone(),
            _ => return false,
        };
        // The socket is non-blocking: the datagram goes out now, or is dropped as a full buffer
        // would drop it.
        match socket2::SockRef::from(socket.as_ref()).send_to(data, &client.into()) {
            Ok(_) => {
                activity.touch();
                stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
                stats.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
                metrics.bytes.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
                activity.route.stats.bytes.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
                true
            }
            Err(_) => {
                stats.drop_one();
                false
            }
        }
    }
}

/// When a flow last saw a datagram either way: the port's relay and handlers' replies renew it
/// from outside the flow's task.
struct FlowActivity {
    epoch: tokio::time::Instant,
    last_ms: AtomicU64,
    route: Arc<Route>,
}

impl FlowActivity {
    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The UDP ports bound, each with its relay task.
#[derive(Default)]
pub struct UdpPorts {
    ports: BTreeMap<u16, Listening>,
}

impl UdpPorts {
    pub fn ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }

    /// Binds every port of `ports` not yet bound, or none of them; returns those this call bound.
    /// Must run inside the engine's runtime.
    pub fn bind_all(&mut self, ports: &[u16], env: &Arc<UdpEnv>) -> Result<Vec<u16>, BindError> {
        let mut bound = Vec::new();
        for &port in ports.iter().filter(|p| !self.ports.contains_key(p)) {
            let socket = bind(port).and_then(UdpSocket::from_std).map_err(|source| BindError { port, source })?;
            bound.push((port, socket));
        }
        let mut added = Vec::with_capacity(bound.len());
        for (port, socket) in bound {
            let stop = CancellationToken::new();
            let tasks = TaskTracker::new();
            let socket = Arc::new(socket);
            let flows: Arc<Mutex<Flows>> = Arc::default();
            env.replies.ports.write().insert(port, (socket.clone(), flows.clone()));
            let task = tokio::spawn(relay_port(socket, flows, port, stop.clone(), tasks.clone(), env.clone()));
            self.ports.insert(port, Listening { stop, task, tasks, replies: env.replies.clone() });
            added.push(port);
        }
        Ok(added)
    }

    /// Ends the port's flows and closes its socket (theirs too) before returning.
    pub async fn release(&mut self, port: u16) {
        if let Some(listening) = self.ports.remove(&port) {
            listening.replies.ports.write().remove(&port);
            listening.stop.cancel();
            let _ = listening.task.await;
            listening.tasks.close();
            listening.tasks.wait().await;
        }
    }

    pub async fn release_all(&mut self) {
        for port in self.ports() {
            self.release(port).await;
        }
    }
}

impl Drop for UdpPorts {
    /// An engine dropped without `stop()` leaves no relay behind.
    fn drop(&mut self) {
        for (port, listening) in &self.ports {
            listening.replies.ports.write().remove(port);
            listening.stop.cancel();
        }
    }
}

/// The port's socket, dual stack where the host has IPv6 (`listener::bind_dual_stack`).
fn bind(port: u16) -> io::Result<std::net::UdpSocket> {
    let socket = bind_dual_stack(Type::DGRAM, port)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A live flow as the port's relay sees it.
struct Flow {
    id: u64,
    /// To the flow's task: until its upstream socket is open, or always for a handler's flow.
    to_upstream: mpsc::Sender<Bytes>,
    /// A relay flow's connected upstream socket once open: the port sends on it itself.
    upstream: Option<Arc<UdpSocket>>,
    max_datagram: usize,
    activity: Arc<FlowActivity>,
    /// A datagram handler's flow (replies come from JavaScript).
    handler: bool,
}

#[derive(Default)]
struct Flows {
    by_client: HashMap<SocketAddr, Flow>,
    next_id: u64,
}

impl Flows {
    /// Forgets flow `id` of `client` (a newer flow of the same client stays).
    fn remove(&mut self, client: SocketAddr, id: u64) {
        if self.by_client.get(&client).is_some_and(|flow| flow.id == id) {
            self.by_client.remove(&client);
        }
    }
}

/// An IPv4 client on a dual-stack socket as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

thread_local! {
    /// Where a worker thread reads a batch of datagrams (a port's or a flow's) and sends it on
    /// before its next await: one batch buffer per thread, none per port or flow.
    static BATCH_BUFFER: RefCell<RecvBatch> = RefCell::new(RecvBatch::default());
}

async fn relay_port(socket: Arc<UdpSocket>, flows: Arc<Mutex<Flows>>, port: u16, stop: CancellationToken, tracker: TaskTracker, env: Arc<UdpEnv>) {
    let mut relay = PortRelay { socket, flows, port, stop, tracker, env, hellos: PendingHellos::default() };
    loop {
        tokio::select! {
            biased;
            _ = relay.stop.cancelled() => break,
            ready = relay.socket.readable() => if ready.is_err() { break },
        }
        // No await from the read to the last send: the thread's batch buffer is this task's.
        BATCH_BUFFER.with(|batch| {
            let mut batch = batch.borrow_mut();
            let fd = relay.socket.as_raw_fd();
            // An error other than an empty socket is an ICMP error for an earlier send, or a
            // transient failure: the next read goes on.
            if relay.socket.try_io(Interest::READABLE, || batch.recv(fd)).is_ok() {
                relay.take(&batch);
            }
        });
    }
    // The flows' tokens are children of `stop`: they end with the port.
}

/// A port's relay task: what it reads goes to the flows.
struct PortRelay {
    socket: Arc<UdpSocket>,
    flows: Arc<Mutex<Flows>>,
    port: u16,
    stop: CancellationToken,
    tracker: TaskTracker,
    env: Arc<UdpEnv>,
    hellos: PendingHellos,
}

/// Datagrams of one batch in a row for one relay flow, sent on its upstream socket in one call.
struct DirectRun {
    upstream: Arc<UdpSocket>,
    activity: Arc<FlowActivity>,
    datagrams: std::ops::Range<usize>,
}

/// Where a datagram of a batch went.
enum Taken {
    /// Into the current run, queued for its flow's task, or dropped (counted).
    Done,
    /// The first of a new run, on this flow's socket.
    Run(Arc<UdpSocket>, Arc<FlowActivity>),
    /// No flow has the client: the datagram may start one.
    NoFlow,
}

impl PortRelay {
    fn take(&mut self, batch: &RecvBatch) {
        let env = self.env.clone();
        let stats = &env.stats;
        stats.datagrams_in.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.bytes_in.fetch_add((0..batch.len()).map(|index| batch.datagram(index).len() as u64).sum(), Ordering::Relaxed);
        let mut run: Option<DirectRun> = None;
        for index in 0..batch.len() {
            let Some(from) = batch.source(index) else {
                stats.drop_one();
                continue;
            };
            let client = canonical(from);
            let datagram = batch.datagram(index);
            let taken = {
                let mut table = self.flows.lock();
                match table.by_client.get(&client) {
                    None => Taken::NoFlow,
                    Some(flow) if datagram.len() > flow.max_datagram => {
                        stats.drop_one();
                        Taken::Done
                    }
                    Some(Flow { upstream: Some(upstream), activity, .. }) => match &mut run {
                        Some(run) if run.datagrams.end == index && Arc::ptr_eq(&run.upstream, upstream) => {
                            run.datagrams.end += 1;
                            Taken::Done
                        }
                        _ => Taken::Run(upstream.clone(), activity.clone()),
                    },
                    Some(flow) => match flow.to_upstream.try_send(Bytes::copy_from_slice(datagram)) {
                        Ok(()) => Taken::Done,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            stats.drop_one();
                            Taken::Done
                        }
                        // The flow just ended: this datagram starts the next one.
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            let id = flow.id;
                            table.remove(client, id);
                            Taken::NoFlow
                        }
                    },
                }
            };
            match taken {
                Taken::Done => {}
                Taken::Run(upstream, activity) => {
                    if let Some(done) = run.replace(DirectRun { upstream, activity, datagrams: index..index + 1 }) {
                        self.send_run(batch, done);
                    }
                }
                Taken::NoFlow => self.start(client, datagram),
            }
        }
        if let Some(done) = run {
            self.send_run(batch, done);
        }
    }

    /// A run of a relay flow's datagrams on its upstream socket. What its send buffer cannot take
    /// now is dropped: the port does not wait for one flow.
    fn send_run(&self, batch: &RecvBatch, run: DirectRun) {
        let taken = run.datagrams.len();
        let bytes: u64 = run.datagrams.clone().map(|index| batch.datagram(index).len() as u64).sum();
        let sent = batch::send_run(run.upstream.as_raw_fd(), None, batch, run.datagrams.clone());
        let stats = &self.env.stats;
        for _ in sent.datagrams..taken {
            stats.drop_one();
        }
        run.activity.route.stats.bytes.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        self.env.metrics.bytes.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        run.activity.touch();
    }

    /// A datagram from a client without a flow: it starts one, or waits for the rest of a QUIC
    /// hello, or is dropped.
    fn start(&mut self, client: SocketAddr, datagram: &[u8]) {
        let table = self.env.table.read().clone();
        let (firsts, hello) = if table.udp_reads_hello(self.port) {
            match self.hellos.read(client, datagram) {
                HelloStep::Wait => return,
                HelloStep::Refused(dropped) => {
                    for _ in 0..dropped {
                        self.env.stats.drop_one();
                    }
                    return;
                }
                HelloStep::Start(firsts, hello) => (firsts, hello),
            }
        } else {
            (vec![Bytes::copy_from_slice(datagram)], None)
        };
        let count = firsts.len();
        if !start_flow(&self.socket, self.port, client, firsts, hello.as_ref(), &table, &self.flows, &self.env, &self.stop, &self.tracker) {
            for _ in 0..count {
                self.env.stats.drop_one();
            }
        }
    }
}

/// Clients of a port whose QUIC ClientHello is still arriving over several datagrams, held until
/// it is whole and a route can be chosen by its SNI. Bounded in clients, datagrams and bytes, and
/// in time: a hello not whole within `HELLO_WAIT` is dropped with its datagrams, as a lost one.
#[derive(Default)]
struct PendingHellos {
    by_client: HashMap<SocketAddr, PendingHello>,
}

struct PendingHello {
    assembly: CryptoAssembly,
    datagrams: Vec<Bytes>,
    since: Instant,
}

/// Clients whose hello may be pending at once, per port.
const MAX_PENDING_HELLOS: usize = 256;
/// Datagrams a hello may take, and the largest of them: Initial packets fill datagrams of at
/// least 1200 bytes and rarely more than a path's MTU.
const HELLO_DATAGRAMS: usize = 4;
const HELLO_DATAGRAM_MAX: usize = 4096;
const HELLO_WAIT: Duration = Duration::from_secs(2);

enum HelloStep {
    /// The datagram is held: the hello goes on in later ones.
    Wait,
    /// The datagrams that carried the hello (this one last), and the hello; None when the first
    /// datagram was no QUIC Initial (routes without TLS may still take the flow).
    Start(Vec<Bytes>, Option<ClientHelloInfo>),
    /// Dropped, with this many datagrams held before.
    Refused(usize),
}

impl PendingHellos {
    fn read(&mut self, client: SocketAddr, datagram: &[u8]) -> HelloStep {
        let now = Instant::now();
        let held = self.by_client.remove(&client).filter(|pending| now.duration_since(pending.since) < HELLO_WAIT);
        let was_held = held.as_ref().map_or(0, |pending| pending.datagrams.len());
        let mut pending = held.unwrap_or_else(|| PendingHello { assembly: CryptoAssembly::default(), datagrams: Vec::new(), since: now });
        if datagram.len() > HELLO_DATAGRAM_MAX && was_held > 0 {
            return HelloStep::Refused(was_held + 1);
        }
        match read_datagram(datagram, &mut pending.assembly) {
            InitialRead::Complete(hello) => {
                pending.datagrams.push(Bytes::copy_from_slice(datagram));
                HelloStep::Start(pending.datagrams, Some(hello))
            }
            InitialRead::NotInitial if was_held == 0 => HelloStep::Start(vec![Bytes::copy_from_slice(datagram)], None),
            InitialRead::NotInitial | InitialRead::Invalid(_) => HelloStep::Refused(was_held + 1),
            InitialRead::Incomplete => {
                if pending.datagrams.len() + 1 >= HELLO_DATAGRAMS || datagram.len() > HELLO_DATAGRAM_MAX {
                    return HelloStep::Refused(was_held + 1);
                }
                if was_held == 0 && self.by_client.len() >= MAX_PENDING_HELLOS {
                    self.by_client.retain(|_, pending| now.duration_since(pending.since) < HELLO_WAIT);
                    if self.by_client.len() >= MAX_PENDING_HELLOS {
                        return HelloStep::Refused(1);
                    }
                }
                pending.datagrams.push(Bytes::copy_from_slice(datagram));
                self.by_client.insert(client, pending);
                HelloStep::Wait
            }
        }
    }
}

/// Admits a new client flow with its first datagrams (one, or those that carried a QUIC hello);
/// false when it is refused. The checks come before anything is made, since refused datagrams (a
/// flood of them, maybe) do only this.
#[allow(clippy::too_many_arguments)]
fn start_flow(
    socket: &Arc<UdpSocket>,
    port: u16,
    client: SocketAddr,
    firsts: Vec<Bytes>,
    hello: Option<&ClientHelloInfo>,
    table: &RouteTable,
    flows: &Arc<Mutex<Flows>>,
    env: &Arc<UdpEnv>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> bool {
    let ip = client.ip();
    if !env.global_policy.admits(ip) || env.stats.active() >= MAX_FLOWS {
        return false;
    }
    let Some(route) = table.find_udp(port, ip, hello).cloned() else { return false };
    if !route.policy.admits(ip) {
        route.stats.forbidden.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let limits = route.udp;
    if firsts.iter().any(|first| first.len() > limits.max_datagram_size as usize) {
        return false;
    }
    {
        let mut per_ip = env.per_ip.lock();
        let count = per_ip.entry((route.label.clone(), ip)).or_insert(0);
        if *count >= limits.max_sessions_per_ip {
            return false;
        }
        *count += 1;
    }
    let admitted = RouteGuard::acquire(&route.stats, route.max_connections).and_then(|slot| match route.datagram_handler {
        Some(handler) => Some((slot, FlowKind::Handler { handler })),
        None => {
            let target = route.select_target(port, ip)?;
            Some((slot, FlowKind::Relay { upstream: (target.host.clone(), target.port), _lease: target.lease }))
        }
    });
    let Some((route_slot, kind)) = admitted else {
        env.release_ip(&route.label, ip);
        return false;
    };
    let activity = Arc::new(FlowActivity { epoch: tokio::time::Instant::now(), last_ms: AtomicU64::new(0), route: route.clone() });
    let handler = matches!(kind, FlowKind::Handler { .. });
    let (to_upstream, queued) = mpsc::channel(FLOW_QUEUE);
    // Cannot fail: the queue is new, and holds more than a hello's datagrams.
    for first in firsts {
        let _ = to_upstream.try_send(first);
    }
    let id = {
        let mut table = flows.lock();
        table.next_id += 1;
        let id = table.next_id;
        table.by_client.insert(client, Flow { id, to_upstream, upstream: None, max_datagram: limits.max_datagram_size as usize, activity: activity.clone(), handler });
        id
    };
    env.stats.active.fetch_add(1, Ordering::Relaxed);
    env.stats.total.fetch_add(1, Ordering::Relaxed);
    let flow = FlowTask {
        client,
        id,
        port,
        route,
        kind,
        activity,
        socket: socket.clone(),
        flows: flows.clone(),
        env: env.clone(),
        cancel: stop.child_token(),
        _route_slot: route_slot,
    };
    tracker.spawn(flow.run(queued));
    true
}

/// One client flow: its queue towards the backend (or the route's datagram handler), the
/// answers back, its idle timer.
struct FlowTask {
    client: SocketAddr,
    id: u64,
    port: u16,
    route: Arc<Route>,
    kind: FlowKind,
    activity: Arc<FlowActivity>,
    socket: Arc<UdpSocket>,
    flows: Arc<Mutex<Flows>>,
    env: Arc<UdpEnv>,
    cancel: CancellationToken,
    /// Held for the flow's life: the route's `maxConnections` counts flows.
    _route_slot: RouteGuard,
}

enum FlowKind {
    /// To a backend through a connected upstream socket of its own; `_lease` is the backend's
    /// in-flight slot (least-connections balancing).
    Relay { upstream: (Arc<str>, u16), _lease: Option<Lease> },
    /// To JavaScript: each datagram to the handler, whose replies come back through `UdpReplies`.
    Handler { handler: u32 },
}

impl FlowTask {
    async fn run(self, mut queued: mpsc::Receiver<Bytes>) {
        match &self.kind {
            FlowKind::Relay { upstream, .. } => {
                let connected = tokio::select! {
                    _ = self.cancel.cancelled() => None,
                    connected = self.connect(upstream) => Some(connected),
                };
                match connected {
                    Some(Ok(socket)) => self.relay(Arc::new(socket), &mut queued).await,
                    Some(Err(err)) => tracing::debug!(route = %self.route.label, backend = %upstream.0, error = %err, "cannot open the UDP flow's upstream socket"),
                    None => {}
                }
            }
            FlowKind::Handler { handler } => self.hand_to_script(*handler, &mut queued).await,
        }
        // What the port queued after the last read is dropped, and counted; the port starts a
        // new flow for the client's next datagram.
        queued.close();
        while queued.try_recv().is_ok() {
            self.env.stats.drop_one();
        }
        self.flows.lock().remove(self.client, self.id);
        self.env.release_ip(&self.route.label, self.client.ip());
        self.env.stats.active.fetch_sub(1, Ordering::Relaxed);
    }

    fn count_out(&self, len: usize) {
        let stats = &self.env.stats;
        stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
        stats.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
        self.route.stats.bytes.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
        self.env.metrics.bytes.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Each datagram to the route's handler, until the flow sat idle (no datagram either way)
    /// for the route's `sessionTimeout`.
    async fn hand_to_script(&self, handler: u32, queued: &mut mpsc::Receiver<Bytes>) {
        let activity = &self.activity;
        let idle_after = Duration::from_millis(self.route.udp.session_timeout_ms);
        let idle = tokio::time::sleep(idle_after);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = &mut idle => {
                    // Replies renew the flow too; they come from outside this task.
                    let until = activity.last() + idle_after;
                    if until <= tokio::time::Instant::now() {
                        return;
                    }
                    idle.as_mut().reset(until);
                }
                datagram = queued.recv() => {
                    let Some(datagram) = datagram else { return };
                    self.route.stats.bytes.bytes_in.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                    self.env.metrics.bytes.bytes_in.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                    activity.touch();
                    let delivery = DatagramDelivery {
                        handler,
                        data: datagram.to_vec(),
                        client_ip: self.client.ip(),
                        client_port: self.client.port(),
                        port: self.port,
                        route_name: self.route.name.clone(),
                    };
                    if !self.env.scripts.datagram(delivery) {
                        self.env.stats.drop_one();
                    }
                    let until = activity.last() + idle_after;
                    idle.as_mut().reset(until);
                }
            }
        }
    }

    async fn connect(&self, upstream: &(Arc<str>, u16)) -> io::Result<UdpSocket> {
        let (host, port) = (&*upstream.0, upstream.1);
        let address = tokio::time::timeout(self.route.connect_timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "resolving the target took too long"))??
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the target resolves to no address"))?;
        let local: SocketAddr = if address.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        let upstream = UdpSocket::bind(local).await?;
        upstream.connect(address).await?;
        Ok(upstream)
    }

    async fn relay(&self, upstream: Arc<UdpSocket>, queued: &mut mpsc::Receiver<Bytes>) {
        // What queued while the socket was opened goes first; then the port sends on the socket
        // itself. Both under the flows' lock, so no datagram overtakes a queued one.
        {
            let mut flows = self.flows.lock();
            let Some(flow) = flows.by_client.get_mut(&self.client).filter(|flow| flow.id == self.id) else { return };
            let socket = SockRef::from(upstream.as_ref());
            while let Ok(datagram) = queued.try_recv() {
                self.route.stats.bytes.bytes_in.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                self.env.metrics.bytes.bytes_in.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                // An ICMP error left by an earlier datagram fails one send: that one is sent again.
                let mut sent = socket.send(&datagram);
                if matches!(&sent, Err(err) if err.kind() == io::ErrorKind::ConnectionRefused) {
                    sent = socket.send(&datagram);
                }
                if sent.is_err() {
                    self.env.stats.drop_one();
                }
            }
            flow.upstream = Some(upstream.clone());
        }
        self.activity.touch();
        let idle_after = Duration::from_millis(self.route.udp.session_timeout_ms);
        let idle = tokio::time::sleep(idle_after);
        tokio::pin!(idle);
        let client = SockAddr::from(self.client);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = &mut idle => {
                    // The port renews the flow too, from outside this task.
                    let until = self.activity.last() + idle_after;
                    if until <= tokio::time::Instant::now() {
                        return;
                    }
                    idle.as_mut().reset(until);
                }
                ready = upstream.readable() => {
                    if ready.is_err() {
                        return;
                    }
                    if let Some(waiting) = self.answer(&upstream, &client) {
                        // The port's socket could not take these at once (its writability not yet
                        // known, or its buffer full): they wait for it.
                        for datagram in waiting {
                            match self.socket.send_to(&datagram, self.client).await {
                                Ok(_) => self.count_out(datagram.len()),
                                Err(_) => self.env.stats.drop_one(),
                            }
                        }
                    }
                }
            }
        }
    }

    /// The backend's answers waiting now, a batch at a time, each batch sent on to the client in
    /// one call without an await between. Returns those the port's socket did not take.
    fn answer(&self, upstream: &UdpSocket, client: &SockAddr) -> Option<Vec<Vec<u8>>> {
        let fd = upstream.as_raw_fd();
        let port_fd = self.socket.as_raw_fd();
        BATCH_BUFFER.with(|batch| {
            let mut batch = batch.borrow_mut();
            for _ in 0..ANSWER_BATCHES_PER_TURN {
                let read = match upstream.try_io(Interest::READABLE, || batch.recv(fd)) {
                    Ok(read) => read,
                    // Nothing waiting; or the backend's port is closed (ICMP), and later
                    // datagrams may find it open.
                    Err(_) => return None,
                };
                self.activity.touch();
                let sent = batch::send_run(port_fd, Some(client), &batch, 0..read);
                let stats = &self.env.stats;
                stats.datagrams_out.fetch_add(sent.datagrams as u64, Ordering::Relaxed);
                stats.bytes_out.fetch_add(sent.bytes as u64, Ordering::Relaxed);
                self.route.stats.bytes.bytes_out.fetch_add(sent.bytes as u64, Ordering::Relaxed);
                self.env.metrics.bytes.bytes_out.fetch_add(sent.bytes as u64, Ordering::Relaxed);
                for _ in 0..sent.dropped {
                    stats.drop_one();
                }
                if let Some(blocked_at) = sent.blocked_at {
                    return Some((blocked_at..read).map(|index| batch.datagram(index).to_vec()).collect());
                }
            }
            // More may wait: readiness stays set, so the next turn reads on.
            None
        })
    }
}
