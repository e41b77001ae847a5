//! Credentials and region, found as the AWS tools find them.
//!
//! The chain, first match wins: `--no-sign-request` (no credentials, no
//! signature); `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+
//! `AWS_SESSION_TOKEN`); the profile `AWS_PROFILE` (else `default`) in the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//! `~/.aws/credentials`) or the config file (`AWS_CONFIG_FILE`, else
//! `~/.aws/config`, whose sections are `[profile NAME]`, and `[default]`).
//! The region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`,
//! else `us-east-1`. The endpoint: `--endpoint-url`, `AWS_ENDPOINT_URL`,
//! the profile's `endpoint_url`, else AWS's own for the region.
//!
//! Instance roles (IMDS), web identity and SSO are not read: a store that
//! needs them is given keys through the environment. Secrets never reach a
//! log line, an error message, `.reshardfs/` or a command line: the types
//! holding them print as `<redacted>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::bail;
use crate::error::Result;

/// An access key, its secret and an optional session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Where they came from, for messages (`AWS_ACCESS_KEY_ID`, `profile
    /// default in ~/.aws/credentials`).
    pub from: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(<redacted>, from {})", self.from)
    }
}

/// What the environment says about the store: credentials (None: sign
/// nothing), region and endpoint.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keys: Option<Keys>,
    pub region: String,
    /// A custom endpoint (`http://host:port`), or None for AWS's own.
    pub endpoint: Option<String>,
}

/// The environment, as a lookup: the process's own in production, a map in
/// tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process's environment (empty values count as unset).
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// A section of an INI-style AWS file: `key = value` lines.
type Section = HashMap<String, String>;

/// Parses an AWS credentials or config file: `[section]` headers and
/// `key = value` lines; `#` and `;` start comments.
fn parse_ini(text: &str) -> HashMap<String, Section> {
    let mut out: HashMap<String, Section> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        if let (Some(sec), Some((k, v))) = (&current, line.split_once('=')) {
            out.entry(sec.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn home(env: Env<'_>) -> Option<PathBuf> {
    env("HOME").map(PathBuf::from)
}

/// A profile's section of a file, if the file and the section exist.
/// `config` files name sections `profile NAME` (but `default`).
fn profile_section(path: &Path, profile: &str, config: bool) -> Result<Option<Section>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    let mut ini = parse_ini(&text);
    let name = if config && profile != "default" {
        format!("profile {profile}")
    } else {
        profile.to_string()
    };
    Ok(ini.remove(&name))
}

/// Finds the settings for a store. `no_sign`: `--no-sign-request`;
/// `endpoint`: `--endpoint-url`. A profile named by `AWS_PROFILE` that no
/// file holds is an error (as for the AWS CLI), the default one may be
/// missing.
pub fn settings(env: Env<'_>, no_sign: bool, endpoint: Option<&str>) -> Result<Settings> {
    let named = env("AWS_PROFILE");
    let profile = named.clone().unwrap_or_else(|| "default".into());
    let creds_file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".aws/credentials")));
    let config_file = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".aws/config")));
    let from_creds = match &creds_file {
        Some(p) => profile_section(p, &profile, false)?,
        None => None,
    };
    let from_config = match &config_file {
        Some(p) => profile_section(p, &profile, true)?,
        None => None,
    };
    if named.is_some() && from_creds.is_none() && from_config.is_none() {
        bail!(
            "AWS_PROFILE={profile}: no such profile in {} or {}",
            creds_file
                .as_deref()
                .map_or("(no HOME)".into(), |p| p.display().to_string()),
            config_file
                .as_deref()
                .map_or("(no HOME)".into(), |p| p.display().to_string())
        );
    }
    let get = |k: &str| {
        from_creds
            .as_ref()
            .and_then(|s| s.get(k))
            .or_else(|| from_config.as_ref().and_then(|s| s.get(k)))
            .cloned()
    };
    let keys = if no_sign {
        None
    } else if let (Some(id), Some(secret)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    {
        Some(Keys {
            access_key_id: id,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN"),
            from: "AWS_ACCESS_KEY_ID".into(),
        })
    } else if let (Some(id), Some(secret)) =
        (get("aws_access_key_id"), get("aws_secret_access_key"))
    {
        Some(Keys {
            access_key_id: id,
            secret_access_key: secret,
            session_token: get("aws_session_token"),
            from: format!("profile {profile}"),
        })
    } else {
        bail!(
            "no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a profile in ~/.aws/credentials, or pass --no-sign-request for a public bucket"
        );
    };
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| get("region"))
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = endpoint
        .map(str::to_string)
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| get("endpoint_url"));
    Ok(Settings {
        keys,
        region,
        endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::tests::input_err;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_environment_comes_first() {
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "SECRET"),
            ("AWS_SESSION_TOKEN", "TOKEN"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("HOME", "/nonexistent"),
        ]);
        let s = settings(&env, false, None).unwrap();
        let k = s.keys.clone().unwrap();
        assert_eq!(
            (k.access_key_id.as_str(), k.secret_access_key.as_str()),
            ("AKID", "SECRET")
        );
        assert_eq!(k.session_token.as_deref(), Some("TOKEN"));
        assert_eq!(s.region, "eu-west-1");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        // --endpoint-url wins over the environment; --no-sign-request drops the keys.
        let s = settings(&env, true, Some("http://other:1")).unwrap();
        assert!(s.keys.is_none());
        assert_eq!(s.endpoint.as_deref(), Some("http://other:1"));
        // Secrets never print.
        let shown = format!("{:?}", settings(&env, false, None).unwrap());
        assert!(
            !shown.contains("SECRET") && !shown.contains("TOKEN") && !shown.contains("AKID"),
            "{shown}"
        );
    }

    #[test]
    fn profiles_from_the_shared_files() {
        let tmp = tempfile::tempdir().unwrap();
        let aws = tmp.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n[work]\n# a comment\naws_access_key_id=W\naws_secret_access_key = WS\naws_session_token = WT\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = ap-east-1\n[profile work]\nregion = us-west-2\nendpoint_url = http://minio:9000\n",
        )
        .unwrap();
        let home = tmp.path().display().to_string();
        let env = env_of(&[("HOME", &home)]);
        let s = settings(&env, false, None).unwrap();
        assert_eq!(s.keys.unwrap().access_key_id, "D");
        assert_eq!(s.region, "ap-east-1");
        let env = env_of(&[("HOME", &home), ("AWS_PROFILE", "work")]);
        let s = settings(&env, false, None).unwrap();
        let k = s.keys.unwrap();
        assert_eq!(
            (k.access_key_id.as_str(), k.session_token.as_deref()),
            ("W", Some("WT"))
        );
        assert_eq!(k.from, "profile work");
        assert_eq!(s.region, "us-west-2");
        assert_eq!(s.endpoint.as_deref(), Some("http://minio:9000"));
        let env = env_of(&[("HOME", &home), ("AWS_PROFILE", "nope")]);
        input_err(
            settings(&env, false, None),
            &["AWS_PROFILE=nope", "no such profile"],
        );
    }

    #[test]
    fn no_credentials_says_what_to_set() {
        let env = env_of(&[("HOME", "/nonexistent")]);
        input_err(
            settings(&env, false, None),
            &["AWS_ACCESS_KEY_ID", "AWS_PROFILE", "--no-sign-request"],
        );
        assert!(settings(&env, true, None).unwrap().keys.is_none());
    }
}
