//! URLs: which store, and where in it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreScheme, RetryConfig};
use tpde::{Error, ErrorCode, Result};

/// The URL schemes tpde reads and writes.
const SCHEMES: &[&str] =
    &["s3://", "s3a://", "gs://", "az://", "adl://", "azure://", "abfs://", "abfss://", "http://", "https://"];

/// Whether `text` is an object-store URL rather than a local path.
#[must_use]
pub fn is_url(text: &str) -> bool {
    SCHEMES.iter().any(|s| text.len() > s.len() && text[..s.len()].eq_ignore_ascii_case(s))
}

/// An object (or a prefix, for a sharded checkpoint) in an object store.
#[derive(Clone)]
pub struct Location {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) path: ObjectPath,
    url: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Retries with exponential backoff (object_store's defaults: from 100 ms, doubling
/// to at most 15 s), `TPDE_REMOTE_RETRIES` times (default 10) within 3 minutes.
fn retry_config() -> RetryConfig {
    let max_retries = std::env::var("TPDE_REMOTE_RETRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    RetryConfig { max_retries, retry_timeout: Duration::from_secs(180), ..RetryConfig::default() }
}

/// The store and the object's path that `url` names.
///
/// object_store 0.12's `ObjectStoreScheme::parse` drops the first segment of an
/// `az://` URL's path, as if it named the container, while its Azure builder takes
/// the container from the host: `az://container/path/to/object`, as Azure's own
/// tools write it. The path is taken whole here, so the two agree.
fn scheme_and_path(url: &url::Url) -> std::result::Result<(ObjectStoreScheme, ObjectPath), object_store::Error> {
    let (scheme, path) = ObjectStoreScheme::parse(url)?;
    if url.scheme() == "az" {
        return Ok((scheme, ObjectPath::from_url_path(url.path())?));
    }
    Ok((scheme, path))
}

impl Location {
    /// Parses `url` and builds its store from the environment, as the store's own
    /// tools would (see the crate docs). Nothing is fetched.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` for a URL that names no store tpde can use, or a
    /// configuration the store refuses.
    pub fn parse(url: &str) -> Result<Self> {
        let invalid = |why: String| Error::new(ErrorCode::InvalidArgument, why).in_file(Path::new(url));
        let parsed = url::Url::parse(url).map_err(|e| invalid(format!("not a URL: {e}")))?;
        let (scheme, path) = scheme_and_path(&parsed).map_err(|e| invalid(format!("not an object store URL: {e}")))?;
        let refused = |e: object_store::Error| invalid(format!("the store's configuration is refused: {e}"));
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            ObjectStoreScheme::Http => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(&parsed[..url::Position::BeforePath])
                    // The URL says http: plain HTTP is what was asked for.
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(parsed.scheme() == "http"))
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            other => return Err(invalid(format!("{other:?} URLs are not read by tpde; give a local path instead"))),
        };
        Ok(Self { store, path, url: url.to_owned() })
    }

    /// The URL, as given.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL as a path, for the `file` of tpde's errors.
    pub(crate) fn as_path(&self) -> PathBuf {
        PathBuf::from(&self.url)
    }

    /// The last segment of the path: the object's file name.
    pub(crate) fn file_name(&self) -> Option<String> {
        self.path.filename().map(str::to_owned)
    }

    /// The object `name` under this location, taken as a prefix.
    pub(crate) fn child(&self, name: &str) -> Result<Self> {
        let mut path = self.path.clone();
        for part in name.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(Error::new(ErrorCode::InvalidCheckpoint, format!("{name:?} is not a file name"))
                    .in_file(&self.as_path()));
            }
            path = path.child(part);
        }
        Ok(Self { store: Arc::clone(&self.store), path, url: format!("{}/{}", self.url.trim_end_matches('/'), name) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(url: &str) -> (ObjectStoreScheme, String) {
        let (scheme, path) = scheme_and_path(&url::Url::parse(url).unwrap()).unwrap();
        (scheme, path.to_string())
    }

    #[test]
    fn every_scheme_names_the_object_within_its_bucket_or_container() {
        assert_eq!(path_of("s3://bucket/run/d.tpde"), (ObjectStoreScheme::AmazonS3, "run/d.tpde".into()));
        assert_eq!(path_of("gs://bucket/run/d.tpde"), (ObjectStoreScheme::GoogleCloudStorage, "run/d.tpde".into()));
        assert_eq!(path_of("az://container/run/d.tpde"), (ObjectStoreScheme::MicrosoftAzure, "run/d.tpde".into()));
        assert_eq!(
            path_of("abfs://container@account.dfs.core.windows.net/run/d.tpde"),
            (ObjectStoreScheme::MicrosoftAzure, "run/d.tpde".into())
        );
        assert_eq!(path_of("https://host/files/d.tpde"), (ObjectStoreScheme::Http, "files/d.tpde".into()));
    }
}
