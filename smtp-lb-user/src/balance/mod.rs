//! Pure balancing logic, no I/O: the Maglev table builder, the plan that
//! turns a configuration into what the data plane's maps must hold, warmup
//! ramps, and the effective weights the daemon programs.

pub mod maglev;
pub mod plan;
pub mod warmup;
pub mod weights;
