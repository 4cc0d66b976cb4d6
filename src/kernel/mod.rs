//! Kernel forwarding (`forwardingEngine: 'nftables'`): the flows of such routes are forwarded by the
//! kernel (destination NAT, masquerade unless `preserveSourceIP`) through an nftables table this
//! engine instance owns, written in one transaction through nft's JSON interface (`nft -j -f -`,
//! never a shell string) and replaced whole when the routes change. The routes stay in the route
//! table too: where the kernel path is unavailable (no nft, no CAP_NET_ADMIN), the Rust relay
//! serves them, after one warning that says why. Knows nothing of napi.

mod nft;
mod ruleset;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{KernelConfig, RouteConfig, TargetPort};
use crate::metrics::{EngineMetrics, RouteStats};
use ruleset::ResolvedRoute;

/// Which transport protocols the kernel forwards for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelProtocol {
    Tcp,
    Udp,
    All,
}

/// `maxRate`: the most the route's flows may carry together, beyond which packets are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxRate {
    BytesPerSecond(u64),
    PacketsPerSecond(u64),
}

impl MaxRate {
    /// `100kbps`, `10mbps`, `1gbps` (bits per second, as links are rated) or `5000pps`.
    pub fn parse(text: &str) -> Result<MaxRate, String> {
        let lower = text.trim().to_ascii_lowercase();
        let split = lower.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(lower.len());
        let (number, unit) = lower.split_at(split);
        let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a rate like '10mbps' or '5000pps'"))?;
        let bits = match unit.trim() {
            "bps" => value,
            "kbps" => value * 1e3,
            "mbps" => value * 1e6,
            "gbps" => value * 1e9,
            "pps" if value >= 1.0 => return Ok(MaxRate::PacketsPerSecond(value as u64)),
            _ => return Err(format!("{text:?} is not a rate like '10mbps' or '5000pps' (units: bps, kbps, mbps, gbps, pps)")),
        };
        let bytes = (bits / 8.0) as u64;
        if bytes == 0 {
            return Err(format!("{text:?} is less than a byte a second"));
        }
        Ok(MaxRate::BytesPerSecond(bytes))
    }

    /// A named `limit rate over …` object `name` of `table`: one bucket, whatever rules use it.
    fn limit_object(&self, family: &str, table: &str, name: &str) -> Value {
        let mut limit = json!({"family": family, "table": table, "name": name, "per": "second", "inv": true});
        match *self {
            MaxRate::BytesPerSecond(bytes) => {
                limit["rate"] = json!(bytes);
                limit["rate_unit"] = json!("bytes");
            }
            MaxRate::PacketsPerSecond(packets) => limit["rate"] = json!(packets),
        }
        json!({"limit": limit})
    }
}

/// A route the kernel forwards, as the configuration gives it (its target not yet resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelRoute {
    pub ports: Vec<u16>,
    pub protocol: KernelProtocol,
    pub host: String,
    pub target_port: Option<u16>,
    pub preserve_source_ip: bool,
    pub max_rate: Option<MaxRate>,
    pub priority: i32,
    pub allow: Vec<String>,
    pub block: Vec<String>,
}

impl KernelRoute {
    /// The route's kernel forwarding, checked: `(field, reason)` names what the kernel cannot do.
    pub fn compile(config: &RouteConfig, kernel: &KernelConfig) -> Result<KernelRoute, (String, String)> {
        let protocol = match kernel.protocol.as_str() {
            "tcp" => KernelProtocol::Tcp,
            "udp" => KernelProtocol::Udp,
            "all" => KernelProtocol::All,
            other => return Err(("action.nftables.protocol".into(), format!("expected 'tcp', 'udp' or 'all', got {other:?}"))),
        };
        let max_rate = match &kernel.max_rate {
            Some(rate) => Some(MaxRate::parse(rate).map_err(|r| ("action.nftables.maxRate".to_string(), r))?),
            None => None,
        };
        let refuse = |field: &str, what: &str| Err((field.to_string(), format!("kernel forwarding (forwardingEngine: 'nftables') {what}")));
        let [target] = config.action.targets.as_slice() else {
            return refuse("action.targets", "takes exactly one target");
        };
        let [host] = target.hosts.as_slice() else {
            return refuse("action.targets[0].host", "takes exactly one host, not a list or a function");
        };
        let target_port = match target.port {
            TargetPort::Fixed(port) => Some(port),
            TargetPort::Preserve(_) => None,
            TargetPort::Function(_) => return refuse("action.targets[0].port", "takes a port number or 'preserve', not a function"),
        };
        Ok(KernelRoute {
            ports: config.match_.ports.clone(),
            protocol,
            host: host.clone(),
            target_port,
            preserve_source_ip: kernel.preserve_source_ip,
            max_rate,
            priority: kernel.priority,
            allow: kernel_addresses(&config.security.ip_allow_list, "security.ipAllowList")?,
            block: kernel_addresses(&config.security.ip_block_list, "security.ipBlockList")?,
        })
    }
}

/// An IP list as the kernel's sets take it: addresses and CIDR blocks, `::ffff:a.b.c.d` as the
/// IPv4 address it names (as the relay reads it: the kernel sees IPv4 packets). Other forms the
/// relay knows (wildcards, ranges) are refused, naming the entry.
pub fn kernel_addresses(list: &[String], field: &str) -> Result<Vec<String>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, entry)| {
            let (addr, len) = entry.split_once('/').map_or((entry.as_str(), None), |(a, l)| (a, Some(l)));
            let parsed: IpAddr = addr.parse().map_err(|_| (format!("{field}[{i}]"), format!("kernel forwarding takes addresses and CIDR blocks, not {entry:?}")))?;
            let ip = parsed.to_canonical();
            let mapped = ip.is_ipv4() && parsed.is_ipv6();
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match len.map(str::parse::<u8>) {
                None => Ok(ip.to_string()),
                Some(Ok(len)) if mapped && (96..=128).contains(&len) => Ok(format!("{ip}/{}", len - 96)),
                Some(Ok(len)) if !mapped && len <= max => Ok(format!("{ip}/{len}")),
                Some(_) => Err((format!("{field}[{i}]"), format!("{entry:?} is not a CIDR block"))),
            }
        })
        .collect()
}

/// What the kernel path does for `getStatistics()`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelStatus {
    /// The table holds the kernel routes now.
    pub active: bool,
    /// The engine's table (`smartproxy_<pid>_<n>`).
    pub table: String,
    /// Why the kernel path is not in use (its routes are relayed by the Rust core).
    pub unavailable: Option<String>,
    /// Per route: the packets and bytes of its flows, both ways, as the kernel counted them.
    pub routes: BTreeMap<String, KernelCounters>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelCounters {
    /// Both ways.
    pub packets: u64,
    pub bytes: u64,
    /// From the clients, and to them (IP packets, headers included).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

struct CounterSlot {
    name: String,
    label: String,
    stats: Arc<RouteStats>,
    /// The route's counts before this table (each update makes a new one, counting from zero).
    base: KernelCounters,
    /// This table's counts as last read.
    last: KernelCounters,
}

impl KernelCounters {
    fn plus(self, other: KernelCounters) -> KernelCounters {
        KernelCounters {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            bytes_in: self.bytes_in + other.bytes_in,
            bytes_out: self.bytes_out + other.bytes_out,
        }
    }
}

/// How long a target's name may take to resolve.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells engines of one process apart in their table names.
static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// The engine's kernel forwarding: its table, installed, replaced and removed.
pub struct KernelForwarder {
    /// `defaults.security`'s allow and block lists, which every kernel route applies too; an
    /// error where they hold what the kernel's sets cannot (the routes are then relayed, where
    /// the lists apply as they are).
    global: Result<(Vec<String>, Vec<String>), String>,
    table: String,
    /// `smartproxy_<pid namespace>_`: the tables of this PID namespace's engines (a table of
    /// another namespace's process cannot be told alive or dead from here, and is left alone).
    table_prefix: String,
    /// The kernel's bytes are added to the engine's and each route's, so that metrics and
    /// throughput show them.
    metrics: Arc<EngineMetrics>,
    /// One nft transaction at a time, in the order asked.
    applying: tokio::sync::Mutex<Applied>,
    status: parking_lot::Mutex<KernelStatus>,
}

#[derive(Default)]
struct Applied {
    installed: bool,
    stale_cleaned: bool,
    /// Per route installed: its counters' name (`route_<n>`, with `_in` and `_out`), its label,
    /// its stats (the kernel's bytes are added to them) and the counters last read from the
    /// table (a new table starts at zero).
    counters: Vec<CounterSlot>,
    /// The reason last warned about: the same reason is not warned twice in a row.
    warned: Option<String>,
    /// What the host's settings keep from working, as last warned about.
    cautioned: Vec<String>,
}

impl KernelForwarder {
    pub fn new(metrics: Arc<EngineMetrics>, global_allow: &[String], global_block: &[String]) -> KernelForwarder {
        let global = kernel_addresses(global_allow, "defaults.security.ipAllowList")
            .and_then(|allow| Ok((allow, kernel_addresses(global_block, "defaults.security.ipBlockList")?)))
            .map_err(|(field, reason)| format!("{field}: {reason}"));
        let table_prefix = format!("smartproxy_{}_", pid_namespace());
        let table = format!("{table_prefix}{}_{}", std::process::id(), NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed));
        let status = KernelStatus { table: table.clone(), ..KernelStatus::default() };
        KernelForwarder { global, table, table_prefix, metrics, applying: tokio::sync::Mutex::new(Applied::default()), status: parking_lot::Mutex::new(status) }
    }

    pub fn status(&self) -> KernelStatus {
        self.status.lock().clone()
    }

    /// Makes the table hold exactly `routes` (label and route), in one transaction; with none,
    /// removes it. A failure leaves the routes to the relay and is warned about once.
    pub async fn sync(&self, routes: &[(Arc<str>, KernelRoute)]) {
        let mut applied = self.applying.lock().await;
        // On every engine's first sync, kernel routes or not: a dead engine's rules would still
        // take their ports.
        if !applied.stale_cleaned {
            applied.stale_cleaned = true;
            remove_stale_tables(&self.table_prefix).await;
        }
        if routes.is_empty() {
            if applied.installed {
                // What it counted since the last reading goes to the routes' bytes first.
                self.read_counters(&mut applied).await;
                if let Err(err) = nft::apply(&ruleset::remove(&self.table)).await {
                    tracing::warn!(table = %self.table, error = %err, "the kernel forwarding table could not be removed");
                }
            }
            applied.installed = false;
            applied.counters.clear();
            let mut status = self.status.lock();
            status.active = false;
            status.routes.clear();
            return;
        }
        // What the old table counted since the last reading is not lost with it.
        if applied.installed {
            self.read_counters(&mut applied).await;
        }
        let result = self.install(routes).await;
        match result {
            Ok((counters, targets)) => {
                Self::caution(&mut applied, &targets);
                let counted = self.status.lock().routes.clone();
                let counters = counters
                    .into_iter()
                    .map(|(name, label)| CounterSlot {
                        stats: self.metrics.routes.get(&Arc::from(label.as_str())),
                        base: counted.get(&label).copied().unwrap_or_default(),
                        name,
                        label,
                        last: KernelCounters::default(),
                    })
                    .collect::<Vec<_>>();
                if applied.installed {
                    tracing::info!(table = %self.table, routes = routes.len(), "kernel forwarding rules replaced");
                } else {
                    tracing::info!(table = %self.table, routes = routes.len(), "kernel forwarding on");
                }
                applied.installed = true;
                applied.warned = None;
                let mut status = self.status.lock();
                status.active = true;
                status.unavailable = None;
                status.routes.retain(|label, _| counters.iter().any(|slot| &slot.label == label));
                drop(status);
                applied.counters = counters;
            }
            Err(reason) => {
                // The old rules would go on forwarding what the routes no longer say: the relay
                // serves the routes now, and the table goes.
                if applied.installed {
                    if let Err(err) = nft::apply(&ruleset::remove(&self.table)).await {
                        tracing::warn!(table = %self.table, error = %err, "the kernel forwarding table could not be removed");
                    }
                    applied.installed = false;
                    applied.counters.clear();
                }
                if applied.warned.as_deref() != Some(reason.as_str()) {
                    let relayed: Vec<&str> = routes.iter().map(|(label, _)| &**label).collect();
                    if !relayed.is_empty() {
                        tracing::warn!(reason = %reason, routes = ?relayed, "kernel forwarding is unavailable: these routes are relayed by the Rust core");
                    }
                    applied.warned = Some(reason.clone());
                }
                let mut status = self.status.lock();
                status.active = false;
                status.unavailable = Some(reason);
            }
        }
    }

    /// Removes the table (at stop), its last counts read first.
    pub async fn remove(&self) {
        self.sync(&[]).await;
    }

    /// Reads the routes' counters back from the kernel into the status and the routes' stats.
    pub async fn refresh_counters(&self) {
        let mut applied = self.applying.lock().await;
        self.read_counters(&mut applied).await;
    }

    async fn read_counters(&self, applied: &mut Applied) {
        if !applied.installed {
            return;
        }
        let Ok(listing) = nft::list(&["counters", "table", "inet", &self.table]).await else {
            return;
        };
        let mut read: Vec<KernelCounters> = vec![KernelCounters::default(); applied.counters.len()];
        for item in listing["nftables"].as_array().into_iter().flatten() {
            let counter = &item["counter"];
            let Some(name) = counter["name"].as_str() else { continue };
            let (packets, bytes) = (counter["packets"].as_u64().unwrap_or(0), counter["bytes"].as_u64().unwrap_or(0));
            for (slot, counts) in applied.counters.iter().zip(read.iter_mut()) {
                match name.strip_prefix(slot.name.as_str()) {
                    Some("_in") => counts.bytes_in = bytes,
                    Some("_out") => counts.bytes_out = bytes,
                    _ => continue,
                }
                counts.packets += packets;
                counts.bytes += bytes;
            }
        }
        let mut status = self.status.lock();
        for (slot, counts) in applied.counters.iter_mut().zip(read) {
            let (bytes_in, bytes_out) = (counts.bytes_in.saturating_sub(slot.last.bytes_in), counts.bytes_out.saturating_sub(slot.last.bytes_out));
            for bytes in [&slot.stats.bytes, &self.metrics.bytes] {
                bytes.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
                bytes.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
            }
            slot.last = counts;
            status.routes.insert(slot.label.clone(), slot.base.plus(counts));
        }
    }

    /// Warns once about what the host's settings keep from working (not errors: this host's own
    /// clients are forwarded all the same).
    fn caution(applied: &mut Applied, resolved: &[(String, IpAddr)]) {
        let forwarding = |path: &str| std::fs::read_to_string(path).map(|v| v.trim() != "0").unwrap_or(true);
        let mut cautions = Vec::new();
        for (label, target) in resolved {
            if target.is_loopback() {
                cautions.push(format!("route {label:?} targets a loopback address: only clients on this host are forwarded to it"));
            } else if target.is_ipv4() && !forwarding("/proc/sys/net/ipv4/ip_forward") {
                cautions.push(format!("route {label:?}: net.ipv4.ip_forward is 0, so clients of other hosts are not forwarded"));
            } else if target.is_ipv6() && !forwarding("/proc/sys/net/ipv6/conf/all/forwarding") {
                cautions.push(format!("route {label:?}: net.ipv6.conf.all.forwarding is 0, so clients of other hosts are not forwarded"));
            }
        }
        if cautions != applied.cautioned {
            for caution in &cautions {
                tracing::warn!("{caution}");
            }
            applied.cautioned = cautions;
        }
    }

    /// Installs the routes; answers their counters' names and labels, and their targets.
    async fn install(&self, routes: &[(Arc<str>, KernelRoute)]) -> Result<(Vec<(String, String)>, Vec<(String, IpAddr)>), String> {
        let mut ordered: Vec<&(Arc<str>, KernelRoute)> = routes.iter().collect();
        // Higher priority first: the first matching rule of a chain wins.
        ordered.sort_by_key(|(_, route)| std::cmp::Reverse(route.priority));
        let (global_allow, global_block) = self.global.as_ref().map_err(Clone::clone)?;
        let mut resolved = Vec::with_capacity(ordered.len());
        let mut counters = Vec::with_capacity(ordered.len());
        let mut targets = Vec::with_capacity(ordered.len());
        for (i, (label, route)) in ordered.into_iter().enumerate() {
            let target = resolve(&route.host).await.map_err(|reason| format!("route {label:?}: {reason}"))?;
            targets.push((label.to_string(), target));
            let counter = format!("route_{i}");
            counters.push((counter.clone(), label.to_string()));
            resolved.push(ResolvedRoute {
                counter,
                kernel: route,
                target,
                allow: [&route.allow, global_allow].into_iter().filter(|list| !list.is_empty()).cloned().collect(),
                block: route.block.iter().chain(global_block).cloned().collect(),
            });
        }
        nft::apply(&ruleset::replace(&self.table, &resolved)).await.map_err(|err| err.to_string())?;
        Ok((counters, targets))
    }
}

impl Drop for KernelForwarder {
    /// An engine dropped without `stop()` takes its table with it (best effort, synchronously:
    /// there may be no runtime left to await on).
    fn drop(&mut self) {
        if self.status.lock().active {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", &self.table])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The target's address: the host as written if it is one, else its first address (IPv4 first).
async fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(ip);
    }
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0))).await.map_err(|_| format!("{host} was not resolved within {RESOLVE_TIMEOUT:?}"))?;
    let addresses: Vec<IpAddr> = lookup.map_err(|err| format!("{host} could not be resolved: {err}"))?.map(|a| a.ip()).collect();
    addresses.iter().find(|ip| ip.is_ipv4()).or(addresses.first()).copied().ok_or_else(|| format!("{host} has no address"))
}

/// This process's PID namespace, as its inode number (`/proc/self/ns/pid` is `pid:[N]`).
fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| link.to_string_lossy().trim_start_matches("pid:[").trim_end_matches(']').parse().ok())
        .unwrap_or(0)
}

/// Removes the tables of this PID namespace's engines whose process is gone
/// (`<prefix><pid>_<n>` of a pid that is not running).
async fn remove_stale_tables(prefix: &str) {
    let Ok(listing) = nft::list(&["tables"]).await else {
        return;
    };
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let table = &item["table"];
        if table["family"] != "inet" {
            continue;
        }
        let Some(name) = table["name"].as_str() else { continue };
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.split('_').next()).and_then(|pid| pid.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match nft::apply(&ruleset::remove(name)).await {
                Ok(()) => tracing::info!(table = name, "a kernel forwarding table left by a process that is gone was removed"),
                Err(err) => tracing::warn!(table = name, error = %err, "a stale kernel forwarding table could not be removed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_entries_of_mapped_ipv4_are_ipv4_as_the_relay_reads_them() {
        let config: RouteConfig = serde_json::from_value(serde_json::json!({
            "index": 0, "name": "k", "id": null, "priority": 0,
            "match": {"ports": [7000], "domains": [], "clientIp": [], "tlsVersion": [], "path": null, "headers": []},
            "action": {
                "tls": null, "targets": [{"hosts": ["127.0.0.1"], "hostFunction": null, "port": 7001, "matchPorts": null, "matchPath": null,
                    "matchHeaders": [], "matchMethods": null, "priority": 0, "headers": {"request": [], "response": []}}],
                "connectTimeoutMs": null, "responseTimeoutMs": null, "websocket": true, "backendProtocol": "auto", "raw": false, "retry": null,
                "nativeResponse": null, "socketHandler": null, "sendProxyProtocol": null,
                "kernel": {"protocol": "tcp", "preserveSourceIp": false, "maxRate": null, "priority": 0}
            },
            "security": {"ipAllowList": ["::ffff:10.0.0.0/104", "2001:db8::/32"], "ipBlockList": ["::ffff:10.0.0.7"], "maxConnections": null},
            "headers": {"request": [], "response": []}
        }))
        .unwrap();
        let route = KernelRoute::compile(&config, config.action.kernel.as_ref().unwrap()).unwrap();
        assert_eq!(route.allow, ["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!(route.block, ["10.0.0.7"]);
    }

    #[test]
    fn rates_in_bits_or_packets() {
        assert_eq!(MaxRate::parse("10mbps"), Ok(MaxRate::BytesPerSecond(1_250_000)));
        assert_eq!(MaxRate::parse("1.5 Gbps"), Ok(MaxRate::BytesPerSecond(187_500_000)));
        assert_eq!(MaxRate::parse("5000pps"), Ok(MaxRate::PacketsPerSecond(5000)));
        for bad in ["fast", "10", "10mb", "1bps", "-3kbps", "0pps"] {
            assert!(MaxRate::parse(bad).is_err(), "{bad}");
        }
    }
}
