//! Configuration: the Go EPP's command-line flags ([`flags`]) and the `EndpointPickerConfig`
//! YAML ([`epp_config`]); [`settings`] checks the flags as a whole. Both are validated at load time so the request path never checks them.

pub mod epp_config;
pub mod flags;
pub mod flow_control;
pub mod reload;
pub mod settings;

pub use epp_config::{
    ConfigError, ConfigIssue, DEFAULT_CONFIG_YAML, EndpointPickerConfig, PluginSpec, decode_plugin_params,
};
pub use flags::{FlagError, Flags, StaticEndpoint, normalize_go_args, parse_duration};
pub use settings::{PoolSetting, Settings, SettingsError};
