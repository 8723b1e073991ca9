//! Prompt guards: reject prompts that match policy patterns, or mask personal data before it
//! leaves and restore it in the answer (pure; the ext_proc service applies the results).
//!
//! - [`patterns`]: builtin PII detectors with validation, custom patterns, one `RegexSet`.
//! - [`mask`]: per-request placeholders and the walk over a prompt's text strings.
//! - [`response`]: masking of model output (JSON bodies and SSE events).
//!
//! Raw matched text is never logged or exported: only rule names are.

pub mod mask;
pub mod patterns;
pub mod response;

pub use mask::{Placeholders, visit_prompt_strings};
pub use patterns::{Builtin, Hit, PatternSet};
