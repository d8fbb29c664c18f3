//! smtp-lb kernel side. Entry points only; each concern has its own module:
//! [`parse`] (headers), [`select`] (service, tracked flow, Maglev table),
//! [`flows`] (the flow table),
//! [`forward`] (L2 DSR, IPIP / IP6IP6), [`too_big`] (ICMP for packets the
//! tunnel cannot carry), [`csum`], [`balance`] (the packet
//! path that ties them together), [`icmp`] (errors about balanced flows),
//! [`decap`] (the relay side), [`admission`] (new flows refused under
//! back-pressure), [`counters`] (this CPU's), [`maps`].
#![no_std]
#![no_main]

mod admission;
mod balance;
mod counters;
mod csum;
mod decap;
mod flows;
mod forward;
mod icmp;
mod maps;
mod parse;
#[cfg(feature = "probes")]
mod probes;
mod select;
mod too_big;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// The balancer. Every path ends in a counted verdict; anything it cannot
/// parse is passed (`XDP_PASS`), never aborted, so non-SMTP traffic of the
/// node always reaches its stack. Inlined into the entry point: left to
/// itself, LLVM makes the whole path a bpf-to-bpf call (on every packet)
/// once the program is large enough.
#[xdp]
#[inline(always)]
pub fn smtp_lb(ctx: XdpContext) -> u32 {
    balance::run(&ctx)
}

/// Does nothing but pass: the floor for per-packet cost, and the program a
/// veth peer needs attached to receive native-mode `XDP_TX` frames.
#[xdp]
pub fn smtp_lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Relay side: strips IPIP / IP6IP6 so the stack sees the client's packet.
#[xdp]
pub fn smtp_lb_decap(ctx: XdpContext) -> u32 {
    decap::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
