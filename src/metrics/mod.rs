//! The EPP's own metrics, out: [`names`] and [`exported`] register and render them under the
//! upstream names; [`labels`] bounds the label values that come from requests. Model-server metrics coming in are read by [`crate::scrape`].

pub mod exported;
pub mod labels;
pub mod names;
