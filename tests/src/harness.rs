//! Running the datapath's programs on test frames through `BPF_PROG_TEST_RUN`.
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{Counter, Verdict, map_names};
use lb_userspace::loader::{self, Capacities};

/// A loaded (not attached) datapath.
pub struct Datapath {
    pub ebpf: Ebpf,
}

/// What a program did with a frame.
#[derive(Debug)]
pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

impl Datapath {
    #[must_use]
    pub fn load() -> Self {
        let ebpf = loader::load(&Capacities::small()).expect("loading the datapath");
        Self { ebpf }
    }

    /// Runs the NIC (XDP) program once on `frame`.
    #[must_use]
    pub fn xdp(&mut self, frame: &[u8]) -> Outcome {
        let prog = loader::xdp_program(&mut self.ebpf).expect("xdp program");
        run(|opts| prog.test_run(opts), frame)
    }

    /// Runs the pod (TC) program once on `frame`.
    #[must_use]
    pub fn tc(&mut self, frame: &[u8]) -> Outcome {
        let prog = loader::tc_program(&mut self.ebpf).expect("tc program");
        run(|opts| prog.test_run(opts), frame)
    }

    /// Packets counted for `verdict`, summed over CPUs.
    #[must_use]
    pub fn count(&self, verdict: Verdict) -> u64 {
        let stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).expect("stats map"))
                .expect("stats map type");
        stats
            .get(&(verdict as u32), 0)
            .expect("stats read")
            .iter()
            .map(|c| c.packets)
            .sum()
    }
}

fn run(
    f: impl FnOnce(
        TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
    frame: &[u8],
) -> Outcome {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = f(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    Outcome {
        action: result.return_value,
        frame: out,
    }
}

/// XDP and TC return codes (`linux/bpf.h`, `linux/pkt_cls.h`).
pub mod action {
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
}
