//! Presenting the datapath benchmark: a table for people, one JSON object for tools.
use std::fmt::{self, Write as _};

use serde_json::{Value, json};

use super::{Machine, thousands};
use crate::datapath::{
    ESTABLISHED_MAX, NEW_FLOW_MAX, Results, SCALE_MAX, SNAT_NEW_FLOW_P99_MAX,
    SNAT_NEW_FLOW_VS_LOCAL_MAX, ScaleResult,
};

fn yes_no(met: bool) -> &'static str {
    if met { "yes" } else { "NO" }
}

/// Whether every target was met.
#[must_use]
pub fn all_met(results: &Results) -> bool {
    results.cases.iter().all(|c| c.met() != Some(false))
        && results.scale.iter().all(ScaleResult::met)
}

/// The human-readable report.
#[must_use]
pub fn table(results: &Results, machine: &Machine) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_header(&mut out, results, machine);
    let _ = write_cases(&mut out, results);
    let _ = write_scale(&mut out, results);
    let _ = write_classic(&mut out, results);
    let _ = writeln!(
        out,
        "\ntargets: established <= {ESTABLISHED_MAX}x floor, new flow <= {NEW_FLOW_MAX}x floor, \
         SNAT established <= {ESTABLISHED_MAX}x floor, SNAT new flow <= \
         {SNAT_NEW_FLOW_VS_LOCAL_MAX}x the local new flow and p99 <= {SNAT_NEW_FLOW_P99_MAX} ns, \
         10k within {:.0}% of 1 svc: {}\n({:.0} s)",
        SCALE_MAX * 100.0,
        if all_met(results) {
            "all met"
        } else {
            "NOT all met"
        },
        results.seconds
    );
    out
}

fn write_header(out: &mut String, results: &Results, machine: &Machine) -> fmt::Result {
    let plan = &results.plan;
    writeln!(
        out,
        "xlb datapath benchmark: the NIC program (XDP), ns per packet, BPF_PROG_TEST_RUN"
    )?;
    writeln!(
        out,
        "machine    {} cores ({}), Linux {}, load average {} at start",
        machine.cores, machine.cpu, machine.kernel, machine.load
    )?;
    writeln!(
        out,
        "method     repeat = 1 runs, each on a fresh packet, timed by the kernel (duration);\n           \
         {} rounds x {} runs per case ({} per case), cases interleaved in batches of {};\n           \
         per case and round the mean ns/run; shown: median over rounds, min and max;\n           \
         x floor = median over rounds of (case / no-op of the same round);\n           \
         p50/p99 = quantiles of single runs (as coarse as the kernel's clock)",
        plan.rounds,
        thousands(u64::from(plan.runs_per_round)),
        thousands(plan.runs_per_case()),
        thousands(u64::from(plan.batch)),
    )?;
    let many = &results.many;
    writeln!(
        out,
        "setups     1 svc: one NodePort service with 10 node-local backends\n           \
         10k svc: that service among {} services ({} frontends, {} backends),\n           \
         programmed through the agent's programmer in {:.1} s ({} map writes)",
        thousands(many.services as u64),
        thousands(many.frontends as u64),
        thousands(many.backends as u64),
        many.program_seconds,
        thousands(many.ops as u64),
    )?;
    let entries: Vec<String> = results
        .conntrack_entries
        .iter()
        .map(|(name, n)| format!("{name} {}", thousands(*n)))
        .collect();
    writeln!(
        out,
        "conntrack  flow table of {} slots ({} buckets of {}) and an LRU map of {} for full \
         buckets, each; flows tracked at the end: {} (none lost)",
        thousands(flow_slots(results)),
        thousands(u64::from(lb_userspace::datapath::loader::flow_buckets(
            results.caps.flow_buckets
        ))),
        lb_common::FLOW_WAYS,
        thousands(u64::from(results.caps.conntrack)),
        entries.join(", ")
    )
}

/// Slots of the flow table the benchmark loaded.
fn flow_slots(results: &Results) -> u64 {
    u64::from(lb_userspace::datapath::loader::flow_buckets(
        results.caps.flow_buckets,
    )) * lb_common::FLOW_WAYS as u64
}

fn write_cases(out: &mut String, results: &Results) -> fmt::Result {
    writeln!(
        out,
        "\n{:<22} {:>9} {:>7} {:>7} {:>5} {:>5} {:>8}  {:<8} met",
        "case", "median ns", "min", "max", "p50", "p99", "x floor", "target"
    )?;
    for c in &results.cases {
        let mut targets = Vec::new();
        if let Some(t) = c.target {
            targets.push(format!("<= {t:.1}x"));
        }
        if let Some((key, t, r)) = c.relative {
            targets.push(format!(
                "<= {t:.1}x {} ({r:.2}x)",
                key.trim_end_matches("_ns")
            ));
        }
        if let Some(m) = c.p99_max {
            targets.push(format!("p99 <= {m}"));
        }
        let (target, met) = match c.met() {
            Some(met) => (targets.join(", "), yes_no(met)),
            None => (String::new(), ""),
        };
        writeln!(
            out,
            "{:<22} {:>9.1} {:>7.1} {:>7.1} {:>5} {:>5} {:>7.2}x  {:<8} {}",
            c.label, c.ns.median, c.ns.min, c.ns.max, c.p50, c.p99, c.ratio.median, target, met
        )?;
    }
    let capacity = flow_slots(results);
    let filled = results
        .conntrack_entries
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    for c in results.cases.iter().filter(|c| c.new_flows) {
        let rounds: Vec<String> = c.per_round.iter().map(|ns| format!("{ns:.0}")).collect();
        writeln!(
            out,
            "  {}: per round {} ns (flow table filling up to {:.0}% of its slots)",
            c.label,
            rounds.join(", "),
            filled as f64 * 100.0 / capacity as f64
        )?;
    }
    Ok(())
}

fn write_scale(out: &mut String, results: &Results) -> fmt::Result {
    writeln!(
        out,
        "\n10k vs 1 service (median over rounds of the per-round change; target within +-{:.0}%):",
        SCALE_MAX * 100.0
    )?;
    for sc in &results.scale {
        writeln!(
            out,
            "  {:<22} {:>+6.1}%   met: {}",
            sc.label,
            sc.change * 100.0,
            yes_no(sc.met())
        )?;
    }
    Ok(())
}

fn write_classic(out: &mut String, results: &Results) -> fmt::Result {
    let classic = &results.classic;
    writeln!(
        out,
        "\nclassic method (optimistic): repeat = {} on ONE packet context, on a frontend whose\n\
         only backend is itself, so every iteration re-hits the frontend and its conntrack entry;\n\
         the kernel reports total time / repeat. No per-run overhead, hot caches, no fresh packet:\n\
         not comparable with the figures above (median of one run per round).",
        thousands(u64::from(classic.repeat))
    )?;
    writeln!(
        out,
        "  established (self-backend frontend)  {:>6.1} ns/packet   (no-op, same method: {:.1} ns)",
        classic.established_median(),
        classic.noop_median()
    )
}

/// The JSON report: medians of the repeat = 1 method under the documented keys, and the rest.
#[must_use]
pub fn json(results: &Results, machine: &Machine, quick: bool) -> Value {
    let mut top = serde_json::Map::new();
    top.insert("bench".into(), json!("datapath"));
    top.insert(
        "method".into(),
        json!(
            "BPF_PROG_TEST_RUN, repeat = 1, a fresh packet per run, the kernel's duration; \
             per-round mean, median over rounds"
        ),
    );
    top.insert("quick".into(), json!(quick));
    for c in &results.cases {
        top.insert(c.key.into(), json!(c.ns.median));
    }
    for key in ["snat_new_flow_ns", "snat_new_flow_ns_10k"] {
        if let Some(c) = results.cases.iter().find(|c| c.key == key) {
            top.insert(key.replace("_ns", "_p99_ns"), json!(c.p99));
        }
    }
    let stem = |key: &str| key.replace("_ns", "");
    let ratios = results
        .cases
        .iter()
        .map(|c| (stem(c.key), json!(c.ratio.median)))
        .collect();
    top.insert("ratio_to_noop".into(), Value::Object(ratios));
    let changes = results
        .scale
        .iter()
        .map(|s| (stem(s.key), json!(s.change)))
        .collect();
    top.insert("change_10k_vs_1".into(), Value::Object(changes));
    top.insert("all_targets_met".into(), json!(all_met(results)));
    top.insert("targets".into(), targets_json(results));
    top.insert("cases".into(), cases_json(results));
    let classic = &results.classic;
    top.insert(
        "classic_repeat".into(),
        json!({
            "repeat": classic.repeat,
            "note": "optimistic: all iterations on one packet context, frontend whose backend is itself",
            "established_self_backend_ns": classic.established_median(),
            "noop_ns": classic.noop_median(),
            "established_per_round_ns": classic.established_ns,
            "noop_per_round_ns": classic.noop_ns,
        }),
    );
    let plan = &results.plan;
    top.insert("rounds".into(), json!(plan.rounds));
    top.insert("runs_per_case".into(), json!(plan.runs_per_case()));
    top.insert("runs_per_case_per_round".into(), json!(plan.runs_per_round));
    top.insert("batch".into(), json!(plan.batch));
    let many = &results.many;
    top.insert(
        "setup_10k".into(),
        json!({
            "services": many.services,
            "frontends": many.frontends,
            "backends": many.backends,
            "map_writes": many.ops,
            "program_seconds": many.program_seconds,
        }),
    );
    let entries: serde_json::Map<String, Value> = results
        .conntrack_entries
        .iter()
        .map(|(name, n)| ((*name).to_owned(), json!(n)))
        .collect();
    top.insert(
        "conntrack".into(),
        json!({
            "flow_table_slots": flow_slots(results),
            "lru_capacity": results.caps.conntrack,
            "flows_at_end": entries,
        }),
    );
    top.insert("machine".into(), machine.json());
    top.insert("seconds".into(), json!(results.seconds));
    Value::Object(top)
}

fn cases_json(results: &Results) -> Value {
    results
        .cases
        .iter()
        .map(|c| {
            json!({
                "key": c.key,
                "case": c.label,
                "runs": c.runs,
                "median_ns": c.ns.median,
                "min_ns": c.ns.min,
                "max_ns": c.ns.max,
                "per_round_ns": c.per_round,
                "p50_run_ns": c.p50,
                "p99_run_ns": c.p99,
                "ratio_to_noop": c.ratio.median,
                "ratio_min": c.ratio.min,
                "ratio_max": c.ratio.max,
                "target_ratio": c.target,
                "met": c.met(),
            })
        })
        .collect()
}

fn targets_json(results: &Results) -> Value {
    let ratios = results.cases.iter().filter_map(|c| {
        let t = c.target?;
        Some(json!({
            "target": format!("{} <= {t}x noop", c.key),
            "value": c.ratio.median,
            "met": c.ratio.median <= t,
        }))
    });
    let relative = results.cases.iter().filter_map(|c| {
        let (key, t, r) = c.relative?;
        Some(json!({
            "target": format!("{} <= {t}x {key}", c.key),
            "value": r,
            "met": r <= t,
        }))
    });
    let p99 = results.cases.iter().filter_map(|c| {
        let m = c.p99_max?;
        Some(json!({
            "target": format!("{} p99 <= {m} ns", c.key),
            "value": c.p99,
            "met": c.p99 <= m,
        }))
    });
    let scale = results.scale.iter().map(|s| {
        json!({
            "target": format!("{} within {}% of 1 service", s.key, SCALE_MAX * 100.0),
            "value": s.change,
            "met": s.met(),
        })
    });
    ratios.chain(relative).chain(p99).chain(scale).collect()
}
