//! Validated settings: [`Flags`] as parsed by clap, checked as a whole into a [`Settings`]
//! whose pool source is one enum, so the wiring matches on it once instead of testing which
//! flags are empty.
//!
//! Every problem is reported at once ([`SettingsError`] lists them all, each naming its flag),
//! as the config file's validation does. The label selector of `--endpoint-selector` is parsed
//! strictly: a malformed entry would otherwise select more pods than meant (an entry without
//! `=` used to be dropped, and a selector left empty matches every ready pod of the namespace).

use std::collections::BTreeMap;

use super::flags::{FlagError, Flags, REMOVED_METRIC_FLAGS, StaticEndpoint};

/// Where the pool's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSetting {
    /// `--endpoints`: a fixed list, no Kubernetes.
    Static(Vec<StaticEndpoint>),
    /// `--pool-name`: an `InferencePool` watched in the pool namespace.
    InferencePool {
        /// Pool name.
        name: String,
        /// API group (`--pool-group`).
        group: String,
    },
    /// `--endpoint-selector` and `--endpoint-target-ports`: standalone mode without the CRD.
    Selector {
        /// Pod labels that must all match.
        labels: BTreeMap<String, String>,
        /// Target ports, in order, without adjacent repeats.
        target_ports: Vec<u16>,
    },
}

impl PoolSetting {
    /// Whether the pool comes from the Kubernetes API.
    pub fn needs_kubernetes(&self) -> bool {
        !matches!(self, PoolSetting::Static(_))
    }
}

/// Flags that passed validation.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The flags as given.
    pub flags: Flags,
    /// The pool source they name.
    pub pool: PoolSetting,
}

/// Every problem found in the flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct SettingsError {
    /// The problems, in flag order; never empty.
    pub errors: Vec<FlagError>,
}

impl Settings {
    /// Validate `flags`.
    ///
    /// # Errors
    /// [`SettingsError`] with every problem found.
    pub fn from_flags(flags: Flags) -> Result<Self, SettingsError> {
        let mut errors = Vec::new();
        let removed = [
            &flags.total_queued_requests_metric,
            &flags.total_running_requests_metric,
            &flags.kv_cache_usage_percentage_metric,
            &flags.lora_info_metric,
            &flags.cache_info_metric,
        ];
        for (flag, value) in REMOVED_METRIC_FLAGS.iter().zip(removed) {
            if value.is_some() {
                errors.push(FlagError::RemovedMetricFlag { flag });
            }
        }
        let given = [
            !flags.endpoints.is_empty(),
            !flags.pool_name.is_empty(),
            !flags.endpoint_selector.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            errors.push(FlagError::PoolSource);
        }
        if !(flags.ha_retry_period < flags.ha_renew_deadline
            && flags.ha_renew_deadline < flags.ha_lease_duration
            && flags.ha_lease_duration >= std::time::Duration::from_secs(1))
        {
            errors.push(FlagError::LeaseTiming);
        }
        if flags.watch_config_file && flags.config_file.is_empty() {
            errors.push(FlagError::WatchWithoutFile);
        }
        let statics = flags.static_endpoints();
        if let Err(e) = &statics {
            errors.push(e.clone());
        }
        let mut pool = None;
        if !flags.endpoint_selector.is_empty() {
            if !(1..=8).contains(&flags.endpoint_target_ports.len()) {
                errors.push(FlagError::TargetPorts);
            }
            match parse_selector(&flags.endpoint_selector) {
                Ok(labels) => {
                    let mut target_ports = flags.endpoint_target_ports.clone();
                    target_ports.dedup();
                    pool = Some(PoolSetting::Selector { labels, target_ports });
                }
                Err(e) => errors.push(e),
            }
        } else if !flags.pool_name.is_empty() {
            pool = Some(PoolSetting::InferencePool {
                name: flags.pool_name.clone(),
                group: flags.pool_group.clone(),
            });
        } else if let Ok(endpoints) = statics {
            pool = Some(PoolSetting::Static(endpoints));
        }
        match pool {
            Some(pool) if errors.is_empty() => Ok(Self { flags, pool }),
            _ => Err(SettingsError { errors }),
        }
    }
}

/// Parse `k=v[,k=v]` as Kubernetes equality-based label requirements. A key is an optional
/// DNS prefix and `/`, then a name of at most 63 characters; a value is empty or at most 63
/// characters. Names and non-empty values start and end with an alphanumeric character and hold
/// only alphanumerics, `-`, `_` and `.`.
///
/// # Errors
/// [`FlagError::BadSelector`] naming the offending entry.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, FlagError> {
    let bad = |entry: &str, reason: &str| FlagError::BadSelector {
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let mut labels = BTreeMap::new();
    for entry in text.split(',').map(str::trim) {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(bad(entry, "expected key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        let value = value.strip_prefix('=').unwrap_or(value); // `k==v` is equality too
        let name = key.rsplit_once('/').map_or(key, |(prefix, name)| {
            if prefix.is_empty() || prefix.len() > 253 {
                ""
            } else {
                name
            }
        });
        if !is_label_text(name) {
            return Err(bad(entry, "the key is not a label name"));
        }
        if !value.is_empty() && !is_label_text(value) {
            return Err(bad(entry, "the value is not a label value"));
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(bad(entry, "the key is given twice"));
        }
    }
    Ok(labels)
}

fn is_label_text(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, SettingsError> {
        Settings::from_flags(
            Flags::try_parse_from(std::iter::once("epp").chain(args.iter().copied())).unwrap(),
        )
    }

    #[test]
    fn leader_election_timing_must_be_ordered() {
        let ok = settings(&["--pool-name=p", "--ha-enable-leader-election"]).unwrap();
        assert_eq!(
            (
                ok.flags.ha_retry_period,
                ok.flags.ha_renew_deadline,
                ok.flags.ha_lease_duration
            ),
            (
                std::time::Duration::from_millis(500),
                std::time::Duration::from_secs(3),
                std::time::Duration::from_secs(4)
            )
        );
        let upstream = [
            "--pool-name=p",
            "--ha-lease-duration=15s",
            "--ha-renew-deadline=10s",
            "--ha-retry-period=2s",
        ];
        assert!(settings(&upstream).is_ok());
        for bad in [
            ["--pool-name=p", "--ha-renew-deadline=4s"],
            ["--pool-name=p", "--ha-retry-period=3s"],
            ["--pool-name=p", "--ha-lease-duration=900ms"],
        ] {
            let e = settings(&bad).unwrap_err();
            assert_eq!(
                e.errors[0].to_string(),
                "leader election needs --ha-retry-period < --ha-renew-deadline < --ha-lease-duration, and a lease of at least 1s",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_selector_is_parsed_strictly() {
        let ok = settings(&[
            "--endpoint-selector",
            "app=vllm, tier = gpu,example.com/role=",
            "--endpoint-target-ports",
            "8000,8000,8001",
        ])
        .unwrap();
        assert_eq!(
            ok.pool,
            PoolSetting::Selector {
                labels: [("app", "vllm"), ("tier", "gpu"), ("example.com/role", "")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
                target_ports: vec![8000, 8001],
            }
        );
        for (selector, entry, reason) in [
            ("app", "app", "expected key=value"),
            ("app=vllm,", "", "expected key=value"),
            ("=vllm", "=vllm", "the key is not a label name"),
            ("app=-x", "app=-x", "the value is not a label value"),
            ("app=a,app=b", "app=b", "the key is given twice"),
            ("app!=x", "app!=x", "the key is not a label name"),
        ] {
            let err =
                settings(&["--endpoint-selector", selector, "--endpoint-target-ports", "8000"]).unwrap_err();
            assert_eq!(
                err.errors,
                [FlagError::BadSelector {
                    entry: entry.into(),
                    reason: reason.into()
                }],
                "{selector}"
            );
        }
        assert_eq!(
            settings(&["--endpoint-selector", "app", "--endpoint-target-ports", "8000"])
                .unwrap_err()
                .to_string(),
            "--endpoint-selector: \"app\": expected key=value"
        );
    }

    #[test]
    fn every_flag_error_is_reported_at_once() {
        let err = settings(&[
            "--endpoints",
            "nope",
            "--pool-name",
            "p",
            "--lora-info-metric",
            "x",
        ])
        .unwrap_err();
        assert_eq!(
            err.errors,
            [
                FlagError::RemovedMetricFlag {
                    flag: "lora-info-metric"
                },
                FlagError::PoolSource,
                FlagError::BadEndpoint { entry: "nope".into() },
            ]
        );
        assert_eq!(
            err.to_string(),
            "--lora-info-metric is deprecated and cannot be used; configure metrics via engineConfigs; \
             exactly one of --endpoints, --pool-name and --endpoint-selector is required; \
             --endpoints: \"nope\" is not ip:port[@engine]"
        );
        let err = settings(&["--endpoint-selector", "app"]).unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
    }

    #[test]
    fn each_pool_source_is_one_variant() {
        assert!(matches!(
            settings(&["--endpoints", "10.0.0.1:8000@vllm"]).unwrap().pool,
            PoolSetting::Static(ref e) if e.len() == 1 && e[0].engine.as_deref() == Some("vllm")
        ));
        let pool = settings(&["--pool-name", "p"]).unwrap().pool;
        assert_eq!(
            pool,
            PoolSetting::InferencePool {
                name: "p".into(),
                group: "inference.networking.k8s.io".into()
            }
        );
        assert!(pool.needs_kubernetes());
    }
}
