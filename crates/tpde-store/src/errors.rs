//! object_store's errors as tpde's stable codes.

use tpde::{Error, ErrorCode};

use crate::Location;

/// The error and every source below it, as one line: object_store keeps the
/// cause (a status, a retry count, a credential provider) in the chain.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Maps a failure of `action` (such as "cannot read") on `at` to a tpde error that
/// names the URL.
pub(crate) fn remote_error(at: &Location, action: &str, e: &object_store::Error) -> Error {
    use object_store::Error as E;
    let text = chain(e);
    let lower = text.to_ascii_lowercase();
    let code = match e {
        E::NotFound { .. } => ErrorCode::RemoteNotFound,
        E::PermissionDenied { .. } => ErrorCode::RemoteDenied,
        E::Unauthenticated { .. } => ErrorCode::RemoteCredentials,
        E::Precondition { .. } | E::NotModified { .. } => ErrorCode::RemoteChanged,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } | E::NotSupported { .. } | E::NotImplemented => {
            ErrorCode::InvalidArgument
        }
        // With no credentials configured, the chain ends at the instance metadata
        // service (or the container's, or a web identity), whose failure is generic.
        _ if lower.contains("169.254.169.254")
            || lower.contains("credential")
            || lower.contains("metadata")
            || lower.contains("web identity")
            || lower.contains("token") =>
        {
            ErrorCode::RemoteCredentials
        }
        _ if lower.contains("retries") => ErrorCode::RemoteRetries,
        _ => ErrorCode::Io,
    };
    // object_store's message already holds its sources.
    Error::new(code, format!("{action}: {e}")).in_file(&at.as_path())
}

/// The error for an object that changed between two reads.
pub(crate) fn changed(at: &Location, what: &str) -> Error {
    Error::new(ErrorCode::RemoteChanged, format!("the object changed while it was read: {what}")).in_file(&at.as_path())
}
