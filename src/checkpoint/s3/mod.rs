//! Checkpoints on S3-compatible object stores (`s3://BUCKET/PREFIX`): where
//! to find them ([`Location`]), the credentials and settings ([`creds`]),
//! and a small blocking client ([`client`]).

pub mod client;
pub mod creds;
pub mod disk;
#[cfg(test)]
pub mod mem;
pub mod store;

use crate::bail;
use crate::error::Result;

/// A bucket and a key prefix (a "folder"), as `s3://bucket/prefix` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    /// Without a trailing `/`; empty for the bucket's top.
    pub prefix: String,
}

impl Location {
    /// Parses `s3://bucket[/prefix[/]]`; `None` when `s` is not an `s3://`
    /// URL at all (a local path).
    pub fn parse(s: &str) -> Option<Result<Location>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = !bucket.is_empty()
            && bucket.len() <= 255
            && bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !ok {
            return Some(Err(crate::bad!(
                "{s}: {bucket:?} is not a bucket name (letters, digits, '-', '.', '_')"
            )));
        }
        let prefix = prefix.trim_end_matches('/').to_string();
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Some(Err(crate::bad!(
                "{s}: the key prefix may not hold '.', '..' or an empty component"
            )));
        }
        Some(Ok(Location {
            bucket: bucket.to_string(),
            prefix,
        }))
    }

    /// The key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// The location of a sub-folder.
    pub fn join(&self, name: &str) -> Location {
        Location {
            bucket: self.bucket.clone(),
            prefix: self.key(name),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Refuses what no store could serve, before a client is made.
pub fn check_location(loc: &Location) -> Result<()> {
    if loc.bucket.starts_with('.') || loc.bucket.ends_with('.') {
        bail!("{loc}: a bucket name neither starts nor ends with '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        let l = Location::parse("s3://ckpts/run7/checkpoint/")
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("ckpts", "run7/checkpoint")
        );
        assert_eq!(l.key("metadata.json"), "run7/checkpoint/metadata.json");
        assert_eq!(
            l.join("iteration_1").to_string(),
            "s3://ckpts/run7/checkpoint/iteration_1"
        );
        let top = Location::parse("s3://b").unwrap().unwrap();
        assert_eq!((top.prefix.as_str(), top.key("x")), ("", "x".to_string()));
        assert_eq!(top.to_string(), "s3://b");
        assert!(Location::parse("/local/path").is_none());
        assert!(Location::parse("s3://").unwrap().is_err());
        assert!(Location::parse("s3://b/a/../c").unwrap().is_err());
        assert!(Location::parse("s3://b/a//c").unwrap().is_err());
        assert!(Location::parse("s3://bad bucket/x").unwrap().is_err());
    }
}
