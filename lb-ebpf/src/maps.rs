//! The datapath's maps; layouts and names come from lb-common. Capacities here are defaults;
//! the agent resizes them at load time.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{Counter, Verdict};

/// Packets and bytes per verdict, per CPU (index: `Verdict as u32`).
#[map(name = "xlb_stats_v1")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);
