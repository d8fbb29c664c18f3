//! Configuration files and the value types they share.

pub mod duration;
