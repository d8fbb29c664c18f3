//! Pure balancing logic, no I/O: the Maglev table builder and the plan that
//! turns a configuration into what the data plane's maps must hold.

pub mod maglev;
pub mod plan;
