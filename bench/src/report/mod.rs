//! Presenting benchmark results: the machine they ran on, each benchmark's table and JSON,
//! and the combined report (`report.md`, PNG charts, `results.json`).
pub mod charts;
pub mod combined;
pub mod datapath;

use std::fs;

use serde_json::{Value, json};

/// The machine, as far as it matters for the figures.
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    /// 1-minute load average when the benchmark started.
    pub load: String,
}

impl Machine {
    #[must_use]
    pub fn probe() -> Self {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v)
            })
            .map_or_else(|| "unknown CPU".into(), |m| m.trim().to_owned());
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_owned(),
        }
    }
}

impl Machine {
    /// One line for a table's heading.
    #[must_use]
    pub fn line(&self) -> String {
        format!(
            "{} cores ({}), kernel {}, load {} at start",
            self.cores, self.cpu, self.kernel, self.load
        )
    }

    /// As the JSON reports carry it.
    #[must_use]
    pub fn json(&self) -> Value {
        json!({
            "cores": self.cores,
            "cpu": self.cpu,
            "kernel": self.kernel,
            "load_at_start": self.load,
        })
    }
}

/// `1234567` → `1,234,567`.
#[must_use]
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_048_576), "1,048,576");
    }
}
