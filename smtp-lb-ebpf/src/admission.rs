//! Admission under back-pressure: while every relay of a service is over
//! its queue high-water mark, user space sets the service's flag in
//! [`ADMISSION`] and new connections are refused here. Refused means the
//! SYN is dropped, not answered with a RST: the client's TCP retransmits
//! it (1 s, 3 s, 7 s …), so a short episode costs a sender a delay and no
//! error, and a long one ends in its connect timeout and a retry from its
//! queue, as for any unreachable MX. A RST would turn every refusal into an
//! immediate "connection refused" that MTAs treat as a failed MX and
//! answer by hammering the next one, and would reflect a packet to any
//! spoofed source. Established flows are untouched: only SYNs are asked.
use smtp_lb_common::FlowKey;

use crate::{
    maps::ADMISSION,
    select::{self, ServiceRef},
};

/// Whether the SYN of `key` to `svc` is refused. A retransmitted SYN of a
/// flow admitted before the flag was set (still tracked, not closing) goes
/// through: its relay has it half open already.
#[inline(always)]
pub fn refuses(key: &FlowKey, svc: &ServiceRef) -> bool {
    ADMISSION.get(svc.id).is_some_and(|v| *v != 0) && !select::live(key)
}
