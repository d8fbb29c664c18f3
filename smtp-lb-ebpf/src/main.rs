//! smtp-lb kernel side. Entry points only; each concern has its own module.
#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use smtp_lb_common::{GlobalStats, SMTP_PORTS};

use crate::parse::{ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, ptr_at};

/// The balancer. Any error path returns `XDP_PASS`, not `XDP_ABORTED`, so a
/// packet the program cannot handle still reaches the host stack.
#[xdp]
pub fn smtp_lb(ctx: XdpContext) -> u32 {
    count(|s| s.packets += 1);
    match try_smtp_lb(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(|s| s.truncated += 1);
            xdp_action::XDP_PASS
        }
    }
}

/// Does nothing but pass: the floor for per-packet cost, and the program a
/// veth peer needs attached to receive native-mode `XDP_TX` frames.
#[xdp]
pub fn smtp_lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(f: impl FnOnce(&mut GlobalStats)) {
    if let Some(stats) = maps::GLOBAL_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        f(unsafe { &mut *stats });
    }
}

fn try_smtp_lb(ctx: &XdpContext) -> Result<u32, ()> {
    let mut offset = ETH_HLEN;
    let mut ether_type = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 12).ok_or(())? });
    if ether_type == ETH_P_8021Q {
        ether_type = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 16).ok_or(())? });
        offset += 4;
    }
    let (proto, l4) = match ether_type {
        ETH_P_IP => {
            count(|s| s.ipv4 += 1);
            let ver_ihl: u8 = unsafe { *ptr_at(ctx, offset).ok_or(())? };
            let proto: u8 = unsafe { *ptr_at(ctx, offset + 9).ok_or(())? };
            (proto, offset + usize::from(ver_ihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            count(|s| s.ipv6 += 1);
            let next: u8 = unsafe { *ptr_at(ctx, offset + 6).ok_or(())? };
            (next, offset + 40)
        }
        _ => {
            count(|s| s.non_ip += 1);
            return Ok(xdp_action::XDP_PASS);
        }
    };
    if proto != IPPROTO_TCP {
        return Ok(xdp_action::XDP_PASS);
    }
    let dport = u16::from_be(unsafe { *ptr_at::<u16>(ctx, l4 + 2).ok_or(())? });
    let flags: u8 = unsafe { *ptr_at(ctx, l4 + 13).ok_or(())? };
    if SMTP_PORTS.contains(&dport) {
        count(|s| s.smtp_tcp += 1);
        // SYN set, ACK clear: a new connection.
        if flags & 0x12 == 0x02 {
            count(|s| s.smtp_syn += 1);
        }
    }
    Ok(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
