//! Configuration files, one module per daemon. Every struct denies unknown
//! fields and every error names the field it is about.

pub mod lb;
