//! xlb's datapath: XDP on node NICs and TC on pod interfaces. Entry points only; the work lives
//! in the modules (parse, stats, ...). Every outcome is a typed `Verdict` counted per CPU.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "entry points take their context by value"
)]

mod maps;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::Verdict;

/// Node NICs: service traffic entering the node.
#[xdp]
pub fn xlb_nic(ctx: XdpContext) -> u32 {
    let (verdict, action) = nic(&ctx);
    stats::count(verdict, (ctx.data_end() - ctx.data()) as u64);
    action
}

fn nic(ctx: &XdpContext) -> (Verdict, u32) {
    // Service translation lands with the frontend maps; until then every packet passes.
    match parse::ipv4_flow(ctx.data(), ctx.data_end()) {
        Ok(_) => (Verdict::PassNotService, xdp_action::XDP_PASS),
        Err(v) => (v, xdp_action::XDP_PASS),
    }
}

/// Pod interfaces (ingress = what the pod sends): pod → service, and replies of local backends.
#[classifier]
pub fn xlb_pod(ctx: TcContext) -> i32 {
    let verdict = match parse::ipv4_flow(ctx.data(), ctx.data_end()) {
        Ok(_) => Verdict::PassNotService,
        Err(v) => v,
    };
    stats::count(verdict, u64::from(ctx.len()));
    TC_ACT_OK
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
