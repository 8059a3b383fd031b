//! The combined report of `cargo xtask bench`: reads the JSON each benchmark wrote
//! (`datapath.json`, `forward.json`, `control-plane.json` in the bench directory; a missing
//! one is reported as not run), and writes `results.json` (all of them under one object),
//! `report.md` and the PNG charts next to them.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::charts::{BarChart, Series};

fn read(dir: &Path, name: &str) -> anyhow::Result<Option<Value>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn kpps(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{:.0}k", x / 1e3)
    }
}

fn met_text(v: Option<&Value>) -> &'static str {
    match v.and_then(Value::as_bool) {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "",
    }
}

/// What `write` produced.
pub struct Written {
    pub report: PathBuf,
    pub results: PathBuf,
    pub charts: Vec<PathBuf>,
}

/// Writes `results.json`, `report.md` and the charts into `dir` from the benchmarks' JSON
/// files there.
pub fn write(dir: &Path) -> anyhow::Result<Written> {
    let datapath = read(dir, "datapath.json")?;
    let forward = read(dir, "forward.json")?;
    let control = read(dir, "control-plane.json")?;
    let machine = [&forward, &datapath, &control]
        .iter()
        .find_map(|v| v.as_ref().and_then(|v| v.get("machine")).cloned())
        .unwrap_or(Value::Null);
    let results = json!({
        "machine": machine,
        "datapath": datapath,
        "forward": forward,
        "control_plane": control,
    });
    let results_path = dir.join("results.json");
    fs::write(
        &results_path,
        format!("{}\n", serde_json::to_string_pretty(&results)?),
    )?;
    let mut charts = Vec::new();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# xlb benchmark report\n\nWritten by `cargo xtask bench` from the JSON of each benchmark \
         (all figures: `results.json`).\n"
    );
    if let Some(m) = machine.as_object() {
        let _ = writeln!(
            md,
            "Machine: {} cores ({}), Linux {}; load average at the start of a benchmark: {}.\n",
            m.get("cores").unwrap_or(&Value::Null),
            m.get("cpu").and_then(Value::as_str).unwrap_or("?"),
            m.get("kernel").and_then(Value::as_str).unwrap_or("?"),
            [&forward, &datapath, &control]
                .iter()
                .filter_map(|v| {
                    let v = v.as_ref()?;
                    Some(format!(
                        "{} {}",
                        v.get("bench")?.as_str()?,
                        v.get("machine")?.get("load_at_start")?.as_str()?
                    ))
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match &forward {
        Some(fw) => forward_section(&mut md, fw, dir, &mut charts)?,
        None => md.push_str("## Forwarding\n\nNot run (`cargo xtask bench forward`).\n\n"),
    }
    match &datapath {
        Some(dp) => datapath_section(&mut md, dp, dir, &mut charts)?,
        None => md.push_str("## Datapath\n\nNot run (`cargo xtask bench datapath`).\n\n"),
    }
    match &control {
        Some(cp) => control_section(&mut md, cp, dir, &mut charts)?,
        None => {
            md.push_str("## Control plane\n\nNot run (`cargo xtask bench control-plane`).\n\n");
        }
    }
    let report = dir.join("report.md");
    fs::write(&report, md)?;
    Ok(Written {
        report,
        results: results_path,
        charts,
    })
}

const DATAPLANES: [(&str, &str); 6] = [
    ("xlb", "xlb"),
    ("xlbbpf", "xlb, BPF host routing"),
    ("iptables", "kube-proxy iptables"),
    ("nftables", "kube-proxy nftables"),
    ("nonat", "no-NAT ceiling"),
    ("xdppass", "no-NAT + XDP no-op"),
];

#[expect(
    clippy::too_many_lines,
    reason = "one section of the report, top to bottom"
)]
fn forward_section(
    md: &mut String,
    fw: &Value,
    dir: &Path,
    charts: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let quick = fw.get("quick").and_then(Value::as_bool) == Some(true);
    let _ = writeln!(
        md,
        "## Forwarding (`cargo xtask bench forward`){}\n",
        if quick { " — QUICK smoke run" } else { "" }
    );
    let plan = fw.get("plan").cloned().unwrap_or(Value::Null);
    let _ = writeln!(
        md,
        "UDP packets/s delivered to 3 pods through one lab node. Topology: {}. Load: an \
         AF_PACKET `sendmmsg` generator in the client namespace ({} thread(s), 60-byte frames, {} s \
         per mix), sinks counting with `recvmmsg`; *established* = {} flows reused, *new flows* = a \
         new source address × port every packet. {} repetition(s), the dataplanes alternating; \
         median [min–max] over repetitions. Tools: {}.\n",
        fw.get("topology").and_then(Value::as_str).unwrap_or("?"),
        plan.get("threads").unwrap_or(&Value::Null),
        plan.get("seconds_per_mix").unwrap_or(&Value::Null),
        plan.get("established_flows").unwrap_or(&Value::Null),
        plan.get("reps").unwrap_or(&Value::Null),
        fw.get("tools")
            .and_then(Value::as_object)
            .map(|t| t
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("; "))
            .unwrap_or_default()
    );
    md.push_str("| dataplane | services | mix | delivered pps | [min – max] | offered pps |\n|---|---:|---|---:|---:|---:|\n");
    let cells = fw
        .get("cells")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &cells {
        let d = &c["delivered_pps"];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} – {} | {} |",
            label(c["dataplane"].as_str().unwrap_or("?")),
            c["services"],
            c["mix"].as_str().unwrap_or("?"),
            kpps(f(d, "median").unwrap_or(f64::NAN)),
            kpps(f(d, "min").unwrap_or(f64::NAN)),
            kpps(f(d, "max").unwrap_or(f64::NAN)),
            kpps(f(&c["offered_pps"], "median").unwrap_or(f64::NAN)),
        );
    }
    md.push_str("\n| ratio (within a repetition) | median | [min – max] | target | |\n|---|---:|---:|---|---|\n");
    for r in fw
        .get("ratios")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let _ = writeln!(
            md,
            "| {} | {:.2}× | {:.2} – {:.2} | {} | {} |",
            r["name"].as_str().unwrap_or("?"),
            f(&r, "median").unwrap_or(f64::NAN),
            f(&r, "min").unwrap_or(f64::NAN),
            f(&r, "max").unwrap_or(f64::NAN),
            r["target"].as_str().unwrap_or(""),
            met_text(r.get("met")),
        );
    }
    md.push_str("\nTCP round trips of sequential small requests at low load, µs (median over repetitions):\n\n| dataplane | services | request p50 | request p99 | connect+request p50 | connect+request p99 |\n|---|---:|---:|---:|---:|---:|\n");
    for l in fw
        .get("latency_us")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            label(l["dataplane"].as_str().unwrap_or("?")),
            l["services"],
            f(&l, "request_p50").unwrap_or(f64::NAN),
            f(&l, "request_p99").unwrap_or(f64::NAN),
            f(&l, "connect_p50").unwrap_or(f64::NAN),
            f(&l, "connect_p99").unwrap_or(f64::NAN),
        );
    }
    let many = plan
        .get("services_many")
        .and_then(Value::as_u64)
        .unwrap_or(10_000);
    for (mix, file) in [
        ("new flows", "forward_new_flows.png"),
        ("established", "forward_established.png"),
    ] {
        let value = |dp: &str, n: u64| {
            cells.iter().find_map(|c| {
                (c["dataplane"] == dp && c["services"].as_u64() == Some(n) && c["mix"] == mix)
                    .then(|| f(&c["delivered_pps"], "median"))
                    .flatten()
            })
        };
        let chart = BarChart {
            title: &format!("Forwarding, {mix}: delivered packets/s vs Services"),
            unit: "packets/s (median)",
            categories: vec!["1 Service".into(), format!("{many} Services")],
            series: DATAPLANES
                .iter()
                .map(|(k, name)| Series {
                    name: (*name).to_owned(),
                    values: vec![value(k, 1), value(k, many)],
                })
                .filter(|s| s.values.iter().any(Option::is_some))
                .collect(),
            format: kpps,
        };
        let path = dir.join(file);
        chart.render(&path)?;
        let _ = writeln!(md, "\n![{mix}]({file})");
        charts.push(path);
    }
    md.push('\n');
    Ok(())
}

fn label(key: &str) -> &str {
    DATAPLANES
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(key, |(_, l)| l)
}

fn ns(x: f64) -> String {
    format!("{x:.0}")
}

fn datapath_section(
    md: &mut String,
    dp: &Value,
    dir: &Path,
    charts: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let quick = dp.get("quick").and_then(Value::as_bool) == Some(true);
    let _ = writeln!(
        md,
        "## Datapath (`cargo xtask bench datapath`){}\n\n{}; {} rounds, {} runs per case.\n\n\
         | case | median ns | [min – max] | × no-op floor | target | |\n|---|---:|---:|---:|---|---|",
        if quick { " — QUICK smoke run" } else { "" },
        dp.get("method").and_then(Value::as_str).unwrap_or("?"),
        dp.get("rounds").unwrap_or(&Value::Null),
        dp.get("runs_per_case").unwrap_or(&Value::Null),
    );
    let cases = dp
        .get("cases")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &cases {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} – {:.1} | {:.2}× | {} | {} |",
            c["case"].as_str().unwrap_or("?"),
            f(c, "median_ns").unwrap_or(f64::NAN),
            f(c, "min_ns").unwrap_or(f64::NAN),
            f(c, "max_ns").unwrap_or(f64::NAN),
            f(c, "ratio_to_noop").unwrap_or(f64::NAN),
            f(c, "target_ratio").map_or(String::new(), |t| format!("<= {t}×")),
            met_text(c.get("met")),
        );
    }
    let value = |key: &str| {
        cases
            .iter()
            .find(|c| c["key"] == key)
            .and_then(|c| f(c, "median_ns"))
    };
    let chart = BarChart {
        title: "Datapath: ns per packet of the NIC program (BPF_PROG_TEST_RUN)",
        unit: "ns per packet (median)",
        categories: vec![
            "no-op floor".into(),
            "non-service".into(),
            "established".into(),
            "new flow".into(),
        ],
        series: vec![
            Series {
                name: "1 Service".into(),
                values: vec![
                    value("noop_ns"),
                    value("nonservice_ns"),
                    value("established_ns"),
                    value("new_flow_ns"),
                ],
            },
            Series {
                name: "10,000 Services".into(),
                values: vec![
                    None,
                    value("nonservice_ns_10k"),
                    value("established_ns_10k"),
                    value("new_flow_ns_10k"),
                ],
            },
        ],
        format: ns,
    };
    let path = dir.join("datapath_ns.png");
    chart.render(&path)?;
    md.push_str("\n![datapath](datapath_ns.png)\n\n");
    charts.push(path);
    Ok(())
}

fn ms(x: f64) -> String {
    format!("{x:.0}")
}

#[expect(
    clippy::too_many_lines,
    reason = "one section of the report, top to bottom"
)]
fn control_section(
    md: &mut String,
    cp: &Value,
    dir: &Path,
    charts: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let quick = cp.get("quick").and_then(Value::as_bool) == Some(true);
    let _ = writeln!(
        md,
        "## Control plane (`cargo xtask bench control-plane`){}\n\nFull sync = Services and \
         EndpointSlices into an empty store, `model::desired`, `Programmer::plan`, every map \
         write; real = the kernel's maps of a datapath loaded with default capacities, fake = \
         in-memory maps.\n\n| Services | map writes | real total | store | model | plan | apply | fake total |\n|---:|---:|---:|---:|---:|---:|---:|---:|",
        if quick { " — QUICK smoke run" } else { "" },
    );
    let curve = cp
        .get("curve")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &curve {
        let r = &c["real"];
        let ms_of = |k: &str| f(r, k).map_or(f64::NAN, |s| s * 1e3);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            c["services"],
            r["map_ops"],
            ms_of("total_s"),
            ms_of("store_s"),
            ms_of("model_s"),
            ms_of("plan_s"),
            ms_of("apply_s"),
            f(&c["fake"], "total_s").map_or(f64::NAN, |s| s * 1e3),
        );
    }
    let phases = cp.get("change_mean_ms").cloned().unwrap_or(Value::Null);
    let _ = writeln!(
        md,
        "\nChange → programmed ({} EndpointSlice changes with {} Services loaded, real maps): p50 \
         {:.1} ms, p99 {:.1} ms (mean: model {:.1} ms, plan {:.1} ms, map writes {:.2} ms).\n\n\
         Agent RSS (`xlb agent --manifests`, {} Services, after its first sync): {}.\n",
        cp["changes"],
        cp["services"],
        f(cp, "change_p50_ms").unwrap_or(f64::NAN),
        f(cp, "change_p99_ms").unwrap_or(f64::NAN),
        f(&phases, "model").unwrap_or(f64::NAN),
        f(&phases, "plan").unwrap_or(f64::NAN),
        f(&phases, "apply").unwrap_or(f64::NAN),
        cp["services"],
        f(cp, "rss_mib").map_or_else(
            || "not measured".to_owned(),
            |m| {
                let r = &cp["rss"];
                format!(
                    "VmRSS {m:.0} MiB (anonymous {:.0} MiB; the rest is file-backed: the binary and \
                     the memory-mapped ring slab)",
                    f(r, "rss_anon_kib").unwrap_or(f64::NAN) / 1024.0
                )
            }
        ),
    );
    md.push_str("| target | value | |\n|---|---:|---|\n");
    for t in cp
        .get("targets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            t["target"].as_str().unwrap_or("?"),
            f(&t, "value").map_or_else(|| "-".to_owned(), |v| format!("{v:.3}")),
            met_text(t.get("met")),
        );
    }
    let chart = BarChart {
        title: "Control plane: full sync time vs Services (x 10 endpoints)",
        unit: "milliseconds (median)",
        categories: curve
            .iter()
            .map(|c| format!("{} Services", c["services"]))
            .collect(),
        series: vec![
            Series {
                name: "kernel maps".into(),
                values: curve
                    .iter()
                    .map(|c| f(&c["real"], "total_s").map(|s| s * 1e3))
                    .collect(),
            },
            Series {
                name: "in-memory fake maps".into(),
                values: curve
                    .iter()
                    .map(|c| f(&c["fake"], "total_s").map(|s| s * 1e3))
                    .collect(),
            },
        ],
        format: ms,
    };
    let path = dir.join("control_plane_sync.png");
    chart.render(&path)?;
    md.push_str("\n![control plane](control_plane_sync.png)\n\n");
    charts.push(path);
    Ok(())
}
