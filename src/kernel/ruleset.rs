//! The nftables ruleset of the kernel routes, as nft's JSON commands (libnftables-json(5)): one
//! table per engine instance, replaced whole in one transaction. Pure: nothing here runs nft.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::{KernelProtocol, KernelRoute};

/// A kernel route as installed: its target resolved to an address, and the lists its guards
/// apply (the route's and the engine's).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRoute<'r> {
    /// The route's name for counters: `route_<n>` (labels are the user's text, names are not).
    pub counter: String,
    pub kernel: &'r KernelRoute,
    pub target: IpAddr,
    /// Allow lists of addresses and CIDR blocks (`a.b.c.d/n`), each of which a client must be on
    /// (the route's, the engine's `defaults.security`); none: every client.
    pub allow: Vec<Vec<String>>,
    /// Block lists' entries together.
    pub block: Vec<String>,
}

const FAMILY: &str = "inet";

/// The commands that make `table` hold exactly `routes`: the table is added (so that deleting it
/// cannot fail), deleted and made anew, in one transaction: no moment where a port is unforwarded.
pub fn replace(table: &str, routes: &[ResolvedRoute<'_>]) -> Value {
    let mut commands = vec![add(json!({"table": {"family": FAMILY, "name": table}})), delete_table_command(table), add(json!({"table": {"family": FAMILY, "name": table}}))];
    // Before destination NAT: allow and block lists, on a connection's first packet.
    for (name, hook, prio, kind) in [
        ("guard_prerouting", "prerouting", -150, "filter"),
        ("guard_output", "output", -150, "filter"),
        ("nat_prerouting", "prerouting", -100, "nat"),
        ("nat_output", "output", -100, "nat"),
        ("nat_postrouting", "postrouting", 100, "nat"),
        ("count_forward", "forward", 0, "filter"),
        ("count_input", "input", 0, "filter"),
        ("count_output", "output", 0, "filter"),
    ] {
        commands.push(add(json!({"chain": {"family": FAMILY, "table": table, "name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}})));
    }
    for route in routes {
        for direction in ["in", "out"] {
            commands.push(add(json!({"counter": {"family": FAMILY, "table": table, "name": format!("{}_{direction}", route.counter)}})));
        }
        // One bucket for all of the route's flows, whichever chain and protocol meets them.
        let rate_limit = format!("{}_rate", route.counter);
        if let Some(rate) = &route.kernel.max_rate {
            commands.push(add(rate.limit_object(FAMILY, table, &rate_limit)));
        }
        if route.kernel.ports.len() > 1 {
            let name = format!("{}_ports", route.counter);
            commands.push(add(json!({"set": {"family": FAMILY, "table": table, "name": name, "type": "inet_service", "elem": route.kernel.ports}})));
        }
        let allow_lists: Vec<_> = route.allow.iter().enumerate().map(|(k, list)| address_sets(table, &format!("{}_allow{k}_", route.counter), list, &mut commands)).collect();
        let block = address_sets(table, &format!("{}_block_", route.counter), &route.block, &mut commands);
        for &l4 in protocols(route.kernel.protocol) {
            for (chain, allow) in ["guard_prerouting", "guard_output"].into_iter().flat_map(|chain| allow_lists.iter().map(move |allow| (chain, allow))) {
                for (protocol, set) in allow {
                    let mut expr = guarded(new_flow(route, l4, Some(protocol)));
                    expr.push(json!({"match": {"op": "!=", "left": {"payload": {"protocol": protocol, "field": "saddr"}}, "right": format!("@{set}")}}));
                    expr.push(json!({"drop": null}));
                    commands.push(rule(table, chain, expr));
                }
                // A client of the family the allow list has none of is not on it.
                if !allow.is_empty() {
                    for family in ["ip", "ip6"] {
                        if !allow.iter().any(|(p, _)| *p == family) {
                            let mut expr = guarded(new_flow(route, l4, Some(family)));
                            expr.push(json!({"drop": null}));
                            commands.push(rule(table, chain, expr));
                        }
                    }
                }
            }
            for chain in ["guard_prerouting", "guard_output"] {
                for (protocol, set) in &block {
                    let mut expr = guarded(new_flow(route, l4, Some(protocol)));
                    expr.push(json!({"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": "saddr"}}, "right": format!("@{set}")}}));
                    expr.push(json!({"drop": null}));
                    commands.push(rule(table, chain, expr));
                }
            }
            let target_family = if route.target.is_ipv4() { "ip" } else { "ip6" };
            for chain in ["nat_prerouting", "nat_output"] {
                let mut expr = new_flow(route, l4, Some(target_family));
                let mut dnat = json!({"family": target_family, "addr": route.target.to_string()});
                if let Some(port) = route.kernel.target_port {
                    dnat["port"] = json!(port);
                }
                expr.push(json!({"dnat": dnat}));
                commands.push(rule(table, chain, expr));
            }
            if !route.kernel.preserve_source_ip {
                // Not towards a local socket: it sees the client as it is, and masquerading over
                // the loopback leaves the flow no way back.
                let mut expr = vec![json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "lo"}})];
                expr.extend(ours(route, l4));
                expr.push(json!({"masquerade": null}));
                commands.push(rule(table, "nat_postrouting", expr));
            }
            // Every packet of the route's flows, both ways: conntrack remembers where they were sent.
            for chain in ["count_forward", "count_input", "count_output"] {
                let mut expr = Vec::new();
                // A flow between two local sockets passes output both ways: input would count it twice.
                if chain == "count_input" {
                    expr.push(json!({"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}));
                }
                expr.extend(ours(route, l4));
                if route.kernel.max_rate.is_some() {
                    expr.push(json!({"limit": rate_limit}));
                    expr.push(json!({"drop": null}));
                    commands.push(rule(table, chain, expr.clone()));
                    expr.truncate(expr.len() - 2);
                }
                // From the client (the flow's original direction) and to it, counted apart.
                for (direction, counter) in [("original", "in"), ("reply", "out")] {
                    let mut counted = expr.clone();
                    counted.push(json!({"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": direction}}));
                    counted.push(json!({"counter": format!("{}_{counter}", route.counter)}));
                    commands.push(rule(table, chain, counted));
                }
            }
        }
    }
    json!({"nftables": commands})
}

/// The commands that remove `table` (added first, so that removing a missing table succeeds).
pub fn remove(table: &str) -> Value {
    json!({"nftables": [add(json!({"table": {"family": FAMILY, "name": table}})), delete_table_command(table)]})
}

fn add(object: Value) -> Value {
    json!({"add": object})
}

fn delete_table_command(table: &str) -> Value {
    json!({"delete": {"table": {"family": FAMILY, "name": table}}})
}

fn rule(table: &str, chain: &str, expr: Vec<Value>) -> Value {
    add(json!({"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": expr}}))
}

/// A packet to one of the route's ports on an address of this host (of `family`, if given): what
/// passes through the host, or leaves it for another, is not the route's.
fn new_flow(route: &ResolvedRoute<'_>, protocol: &str, family: Option<&str>) -> Vec<Value> {
    let mut expr = vec![json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}})];
    if let Some(family) = family {
        let nfproto = if family == "ip" { "ipv4" } else { "ipv6" };
        expr.push(json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}}));
    }
    expr.push(json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": protocol}}));
    expr.push(json!({"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": ports(route)}}));
    expr
}

/// A guard's test on a connection's first packet only: a reply that happens to come from one of
/// the route's ports is not the route's to drop.
fn guarded(mut expr: Vec<Value>) -> Vec<Value> {
    expr.insert(1, json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}));
    expr
}

/// A packet of a flow this route's rules sent on: sent to one of its ports, and answered by its
/// target (a flow some other table translated is not the route's).
fn ours(route: &ResolvedRoute<'_>, protocol: &str) -> Vec<Value> {
    let family = if route.target.is_ipv4() { "ip" } else { "ip6" };
    let mut expr = vec![
        json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
        // One protocol, as meta knows it (the same both ways): it gives the port its type, which
        // neither conntrack's protocol nor a set of two protocols does.
        json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": protocol}}),
        json!({"match": {"op": "==", "left": {"ct": {"key": "proto-dst", "dir": "original"}}, "right": ports(route)}}),
        json!({"match": {"op": "==", "left": {"ct": {"key": format!("{family} saddr"), "dir": "reply"}}, "right": route.target.to_string()}}),
    ];
    if let Some(port) = route.kernel.target_port {
        expr.push(json!({"match": {"op": "==", "left": {"ct": {"key": "proto-src", "dir": "reply"}}, "right": port}}));
    }
    expr
}

/// The protocols a route's rules are written for, one rule each.
fn protocols(protocol: KernelProtocol) -> &'static [&'static str] {
    match protocol {
        KernelProtocol::Tcp => &["tcp"],
        KernelProtocol::Udp => &["udp"],
        KernelProtocol::All => &["tcp", "udp"],
    }
}

/// The route's ports: the one port, or its named set (typed, which an anonymous set of ports
/// compared with conntrack's port would not be).
fn ports(route: &ResolvedRoute<'_>) -> Value {
    match route.kernel.ports.as_slice() {
        [one] => json!(one),
        _ => json!(format!("@{}_ports", route.counter)),
    }
}

/// Named sets of the list's IPv4 and IPv6 entries (`name4`, `name6`), as `(family, set)`.
fn address_sets(table: &str, name: &str, entries: &[String], commands: &mut Vec<Value>) -> Vec<(&'static str, String)> {
    let mut sets = Vec::new();
    for (family, kind, suffix) in [("ip", "ipv4_addr", "4"), ("ip6", "ipv6_addr", "6")] {
        let elements: Vec<Value> = entries.iter().filter(|e| e.contains(':') == (family == "ip6")).map(|e| element(e)).collect();
        if elements.is_empty() {
            continue;
        }
        let set = format!("{name}{suffix}");
        commands.push(add(json!({"set": {"family": FAMILY, "table": table, "name": set, "type": kind, "flags": ["interval"], "auto-merge": true, "elem": elements}})));
        sets.push((family, set));
    }
    sets
}

fn element(entry: &str) -> Value {
    match entry.split_once('/') {
        Some((addr, len)) => json!({"prefix": {"addr": addr, "len": len.parse::<u8>().unwrap_or(128)}}),
        None => json!(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernel::MaxRate;

    fn kernel() -> KernelRoute {
        KernelRoute {
            ports: vec![8080],
            protocol: KernelProtocol::Tcp,
            host: "10.0.0.2".into(),
            target_port: Some(80),
            preserve_source_ip: false,
            max_rate: None,
            priority: 0,
            allow: vec![],
            block: vec![],
        }
    }

    fn route(kernel: &KernelRoute) -> ResolvedRoute<'_> {
        ResolvedRoute { counter: "route_0".into(), kernel, target: "10.0.0.2".parse().unwrap(), allow: vec![], block: vec![] }
    }

    fn rules_in(ruleset: &Value, chain: &str) -> Vec<Value> {
        ruleset["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].clone())
            .collect()
    }

    #[test]
    fn a_route_is_destination_nat_masquerade_and_counters() {
        let kernel = kernel();
        let ruleset = replace("smartproxy_1_0", &[route(&kernel)]);
        let commands = ruleset["nftables"].as_array().unwrap();
        // Replaced whole: add, delete, add, then the rest.
        assert!(commands[0]["add"]["table"].is_object() && commands[1]["delete"]["table"].is_object() && commands[2]["add"]["table"].is_object());
        let nat = rules_in(&ruleset, "nat_prerouting");
        assert_eq!(nat.len(), 1);
        assert_eq!(nat[0].as_array().unwrap().last().unwrap(), &json!({"dnat": {"family": "ip", "addr": "10.0.0.2", "port": 80}}));
        assert_eq!(rules_in(&ruleset, "nat_postrouting").len(), 1);
        for chain in ["count_forward", "count_input", "count_output"] {
            let rules = rules_in(&ruleset, chain);
            assert_eq!(rules.len(), 2);
            assert_eq!(rules[0].as_array().unwrap().last().unwrap(), &json!({"counter": "route_0_in"}));
            assert_eq!(rules[1].as_array().unwrap().last().unwrap(), &json!({"counter": "route_0_out"}));
        }
    }

    #[test]
    fn preserving_the_source_drops_the_masquerade_and_lists_become_sets() {
        let kernel = KernelRoute { preserve_source_ip: true, target_port: None, ports: vec![80, 443], ..kernel() };
        let mut r = route(&kernel);
        r.allow = vec![vec!["192.168.0.0/16".into(), "2001:db8::/32".into()], vec!["192.168.1.0/24".into()]];
        r.block = vec!["192.168.1.7".into()];
        let ruleset = replace("t", &[r]);
        assert!(rules_in(&ruleset, "nat_postrouting").is_empty());
        let sets: Vec<_> = ruleset["nftables"].as_array().unwrap().iter().filter_map(|c| c["add"]["set"]["name"].as_str()).collect();
        assert_eq!(sets, ["route_0_ports", "route_0_allow0_4", "route_0_allow0_6", "route_0_allow1_4", "route_0_block_4"]);
        let nat = rules_in(&ruleset, "nat_output");
        assert_eq!(nat[0].as_array().unwrap().last().unwrap(), &json!({"dnat": {"family": "ip", "addr": "10.0.0.2"}}));
        assert!(nat[0].to_string().contains(r#""right":"@route_0_ports""#));
        // The first allow list (two families), the second (IPv4, so IPv6 clients are off it) and
        // the block list, in each guard chain.
        assert_eq!(rules_in(&ruleset, "guard_prerouting").len(), 5);
    }

    #[test]
    fn a_rate_limit_drops_over_the_rate_before_counting() {
        let kernel = KernelRoute { max_rate: Some(MaxRate::BytesPerSecond(1_250_000)), ..kernel() };
        let ruleset = replace("t", &[route(&kernel)]);
        let rules = rules_in(&ruleset, "count_forward");
        assert_eq!(rules.len(), 3);
        assert!(rules[0].to_string().contains(r#"{"limit":"route_0_rate"}"#), "{}", rules[0]);
        // One named bucket for the route, in bytes.
        let limits: Vec<_> = ruleset["nftables"].as_array().unwrap().iter().filter_map(|c| c["add"]["limit"].as_object()).collect();
        assert_eq!(limits.len(), 1);
        assert_eq!((&limits[0]["name"], &limits[0]["rate"], &limits[0]["rate_unit"], &limits[0]["inv"]), (&json!("route_0_rate"), &json!(1_250_000), &json!("bytes"), &json!(true)));
    }
}
