//! The forwarding benchmark's figures: medians and spreads over repetitions, the ratios the
//! targets are stated in, a table for people and one JSON object for tools.
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Dataplane, Results, Trial, scenario};
use crate::{
    report::{Machine, thousands},
    stats::{self, Summary},
};

/// The two flow mixes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MixKind {
    Established,
    NewFlows,
}

impl MixKind {
    pub const ALL: [MixKind; 2] = [MixKind::NewFlows, MixKind::Established];

    fn suffix(self) -> &'static str {
        match self {
            MixKind::Established => "_est",
            MixKind::NewFlows => "",
        }
    }

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            MixKind::Established => "established",
            MixKind::NewFlows => "new flows",
        }
    }
}

fn scale_name(services: usize) -> &'static str {
    if services == 1 { "1" } else { "10k" }
}

/// `xlb_pps_10k_est` and friends.
#[must_use]
pub fn key(dp: Dataplane, services: usize, mix: MixKind) -> String {
    format!("{}_pps_{}{}", dp.key(), scale_name(services), mix.suffix())
}

fn delivered(t: &Trial, mix: MixKind) -> f64 {
    match mix {
        MixKind::Established => t.established.delivered_pps(),
        MixKind::NewFlows => t.new_flows.delivered_pps(),
    }
}

fn offered(t: &Trial, mix: MixKind) -> f64 {
    match mix {
        MixKind::Established => t.established.offered_pps(),
        MixKind::NewFlows => t.new_flows.offered_pps(),
    }
}

/// Per repetition, the figure of one (dataplane, services) trial.
fn per_rep(r: &Results, dp: Dataplane, services: usize, f: impl Fn(&Trial) -> f64) -> Vec<f64> {
    (0..r.plan.reps)
        .filter_map(|rep| {
            r.trials
                .iter()
                .find(|t| t.rep == rep && t.dataplane == dp && t.services == services)
                .map(&f)
        })
        .collect()
}

/// One cell of the table.
pub struct Cell {
    pub dataplane: Dataplane,
    pub services: usize,
    pub mix: MixKind,
    pub delivered: Summary,
    pub offered: Summary,
}

#[must_use]
pub fn cells(r: &Results) -> Vec<Cell> {
    let mut out = Vec::new();
    for (dp, services) in super::trial_order(r.plan.many) {
        for mix in MixKind::ALL {
            let d = per_rep(r, dp, services, |t| delivered(t, mix));
            let o = per_rep(r, dp, services, |t| offered(t, mix));
            if let (Some(delivered), Some(offered)) = (stats::summarize(&d), stats::summarize(&o)) {
                out.push(Cell {
                    dataplane: dp,
                    services,
                    mix,
                    delivered,
                    offered,
                });
            }
        }
    }
    out
}

/// A ratio between two trials of the same repetition, and its target.
pub struct Ratio {
    pub name: String,
    pub value: Summary,
    pub target: Target,
}

#[derive(Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    /// |value − 1| ≤ this.
    Within(f64),
    None,
}

impl Ratio {
    #[must_use]
    pub fn met(&self) -> Option<bool> {
        match self.target {
            Target::AtLeast(t) => Some(self.value.median >= t),
            Target::Within(t) => Some((self.value.median - 1.0).abs() <= t),
            Target::None => None,
        }
    }

    #[must_use]
    pub fn target_text(&self) -> String {
        match self.target {
            Target::AtLeast(t) => format!(">= {t}x"),
            Target::Within(t) => format!("1 +- {:.0}%", t * 100.0),
            Target::None => String::new(),
        }
    }
}

#[must_use]
pub fn ratios(r: &Results) -> Vec<Ratio> {
    let many = r.plan.many;
    let ratio = |name: String,
                 (a, an): (Dataplane, usize),
                 (b, bn): (Dataplane, usize),
                 mix: MixKind,
                 target: Target| {
        let x = per_rep(r, a, an, |t| delivered(t, mix));
        let y = per_rep(r, b, bn, |t| delivered(t, mix));
        let v: Vec<f64> = x.iter().zip(&y).map(|(x, y)| x / y).collect();
        stats::summarize(&v).map(|value| Ratio {
            name,
            value,
            target,
        })
    };
    let (xlb, ipt, nft, nonat) = (
        Dataplane::Xlb,
        Dataplane::Iptables,
        Dataplane::Nftables,
        Dataplane::NoNat,
    );
    let mut out = Vec::new();
    let nf = MixKind::NewFlows;
    // The targets, for xlb as deployed by default and with BPF host routing.
    for (x, name) in [(xlb, "xlb"), (Dataplane::XlbBpf, "xlb-bpf")] {
        out.extend(ratio(
            format!("new flows: {name} / iptables, 1 service"),
            (x, 1),
            (ipt, 1),
            nf,
            Target::AtLeast(2.0),
        ));
        out.extend(ratio(
            format!("new flows: {name} / iptables, 10k services"),
            (x, many),
            (ipt, many),
            nf,
            Target::AtLeast(15.0),
        ));
        for mix in MixKind::ALL {
            for n in [1, many] {
                out.extend(ratio(
                    format!(
                        "{}: {name} / no-NAT ceiling, {} svc",
                        mix.label(),
                        scale_name(n)
                    ),
                    (x, n),
                    (nonat, 1),
                    mix,
                    Target::AtLeast(0.95),
                ));
            }
            out.extend(ratio(
                format!("{}: {name} 10k / {name} 1", mix.label()),
                (x, many),
                (x, 1),
                mix,
                Target::Within(0.10),
            ));
        }
    }
    for mix in MixKind::ALL {
        out.extend(ratio(
            format!("{}: xlb / no-NAT + XDP no-op, 1 svc", mix.label()),
            (xlb, 1),
            (Dataplane::XdpPass, 1),
            mix,
            Target::None,
        ));
        out.extend(ratio(
            format!("{}: no-NAT + XDP no-op / no-NAT", mix.label()),
            (Dataplane::XdpPass, 1),
            (nonat, 1),
            mix,
            Target::None,
        ));
        for n in [1, many] {
            out.extend(ratio(
                format!("{}: xlb / nftables, {} svc", mix.label(), scale_name(n)),
                (xlb, n),
                (nft, n),
                mix,
                Target::None,
            ));
        }
        for (k, name) in [(ipt, "iptables"), (nft, "nftables")] {
            out.extend(ratio(
                format!("{}: {name} 10k / {name} 1", mix.label()),
                (k, many),
                (k, 1),
                mix,
                Target::None,
            ));
        }
    }
    out
}

/// Median over repetitions of each latency figure, per (dataplane, services).
pub struct LatencyRow {
    pub dataplane: Dataplane,
    pub services: usize,
    pub keepalive_p50: f64,
    pub keepalive_p99: f64,
    pub connect_p50: f64,
    pub connect_p99: f64,
}

#[must_use]
pub fn latency_rows(r: &Results) -> Vec<LatencyRow> {
    super::trial_order(r.plan.many)
        .iter()
        .map(|&(dp, n)| {
            let m = |f: fn(&Trial) -> f64| stats::median(&per_rep(r, dp, n, f)).unwrap_or(f64::NAN);
            LatencyRow {
                dataplane: dp,
                services: n,
                keepalive_p50: m(|t| t.latency.keepalive_p50_us),
                keepalive_p99: m(|t| t.latency.keepalive_p99_us),
                connect_p50: m(|t| t.latency.connect_p50_us),
                connect_p99: m(|t| t.latency.connect_p99_us),
            }
        })
        .collect()
}

fn kpps(x: f64) -> String {
    format!("{:.0}k", x / 1000.0)
}

/// The human-readable report.
#[must_use]
pub fn table(r: &Results, machine: &Machine, quick: bool) -> String {
    let mut o = String::new();
    let p = &r.plan;
    let _ = writeln!(
        o,
        "xlb forwarding benchmark: UDP packets/s through one lab node to 3 pods{}",
        if quick {
            " (QUICK: a smoke run, not figures to quote)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "machine    {} cores ({}), Linux {}, load average {} at start",
        machine.cores, machine.cpu, machine.kernel, machine.load
    );
    let _ = writeln!(
        o,
        "path       client -> veth -> switch -> node eth0 -> NodePort {} (externalTrafficPolicy\n           \
         Local, 3 pods on that node) -> pod veths -> sinks; the no-NAT ceiling sends to the\n           \
         pods' addresses through the same node with no rules at all",
        scenario::NODE_PORT_UDP
    );
    let _ = writeln!(
        o,
        "load       AF_PACKET generator in the client namespace, {} thread(s), sendmmsg of 60-byte\n           \
         frames, {:.1} s per mix (<= {} packets); established = {} flows reused, new flows = a\n           \
         new source address x port every packet; sinks count with recvmmsg; delivered pps =\n           \
         datagrams the sinks counted / sending time; {} repetition(s), a lab per dataplane\n           \
         (kernel conntrack flushed before each trial), dataplanes alternating; figures:\n           \
         median [min-max] over repetitions",
        p.threads,
        p.seconds,
        thousands(p.max_packets),
        p.est_flows,
        p.reps
    );
    let tools: Vec<String> = r.tools.iter().map(|(n, v)| format!("{n}: {v}")).collect();
    let _ = writeln!(o, "tools      {}", tools.join("; "));
    let _ = writeln!(
        o,
        "\n{:<20} {:>8}  {:<12} {:>10} {:>21} {:>10}",
        "dataplane", "services", "mix", "delivered", "[min - max]", "offered"
    );
    for c in cells(r) {
        let _ = writeln!(
            o,
            "{:<20} {:>8}  {:<12} {:>10} {:>21} {:>10}",
            c.dataplane.label(),
            thousands(c.services as u64),
            c.mix.label(),
            kpps(c.delivered.median),
            format!("[{} - {}]", kpps(c.delivered.min), kpps(c.delivered.max)),
            kpps(c.offered.median),
        );
    }
    let _ = writeln!(
        o,
        "\nratios (median over repetitions of the ratio within a repetition):"
    );
    for ratio in ratios(r) {
        let met = match ratio.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        let _ = writeln!(
            o,
            "  {:<48} {:>6.2}x [{:.2}-{:.2}]  {:<9} {met}",
            ratio.name,
            ratio.value.median,
            ratio.value.min,
            ratio.value.max,
            ratio.target_text()
        );
    }
    let _ = writeln!(
        o,
        "\nTCP round trips, sequential requests at low load (us, median over repetitions):\n{:<20} {:>8}  {:>9} {:>9}  {:>11} {:>11}",
        "dataplane", "services", "req p50", "req p99", "connect p50", "connect p99"
    );
    for l in latency_rows(r) {
        let _ = writeln!(
            o,
            "{:<20} {:>8}  {:>9.0} {:>9.0}  {:>11.0} {:>11.0}",
            l.dataplane.label(),
            thousands(l.services as u64),
            l.keepalive_p50,
            l.keepalive_p99,
            l.connect_p50,
            l.connect_p99
        );
    }
    let _ = writeln!(o, "({:.0} s)", r.seconds);
    o
}

fn summary_json(s: &Summary) -> Value {
    json!({"median": s.median, "min": s.min, "max": s.max})
}

/// The JSON report: medians under the documented keys, and everything else.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "one flat list of the report's fields"
)]
pub fn json(r: &Results, machine: &Machine, quick: bool) -> Value {
    let mut top = serde_json::Map::new();
    top.insert("bench".into(), json!("forward"));
    top.insert("quick".into(), json!(quick));
    top.insert(
        "unit".into(),
        json!("delivered packets/s (median over repetitions)"),
    );
    let cells = cells(r);
    for c in &cells {
        top.insert(
            key(c.dataplane, c.services, c.mix),
            json!(c.delivered.median),
        );
    }
    top.insert(
        "cells".into(),
        cells
            .iter()
            .map(|c| {
                json!({
                    "key": key(c.dataplane, c.services, c.mix),
                    "dataplane": c.dataplane.key(),
                    "services": c.services,
                    "mix": c.mix.label(),
                    "delivered_pps": summary_json(&c.delivered),
                    "offered_pps": summary_json(&c.offered),
                })
            })
            .collect(),
    );
    top.insert(
        "ratios".into(),
        ratios(r)
            .iter()
            .map(|x| {
                json!({
                    "name": x.name,
                    "median": x.value.median,
                    "min": x.value.min,
                    "max": x.value.max,
                    "target": x.target_text(),
                    "met": x.met(),
                })
            })
            .collect(),
    );
    top.insert(
        "latency_us".into(),
        latency_rows(r)
            .iter()
            .map(|l| {
                json!({
                    "dataplane": l.dataplane.key(),
                    "services": l.services,
                    "request_p50": l.keepalive_p50,
                    "request_p99": l.keepalive_p99,
                    "connect_p50": l.connect_p50,
                    "connect_p99": l.connect_p99,
                })
            })
            .collect(),
    );
    top.insert(
        "trials".into(),
        r.trials
            .iter()
            .map(|t| {
                json!({
                    "dataplane": t.dataplane.key(),
                    "services": t.services,
                    "rep": t.rep,
                    "setup_seconds": t.setup_seconds,
                    "conntrack_entries": t.conntrack_entries,
                    "established": {
                        "sent": t.established.sent,
                        "refused": t.established.refused,
                        "received_per_pod": t.established.received,
                        "seconds": t.established.seconds,
                    },
                    "new_flows": {
                        "sent": t.new_flows.sent,
                        "refused": t.new_flows.refused,
                        "received_per_pod": t.new_flows.received,
                        "seconds": t.new_flows.seconds,
                    },
                    "latency_us": {
                        "request_p50": t.latency.keepalive_p50_us,
                        "request_p99": t.latency.keepalive_p99_us,
                        "connect_p50": t.latency.connect_p50_us,
                        "connect_p99": t.latency.connect_p99_us,
                    },
                })
            })
            .collect(),
    );
    let p = &r.plan;
    top.insert(
        "plan".into(),
        json!({
            "reps": p.reps, "seconds_per_mix": p.seconds, "max_packets": p.max_packets,
            "threads": p.threads, "services_many": p.many,
            "latency_requests": p.latency_requests, "established_flows": p.est_flows,
        }),
    );
    top.insert(
        "topology".into(),
        json!("NodePort (externalTrafficPolicy Local) on one node with the 3 pods local; no-NAT ceiling: client to pod addresses through the same node"),
    );
    top.insert(
        "tools".into(),
        r.tools
            .iter()
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    );
    top.insert("machine".into(), machine.json());
    top.insert("seconds".into(), json!(r.seconds));
    Value::Object(top)
}
