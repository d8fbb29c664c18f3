//! Configuration files, one module per daemon, and the value types they
//! share. Every struct denies unknown fields and every error names the
//! field it is about.

pub mod duration;
pub mod lb;
