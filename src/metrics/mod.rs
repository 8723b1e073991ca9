//! The EPP's own metrics, out: [`names`] and [`exported`] register and render them under the
//! upstream names. Model-server metrics coming in are read by [`crate::scrape`].

pub mod exported;
pub mod names;
