//! Configuration: the Go EPP's command-line flags ([`flags`]) and the `EndpointPickerConfig`
//! YAML ([`epp_config`]); [`settings`] checks the flags as a whole. Both are validated at load time so the request path never checks them.

pub mod api_version;
pub mod duration;
pub mod epp_config;
#[cfg(feature = "server")]
pub mod flags;
pub mod flow_control;
#[cfg(feature = "server")]
pub mod reload;
#[cfg(feature = "server")]
pub mod settings;

pub use duration::parse_duration;
pub use epp_config::{
    ConfigError, ConfigIssue, DEFAULT_CONFIG_YAML, EndpointPickerConfig, PluginSpec, decode_plugin_params,
};
#[cfg(feature = "server")]
pub use flags::{FlagError, Flags, StaticEndpoint, normalize_go_args};
#[cfg(feature = "server")]
pub use settings::{PoolSetting, Settings, SettingsError};
