//! Strict decoding of plugin `parameters`, with errors that carry the config path.

use serde::de::DeserializeOwned;

use crate::config::{ConfigIssue, PluginSpec};

/// Decode `spec.parameters` into `T` (`T::default()` when absent). Unknown fields are errors
/// when `T` denies them.
///
/// # Errors
/// A [`ConfigIssue`] whose path points into `plugins[i].parameters`.
pub fn decode_params<T: DeserializeOwned + Default>(spec: &PluginSpec) -> Result<T, ConfigIssue> {
    crate::config::decode_plugin_params(spec)
}

/// Refuse parameters on a plugin that takes none.
///
/// # Errors
/// A [`ConfigIssue`] naming the plugin's parameters.
pub fn no_params(spec: &PluginSpec) -> Result<(), ConfigIssue> {
    match &spec.parameters {
        serde_yaml_ng::Value::Null => Ok(()),
        serde_yaml_ng::Value::Mapping(m) if m.is_empty() => Ok(()),
        _ => Err(ConfigIssue {
            path: format!("{}.parameters", spec.path),
            reason: format!("plugin type {} takes no parameters", spec.plugin_type),
        }),
    }
}
