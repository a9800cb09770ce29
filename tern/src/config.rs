//! Configuration of `tern standalone`: a TOML file (every field optional,
//! unknown fields rejected) with command-line and environment overrides
//! applied on top. `tern config defaults` prints the defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandaloneConfig {
    /// Where every embedded backend, the token secret and the generated TLS
    /// files live.
    pub data_dir: PathBuf,
    pub access_tcp: AccessTcpConfig,
    pub router_auth: RouterAuthConfig,
    pub dispatcher: DispatcherSection,
    pub offline_svc: OfflineSection,
    /// Seconds a SIGTERM drain may take before the process exits anyway.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessTcpConfig {
    /// Address the TLS TCP listener binds.
    pub listen: String,
    /// Address given to clients by ipList; empty = the bound address.
    pub advertise: String,
    /// Serve plaintext TCP instead of TLS. Only for trusted networks.
    pub plaintext: bool,
    /// PEM certificate chain; empty = generate a private CA and a server
    /// certificate under `<data_dir>/tls` on first start.
    pub tls_cert: String,
    /// PEM private key matching `tls_cert`.
    pub tls_key: String,
    /// Largest accepted frame body in bytes.
    pub max_body_bytes: u32,
    pub heartbeat_interval_ms: u64,
    /// Connections silent for this long are closed.
    pub idle_timeout_ms: u64,
    /// Frames queued per connection before a slow consumer is disconnected.
    pub outbound_queue: usize,
    /// Pushes not ACKed within this time make the client pull.
    pub push_ack_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterAuthConfig {
    /// Address of the HTTP API (register, login, ipList).
    pub listen: String,
    /// Lifetime of login tokens.
    pub token_ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherSection {
    pub max_group_members: usize,
    /// How long client message ids are remembered to drop retried sends.
    pub dedup_ttl_secs: u64,
}

/// The `[offline_svc]` section: how pushes are sent (standalone and cluster).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OfflineSection {
    /// Groups with at least this many members are large.
    pub large_group_members: usize,
    /// A device owed more than this many large-group messages from one
    /// consumer batch gets one NOTICE SYNC (and pulls) instead of a push
    /// per message. Pulling costs the server an offline write per member
    /// and message, so keep it well above what a batch holds under steady
    /// traffic (see `OfflineConfig::pull_notice_threshold`).
    pub pull_notice_threshold: usize,
    /// How long the offline copy of a device that was pushed a message
    /// waits for its ACK (an ACK in time means it is never written); 0
    /// writes every copy at once. At most half of
    /// `access_tcp.push_ack_timeout_ms`, so the copy is written before the
    /// access node tells the device to pull; a larger value is lowered to
    /// that.
    pub ack_wait_ms: u64,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./tern-data"),
            access_tcp: AccessTcpConfig::default(),
            router_auth: RouterAuthConfig::default(),
            dispatcher: DispatcherSection::default(),
            offline_svc: OfflineSection::default(),
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for AccessTcpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7800".into(),
            advertise: String::new(),
            plaintext: false,
            tls_cert: String::new(),
            tls_key: String::new(),
            max_body_bytes: tern_proto::DEFAULT_MAX_BODY_LEN,
            heartbeat_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            outbound_queue: 1024,
            push_ack_timeout_ms: 10_000,
        }
    }
}

impl Default for RouterAuthConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:7880".into(), token_ttl_secs: 24 * 3600 }
    }
}

impl Default for DispatcherSection {
    fn default() -> Self {
        let defaults = tern_dispatcher::DispatcherConfig::default();
        Self { max_group_members: defaults.max_group_members, dedup_ttl_secs: defaults.dedup_ttl.as_secs() }
    }
}

impl Default for OfflineSection {
    fn default() -> Self {
        let defaults = tern_offline_svc::OfflineConfig::default();
        Self {
            large_group_members: defaults.large_group_members,
            pull_notice_threshold: defaults.pull_notice_threshold,
            ack_wait_ms: defaults.ack_wait.as_millis() as u64,
        }
    }
}

impl OfflineSection {
    /// offline-svc settings: these on top of the library defaults, with the
    /// ACK wait capped by the access nodes' `push_ack_timeout_ms`.
    pub fn offline_config(&self, push_ack_timeout_ms: u64) -> tern_offline_svc::OfflineConfig {
        tern_offline_svc::OfflineConfig {
            large_group_members: self.large_group_members,
            pull_notice_threshold: self.pull_notice_threshold,
            ack_wait: std::time::Duration::from_millis(self.ack_wait_ms.min(push_ack_timeout_ms / 2)),
            ..tern_offline_svc::OfflineConfig::default()
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Reads a TOML configuration file; missing fields take their defaults,
/// unknown fields are errors.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
}

/// A configuration as TOML (what `tern config defaults` prints).
pub fn to_toml(config: &impl Serialize) -> String {
    toml::to_string_pretty(config).expect("config serializes")
}

impl StandaloneConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    pub fn to_toml(&self) -> String {
        to_toml(self)
    }

    /// Rejects values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_access(&self.access_tcp)?;
        if self.router_auth.token_ttl_secs == 0 {
            return Err(ConfigError("router_auth.token_ttl_secs must be > 0".into()));
        }
        if self.dispatcher.max_group_members < 2 {
            return Err(ConfigError("dispatcher.max_group_members must be at least 2".into()));
        }
        validate_offline(&self.offline_svc)
    }
}

/// Checks the `[offline_svc]` section (standalone and cluster).
pub fn validate_offline(o: &OfflineSection) -> Result<(), ConfigError> {
    if o.large_group_members < 2 {
        return Err(ConfigError("offline_svc.large_group_members must be at least 2".into()));
    }
    Ok(())
}

/// Checks the `[access_tcp]` section (standalone and cluster).
pub fn validate_access(a: &AccessTcpConfig) -> Result<(), ConfigError> {
    if a.max_body_bytes < 1024 || a.max_body_bytes > 16 * 1024 * 1024 {
        return Err(ConfigError("access_tcp.max_body_bytes must be between 1 KiB and 16 MiB".into()));
    }
    if a.heartbeat_interval_ms == 0 || a.idle_timeout_ms <= a.heartbeat_interval_ms {
        return Err(ConfigError(
            "access_tcp.idle_timeout_ms must be greater than heartbeat_interval_ms (> 0)".into(),
        ));
    }
    if a.outbound_queue == 0 || a.push_ack_timeout_ms == 0 {
        return Err(ConfigError("access_tcp.outbound_queue and push_ack_timeout_ms must be > 0".into()));
    }
    if a.tls_cert.is_empty() != a.tls_key.is_empty() {
        return Err(ConfigError("access_tcp.tls_cert and tls_key go together".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        let text = StandaloneConfig::default().to_toml();
        let parsed: StandaloneConfig = toml::from_str(&text).unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.access_tcp.listen, "127.0.0.1:7800");
        assert_eq!(parsed.offline_svc.large_group_members, 200);
        assert_eq!(parsed.offline_svc.pull_notice_threshold, 500);
    }

    #[test]
    fn offline_section_reaches_the_offline_config() {
        let config: StandaloneConfig =
            toml::from_str("[offline_svc]\nlarge_group_members = 3\npull_notice_threshold = 2\n").unwrap();
        config.validate().unwrap();
        let offline = config.offline_svc.offline_config(config.access_tcp.push_ack_timeout_ms);
        assert_eq!((offline.large_group_members, offline.pull_notice_threshold), (3, 2));
        assert_eq!(offline.ack_wait, std::time::Duration::from_secs(4), "the default wait");
        let short = config.offline_svc.offline_config(800);
        assert_eq!(
            short.ack_wait,
            std::time::Duration::from_millis(400),
            "capped at half the push ACK timeout"
        );
        assert_eq!(offline.max_pull, tern_offline_svc::OfflineConfig::default().max_pull);
        assert!(toml::from_str::<StandaloneConfig>("[offline_svc]\nlarge_group = 3\n").is_err());
        let mut config = StandaloneConfig::default();
        config.offline_svc.large_group_members = 1;
        assert!(config.validate().is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<StandaloneConfig>("[access_tcp]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut config = StandaloneConfig::default();
        config.access_tcp.idle_timeout_ms = 10;
        assert!(config.validate().is_err());
    }
}
